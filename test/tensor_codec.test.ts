/** Tensors on the wire: float16 conversion, buckets and chunks, slices, reassembly. */
import { test } from "node:test";
import assert from "node:assert/strict";
import fc from "fast-check";
import {
  DEFAULT_BUCKET_BYTES, Reassembler, accumulateChunk, anyNonFinite, bytesPerElement, decodeFloat16, decodeValues, encodeChunks, encodeFloat16,
  encodeValues, flatten, float16BitsToFloat32, float32ToFloat16Bits, hasNonFinite, planChunks, sliceRanges, unflatten, type WireDtype,
} from "../proto/tensor_codec.js";
import { crc32, crc32Portable } from "../proto/checksum.js";

const SEED = 424242;

test("fp16 - every float16 survives float16 -> float32 -> float16 exactly", () => {
  for (let h = 0; h < 65536; h++) {
    const f = float16BitsToFloat32(h);
    const isNaN16 = (h & 0x7c00) === 0x7c00 && (h & 0x3ff) !== 0;
    if (isNaN16) {
      assert.ok(Number.isNaN(f));
      const back = float32ToFloat16Bits(f);
      assert.ok((back & 0x7c00) === 0x7c00 && (back & 0x3ff) !== 0, `NaN ${h.toString(16)} stays NaN`);
    } else assert.equal(float32ToFloat16Bits(f), h, `0x${h.toString(16)} (${f})`);
  }
  // The bulk path agrees with the scalar one.
  const all = new Uint16Array(65536).map((_, i) => i);
  const f32 = decodeFloat16(all);
  for (let h = 0; h < 65536; h++) assert.ok(Object.is(f32[h], Math.fround(float16BitsToFloat32(h))) || Number.isNaN(f32[h]!));
});

test("fp16 - edge cases match the IEEE 754 binary16 reference", () => {
  const cases: Array<[number, number]> = [
    [0, 0x0000], [-0, 0x8000], [1, 0x3c00], [-2, 0xc000], [0.5, 0x3800],
    [65504, 0x7bff], // max
    [65519.99, 0x7bff], // below the rounding midpoint to Inf
    [65520, 0x7c00], // the midpoint rounds to even: Inf
    [1e6, 0x7c00], [Infinity, 0x7c00], [-Infinity, 0xfc00],
    [2 ** -14, 0x0400], // smallest normal
    [2 ** -24, 0x0001], // smallest subnormal
    [2 ** -25, 0x0000], // tie between 0 and the smallest subnormal: even (0)
    [3 * 2 ** -26, 0x0001], // above the tie
    [3 * 2 ** -25, 0x0002], // tie between 1 and 2 subnormal ulps: even (2)
    [2 ** -14 - 2 ** -25, 0x0400], // subnormal rounding up into the smallest normal
    [1 + 2 ** -11, 0x3c00], // tie: even (1)
    [1 + 3 * 2 ** -11, 0x3c02], // tie: even (1 + 2^-9)
    [1 + 2 ** -10, 0x3c01], // exact
    [2 ** -30, 0x0000], [-(2 ** -30), 0x8000],
    [0.1, 0x2e66], [1 / 3, 0x3555],
  ];
  for (const [x, h] of cases) assert.equal(float32ToFloat16Bits(x), h, `${x} -> 0x${float32ToFloat16Bits(x).toString(16)}, want 0x${h.toString(16)}`);
  assert.ok(Number.isNaN(float16BitsToFloat32(float32ToFloat16Bits(NaN))));
  assert.equal(float16BitsToFloat32(0x7bff), 65504);
  assert.equal(float16BitsToFloat32(0x0001), 2 ** -24);
});

/** All float16 values, ascending, finite, for the nearest-value reference. */
const FINITE16 = (() => {
  const v: number[] = [];
  for (let h = 0; h < 0x7c00; h++) v.push(float16BitsToFloat32(h));
  return v; // non-negative, ascending
})();

test("fp16 - any float32 rounds to the nearest float16, ties to even (reference search)", () => {
  fc.assert(
    fc.property(fc.float({ noNaN: true, min: -65504, max: 65504 }), (x) => {
      const h = float32ToFloat16Bits(x);
      const got = float16BitsToFloat32(h);
      const a = Math.abs(x);
      // Binary search the neighbours of |x| among the positive float16 values.
      let lo = 0;
      let hi = FINITE16.length - 1;
      while (hi - lo > 1) {
        const mid = (lo + hi) >> 1;
        if (FINITE16[mid]! <= a) lo = mid;
        else hi = mid;
      }
      const below = FINITE16[lo]!;
      const above = FINITE16[hi]!;
      const dBelow = a - below;
      const dAbove = above - a;
      const want = a <= below ? lo : dBelow < dAbove ? lo : dAbove < dBelow ? hi : lo % 2 === 0 ? lo : hi;
      assert.equal(Math.abs(got), FINITE16[want]!, `${x}`);
      assert.equal(got < 0 || Object.is(got, -0), x < 0 || Object.is(x, -0), "the sign is kept (zero included)");
      // Error bound: half an ulp; relative 2^-11 in the normal range.
      if (a >= 2 ** -14) assert.ok(Math.abs(got - x) <= Math.abs(x) * 2 ** -11 * (1 + 1e-12));
      else assert.ok(Math.abs(got - x) <= 2 ** -25);
    }),
    { seed: SEED, numRuns: 20000 },
  );
});

test("fp16 - bulk encode and decode agree with the scalar conversion", () => {
  fc.assert(
    fc.property(fc.float32Array({ maxLength: 200 }), (src) => {
      const bits = encodeFloat16(src);
      for (let i = 0; i < src.length; i++) assert.equal(bits[i], float32ToFloat16Bits(src[i]!));
      const back = decodeValues(encodeValues(src, "fp16"), "fp16");
      for (let i = 0; i < src.length; i++) {
        const want = float16BitsToFloat32(float32ToFloat16Bits(src[i]!));
        assert.ok(Object.is(back[i], want) || (Number.isNaN(back[i]!) && Number.isNaN(want)));
      }
    }),
    { seed: SEED, numRuns: 300 },
  );
});

test("tensor codec - non-finite values are found on the bits", () => {
  assert.equal(hasNonFinite(encodeValues(new Float32Array([1, 2, -3e38]), "fp32"), "fp32"), false);
  assert.equal(hasNonFinite(encodeValues(new Float32Array([1, NaN]), "fp32"), "fp32"), true);
  assert.equal(hasNonFinite(encodeValues(new Float32Array([1, 65504]), "fp16"), "fp16"), false);
  assert.equal(hasNonFinite(encodeValues(new Float32Array([1, 70000]), "fp16"), "fp16"), true, "fp16 overflow becomes Inf");
  // The fp32 probe runs four sums side by side and a tail: a bad value is found in every lane and in the tail.
  for (let n = 1; n <= 11; n++) {
    for (let at = 0; at < n; at++) {
      for (const bad of [NaN, Infinity, -Infinity]) {
        const v = new Float32Array(n).fill(-3.4e38);
        v[at] = bad;
        assert.equal(anyNonFinite(v), true, `${bad} at ${at} of ${n}`);
        assert.equal(hasNonFinite(encodeValues(v, "fp32"), "fp32"), true);
      }
    }
    assert.equal(anyNonFinite(new Float32Array(n).fill(3.4e38)), false);
  }
});

test("tensor codec - sliceRanges tiles the vector in near-equal contiguous slices", () => {
  fc.assert(
    fc.property(fc.nat({ max: 100000 }), fc.integer({ min: 1, max: 64 }), (total, n) => {
      const s = sliceRanges(total, n);
      assert.equal(s.length, n);
      let at = 0;
      for (const r of s) {
        assert.equal(r.offset, at);
        at += r.length;
      }
      assert.equal(at, total);
      const lens = s.map((r) => r.length);
      assert.ok(Math.max(...lens) - Math.min(...lens) <= 1);
    }),
    { seed: SEED, numRuns: 500 },
  );
  assert.throws(() => sliceRanges(10, 0), RangeError);
});

const sizesArb = fc.array(fc.oneof(fc.nat({ max: 50 }), fc.nat({ max: 5000 })), { minLength: 1, maxLength: 30 });

test("tensor codec - chunks respect the budget, tile the vector and never straddle a slice", () => {
  fc.assert(
    fc.property(sizesArb, fc.integer({ min: 4, max: 4096 }), fc.constantFrom<WireDtype>("fp32", "fp16"), fc.integer({ min: 1, max: 8 }), (sizes, budget, dtype, n) => {
      const total = sizes.reduce((a, b) => a + b, 0);
      const slices = sliceRanges(total, n);
      const plan = planChunks(sizes, { bucketBytes: budget, dtype, slices });
      let at = 0;
      for (const c of plan) {
        assert.equal(c.offset, at, "chunks tile the vector in order");
        assert.ok(c.length > 0);
        assert.ok(c.length * bytesPerElement(dtype) <= budget, "chunk within the budget");
        const s = slices[c.slice]!;
        assert.ok(c.offset >= s.offset && c.offset + c.length <= s.offset + s.length, "chunk inside its slice");
        assert.ok(c.chunkIndex < c.chunkCount);
        at += c.length;
      }
      assert.equal(at, total);
      // Buckets hold whole tensors unless one tensor alone exceeds the budget.
      const maxElems = Math.floor(budget / bytesPerElement(dtype));
      const bucketLen = new Map<number, number>();
      for (const c of plan) bucketLen.set(c.bucketId, (bucketLen.get(c.bucketId) ?? 0) + c.length);
      for (const [, len] of bucketLen) assert.ok(len <= maxElems || sizes.includes(len));
    }),
    { seed: SEED, numRuns: 400 },
  );
  assert.equal(DEFAULT_BUCKET_BYTES, 512 * 1024);
});

test("tensor codec - flatten, chunk, shuffle and reassemble gives the vector back", () => {
  fc.assert(
    fc.property(
      fc.array(fc.float32Array({ minLength: 0, maxLength: 300, noDefaultInfinity: true, noNaN: true }), { minLength: 1, maxLength: 8 }),
      fc.integer({ min: 8, max: 512 }),
      fc.constantFrom<WireDtype>("fp32", "fp16"),
      fc.integer({ min: 1, max: 4 }),
      fc.nat(),
      (tensors, budget, dtype, n, shuffleSeed) => {
        const sizes = tensors.map((t) => t.length);
        const flat = flatten(tensors);
        const plan = planChunks(sizes, { bucketBytes: budget, dtype, slices: sliceRanges(flat.length, n) });
        const chunks = encodeChunks(flat, plan, dtype);
        for (const c of chunks) assert.equal(c.checksum, crc32(c.data));
        // Deterministic shuffle, plus one duplicate (a redelivery).
        let r = shuffleSeed;
        const order = chunks.map((c, i) => ({ c, k: (r = (r * 1103515245 + 12345) >>> 0) + i * 0 }));
        order.sort((a, b) => a.k - b.k);
        const re = new Reassembler(flat.length, plan);
        for (const { c } of order) assert.equal(re.add(c), true);
        if (chunks.length > 0) assert.equal(re.add(chunks[0]!), false, "a duplicate is ignored");
        assert.ok(re.complete);
        const want = dtype === "fp32" ? flat : decodeValues(encodeValues(flat, "fp16"), "fp16");
        assert.deepEqual(Array.from(re.values), Array.from(want));
        const back = unflatten(re.values, sizes);
        assert.deepEqual(back.map((t) => t.length), sizes);
        if (dtype === "fp32") for (let i = 0; i < tensors.length; i++) assert.deepEqual(Array.from(back[i]!), Array.from(tensors[i]!));
      },
    ),
    { seed: SEED, numRuns: 300 },
  );
});

test("tensor codec - a chunk outside the plan is refused", () => {
  const plan = planChunks([10], { bucketBytes: 16 });
  const re = new Reassembler(10, plan);
  const [c] = encodeChunks(new Float32Array(10), plan, "fp32");
  assert.throws(() => re.add({ ...c!, offset: 1 }), RangeError);
  assert.throws(() => re.add({ ...c!, bucketId: 9 }), RangeError);
  assert.equal(re.missing, plan.length);
});

test("tensor codec - fp32 accumulation of fp16 chunks averages as the reference does", () => {
  const a = new Float32Array([1, 2, 3, 4]);
  const b = new Float32Array([3, -2, 0.5, 1e-3]);
  const acc = new Float32Array(4);
  accumulateChunk(acc, 0, encodeValues(a, "fp16"), "fp16", 0.5);
  accumulateChunk(acc, 0, encodeValues(b, "fp16"), "fp16", 0.5);
  for (let i = 0; i < 4; i++) assert.ok(Math.abs(acc[i]! - (a[i]! + b[i]!) / 2) <= 1e-3 * Math.max(1, Math.abs(a[i]!)));
  assert.throws(() => accumulateChunk(acc, 2, encodeValues(a, "fp32"), "fp32"), RangeError);
});

test("checksum - the portable CRC-32 matches the native one and the standard check value", () => {
  assert.equal(crc32Portable(new TextEncoder().encode("123456789")), 0xcbf43926);
  assert.equal(crc32(new TextEncoder().encode("123456789")), 0xcbf43926);
  fc.assert(fc.property(fc.uint8Array({ maxLength: 500 }), (d) => crc32(d) === crc32Portable(d)), { seed: SEED, numRuns: 200 });
});

test("fp16 - the fast bulk encoder matches the scalar reference over a sweep of every float32 class", () => {
  // Every 4099th bit pattern of the whole float32 range, plus every pattern near the subnormal/normal
  // and overflow boundaries of float16, both signs. NaN payloads: the bulk encoder keeps NaN a NaN.
  const bits: number[] = [];
  for (let x = 0; x < 2 ** 32; x += 4099) bits.push(x >>> 0);
  for (const edge of [0x33000000, 0x387fc000, 0x38800000, 0x477fe000, 0x47800000, 0x7f800000]) for (let d = -2048; d <= 2048; d++) bits.push((edge + d) >>> 0, ((edge + d) | 0x80000000) >>> 0);
  const u = Uint32Array.from(bits);
  const f = new Float32Array(u.buffer);
  const h = encodeFloat16(f);
  for (let i = 0; i < f.length; i++) {
    if (Number.isNaN(f[i]!)) assert.ok(Number.isNaN(float16BitsToFloat32(h[i]!)), `NaN 0x${u[i]!.toString(16)}`);
    else assert.equal(h[i], float32ToFloat16Bits(f[i]!), `0x${u[i]!.toString(16)} (${f[i]})`);
  }
});

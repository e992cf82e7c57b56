/**
 * Tensors on the wire: the gradients of several tensors are flattened into one vector, grouped into
 * fused buckets of at most `bucketBytes` (small tensors share a bucket, as in horovod's tensor fusion),
 * cut into chunks that each fit a NATS message, and sent as fp32 or fp16 (little-endian). Receivers
 * accumulate in fp32. `sliceRanges` cuts the flat vector into the contiguous slices that reduce-scatter
 * gives to each owner; chunks never straddle a slice boundary, so every chunk has exactly one owner.
 *
 * The plan (buckets and chunks) is a pure function of the tensor sizes, the budget, the dtype and the
 * slices, so every member computes the same plan and knows which chunks to expect.
 */
import { endianness } from "node:os";
import { crc32 } from "./checksum.js";
import { allocFrame, sealFrame, type FrameFields } from "./chunk_frame.js";
import { DATA_PARALLEL_DEFAULTS } from "../core/training/data_parallel_settings.js";

/** Element type on the wire. Same names as the `--wire-dtype` option and the proto `Dtype` enum. */
export type WireDtype = "fp32" | "fp16";

/**
 * Default byte budget of one bucket and one chunk: `--bucket-bytes`'s default (512 KiB, chosen by
 * bench/allreduce's bucket sweep), so that a chunk plus its header stays under NATS's default
 * max_payload of 1 MiB.
 */
export const DEFAULT_BUCKET_BYTES = DATA_PARALLEL_DEFAULTS.bucketBytes;

const LITTLE_ENDIAN = endianness() === "LE";

/** Bytes per element of a wire dtype. */
export function bytesPerElement(dtype: WireDtype): number {
  return dtype === "fp16" ? 2 : 4;
}

// ---------------------------------------------------------------------------------------------
// float32 <-> float16

const scratchF32 = new Float32Array(1);
const scratchU32 = new Uint32Array(scratchF32.buffer);

/** Converts the bits of a float32 to the bits of the nearest float16 (round to nearest, ties to even). */
function f32BitsToF16Bits(x: number): number {
  const sign = (x >>> 16) & 0x8000;
  const exp = (x >>> 23) & 0xff;
  const mant = x & 0x7fffff;
  if (exp === 0xff) {
    // Inf stays Inf; NaN stays NaN (quiet bit set so a payload that shifts out cannot make it Inf).
    return mant === 0 ? sign | 0x7c00 : sign | 0x7e00 | (mant >>> 13);
  }
  const e = exp - 127 + 15;
  if (e >= 0x1f) return sign | 0x7c00; // overflow: beyond 65504 after rounding range -> Inf
  if (e <= 0) {
    // Subnormal half (or zero). Values below 2^-25 round to zero; 2^-25 exactly ties to even (zero).
    if (e < -10) return sign;
    const m = mant | 0x800000;
    const shift = 14 - e; // 14..24
    let half = m >>> shift;
    const rem = m & ((1 << shift) - 1);
    const halfway = 1 << (shift - 1);
    if (rem > halfway || (rem === halfway && (half & 1) === 1)) half++;
    return sign | half; // a carry into 0x400 is the smallest normal, which is right
  }
  let half = (e << 10) | (mant >>> 13);
  const rem = mant & 0x1fff;
  if (rem > 0x1000 || (rem === 0x1000 && (half & 1) === 1)) half++; // a carry may reach Inf: right too
  return sign | half;
}

/** Bits (0..0xffff) of the float16 nearest to `value` taken as a float32 (round to nearest even). */
export function float32ToFloat16Bits(value: number): number {
  scratchF32[0] = value;
  return f32BitsToF16Bits(scratchU32[0]!);
}

/** The float16 with bits `h` (0..0xffff) as a number (exact: every float16 is a float32). */
export function float16BitsToFloat32(h: number): number {
  const sign = h & 0x8000 ? -1 : 1;
  const exp = (h >>> 10) & 0x1f;
  const mant = h & 0x3ff;
  if (exp === 0) return sign * mant * 2 ** -24;
  if (exp === 0x1f) return mant === 0 ? sign * Infinity : NaN;
  return sign * (1 + mant / 1024) * 2 ** (exp - 15);
}

let f16Table: Float32Array | undefined;
/** All 65536 float16 values as float32, built on first use (256 KiB): decoding is one lookup per element. */
function float16Table(): Float32Array {
  if (!f16Table) {
    f16Table = new Float32Array(65536);
    for (let h = 0; h < 65536; h++) f16Table[h] = float16BitsToFloat32(h);
  }
  return f16Table;
}

/**
 * float32 bits `x` (value `v`) to float16 bits, round to nearest even, with the integer rounding-bias
 * trick (F. Giesen, "float_to_half_fast3_rtne"): normal halves take four integer operations and no
 * branch on the mantissa, about 5x faster than {@link f32BitsToF16Bits} per element; subnormals use
 * one float addition (exact: see the note below), NaN keeps its payload via the slow path.
 */
function f16Encode(x: number, v: number): number {
  const sign = (x >>> 16) & 0x8000;
  const a = x & 0x7fffffff;
  if (a >= 0x47800000) return a > 0x7f800000 ? f32BitsToF16Bits(x) : sign | 0x7c00; // >= 2^16: Inf (or NaN)
  if (a >= 0x38800000) return sign | ((a - 0x37fff001 + ((a >>> 13) & 1)) >>> 13); // normal half (a carry may reach Inf: right)
  // Subnormal half or zero: |v| + 0.5 rounds the 10 mantissa bits into place (ties to even). The sum
  // in float64 is exact enough: |v| < 2^-14 spans at most 24 bits, so float64 then float32 rounding
  // cannot meet a false tie.
  scratchF32[0] = Math.abs(v) + 0.5;
  return sign | (scratchU32[0]! - 0x3f000000);
}

/**
 * Converts float32 values to float16 bits, rounding to nearest even. The loop reads only the bits and
 * handles normal halves inline (the common case, four integer operations); everything else goes
 * through {@link f16Encode}. Measured 1.3-1.6x faster than calling f16Encode per element.
 */
export function encodeFloat16(src: Float32Array, out: Uint16Array = new Uint16Array(src.length)): Uint16Array {
  const bits = new Uint32Array(src.buffer, src.byteOffset, src.length);
  const n = src.length;
  for (let i = 0; i < n; i++) {
    const x = bits[i]!;
    const a = x & 0x7fffffff;
    out[i] = a >= 0x38800000 && a < 0x47800000 ? ((x >>> 16) & 0x8000) | ((a - 0x37fff001 + ((a >>> 13) & 1)) >>> 13) : f16Encode(x, src[i]!);
  }
  return out;
}

/** Converts float16 bits to float32 values. */
export function decodeFloat16(src: Uint16Array, out = new Float32Array(src.length)): Float32Array {
  const t = float16Table();
  for (let i = 0; i < src.length; i++) out[i] = t[src[i]!]!;
  return out;
}

/** Rounds every value through float16 in place (what a receiver of the fp16 encoding decodes). */
export function roundThroughFloat16(values: Float32Array): void {
  const t = float16Table();
  const bits = new Uint32Array(values.buffer, values.byteOffset, values.length);
  for (let i = 0; i < values.length; i++) values[i] = t[f16Encode(bits[i]!, values[i]!)]!;
}

// ---------------------------------------------------------------------------------------------
// Little-endian byte views

/** float32 values as little-endian bytes (a copy). */
export function float32ToBytes(src: Float32Array): Uint8Array {
  const out = new Uint8Array(src.length * 4);
  if (LITTLE_ENDIAN) out.set(new Uint8Array(src.buffer, src.byteOffset, src.byteLength));
  else {
    const dv = new DataView(out.buffer);
    for (let i = 0; i < src.length; i++) dv.setFloat32(i * 4, src[i]!, true);
  }
  return out;
}

/** Little-endian float32 bytes as values (a view when aligned on a little-endian host, else a copy). */
export function bytesToFloat32(bytes: Uint8Array): Float32Array {
  if (bytes.length % 4 !== 0) throw new RangeError(`float32 data of ${bytes.length} bytes is not a multiple of 4`);
  const n = bytes.length / 4;
  if (LITTLE_ENDIAN) {
    if (bytes.byteOffset % 4 === 0) return new Float32Array(bytes.buffer, bytes.byteOffset, n);
    return new Float32Array(new Uint8Array(bytes).buffer /* a copy; Buffer#slice would be a view */, 0, n);
  }
  const dv = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const out = new Float32Array(n);
  for (let i = 0; i < n; i++) out[i] = dv.getFloat32(i * 4, true);
  return out;
}

function bytesToUint16(bytes: Uint8Array): Uint16Array {
  if (bytes.length % 2 !== 0) throw new RangeError(`float16 data of ${bytes.length} bytes is not a multiple of 2`);
  const n = bytes.length / 2;
  if (LITTLE_ENDIAN) {
    if (bytes.byteOffset % 2 === 0) return new Uint16Array(bytes.buffer, bytes.byteOffset, n);
    return new Uint16Array(new Uint8Array(bytes).buffer /* a copy; Buffer#slice would be a view */, 0, n);
  }
  const dv = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const out = new Uint16Array(n);
  for (let i = 0; i < n; i++) out[i] = dv.getUint16(i * 2, true);
  return out;
}

function uint16ToBytes(src: Uint16Array): Uint8Array {
  if (LITTLE_ENDIAN) return new Uint8Array(src.buffer, src.byteOffset, src.byteLength);
  const out = new Uint8Array(src.length * 2);
  const dv = new DataView(out.buffer);
  for (let i = 0; i < src.length; i++) dv.setUint16(i * 2, src[i]!, true);
  return out;
}

/** Encodes float32 values in a wire dtype (little-endian bytes). */
export function encodeValues(src: Float32Array, dtype: WireDtype): Uint8Array {
  return dtype === "fp16" ? uint16ToBytes(encodeFloat16(src)) : float32ToBytes(src);
}

/** Decodes wire bytes of a dtype into float32 values. */
export function decodeValues(data: Uint8Array, dtype: WireDtype): Float32Array {
  return dtype === "fp16" ? decodeFloat16(bytesToUint16(data)) : bytesToFloat32(data);
}

/** True when wire bytes of a dtype hold a NaN or an infinity (checked on the bits, without decoding). */
export function hasNonFinite(data: Uint8Array, dtype: WireDtype): boolean {
  if (dtype === "fp16") {
    const u = alignedView(data, "fp16") as Uint16Array;
    let all = 0;
    for (let i = 0; i < u.length; i++) all |= ~u[i]! & 0x7c00 ? 0 : 1;
    return all !== 0;
  }
  if (data.length % 4 !== 0) throw new RangeError(`float32 data of ${data.length} bytes is not a multiple of 4`);
  return anyNonFinite(alignedView(data, "fp32") as Float32Array);
}

/**
 * True when `f` holds a NaN or an infinity: an exponent field of all ones, found on the bits with
 * integer operations only ((exponent + 1) >> 8 is 1 for 255 alone), no branch, one test at the end.
 * Measured about 2.5x faster than summing `x * 0` in floating point (each addition waits on the last).
 */
export function anyNonFinite(f: Float32Array): boolean {
  const v = new Int32Array(f.buffer, f.byteOffset, f.length);
  const n = v.length;
  let any = 0;
  for (let i = 0; i < n; i++) any |= (((v[i]! >> 23) & 0xff) + 1) >> 8;
  return any !== 0;
}

// ---------------------------------------------------------------------------------------------
// Flattening, slices, buckets and chunks

/** A contiguous range of elements of the flat vector. */
export interface Range {
  /** First element. */
  offset: number;
  /** Number of elements. */
  length: number;
}

/** Concatenates tensors into one flat vector (a copy), in order. */
export function flatten(tensors: readonly Float32Array[]): Float32Array {
  let total = 0;
  for (const t of tensors) total += t.length;
  const out = new Float32Array(total);
  let at = 0;
  for (const t of tensors) {
    out.set(t, at);
    at += t.length;
  }
  return out;
}

/** Cuts a flat vector back into tensors of the given sizes (copies). */
export function unflatten(flat: Float32Array, sizes: readonly number[]): Float32Array[] {
  const total = sizes.reduce((a, b) => a + b, 0);
  if (total !== flat.length) throw new RangeError(`flat vector has ${flat.length} elements, sizes sum to ${total}`);
  const out: Float32Array[] = [];
  let at = 0;
  for (const n of sizes) {
    out.push(flat.slice(at, at + n));
    at += n;
  }
  return out;
}

/**
 * Splits `totalLength` elements into `n` contiguous slices whose lengths differ by at most one (the
 * first `totalLength % n` slices get the extra element). Slice i is owned by member i in reduce-scatter.
 */
export function sliceRanges(totalLength: number, n: number): Range[] {
  if (!Number.isSafeInteger(totalLength) || totalLength < 0) throw new RangeError(`totalLength must be a non-negative integer, got ${totalLength}`);
  if (!Number.isSafeInteger(n) || n < 1) throw new RangeError(`slice count must be a positive integer, got ${n}`);
  const base = Math.floor(totalLength / n);
  const extra = totalLength % n;
  const out: Range[] = [];
  let offset = 0;
  for (let i = 0; i < n; i++) {
    const length = base + (i < extra ? 1 : 0);
    out.push({ offset, length });
    offset += length;
  }
  return out;
}

/** One chunk of the plan: a range of the flat vector that travels as one message. */
export interface ChunkSpec extends Range {
  /** Bucket the chunk belongs to (buckets number from 0 in vector order). */
  bucketId: number;
  /** Index of the chunk within its bucket. */
  chunkIndex: number;
  /** Chunks in the bucket. */
  chunkCount: number;
  /** Index of the slice (owner) that contains the chunk; 0 when no slices were given. */
  slice: number;
}

/** Options of {@link planChunks}. */
export interface ChunkPlanOptions {
  /** Byte budget of a bucket and of a chunk at the wire dtype. Default {@link DEFAULT_BUCKET_BYTES}. */
  bucketBytes?: number;
  /** Element type on the wire. Default `fp32`. */
  dtype?: WireDtype;
  /** Slices of reduce-scatter (from {@link sliceRanges}); chunks are cut at their boundaries. Default: one slice. */
  slices?: readonly Range[];
}

/**
 * Plans buckets and chunks for tensors of the given sizes (elements). Consecutive tensors are fused
 * into a bucket while it stays within the budget; a tensor larger than the budget is a bucket of its
 * own. Each bucket is cut at slice boundaries and into chunks of at most the budget.
 */
export function planChunks(sizes: readonly number[], opts: ChunkPlanOptions = {}): ChunkSpec[] {
  const dtype = opts.dtype ?? "fp32";
  const budget = opts.bucketBytes ?? DEFAULT_BUCKET_BYTES;
  const per = bytesPerElement(dtype);
  if (!Number.isSafeInteger(budget) || budget < per) throw new RangeError(`bucketBytes must be an integer >= ${per}, got ${budget}`);
  const maxElems = Math.floor(budget / per);
  let total = 0;
  for (const s of sizes) {
    if (!Number.isSafeInteger(s) || s < 0) throw new RangeError(`tensor sizes must be non-negative integers, got ${s}`);
    total += s;
  }
  const slices = opts.slices ?? [{ offset: 0, length: total }];
  let covered = 0;
  for (const s of slices) {
    if (s.offset !== covered || s.length < 0) throw new RangeError("slices must tile the flat vector contiguously from 0");
    covered += s.length;
  }
  if (covered !== total) throw new RangeError(`slices cover ${covered} elements, the tensors have ${total}`);

  // Buckets: greedy fusion of whole tensors.
  const buckets: Range[] = [];
  let start = 0;
  let len = 0;
  for (const s of sizes) {
    if (s === 0) continue;
    if (len > 0 && len + s > maxElems) {
      buckets.push({ offset: start, length: len });
      start += len;
      len = 0;
    }
    len += s;
  }
  if (len > 0) buckets.push({ offset: start, length: len });

  const out: ChunkSpec[] = [];
  let sliceIdx = 0;
  buckets.forEach((b, bucketId) => {
    const first = out.length;
    let at = b.offset;
    const end = b.offset + b.length;
    while (at < end) {
      while (sliceIdx < slices.length - 1 && at >= slices[sliceIdx]!.offset + slices[sliceIdx]!.length) sliceIdx++;
      const s = slices[sliceIdx]!;
      const stop = Math.min(end, s.offset + s.length, at + maxElems);
      out.push({ bucketId, chunkIndex: out.length - first, chunkCount: 0, offset: at, length: stop - at, slice: sliceIdx });
      at = stop;
    }
    for (let i = first; i < out.length; i++) out[i]!.chunkCount = out.length - first;
  });
  return out;
}

/** A chunk ready for a GradientChunk / AveragedChunk message (add header and sample_count). */
export interface EncodedChunk extends ChunkSpec {
  dtype: WireDtype;
  /** length * bytesPerElement(dtype) little-endian bytes. */
  data: Uint8Array;
  /** CRC-32 of data. */
  checksum: number;
}

/** Encodes one planned chunk of a flat vector. */
export function encodeChunk(flat: Float32Array, spec: ChunkSpec, dtype: WireDtype): EncodedChunk {
  if (spec.offset + spec.length > flat.length) throw new RangeError(`chunk [${spec.offset}, +${spec.length}) is outside a vector of ${flat.length}`);
  const data = encodeValues(flat.subarray(spec.offset, spec.offset + spec.length), dtype);
  return { ...spec, dtype, data, checksum: crc32(data) };
}

/** Encodes every planned chunk of a flat vector. */
export function encodeChunks(flat: Float32Array, plan: readonly ChunkSpec[], dtype: WireDtype): EncodedChunk[] {
  return plan.map((c) => encodeChunk(flat, c, dtype));
}

/** A reusable aligned buffer for data that arrives at an odd byte offset (grown on demand, never shrunk). */
let alignScratch = new ArrayBuffer(0);

/**
 * The chunk's wire bytes as a typed array of its dtype: a view when the bytes are aligned on a
 * little-endian host, else one memcpy into a scratch buffer (valid until the next call).
 */
function alignedView(data: Uint8Array, dtype: WireDtype): Float32Array | Uint16Array {
  const per = bytesPerElement(dtype);
  if (data.length % per !== 0) throw new RangeError(`${dtype} data of ${data.length} bytes is not a multiple of ${per}`);
  if (!LITTLE_ENDIAN) return dtype === "fp16" ? bytesToUint16(data) : bytesToFloat32(data);
  const n = data.length / per;
  if (data.byteOffset % per === 0) return dtype === "fp16" ? new Uint16Array(data.buffer, data.byteOffset, n) : new Float32Array(data.buffer, data.byteOffset, n);
  if (alignScratch.byteLength < data.length) alignScratch = new ArrayBuffer(Math.max(data.length, alignScratch.byteLength * 2));
  new Uint8Array(alignScratch, 0, data.length).set(data);
  return dtype === "fp16" ? new Uint16Array(alignScratch, 0, n) : new Float32Array(alignScratch, 0, n);
}

/**
 * Adds `scale` times the chunk's values into `target` at `offset` (fp32 accumulation), reading the
 * wire bytes in place: no decoded copy, fp16 looked up element by element.
 */
export function accumulateChunk(target: Float32Array, offset: number, data: Uint8Array, dtype: WireDtype, scale = 1): void {
  const v = alignedView(data, dtype);
  if (offset < 0 || offset + v.length > target.length) throw new RangeError(`chunk [${offset}, +${v.length}) is outside a vector of ${target.length}`);
  const n = v.length;
  if (dtype === "fp16") {
    const t = float16Table();
    const u = v as Uint16Array;
    for (let i = 0; i < n; i++) target[offset + i]! += scale * t[u[i]!]!;
  } else {
    const f = v as Float32Array;
    if (scale === 1) for (let i = 0; i < n; i++) target[offset + i]! += f[i]!;
    else for (let i = 0; i < n; i++) target[offset + i]! += scale * f[i]!;
  }
}

/** Writes the chunk's values into `target` at `offset` (read in place, as {@link accumulateChunk}). */
export function writeChunk(target: Float32Array, offset: number, data: Uint8Array, dtype: WireDtype): void {
  const v = alignedView(data, dtype);
  if (offset < 0 || offset + v.length > target.length) throw new RangeError(`chunk [${offset}, +${v.length}) is outside a vector of ${target.length}`);
  if (dtype === "fp32") {
    target.set(v as Float32Array, offset);
    return;
  }
  const t = float16Table();
  const u = v as Uint16Array;
  for (let i = 0; i < u.length; i++) target[offset + i] = t[u[i]!]!;
}

/** `target[i] = src[i] * scale` for every element of `target` (a small function so the loop is optimised on its own). */
export function scaleInto(target: Float32Array, src: Float32Array, scale: number): void {
  const n = target.length;
  if (src.length < n) throw new RangeError(`scaleInto: ${src.length} source elements for ${n}`);
  for (let i = 0; i < n; i++) target[i] = src[i]! * scale;
}

/** `target[i] = src[i] / divisor`, float32 results (what dividing in place in a Float32Array gives). */
function divideInto(target: Float32Array, src: Float32Array, divisor: number): void {
  const n = src.length;
  for (let i = 0; i < n; i++) target[i] = src[i]! / divisor;
}

/** Scratch for fp16 chunks divided before conversion (grown on demand, never shrunk). */
let divideScratch = new Float32Array(0);

/**
 * Encodes `values` (one planned chunk) straight into a chunk frame (proto/chunk_frame.ts): one
 * allocation, the fp32 copy or fp16 conversion written into the frame's data region, the CRC-32 over
 * that region. With `divisor` the frame carries `values[i] / divisor` (each quotient rounded to
 * float32 first, as dividing a Float32Array in place would) and `values` is left as it is: an owner
 * averages its sum and encodes it in one pass over the data. `fields.checksum` is ignored.
 */
export function encodeChunkFrame(fields: Omit<FrameFields, "checksum" | "length" | "dtype">, values: Float32Array, dtype: WireDtype, divisor = 1): Uint8Array {
  const { frame, data } = allocFrame({ ...fields, length: values.length, dtype, checksum: 0 }, values.length * bytesPerElement(dtype));
  if (divisor !== 1 && (dtype === "fp16" || !LITTLE_ENDIAN)) {
    if (divideScratch.length < values.length) divideScratch = new Float32Array(values.length);
    const q = divideScratch.subarray(0, values.length);
    divideInto(q, values, divisor);
    values = q;
  }
  if (!LITTLE_ENDIAN) data.set(encodeValues(values, dtype));
  else if (dtype === "fp16") encodeFloat16(values, new Uint16Array(data.buffer, data.byteOffset, values.length));
  else if (divisor !== 1) divideInto(new Float32Array(data.buffer, data.byteOffset, values.length), values, divisor);
  else new Float32Array(data.buffer, data.byteOffset, values.length).set(values);
  sealFrame(frame, crc32(data));
  return frame;
}

/** The part of a chunk the reassembler needs (a decoded GradientChunk/AveragedChunk fits). */
export interface ChunkLike {
  bucketId: number;
  chunkIndex: number;
  offset: number;
  length: number;
  dtype: WireDtype;
  data: Uint8Array;
}

/**
 * Rebuilds a flat vector from the chunks of a plan, in any order. A duplicate (a redelivery) is
 * ignored; a chunk that is not in the plan is refused with a RangeError.
 */
export class Reassembler {
  /** The vector being rebuilt; complete when {@link complete} is true. */
  readonly values: Float32Array;
  private readonly expected = new Map<string, ChunkSpec>();
  private readonly seen = new Set<string>();

  /**
   * @param totalLength elements of the flat vector.
   * @param plan the chunks to expect (e.g. the plan filtered to one slice).
   */
  constructor(totalLength: number, plan: readonly ChunkSpec[]) {
    this.values = new Float32Array(totalLength);
    for (const c of plan) this.expected.set(`${c.bucketId}:${c.chunkIndex}`, c);
  }

  /** Adds a chunk; returns false for a duplicate. */
  add(chunk: ChunkLike): boolean {
    const key = `${chunk.bucketId}:${chunk.chunkIndex}`;
    const spec = this.expected.get(key);
    if (!spec || spec.offset !== chunk.offset || spec.length !== chunk.length)
      throw new RangeError(`chunk ${key} [${chunk.offset}, +${chunk.length}) is not in the plan`);
    if (this.seen.has(key)) return false;
    if (chunk.data.length !== chunk.length * bytesPerElement(chunk.dtype))
      throw new RangeError(`chunk ${key} has ${chunk.data.length} bytes for ${chunk.length} ${chunk.dtype} elements`);
    writeChunk(this.values, chunk.offset, chunk.data, chunk.dtype);
    this.seen.add(key);
    return true;
  }

  /** Chunks still missing. */
  get missing(): number {
    return this.expected.size - this.seen.size;
  }

  /** True when every chunk of the plan arrived. */
  get complete(): boolean {
    return this.seen.size === this.expected.size;
  }
}

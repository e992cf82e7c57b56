/**
 * proto/chunk_frame.ts through codec.ts: GradientChunk/AveragedChunk as chunk frames (fixed header,
 * raw data). Round trip, the data region is aligned and read in place, the header is checked first,
 * a protocol-v2 protobuf chunk is refused as bad_version, and every malformed frame is a DecodeError.
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import { DecodeError, PROTOCOL_VERSION, decode, encode, makeHeader, type TensorChunk } from "../proto/codec.js";
import { FRAME_FIXED_BYTES } from "../proto/chunk_frame.js";
import { crc32 } from "../proto/checksum.js";
import { accumulateChunk, decodeValues, encodeChunkFrame, encodeValues, roundThroughFloat16, float16BitsToFloat32, float32ToFloat16Bits } from "../proto/tensor_codec.js";

const JOB = "job-f";
const values = Float32Array.from({ length: 1000 }, (_, i) => Math.sin(i) * 3);

function chunk(over: Partial<TensorChunk> = {}): TensorChunk {
  const data = over.data ?? encodeValues(values, "fp32");
  return {
    header: makeHeader(JOB, "worker-1", 4, 9), bucketId: 2, chunkIndex: 1, chunkCount: 3, offset: 4096, length: values.length,
    dtype: "fp32", data, sampleCount: 16, checksum: crc32(data), ...over,
  };
}

function reason(fn: () => unknown): string {
  try {
    fn();
  } catch (err) {
    assert.ok(err instanceof DecodeError, `not a DecodeError: ${String(err)}`);
    return err.reason;
  }
  return "decoded";
}

test("chunk frame - a chunk round-trips; the data is a view of the frame, 8-byte aligned", () => {
  const bytes = encode("AveragedChunk", { ...chunk(), replay: true });
  const m = decode("AveragedChunk", bytes, { job: JOB, minEpoch: 4 });
  assert.deepEqual({ ...m, data: undefined }, { ...chunk(), replay: true, data: undefined });
  assert.equal(m.data.buffer, bytes.buffer, "no copy of the data");
  assert.equal(m.data.byteOffset % 8, 0);
  assert.ok(m.data.byteOffset >= FRAME_FIXED_BYTES);
  assert.deepEqual(decodeValues(m.data, "fp32"), values);
  const g = decode("GradientChunk", encode("GradientChunk", chunk()), { job: JOB });
  assert.equal("replay" in g, false, "GradientChunk has no replay field");
});

test("chunk frame - encodeChunkFrame writes fp32 and fp16 data and its CRC-32 straight into the frame", () => {
  for (const dtype of ["fp32", "fp16"] as const) {
    const bytes = encodeChunkFrame({ header: makeHeader(JOB, "w0", 1, 2), bucketId: 0, chunkIndex: 0, chunkCount: 1, offset: 0, sampleCount: 3 }, values, dtype);
    const m = decode("GradientChunk", bytes, { job: JOB, epoch: 1, step: 2 });
    assert.equal(m.dtype, dtype);
    assert.equal(m.length, values.length);
    assert.equal(m.checksum, crc32(m.data));
    const want = values.slice();
    if (dtype === "fp16") roundThroughFloat16(want);
    assert.deepEqual(decodeValues(m.data, dtype), want);
  }
});

test("chunk frame - encodeChunkFrame with a divisor carries what dividing in place then encoding gives, and leaves its input alone", () => {
  const src = new Float32Array(1001);
  for (let i = 0; i < src.length; i++) src[i] = Math.sin(i * 0.37) * 10 ** ((i % 9) - 6);
  for (const dtype of ["fp32", "fp16"] as const) {
    for (const divisor of [3, 7, 0.5]) {
      const before = src.slice();
      const bytes = encodeChunkFrame({ header: makeHeader(JOB, "w0", 1, 2), bucketId: 0, chunkIndex: 0, chunkCount: 1, offset: 0, sampleCount: 3 }, src, dtype, divisor);
      assert.deepEqual(src, before, "input unchanged");
      const want = src.slice();
      for (let i = 0; i < want.length; i++) want[i] = want[i]! / divisor;
      if (dtype === "fp16") roundThroughFloat16(want);
      const m = decode("GradientChunk", bytes, { job: JOB, epoch: 1, step: 2 });
      assert.deepEqual(decodeValues(m.data, dtype), want, `${dtype} / ${divisor}`);
    }
  }
});

test("chunk frame - the header is checked first: job, epoch, step, version; a protobuf v2 chunk is bad_version", () => {
  const bytes = encode("GradientChunk", chunk());
  assert.equal(reason(() => decode("GradientChunk", bytes, { job: "other" })), "wrong_job");
  assert.equal(reason(() => decode("GradientChunk", bytes, { job: JOB, minEpoch: 5 })), "stale_epoch");
  assert.equal(reason(() => decode("GradientChunk", bytes, { job: JOB, step: 10 })), "wrong_step");
  const newer = encode("GradientChunk", chunk({ header: { ...makeHeader(JOB, "w1", 4, 9), protocolVersion: PROTOCOL_VERSION + 1 } }));
  // A newer peer may use a dtype code we do not know: the version is what is reported.
  newer[6] = 9;
  assert.equal(reason(() => decode("GradientChunk", newer, { job: JOB })), "bad_version");
  // What a protocol-v2 peer sent: a protobuf message, field 1 (the header) first.
  assert.equal(reason(() => decode("GradientChunk", Uint8Array.from([0x0a, 0x05, 0x08, 0x02, 0x12, 0x01, 0x61]), { job: JOB })), "bad_version");
});

test("chunk frame - malformed frames are DecodeErrors: short, bad magic, bad offsets, unknown dtype or flags, corrupted data", () => {
  const good = encode("GradientChunk", chunk());
  assert.equal(reason(() => decode("GradientChunk", good.subarray(0, 20), { job: JOB })), "malformed");
  const magic = good.slice();
  magic[0] ^= 0xff;
  assert.equal(reason(() => decode("GradientChunk", magic, { job: JOB })), "malformed");
  const offset = good.slice();
  new DataView(offset.buffer).setUint16(46, 2, true);
  assert.equal(reason(() => decode("GradientChunk", offset, { job: JOB })), "malformed");
  const dtype = good.slice();
  dtype[6] = 7;
  assert.equal(reason(() => decode("GradientChunk", dtype, { job: JOB })), "malformed");
  const flags = good.slice();
  flags[7] = 0x80;
  assert.equal(reason(() => decode("GradientChunk", flags, { job: JOB })), "malformed");
  const flipped = good.slice();
  flipped[flipped.length - 3] ^= 1;
  assert.equal(reason(() => decode("GradientChunk", flipped, { job: JOB })), "malformed", "checksum");
  assert.equal(reason(() => decode("GradientChunk", good.subarray(0, good.length - 4), { job: JOB })), "bad_shape", "data shorter than length says");
  assert.throws(() => encode("GradientChunk", chunk({ offset: 2 ** 32 })), /offset/);
});

test("chunk frame - data at an odd byte offset is still read right (one aligned copy), fp16 accumulation included", () => {
  for (const dtype of ["fp32", "fp16"] as const) {
    const data = encodeValues(values, dtype);
    const odd = new Uint8Array(data.length + 1);
    odd.set(data, 1);
    const acc = new Float32Array(values.length);
    accumulateChunk(acc, 0, odd.subarray(1), dtype, 2);
    const want = values.slice();
    if (dtype === "fp16") roundThroughFloat16(want);
    for (let i = 0; i < want.length; i++) assert.equal(acc[i], Math.fround(2 * want[i]!), `${dtype} element ${i}`);
  }
  const r = Float32Array.from([1e-7, -3.1416, 65519, 65520, 1e-8]);
  roundThroughFloat16(r);
  assert.deepEqual([...r], [1e-7, -3.1416, 65519, 65520, 1e-8].map((x) => float16BitsToFloat32(float32ToFloat16Bits(x))));
});

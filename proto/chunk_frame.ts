/**
 * The wire form of GradientChunk and AveragedChunk: a fixed little-endian header, the job and sender
 * strings, padding to a multiple of 8 bytes, then the tensor data as raw little-endian fp32/fp16.
 *
 * Why not protobuf: these two messages carry almost every byte of data-parallel training. protobufjs
 * builds a JS object per message and copies `data` twice (writer, reader); a fixed header costs a few
 * dozen DataView reads, and the data lands 8-byte aligned within the frame, so a receiver can view it
 * as a Float32Array/Uint16Array without copying (when the transport hands the frame over aligned).
 * The fields and their meaning are those of the messages in trainer.proto, which stay as their
 * documentation; codec.ts routes `encode`/`decode` of the two types here and keeps every check
 * (header first, then shape, CRC-32, NaN/Inf).
 *
 * Layout (offsets in bytes, all integers unsigned little-endian):
 * ```
 *  0 u32 magic "CTGF"     4 u16 protocol version   6 u8 dtype (0 fp32, 1 fp16)   7 u8 flags (bit 0: replay)
 *  8 u32 membership epoch 12 u32 step             16 u32 bucket_id             20 u32 chunk_index
 * 24 u32 chunk_count     28 u32 offset            32 u32 length (elements)     36 u32 sample_count
 * 40 u32 checksum (CRC-32 of data)                44 u8 job bytes  45 u8 sender bytes  46 u16 data offset
 * 48 job (UTF-8), sender (UTF-8), zero padding to the data offset (a multiple of 8), data
 * ```
 * This module knows no message classes (codec.ts imports it, not the reverse): errors are
 * {@link FrameError}s with a drop reason, which codec.ts turns into DecodeError/EncodeError.
 */

/** "CTGF" read as a little-endian u32. */
const MAGIC = 0x46475443;
/** Bytes of the fixed part of the header. */
export const FRAME_FIXED_BYTES = 48;
const MAX_U32 = 0xffffffff;

/** Element types by their code in the frame. */
const DTYPES = ["fp32", "fp16"] as const;
export type FrameDtype = (typeof DTYPES)[number];

/** The header fields of a frame (the same as trainer.proto's Header). */
export interface FrameHeader {
  protocolVersion: number;
  job: string;
  epoch: number;
  step: number;
  sender: string;
}

/** Everything but the data of a GradientChunk/AveragedChunk. */
export interface FrameFields {
  header: FrameHeader;
  bucketId: number;
  chunkIndex: number;
  chunkCount: number;
  offset: number;
  length: number;
  dtype: FrameDtype;
  sampleCount: number;
  checksum: number;
  replay?: boolean;
}

/** A frame that cannot be encoded or parsed; `reason` is a drop reason (codec's DecodeReason). */
export class FrameError extends Error {
  override name = "FrameError";
  constructor(readonly reason: "malformed" | "bad_version", message: string, readonly header?: FrameHeader) {
    super(message);
  }
}

const utf8 = new TextEncoder();
const utf8Decoder = new TextDecoder("utf-8", { fatal: true });

function u32(name: string, v: unknown): number {
  if (typeof v !== "number" || !Number.isInteger(v) || v < 0 || v > MAX_U32) throw new FrameError("malformed", `${name} must be an integer in [0, 2^32), got ${String(v)}`);
  return v;
}

/**
 * Allocates a frame for `f` with room for `dataBytes` of data and writes its header (the checksum
 * field as given: see {@link sealFrame}). Returns the frame and a view of its data region, which the
 * caller fills. Throws FrameError("malformed") for a field out of range or an unknown dtype.
 */
export function allocFrame(f: FrameFields, dataBytes: number): { frame: Uint8Array; data: Uint8Array } {
  const dtype = DTYPES.indexOf(f.dtype);
  if (dtype < 0) throw new FrameError("malformed", `dtype: ${JSON.stringify(f.dtype)} is not one of ${DTYPES.join(", ")}`);
  const job = utf8.encode(f.header.job);
  const sender = utf8.encode(f.header.sender);
  if (job.length > 255 || sender.length > 255) throw new FrameError("malformed", "job and sender must be at most 255 bytes of UTF-8");
  const dataAt = Math.ceil((FRAME_FIXED_BYTES + job.length + sender.length) / 8) * 8;
  // An ArrayBuffer of its own: offset 0, so the data region is 8-byte aligned for the sender's own views.
  const frame = new Uint8Array(dataAt + dataBytes);
  const dv = new DataView(frame.buffer);
  dv.setUint32(0, MAGIC, true);
  dv.setUint16(4, u32("protocol version", f.header.protocolVersion) & 0xffff, true);
  dv.setUint8(6, dtype);
  dv.setUint8(7, f.replay ? 1 : 0);
  const fields = [f.header.epoch, f.header.step, f.bucketId, f.chunkIndex, f.chunkCount, f.offset, f.length, f.sampleCount, f.checksum];
  const names = ["epoch", "step", "bucket_id", "chunk_index", "chunk_count", "offset", "length", "sample_count", "checksum"];
  for (let i = 0; i < fields.length; i++) dv.setUint32(8 + 4 * i, u32(names[i]!, fields[i]), true);
  dv.setUint8(44, job.length);
  dv.setUint8(45, sender.length);
  dv.setUint16(46, dataAt, true);
  frame.set(job, FRAME_FIXED_BYTES);
  frame.set(sender, FRAME_FIXED_BYTES + job.length);
  return { frame, data: frame.subarray(dataAt) };
}

/** Writes `checksum` (the CRC-32 of the data region, computed by the caller) into a frame from {@link allocFrame}. */
export function sealFrame(frame: Uint8Array, checksum: number): void {
  new DataView(frame.buffer, frame.byteOffset, FRAME_FIXED_BYTES).setUint32(40, checksum >>> 0, true);
}

/** A parsed frame: the fields, and `data` viewing the frame's bytes (not a copy). */
export interface ParsedFrame extends Omit<FrameFields, "dtype"> {
  /** Dtype code; codec.ts maps it after the header checks (a newer peer may use codes we do not know). */
  dtypeCode: number;
  data: Uint8Array;
}

/**
 * Reads the header of a frame, then the rest. Throws FrameError("malformed") for bytes that are not a
 * frame (too short, wrong magic, lengths out of bounds, bad UTF-8), FrameError("bad_version") for a
 * frame of another protocol version.
 */
export function parseFrame(bytes: Uint8Array, protocolVersion: number): ParsedFrame {
  if (!(bytes instanceof Uint8Array)) throw new FrameError("malformed", "payload is not bytes");
  const dv = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  if (bytes.length < 4 || dv.getUint32(0, true) !== MAGIC) {
    // Protocol v2 sent these messages as protobuf (field 1, the header, comes first: byte 0x0a).
    if (bytes[0] === 0x0a) throw new FrameError("bad_version", "a protobuf-encoded chunk (protocol v2): upgrade the sender");
    throw new FrameError("malformed", "not a chunk frame (bad magic)");
  }
  if (bytes.length < FRAME_FIXED_BYTES) throw new FrameError("malformed", `${bytes.length} bytes: shorter than a frame header (${FRAME_FIXED_BYTES})`);
  const jobLen = dv.getUint8(44);
  const senderLen = dv.getUint8(45);
  const dataAt = dv.getUint16(46, true);
  if (dataAt < FRAME_FIXED_BYTES + jobLen + senderLen || dataAt > bytes.length) throw new FrameError("malformed", `data offset ${dataAt} out of bounds`);
  let job: string;
  let sender: string;
  try {
    job = utf8Decoder.decode(bytes.subarray(FRAME_FIXED_BYTES, FRAME_FIXED_BYTES + jobLen));
    sender = utf8Decoder.decode(bytes.subarray(FRAME_FIXED_BYTES + jobLen, FRAME_FIXED_BYTES + jobLen + senderLen));
  } catch (cause) {
    throw new FrameError("malformed", `job or sender is not UTF-8: ${(cause as Error).message}`);
  }
  const header: FrameHeader = { protocolVersion: dv.getUint16(4, true), job, epoch: dv.getUint32(8, true), step: dv.getUint32(12, true), sender };
  if (header.protocolVersion !== protocolVersion) return { ...emptyFields(header), dtypeCode: -1, data: new Uint8Array(0) };
  const flags = dv.getUint8(7);
  if (flags > 1) throw new FrameError("malformed", `unknown flags 0x${flags.toString(16)}`, header);
  return {
    header, dtypeCode: dv.getUint8(6), replay: flags === 1,
    bucketId: dv.getUint32(16, true), chunkIndex: dv.getUint32(20, true), chunkCount: dv.getUint32(24, true), offset: dv.getUint32(28, true),
    length: dv.getUint32(32, true), sampleCount: dv.getUint32(36, true), checksum: dv.getUint32(40, true), data: bytes.subarray(dataAt),
  };
}

/** A frame of another version: only its header is read (codec.ts reports bad_version from it). */
function emptyFields(header: FrameHeader): Omit<FrameFields, "dtype"> {
  return { header, bucketId: 0, chunkIndex: 0, chunkCount: 0, offset: 0, length: 0, sampleCount: 0, checksum: 0 };
}

/** The dtype of a code from {@link parseFrame}, or undefined for a code this version does not know. */
export function frameDtype(code: number): FrameDtype | undefined {
  return DTYPES[code];
}

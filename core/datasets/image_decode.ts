/**
 * Image bytes -> size x size x 3 RGB uint8 (HWC), with sharp (libvips). Every way an input can be
 * bad becomes a BadInputError with a short reason, so the caller skips the sample and goes on.
 *
 * - Decompression bombs are refused before any pixel is decoded: the header's width x height is
 *   checked against `maxPixels`, and sharp's own `limitInputPixels` backs that up.
 * - `failOn: "error"` makes a truncated JPEG/PNG/WebP fail instead of decoding into a grey/black
 *   tail (sharp's default "warning" would also refuse files that only carry harmless warnings, such as
 *   extraneous bytes, which TensorFlow's decoders accept).
 * - Resizing is bilinear to size x size ignoring the aspect ratio, like Keras'
 *   image_dataset_from_directory (interpolation="bilinear", crop_to_aspect_ratio=False).
 * - EXIF orientation is not applied, also like Keras (tf.io.decode_image ignores it).
 */
import sharp from "sharp";
import { BadInputError } from "../runtime/errors.js";
import { SKIP_REASONS } from "./types.js";

export interface DecodeOptions {
  /** Output width and height in pixels. */
  size: number;
  /** Refuse images whose header claims more than this many pixels (width x height). */
  maxPixels: number;
}

function checkSize(size: number): void {
  if (!Number.isInteger(size) || size < 1 || size > 8192) throw new RangeError(`readRgb: size must be a whole number in 1..8192, got ${size}`);
}

/** A plain Uint8Array view (not a Buffer, whose slice() shares memory unlike Uint8Array's). */
function plain(b: Buffer): Uint8Array {
  return new Uint8Array(b.buffer, b.byteOffset, b.byteLength);
}

/** Decodes an encoded image (JPEG, PNG, WebP, anything sharp reads) to size x size x 3 RGB. */
export async function decodeImage(id: string, bytes: Uint8Array, opts: DecodeOptions): Promise<Uint8Array> {
  checkSize(opts.size);
  if (bytes.length === 0) throw new BadInputError(id, SKIP_REASONS.empty, `${id}: the file is empty.`);
  // libpng refuses a width or height over 10^6, libjpeg one over 65500, as a "corrupt header" before
  // sharp can report the size, so PNG and JPEG bombs are named from their headers here.
  const claimed = pngSize(bytes) ?? jpegSize(bytes);
  if (claimed && claimed.w * claimed.h > opts.maxPixels)
    throw new BadInputError(id, SKIP_REASONS.tooManyPixels, `${id}: ${claimed.w}x${claimed.h} is more than the ${opts.maxPixels} pixels allowed (--max-pixels).`);
  try {
    const img = sharp(bytes, { failOn: "error", limitInputPixels: opts.maxPixels, sequentialRead: true });
    const meta = await img.metadata();
    const w = meta.width ?? 0;
    const h = meta.height ?? 0;
    if (w * h > opts.maxPixels)
      throw new BadInputError(id, SKIP_REASONS.tooManyPixels, `${id}: ${w}x${h} is more than the ${opts.maxPixels} pixels allowed (--max-pixels).`);
    if (w < 2 || h < 2) throw new BadInputError(id, SKIP_REASONS.tooSmall, `${id}: ${w}x${h} is smaller than 2x2.`);
    const { data, info } = await img
      .flatten({ background: { r: 0, g: 0, b: 0 } })
      .toColourspace("srgb")
      .resize(opts.size, opts.size, { fit: "fill", kernel: "linear" })
      .raw({ depth: "uchar" })
      .toBuffer({ resolveWithObject: true });
    if (info.channels !== 3 || data.length !== opts.size * opts.size * 3)
      throw new BadInputError(id, SKIP_REASONS.corrupt, `${id}: decoded to ${info.channels} channels, expected 3.`);
    return plain(data);
  } catch (err) {
    throw classifyDecodeError(id, err, bytes);
  }
}

/**
 * Resizes a single-channel image (an IDX item) to size x size and repeats it over 3 channels.
 * Enlarging (28 px Fashion-MNIST to a 96..299 px input) is bilinear in plain JS: sharp costs about
 * 1.5 ms a call for these tiny images, as much as onnxruntime's forward pass at 96 px, while the
 * loop below takes a tenth of that. Shrinking goes through sharp, whose kernel filters aliasing.
 */
export async function grayToRgb(id: string, pixels: Uint8Array, width: number, height: number, size: number): Promise<Uint8Array> {
  checkSize(size);
  if (size >= width && size >= height) return enlargeGrayToRgb(pixels, width, height, size);
  let gray: Uint8Array;
  try {
    const buf = await sharp(pixels, { raw: { width, height, channels: 1 } })
      .resize(size, size, { fit: "fill", kernel: "linear" })
      .extractChannel(0)
      .raw()
      .toBuffer();
    gray = plain(buf);
  } catch (err) {
    throw new BadInputError(id, SKIP_REASONS.corrupt, `${id}: cannot resize: ${(err as Error).message}`, { cause: err });
  }
  const out = new Uint8Array(size * size * 3);
  for (let i = 0, o = 0; i < size * size; i++, o += 3) out[o] = out[o + 1] = out[o + 2] = gray[i];
  return out;
}

/** Bilinear enlargement with pixel centres aligned (source x = (x + 0.5) * w / size - 0.5, edges clamped), gray repeated to RGB. */
export function enlargeGrayToRgb(pixels: Uint8Array, width: number, height: number, size: number): Uint8Array {
  const taps = (n: number): { i0: Int32Array; i1: Int32Array; f: Float32Array } => {
    const i0 = new Int32Array(size), i1 = new Int32Array(size), f = new Float32Array(size);
    for (let x = 0; x < size; x++) {
      const s = Math.min(Math.max((x + 0.5) * (n / size) - 0.5, 0), n - 1);
      i0[x] = Math.floor(s);
      i1[x] = Math.min(i0[x] + 1, n - 1);
      f[x] = s - i0[x];
    }
    return { i0, i1, f };
  };
  const xs = taps(width), ys = taps(height);
  const out = new Uint8Array(size * size * 3);
  let o = 0;
  for (let y = 0; y < size; y++) {
    const r0 = ys.i0[y] * width, r1 = ys.i1[y] * width, fy = ys.f[y];
    for (let x = 0; x < size; x++) {
      const a = pixels[r0 + xs.i0[x]], b = pixels[r0 + xs.i1[x]], c = pixels[r1 + xs.i0[x]], d = pixels[r1 + xs.i1[x]];
      const fx = xs.f[x];
      const top = a + (b - a) * fx, bottom = c + (d - c) * fx;
      const v = (top + (bottom - top) * fy + 0.5) | 0;
      out[o] = out[o + 1] = out[o + 2] = v;
      o += 3;
    }
  }
  return out;
}

/**
 * Turns whatever sharp threw into a BadInputError with the most specific reason.
 *
 * Only sharp's own messages (empty buffer, unsupported format, pixel limit) are trusted. A decoder's
 * message comes from libvips' process-wide error buffer, which concurrent decodes share: under load a
 * failed decode reads "Unknown error" or another image's message. So truncated vs. corrupt is decided
 * from the file's structure, and the decoder's words are only quoted.
 */
export function classifyDecodeError(id: string, err: unknown, bytes: Uint8Array): BadInputError {
  if (err instanceof BadInputError) return err;
  const msg = err instanceof Error ? err.message : String(err);
  // libvips repeats decoder warnings line after line: keep the distinct lines.
  const detail = [...new Set(msg.split("\n").map((l) => l.trim()).filter((l) => l !== ""))].join("; ");
  const say = (reason: string, what: string): BadInputError => new BadInputError(id, reason, `${id}: ${what} (${detail})`, { cause: err });
  if (bytes.length === 0) return say(SKIP_REASONS.empty, "the file is empty");
  if (/exceeds pixel limit/i.test(msg)) return say(SKIP_REASONS.tooManyPixels, "the image has more pixels than allowed (--max-pixels)");
  if (/unsupported image format/i.test(msg)) return say(SKIP_REASONS.notAnImage, "not an image in a format we can read");
  if (looksTruncated(bytes)) return say(SKIP_REASONS.truncated, "the image data stops early");
  return say(SKIP_REASONS.corrupt, "the image is corrupt");
}

/** The format named by the first bytes of a file: what it is, whatever its name says. */
export function sniffFormat(bytes: Uint8Array): "jpeg" | "png" | "webp" | "gif" | "svg" | "other" {
  if (sameBytes(bytes, 0, [0xff, 0xd8, 0xff])) return "jpeg";
  if (sameBytes(bytes, 0, [0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a])) return "png";
  if (sameBytes(bytes, 0, [0x52, 0x49, 0x46, 0x46]) && sameBytes(bytes, 8, [0x57, 0x45, 0x42, 0x50])) return "webp";
  if (sameBytes(bytes, 0, [0x47, 0x49, 0x46, 0x38])) return "gif";
  const head = new TextDecoder().decode(bytes.subarray(0, 512)).trimStart().toLowerCase();
  if (head.startsWith("<svg") || (head.startsWith("<?xml") && head.includes("<svg"))) return "svg";
  return "other";
}

/** Width and height from a PNG's IHDR (the first chunk), or undefined when `bytes` does not start like a PNG. */
function pngSize(bytes: Uint8Array): { w: number; h: number } | undefined {
  if (!sameBytes(bytes, 0, [0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a]) || !sameBytes(bytes, 12, [0x49, 0x48, 0x44, 0x52]) || bytes.length < 24) return undefined;
  const dv = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  return { w: dv.getUint32(16), h: dv.getUint32(20) };
}

/** Width and height from a JPEG's SOFn marker, or undefined when none comes before the first scan. */
function jpegSize(bytes: Uint8Array): { w: number; h: number } | undefined {
  if (!sameBytes(bytes, 0, [0xff, 0xd8])) return undefined;
  const dv = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  for (let p = 2; p + 9 <= bytes.length && bytes[p] === 0xff; ) {
    const marker = bytes[p + 1];
    if (marker === 0xff) { p++; continue; }
    if (marker >= 0xc0 && marker <= 0xcf && marker !== 0xc4 && marker !== 0xc8 && marker !== 0xcc) return { w: dv.getUint16(p + 7), h: dv.getUint16(p + 5) };
    if (marker === 0xda) return undefined;
    p += 2 + dv.getUint16(p + 2);
  }
  return undefined;
}

function sameBytes(bytes: Uint8Array, at: number, sig: readonly number[]): boolean {
  if (at < 0 || at + sig.length > bytes.length) return false;
  for (let i = 0; i < sig.length; i++) if (bytes[at + i] !== sig[i]) return false;
  return true;
}

/**
 * A structural check used only to name a decode failure: does the file stop before its format's
 * end marker? PNG: walk the chunks to IEND. JPEG: no EOI marker (FF D9) in the last 4 kB. WebP: the
 * RIFF size is larger than the file. Other formats: false.
 */
export function looksTruncated(bytes: Uint8Array): boolean {
  const n = bytes.length;
  if (sameBytes(bytes, 0, [0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a])) {
    const dv = new DataView(bytes.buffer, bytes.byteOffset, n);
    let p = 8;
    while (p + 8 <= n) {
      const len = dv.getUint32(p);
      const isEnd = sameBytes(bytes, p + 4, [0x49, 0x45, 0x4e, 0x44]);
      p += 12 + len;
      if (isEnd) return p > n;
    }
    return true;
  }
  if (sameBytes(bytes, 0, [0xff, 0xd8, 0xff])) {
    // FF D9 cannot occur inside entropy-coded data (FF is stuffed), so its absence from the tail means the scan was cut.
    for (let i = n - 2; i >= Math.max(2, n - 4096); i--) if (bytes[i] === 0xff && bytes[i + 1] === 0xd9) return false;
    return true;
  }
  if (sameBytes(bytes, 0, [0x52, 0x49, 0x46, 0x46]) && sameBytes(bytes, 8, [0x57, 0x45, 0x42, 0x50])) {
    const riffSize = new DataView(bytes.buffer, bytes.byteOffset, n).getUint32(4, true);
    return riffSize + 8 > n;
  }
  return false;
}

/**
 * IDX data sets (MNIST, Fashion-MNIST): four files, gzipped or not, in one folder. The t10k pair is
 * the test split; val is a seeded stratified fraction of the train pair.
 *
 * A whole IDX file that is wrong (bad magic, dimensions that do not match its length, labels out of
 * range, a broken gzip stream) is a ConfigError: it is fatal and reported before any work starts.
 * Parsed files are kept in memory per process (keyed by path, size and mtime), so a second open,
 * e.g. by a worker that already listed the data set, costs no gunzip. An uncompressed images file is
 * not read whole: its header is checked against its size, its bytes are hashed as a stream, and each
 * image is read by offset when it is decoded (a gzipped one has no offsets and is inflated in memory).
 */
import { createHash } from "node:crypto";
import { createReadStream } from "node:fs";
import { type FileHandle, open, readFile, stat } from "node:fs/promises";
import { join, resolve } from "node:path";
import { createGunzip } from "node:zlib";
import { BadInputError, ConfigError } from "../runtime/errors.js";
import { grayToRgb } from "./image_decode.js";
import { SampleList } from "./sample_list.js";
import { applyLimit, stratifiedSplit } from "./splits.js";
import { SKIP_REASONS, type Dataset, type SampleRef, type Split } from "./types.js";

export const IDX_IMAGES_MAGIC = 0x00000803;
export const IDX_LABELS_MAGIC = 0x00000801;

/** The four files of an IDX data set, by role. Each is looked up as `<base>`, `<base>.gz`, and MNIST's dotted spelling. */
export const IDX_FILES = {
  trainImages: "train-images-idx3-ubyte",
  trainLabels: "train-labels-idx1-ubyte",
  testImages: "t10k-images-idx3-ubyte",
  testLabels: "t10k-labels-idx1-ubyte",
} as const;
type IdxRole = keyof typeof IDX_FILES;

export const FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"] as const;
export const DIGIT_CLASSES = ["0", "1", "2", "3", "4", "5", "6", "7", "8", "9"] as const;

/** A parsed IDX images file: `count` images of rows x cols bytes, back to back. */
export interface IdxImages {
  count: number;
  rows: number;
  cols: number;
  /** The images in memory (a gzipped file); absent when they are read by offset from {@link file}. */
  pixels?: Uint8Array;
  /** The uncompressed file images are read from by offset (when {@link pixels} is absent). */
  file?: string;
}

/** Checks an IDX3 header (first 16 bytes) against the file's length in bytes; `file` names it in errors. */
function parseIdxImagesHeader(head: Uint8Array, length: number, file: string): Omit<IdxImages, "pixels"> {
  const dv = header(head, file, IDX_IMAGES_MAGIC, 16, "images (idx3-ubyte)");
  const count = dv.getUint32(4);
  const rows = dv.getUint32(8);
  const cols = dv.getUint32(12);
  if (rows < 1 || cols < 1) throw new ConfigError(`IDX file ${file}: image size ${rows}x${cols} is empty.`);
  const expected = 16 + count * rows * cols;
  if (length !== expected)
    throw new ConfigError(`IDX file ${file} is ${length} bytes but its header (${count} images of ${rows}x${cols}) says ${expected}: the file is ${length < expected ? "truncated" : "too long"}.`);
  return { count, rows, cols };
}

/** Parses an uncompressed IDX3 ubyte images file held in memory; `file` names it in errors. */
export function parseIdxImages(data: Uint8Array, file: string): IdxImages {
  return { ...parseIdxImagesHeader(data.subarray(0, 16), data.length, file), pixels: data.subarray(16) };
}

const handles = new Map<string, Promise<FileHandle>>();

/** Image `index` of `images`, rows x cols bytes: from memory, or one positioned read (the file stays open for the process). */
export async function idxImage(images: IdxImages, index: number): Promise<Uint8Array> {
  const px = images.rows * images.cols;
  if (images.pixels) return images.pixels.subarray(index * px, (index + 1) * px);
  const file = images.file!;
  let h = handles.get(file);
  if (!h) {
    h = open(file, "r");
    handles.set(file, h);
    h.catch(() => handles.delete(file));
  }
  const out = new Uint8Array(px);
  const { bytesRead } = await (await h).read(out, 0, px, 16 + index * px);
  if (bytesRead !== px) throw new BadInputError(`${file}#${index}`, SKIP_REASONS.truncated, `IDX file ${file} ended inside image ${index}: it changed after it was opened.`);
  return out;
}

/** Parses an uncompressed IDX1 ubyte labels file; `file` names it in errors. */
export function parseIdxLabels(data: Uint8Array, file: string): Uint8Array {
  const dv = header(data, file, IDX_LABELS_MAGIC, 8, "labels (idx1-ubyte)");
  const count = dv.getUint32(4);
  const expected = 8 + count;
  if (data.length !== expected)
    throw new ConfigError(`IDX file ${file} is ${data.length} bytes but its header (${count} labels) says ${expected}: the file is ${data.length < expected ? "truncated" : "too long"}.`);
  return data.subarray(8);
}

function header(data: Uint8Array, file: string, magic: number, headerBytes: number, what: string): DataView {
  if (data.length < headerBytes) throw new ConfigError(`IDX file ${file} is ${data.length} bytes, too short for an IDX header: it is truncated or not an IDX file.`);
  const dv = new DataView(data.buffer, data.byteOffset, data.byteLength);
  const got = dv.getUint32(0);
  if (got !== magic)
    throw new ConfigError(`IDX file ${file} has magic number 0x${got.toString(16).padStart(8, "0")}, expected 0x${magic.toString(16).padStart(8, "0")} for ${what}: wrong file or not an IDX file.`);
  return dv;
}

/** One split's worth of IDX data (images + labels), with the sha256 of both files' bytes. */
interface IdxPair {
  images: IdxImages;
  labels: Uint8Array;
  files: [string, string];
}
interface IdxSet {
  train: IdxPair;
  test: IdxPair;
  /** sha256 over the four files' bytes as stored. */
  contentHash: string;
}

async function findFile(dir: string, role: IdxRole): Promise<{ path: string; size: number; mtimeMs: number }> {
  const base = IDX_FILES[role];
  const dotted = base.replace(/-idx(\d)-ubyte$/, ".idx$1-ubyte");
  for (const name of [base, `${base}.gz`, dotted, `${dotted}.gz`]) {
    const p = join(dir, name);
    try {
      const s = await stat(p);
      if (s.isFile()) return { path: p, size: s.size, mtimeMs: s.mtimeMs };
    } catch {
      // try the next spelling
    }
  }
  throw new ConfigError(`IDX folder ${dir} has no ${base} (or ${base}.gz). It needs ${Object.values(IDX_FILES).join(", ")}, gzipped or not.`);
}

async function readIdxFile(path: string): Promise<{ data: Uint8Array; raw: Uint8Array }> {
  let raw: Buffer;
  try {
    raw = await readFile(path);
  } catch (cause) {
    throw new ConfigError(`Cannot read IDX file ${path}: ${(cause as Error).message}`, { cause });
  }
  if (isGzip(raw)) return { data: await gunzipIdx(raw, path), raw };
  return { data: raw, raw };
}

const isGzip = (b: Uint8Array): boolean => b.length >= 2 && b[0] === 0x1f && b[1] === 0x8b;

type Hash = ReturnType<typeof createHash>;

/**
 * An images file: a gzipped one inflated in memory; an uncompressed one checked by its header and
 * size, its images left on disk (read by offset). `hashInto` feeds the stored bytes to a hash (as a stream).
 */
async function readIdxImagesFile(path: string): Promise<{ images: IdxImages; hashInto: (h: Hash) => Promise<void> }> {
  let head: Buffer, size: number;
  try {
    const fh = await open(path, "r");
    try {
      head = Buffer.alloc(16);
      const { bytesRead } = await fh.read(head, 0, 16, 0);
      head = head.subarray(0, bytesRead);
      size = (await fh.stat()).size;
    } finally {
      await fh.close();
    }
  } catch (cause) {
    throw new ConfigError(`Cannot read IDX file ${path}: ${(cause as Error).message}`, { cause });
  }
  if (isGzip(head)) {
    const f = await readIdxFile(path);
    return { images: parseIdxImages(f.data, path), hashInto: async (h) => void h.update(f.raw) };
  }
  const images = { ...parseIdxImagesHeader(head, size, path), file: path };
  return {
    images,
    hashInto: async (h) => {
      for await (const chunk of createReadStream(path, { highWaterMark: 1 << 20 })) h.update(chunk as Buffer);
    },
  };
}

/** Deflate expands data by at most about 1032:1, so no gzip file can hold more than this many times its size. */
const MAX_INFLATE_RATIO = 1032;

/** The size an IDX file's header says the file has, from its first 16 bytes; undefined for an unknown magic. */
function claimedSize(head: Uint8Array): number | undefined {
  const dv = new DataView(head.buffer, head.byteOffset, head.byteLength);
  const magic = dv.getUint32(0);
  if (magic === IDX_LABELS_MAGIC) return 8 + dv.getUint32(4);
  if (magic === IDX_IMAGES_MAGIC && head.length >= 16) return 16 + dv.getUint32(4) * dv.getUint32(8) * dv.getUint32(12);
  return undefined;
}

/**
 * Gunzips an IDX file without trusting it: output stops at the size its header claims, and a header
 * claiming more than the compressed bytes could possibly hold (2^31 images in a 1 kB file) is refused
 * before inflating, so neither a forged header nor a gzip bomb drives an allocation. A file of unknown
 * magic is inflated only far enough for the parser to report the magic. `file` names it in errors.
 */
export async function gunzipIdx(raw: Uint8Array, file: string): Promise<Uint8Array> {
  return new Promise((resolvePromise, reject) => {
    const z = createGunzip({ chunkSize: 1 << 20 });
    const chunks: Buffer[] = [];
    let total = 0;
    let limit: number | undefined;
    let settled = false;
    const finish = (err: Error | undefined, data?: Uint8Array): void => {
      if (settled) return;
      settled = true;
      z.destroy();
      if (err) reject(err);
      else resolvePromise(data!);
    };
    z.on("data", (c: Buffer) => {
      if (settled) return;
      chunks.push(c);
      total += c.length;
      if (limit === undefined && total >= 8) {
        const all = Buffer.concat(chunks, total);
        const claimed = claimedSize(all.subarray(0, 16));
        if (claimed === undefined) {
          if (total >= 16) finish(undefined, all.subarray(0, 16));
          return;
        }
        if (claimed > raw.length * MAX_INFLATE_RATIO + 1024)
          return finish(new ConfigError(`IDX file ${file}: its header says ${claimed} bytes, more than a ${raw.length}-byte gzip file can hold: the file is truncated or its header is damaged.`));
        limit = claimed;
      }
      if (limit !== undefined && total > limit)
        finish(new ConfigError(`IDX file ${file} decompresses to more than the ${limit} bytes its header says: the file is too long or its header is damaged.`));
    });
    z.on("end", () => finish(undefined, Buffer.concat(chunks, total)));
    z.on("error", (cause) =>
      finish(new ConfigError(`IDX file ${file} is not a valid gzip stream (${cause.message}): the download is probably truncated.`, { cause })),
    );
    z.end(raw);
  });
}

const cache = new Map<string, Promise<IdxSet>>();

/** Loads and validates the four IDX files of `dir`, once per process for unchanged files. */
export async function loadIdxSet(dir: string): Promise<IdxSet> {
  const found = await Promise.all((Object.keys(IDX_FILES) as IdxRole[]).map((r) => findFile(dir, r)));
  const key = found.map((f) => `${f.path}\0${f.size}\0${f.mtimeMs}`).join("\n");
  let p = cache.get(key);
  if (!p) {
    p = readIdxSet(found.map((f) => f.path) as [string, string, string, string]);
    cache.set(key, p);
    p.catch(() => cache.delete(key));
  }
  return p;
}

async function readIdxSet(paths: [string, string, string, string]): Promise<IdxSet> {
  const [ti, tl, si, sl] = await Promise.all([readIdxImagesFile(paths[0]), readIdxFile(paths[1]), readIdxImagesFile(paths[2]), readIdxFile(paths[3])]);
  // The same digest as hashing the four files' bytes back to back (cache keys stay valid), with images streamed.
  const h = createHash("sha256");
  await ti.hashInto(h);
  h.update(tl.raw);
  await si.hashInto(h);
  h.update(sl.raw);
  const [tiImages, siImages] = [ti.images, si.images];
  const pair = (images: IdxImages, lab: Uint8Array, imgFile: string, labFile: string): IdxPair => {
    const labels = parseIdxLabels(lab, labFile);
    if (labels.length !== images.count)
      throw new ConfigError(`IDX files ${imgFile} (${images.count} images) and ${labFile} (${labels.length} labels) do not match.`);
    return { images, labels, files: [imgFile, labFile] };
  };
  const train = pair(tiImages, tl.data, paths[0], paths[1]);
  const test = pair(siImages, sl.data, paths[2], paths[3]);
  if (train.images.rows !== test.images.rows || train.images.cols !== test.images.cols)
    throw new ConfigError(`IDX files ${paths[0]} (${train.images.rows}x${train.images.cols}) and ${paths[2]} (${test.images.rows}x${test.images.cols}) have different image sizes.`);
  return { train, test, contentHash: h.digest("hex") };
}

export interface IdxDatasetOptions {
  /** Data set name, e.g. "fashion-mnist" or the spec "mnist:/data/mnist". */
  name: string;
  /** First part of every sample id: `<idPrefix>/train/<index>`. */
  idPrefix: string;
  dir: string;
  classes: readonly string[];
  seed: number;
  valSplit: number;
  limit: number;
}

/** Opens an IDX data set: test = the t10k files, val = a seeded stratified fraction of train. */
export async function openIdxDataset(o: IdxDatasetOptions): Promise<Dataset> {
  const dir = resolve(o.dir);
  const set = await loadIdxSet(dir);
  for (const pair of [set.train, set.test]) {
    for (let i = 0; i < pair.labels.length; i++)
      if (pair.labels[i] >= o.classes.length)
        throw new ConfigError(`IDX file ${pair.files[1]}: label ${pair.labels[i]} at index ${i} is out of range (${o.classes.length} classes: ${o.classes.join(", ")}).`);
  }
  const nTrain = set.train.labels.length;
  const nTest = set.test.labels.length;
  const ids = new Array<string>(nTrain + nTest);
  const labels = new Uint8Array(nTrain + nTest);
  for (let i = 0; i < nTrain; i++) ids[i] = `${o.idPrefix}/train/${i}`;
  for (let i = 0; i < nTest; i++) ids[nTrain + i] = `${o.idPrefix}/test/${i}`;
  labels.set(set.train.labels, 0);
  labels.set(set.test.labels, nTrain);

  const trainSplits = stratifiedSplit(ids.slice(0, nTrain), set.train.labels, { seed: o.seed, valFraction: o.valSplit, testFraction: 0 });
  const splits: Split[] = trainSplits.concat(new Array<Split>(nTest).fill("test"));
  const kept = applyLimit(ids, labels, splits, o.limit, o.seed);
  const samples = SampleList.from(kept.map((i) => ({ id: ids[i], label: labels[i], split: splits[i] })));

  const fingerprint = createHash("sha256")
    .update(JSON.stringify({ kind: "idx", v: 3, content: set.contentHash, idPrefix: o.idPrefix, classes: o.classes, seed: o.seed, valSplit: o.valSplit, limit: o.limit }))
    .digest("hex");

  const prefix = `${o.idPrefix}/`;
  const { rows, cols } = set.train.images;
  return {
    name: o.name,
    classes: [...o.classes],
    samples,
    skipped: [],
    fingerprint,
    async readRgb(sample: SampleRef, size: number): Promise<Uint8Array> {
      const id = sample.id;
      const m = id.startsWith(prefix) ? /^(train|test)\/(\d+)$/.exec(id.slice(prefix.length)) : null;
      const pair = m ? (m[1] === "train" ? set.train : set.test) : undefined;
      const index = m ? Number(m[2]) : -1;
      if (!pair || index >= pair.images.count)
        throw new BadInputError(id, SKIP_REASONS.unknownSample, `${id} is not a sample of ${o.name}.`);
      return grayToRgb(id, await idxImage(pair.images, index), cols, rows, size);
    },
  };
}

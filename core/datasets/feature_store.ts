/**
 * On-disk feature cache. One entry per cache key (model + input size + feature layer + pooling +
 * preprocessing + the input files and split parameters): a folder with
 *   meta.json      dims, counts, classes, the key's parts
 *   index.json     one record per sample: id, label, split (in feature-row order)
 *   skipped.json   inputs that could not be used, with reasons
 *   features.f32   rows of float32 little-endian, `featureDim` per sample
 * While extraction runs, shards land in `<key>.partial/shards/<shard>.bin` -- written once per shard
 * id and renamed into place, so a redelivered or re-run shard never duplicates a sample and a killed
 * run resumes where it stopped. `commit()` joins them in sample order and renames the entry into place.
 *
 * Memory stays bounded by a shard, not by the data set: `commit()` reads the shards one at a time
 * and writes their rows where they belong in features.f32 (positioned writes), and `load()` reads
 * the index only -- the rows are read by position when a batch needs them ({@link FeatureRows};
 * core/training/feature_batches.ts streams them to training). Per sample only a few bytes are kept:
 * index.json is written and read a part at a time, commit keeps its per-sample state in typed arrays,
 * and a loaded entry holds labels and splits (12 bytes a sample), its ids read again on first use.
 */
import { createHash } from "node:crypto";
import { closeSync, existsSync, fstatSync, openSync, readFileSync, readSync } from "node:fs";
import { type FileHandle, mkdir, open, readdir, readFile, rename, rm, stat, writeFile } from "node:fs/promises";
import { hostname } from "node:os";
import { join } from "node:path";
import { FileRows, type FeatureRows, MemoryRows } from "./feature_rows.js";
import type { SkippedInput, Split } from "./types.js";
import { storageError } from "../runtime/errors.js";

/** Features of one shard of samples. */
export interface FeatureShardData {
  shardId: string;
  ids: string[];
  labels: number[];
  splits: Split[];
  /** ids.length * featureDim values, row-major. */
  features: Float32Array;
  skipped: SkippedInput[];
}

export interface FeatureCacheMeta {
  key: string;
  featureDim: number;
  featureShape: number[];
  classes: string[];
  count: number;
  model: string;
  inputSize: number;
  featureLayer: string;
  pooling: string;
  createdAt: string;
}

/** A committed cache entry: its index in memory, its rows on disk. */
export interface FeatureSet {
  meta: FeatureCacheMeta;
  /** Sample ids in row order. A loaded entry reads them from index.json when first asked for (training never does). */
  ids: string[];
  labels: Int32Array;
  splits: Split[];
  /** The rows, read by position (absent in a set built by hand: {@link features} is then the rows). */
  rows?: FeatureRows;
  /**
   * Every row in one array. On a loaded entry this reads the whole file on first use: for small sets
   * and tests only; training and evaluation read through {@link rows} (see {@link rowsOf}).
   */
  readonly features: Float32Array;
  skipped: SkippedInput[];
}

/** The rows of a set: its file reader, or its in-memory features. */
export function rowsOf(set: FeatureSet): FeatureRows {
  return set.rows ?? new MemoryRows(set.features, set.meta.featureDim);
}

/**
 * A FeatureSet over `rows`, whose `features` are read (once) only when someone asks for all of them;
 * `ids` given as a function likewise (a loaded entry's, read from index.json on first use).
 */
function entrySet(meta: FeatureCacheMeta, ids: string[] | (() => string[]), labels: Int32Array, splits: Split[], skipped: SkippedInput[], rows: FeatureRows): FeatureSet {
  let all: Float32Array | undefined;
  let idList = typeof ids === "function" ? undefined : ids;
  return {
    meta, labels, splits, skipped, rows,
    get ids() {
      idList ??= (ids as () => string[])();
      return idList;
    },
    set ids(value: string[]) {
      idList = value;
    },
    get features() {
      all ??= rows.readSync(0, rows.count);
      return all;
    },
  };
}

export { type FeatureRows, FileRows, MemoryRows } from "./feature_rows.js";

/** The cache key: sha256 over the feature extractor's and the data set's fingerprints. */
export function cacheKey(extractorFingerprint: string, datasetFingerprint: string): string {
  return createHash("sha256").update(`${extractorFingerprint}\n${datasetFingerprint}`).digest("hex").slice(0, 32);
}

const SPLIT_CODES: Record<Split, number> = { train: 0, val: 1, test: 2 };
const SPLIT_NAMES: Split[] = ["train", "val", "test"];
/** The shortest record index.json can hold, `{"id":"","label":0,"split":"val"}`. */
const MIN_RECORD_BYTES = 33;

/** Binary shard file: header JSON length (u32) + header JSON + features bytes. */
export function encodeShard(s: FeatureShardData): Buffer {
  const header = Buffer.from(JSON.stringify({ shardId: s.shardId, ids: s.ids, labels: s.labels, splits: s.splits.map((x) => SPLIT_CODES[x]), skipped: s.skipped, n: s.features.length }));
  const len = Buffer.alloc(4);
  len.writeUInt32LE(header.length);
  return Buffer.concat([len, header, Buffer.from(s.features.buffer, s.features.byteOffset, s.features.byteLength)] as unknown as Uint8Array[]);
}

/**
 * Reads a shard file written by {@link encodeShard}. A damaged file (cut short, bytes flipped, a header
 * whose counts disagree) throws an Error that says so; it never yields rows of the wrong length.
 */
export function decodeShard(buf: Buffer, file = "feature shard"): FeatureShardData {
  const damaged = (why: string): Error => new Error(`${file} is damaged (${why}); delete it to extract the shard again.`);
  if (buf.length < 4) throw damaged(`${buf.length} bytes, shorter than its header length`);
  const hl = buf.readUInt32LE(0);
  if (hl > buf.length - 4) throw damaged(`header of ${hl} bytes in a ${buf.length}-byte file`);
  let h: unknown;
  try {
    h = JSON.parse(buf.subarray(4, 4 + hl).toString("utf8"));
  } catch {
    throw damaged("header is not valid JSON");
  }
  if (typeof h !== "object" || h === null || Array.isArray(h)) throw damaged("header is not an object");
  const { shardId, ids, labels, splits, skipped, n } = h as Record<string, unknown>;
  if (typeof shardId !== "string") throw damaged("no shard id");
  if (!Array.isArray(ids) || !ids.every((x) => typeof x === "string")) throw damaged(`shard ${shardId}: ids are not a list of strings`);
  if (!Array.isArray(labels) || labels.length !== ids.length || !labels.every((x) => Number.isInteger(x) && (x as number) >= 0))
    throw damaged(`shard ${shardId}: labels do not match the ${ids.length} ids`);
  if (!Array.isArray(splits) || splits.length !== ids.length || !splits.every((c) => Number.isInteger(c) && SPLIT_NAMES[c as number] !== undefined))
    throw damaged(`shard ${shardId}: splits do not match the ${ids.length} ids`);
  if (!Array.isArray(skipped) || !skipped.every((x) => typeof x === "object" && x !== null && typeof (x as SkippedInput).id === "string" && typeof (x as SkippedInput).reason === "string"))
    throw damaged(`shard ${shardId}: skipped inputs are not a list of {id, reason}`);
  if (!Number.isSafeInteger(n) || (n as number) < 0 || (ids.length === 0 ? n !== 0 : (n as number) % ids.length !== 0))
    throw damaged(`shard ${shardId}: ${String(n)} feature values is not a whole number of rows for ${ids.length} ids`);
  const bytes = buf.subarray(4 + hl);
  if (bytes.length !== (n as number) * 4) throw damaged(`shard ${shardId}: ${bytes.length} feature bytes, header says ${(n as number) * 4}`);
  const features = new Float32Array(n as number);
  new Uint8Array(features.buffer).set(bytes);
  return { shardId, ids: ids as string[], labels: labels as number[], splits: (splits as number[]).map((c) => SPLIT_NAMES[c]), features, skipped: skipped as SkippedInput[] };
}

export class FeatureCache {
  constructor(readonly root: string) {}

  entryDir(key: string): string {
    return join(this.root, key);
  }

  partialDir(key: string): string {
    return join(this.root, `${key}.partial`);
  }

  has(key: string): boolean {
    return existsSync(join(this.entryDir(key), "meta.json"));
  }

  /**
   * Takes the extraction lock of `key` (`<key>.lock`, holding `pid@host`), so two runs that share a
   * cache folder never fill and commit the same entry at once (the second then found its shards gone
   * under it). A lock held by a live process is waited for, polling every `pollMs` (`onWait` is called
   * once, to say whom we wait for); one left by a dead process on this host is taken over. Returns the
   * release function. A lock of another host is waited for: its process cannot be checked from here.
   */
  async lock(key: string, onWait?: (holder: string) => void, pollMs = 1000): Promise<() => Promise<void>> {
    await mkdir(this.root, { recursive: true }).catch((err: unknown) => Promise.reject(storageError(err, this.root)));
    const file = join(this.root, `${key}.lock`);
    const me = `${process.pid}@${hostname()}`;
    let told = false;
    for (;;) {
      try {
        await writeFile(file, me, { flag: "wx" });
        return async () => {
          if ((await readFile(file, "utf8").catch(() => "")) === me) await rm(file, { force: true });
        };
      } catch (err) {
        if ((err as NodeJS.ErrnoException).code !== "EEXIST") throw storageError(err, file);
      }
      const holder = (await readFile(file, "utf8").catch(() => "")).trim();
      if (holder !== "" && !lockHolderAlive(holder)) {
        await rm(file, { force: true });
        continue;
      }
      if (!told) onWait?.(holder || "another process");
      told = true;
      await new Promise((r) => setTimeout(r, pollMs));
    }
  }

  /** Shard ids already stored for an unfinished entry (a resumed run skips them). */
  async doneShards(key: string): Promise<Set<string>> {
    const dir = join(this.partialDir(key), "shards");
    if (!existsSync(dir)) return new Set();
    const names = await readdir(dir);
    return new Set(names.filter((n) => n.endsWith(".bin")).map((n) => decodeURIComponent(n.slice(0, -4))));
  }

  /** Stores one shard; a shard id already stored is left as it is (idempotent). */
  async putShard(key: string, shard: FeatureShardData): Promise<boolean> {
    const dir = join(this.partialDir(key), "shards");
    await mkdir(dir, { recursive: true });
    const file = join(dir, `${encodeURIComponent(shard.shardId)}.bin`);
    if (existsSync(file)) return false;
    const tmp = `${file}.${process.pid}.tmp`;
    const bytes = encodeShard(shard);
    try {
      await writeFile(tmp, bytes);
      await rename(tmp, file);
    } catch (err) {
      await rm(tmp, { force: true });
      throw storageError(err, dir, bytes.length);
    }
    return true;
  }

  async readShards(key: string): Promise<FeatureShardData[]> {
    const dir = join(this.partialDir(key), "shards");
    if (!existsSync(dir)) return [];
    const names = (await readdir(dir)).filter((n) => n.endsWith(".bin")).sort();
    return Promise.all(names.map(async (n) => decodeShard(await readFile(join(dir, n)), join(dir, n))));
  }

  /** Shard files of an unfinished entry, sorted by name. */
  private async shardFiles(key: string): Promise<string[]> {
    const dir = join(this.partialDir(key), "shards");
    if (!existsSync(dir)) return [];
    return (await readdir(dir)).filter((n) => n.endsWith(".bin")).sort().map((n) => join(dir, n));
  }

  /**
   * Joins the stored shards into the final entry, rows in `order` (sample ids; samples missing from
   * the shards must be listed as skipped). A sample id seen twice is an error: it means two shards
   * overlapped, which the planner never does. Reads one shard at a time (headers first, then rows,
   * each written at its final position), so memory is one shard whatever the entry's size.
   */
  async commit(key: string, meta: Omit<FeatureCacheMeta, "key" | "count" | "createdAt">, order: string[], extraSkipped: SkippedInput[] = []): Promise<FeatureSet> {
    const files = await this.shardFiles(key);
    // Per sample of `order`, in typed arrays (a few bytes a sample: no object or map entry per sample,
    // which at 10^6 samples made commit the head phase's peak of memory).
    const positions = new IdPositions(order, key);
    const shardIds: string[] = [];
    const shardOf = new Int32Array(order.length).fill(-1);
    const labelOf = new Int32Array(order.length);
    const splitOf = new Uint8Array(order.length);
    const notOrdered = new Map<string, string>(); // ids in a shard but not in `order` (none in a planned job): only checked for overlaps
    const skipped: SkippedInput[] = [...extraSkipped];
    for (const file of files) {
      const h = await readShardHeader(file);
      const s = shardIds.push(h.shardId) - 1;
      h.ids.forEach((id, row) => {
        const at = positions.find(id);
        const seen = at < 0 ? notOrdered.get(id) : shardOf[at] >= 0 ? shardIds[shardOf[at]] : undefined;
        if (seen !== undefined) throw new Error(`feature cache ${key}: sample ${id} is in two shards (${seen}, ${h.shardId})`);
        if (at < 0) { notOrdered.set(id, h.shardId); return; }
        shardOf[at] = s;
        labelOf[at] = h.labels[row];
        splitOf[at] = SPLIT_CODES[h.splits[row]];
      });
      for (const x of h.skipped) skipped.push(x); // not push(...): a shard may skip more than the call stack takes
    }
    notOrdered.clear();
    const dim = meta.featureDim;
    const skippedIds = new Set(skipped.map((s) => s.id));
    let missing = 0;
    let firstMissing = "";
    let count = 0;
    for (let i = 0; i < order.length; i++) {
      if (shardOf[i] >= 0) count++;
      else if (!skippedIds.has(order[i]) && missing++ === 0) firstMissing = order[i];
    }
    if (missing > 0) throw new Error(`feature cache ${key}: ${missing} samples have no features and were not reported skipped (first: ${firstMissing})`);
    skippedIds.clear();
    // destination[i]: the entry row of order[i], -1 for a sample without features.
    const destination = new Int32Array(order.length);
    const kept: string[] = new Array<string>(count);
    const labels = new Int32Array(count);
    const splits: Split[] = new Array<Split>(count);
    for (let i = 0, row = 0; i < order.length; i++) {
      if (shardOf[i] < 0) { destination[i] = -1; continue; }
      destination[i] = row;
      kept[row] = order[i];
      labels[row] = labelOf[i];
      splits[row] = SPLIT_NAMES[splitOf[i]];
      row++;
    }
    const full: FeatureCacheMeta = { ...meta, key, count, createdAt: new Date().toISOString() };
    const tmp = join(this.root, `${key}.tmp-${process.pid}`);
    await rm(tmp, { recursive: true, force: true });
    try {
      await mkdir(tmp, { recursive: true });
      await writeRows(join(tmp, "features.f32"), files, (id) => { const at = positions.find(id); return at < 0 ? -1 : destination[at]; }, dim, count);
      await writeIndex(join(tmp, "index.json"), kept, labels, splits);
      await writeFile(join(tmp, "skipped.json"), JSON.stringify(skipped, null, 1));
      await writeFile(join(tmp, "meta.json"), JSON.stringify(full, null, 2));
    } catch (err) {
      // Half an entry is never left where a later run would look (meta.json is what marks an entry).
      await rm(tmp, { recursive: true, force: true });
      throw storageError(err, this.root, count * dim * 4);
    }
    await rm(this.entryDir(key), { recursive: true, force: true });
    await rename(tmp, this.entryDir(key));
    await rm(this.partialDir(key), { recursive: true, force: true });
    return entrySet(full, kept, labels, splits, skipped, new FileRows(join(this.entryDir(key), "features.f32"), dim, count));
  }

  /**
   * Loads a committed entry. A damaged entry (a file cut short or garbled, counts that disagree)
   * throws an Error naming the folder and saying to delete it; it never yields rows of the wrong length.
   */
  async load(key: string): Promise<FeatureSet> {
    const dir = this.entryDir(key);
    const damaged = (why: string): Error => new Error(`feature cache ${dir} is damaged: ${why}; delete the folder to rebuild it.`);
    const json = async (name: string): Promise<unknown> => {
      let text: string;
      try {
        text = await readFile(join(dir, name), "utf8");
      } catch (cause) {
        throw Object.assign(damaged(`cannot read ${name} (${(cause as Error).message})`), { cause });
      }
      try {
        return JSON.parse(text);
      } catch {
        throw damaged(`${name} is not valid JSON`);
      }
    };
    const meta = (await json("meta.json")) as FeatureCacheMeta;
    if (typeof meta !== "object" || meta === null || !Number.isSafeInteger(meta.featureDim) || meta.featureDim < 1 || !Array.isArray(meta.classes))
      throw damaged("meta.json has no valid featureDim and classes");
    // The ids are not kept: training reads labels and splits only, and ids held for nothing were the
    // biggest part of an entry's memory (about 40 bytes a sample); they are read again when asked for.
    const indexFile = join(dir, "index.json");
    const index = await readIndex(indexFile, meta.classes.length, meta.count, false, damaged);
    const count = index.labels.length;
    if (Number.isInteger(meta.count) && meta.count !== count) throw damaged(`meta.json says ${meta.count} samples, index.json lists ${count}`);
    const skipped = (await json("skipped.json")) as SkippedInput[];
    if (!Array.isArray(skipped)) throw damaged("skipped.json is not a list");
    const file = join(dir, "features.f32");
    let size: number;
    try {
      size = (await stat(file)).size;
    } catch (cause) {
      throw Object.assign(damaged(`cannot read features.f32 (${(cause as Error).message})`), { cause });
    }
    if (size !== count * meta.featureDim * 4)
      throw damaged(`${size} bytes of features for ${count} samples x ${meta.featureDim}`);
    const rows = new FileRows(file, meta.featureDim, count);
    const ids = (): string[] => {
      const again = readIndexSync(indexFile, meta.classes.length, count, damaged);
      if (again.labels.length !== count || again.labels.some((l, i) => l !== index.labels[i]) || again.splits.some((s, i) => s !== index.splits[i]))
        throw damaged("index.json changed since the entry was loaded");
      return again.ids!;
    };
    return entrySet(meta, ids, index.labels, index.splits, skipped, rows);
  }
}

/** What index.json lists, in entry order (`ids` absent when the read was told not to keep them). */
interface IndexLists {
  ids?: string[];
  labels: Int32Array;
  splits: Split[];
}

/** Bytes of index.json read and parsed at a time. */
const INDEX_PART_BYTES = 2 ** 20;

/**
 * index.json parsed a part at a time: the text is cut between top-level records (found by following
 * strings and brackets byte by byte) and each part, about {@link INDEX_PART_BYTES}, goes to JSON.parse,
 * so neither the whole text nor an object per record is ever held -- only the lists. It accepts and
 * refuses what JSON.parse of the whole file would, with the same errors as before this read was
 * streamed: "not valid JSON", "not a list" (a text that does not open a list sets {@link notAList}:
 * JSON.parse of the whole file then tells which), or the first record that is not {id, label in
 * 0..classes-1, split}.
 */
class IndexParser {
  /** The text does not open a list (the reader then lets JSON.parse of the whole file say what it is). */
  notAList = false;
  private readonly ids: string[] | undefined;
  private labels: Int32Array;
  private readonly splits: Split[];
  private n = 0;
  private badRecord = -1;
  private carry = Buffer.alloc(0); // bytes after the last cut, not yet parsed
  private state: "before" | "in" | "after" = "before";
  private depth = 0;
  private inString = false;
  private escaped = false;
  private commas = 0; // top-level commas passed

  /** `capacity`: records expected (the lists are made that long at once: grown a record at a time, they would leave dead copies, 2-3 times their size, for GC). */
  constructor(private readonly classes: number, capacity: number, keepIds: boolean, private readonly damaged: (why: string) => Error) {
    this.ids = keepIds ? new Array<string>(capacity) : undefined;
    this.splits = new Array<Split>(capacity);
    this.labels = new Int32Array(Math.max(capacity, 1024));
  }

  /** The next bytes of the file. */
  push(bytes: Uint8Array): void {
    if (this.notAList) return;
    const b = this.carry.length > 0 ? Buffer.concat([this.carry, bytes]) : Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength);
    let start = 0; // where the unparsed records begin in b
    let cut = -1; // the last top-level ',' or the closing ']' in b
    for (let i = this.carry.length; i < b.length; i++) {
      const c = b[i];
      if (this.state === "in") {
        if (this.inString) {
          if (this.escaped) this.escaped = false;
          else if (c === 0x5c) this.escaped = true;
          else if (c === 0x22) this.inString = false;
        } else if (c === 0x22) this.inString = true;
        else if (c === 0x5b || c === 0x7b) this.depth++;
        else if (c === 0x5d || c === 0x7d) {
          if (--this.depth > 0) continue;
          if (c !== 0x5d) throw this.damaged("index.json is not valid JSON"); // "[ ... }"
          cut = i;
          this.state = "after";
        } else if (c === 0x2c && this.depth === 1) {
          cut = i;
          this.commas++;
        }
      } else if (this.state === "before") {
        if (isJsonSpace(c)) continue;
        if (c !== 0x5b) {
          this.notAList = true;
          return;
        }
        this.state = "in";
        this.depth = 1;
        start = i + 1;
      } else if (!isJsonSpace(c)) throw this.damaged("index.json is not valid JSON");
    }
    if (cut >= 0) {
      const text = b.toString("utf8", start, cut);
      // JSON.parse of `[text]` refuses an empty record inside the text or at either end of it, but not
      // a text of nothing, which only "[]" (no comma, closed) may be.
      if (text.trim() !== "") this.take(text);
      else if (this.state !== "after" || this.commas > 0) throw this.damaged("index.json is not valid JSON");
      this.carry = Buffer.from(b.subarray(cut + 1));
    } else this.carry = Buffer.from(b.subarray(start));
  }

  /** The lists, once the whole file was pushed (undefined when {@link notAList}). */
  end(): IndexLists | undefined {
    if (this.notAList || this.state === "before") {
      this.notAList = true;
      return undefined;
    }
    if (this.state !== "after") throw this.damaged("index.json is not valid JSON");
    if (this.badRecord >= 0) throw this.damaged(`index.json record ${this.badRecord} is not {id, label in 0..${this.classes - 1}, split}`);
    if (this.ids) this.ids.length = this.n;
    this.splits.length = this.n;
    return { ids: this.ids, labels: this.labels.length === this.n ? this.labels : this.labels.slice(0, this.n), splits: this.splits };
  }

  private take(text: string): void {
    let records: unknown[];
    try {
      records = JSON.parse(`[${text}]`) as unknown[];
    } catch {
      throw this.damaged("index.json is not valid JSON");
    }
    if (this.badRecord >= 0) return; // the rest is only checked to be JSON
    for (const r of records as { id: string; label: number; split: Split }[]) {
      if (typeof r !== "object" || r === null || typeof r.id !== "string" || !Number.isInteger(r.label) || r.label < 0 || r.label >= this.classes || !SPLIT_NAMES.includes(r.split)) {
        this.badRecord = this.n;
        return;
      }
      if (this.n === this.labels.length) {
        const grown = new Int32Array(this.labels.length * 2);
        grown.set(this.labels);
        this.labels = grown;
      }
      if (this.ids) this.ids[this.n] = r.id;
      this.labels[this.n] = r.label;
      this.splits[this.n] = r.split;
      this.n++;
    }
  }
}

function isJsonSpace(c: number): boolean {
  return c === 0x20 || c === 0x0a || c === 0x0d || c === 0x09;
}

/** Records to expect in index.json: meta.json's count, but never more than `bytes` of file can hold. */
function indexCapacity(expected: number, bytes: number): number {
  return Number.isSafeInteger(expected) && expected > 0 ? Math.min(expected, Math.floor(bytes / MIN_RECORD_BYTES)) : 0;
}

/** The error for an index.json that does not open a list: whether it is JSON at all decides which. */
function whyNotAList(text: string, damaged: (why: string) => Error): Error {
  try {
    JSON.parse(text);
  } catch {
    return damaged("index.json is not valid JSON");
  }
  return damaged("index.json is not a list");
}

function cannotReadIndex(cause: unknown, damaged: (why: string) => Error): Error {
  return Object.assign(damaged(`cannot read index.json (${(cause as Error).message})`), { cause });
}

/** Reads index.json with an {@link IndexParser}, one part at a time. */
async function readIndex(file: string, classes: number, expected: number, keepIds: boolean, damaged: (why: string) => Error): Promise<IndexLists> {
  let fh: FileHandle;
  try {
    fh = await open(file, "r");
  } catch (cause) {
    throw cannotReadIndex(cause, damaged);
  }
  try {
    const parser = new IndexParser(classes, indexCapacity(expected, (await fh.stat()).size), keepIds, damaged);
    const part = Buffer.alloc(INDEX_PART_BYTES);
    for (let pos = 0; !parser.notAList;) {
      const { bytesRead } = await fh.read(part, 0, part.length, pos).catch((cause: unknown) => Promise.reject(cannotReadIndex(cause, damaged)));
      if (bytesRead === 0) break;
      pos += bytesRead;
      parser.push(part.subarray(0, bytesRead));
    }
    const lists = parser.end();
    if (lists) return lists;
  } finally {
    await fh.close();
  }
  throw whyNotAList(await readFile(file, "utf8").catch((cause: unknown) => Promise.reject(cannotReadIndex(cause, damaged))), damaged);
}

/** {@link readIndex}, synchronously (the ids of a loaded entry, read when first asked for). */
function readIndexSync(file: string, classes: number, expected: number, damaged: (why: string) => Error): IndexLists {
  let fd: number;
  try {
    fd = openSync(file, "r");
  } catch (cause) {
    throw cannotReadIndex(cause, damaged);
  }
  try {
    const parser = new IndexParser(classes, indexCapacity(expected, fstatSync(fd).size), true, damaged);
    const part = Buffer.alloc(INDEX_PART_BYTES);
    for (let pos = 0; !parser.notAList;) {
      let bytesRead: number;
      try {
        bytesRead = readSync(fd, part, 0, part.length, pos);
      } catch (cause) {
        throw cannotReadIndex(cause, damaged);
      }
      if (bytesRead === 0) break;
      pos += bytesRead;
      parser.push(part.subarray(0, bytesRead));
    }
    const lists = parser.end();
    if (lists) return lists;
  } finally {
    closeSync(fd);
  }
  let text: string;
  try {
    text = readFileSync(file, "utf8");
  } catch (cause) {
    throw cannotReadIndex(cause, damaged);
  }
  throw whyNotAList(text, damaged);
}

/** A shard file's header only (ids, labels, splits, skipped): what commit needs before it places rows. */
async function readShardHeader(file: string): Promise<Omit<FeatureShardData, "features">> {
  const fh = await open(file, "r");
  try {
    const len = Buffer.alloc(4);
    const { bytesRead } = await fh.read(len, 0, 4, 0);
    const hl = bytesRead === 4 ? len.readUInt32LE(0) : 0;
    const size = (await fh.stat()).size;
    // A header that cannot be read whole goes through decodeShard, which says what is wrong with it.
    if (bytesRead < 4 || hl > size - 4) return decodeShard(await readFile(file), file);
    const buf = Buffer.alloc(4 + hl);
    await fh.read(buf, 0, 4 + hl, 0);
    const h = JSON.parse(buf.subarray(4).toString("utf8")) as { shardId: string; ids: string[]; labels: number[]; splits: number[]; skipped: SkippedInput[] };
    if (!Array.isArray(h.ids) || !Array.isArray(h.splits) || !Array.isArray(h.labels) || !Array.isArray(h.skipped)) return decodeShard(await readFile(file), file);
    return { shardId: h.shardId, ids: h.ids, labels: h.labels, splits: h.splits.map((c) => SPLIT_NAMES[c]), skipped: h.skipped };
  } catch (err) {
    if (err instanceof SyntaxError) return decodeShard(await readFile(file), file);
    throw err;
  } finally {
    await fh.close();
  }
}

/** Writes every shard's rows at their row in the entry (runs of consecutive rows in one write); one shard in memory at a time. */
async function writeRows(path: string, files: string[], destination: (id: string) => number, dim: number, count: number): Promise<void> {
  const fh = await open(path, "w");
  try {
    await fh.truncate(count * dim * 4);
    for (const file of files) {
      const shard = decodeShard(await readFile(file), file);
      const bytes = new Uint8Array(shard.features.buffer, shard.features.byteOffset, shard.features.byteLength);
      const rowBytes = dim * 4;
      const rows = Int32Array.from(shard.ids, destination);
      for (let r = 0; r < rows.length;) {
        const at = rows[r];
        if (at < 0) { r++; continue; }
        let end = r + 1;
        while (end < rows.length && rows[end] === at + (end - r)) end++;
        await fh.write(bytes, r * rowBytes, (end - r) * rowBytes, at * rowBytes);
        r = end;
      }
    }
  } finally {
    await fh.close();
  }
}

/**
 * Writes index.json a part at a time (about 1 MiB of text per write): the same bytes as
 * JSON.stringify of the list of records, without the list or the whole text in memory.
 */
async function writeIndex(path: string, ids: string[], labels: Int32Array, splits: Split[]): Promise<void> {
  const fh = await open(path, "w");
  try {
    let part = "[";
    for (let i = 0; i < ids.length; i++) {
      // The bytes of JSON.stringify({ id, label, split }), without building the object.
      part += `${i > 0 ? "," : ""}{"id":${JSON.stringify(ids[i])},"label":${labels[i]},"split":"${splits[i]}"}`;
      if (part.length >= 2 ** 20) { await fh.write(part); part = ""; }
    }
    await fh.write(`${part}]`);
  } finally {
    await fh.close();
  }
}

/**
 * Where each id stands in a list of ids: the positions sorted by id, searched by halving (4 bytes a
 * sample; a Map<string, number> takes ten times that). An id listed twice is an error: the list is
 * a data set's samples, each listed once.
 */
class IdPositions {
  private readonly sorted: Int32Array;

  constructor(private readonly ids: readonly string[], key: string) {
    const sorted = new Int32Array(ids.length);
    for (let i = 0; i < sorted.length; i++) sorted[i] = i;
    sorted.sort((a, b) => (ids[a] < ids[b] ? -1 : ids[a] > ids[b] ? 1 : a - b));
    for (let i = 1; i < sorted.length; i++)
      if (ids[sorted[i]] === ids[sorted[i - 1]]) throw new Error(`feature cache ${key}: sample ${ids[sorted[i]]} is listed twice in the sample order`);
    this.sorted = sorted;
  }

  /** The position of `id`, or -1. */
  find(id: string): number {
    let lo = 0;
    let hi = this.sorted.length - 1;
    while (lo <= hi) {
      const mid = (lo + hi) >>> 1;
      const at = this.ids[this.sorted[mid]];
      if (at === id) return this.sorted[mid];
      if (at < id) lo = mid + 1;
      else hi = mid - 1;
    }
    return -1;
  }
}

/** Whether the `pid@host` holding a cache lock still runs (always true for another host's process). */
function lockHolderAlive(holder: string): boolean {
  const [pid, host] = holder.split("@");
  if (host !== hostname()) return true;
  try {
    process.kill(Number(pid), 0);
    return true;
  } catch (err) {
    return (err as NodeJS.ErrnoException).code === "EPERM";
  }
}

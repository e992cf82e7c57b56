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
 * core/training/feature_batches.ts streams them to training). Only ids, labels and splits are kept
 * per sample (tens of bytes each).
 */
import { createHash } from "node:crypto";
import { existsSync } from "node:fs";
import { mkdir, open, readdir, readFile, rename, rm, stat, writeFile } from "node:fs/promises";
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

/** A FeatureSet over `rows`, whose `features` are read (once) only when someone asks for all of them. */
function entrySet(meta: FeatureCacheMeta, ids: string[], labels: Int32Array, splits: Split[], skipped: SkippedInput[], rows: FeatureRows): FeatureSet {
  let all: Float32Array | undefined;
  return {
    meta, ids, labels, splits, skipped, rows,
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
    const rows = new Map<string, { shard: string; label: number; split: Split }>();
    const skipped: SkippedInput[] = [...extraSkipped];
    for (const file of files) {
      const h = await readShardHeader(file);
      h.ids.forEach((id, row) => {
        if (rows.has(id)) throw new Error(`feature cache ${key}: sample ${id} is in two shards (${rows.get(id)!.shard}, ${h.shardId})`);
        rows.set(id, { shard: h.shardId, label: h.labels[row], split: h.splits[row] });
      });
      for (const x of h.skipped) skipped.push(x); // not push(...): a shard may skip more than the call stack takes
    }
    const dim = meta.featureDim;
    const kept = order.filter((id) => rows.has(id));
    const skippedIds = new Set(skipped.map((s) => s.id));
    const missing = order.filter((id) => !rows.has(id) && !skippedIds.has(id));
    if (missing.length > 0) throw new Error(`feature cache ${key}: ${missing.length} samples have no features and were not reported skipped (first: ${missing[0]})`);
    const destination = new Map<string, number>();
    kept.forEach((id, i) => destination.set(id, i));
    const labels = Int32Array.from(kept, (id) => rows.get(id)!.label);
    const splits = kept.map((id) => rows.get(id)!.split);
    rows.clear();
    const full: FeatureCacheMeta = { ...meta, key, count: kept.length, createdAt: new Date().toISOString() };
    const tmp = join(this.root, `${key}.tmp-${process.pid}`);
    await rm(tmp, { recursive: true, force: true });
    try {
      await mkdir(tmp, { recursive: true });
      await writeRows(join(tmp, "features.f32"), files, destination, dim, kept.length);
      await writeFile(join(tmp, "index.json"), indexJson(kept, labels, splits));
      await writeFile(join(tmp, "skipped.json"), JSON.stringify(skipped, null, 1));
      await writeFile(join(tmp, "meta.json"), JSON.stringify(full, null, 2));
    } catch (err) {
      // Half an entry is never left where a later run would look (meta.json is what marks an entry).
      await rm(tmp, { recursive: true, force: true });
      throw storageError(err, this.root, kept.length * dim * 4);
    }
    await rm(this.entryDir(key), { recursive: true, force: true });
    await rename(tmp, this.entryDir(key));
    await rm(this.partialDir(key), { recursive: true, force: true });
    return entrySet(full, kept, labels, splits, skipped, new FileRows(join(this.entryDir(key), "features.f32"), dim, kept.length));
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
    const index = (await json("index.json")) as { id: string; label: number; split: Split }[];
    if (!Array.isArray(index)) throw damaged("index.json is not a list");
    index.forEach((r, i) => {
      if (typeof r !== "object" || r === null || typeof r.id !== "string" || !Number.isInteger(r.label) || r.label < 0 || r.label >= meta.classes.length || !SPLIT_NAMES.includes(r.split))
        throw damaged(`index.json record ${i} is not {id, label in 0..${meta.classes.length - 1}, split}`);
    });
    if (Number.isInteger(meta.count) && meta.count !== index.length) throw damaged(`meta.json says ${meta.count} samples, index.json lists ${index.length}`);
    const skipped = (await json("skipped.json")) as SkippedInput[];
    if (!Array.isArray(skipped)) throw damaged("skipped.json is not a list");
    const file = join(dir, "features.f32");
    let size: number;
    try {
      size = (await stat(file)).size;
    } catch (cause) {
      throw Object.assign(damaged(`cannot read features.f32 (${(cause as Error).message})`), { cause });
    }
    if (size !== index.length * meta.featureDim * 4)
      throw damaged(`${size} bytes of features for ${index.length} samples x ${meta.featureDim}`);
    const rows = new FileRows(file, meta.featureDim, index.length);
    return entrySet(meta, index.map((r) => r.id), Int32Array.from(index.map((r) => r.label)), index.map((r) => r.split), skipped, rows);
  }
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
async function writeRows(path: string, files: string[], destination: Map<string, number>, dim: number, count: number): Promise<void> {
  const fh = await open(path, "w");
  try {
    await fh.truncate(count * dim * 4);
    for (const file of files) {
      const shard = decodeShard(await readFile(file), file);
      const bytes = new Uint8Array(shard.features.buffer, shard.features.byteOffset, shard.features.byteLength);
      const rowBytes = dim * 4;
      for (let r = 0; r < shard.ids.length;) {
        const at = destination.get(shard.ids[r]);
        if (at === undefined) { r++; continue; }
        let end = r + 1;
        while (end < shard.ids.length && destination.get(shard.ids[end]) === at + (end - r)) end++;
        await fh.write(bytes, r * rowBytes, (end - r) * rowBytes, at * rowBytes);
        r = end;
      }
    }
  } finally {
    await fh.close();
  }
}

/** index.json without one big intermediate array of records. */
function indexJson(ids: string[], labels: Int32Array, splits: Split[]): string {
  const parts: string[] = [];
  for (let i = 0; i < ids.length; i++) parts.push(JSON.stringify({ id: ids[i], label: labels[i], split: splits[i] }));
  return `[${parts.join(",")}]`;
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

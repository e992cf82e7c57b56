/**
 * A data set's samples in columns: ids packed as UTF-8 bytes, labels and splits in typed arrays.
 * A folder of 10^7 images is listed into about 15-20 bytes a file in memory, where an array of
 * `{ id, label, split }` objects took ~290 bytes a file (object, string header, array slot, and the
 * map and set entries built beside it). Readers see `SampleRef`s made on demand, one at a time.
 *
 * Past the first {@link SPILL_AFTER_BYTES} of ids, full chunks of ids go to a file that is unlinked
 * as soon as it is opened (in $TMPDIR; gone with the process, even after a crash) and are read back
 * through a small block cache: the paths of a 10^7-file folder are never all in memory at once.
 */
import { closeSync, openSync, readSync, unlinkSync, writeSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { hash53 } from "./splits.js";
import { SPLITS, type SampleRef, type Split } from "./types.js";

/** Ids are packed into chunks of this many bytes; an id never straddles two. */
const CHUNK_BYTES = 4 * 2 ** 20;
/** Longest id in UTF-8 bytes (paths are at most 4096 bytes on Linux). */
export const MAX_ID_BYTES = 65535;

/** Ids kept in memory before chunks spill to a file (about 2 million ids of 30 bytes). */
export const SPILL_AFTER_BYTES = 64 * 2 ** 20;
/** Spilled ids are read back this many bytes at a time, and this many blocks are kept (4 MiB). */
const BLOCK_BYTES = 64 * 2 ** 10;
const CACHED_BLOCKS = 64;

const SPLIT_CODE: Record<Split, number> = { train: 0, val: 1, test: 2 };

/** Closes a spill file's descriptor once its columns are collected (the file itself is already unlinked). */
const spillFiles = new FinalizationRegistry<number>((fd) => {
  try {
    closeSync(fd);
  } catch {
    // already closed
  }
});

export interface SampleColumnsOptions {
  /** Bytes of ids held in memory before full chunks spill to a file; default {@link SPILL_AFTER_BYTES}. */
  spillAfterBytes?: number;
  /** Folder of the spill file; default the OS temporary folder ($TMPDIR). */
  spillDir?: string;
}

function grown<T extends Float64Array | Uint16Array | Int32Array | Uint8Array>(a: T, need: number): T {
  if (need <= a.length) return a;
  const b = new (a.constructor as new (n: number) => T)(Math.max(need, a.length * 2));
  b.set(a);
  return b;
}

/** Ids and labels in listing order, appended one at a time (what a walk of the files builds). */
export class SampleColumns {
  /** In-memory chunks; null once written to the spill file (at offset chunk x CHUNK_BYTES). */
  private chunks: (Buffer | null)[] = [];
  private chunkUsed = CHUNK_BYTES;
  private resident = 0;
  private spillFd = -1;
  private spillBytes = 0;
  private readonly blocks = new Map<number, Buffer>();
  private starts = new Float64Array(1024);
  private lengths = new Uint16Array(1024);
  private labelsOf = new Int32Array(1024);
  private count = 0;

  constructor(private readonly o: SampleColumnsOptions = {}) {}

  get length(): number {
    return this.count;
  }

  /** Starts a new chunk; the full one before it goes to the spill file once enough are in memory. */
  private newChunk(): void {
    const full = this.chunks.length - 1;
    if (full >= 0 && this.resident * CHUNK_BYTES > (this.o.spillAfterBytes ?? SPILL_AFTER_BYTES)) {
      this.spill(full, this.chunks[full]!.subarray(0, this.chunkUsed));
      this.chunks[full] = null;
      this.resident--;
    }
    this.chunks.push(Buffer.allocUnsafe(CHUNK_BYTES));
    this.resident++;
    this.chunkUsed = 0;
  }

  private spill(chunk: number, bytes: Buffer): void {
    const dir = this.o.spillDir ?? tmpdir();
    try {
      if (this.spillFd < 0) {
        const path = join(dir, `ctrain-sample-ids-${process.pid}-${Date.now()}-${Math.random().toString(36).slice(2)}`);
        this.spillFd = openSync(path, "wx+", 0o600);
        unlinkSync(path);
        spillFiles.register(this, this.spillFd);
      }
      for (let done = 0; done < bytes.length; ) done += writeSync(this.spillFd, bytes, done, bytes.length - done, chunk * CHUNK_BYTES + done);
      this.spillBytes += bytes.length;
    } catch (cause) {
      throw new Error(`listing the data set: cannot write its sample ids to ${dir} (${(cause as Error).message}); a data set of millions of files spills its ids there: free space or set TMPDIR to another folder.`, { cause });
    }
  }

  /** `length` spilled bytes at file offset `start`, through the block cache. */
  private spilled(start: number, length: number): Buffer {
    const block = Math.floor(start / BLOCK_BYTES);
    const at = start - block * BLOCK_BYTES;
    if (at + length > BLOCK_BYTES) {
      const out = Buffer.allocUnsafe(length);
      readSync(this.spillFd, out, 0, length, start);
      return out;
    }
    let b = this.blocks.get(block);
    if (b) {
      this.blocks.delete(block); // most recently used last
    } else {
      b = Buffer.allocUnsafe(BLOCK_BYTES);
      readSync(this.spillFd, b, 0, BLOCK_BYTES, block * BLOCK_BYTES);
      if (this.blocks.size >= CACHED_BLOCKS) this.blocks.delete(this.blocks.keys().next().value!);
    }
    this.blocks.set(block, b);
    return b.subarray(at, at + length);
  }

  push(id: string, label: number): void {
    const bytes = Buffer.byteLength(id, "utf8");
    if (bytes > MAX_ID_BYTES) throw new RangeError(`sample id of ${bytes} bytes (at most ${MAX_ID_BYTES}): ${id.slice(0, 80)}...`);
    if (this.chunkUsed + bytes > CHUNK_BYTES) this.newChunk();
    const chunk = this.chunks.length - 1;
    this.chunks[chunk]!.write(id, this.chunkUsed, "utf8");
    const n = this.count;
    this.starts = grown(this.starts, n + 1);
    this.lengths = grown(this.lengths, n + 1);
    this.labelsOf = grown(this.labelsOf, n + 1);
    this.starts[n] = chunk * CHUNK_BYTES + this.chunkUsed;
    this.lengths[n] = bytes;
    this.labelsOf[n] = label;
    this.chunkUsed += bytes;
    this.count = n + 1;
  }

  id(i: number): string {
    const start = this.starts[i];
    const chunk = Math.floor(start / CHUNK_BYTES);
    const at = start - chunk * CHUNK_BYTES;
    const inMemory = this.chunks[chunk];
    if (inMemory) return inMemory.toString("utf8", at, at + this.lengths[i]);
    return this.spilled(start, this.lengths[i]).toString("utf8");
  }

  label(i: number): number {
    return this.labelsOf[i];
  }

  /** Gives every row label `to[label]` (a listing that drops classes renumbers the rest). */
  relabel(to: readonly number[]): void {
    for (let i = 0; i < this.count; i++) this.labelsOf[i] = to[this.labelsOf[i]];
  }

  /** Labels as a typed array view (no copy). */
  labels(): Int32Array {
    return this.labelsOf.subarray(0, this.count);
  }

  /** Bytes of ids written to the spill file (0: all in memory). */
  spilledBytes(): number {
    return this.spillBytes;
  }

  /** Bytes held in memory (chunks, columns and read cache), for the memory gauge. */
  bytes(): number {
    return this.resident * CHUNK_BYTES + this.blocks.size * BLOCK_BYTES + this.starts.byteLength + this.lengths.byteLength + this.labelsOf.byteLength;
  }
}

/**
 * The samples of a data set, in the data set's order (train, then val, then test): a view of
 * {@link SampleColumns} through an order, with a split each. Iterating makes one SampleRef a step.
 */
export class SampleList implements Iterable<SampleRef> {
  /** `order[k]` is the column row of sample k (absent: the identity); `splitCodes[k]` its split. */
  constructor(
    private readonly columns: SampleColumns,
    private readonly splitCodes: Uint8Array,
    private readonly order?: Uint32Array,
  ) {
    const n = order ? order.length : columns.length;
    if (splitCodes.length !== n) throw new RangeError(`SampleList: ${splitCodes.length} splits for ${n} samples`);
  }

  /** A list holding `refs` (IDX and synthetic sets, tests). */
  static from(refs: Iterable<SampleRef>): SampleList {
    const columns = new SampleColumns();
    const codes: number[] = [];
    for (const r of refs) {
      columns.push(r.id, r.label);
      codes.push(SPLIT_CODE[r.split]);
    }
    return new SampleList(columns, Uint8Array.from(codes));
  }

  /** Rows `order` of `columns` (each row at most once), with their splits. */
  static select(columns: SampleColumns, order: ArrayLike<number>, splits: ArrayLike<Split> | ((row: number) => Split)): SampleList {
    const rows = Uint32Array.from(order);
    const split = typeof splits === "function" ? splits : (row: number): Split => splits[row];
    const codes = new Uint8Array(rows.length);
    for (let k = 0; k < rows.length; k++) codes[k] = SPLIT_CODE[split(rows[k])];
    return new SampleList(columns, codes, rows);
  }

  get length(): number {
    return this.splitCodes.length;
  }

  private row(k: number): number {
    if (!(k >= 0 && k < this.length)) throw new RangeError(`sample ${k} of ${this.length}`);
    return this.order ? this.order[k] : k;
  }

  id(k: number): string {
    return this.columns.id(this.row(k));
  }

  label(k: number): number {
    return this.columns.label(this.row(k));
  }

  split(k: number): Split {
    return SPLITS[this.splitCodes[k]];
  }

  get(k: number): SampleRef {
    const row = this.row(k);
    return { id: this.columns.id(row), label: this.columns.label(row), split: SPLITS[this.splitCodes[k]] };
  }

  *[Symbol.iterator](): Iterator<SampleRef> {
    for (let k = 0; k < this.length; k++) yield this.get(k);
  }

  /** Every id, in order (one string each: for what needs them all at once, e.g. the cache commit). */
  ids(): string[] {
    const out = new Array<string>(this.length);
    for (let k = 0; k < this.length; k++) out[k] = this.id(k);
    return out;
  }

  /** Samples per split. */
  counts(): Record<Split, number> {
    const out: Record<Split, number> = { train: 0, val: 0, test: 0 };
    for (let k = 0; k < this.length; k++) out[SPLITS[this.splitCodes[k]]]++;
    return out;
  }

  some(pred: (s: SampleRef, k: number) => boolean): boolean {
    for (let k = 0; k < this.length; k++) if (pred(this.get(k), k)) return true;
    return false;
  }

  every(pred: (s: SampleRef, k: number) => boolean): boolean {
    return !this.some((s, k) => !pred(s, k));
  }

  find(pred: (s: SampleRef, k: number) => boolean): SampleRef | undefined {
    for (let k = 0; k < this.length; k++) {
      const s = this.get(k);
      if (pred(s, k)) return s;
    }
    return undefined;
  }

  filter(pred: (s: SampleRef, k: number) => boolean): SampleRef[] {
    const out: SampleRef[] = [];
    for (let k = 0; k < this.length; k++) {
      const s = this.get(k);
      if (pred(s, k)) out.push(s);
    }
    return out;
  }

  map<T>(fn: (s: SampleRef, k: number) => T): T[] {
    const out = new Array<T>(this.length);
    for (let k = 0; k < this.length; k++) out[k] = fn(this.get(k), k);
    return out;
  }

  /** Samples `from` up to (not including) `to`, as SampleRefs. */
  slice(from = 0, to = this.length): SampleRef[] {
    const out: SampleRef[] = [];
    for (let k = Math.max(0, from); k < Math.min(to, this.length); k++) out.push(this.get(k));
    return out;
  }

  /** The first `n` samples of `split`, in order. */
  firstOf(split: Split, n: number): SampleRef[] {
    const code = SPLIT_CODE[split];
    const out: SampleRef[] = [];
    for (let k = 0; k < this.length && out.length < n; k++) if (this.splitCodes[k] === code) out.push(this.get(k));
    return out;
  }
}

/** Seed of IdIndex's id hashes (any fixed value: the index is never stored). */
const ID_HASH_SEED = 0x1d1d;

/**
 * Which ids belong to a list, in 8 bytes an id (a sorted array of 53-bit hashes, not a Set of
 * strings): a worker checks a message's ids against its own listing with it.
 */
export class IdIndex {
  private readonly hashes: Float64Array;

  constructor(list: { readonly length: number; id(k: number): string }) {
    this.hashes = new Float64Array(list.length);
    for (let k = 0; k < list.length; k++) this.hashes[k] = hash53(list.id(k), ID_HASH_SEED);
    this.hashes.sort();
  }

  has(id: string): boolean {
    const h = hash53(id, ID_HASH_SEED);
    let lo = 0;
    let hi = this.hashes.length - 1;
    while (lo <= hi) {
      const mid = (lo + hi) >>> 1;
      const v = this.hashes[mid];
      if (v === h) return true;
      if (v < h) lo = mid + 1;
      else hi = mid - 1;
    }
    return false;
  }
}

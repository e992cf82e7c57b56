/**
 * A data set's samples in columns: ids packed as UTF-8 bytes, labels and splits in typed arrays.
 * A folder of 10^7 images is listed into about (id bytes + 15) bytes a file, where an array of
 * `{ id, label, split }` objects took ~290 bytes a file (object, string header, array slot, and the
 * map and set entries built beside it). Readers see `SampleRef`s made on demand, one at a time.
 */
import { hash53 } from "./splits.js";
import { SPLITS, type SampleRef, type Split } from "./types.js";

/** Ids are packed into chunks of this many bytes; an id never straddles two. */
const CHUNK_BYTES = 4 * 2 ** 20;
/** Longest id in UTF-8 bytes (paths are at most 4096 bytes on Linux). */
export const MAX_ID_BYTES = 65535;

const SPLIT_CODE: Record<Split, number> = { train: 0, val: 1, test: 2 };

function grown<T extends Float64Array | Uint16Array | Int32Array | Uint8Array>(a: T, need: number): T {
  if (need <= a.length) return a;
  const b = new (a.constructor as new (n: number) => T)(Math.max(need, a.length * 2));
  b.set(a);
  return b;
}

/** Ids and labels in listing order, appended one at a time (what a walk of the files builds). */
export class SampleColumns {
  private chunks: Buffer[] = [];
  private chunkUsed = CHUNK_BYTES;
  private starts = new Float64Array(1024);
  private lengths = new Uint16Array(1024);
  private labelsOf = new Int32Array(1024);
  private count = 0;

  get length(): number {
    return this.count;
  }

  push(id: string, label: number): void {
    const bytes = Buffer.byteLength(id, "utf8");
    if (bytes > MAX_ID_BYTES) throw new RangeError(`sample id of ${bytes} bytes (at most ${MAX_ID_BYTES}): ${id.slice(0, 80)}...`);
    if (this.chunkUsed + bytes > CHUNK_BYTES) {
      this.chunks.push(Buffer.allocUnsafe(Math.max(CHUNK_BYTES, bytes)));
      this.chunkUsed = 0;
    }
    const chunk = this.chunks.length - 1;
    this.chunks[chunk].write(id, this.chunkUsed, "utf8");
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
    return this.chunks[chunk].toString("utf8", at, at + this.lengths[i]);
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

  /** Bytes held (chunks and columns), for the memory gauge. */
  bytes(): number {
    return this.chunks.length * CHUNK_BYTES + this.starts.byteLength + this.lengths.byteLength + this.labelsOf.byteLength;
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

  /** Samples in `split`. */
  count(split: Split): number {
    const code = SPLIT_CODE[split];
    let n = 0;
    for (let k = 0; k < this.length; k++) if (this.splitCodes[k] === code) n++;
    return n;
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

/**
 * Which ids belong to a list, in 8 bytes an id (a sorted array of 53-bit hashes, not a Set of
 * strings): a worker checks a message's ids against its own listing with it.
 */
export class IdIndex {
  private readonly hashes: Float64Array;

  constructor(list: { readonly length: number; id(k: number): string }) {
    this.hashes = new Float64Array(list.length);
    for (let k = 0; k < list.length; k++) this.hashes[k] = hash53(list.id(k), 0x1d1d);
    this.hashes.sort();
  }

  has(id: string): boolean {
    const h = hash53(id, 0x1d1d);
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

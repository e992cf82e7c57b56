/**
 * Rows of a feature cache entry read where they lie: positioned reads of `features.f32` (rows of
 * `dim` float32, little-endian, back to back), so head training and evaluation hold only the rows
 * of the batches in flight, never the whole entry. Every call opens, reads and closes: a block read
 * is hundreds of rows, so an open costs nothing next to it, and no file handle outlives its use.
 */
import { closeSync, openSync, readSync } from "node:fs";
import { open } from "node:fs/promises";

/** Row access to a feature matrix (`count` rows of `dim` floats). */
export interface FeatureRows {
  readonly dim: number;
  readonly count: number;
  /** Rows [start, start + n) as one Float32Array (row-major, n * dim values). */
  read(start: number, n: number): Promise<Float32Array>;
  /** The same, synchronously (small reads on paths that are synchronous today). */
  readSync(start: number, n: number): Float32Array;
}

function checkRange(r: FeatureRows, start: number, n: number): void {
  if (!Number.isSafeInteger(start) || !Number.isSafeInteger(n) || start < 0 || n < 0 || start + n > r.count)
    throw new RangeError(`feature rows: rows ${start}..${start + n} are outside 0..${r.count}`);
}

/** Rows of a features.f32 file, read by position. */
export class FileRows implements FeatureRows {
  constructor(readonly file: string, readonly dim: number, readonly count: number) {}

  async read(start: number, n: number): Promise<Float32Array> {
    checkRange(this, start, n);
    const out = new Float32Array(n * this.dim);
    if (n === 0) return out;
    const bytes = new Uint8Array(out.buffer);
    const fh = await open(this.file, "r");
    try {
      for (let at = 0; at < bytes.length;) {
        const { bytesRead } = await fh.read(bytes, at, bytes.length - at, start * this.dim * 4 + at);
        if (bytesRead === 0) throw new Error(`${this.file} ended before row ${start + n}: the feature cache entry is damaged; delete its folder to rebuild it.`);
        at += bytesRead;
      }
    } finally {
      await fh.close();
    }
    return out;
  }

  readSync(start: number, n: number): Float32Array {
    checkRange(this, start, n);
    const out = new Float32Array(n * this.dim);
    if (n === 0) return out;
    const bytes = new Uint8Array(out.buffer);
    const fd = openSync(this.file, "r");
    try {
      for (let at = 0; at < bytes.length;) {
        const got = readSync(fd, bytes, at, bytes.length - at, start * this.dim * 4 + at);
        if (got === 0) throw new Error(`${this.file} ended before row ${start + n}: the feature cache entry is damaged; delete its folder to rebuild it.`);
        at += got;
      }
    } finally {
      closeSync(fd);
    }
    return out;
  }
}

/** Rows already in memory (a feature set built by hand, e.g. in a bench or test). */
export class MemoryRows implements FeatureRows {
  readonly count: number;
  constructor(readonly values: Float32Array, readonly dim: number) {
    if (values.length % dim !== 0) throw new RangeError(`feature rows: ${values.length} values is not a whole number of ${dim}-value rows`);
    this.count = values.length / dim;
  }

  async read(start: number, n: number): Promise<Float32Array> {
    return this.readSync(start, n);
  }

  readSync(start: number, n: number): Float32Array {
    checkRange(this, start, n);
    return this.values.slice(start * this.dim, (start + n) * this.dim);
  }
}

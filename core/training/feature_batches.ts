/**
 * A feature cache entry streamed to the training loop: batches are read from features.f32 by
 * position, never the whole split. Order, reproducible from the seed:
 *   1. the split's rows are cut into blocks of `blockRows` consecutive rows (the unit of reading);
 *   2. each epoch permutes the blocks (seed, epoch);
 *   3. consecutive permuted blocks form windows of `windowBytes / 2`; rows are shuffled within a window
 *      (the shuffle buffer of tf.data / Ray Data, made exact: every row once per epoch).
 * A window's blocks are read once and kept until the loop moves past them (an LRU of two windows:
 * a batch can straddle two), so memory is `windowBytes` whatever the entry's size, and the same seed
 * gives the same batches in any process. The trade-off against a uniform shuffle: rows of one block
 * share a window, so a batch mixes at most `window / blockRows` blocks' worth of neighbours; with the
 * defaults (64 MiB) a 1280-d window holds ~6,500 rows in 64 blocks of 100, a 3456-d one (block_12_add,
 * pooling none) ~2,400 rows in 64 blocks of 37.
 */
import type * as tf from "@tensorflow/tfjs";
import type { FeatureRows } from "../datasets/feature_rows.js";
import { type FeatureSet, rowsOf } from "../datasets/feature_store.js";
import type { Split } from "../datasets/types.js";
import { heldBytes } from "../runtime/memory_accounting.js";
import { Rng } from "../runtime/rng.js";
import { type ArrayData, type BatchSource, type Evaluation, evaluateBatches } from "./train_loop.js";

/** How a split is streamed. */
export interface StreamOptions {
  /** Seed of the block order and the in-window shuffle (the job's seed). */
  seed: number;
  /** Rows per block, the unit of reading and of the block shuffle. Default 256, fewer (down to 16) when rows are so wide that a window would hold under 64 blocks. */
  blockRows?: number;
  /** Bytes of rows held at once (two shuffle windows). Default 64 MiB. */
  windowBytes?: number;
}

export const DEFAULT_BLOCK_ROWS = 256;
export const DEFAULT_WINDOW_BYTES = 64 * 2 ** 20;
/** Blocks a window mixes at the least (by default): wide rows get shorter blocks. */
const MIN_WINDOW_BLOCKS = 64;

/** Row numbers (in the entry) of one split's samples, in entry order. */
export function splitRows(set: FeatureSet, split: Split): Int32Array {
  let n = 0;
  for (const s of set.splits) if (s === split) n++;
  const out = new Int32Array(n);
  let at = 0;
  set.splits.forEach((s, i) => { if (s === split) out[at++] = i; });
  return out;
}

/** Labels of one split's samples, in entry order. */
export function splitLabels(set: FeatureSet, split: Split): Int32Array {
  const rows = splitRows(set, split);
  return Int32Array.from(rows, (r) => set.labels[r]);
}

/** Reads that cover `wanted` (ascending entry rows): a run of rows, gaps of up to 8 rows read through rather than a read each. */
function segments(wanted: Int32Array): [number, number][] {
  const out: [number, number][] = [];
  for (let i = 0; i < wanted.length;) {
    let j = i + 1;
    while (j < wanted.length && wanted[j] - wanted[j - 1] <= 8) j++;
    out.push([i, j]);
    i = j;
  }
  return out;
}

function place(out: Float32Array, dim: number, wanted: Int32Array, [i, j]: [number, number], span: Float32Array): void {
  for (let k = i; k < j; k++) out.set(span.subarray((wanted[k] - wanted[i]) * dim, (wanted[k] - wanted[i] + 1) * dim), k * dim);
}

/** The rows `wanted` (ascending entry rows), packed in that order. */
export async function gatherRows(rows: FeatureRows, wanted: Int32Array): Promise<Float32Array> {
  const out = new Float32Array(wanted.length * rows.dim);
  for (const seg of segments(wanted)) place(out, rows.dim, wanted, seg, await rows.read(wanted[seg[0]], wanted[seg[1] - 1] - wanted[seg[0]] + 1));
  return out;
}

/** {@link gatherRows}, synchronously. */
export function gatherRowsSync(rows: FeatureRows, wanted: Int32Array): Float32Array {
  const out = new Float32Array(wanted.length * rows.dim);
  for (const seg of segments(wanted)) place(out, rows.dim, wanted, seg, rows.readSync(wanted[seg[0]], wanted[seg[1] - 1] - wanted[seg[0]] + 1));
  return out;
}

/** One split as ArrayData in memory (what the in-memory path and small splits use). */
export function splitInMemory(set: FeatureSet, split: Split, sampleShape = [set.meta.featureDim]): ArrayData {
  const rows = splitRows(set, split);
  const x = gatherRowsSync(rowsOf(set), rows);
  heldBytes("features", x.byteLength, x);
  return { x, sampleShape, y: Int32Array.from(rows, (r) => set.labels[r]) };
}

/** A split in entry order, `chunkRows` rows at a time. */
export async function* streamSplit(set: FeatureSet, split: Split, chunkRows = 1024, sampleShape = [set.meta.featureDim]): AsyncGenerator<ArrayData> {
  const rows = splitRows(set, split);
  const reader = rowsOf(set);
  for (let i = 0; i < rows.length; i += chunkRows) {
    const part = rows.subarray(i, Math.min(rows.length, i + chunkRows));
    yield { x: await gatherRows(reader, part), sampleShape, y: Int32Array.from(part, (r) => set.labels[r]) };
  }
}

/** Loss, accuracy and predictions of `model` on one split, streamed. */
export function evaluateSplit(model: tf.LayersModel, set: FeatureSet, split: Split, numClasses: number, sampleShape = [set.meta.featureDim]): Promise<Evaluation> {
  let n = 0;
  for (const s of set.splits) if (s === split) n++;
  return evaluateBatches(model, streamSplit(set, split, 1024, sampleShape), numClasses, n);
}

/** How a split is cut into blocks and windows (see the file comment). */
export interface StreamLayout {
  /** Rows per block (the last block of a split may be shorter). */
  blockRows: number;
  /** Blocks per shuffle window. */
  windowBlocks: number;
}

/** The layout of a stream of `dim`-float rows: wide rows get shorter blocks, so a window still mixes at least MIN_WINDOW_BLOCKS of them. */
export function streamLayout(dim: number, o: Omit<StreamOptions, "seed"> = {}): StreamLayout {
  const windowHalf = (o.windowBytes ?? DEFAULT_WINDOW_BYTES) / 2;
  // A folder data set lists its samples class by class, and a window of a few long blocks would be a few classes.
  const blockRows = Math.max(1, o.blockRows ?? Math.min(DEFAULT_BLOCK_ROWS, Math.max(16, Math.floor(windowHalf / (MIN_WINDOW_BLOCKS * dim * 4)))));
  return { blockRows, windowBlocks: Math.max(1, Math.floor(windowHalf / (blockRows * dim * 4))) };
}

/** One epoch of a stream: the block permutation and the row order it gives. */
interface EpochPlan {
  /** perm[j]: the block at position j of the epoch. */
  perm: Int32Array;
  order: Int32Array;
}

function epochPlan(samples: number, blockRows: number, windowBlocks: number, seed: number, epoch: number): EpochPlan {
  const rng = new Rng((seed * 1000003 + epoch) ^ 0x5f3759df);
  const blocks = Math.ceil(samples / blockRows);
  const perm = Int32Array.from(rng.permutation(blocks));
  const order = new Int32Array(samples);
  let at = 0;
  for (let w = 0; w < blocks; w += windowBlocks) {
    const start = at;
    for (let k = w; k < Math.min(blocks, w + windowBlocks); k++)
      for (let r = perm[k] * blockRows; r < Math.min(samples, (perm[k] + 1) * blockRows); r++) order[at++] = r;
    for (let i = at - 1; i > start; i--) {
      const j = start + rng.int(i - start + 1);
      const t = order[i]; order[i] = order[j]; order[j] = t;
    }
  }
  return { perm, order };
}

/** The epoch order of {@link featureBatches}: permuted blocks, rows shuffled within windows of `windowBlocks` blocks. */
export function streamOrder(samples: number, blockRows: number, windowBlocks: number, seed: number, epoch: number): Int32Array {
  return epochPlan(samples, blockRows, windowBlocks, seed, epoch).order;
}

/** Where a {@link blockBatches} stream reads its rows. */
export interface BlockStream {
  samples: number;
  layout: StreamLayout;
  seed: number;
  sampleShape: number[];
  /** Block k: rows [k * blockRows, ...) of the split and their labels. */
  load(k: number): Promise<ArrayData>;
  /**
   * Start reading every block of a window when the first of them is asked for (blocks that sit in
   * an object store, where reads pay a round trip each); default false: each block when first asked for.
   */
  readWindows?: boolean;
  /** Data-parallel replicas: the part of each global batch this one trains (its rows carry their global index). Default: all of it. */
  sliceOf?: (indices: Int32Array, batch: number, epoch: number) => Int32Array;
}

/**
 * Batches of a split stored as blocks, in {@link streamOrder}, holding two windows of blocks at most:
 * what the coordinator's head reads from the cache file (featureBatches) and what a replica of the
 * head phase reads from the object store, the same global batches in both.
 */
export function blockBatches(s: BlockStream): Pick<BatchSource, "samples" | "order" | "prefetch" | "batch"> {
  const { blockRows, windowBlocks } = s.layout;
  let plan: { epoch: number; plan: EpochPlan; position: Int32Array } | undefined;
  const planOf = (epoch: number): NonNullable<typeof plan> => {
    if (plan?.epoch !== epoch) {
      const p = epochPlan(s.samples, blockRows, windowBlocks, s.seed, epoch);
      const position = new Int32Array(p.perm.length);
      p.perm.forEach((k, j) => (position[k] = j));
      plan = { epoch, plan: p, position };
    }
    return plan;
  };
  const cache = new BlockCache(2 * windowBlocks, (k) => s.load(k));
  const get = (k: number, epoch: number): Promise<ArrayData> => {
    if (s.readWindows && !cache.has(k)) {
      const { plan: p, position } = planOf(epoch);
      const w = Math.floor(position[k] / windowBlocks) * windowBlocks;
      for (let j = w; j < Math.min(p.perm.length, w + windowBlocks); j++) if (p.perm[j] !== k && !cache.has(p.perm[j])) void cache.get(p.perm[j]).catch(() => undefined);
    }
    return cache.get(k);
  };
  const dim = s.sampleShape.reduce((a, b) => a * b, 1);
  return {
    samples: s.samples,
    order: (epoch) => planOf(epoch).plan.order,
    prefetch: true,
    async batch(indices, b, epoch) {
      const rows = s.sliceOf ? s.sliceOf(indices, b, epoch) : indices;
      const blocks = await Promise.all(Array.from(rows, (r) => get(Math.floor(r / blockRows), epoch)));
      const x = new Float32Array(rows.length * dim);
      const y = new Int32Array(rows.length);
      for (let i = 0; i < rows.length; i++) {
        const r = rows[i] % blockRows;
        x.set(blocks[i].x.subarray(r * dim, (r + 1) * dim), i * dim);
        y[i] = blocks[i].y[r];
      }
      return s.sliceOf ? { x, sampleShape: s.sampleShape, y, index: Int32Array.from(rows) } : { x, sampleShape: s.sampleShape, y };
    },
  };
}

/**
 * The training rows of `split` as a BatchSource for fit(), read from the cache by block (see the
 * file comment). `validation` names the split validated after each epoch (streamed too).
 */
export function featureBatches(set: FeatureSet, split: Split, numClasses: number, o: StreamOptions & { validation?: Split; sampleShape?: number[] }): BatchSource {
  const rows = splitRows(set, split);
  const reader = rowsOf(set);
  const sampleShape = o.sampleShape ?? [reader.dim];
  const layout = streamLayout(reader.dim, o);
  const validation = o.validation;
  const hasValidation = validation !== undefined && set.splits.includes(validation);
  return {
    ...blockBatches({ samples: rows.length, layout, seed: o.seed, sampleShape, load: async (k) => readBlock(set, reader, rows, layout.blockRows, k, sampleShape) }),
    validate: hasValidation ? (model) => evaluateSplit(model, set, validation!, numClasses, sampleShape) : undefined,
  };
}

/** Block k of the split whose entry rows are `rows` (held as features until dropped). */
export async function readBlock(set: Pick<FeatureSet, "labels">, reader: FeatureRows, rows: Int32Array, blockRows: number, k: number, sampleShape: number[]): Promise<ArrayData> {
  const part = rows.subarray(k * blockRows, Math.min(rows.length, (k + 1) * blockRows));
  const x = await gatherRows(reader, part);
  heldBytes("features", x.byteLength, x);
  return { x, sampleShape, y: Int32Array.from(part, (r) => set.labels[r]) };
}

/** The last `capacity` blocks used, each read once while it stays (concurrent asks share one read). */
class BlockCache {
  private readonly blocks = new Map<number, Promise<ArrayData>>();

  constructor(private readonly capacity: number, private readonly load: (k: number) => Promise<ArrayData>) {}

  has(k: number): boolean {
    return this.blocks.has(k);
  }

  get(k: number): Promise<ArrayData> {
    let p = this.blocks.get(k);
    if (p) this.blocks.delete(k);
    else p = this.load(k);
    this.blocks.set(k, p);
    while (this.blocks.size > this.capacity) this.blocks.delete(this.blocks.keys().next().value!);
    return p;
  }
}

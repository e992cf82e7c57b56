/**
 * Images as a {@link BatchSource} for the one training loop (train_loop's fit): decoded, optionally
 * augmented, and optionally passed through a frozen stage per batch.
 *
 * Images: decoded once with Dataset.readRgb into one in-memory uint8 array when they fit in
 * `memoryBudgetBytes` (default 1 GiB: 36k images at 96x96 -- decoding and resizing through sharp
 * costs about as much as a forward pass of the top of the base, so re-decoding every epoch would
 * double the cost of small runs); above the budget they are decoded again per batch (every epoch).
 * Augmentation runs as tf ops on each step's batch, so no augmented copy is ever stored; a training
 * BatchSource ({@link imageBatches}) runs them on its own thread (core/training/batch_prep.ts) so that
 * preparing the next batch overlaps the current step.
 *
 * The frozen part of an image-fed model (the whole base for method 2, the bottom below the cut for
 * fine-tuning) is a {@link FrozenStage}: it runs on the inference engine (onnxruntime when the model
 * converts, core/models/inference_engine.ts) and only the trainable part runs in tfjs. Gradients
 * stop at the frozen part anyway, so splitting there changes no result and moves the most expensive
 * forward pass to the fastest engine.
 */
import type * as tf from "@tensorflow/tfjs";
import type { AugmentOptions } from "../datasets/augment.js";
import type { Dataset, SampleRef } from "../datasets/types.js";
import type { Preprocessing } from "../models/model_zoo.js";
import { heldBytes } from "../runtime/memory_accounting.js";
import { BatchPrepThread, type PixelJob, prepPixels } from "./batch_prep.js";
import { type ArrayData, type BatchSource, type Evaluation, evaluate } from "./train_loop.js";

/** The frozen part of an image-fed model: [0, 255] NHWC pixels -> the rows the trainable part takes. */
export interface FrozenStage {
  /** Shape of one output row (before flattening). */
  readonly featureShape: number[];
  extract(pixels: Uint8Array | Float32Array, n: number): Promise<Float32Array>;
}

/** Labelled images of one split, fetched by row. */
export interface ImageSource {
  readonly size: number;
  readonly labels: Int32Array;
  /** size*size*3 bytes per requested row, HWC, in `rows` order: a new array the caller owns (it may be handed to another thread). */
  batch(rows: ArrayLike<number>): Promise<Uint8Array>;
  /** Whether rows come from memory (true) or are decoded on every call (false). */
  readonly inMemory: boolean;
}

/** Default memory for decoded images of one job (all splits). */
export const DEFAULT_IMAGE_MEMORY_BYTES = 1 << 30;

/**
 * The images of `samples` (known-good ids, e.g. a feature cache's rows) as an ImageSource: decoded
 * once into memory if `samples.length * size^2 * 3 <= memoryBudgetBytes`, else decoded per batch.
 */
export async function openImages(dataset: Dataset, samples: SampleRef[], size: number, memoryBudgetBytes = DEFAULT_IMAGE_MEMORY_BYTES): Promise<ImageSource> {
  const pixels = size * size * 3;
  const labels = Int32Array.from(samples.map((s) => s.label));
  if (samples.length * pixels <= memoryBudgetBytes) {
    const all = new Uint8Array(samples.length * pixels);
    heldBytes("images", all.byteLength, all);
    const chunk = 64;
    for (let i = 0; i < samples.length; i += chunk) {
      const part = await Promise.all(samples.slice(i, i + chunk).map((s) => dataset.readRgb(s, size)));
      part.forEach((rgb, j) => all.set(rgb, (i + j) * pixels));
    }
    return {
      size, labels, inMemory: true,
      async batch(rows) {
        const out = new Uint8Array(rows.length * pixels);
        for (let i = 0; i < rows.length; i++) out.set(all.subarray(rows[i] * pixels, (rows[i] + 1) * pixels), i * pixels);
        return out;
      },
    };
  }
  return {
    size, labels, inMemory: false,
    async batch(rows) {
      const out = new Uint8Array(rows.length * pixels);
      const decoded = await Promise.all(Array.from(rows, (r) => dataset.readRgb(samples[r], size)));
      decoded.forEach((rgb, i) => out.set(rgb, i * pixels));
      return out;
    },
  };
}

/** Samples of a split in the row order of `ids` (a feature cache's rows: skipped inputs excluded). */
export function samplesOf(dataset: Dataset, ids: string[], splits: string[], split: string): SampleRef[] {
  const byId = new Map(dataset.samples.map((s) => [s.id, s]));
  const out: SampleRef[] = [];
  ids.forEach((id, i) => { if (splits[i] === split) out.push(byId.get(id)!); });
  return out;
}

/** Which training epoch a batch is drawn for (with the run seed): keys its images' augmentation. */
export interface EpochKeys {
  seed: number;
  epoch: number;
}

/**
 * One (optionally augmented) batch as the ArrayData computeGradients takes: through `frozen` when
 * given (rows of its output), else preprocessed pixels for a model that starts at the image. Row i
 * is sample `rows[i]` of `source` (its ArrayData index), augmented with the draws of
 * (keys.seed, keys.epoch, rows[i]) -- the same in whichever batch or worker's part it is.
 */
export async function imageBatch(source: ImageSource, rows: ArrayLike<number>, preprocessing: Preprocessing, augment: AugmentOptions | null, keys: EpochKeys, frozen?: FrozenStage, onTiming?: (t: BatchTiming) => void): Promise<ArrayData> {
  return preparedBatch(source, rows, { preprocessing, augment, frozen, onTiming }, keys, prepPixels);
}

/** What turns a batch's pixels into rows: {@link prepPixels} here, or a {@link BatchPrepThread}'s `prepare`. */
type PrepPixels = (job: PixelJob) => Float32Array | Promise<Float32Array>;
type PrepOptions = Pick<ImageBatchOptions, "preprocessing" | "augment" | "frozen" | "onTiming">;

/** {@link imageBatch} with the pixel work done by `prep`. */
async function preparedBatch(source: ImageSource, rows: ArrayLike<number>, o: PrepOptions, keys: EpochKeys, prep: PrepPixels): Promise<ArrayData> {
  const t0 = performance.now();
  const prepared = await decodeAugment(source, rows, o, keys, prep);
  const t1 = performance.now();
  const { frozen, onTiming } = o;
  // Without a frozen stage the pixels are always preprocessed floats (bytes only go to a frozen stage).
  const x = frozen ? await frozen.extract(prepared.x, rows.length) : prepared.x instanceof Float32Array ? prepared.x : Float32Array.from(prepared.x);
  onTiming?.({ rows: rows.length, decode_augment_seconds: (t1 - t0) / 1000, frozen_seconds: (performance.now() - t1) / 1000 });
  return { ...prepared, x, sampleShape: frozen ? frozen.featureShape : prepared.sampleShape };
}

/** Busy time of one prepared batch, in seconds (performance.now; a prefetched batch overlaps the previous step). */
export interface BatchTiming {
  /** Rows of the batch (this worker's part). */
  rows: number;
  /** Fetching (decoding when not in memory), augmenting and preprocessing the pixels. */
  decode_augment_seconds: number;
  /** The frozen stage's forward pass (0 without one). */
  frozen_seconds: number;
}

/** The batch's pixels, augmented: preprocessed rows for a model that starts at the image, raw [0, 255] floats (or bytes) for a frozen stage. */
async function decodeAugment(source: ImageSource, rows: ArrayLike<number>, o: PrepOptions, keys: EpochKeys, prep: PrepPixels): Promise<Omit<ArrayData, "x"> & { x: Uint8Array | Float32Array }> {
  const rgb = await source.batch(rows);
  const s = source.size;
  const index = Int32Array.from(rows);
  const y = new Int32Array(rows.length);
  for (let i = 0; i < rows.length; i++) y[i] = source.labels[rows[i]];
  if (o.frozen && !o.augment) return { x: rgb, sampleShape: [s, s, 3], y, index };
  const x = await prep({ rgb, size: s, preprocessing: o.preprocessing, augment: o.augment, keys: { seed: keys.seed, epoch: keys.epoch, index }, raw: o.frozen !== undefined });
  return { x, sampleShape: [s, s, 3], y, index };
}

/** Loss, accuracy and predictions of an image -> probabilities model on a whole split, in batches. */
export async function evaluateImages(model: tf.LayersModel, source: ImageSource, preprocessing: Preprocessing, numClasses: number, batchSize = 64, frozen?: FrozenStage): Promise<Evaluation> {
  const n = source.labels.length;
  const predictions = new Int32Array(n);
  let lossSum = 0, correct = 0;
  for (let start = 0; start < n; start += batchSize) {
    const rows = Int32Array.from({ length: Math.min(batchSize, n - start) }, (_, i) => start + i);
    const b = await imageBatch(source, rows, preprocessing, null, { seed: 0, epoch: 0 }, frozen);
    const ev = evaluate(model, b, numClasses, batchSize);
    lossSum += ev.loss * rows.length;
    correct += Math.round(ev.accuracy * rows.length);
    predictions.set(ev.predictions, start);
  }
  return { loss: n ? lossSum / n : NaN, accuracy: n ? correct / n : NaN, predictions };
}

/** How {@link imageBatches} turns images into training rows. */
export interface ImageBatchOptions {
  /** Seed of the per-sample augmentation (the job's seed: the same as fit's). */
  seed: number;
  preprocessing: Preprocessing;
  /** null = no augmentation. */
  augment: AugmentOptions | null;
  /** The frozen part in front of the trained model (it then takes its output rows); absent: the model takes preprocessed images. */
  frozen?: FrozenStage;
  /** Validation loss/accuracy after each epoch (the caller picks the cheapest equivalent model). */
  validate?: BatchSource["validate"];
  /**
   * Data-parallel: this worker's part of global batch `batch` of `epoch` (its sample indices, in
   * order), taken before decoding so that a worker decodes and augments only its part. Default: the whole batch.
   */
  sliceOf?: (indices: Int32Array, batch: number, epoch: number) => Int32Array;
  /** Called with the busy time of every prepared training batch (benchmarks, step-time splits). Default: none. */
  onTiming?: (t: BatchTiming) => void;
}

/**
 * Images as a BatchSource: fit's seeded batches, each decoded, every image augmented with a generator
 * seeded by (seed, epoch, its sample index) and passed through the frozen stage; the next batch is
 * prepared while the current one trains. Augmentation and pixel scaling run on the source's own
 * thread (core/training/batch_prep.ts: started by the first batch, ended by `close`, which fit calls).
 */
export function imageBatches(train: ImageSource, o: ImageBatchOptions): BatchSource {
  const thread = new BatchPrepThread();
  const prep = (job: PixelJob): Promise<Float32Array> => thread.prepare(job);
  // Batches asked for and not yet prepared (fit's prefetch when it stops): close waits for them, so none starts a new thread after it.
  const inFlight = new Set<Promise<ArrayData>>();
  return {
    samples: train.labels.length,
    batch: (indices, b, epoch) => {
      const p = preparedBatch(train, o.sliceOf ? o.sliceOf(indices, b, epoch) : indices, o, { seed: o.seed, epoch }, prep);
      inFlight.add(p);
      p.then(() => inFlight.delete(p), () => inFlight.delete(p));
      return p;
    },
    prefetch: true,
    validate: o.validate,
    close: async () => {
      await Promise.allSettled(inFlight);
      await thread.close();
    },
  };
}

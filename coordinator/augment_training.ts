/**
 * Method 2 of the recipe: frozen base + head trained end to end on augmented images, and the
 * image-fed training loop that fine-tuning with augmentation reuses.
 *
 * Images: decoded once with Dataset.readRgb into one in-memory uint8 array when they fit in
 * `memoryBudgetBytes` (default 1 GiB: 36k images at 96x96 -- decoding and resizing through sharp
 * costs about as much as a forward pass of the top of the base, so re-decoding every epoch would
 * double the cost of small runs); above the budget they are decoded again per batch (every epoch).
 * Augmentation runs as tf ops on each step's batch, so no augmented copy is ever stored.
 *
 * The frozen part of an image-fed model (the whole base for method 2, the bottom below the cut for
 * fine-tuning) is a {@link FrozenStage}: it runs on the inference engine (onnxruntime when the model
 * converts, core/models/inference_engine.ts) and only the trainable part runs in tfjs. Gradients
 * stop at the frozen part anyway, so splitting there changes no result and moves the most expensive
 * forward pass to the fastest engine.
 *
 * The step is train_loop's computeGradients (and the optional gradientHook for data-parallel
 * averaging); only the batch preparation (decode, augment, frozen forward) differs from fit().
 */
import * as tf from "@tensorflow/tfjs";
import { type AugmentOptions, augmentBatch, batchSeed } from "../core/datasets/augment.js";
import type { Dataset, SampleRef } from "../core/datasets/types.js";
import { preprocess } from "../core/models/feature_model.js";
import { freezeAll } from "../core/models/model_split.js";
import { buildHead } from "../core/models/head.js";
import type { Preprocessing } from "../core/models/model_zoo.js";
import { Rng } from "../core/runtime/rng.js";
import type { HeadTrainingOptions } from "./head_training.js";
import { type ArrayData, type EpochStats, type Evaluation, evaluate, fitBatches, type FitOptions, type GradientHook, sparseCrossEntropy, type TrainingControls } from "../core/training/train_loop.js";

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
  /** size*size*3 bytes per requested row, HWC, in `rows` order. */
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

/**
 * One (optionally augmented) batch as the ArrayData computeGradients takes: through `frozen` when
 * given (rows of its output), else preprocessed pixels for a model that starts at the image.
 */
export async function imageBatch(source: ImageSource, rows: ArrayLike<number>, preprocessing: Preprocessing, augment: AugmentOptions | null, rng: Rng, frozen?: FrozenStage): Promise<ArrayData> {
  const rgb = await source.batch(rows);
  const s = source.size;
  const y = new Int32Array(rows.length);
  for (let i = 0; i < rows.length; i++) y[i] = source.labels[rows[i]];
  if (frozen && !augment) return { x: await frozen.extract(rgb, rows.length), sampleShape: frozen.featureShape, y };
  const x = tf.tidy(() => {
    const raw = tf.tensor4d(rgb, [rows.length, s, s, 3], "int32");
    const img = augment ? augmentBatch(raw, augment, rng) : raw;
    return frozen ? img.toFloat() : preprocess(img, preprocessing);
  });
  const data = x.dataSync() as Float32Array;
  x.dispose();
  if (frozen) return { x: await frozen.extract(data, rows.length), sampleShape: frozen.featureShape, y };
  return { x: data, sampleShape: [s, s, 3], y };
}

/** Loss, accuracy and predictions of an image -> probabilities model on a whole split, in batches. */
export async function evaluateImages(model: tf.LayersModel, source: ImageSource, preprocessing: Preprocessing, numClasses: number, batchSize = 64, frozen?: FrozenStage): Promise<Evaluation> {
  const n = source.labels.length;
  const predictions = new Int32Array(n);
  let lossSum = 0, correct = 0;
  for (let start = 0; start < n; start += batchSize) {
    const rows = Int32Array.from({ length: Math.min(batchSize, n - start) }, (_, i) => start + i);
    const b = await imageBatch(source, rows, preprocessing, null, new Rng(0), frozen);
    const ev = evaluate(model, b, numClasses, batchSize);
    lossSum += ev.loss * rows.length;
    correct += Math.round(ev.accuracy * rows.length);
    predictions.set(ev.predictions, start);
  }
  return { loss: n ? lossSum / n : NaN, accuracy: n ? correct / n : NaN, predictions };
}

export interface ImageFitOptions {
  epochs: number;
  batchSize: number;
  seed: number;
  numClasses: number;
  optimizer: tf.Optimizer;
  preprocessing: Preprocessing;
  /** null = no augmentation. */
  augment: AugmentOptions | null;
  /** The frozen part in front of `model` (then `model` takes its output rows); absent: `model` takes preprocessed images. */
  frozen?: FrozenStage;
  /** Validation loss/accuracy after each epoch (the caller picks the cheapest equivalent model). */
  validate?: () => Promise<{ loss: number; accuracy: number }>;
  initialEpoch?: number;
  gradientHook?: GradientHook;
  controls?: TrainingControls;
  onBatchEnd?: FitOptions["onBatchEnd"];
  onEpochEnd?: FitOptions["onEpochEnd"];
  signal?: AbortSignal;
}

/**
 * fit() for image-fed models: train_loop's one epoch loop (fitBatches: the same seeded batches, the
 * same step, the same training controls) with batches decoded and augmented from images; the next
 * batch is decoded while the current one trains.
 */
export async function fitImages(model: tf.LayersModel, train: ImageSource, o: ImageFitOptions): Promise<EpochStats[]> {
  if (!(o.epochs >= 1)) throw new RangeError(`fitImages: epochs must be >= 1, got ${o.epochs}`);
  if (train.labels.length === 0) throw new RangeError("fitImages: no training samples");
  const { preprocessing, augment, validate, frozen, ...rest } = o;
  return fitBatches(model, {
    samples: train.labels.length,
    batch: (indices, b, epoch) => imageBatch(train, indices, preprocessing, augment, new Rng(batchSeed(o.seed, epoch, b)), frozen),
    prefetch: true,
    validate,
  }, rest);
}

/** The head phase's options (same head, same schedule) plus what training on images needs. */
export interface AugmentHeadOptions extends HeadTrainingOptions {
  numClasses: number;
  augment: AugmentOptions;
  preprocessing: Preprocessing;
  gradientHook?: GradientHook;
}

export interface AugmentHeadData {
  /** image -> feature vector (the job's feature extractor): its engine runs the forward pass; its tfjs model (absent for an ONNX base) stays frozen. */
  base: FrozenStage & { model?: tf.LayersModel };
  train: ImageSource;
  /** Validation and test as cached features: the frozen base makes head(feature) equal model(image). */
  val: ArrayData;
  test: ArrayData;
}

export interface AugmentHeadResult {
  head: tf.LayersModel;
  /** base + head, image -> probabilities (shares the head's weights); absent when the base has no tfjs form. */
  model?: tf.LayersModel;
  history: EpochStats[];
  test: Evaluation;
  seconds: number;
}

/**
 * Method 2: a fresh head on top of the frozen base, trained on augmented images. Validation and
 * test run on the cached features of the un-augmented images (same result as running the frozen
 * base, without running it).
 */
export async function trainHeadWithAugmentation(d: AugmentHeadData, o: AugmentHeadOptions): Promise<AugmentHeadResult> {
  const t0 = performance.now();
  const base = d.base.model;
  if (base) freezeAll(base);
  const featureDim = d.base.featureShape.reduce((a, b) => a * b, 1);
  const head = buildHead({ featureDim, numClasses: o.numClasses, units: o.units, dropout: o.dropout, seed: o.seed });
  const model = base ? tf.model({ inputs: base.inputs, outputs: head.apply(base.outputs[0]) as tf.SymbolicTensor, name: "ctrain_augment_model" }) : undefined;
  const optimizer = tf.train.adam(o.learningRate);
  try {
    // The head trains on the base's output for each augmented batch: model = base + head, split at the frozen boundary.
    const history = await fitImages(head, d.train, {
      epochs: o.epochs, batchSize: o.batchSize, seed: o.seed, numClasses: o.numClasses, optimizer, frozen: d.base,
      preprocessing: o.preprocessing, augment: o.augment, gradientHook: o.gradientHook, controls: o.controls, onBatchEnd: o.onBatchEnd, onEpochEnd: o.onEpochEnd,
      validate: async () => evaluate(head, d.val, o.numClasses),
    });
    const test = evaluate(head, d.test, o.numClasses);
    return { head, model, history, test, seconds: (performance.now() - t0) / 1000 };
  } finally {
    optimizer.dispose();
  }
}

/** Mean loss of a model on one ArrayData (test helper and sanity checks). */
export function meanLoss(model: tf.LayersModel, data: ArrayData, numClasses: number): number {
  return tf.tidy(() => {
    const x = tf.tensor(data.x, [data.y.length, ...data.sampleShape]);
    return sparseCrossEntropy(model.predict(x) as tf.Tensor, tf.tensor1d(data.y, "int32"), numClasses).dataSync()[0];
  });
}

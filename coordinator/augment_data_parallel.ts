/**
 * Method 2 (`--method augment`: frozen base + head trained end to end on augmented images) data-parallel
 * on the job's workers, and fine-tuning with augmentation the same way: the same attempt, driver and
 * replicas as data-parallel fine-tuning on cached activations (coordinator/data_parallel.ts), with an
 * image input instead of activation rows.
 *
 * The coordinator builds the head exactly as the one-process path does (coordinator/augment_training.ts:
 * same seed, same initial weights) and publishes an attempt of phase `head` whose `images` name the data
 * set and the frozen stage as an extraction round does (the worker opens and builds them the way it does
 * for extraction, and checks the fingerprints), plus the augmentation. The train sample ids go to the
 * object store in the coordinator's row order (the feature cache's: skipped inputs excluded), so every
 * replica's batch b is the one-process path's batch b. Each replica decodes, augments and runs through
 * the frozen base only its part of each global batch. Validation on the workers and test here run on
 * the cached features, as in one process (the frozen base makes head(feature) equal model(image)).
 *
 * Fine-tuning with augmentation: the frozen stage is the bottom below the cut (the activation
 * extractor, on the inference engine) and the replicas train top + pooling + head. Validation rows are
 * the val images through the frozen bottom, computed here once (what the one-process path validates on
 * every epoch); test runs here on the test images.
 */
import type * as tf from "@tensorflow/tfjs";
import type { NatsConnection } from "nats";
import { augmentOf } from "../core/datasets/augment.js";
import { cacheKey, type FeatureSet } from "../core/datasets/feature_store.js";
import type { SampleRef } from "../core/datasets/types.js";
import type { FeatureExtractor } from "../core/models/feature_model.js";
import { buildHead } from "../core/models/head.js";
import { fineTuneModel, type SplitBase } from "../core/models/model_split.js";
import { type ArrayData, evaluate } from "../core/training/train_loop.js";
import { splitInMemory } from "../core/training/feature_batches.js";
import { evaluateImages, imageBatch, type ImageSource, samplesOf } from "../core/training/image_batches.js";
import { roundId, toExtractionRound } from "../proto/extraction_wire.js";
import { encodeSampleList, toAugmentation } from "../proto/training_wire.js";
import type { ImageInput } from "../proto/codec.js";
import { type DataParallelOptions, trainDataParallel } from "./data_parallel.js";
import type { FineTuneResult } from "./fine_tuning.js";
import { confusionMatrix, type HeadTrainingOptions, type HeadTrainingResult } from "./head_training.js";
import type { PhaseProgress } from "./phases/progress.js";
import type { JobContext } from "./phases/setup.js";

/** The head phase's result and how many workers trained it. */
export type HeadOnWorkers = HeadTrainingResult & { workers: number };

/** The images of the job as an attempt names them: the data set and `frozen` (default: the job's extractor, the whole base), and the augmentation. */
export function imageInputOf(ctx: JobContext, frozen: FeatureExtractor = ctx.extractor): ImageInput {
  const { opts, dataset } = ctx;
  const round = roundId(cacheKey(frozen.fingerprint, dataset.fingerprint));
  return { frozen: toExtractionRound({ opts, extractor: frozen, datasetFingerprint: dataset.fingerprint, round }), augment: toAugmentation(augmentOf(opts)) };
}

/** The attempt's train object of an image attempt: the samples' ids and labels in the coordinator's row order. */
function sampleList(samples: readonly SampleRef[]): Uint8Array {
  return encodeSampleList({ ids: samples.map((s) => s.id), labels: Int32Array.from(samples.map((s) => s.label)) });
}

/** Trains a fresh head data-parallel over the workers on augmented images; validation and test on the cached features. */
export async function trainHeadOnWorkers(ctx: JobContext, nc: NatsConnection, features: FeatureSet, o: HeadTrainingOptions, workers: number, progress: PhaseProgress): Promise<HeadOnWorkers> {
  const t0 = performance.now();
  const { opts, dataset, log } = ctx;
  const numClasses = dataset.classes.length;
  const train = samplesOf(dataset, features.ids, features.splits, "train");
  const val = splitInMemory(features, "val");
  const head = buildHead({ featureDim: ctx.extractor.featureDim, numClasses, units: o.units, dropout: o.dropout, seed: o.seed });
  log.info("head phase on the workers", { images: train.length, workers, ...augmentOf(opts) });
  const run = await trainDataParallel(head, head, { train: sampleList(train), val, trainSamples: train.length }, {
    nc, job: opts.job, log, metrics: ctx.metrics, model: opts.model, inputSize: opts.inputSize, featureLayer: opts.featureLayer, pooling: opts.pooling,
    fineTuneLayers: "0", learningRate: o.learningRate, seed: o.seed, batchSize: o.batchSize, epochs: o.epochs, numClasses, wireDtype: opts.wireDtype, workers, out: opts.out,
    checksumEvery: opts.checksumEvery, checkpointEvery: opts.checkpointEvery, stepTimeoutMs: opts.stepTimeoutMs, bucketBytes: opts.bucketBytes, phase: "head", images: imageInputOf(ctx),
    controls: o.controls, onBatchProgress: progress.moveTo, onEpochEnd: progress.onEpochEnd,
  });
  const test = splitInMemory(features, "test");
  const t = evaluate(head, test, numClasses);
  const v = val.y.length ? evaluate(head, val, numClasses) : undefined;
  const last = run.history.at(-1);
  if (last && last.val_accuracy === undefined && v) Object.assign(last, { val_loss: v.loss, val_accuracy: v.accuracy });
  return {
    head, history: run.history, workers: run.workers, seconds: (performance.now() - t0) / 1000, val_accuracy: v?.accuracy ?? NaN,
    test: { loss: t.loss, accuracy: t.accuracy, samples: test.y.length, confusion: confusionMatrix(test.y, t.predictions, numClasses) },
  };
}

/** Fine-tuning's images: the three splits, the train samples in row order, and the frozen bottom below the cut. */
export interface FineTuneImages {
  train: ImageSource;
  val: ImageSource;
  test: ImageSource;
  trainSamples: readonly SampleRef[];
  frozen: FeatureExtractor;
}

/** The attempt settings of fine-tuning that the caller chooses (the job's connection, schedule, progress). */
export type FineTuneAttemptOptions = Omit<DataParallelOptions, "phase" | "images">;

/** Fine-tunes split.top + head data-parallel on augmented images; the trained weights end up in them. */
export async function fineTuneImagesOnWorkers(ctx: JobContext, split: SplitBase, head: tf.LayersModel, d: FineTuneImages, o: FineTuneAttemptOptions): Promise<FineTuneResult & { workers: number }> {
  const t0 = performance.now();
  const model = fineTuneModel(split, head, o.pooling, false);
  const val = await frozenRows(d.val, d.frozen, ctx);
  const valBefore = evaluate(model, val, o.numClasses);
  o.log.info("fine-tuning with augmentation on the workers", { images: d.trainSamples.length, workers: o.workers, cut_shape: d.frozen.featureShape });
  const run = await trainDataParallel(model, head, { train: sampleList(d.trainSamples), val, trainSamples: d.trainSamples.length }, { ...o, phase: "fine_tune", images: imageInputOf(ctx, d.frozen) });
  const v = evaluate(model, val, o.numClasses);
  const test = await evaluateImages(model, d.test, ctx.extractor.preprocessing, o.numClasses, 64, d.frozen);
  const last = run.history.at(-1);
  if (last && last.val_accuracy === undefined && val.y.length) Object.assign(last, { val_loss: v.loss, val_accuracy: v.accuracy });
  return {
    model, history: run.history, workers: run.workers, val_loss_before: valBefore.loss, val_accuracy: v.accuracy, seconds: (performance.now() - t0) / 1000,
    test: { loss: test.loss, accuracy: test.accuracy, samples: d.test.labels.length, confusion: confusionMatrix(d.test.labels, test.predictions, o.numClasses) },
  };
}

/** The un-augmented images of `source` through `frozen`, as rows (what evaluateImages feeds the trainable part). */
async function frozenRows(source: ImageSource, frozen: FeatureExtractor, ctx: JobContext): Promise<ArrayData> {
  const n = source.labels.length;
  const dim = frozen.featureShape.reduce((a, b) => a * b, 1);
  const x = new Float32Array(n * dim);
  for (let start = 0; start < n; start += 64) {
    const rows = Int32Array.from({ length: Math.min(64, n - start) }, (_, i) => start + i);
    x.set((await imageBatch(source, rows, ctx.extractor.preprocessing, null, { seed: 0, epoch: 0 }, frozen)).x, start * dim);
  }
  return { x, sampleShape: frozen.featureShape, y: source.labels };
}

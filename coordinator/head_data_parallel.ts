/**
 * Method 2 (`--method augment`: frozen base + head trained end to end on augmented images) data-parallel
 * on the job's workers: the same attempt, driver and replicas as data-parallel fine-tuning
 * (coordinator/data_parallel.ts), with an image input instead of activation rows.
 *
 * The coordinator builds the head exactly as the one-process path does (coordinator/augment_training.ts:
 * same seed, same initial weights) and publishes an attempt of phase `head` whose `images` name the data
 * set and the frozen stage as an extraction round does (the worker opens and builds them the way it does
 * for extraction, and checks the fingerprints), plus the augmentation. The train sample ids go to the
 * object store in the coordinator's row order (the feature cache's: skipped inputs excluded), so every
 * replica's batch b is the one-process path's batch b. Each replica decodes, augments and runs through
 * the frozen base only its part of each global batch. Validation on the workers and test here run on
 * the cached features, as in one process (the frozen base makes head(feature) equal model(image)).
 */
import type { NatsConnection } from "nats";
import { augmentOf } from "../core/datasets/augment.js";
import { cacheKey, type FeatureSet } from "../core/datasets/feature_store.js";
import { buildHead } from "../core/models/head.js";
import { evaluate } from "../core/training/train_loop.js";
import { splitInMemory } from "../core/training/feature_batches.js";
import { samplesOf } from "../core/training/image_batches.js";
import { roundId, toExtractionRound } from "../proto/extraction_wire.js";
import { encodeSampleList, toAugmentation } from "../proto/training_wire.js";
import type { ImageInput } from "../proto/codec.js";
import { trainDataParallel } from "./data_parallel.js";
import { confusionMatrix, type HeadTrainingOptions, type HeadTrainingResult } from "./head_training.js";
import type { PhaseProgress } from "./phases/progress.js";
import type { JobContext } from "./phases/setup.js";

/** The head phase's result and how many workers trained it. */
export type HeadOnWorkers = HeadTrainingResult & { workers: number };

/** The images of the job as an attempt names them: the data set and the frozen base (the job's extractor), and the augmentation. */
export function imageInputOf(ctx: JobContext): ImageInput {
  const { opts, extractor, dataset } = ctx;
  const round = roundId(cacheKey(extractor.fingerprint, dataset.fingerprint));
  return { frozen: toExtractionRound({ opts, extractor, datasetFingerprint: dataset.fingerprint, round }), augment: toAugmentation(augmentOf(opts)) };
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
  const run = await trainDataParallel(head, head, { train: encodeSampleList({ ids: train.map((s) => s.id), labels: Int32Array.from(train.map((s) => s.label)) }), val, trainSamples: train.length }, {
    nc, job: opts.job, log, metrics: ctx.metrics, model: opts.model, inputSize: opts.inputSize, featureLayer: opts.featureLayer, pooling: opts.pooling,
    fineTuneLayers: "0", learningRate: o.learningRate, seed: o.seed, batchSize: o.batchSize, epochs: o.epochs, numClasses, wireDtype: opts.wireDtype, workers, out: opts.out,
    checksumEvery: opts.checksumEvery, checkpointEvery: opts.checkpointEvery, stepTimeoutMs: opts.stepTimeoutMs, phase: "head", images: imageInputOf(ctx),
    onBatchProgress: progress.moveTo, onEpochEnd: progress.onEpochEnd,
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

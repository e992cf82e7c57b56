/**
 * The head phase: a dense classifier trained on the cached features (method 1), or frozen base +
 * head on augmented images (method 2, `--method augment`). Method 1 trains in this process unless the
 * workers are estimated to be faster (large caches, wide features: coordinator/head_placement.ts);
 * then data-parallel on them (coordinator/cached_rows_on_workers.ts). Method 2 runs the frozen base every step: with a cluster that trains (cluster.trainer) it trains
 * data-parallel on the workers (coordinator/augment_data_parallel.ts), else here.
 */
import type { FeatureSet } from "../../core/datasets/feature_store.js";
import { augmentOf } from "../../core/datasets/augment.js";
import { trainHeadWithAugmentation } from "../augment_training.js";
import { openImages, samplesOf } from "../../core/training/image_batches.js";
import { confusionMatrix, type HeadTrainingOptions, type HeadTrainingResult, trainHead } from "../head_training.js";
import { resultEpoch } from "../../core/training/train_loop.js";
import { splitInMemory } from "../../core/training/feature_batches.js";
import { trainHeadOnWorkers } from "../augment_data_parallel.js";
import { trainFeatureHeadOnWorkers } from "../cached_rows_on_workers.js";
import { headOnWorkers } from "../head_placement.js";
import type { JobCluster } from "../job.js";
import { type PhaseProgress, phaseProgress, round } from "./progress.js";
import type { JobContext } from "./setup.js";

/** The trained head, and how many workers trained it (1 = this process). */
export type HeadPhaseResult = HeadTrainingResult & { workers: number };

/** Trains the head on `features` (the job's extraction); method 2 on the cluster's workers when it trains data-parallel. */
export async function headPhase(ctx: JobContext, features: FeatureSet, cluster: Pick<JobCluster, "trainer" | "workers">): Promise<HeadPhaseResult> {
  const { opts, log, metrics } = ctx;
  const trainCount = features.splits.filter((s) => s === "train").length;
  const progress = phaseProgress("head", opts.epochs, Math.ceil(trainCount / opts.batchSize), log, metrics);
  const options: HeadTrainingOptions = {
    epochs: opts.epochs, batchSize: opts.batchSize, learningRate: opts.learningRate, units: opts.headUnits, dropout: opts.dropout, seed: opts.seed,
    streamOptions: { windowBytes: opts.shuffleBufferMib * 2 ** 20 },
    controls: ctx.controls, onBatchEnd: progress.onBatchEnd, onEpochEnd: progress.onEpochEnd,
  };
  progress.begin();
  const head = opts.method !== "augment" ? await cached(ctx, features, trainCount, options, cluster, progress) : await augmented(ctx, features, options, cluster, progress);
  progress.finish();
  metrics?.setEvaluation("head", "test", { loss: head.test.loss, accuracy: head.test.accuracy });
  log.info("head trained", { test_accuracy: round(head.test.accuracy), test_loss: round(head.test.loss), val_accuracy: round(head.val_accuracy), seconds: round(head.seconds, 2) });
  return head;
}

/** Method 1 here, or on the workers when they are estimated to be faster (coordinator/head_placement.ts). */
async function cached(ctx: JobContext, features: FeatureSet, trainRows: number, options: HeadTrainingOptions, cluster: Pick<JobCluster, "trainer" | "workers">, progress: PhaseProgress): Promise<HeadPhaseResult> {
  const { opts } = ctx;
  const job = { trainRows, featureDim: features.meta.featureDim, units: options.units, epochs: options.epochs, batchSize: options.batchSize, workers: cluster.workers };
  const place = headOnWorkers(opts, job);
  const estimate = place.estimate ? { estimated_seconds_here: round(place.estimate.here, 1), estimated_seconds_on_workers: round(place.estimate.workers, 1) } : {};
  ctx.log.info("head placement", { on_workers: place.workers && !!cluster.trainer, why: place.workers && !cluster.trainer ? "no training cluster" : place.why, ...estimate });
  if (!place.workers || !cluster.trainer) return { ...(await trainHead(features, options)), workers: 1 };
  return trainFeatureHeadOnWorkers(ctx, await cluster.trainer(), features, options, cluster.workers, progress);
}

/** Method 2 on the workers when the cluster trains data-parallel (the replicas apply the training controls); else here. */
async function augmented(ctx: JobContext, features: FeatureSet, options: HeadTrainingOptions, cluster: Pick<JobCluster, "trainer" | "workers">, progress: PhaseProgress): Promise<HeadPhaseResult> {
  if (!cluster.trainer) return { ...(await trainAugmented(ctx, features, options)), workers: 1 };
  return trainHeadOnWorkers(ctx, await cluster.trainer(), features, options, cluster.workers, progress);
}

/** Method 2: training images through the frozen base every step; validation and test on the cached features. */
async function trainAugmented(ctx: JobContext, features: FeatureSet, options: HeadTrainingOptions): Promise<HeadTrainingResult> {
  const { opts, dataset, extractor } = ctx;
  const numClasses = dataset.classes.length;
  const train = await openImages(dataset, samplesOf(dataset, features.ids, features.splits, "train"), opts.inputSize);
  ctx.log.info("augmentation", { images: train.labels.length, in_memory: train.inMemory, ...augmentOf(opts) });
  const r = await trainHeadWithAugmentation(
    { base: extractor, train, val: splitInMemory(features, "val"), test: splitInMemory(features, "test") },
    { ...options, numClasses, augment: augmentOf(opts), preprocessing: extractor.preprocessing },
  );
  const testY = splitInMemory(features, "test").y;
  return {
    head: r.head, history: r.history, seconds: r.seconds, val_accuracy: resultEpoch(r.history)?.val_accuracy ?? NaN,
    test: { loss: r.test.loss, accuracy: r.test.accuracy, samples: testY.length, confusion: confusionMatrix(testY, r.test.predictions, numClasses) },
  };
}

/**
 * The head phase: a dense classifier trained on the cached features (method 1), or frozen base +
 * head on augmented images (method 2, `--method augment`). It trains in this process even with
 * workers: on cached features it is the cheap part (bench/head: 54k rows of 96-d features in 50 s);
 * with augmentation the frozen base runs here too.
 */
import type { FeatureSet } from "../../core/datasets/feature_store.js";
import { augmentOf } from "../../core/datasets/augment.js";
import { trainHeadWithAugmentation } from "../augment_training.js";
import { openImages, samplesOf } from "../../core/training/image_batches.js";
import { confusionMatrix, type HeadTrainingOptions, type HeadTrainingResult, trainHead } from "../head_training.js";
import { resultEpoch } from "../../core/training/train_loop.js";
import { splitInMemory } from "../../core/training/feature_batches.js";
import { phaseProgress, round } from "./progress.js";
import type { JobContext } from "./setup.js";

/** Trains the head on `features` (the job's extraction); `dataParallel` only decides a warning. */
export async function headPhase(ctx: JobContext, features: FeatureSet, dataParallel: boolean): Promise<HeadTrainingResult> {
  const { opts, log, metrics } = ctx;
  const trainCount = features.splits.filter((s) => s === "train").length;
  const progress = phaseProgress("head", opts.epochs, Math.ceil(trainCount / opts.batchSize), log, metrics);
  const options: HeadTrainingOptions = {
    epochs: opts.epochs, batchSize: opts.batchSize, learningRate: opts.learningRate, units: opts.headUnits, dropout: opts.dropout, seed: opts.seed,
    controls: ctx.controls, onBatchEnd: progress.onBatchEnd, onEpochEnd: progress.onEpochEnd,
  };
  if (dataParallel && opts.method === "augment")
    log.warn("--method augment trains in the coordinator process, not on the workers (data-parallel training covers fine-tuning on cached activations): drop --method augment to train across the workers");
  progress.begin();
  const head = opts.method === "augment" ? await trainAugmented(ctx, features, options) : await trainHead(features, options);
  progress.finish();
  metrics?.setEvaluation("head", "test", { loss: head.test.loss, accuracy: head.test.accuracy });
  log.info("head trained", { test_accuracy: round(head.test.accuracy), test_loss: round(head.test.loss), val_accuracy: round(head.val_accuracy), seconds: round(head.seconds, 2) });
  return head;
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

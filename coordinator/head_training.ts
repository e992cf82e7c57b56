/**
 * Method 1 of the recipe: a dense head trained on cached features (no augmentation), validated
 * every epoch, tested once at the end. The features are streamed from the cache entry
 * (core/training/feature_batches.ts): training, validation and test hold a bounded window of rows,
 * not the split, so the head phase's memory does not grow with the data set.
 */
import * as tf from "@tensorflow/tfjs";
import type { FeatureSet } from "../core/datasets/feature_store.js";
import { buildHead } from "../core/models/head.js";
import { evaluateSplit, featureBatches, splitInMemory, splitLabels, type StreamOptions } from "../core/training/feature_batches.js";
import { type EpochStats, evaluate, fit, type FitOptions, resultEpoch, type TrainingControls } from "../core/training/train_loop.js";

export interface HeadTrainingOptions {
  epochs: number;
  batchSize: number;
  learningRate: number;
  units: number;
  dropout: number;
  seed: number;
  /** Early stopping, best weights, schedule, class weights, label smoothing. Default: none. */
  controls?: TrainingControls;
  onBatchEnd?: FitOptions["onBatchEnd"];
  onEpochEnd?: FitOptions["onEpochEnd"];
  /**
   * Read the features from the cache by block, shuffled by block and within a window (default
   * true); false copies each split into memory and shuffles uniformly (the path before streaming,
   * kept for comparison: bench/head.ts).
   */
  stream?: boolean;
  /** Block and window sizes of the stream. Default: core/training/feature_batches.ts's. */
  streamOptions?: Omit<StreamOptions, "seed">;
}

export interface HeadTrainingResult {
  head: tf.LayersModel;
  history: EpochStats[];
  test: { loss: number; accuracy: number; samples: number; confusion: number[][] };
  val_accuracy: number;
  seconds: number;
}

/** confusion[true][predicted] counts. */
export function confusionMatrix(labels: Int32Array, predictions: Int32Array, numClasses: number): number[][] {
  const m = Array.from({ length: numClasses }, () => new Array<number>(numClasses).fill(0));
  for (let i = 0; i < labels.length; i++) m[labels[i]][predictions[i]]++;
  return m;
}

/** Trains a fresh head on the entry's train split; validation each epoch, test at the end (all streamed unless `stream: false`). */
export async function trainHead(set: FeatureSet, o: HeadTrainingOptions): Promise<HeadTrainingResult> {
  const t0 = performance.now();
  const numClasses = set.meta.classes.length;
  const head = buildHead({ featureDim: set.meta.featureDim, numClasses, units: o.units, dropout: o.dropout, seed: o.seed });
  const optimizer = tf.train.adam(o.learningRate);
  const fitOptions: FitOptions = { epochs: o.epochs, batchSize: o.batchSize, seed: o.seed, numClasses, optimizer, controls: o.controls, onBatchEnd: o.onBatchEnd, onEpochEnd: o.onEpochEnd };
  let history: EpochStats[];
  try {
    history = o.stream === false
      ? await fit(head, splitInMemory(set, "train"), { ...fitOptions, validation: splitInMemory(set, "val") })
      : await fit(head, featureBatches(set, "train", numClasses, { seed: o.seed, validation: "val", ...o.streamOptions }), fitOptions);
  } finally {
    optimizer.dispose();
  }
  const testLabels = splitLabels(set, "test");
  const ev = o.stream === false ? evaluate(head, splitInMemory(set, "test"), numClasses) : await evaluateSplit(head, set, "test", numClasses);
  return {
    head,
    history,
    test: { loss: ev.loss, accuracy: ev.accuracy, samples: testLabels.length, confusion: confusionMatrix(testLabels, ev.predictions, numClasses) },
    val_accuracy: resultEpoch(history)?.val_accuracy ?? NaN,
    seconds: (performance.now() - t0) / 1000,
  };
}

/**
 * Method 1 of the recipe: a dense head trained on cached features (no augmentation), validated
 * every epoch, tested once at the end.
 */
import * as tf from "@tensorflow/tfjs";
import type { Split } from "../core/datasets/types.js";
import type { FeatureSet } from "../core/datasets/feature_store.js";
import { buildHead } from "../core/models/head.js";
import { type ArrayData, type EpochStats, evaluate, fit, type FitOptions, type TrainingControls } from "../core/training/train_loop.js";

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
}

export interface HeadTrainingResult {
  head: tf.LayersModel;
  history: EpochStats[];
  test: { loss: number; accuracy: number; samples: number; confusion: number[][] };
  val_accuracy: number;
  seconds: number;
}

/** The rows of one split as training data. */
export function splitData(set: FeatureSet, split: Split): ArrayData {
  const dim = set.meta.featureDim;
  const rows: number[] = [];
  set.splits.forEach((s, i) => { if (s === split) rows.push(i); });
  const x = new Float32Array(rows.length * dim);
  const y = new Int32Array(rows.length);
  rows.forEach((r, i) => {
    x.set(set.features.subarray(r * dim, (r + 1) * dim), i * dim);
    y[i] = set.labels[r];
  });
  return { x, sampleShape: [dim], y };
}

/** The epoch whose weights a phase ended with: the best one when best weights were restored, else the last. */
export function resultEpoch(history: EpochStats[]): EpochStats | undefined {
  return history.find((h) => h.best) ?? history.at(-1);
}

/** confusion[true][predicted] counts. */
export function confusionMatrix(labels: Int32Array, predictions: Int32Array, numClasses: number): number[][] {
  const m = Array.from({ length: numClasses }, () => new Array<number>(numClasses).fill(0));
  for (let i = 0; i < labels.length; i++) m[labels[i]][predictions[i]]++;
  return m;
}

export async function trainHead(set: FeatureSet, o: HeadTrainingOptions): Promise<HeadTrainingResult> {
  const t0 = performance.now();
  const numClasses = set.meta.classes.length;
  const train = splitData(set, "train");
  const val = splitData(set, "val");
  const test = splitData(set, "test");
  const head = buildHead({ featureDim: set.meta.featureDim, numClasses, units: o.units, dropout: o.dropout, seed: o.seed });
  const optimizer = tf.train.adam(o.learningRate);
  const history = await fit(head, train, {
    epochs: o.epochs,
    batchSize: o.batchSize,
    seed: o.seed,
    numClasses,
    optimizer,
    validation: val,
    controls: o.controls,
    onBatchEnd: o.onBatchEnd,
    onEpochEnd: o.onEpochEnd,
  });
  optimizer.dispose();
  const ev = evaluate(head, test, numClasses);
  return {
    head,
    history,
    test: { loss: ev.loss, accuracy: ev.accuracy, samples: test.y.length, confusion: confusionMatrix(test.y, ev.predictions, numClasses) },
    val_accuracy: resultEpoch(history)?.val_accuracy ?? NaN,
    seconds: (performance.now() - t0) / 1000,
  };
}

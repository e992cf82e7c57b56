/**
 * Method 2 of the recipe: frozen base + head trained end to end on augmented images. The images
 * reach the one training loop (train_loop's fit) as a BatchSource (core/training/image_batches.ts:
 * decode, augment, frozen forward per batch); validation and test run on the cached features.
 */
import * as tf from "@tensorflow/tfjs";
import type { AugmentOptions } from "../core/datasets/augment.js";
import { freezeAll } from "../core/models/model_split.js";
import { buildHead } from "../core/models/head.js";
import type { Preprocessing } from "../core/models/model_zoo.js";
import type { HeadTrainingOptions } from "./head_training.js";
import { type ArrayData, type EpochStats, type Evaluation, evaluate, fit, type FitOptions, type GradientHook, sparseCrossEntropy, type TrainingControls } from "../core/training/train_loop.js";
import { type FrozenStage, imageBatches, type ImageSource } from "../core/training/image_batches.js";

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

/** fit() over {@link imageBatches}: kept for callers that pass image options and fit options together. */
export async function fitImages(model: tf.LayersModel, train: ImageSource, o: ImageFitOptions): Promise<EpochStats[]> {
  const { preprocessing, augment, validate, frozen, ...rest } = o;
  return fit(model, imageBatches(train, { seed: o.seed, preprocessing, augment, frozen, validate }), rest);
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
    const batches = imageBatches(d.train, { seed: o.seed, preprocessing: o.preprocessing, augment: o.augment, frozen: d.base, validate: async () => evaluate(head, d.val, o.numClasses) });
    const history = await fit(head, batches, {
      epochs: o.epochs, batchSize: o.batchSize, seed: o.seed, numClasses: o.numClasses, optimizer,
      gradientHook: o.gradientHook, controls: o.controls, onBatchEnd: o.onBatchEnd, onEpochEnd: o.onEpochEnd,
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

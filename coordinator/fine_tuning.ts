/**
 * Fine-tuning phase: the top layers of the base (core/models/model_split.ts decides which) train together
 * with the already trained head -- never a fresh one -- at a low learning rate; BatchNorm stays
 * frozen and in inference mode.
 *
 * Two data paths:
 * - no augmentation: the frozen bottom's output (the activation at the cut) is computed once and
 *   kept in the feature cache (same FeatureCache, its own key: cut layer, pooling `none`,
 *   featureShape [h, w, c]); each epoch trains "top + head" on it with train_loop's fit(), streamed
 *   from the entry by block as the head is (core/training/feature_batches.ts), so the frozen part
 *   never runs again, not even in a second run, and no split is held in memory.
 * - augmentation: images change every step, so the frozen bottom runs in every step
 *   (augment_training's fitImages), validation/test on the un-augmented images.
 *
 * Both take an optional gradientHook: the data-parallel driver calls this same code and averages
 * the gradients there.
 */
import * as tf from "@tensorflow/tfjs";
import type { AugmentOptions } from "../core/datasets/augment.js";
import type { Pooling } from "../core/runtime/config.js";
import { buildFeatureExtractor, type FeatureExtractor } from "../core/models/feature_model.js";
import type { FeatureSet } from "../core/datasets/feature_store.js";
import { fineTuneModel, type SplitBase } from "../core/models/model_split.js";
import type { Preprocessing, PretrainedSource } from "../core/models/model_zoo.js";
import type { EngineOptions } from "../core/models/inference_engine.js";
import { type ArrayData, type EpochStats, type Evaluation, evaluate, fit, type FitOptions, type GradientHook, resultEpoch, type TrainingControls } from "../core/training/train_loop.js";
import { evaluateSplit, featureBatches, splitLabels, type StreamOptions } from "../core/training/feature_batches.js";
import { fitImages } from "./augment_training.js";
import { evaluateImages, type FrozenStage, type ImageSource } from "../core/training/image_batches.js";
import { confusionMatrix } from "./head_training.js";

/**
 * Data of the fine-tuning phase: cached activations at the cut -- the cache entry, streamed by block
 * (`activation_set`: what a job uses; memory is the shuffle buffer) or splits in memory -- or images
 * (augmentation on).
 */
export type FineTuneData =
  | { kind: "activation_set"; set: FeatureSet; stream?: Omit<StreamOptions, "seed"> }
  | { kind: "activations"; train: ArrayData; val: ArrayData; test: ArrayData }
  | { kind: "images"; train: ImageSource; val: ImageSource; test: ImageSource };

export interface FineTuneOptions {
  epochs: number;
  batchSize: number;
  /** Default in the job options: 1e-5. */
  learningRate: number;
  seed: number;
  numClasses: number;
  /** The pooling the head was trained behind (avg, max, none = flatten). */
  pooling: Pooling;
  preprocessing: Preprocessing;
  /** Required with `images` data; null = none. */
  augment: AugmentOptions | null;
  /**
   * With `images` data: the frozen bottom on the inference engine (the activation extractor at the
   * cut); then only top + head run in tfjs. Absent: bottom + top + head all run in tfjs.
   */
  frozen?: FrozenStage;
  gradientHook?: GradientHook;
  /** Early stopping, best weights, schedule, class weights, label smoothing. Default: none. */
  controls?: TrainingControls;
  onBatchEnd?: FitOptions["onBatchEnd"];
  onEpochEnd?: FitOptions["onEpochEnd"];
  signal?: AbortSignal;
}

export interface FineTuneResult {
  /** The model that trained: (bottom +) top + pooling + head; shares weights with split.top and head. */
  model: tf.LayersModel;
  history: EpochStats[];
  test: { loss: number; accuracy: number; samples: number; confusion: number[][] };
  /** Validation loss of the model before the first step (= the head phase's end, checked by tests). */
  val_loss_before: number;
  val_accuracy: number;
  seconds: number;
}

/** The extractor whose features are the activations at the cut (pooling none: [h, w, c] rows). */
export function activationExtractor(source: PretrainedSource, inputSize: number, cutLayer: string, engine: EngineOptions = {}): Promise<FeatureExtractor> {
  return buildFeatureExtractor(source, { inputSize, featureLayer: cutLayer, pooling: "none", ...engine });
}

/** Fine-tunes `split.top` and `head` in place. */
export async function fineTune(split: SplitBase, head: tf.LayersModel, data: FineTuneData, o: FineTuneOptions): Promise<FineTuneResult> {
  if (!(o.epochs >= 1)) throw new RangeError(`fineTune: epochs must be >= 1, got ${o.epochs}`);
  const t0 = performance.now();
  const model = fineTuneModel(split, head, o.pooling, data.kind === "images" && !o.frozen);
  const optimizer = tf.train.adam(o.learningRate);
  try {
    let history: EpochStats[];
    let valBefore: Evaluation;
    let test: Evaluation;
    let testLabels: Int32Array;
    if (data.kind === "activation_set") {
      const shape = data.set.meta.featureShape;
      valBefore = await evaluateSplit(model, data.set, "val", o.numClasses, shape);
      history = await fit(model, featureBatches(data.set, "train", o.numClasses, { seed: o.seed, validation: "val", sampleShape: shape, ...data.stream }), {
        epochs: o.epochs, batchSize: o.batchSize, seed: o.seed, numClasses: o.numClasses, optimizer,
        gradientHook: o.gradientHook, controls: o.controls, onBatchEnd: o.onBatchEnd, onEpochEnd: o.onEpochEnd, signal: o.signal,
      });
      test = await evaluateSplit(model, data.set, "test", o.numClasses, shape);
      testLabels = splitLabels(data.set, "test");
    } else if (data.kind === "activations") {
      valBefore = evaluate(model, data.val, o.numClasses);
      history = await fit(model, data.train, {
        epochs: o.epochs, batchSize: o.batchSize, seed: o.seed, numClasses: o.numClasses, optimizer, validation: data.val,
        gradientHook: o.gradientHook, controls: o.controls, onBatchEnd: o.onBatchEnd, onEpochEnd: o.onEpochEnd, signal: o.signal,
      });
      test = evaluate(model, data.test, o.numClasses);
      testLabels = data.test.y;
    } else {
      if (!o.augment) throw new RangeError("fineTune: image data needs augmentation options (use cached activations otherwise)");
      const validate = () => evaluateImages(model, data.val, o.preprocessing, o.numClasses, 64, o.frozen);
      valBefore = await validate();
      history = await fitImages(model, data.train, {
        epochs: o.epochs, batchSize: o.batchSize, seed: o.seed, numClasses: o.numClasses, optimizer, preprocessing: o.preprocessing,
        augment: o.augment, validate, frozen: o.frozen, gradientHook: o.gradientHook, controls: o.controls, onBatchEnd: o.onBatchEnd, onEpochEnd: o.onEpochEnd, signal: o.signal,
      });
      test = await evaluateImages(model, data.test, o.preprocessing, o.numClasses, 64, o.frozen);
      testLabels = data.test.labels;
    }
    return {
      model, history,
      test: { loss: test.loss, accuracy: test.accuracy, samples: testLabels.length, confusion: confusionMatrix(testLabels, test.predictions, o.numClasses) },
      val_loss_before: valBefore.loss,
      val_accuracy: resultEpoch(history)?.val_accuracy ?? NaN,
      seconds: (performance.now() - t0) / 1000,
    };
  } finally {
    optimizer.dispose();
  }
}

/**
 * The dense classifier trained on top of the frozen base (Keras' recipe: Dense 256 relu,
 * Dropout 0.5, Dense softmax), and the composition of base + head into the one model a run exports.
 *
 * The dropout is SampleDropout (sample_dropout.ts): its training mask is a function of (seed,
 * epoch, global sample index), so data-parallel workers drop what one process drops; it is saved
 * as Keras' Dropout.
 */
import * as tf from "@tensorflow/tfjs";
import { sampleDropout } from "./sample_dropout.js";

export interface HeadOptions {
  /** Length of the input feature vector (ignored when `inputShape` is given). */
  featureDim: number;
  /** Per-sample input shape; default [featureDim]. A 3-d shape gets global average pooling first. */
  inputShape?: number[];
  numClasses: number;
  /** Hidden units. Default 256. */
  units?: number;
  /** Dropout rate. Default 0.5. */
  dropout?: number;
  /** Seed of the initializers (and part of the dropout layer's mask stream; the masks' run seed is fit's). */
  seed: number;
}

/** A fresh head. Layer names are fixed so that weights can be matched by name across processes. */
export function buildHead(o: HeadOptions): tf.LayersModel {
  const inputShape = o.inputShape ?? [o.featureDim];
  const input = tf.input({ shape: inputShape, name: "head_input" });
  let x: tf.SymbolicTensor = input;
  if (inputShape.length === 3) x = tf.layers.globalAveragePooling2d({ name: "head_pool" }).apply(x) as tf.SymbolicTensor;
  else if (inputShape.length !== 1) x = tf.layers.flatten({ name: "head_flatten" }).apply(x) as tf.SymbolicTensor;
  x = tf.layers.dense({ units: o.units ?? 256, activation: "relu", name: "head_dense", kernelInitializer: tf.initializers.glorotUniform({ seed: o.seed }) }).apply(x) as tf.SymbolicTensor;
  x = sampleDropout({ rate: o.dropout ?? 0.5, seed: o.seed + 1, name: "head_dropout" }).apply(x) as tf.SymbolicTensor;
  const out = tf.layers.dense({ units: o.numClasses, activation: "softmax", name: "head_out", kernelInitializer: tf.initializers.glorotUniform({ seed: o.seed + 2 }) }).apply(x) as tf.SymbolicTensor;
  return tf.model({ inputs: input, outputs: out, name: "ctrain_head" });
}

/** What a saved classifier needs besides its weights; stored in model.json's userDefinedMetadata.ctrain. */
export interface ClassifierMetadata {
  classes: string[];
  inputSize: number;
  preprocessing: string;
  baseModel: string;
  featureLayer: string;
  pooling: string;
  job: string;
}

/** base (image -> feature) followed by head (feature -> class probabilities), sharing their weights. */
export function composeClassifier(base: tf.LayersModel, head: tf.LayersModel, meta: ClassifierMetadata): tf.LayersModel {
  const out = head.apply(base.outputs[0]) as tf.SymbolicTensor;
  const model = tf.model({ inputs: base.inputs, outputs: out, name: "ctrain_classifier" });
  model.setUserDefinedMetadata({ ctrain: meta as unknown as Record<string, unknown> } as unknown as {});
  return model;
}

/** The data, model and schedule shared by the data-parallel equivalence test and its worker processes. */
import * as tf from "@tensorflow/tfjs";
import { buildHead } from "../../core/models/head.js";
import { Rng } from "../../core/runtime/rng.js";
import type { ArrayData } from "../../core/training/train_loop.js";

export interface DpFitArgs {
  url: string;
  job: string;
  self: string;
  members: string[];
  /** Instead of the head: fit the small conv model of {@link dpConvModel} on wasm once per training-set size. */
  sweep?: { sizes: number[] };
}

/** The conv sweep: batches of 4, one epoch, so sizes 1..12 give every short last batch for N = 2 and 3. */
export const DP_CONV = { side: 3, channels: 4, classes: 3, batchSize: 4, seed: 3, learningRate: 0.1 } as const;

/** `n` seeded samples of DP_CONV's shape. */
export function dpConvData(n: number): ArrayData {
  const { side, channels, classes } = DP_CONV;
  const rng = new Rng(91 + n);
  const x = Float32Array.from({ length: n * side * side * channels }, () => rng.next() - 0.5);
  return { x, sampleShape: [side, side, channels], y: Int32Array.from({ length: n }, (_, i) => i % classes) };
}

/** A trainable 1x1 conv, pooled, then softmax (the kernels of a fine-tuned top block on wasm). */
export function dpConvModel(): tf.LayersModel {
  const { side, channels, classes } = DP_CONV;
  const inp = tf.input({ shape: [side, side, channels] });
  let h = tf.layers.conv2d({ filters: 5, kernelSize: 1, kernelInitializer: tf.initializers.glorotUniform({ seed: 1 }) }).apply(inp) as tf.SymbolicTensor;
  h = tf.layers.globalAveragePooling2d({}).apply(h) as tf.SymbolicTensor;
  const out = tf.layers.dense({ units: classes, activation: "softmax", kernelInitializer: tf.initializers.glorotUniform({ seed: 2 }) }).apply(h) as tf.SymbolicTensor;
  return tf.model({ inputs: inp, outputs: out });
}

/** 62 samples in batches of 10: the last batch has 2, so with 3 workers one gets none. */
export const DP_SETUP = { samples: 62, dim: 6, classes: 3, units: 8, batchSize: 10, epochs: 2, seed: 11, learningRate: 0.2 } as const;

/** Three noisy blobs in DP_SETUP.dim dimensions, seeded. */
export function dpData(): ArrayData {
  const { samples, dim, classes } = DP_SETUP;
  const rng = new Rng(77);
  const x = new Float32Array(samples * dim);
  const y = new Int32Array(samples);
  for (let i = 0; i < samples; i++) {
    y[i] = i % classes;
    for (let d = 0; d < dim; d++) x[i * dim + d] = (d % classes === y[i] ? 1.5 : 0) + (rng.next() - 0.5);
  }
  return { x, sampleShape: [dim], y };
}

/** The head every replica starts from (seeded initializers, no dropout so replicas stay comparable). */
export function dpModel(): tf.LayersModel {
  return buildHead({ featureDim: DP_SETUP.dim, numClasses: DP_SETUP.classes, units: DP_SETUP.units, dropout: 0, seed: 5 });
}

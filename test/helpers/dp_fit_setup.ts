/** The data, model and schedule shared by the data-parallel equivalence test and its worker processes. */
import * as tf from "@tensorflow/tfjs";
import { buildHead } from "../../core/head.js";
import { Rng } from "../../core/rng.js";
import type { ArrayData } from "../../core/train_loop.js";

export interface DpFitArgs {
  url: string;
  job: string;
  self: string;
  members: string[];
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

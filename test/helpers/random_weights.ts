/** Seeded weights for every layer of a test model: kernels uniform with variance gain/fan-in, BatchNorm statistics away from 0/1. */
import * as tf from "@tensorflow/tfjs";
import { Rng } from "../../core/runtime/rng.js";

export function randomizeWeights(model: tf.LayersModel, seed: number, o: { kernelGain?: number; biasRange?: number } = {}): void {
  const rng = new Rng(seed);
  const uniform = (n: number, lo: number, hi: number): Float32Array => Float32Array.from({ length: n }, () => lo + (hi - lo) * rng.next());
  const gain = o.kernelGain ?? 3, bias = o.biasRange ?? 0.5;
  for (const layer of model.layers) {
    const values = layer.weights.map((w) => {
      const shape = w.shape as number[];
      const n = shape.reduce((a, b) => a * b, 1);
      const name = w.originalName;
      if (/variance|gamma/.test(name)) return tf.tensor(uniform(n, 0.5, 1.5), shape);
      if (/bias|beta|moving_mean|alpha/.test(name)) return tf.tensor(uniform(n, -bias, bias), shape);
      const a = Math.sqrt(gain / (shape.length > 1 ? n / shape[shape.length - 1] : 1));
      return tf.tensor(uniform(n, -a, a), shape);
    });
    if (values.length) layer.setWeights(values);
    values.forEach((v) => v.dispose());
  }
}

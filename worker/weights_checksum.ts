/**
 * Replica consistency check: every K steps each data-parallel worker publishes a WeightsChecksum of its
 * trainable weights, and the coordinator compares them. Replicas that apply the same averaged gradient
 * to the same weights hold bit-identical values, so a CRC-32 over the float bytes is exact; the sum is
 * a diagnostic that tells "a few ulps apart" (a backend difference) from "diverged" (a missed step).
 *
 * The order is the model's trainable-weight order (as trainer.proto says), which is the same on every
 * replica of one architecture even when tfjs gave the layers different names in different processes.
 */
import * as tf from "@tensorflow/tfjs";
import { crc32 } from "../proto/checksum.js";
import { float32ToBytes } from "../proto/tensor_codec.js";

/** The WeightsChecksum fields computed from a model (without header and worker). */
export interface WeightsDigest {
  /** CRC-32 (IEEE) of all trainable weights as float32 little-endian bytes, in model order. */
  checksum: number;
  /** Number of trainable parameters. */
  parameterCount: number;
  /** Sum of all trainable parameters (float64 accumulation). */
  sum: number;
}

/** Digest of `model`'s trainable weights (or of all weights with `trainableOnly: false`). */
export function weightsChecksum(model: tf.LayersModel, opts: { trainableOnly?: boolean } = {}): WeightsDigest {
  const weights = (opts.trainableOnly ?? true) ? model.trainableWeights : model.weights;
  let crc = 0;
  let parameterCount = 0;
  let sum = 0;
  for (const w of weights) {
    const values = w.read().dataSync();
    const f = values instanceof Float32Array ? values : Float32Array.from(values);
    crc = crc32(float32ToBytes(f), crc);
    parameterCount += f.length;
    for (let i = 0; i < f.length; i++) sum += f[i]!;
  }
  return { checksum: crc, parameterCount, sum };
}

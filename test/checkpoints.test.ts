/**
 * Training-state checkpoints (core/training/checkpoints.ts): a state captured mid-training and restored
 * into a fresh model and optimizer continues bit for bit like the original. That is what lets a joiner
 * take member 0's place among identical replicas, and a resumed run follow the uninterrupted one.
 */
import assert from "node:assert/strict";
import { describe, test } from "node:test";
import * as tf from "@tensorflow/tfjs";
import { captureState, decodeState, encodeState, restoreState } from "../core/training/checkpoints.js";
import { Rng } from "../core/runtime/rng.js";

function model(): tf.LayersModel {
  const m = tf.sequential();
  m.add(tf.layers.dense({ inputShape: [6], units: 8, activation: "relu", kernelInitializer: tf.initializers.glorotUniform({ seed: 1 }) }));
  m.add(tf.layers.dense({ units: 3, activation: "softmax", kernelInitializer: tf.initializers.glorotUniform({ seed: 2 }) }));
  return m;
}

function batches(n: number): { x: tf.Tensor2D; y: tf.Tensor2D }[] {
  const rng = new Rng(5);
  const rnd = (): number => rng.next();
  return Array.from({ length: n }, () => {
    const x = Array.from({ length: 16 * 6 }, () => rnd() * 2 - 1);
    const labels = Array.from({ length: 16 }, () => Math.floor(rnd() * 3));
    return { x: tf.tensor2d(x, [16, 6]), y: tf.oneHot(tf.tensor1d(labels, "int32"), 3).toFloat() as tf.Tensor2D };
  });
}

function step(m: tf.LayersModel, opt: tf.Optimizer, b: { x: tf.Tensor2D; y: tf.Tensor2D }): void {
  opt.minimize(() => tf.losses.softmaxCrossEntropy(b.y, m.apply(b.x) as tf.Tensor2D) as tf.Scalar, false, m.trainableWeights.map((w) => w.read() as tf.Variable));
}

const flat = (m: tf.LayersModel): Float32Array => Float32Array.from(m.getWeights().flatMap((w) => Array.from(w.dataSync())));

describe("checkpoints", () => {
  test("checkpoints - Adam restored from a checkpoint continues bit-identically to the original", async () => {
    await tf.setBackend("cpu");
    const data = batches(40);
    const a = model();
    const optA = tf.train.adam(1e-2);
    for (const b of data.slice(0, 25)) step(a, optA, b);
    const state = decodeState(encodeState(await captureState(a, optA, { epoch: 1, batch: 5, step: 25 })));
    assert.ok(state.adamAccBeta, "Adam's beta^t is part of the state");
    const b = model();
    const optB = tf.train.adam(1e-2);
    await restoreState(b, optB, state);
    assert.deepEqual(flat(b), flat(a), "restored weights");
    for (const x of data.slice(25)) {
      step(a, optA, x);
      step(b, optB, x);
    }
    const wa = flat(a);
    const wb = flat(b);
    let diff = 0;
    for (let i = 0; i < wa.length; i++) diff = Math.max(diff, Math.abs(wa[i]! - wb[i]!));
    assert.equal(diff, 0, `15 steps after the restore the replicas differ by up to ${diff}`);
  });
});

/**
 * Augmentation and method 2 (frozen base + head on augmented images), on the wasm backend: the
 * transforms are seeded and do what they say, the ops run on wasm, the base's weights (BatchNorm
 * statistics included) never change, and steps do not leak tensors. Real MobileNetV2 and a few
 * hundred real Fashion-MNIST images at input 64.
 */
import assert from "node:assert/strict";
import { existsSync } from "node:fs";
import { before, test } from "node:test";
import * as tf from "@tensorflow/tfjs";
import { type AugmentOptions, augmentBatch, FILL_MODES, resolveAugment, transformMatrices } from "../core/datasets/augment.js";
import { selectBackend } from "../core/models/backend.js";
import { FASHION_MNIST_DIR, openDataset } from "../core/datasets/open.js";
import { ConfigError } from "../core/runtime/errors.js";
import { buildFeatureExtractor } from "../core/models/feature_model.js";
import { loadPretrained } from "../core/models/model_zoo.js";
import { fitImages, trainHeadWithAugmentation } from "../coordinator/augment_training.js";
import { openImages } from "../core/training/image_batches.js";

const skip = existsSync(FASHION_MNIST_DIR) ? false : `${FASHION_MNIST_DIR} missing (apt-get install dataset-fashion-mnist)`;
const NONE: AugmentOptions = resolveAugment({ flip: false, rotation: 0, zoom: 0, translation: 0 });

before(async () => {
  await selectBackend("wasm");
});

/** A 2 x 8 x 8 x 3 batch with a left-right gradient (so a flip is visible). */
function ramp(): tf.Tensor4D {
  const v = new Float32Array(2 * 8 * 8 * 3);
  for (let i = 0; i < v.length; i++) v[i] = ((i / 3) % 8) * 30 + (i % 3);
  return tf.tensor4d(v, [2, 8, 8, 3]);
}

test("augment - options are validated and defaulted", () => {
  const d = resolveAugment();
  assert.equal(d.flip, true);
  assert.equal(d.fillMode, "reflect");
  assert.throws(() => resolveAugment({ zoom: 2 }), ConfigError);
  assert.throws(() => resolveAugment({ rotation: -0.1 }), ConfigError);
  assert.throws(() => resolveAugment({ fillMode: "mirror" as never }), ConfigError);
});

const iota = (from: number, n: number): Int32Array => Int32Array.from({ length: n }, (_, i) => from + i);

test("augment - an image's transform depends on (seed, epoch, sample) only, not on its batch or row", () => {
  const o = resolveAugment();
  const a = transformMatrices({ seed: 42, epoch: 3, index: iota(100, 16) }, 64, 64, o);
  assert.deepEqual(a, transformMatrices({ seed: 42, epoch: 3, index: iota(100, 16) }, 64, 64, o));
  // The second half of the batch on its own (a data-parallel worker's part), and the batch reversed.
  assert.deepEqual(transformMatrices({ seed: 42, epoch: 3, index: iota(108, 8) }, 64, 64, o), a.subarray(8 * 8));
  const reversed = transformMatrices({ seed: 42, epoch: 3, index: iota(100, 16).reverse() }, 64, 64, o);
  for (let i = 0; i < 16; i++) assert.deepEqual(reversed.subarray(i * 8, i * 8 + 8), a.subarray((15 - i) * 8, (16 - i) * 8));
  // Another epoch, seed or sample draws anew.
  const rows = (m: Float32Array): string[] => Array.from({ length: m.length / 8 }, (_, i) => m.subarray(i * 8, i * 8 + 8).join());
  const distinct = new Set([...rows(a), ...rows(transformMatrices({ seed: 42, epoch: 4, index: iota(100, 16) }, 64, 64, o)), ...rows(transformMatrices({ seed: 43, epoch: 3, index: iota(100, 16) }, 64, 64, o))]);
  assert.equal(distinct.size, 48, "48 different transforms");
});

test("augment - no-op options leave pixels unchanged and a flip mirrors them exactly", () => {
  const x = ramp();
  const keys = { seed: 2, epoch: 0, index: iota(0, 2) };
  const same = augmentBatch(x, NONE, keys);
  assert.deepEqual(Array.from(same.dataSync()), Array.from(x.dataSync()));
  // Flip only: every image is either itself or its mirror image, and a fixed seed flips some.
  const flipped = augmentBatch(x, { ...NONE, flip: true }, keys);
  const mirror = tf.image.flipLeftRight(x);
  const ref = transformMatrices(keys, 8, 8, { ...NONE, flip: true });
  for (let i = 0; i < 2; i++) {
    const got = Array.from(flipped.slice([i], [1]).dataSync());
    const want = Array.from((ref[i * 8] < 0 ? mirror : x).slice([i], [1]).dataSync());
    for (let j = 0; j < got.length; j++) assert.ok(Math.abs(got[j] - want[j]) < 1e-3, `image ${i} pixel ${j}: ${got[j]} vs ${want[j]}`);
  }
  tf.dispose([x, same, flipped, mirror]);
});

test("augment - rotation, zoom and translation run on wasm with every fill mode", () => {
  assert.equal(tf.getBackend(), "wasm");
  const x = ramp();
  for (const fillMode of FILL_MODES) {
    const before = tf.memory().numTensors;
    const y = augmentBatch(x, resolveAugment({ rotation: 0.1, zoom: 0.2, translation: 0.2, fillMode }), { seed: 9, epoch: 0, index: iota(0, 2) });
    assert.deepEqual(y.shape, x.shape);
    assert.equal(y.dtype, "float32");
    const v = y.dataSync();
    assert.ok(v.every(Number.isFinite));
    assert.notDeepEqual(Array.from(v), Array.from(x.dataSync()), `${fillMode}: the images changed`);
    y.dispose();
    assert.equal(tf.memory().numTensors, before, "only the result is left allocated");
  }
  x.dispose();
});

test("augment - method 2 trains only the head: base weights untouched, no tensors leak", { skip }, async () => {
  const dataset = await openDataset("fashion-mnist", { seed: 42, valSplit: 0.1, testSplit: 0.1, limit: 120, maxPixels: 40_000_000 });
  const source = await loadPretrained("mobilenet_v2");
  const extractor = await buildFeatureExtractor(source, { inputSize: 64, featureLayer: "block_12_add", pooling: "avg" });
  const train = await openImages(dataset, dataset.samples.filter((s) => s.split === "train"), 64);
  assert.ok(train.inMemory, "a small set is decoded once into memory");
  const val = { x: new Float32Array(4 * 96), sampleShape: [96], y: Int32Array.from([0, 1, 2, 3]) };
  const baseBefore = extractor.model.weights.map((w) => (w.read().dataSync() as Float32Array).slice());
  const counts: number[] = [];
  const r = await trainHeadWithAugmentation(
    { base: extractor, train, val, test: val },
    {
      epochs: 2, batchSize: 16, learningRate: 1e-3, units: 32, dropout: 0.2, seed: 7, numClasses: dataset.classes.length,
      augment: resolveAugment(), preprocessing: extractor.preprocessing,
      onBatchEnd: () => { counts.push(tf.memory().numTensors); },
    },
  );
  assert.equal(extractor.model.trainableWeights.length, 0, "the base has no trainable weight");
  assert.deepEqual(r.model!.trainableWeights.map((w) => w.originalName ?? w.name).sort(), r.head.trainableWeights.map((w) => w.originalName ?? w.name).sort(), "only the head's weights train");
  extractor.model.weights.forEach((w, i) => {
    const now = w.read().dataSync() as Float32Array;
    assert.ok(Buffer.compare(Buffer.from(now.buffer, now.byteOffset, now.byteLength), Buffer.from(baseBefore[i].buffer)) === 0, `base weight ${w.name} changed`);
  });
  assert.ok(r.history[1].loss < r.history[0].loss * 1.5, "training ran");
  assert.equal(counts.at(-1), counts[1], `numTensors after each step: ${counts.join(", ")}`);
});

test("augment - fitImages is reproducible: the same seed gives the same losses", { skip }, async () => {
  const dataset = await openDataset("fashion-mnist", { seed: 1, valSplit: 0.1, testSplit: 0.1, limit: 40, maxPixels: 40_000_000 });
  const train = await openImages(dataset, dataset.samples.filter((s) => s.split === "train"), 32, 0);
  assert.equal(train.inMemory, false, "a zero budget decodes every batch again");
  const run = async () => {
    const model = tf.sequential({ layers: [tf.layers.flatten({ inputShape: [32, 32, 3] }), tf.layers.dense({ units: 10, activation: "softmax", kernelInitializer: tf.initializers.glorotUniform({ seed: 1 }) })] });
    const optimizer = tf.train.sgd(0.01);
    const h = await fitImages(model, train, { epochs: 2, batchSize: 8, seed: 5, numClasses: 10, optimizer, preprocessing: "tf", augment: resolveAugment() });
    optimizer.dispose();
    model.dispose();
    return h.map((e) => e.loss);
  };
  assert.deepEqual(await run(), await run());
});

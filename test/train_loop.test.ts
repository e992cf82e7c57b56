/**
 * The shared training step and loop: deterministic under a seed, no tensor leak across steps, the
 * gradient hook replaces gradients, the feature cache stores shards idempotently.
 */
import assert from "node:assert/strict";
import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { before, describe, test } from "node:test";
import * as tf from "@tensorflow/tfjs";
import { selectBackend } from "../core/models/backend.js";
import { FeatureCache, type FeatureShardData } from "../core/datasets/feature_store.js";
import { buildHead } from "../core/models/head.js";
import { Rng } from "../core/runtime/rng.js";
import { type ArrayData, computeGradients, epochBatches, evaluate, fit, takeRows } from "../core/training/train_loop.js";
import { planShards } from "../coordinator/shard_planner.js";

before(async () => {
  await selectBackend("wasm");
});

/** Two Gaussian blobs per class in 8 dimensions: learnable, seeded. */
function blobs(n: number, classes: number, seed: number): ArrayData {
  const rng = new Rng(seed);
  const dim = 8;
  const x = new Float32Array(n * dim);
  const y = new Int32Array(n);
  for (let i = 0; i < n; i++) {
    y[i] = i % classes;
    for (let d = 0; d < dim; d++) x[i * dim + d] = (d % classes === y[i] ? 2 : 0) + (rng.next() - 0.5);
  }
  return { x, sampleShape: [dim], y };
}

describe("training - loop", () => {
  test("training - the head learns separable data", async () => {
    const data = blobs(240, 3, 1);
    const head = buildHead({ featureDim: 8, numClasses: 3, units: 16, dropout: 0.1, seed: 3 });
    const before = evaluate(head, data, 3);
    const opt = tf.train.adam(0.01);
    const hist = await fit(head, data, { epochs: 5, batchSize: 16, seed: 1, numClasses: 3, optimizer: opt, validation: blobs(60, 3, 2) });
    assert.equal(hist.length, 5);
    assert.ok(hist[4].val_accuracy! > 0.95, `val accuracy ${hist[4].val_accuracy}`);
    assert.ok(hist[4].loss < before.loss);
    head.dispose();
    opt.dispose();
  });

  test("training - the same seed gives the same weights", async () => {
    const run = async () => {
      const head = buildHead({ featureDim: 8, numClasses: 3, units: 16, dropout: 0, seed: 5 });
      const opt = tf.train.sgd(0.1);
      await fit(head, blobs(96, 3, 4), { epochs: 2, batchSize: 10, seed: 9, numClasses: 3, optimizer: opt });
      const w = head.getWeights().map((t) => Array.from(t.dataSync()));
      head.dispose();
      opt.dispose();
      return w;
    };
    assert.deepEqual(await run(), await run());
  });

  test("training - tensor count does not grow across steps", async () => {
    const data = blobs(128, 4, 6);
    const head = buildHead({ featureDim: 8, numClasses: 4, units: 16, dropout: 0.5, seed: 1 });
    const opt = tf.train.adam(0.001);
    await fit(head, data, { epochs: 1, batchSize: 16, seed: 1, numClasses: 4, optimizer: opt }); // creates optimizer slots
    const n0 = tf.memory().numTensors;
    await fit(head, data, { epochs: 3, batchSize: 16, seed: 2, numClasses: 4, optimizer: opt, validation: data });
    assert.equal(tf.memory().numTensors, n0);
    const g = computeGradients(head, { x: data.x.slice(0, 16 * 8), sampleShape: [8], y: data.y.slice(0, 16) }, 4);
    assert.equal(tf.memory().numTensors, n0 + Object.keys(g.grads).length);
    tf.dispose(g.grads);
    head.dispose();
    opt.dispose();
  });

  test("training - a gradient hook replaces the step's gradients", async () => {
    const head = buildHead({ featureDim: 8, numClasses: 3, units: 4, dropout: 0, seed: 2 });
    const before = head.getWeights().map((t) => Array.from(t.dataSync()));
    const opt = tf.train.sgd(0.5);
    let calls = 0;
    await fit(head, blobs(30, 3, 1), {
      epochs: 1, batchSize: 10, seed: 1, numClasses: 3, optimizer: opt,
      gradientHook: async (grads, n) => {
        calls++;
        assert.equal(n, 10);
        return Object.fromEntries(Object.entries(grads).map(([k, v]) => [k, tf.zerosLike(v)]));
      },
    });
    assert.equal(calls, 3);
    assert.deepEqual(head.getWeights().map((t) => Array.from(t.dataSync())), before, "zero gradients leave weights unchanged");
    head.dispose();
    opt.dispose();
  });

  test("training - a batch source that returns part of a batch must say which samples it holds", async () => {
    const data = blobs(40, 3, 1);
    const head = buildHead({ featureDim: 8, numClasses: 3, units: 4, dropout: 0.5, seed: 2 });
    const opt = tf.train.sgd(0.1);
    const part = (indices: Int32Array): ArrayData => ({ ...takeRows(data, indices.subarray(0, 5)), index: undefined });
    await assert.rejects(fit(head, { samples: 40, batch: part }, { epochs: 1, batchSize: 10, seed: 1, numClasses: 3, optimizer: opt }), /gave 5 rows for a batch of 10 samples without saying which \(set ArrayData.index\)/);
    // takeRows keeps the global sample indices, through a second take too.
    const twice = takeRows(takeRows(data, [7, 3, 9]), [2, 0]);
    assert.deepEqual(Array.from(twice.index!), [9, 7]);
    await fit(head, { samples: 40, batch: (indices) => takeRows(data, indices.subarray(0, 5)) }, { epochs: 1, batchSize: 10, seed: 1, numClasses: 3, optimizer: opt });
    head.dispose();
    opt.dispose();
  });

  test("training - epoch batches are a seeded permutation covering every sample once", () => {
    const b = epochBatches(103, 10, 7, 0);
    assert.equal(b.length, 11);
    assert.equal(b[10].length, 3);
    const all = b.flatMap((x) => Array.from(x)).sort((p, q) => p - q);
    assert.deepEqual(all, Array.from({ length: 103 }, (_, i) => i));
    assert.deepEqual(epochBatches(103, 10, 7, 0).map((x) => Array.from(x)), b.map((x) => Array.from(x)));
    assert.notDeepEqual(Array.from(epochBatches(103, 10, 7, 1)[0]), Array.from(b[0]));
  });
});

describe("feature cache - shards", () => {
  const shard = (id: string, ids: string[], dim: number): FeatureShardData => ({
    shardId: id, ids, labels: ids.map((_, i) => i % 2), splits: ids.map(() => "train"),
    features: Float32Array.from({ length: ids.length * dim }, (_, i) => i + ids.length), skipped: [],
  });

  test("feature cache - shards are stored once, resumed, and joined in sample order", async () => {
    const dir = await mkdtemp(join(tmpdir(), "ctrain-cache-"));
    try {
      const cache = new FeatureCache(dir);
      assert.equal(await cache.putShard("k", shard("s1", ["b", "a"], 2)), true);
      assert.equal(await cache.putShard("k", shard("s1", ["b", "a"], 2)), false, "a redelivered shard is not stored twice");
      assert.deepEqual([...(await cache.doneShards("k"))], ["s1"]);
      await cache.putShard("k", { ...shard("s2", ["c"], 2), skipped: [{ id: "d", reason: "corrupt", message: "bad" }] });
      const meta = { featureDim: 2, featureShape: [2], classes: ["x", "y"], model: "m", inputSize: 96, featureLayer: "out_relu", pooling: "avg" };
      const set = await cache.commit("k", meta, ["a", "b", "c", "d"]);
      assert.deepEqual(set.ids, ["a", "b", "c"]);
      assert.deepEqual(Array.from(set.features), [4, 5, 2, 3, 1, 2]);
      assert.deepEqual(set.skipped.map((s) => s.id), ["d"]);
      assert.ok(cache.has("k"));
      const loaded = await cache.load("k");
      assert.deepEqual(loaded.ids, set.ids);
      assert.deepEqual(Array.from(loaded.features), Array.from(set.features));
    } finally {
      await rm(dir, { recursive: true, force: true });
    }
  });

  test("feature cache - a sample in two shards, or missing without a reason, is an error", async () => {
    const dir = await mkdtemp(join(tmpdir(), "ctrain-cache-"));
    try {
      const cache = new FeatureCache(dir);
      await cache.putShard("k", shard("s1", ["a"], 1));
      await cache.putShard("k", shard("s2", ["a"], 1));
      const meta = { featureDim: 1, featureShape: [1], classes: ["x"], model: "m", inputSize: 96, featureLayer: "f", pooling: "avg" };
      await assert.rejects(cache.commit("k", meta, ["a"]), /in two shards/);
      await cache.putShard("k2", shard("s1", ["a"], 1));
      await assert.rejects(cache.commit("k2", meta, ["a", "zz"]), /no features and were not reported skipped/);
      await assert.rejects(cache.commit("k2", meta, ["a", "zz", "a"]), /sample a is listed twice in the sample order/);
    } finally {
      await rm(dir, { recursive: true, force: true });
    }
  });

  test("shards - plan is stable, covers every sample once, every shard has every class", () => {
    const samples = Array.from({ length: 1000 }, (_, i) => ({ id: `s${i}`, label: i % 10, split: "train" as const }));
    const plan = planShards(samples, 100);
    assert.equal(plan.length, 10);
    assert.deepEqual(planShards(samples, 100).map((s) => s.id), plan.map((s) => s.id));
    const ids = plan.flatMap((s) => s.samples.map((x) => x.id));
    assert.equal(new Set(ids).size, 1000);
    for (const s of plan) assert.equal(new Set(s.samples.map((x) => x.label)).size, 10);
  });
});

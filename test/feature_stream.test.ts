/**
 * The streamed feature cache: commit places each shard's rows at their final position, load reads
 * only the index, and head training reads blocks by position in a seeded order (every row once per
 * epoch, each block read once, the same batches for the same seed) with no tensor growth per step.
 */
import assert from "node:assert/strict";
import { mkdtemp, readFile, rm, stat, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, describe, test } from "node:test";
import * as tf from "@tensorflow/tfjs";
import { trainHead } from "../coordinator/head_training.js";
import { FeatureCache, type FeatureRows, type FeatureSet, type FeatureShardData } from "../core/datasets/feature_store.js";
import type { Split } from "../core/datasets/types.js";
import { selectBackend } from "../core/models/backend.js";
import { buildHead } from "../core/models/head.js";
import { Rng } from "../core/runtime/rng.js";
import { blockBatches, featureBatches, readBlock, splitLabels, splitRows, streamLayout, streamOrder } from "../core/training/feature_batches.js";
import { fit } from "../core/training/train_loop.js";

let tmp: string;
before(async () => {
  await selectBackend("wasm");
  tmp = await mkdtemp(join(tmpdir(), "ctrain-stream-"));
});
after(async () => {
  await rm(tmp, { recursive: true, force: true });
});

const DIM = 6;
const SPLITS: Split[] = ["train", "train", "val", "train", "test", "train", "train", "val", "train", "test"];

/** Sample i: label i % 3, split by the pattern above, row values i*100 + d (so a row says where it came from) plus a class signal. */
function sample(i: number): { id: string; label: number; split: Split; row: number[] } {
  const label = i % 3;
  return { id: `s/${String(i).padStart(5, "0")}`, label, split: SPLITS[i % SPLITS.length], row: Array.from({ length: DIM }, (_, d) => i * 100 + d) };
}

function shardOf(id: string, idx: number[]): FeatureShardData {
  const s = idx.map(sample);
  return { shardId: id, ids: s.map((x) => x.id), labels: s.map((x) => x.label), splits: s.map((x) => x.split), features: Float32Array.from(s.flatMap((x) => x.row)), skipped: [] };
}

async function committed(n: number, shardSize: number): Promise<{ set: FeatureSet; dir: string }> {
  const dir = await mkdtemp(join(tmp, "cache-"));
  const cache = new FeatureCache(dir);
  const all = Array.from({ length: n }, (_, i) => i);
  // Shards arrive out of order, as they do from workers.
  const shards: number[][] = [];
  for (let i = 0; i < n; i += shardSize) shards.push(all.slice(i, i + shardSize));
  for (const s of shards.reverse()) await cache.putShard("k", shardOf(`shard-${s[0]}`, s));
  const meta = { featureDim: DIM, featureShape: [DIM], classes: ["a", "b", "c"], model: "m", inputSize: 8, featureLayer: "l", pooling: "avg" };
  await cache.commit("k", meta, all.map((i) => sample(i).id));
  return { set: await cache.load("k"), dir };
}

/** A reader that counts the rows it reads. */
function counting(rows: FeatureRows): FeatureRows & { rowsRead: number } {
  const c = {
    dim: rows.dim, count: rows.count, rowsRead: 0,
    read: async (s: number, n: number) => { c.rowsRead += n; return rows.read(s, n); },
    readSync: (s: number, n: number) => { c.rowsRead += n; return rows.readSync(s, n); },
  };
  return c;
}

describe("feature stream - cache entry", () => {
  test("feature stream - commit puts every shard's rows at its sample's position; load reads rows only when asked", async () => {
    const { set, dir } = await committed(1000, 64);
    assert.equal(set.ids.length, 1000);
    assert.equal((await stat(join(dir, "k", "features.f32"))).size, 1000 * DIM * 4);
    for (const i of [0, 1, 63, 64, 500, 999]) {
      assert.equal(set.ids[i], sample(i).id);
      assert.deepEqual(Array.from(set.rows!.readSync(i, 1)), sample(i).row);
    }
    assert.deepEqual(Array.from(await set.rows!.read(998, 2)), [...sample(998).row, ...sample(999).row]);
    assert.throws(() => set.rows!.readSync(999, 2), /outside/);
    assert.equal(set.features.length, 1000 * DIM, "all rows on request (small sets, tests)");
  });

  test("feature stream - index.json is written and read a part at a time, as JSON.stringify writes and JSON.parse reads it", async () => {
    // 30,000 records: about 1.5 MiB of index, more than one part each way.
    const { set, dir } = await committed(30000, 1000);
    const file = join(dir, "k", "index.json");
    const text = await readFile(file, "utf8");
    assert.ok(text.length > 2 ** 20);
    const records = Array.from({ length: 30000 }, (_, i) => ({ id: sample(i).id, label: sample(i).label, split: sample(i).split }));
    assert.equal(text, JSON.stringify(records), "the same bytes as before it was written in parts");
    assert.deepEqual(set.ids, records.map((r) => r.id));
    assert.deepEqual(Array.from(set.labels), records.map((r) => r.label));
    assert.deepEqual(set.splits, records.map((r) => r.split));
    // Any JSON list of records loads: spaces and new lines, ids holding the characters that cut records.
    const odd = [{ id: "a,b]", label: 1, split: "val" as Split }, { id: 'q"}{[\\', label: 0, split: "train" as Split }, { split: "test" as Split, label: 2, id: "\u00e9\u20ac\u{1f600}" }];
    const cache = new FeatureCache(dir);
    await writeFile(file, JSON.stringify([...odd, ...records.slice(3)], null, 2));
    const loaded = await cache.load("k");
    assert.deepEqual(loaded.ids.slice(0, 4), [...odd.map((r) => r.id), records[3].id]);
    assert.deepEqual(Array.from(loaded.labels.subarray(0, 3)), [1, 0, 2]);
    assert.deepEqual(loaded.splits.slice(0, 3), ["val", "train", "test"]);
    assert.equal(loaded.ids.length, 30000);
    for (const [bad, why] of [["[]", /meta.json says 30000 samples, index.json lists 0/], [`${text.slice(0, -1)},]`, /index.json is not valid JSON/], [`${text.slice(0, -1)}}`, /index.json is not valid JSON/],
      [text.slice(0, 2 ** 20 + 7), /index.json is not valid JSON/], ['{"a":[]}', /index.json is not a list/], [text.replace('"label":2', '"label":3'), /index.json record 2 is not \{id, label in 0..2, split\}/]] as const) {
      await writeFile(file, bad);
      await assert.rejects(cache.load("k"), why, bad.slice(0, 40));
    }
    // A loaded entry keeps labels and splits; its ids are read again when first asked for.
    await writeFile(file, text);
    const fresh = await cache.load("k");
    await writeFile(file, text.replace('"label":2', '"label":1'));
    assert.throws(() => fresh.ids, /index.json changed since the entry was loaded/);
    await writeFile(file, text);
    assert.deepEqual(fresh.ids, records.map((r) => r.id));
  });
});

describe("feature stream - batches", () => {
  test("feature stream - an epoch's order holds every row once, is the same for the same seed and differs across epochs", () => {
    const a = streamOrder(1000, 32, 4, 7, 0);
    assert.deepEqual(Array.from(a).sort((x, y) => x - y), Array.from({ length: 1000 }, (_, i) => i));
    assert.deepEqual(streamOrder(1000, 32, 4, 7, 0), a);
    assert.notDeepEqual(streamOrder(1000, 32, 4, 7, 1), a);
    assert.notDeepEqual(streamOrder(1000, 32, 4, 8, 0), a);
    // Rows are shuffled within a window: the first 128 positions come from 4 blocks, not from everywhere.
    const blocks = new Set(Array.from(a.subarray(0, 128), (r) => Math.floor(r / 32)));
    assert.equal(blocks.size, 4);
  });

  test("feature stream - batches carry their rows and labels, each block is read once per epoch, memory is the window", async () => {
    const { set } = await committed(2000, 100);
    const reader = counting(set.rows!);
    const counted: FeatureSet = { ...set, rows: reader, get features(): Float32Array { throw new Error("nothing may read every row"); } };
    const train = splitRows(counted, "train");
    const src = featureBatches(counted, "train", 3, { seed: 3, blockRows: 50, windowBytes: 2 * 4 * 50 * DIM * 4 });
    assert.equal(src.samples, train.length);
    const order = src.order!(0);
    for (let b = 0; b < order.length; b += 32) {
      const idx = order.subarray(b, b + 32);
      const batch = await src.batch(idx, b / 32, 0);
      for (let i = 0; i < idx.length; i++) {
        const s = sample(train[idx[i]]);
        assert.equal(batch.y[i], s.label);
        assert.deepEqual(Array.from(batch.x.subarray(i * DIM, (i + 1) * DIM)), s.row);
      }
    }
    // Each block is read once per epoch and blocks do not overlap on disk: at most every row of the entry once
    // (short gaps of other splits' rows are read through rather than cut into more reads).
    assert.ok(reader.rowsRead >= train.length && reader.rowsRead <= set.ids.length, `rows read ${reader.rowsRead} for ${train.length} train rows of ${set.ids.length}`);
  });

  test("feature stream - replicas' parts of each global batch (blockBatches sliceOf) are the one-process batch, read from blocks window by window", async () => {
    const { set } = await committed(2000, 100);
    const train = splitRows(set, "train");
    const layout = { blockRows: 40, windowBlocks: 3 };
    const whole = featureBatches(set, "train", 3, { seed: 9, blockRows: 40, windowBytes: 2 * 3 * 40 * DIM * 4 });
    assert.deepEqual(streamLayout(DIM, { blockRows: 40, windowBytes: 2 * 3 * 40 * DIM * 4 }), layout);
    const members = 3;
    const loads: number[][] = Array.from({ length: members }, () => []);
    const replicas = Array.from({ length: members }, (_, m) => blockBatches({
      samples: train.length, layout, seed: 9, sampleShape: [DIM], readWindows: true,
      load: async (k) => { loads[m]!.push(k); return readBlock(set, set.rows!, train, 40, k, [DIM]); },
      // member m takes the m-th third of each global batch, as the replicas cut it
      sliceOf: (idx) => idx.subarray(Math.floor((m * idx.length) / members), Math.floor(((m + 1) * idx.length) / members)),
    }));
    for (const epoch of [0, 1]) {
      const order = whole.order!(epoch);
      for (const r of replicas) assert.deepEqual(r.order!(epoch), order);
      for (let b = 0; b * 64 < order.length; b++) {
        const idx = order.subarray(b * 64, (b + 1) * 64);
        const ref = await whole.batch(idx, b, epoch);
        const parts = await Promise.all(replicas.map((r) => r.batch(idx, b, epoch)));
        assert.deepEqual(parts.flatMap((p) => Array.from(p.index!)), Array.from(idx));
        assert.deepEqual(parts.flatMap((p) => Array.from(p.y)), Array.from(ref.y));
        assert.deepEqual(parts.flatMap((p) => Array.from(p.x)), Array.from(ref.x));
      }
    }
    // A window's blocks are asked for together, each block once per epoch, give or take the two windows held
    // across the epoch's end.
    const blocks = Math.ceil(train.length / 40);
    for (const l of loads) assert.ok(l.length >= 2 * blocks - 2 * layout.windowBlocks && l.length <= 2 * blocks, `${l.length} block reads for ${blocks} blocks x 2 epochs`);
  });

  test("feature stream - fit on a streamed split learns, is reproducible, and leaves no tensor behind per step", async () => {
    const { set } = await committed(1500, 128);
    // Class signal: feature d = label ? Replace the row values by a learnable pattern through a hand-built set.
    const rng = new Rng(1);
    const x = new Float32Array(set.ids.length * DIM);
    for (let i = 0; i < set.ids.length; i++) for (let d = 0; d < DIM; d++) x[i * DIM + d] = (d % 3 === set.labels[i] ? 2 : 0) + rng.next() - 0.5;
    const learnable: FeatureSet = { meta: set.meta, ids: set.ids, labels: set.labels, splits: set.splits, skipped: [], features: x };
    const run = async () => {
      const counts: number[] = [];
      const r = await trainHead(learnable, { epochs: 3, batchSize: 16, learningRate: 0.01, units: 16, dropout: 0, seed: 4, streamOptions: { blockRows: 32, windowBytes: 4 * 32 * DIM * 4 }, onBatchEnd: () => { counts.push(tf.memory().numTensors); } });
      const w = r.head.getWeights().map((t) => Array.from(t.dataSync()));
      r.head.dispose();
      return { r, w, counts };
    };
    const a = await run();
    assert.ok(a.r.test.accuracy > 0.95, `test accuracy ${a.r.test.accuracy}`);
    assert.equal(a.r.test.samples, splitLabels(learnable, "test").length);
    assert.equal(a.counts.at(-1), a.counts[1], `numTensors after each step: first ${a.counts.slice(0, 3).join(", ")}, last ${a.counts.at(-1)}`);
    assert.deepEqual((await run()).w, a.w, "same seed, same weights");
    const mem = await trainHead(learnable, { epochs: 3, batchSize: 16, learningRate: 0.01, units: 16, dropout: 0, seed: 4, stream: false });
    assert.ok(Math.abs(mem.test.accuracy - a.r.test.accuracy) < 0.03, `in memory ${mem.test.accuracy}, streamed ${a.r.test.accuracy}`);
    mem.head.dispose();
  });

  test("feature stream - fit refuses validation or sliceOf next to a BatchSource, and an order of the wrong length", async () => {
    const { set } = await committed(200, 50);
    const head = buildHead({ featureDim: DIM, numClasses: 3, units: 4, dropout: 0, seed: 1 });
    const opt = tf.train.adam(0.01);
    const src = featureBatches(set, "train", 3, { seed: 1 });
    await assert.rejects(fit(head, src, { epochs: 1, batchSize: 8, seed: 1, numClasses: 3, optimizer: opt, validation: { x: new Float32Array(DIM), sampleShape: [DIM], y: new Int32Array(1) } }), /BatchSource validates/);
    await assert.rejects(fit(head, { ...src, order: () => new Int32Array(3) }, { epochs: 1, batchSize: 8, seed: 1, numClasses: 3, optimizer: opt }), /epoch order has 3 samples/);
    head.dispose();
    opt.dispose();
  });
});

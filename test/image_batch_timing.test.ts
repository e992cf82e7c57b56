/**
 * Image batch timing (core/training/image_batches.ts `onTiming`, worker/step_timing.ts BatchPrepTimes):
 * every prepared batch reports its rows and busy time split into decode + augment and the frozen
 * forward, without changing the batch; the worker's sums reset on take. Real images (a synthetic data
 * set decoded through the same path as files) and a small real frozen stage (per-image channel means).
 */
import assert from "node:assert/strict";
import { describe, test } from "node:test";
import { DEFAULT_AUGMENT } from "../core/datasets/augment.js";
import { openDataset } from "../core/datasets/open.js";
import { type BatchTiming, type FrozenStage, imageBatches, openImages, type ImageSource } from "../core/training/image_batches.js";
import { BatchPrepTimes } from "../worker/step_timing.js";

async function source(): Promise<ImageSource> {
  const dataset = await openDataset("synthetic:40:4", { seed: 5, valSplit: 0, testSplit: 0, limit: 0, maxPixels: 1e8 });
  return openImages(dataset, dataset.samples.filter((s) => s.split === "train"), 16);
}

/** A frozen stage: each image's mean of each channel (3 values a row). */
const channelMeans: FrozenStage = {
  featureShape: [3],
  async extract(pixels, n) {
    const out = new Float32Array(n * 3);
    const per = pixels.length / n;
    for (let i = 0; i < n; i++) for (let p = 0; p < per; p++) out[i * 3 + (p % 3)] += pixels[i * per + p]! / (per / 3);
    return out;
  },
};

describe("image batch timing", () => {
  for (const augment of [DEFAULT_AUGMENT, null]) {
    test(`image batch timing - each batch reports rows and busy times, and the batch is unchanged (augment ${augment ? "on" : "off"})`, async () => {
      const src = await source();
      const seen: BatchTiming[] = [];
      const opts = { seed: 2, preprocessing: "unit" as const, augment, frozen: channelMeans };
      const rows = Int32Array.from([4, 9, 1, 7, 12]);
      const timed = await imageBatches(src, { ...opts, onTiming: (t) => seen.push(t) }).batch(rows, 0, 1);
      const plain = await imageBatches(src, opts).batch(rows, 0, 1);
      assert.deepEqual(timed.x, plain.x);
      assert.deepEqual(timed.sampleShape, [3]);
      assert.equal(seen.length, 1);
      assert.equal(seen[0]!.rows, rows.length);
      for (const k of ["decode_augment_seconds", "frozen_seconds"] as const) assert.ok(Number.isFinite(seen[0]![k]) && seen[0]![k] >= 0, `${k}: ${seen[0]![k]}`);
    });
  }

  test("image batch timing - the worker's sums add every batch and reset on take", async () => {
    const src = await source();
    const times = new BatchPrepTimes();
    assert.deepEqual(times.take(), {}, "nothing prepared: nothing to report");
    const b = imageBatches(src, { seed: 2, preprocessing: "unit", augment: DEFAULT_AUGMENT, frozen: channelMeans, onTiming: times.add });
    await b.batch(Int32Array.from([0, 1, 2]), 0, 0);
    await b.batch(Int32Array.from([3, 4]), 1, 0);
    const sums = times.take();
    assert.equal(sums["prep_batches"], 2);
    assert.equal(sums["prep_rows"], 5);
    assert.ok(sums["decode_augment_seconds"]! >= 0 && sums["frozen_forward_seconds"]! >= 0);
    assert.deepEqual(times.take(), {}, "reset after a take");
  });
});

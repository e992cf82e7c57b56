/**
 * Image batches cut for data-parallel members (core/training/image_batches.ts `sliceOf`): each member
 * decodes only its part of a global batch, and the members' parts together are the whole batch, in
 * order. Real images (a synthetic data set decoded through the same path as files), no NATS.
 */
import assert from "node:assert/strict";
import { describe, test } from "node:test";
import { openDataset } from "../core/datasets/open.js";
import { imageBatches, openImages, type ImageSource } from "../core/training/image_batches.js";
import { memberSlice } from "../proto/training_wire.js";

async function source(): Promise<ImageSource> {
  const dataset = await openDataset("synthetic:60:4", { seed: 3, valSplit: 0, testSplit: 0, limit: 0, maxPixels: 1e8 });
  return openImages(dataset, dataset.samples.filter((s) => s.split === "train"), 16);
}

describe("image batches slice", () => {
  test("image batches slice - members' parts of a global batch are the whole batch in order; only the part is decoded", async () => {
    const src = await source();
    let decoded = 0;
    const counting: ImageSource = { ...src, batch: (rows) => { decoded += rows.length; return src.batch(rows); } };
    const indices = Int32Array.from([17, 3, 42, 8, 29, 0, 11]);
    const whole = await imageBatches(counting, { seed: 1, preprocessing: "unit", augment: null }).batch(indices, 2, 1);
    assert.equal(decoded, indices.length);
    const members = ["w0", "w1", "w2"];
    const parts = [];
    for (const self of members) {
      decoded = 0;
      const part = await imageBatches(counting, { seed: 1, preprocessing: "unit", augment: null, sliceOf: (idx) => memberSlice(idx, members, self) }).batch(indices, 2, 1);
      assert.equal(decoded, memberSlice(indices, members, self).length, `${self} decodes only its part`);
      parts.push(part);
    }
    assert.deepEqual(Array.from(parts.flatMap((p) => Array.from(p.y))), Array.from(whole.y));
    const x = new Float32Array(whole.x.length);
    let at = 0;
    for (const p of parts) {
      x.set(p.x, at);
      at += p.x.length;
    }
    assert.deepEqual(x, whole.x);
    assert.deepEqual(parts[0]!.sampleShape, [16, 16, 3]);
  });

  test("image batches slice - sliceOf sees the global batch, its index and the epoch", async () => {
    const src = await source();
    const seen: [number[], number, number][] = [];
    const b = imageBatches(src, { seed: 1, preprocessing: "unit", augment: null, sliceOf: (idx, batch, epoch) => { seen.push([Array.from(idx), batch, epoch]); return idx.subarray(0, 1); } });
    const out = await b.batch(Int32Array.from([5, 6]), 4, 2);
    assert.deepEqual(seen, [[[5, 6], 4, 2]]);
    assert.equal(out.y.length, 1);
    assert.equal(b.prefetch, true, "the next part is still prepared while the current step trains");
  });
});

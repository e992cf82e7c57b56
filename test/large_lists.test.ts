/**
 * Data sets of hundreds of thousands of samples go through the list helpers of opening a folder or
 * IDX data set: `push(...xs)` with that many items overflows the call stack (a folder of 2x10^5
 * images did), so these run at a size that would.
 */
import assert from "node:assert/strict";
import { test } from "node:test";
import { applyLimit, stratifiedSplit } from "../core/datasets/splits.js";

const N = 300_000;
const ids = Array.from({ length: N }, (_, i) => `c${i % 7}/img-${i}.png`);
const labels = Int32Array.from({ length: N }, (_, i) => i % 7);

test("large lists - 3x10^5 samples are split and kept whole without a limit", () => {
  const splits = stratifiedSplit(ids, labels, { seed: 1, valFraction: 0.1, testFraction: 0.1 });
  const kept = applyLimit(ids, labels, splits, 0, 1);
  assert.equal(kept.length, N);
  assert.equal(new Set(kept).size, N);
});

test("large lists - --limit 2x10^5 keeps that many training samples, every class in every split", () => {
  const splits = stratifiedSplit(ids, labels, { seed: 1, valFraction: 0.1, testFraction: 0.1 });
  const kept = applyLimit(ids, labels, splits, 200_000, 1);
  assert.equal(kept.filter((i) => splits[i] === "train").length, 200_000);
  for (const s of ["train", "val", "test"] as const) assert.equal(new Set(kept.filter((i) => splits[i] === s).map((i) => labels[i])).size, 7, s);
});

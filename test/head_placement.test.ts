/**
 * Where method 1's head trains (coordinator/head_placement.ts): the flags decide when given; `auto`
 * keeps short and narrow heads in the coordinator and sends long, wide, large-batch ones to the workers.
 */
import assert from "node:assert/strict";
import { test } from "node:test";
import { headOnWorkers, headSeconds } from "../coordinator/head_placement.js";

const job = { trainRows: 1000, featureDim: 1280, units: 256, epochs: 10, batchSize: 32, workers: 2 };
const cached = (dataParallel: "auto" | "on" | "off") => ({ dataParallel, method: "cached" as const });

test("head placement - on and off decide; one worker, or --method augment, stays out of it", () => {
  assert.deepEqual(headOnWorkers(cached("on"), job), { workers: true, why: "--data-parallel on" });
  assert.deepEqual(headOnWorkers(cached("off"), { ...job, trainRows: 1e7, batchSize: 4096 }), { workers: false, why: "--data-parallel off" });
  assert.equal(headOnWorkers(cached("auto"), { ...job, workers: 1, trainRows: 1e7, batchSize: 4096 }).workers, false);
  assert.equal(headOnWorkers({ dataParallel: "on", method: "augment" }, job).workers, false);
});

test("head placement - auto: a small job stays here, a long wide large-batch one goes to 8 workers, and more workers only help", () => {
  const small = headOnWorkers(cached("auto"), job);
  assert.equal(small.workers, false);
  assert.ok(small.estimate!.workers > small.estimate!.here, JSON.stringify(small.estimate));
  const big = { ...job, trainRows: 1e6, featureDim: 3456, batchSize: 1024, workers: 8 };
  const place = headOnWorkers(cached("auto"), big);
  assert.equal(place.workers, true, JSON.stringify(place.estimate));
  // Two workers save at most half the compute and pay the reads and exchanges: not by the margin.
  assert.equal(headOnWorkers(cached("auto"), { ...big, workers: 2 }).workers, false);
  assert.ok(headSeconds({ ...big, workers: 16 }).workers < headSeconds(big).workers);
  // The estimate here does not depend on the batch; on the workers a smaller batch means more exchanges.
  assert.equal(headSeconds({ ...big, batchSize: 32 }).here, headSeconds(big).here);
  assert.ok(headSeconds({ ...big, batchSize: 32 }).workers > headSeconds(big).workers);
});

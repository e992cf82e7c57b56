/**
 * The worker's memory guard under a pod limit (issue 16 item 9): the per-shard budget is half of
 * what the process may use, which is the cgroup limit (a pod's resources.limits.memory) when that is
 * below the machine's memory, as Node's process.constrainedMemory() reports it.
 */
import assert from "node:assert/strict";
import { totalmem } from "node:os";
import { test } from "node:test";
import { memoryLimit, shardMemoryBudget } from "../worker/extraction_executor.js";

const GiB = 2 ** 30;

test("memory limit - a pod limit below the node's memory is what the worker may use", () => {
  assert.equal(memoryLimit(64 * GiB, 8 * GiB), 8 * GiB);
  assert.equal(shardMemoryBudget({}, memoryLimit(64 * GiB, 8 * GiB)), 4 * GiB, "half the pod's limit, not half the node's 64 GiB");
});

test("memory limit - no limit (undefined, 0, 2^64 as Node reports it) means the machine's memory", () => {
  for (const none of [undefined, 0, 2 ** 64]) assert.equal(memoryLimit(64 * GiB, none), 64 * GiB, String(none));
  assert.equal(memoryLimit(64 * GiB, 128 * GiB), 64 * GiB, "a limit above the machine's memory changes nothing");
});

test("memory limit - this process: at most the machine's memory, and CTRAIN_WORKER_MEMORY_BYTES still wins", () => {
  const here = memoryLimit();
  assert.ok(here > 0 && here <= totalmem());
  assert.equal(shardMemoryBudget({ CTRAIN_WORKER_MEMORY_BYTES: "1000000" }, here), 1_000_000);
});

/**
 * Memory made visible and bounded: ctrain_memory_bytes{kind} per process, and the up-front refusal
 * of a job whose coordinator working set would not fit (which no longer grows with N x featureDim).
 */
import assert from "node:assert/strict";
import { test } from "node:test";
import { Registry } from "prom-client";
import { checkMemoryBudget, INDEX_BYTES_PER_SAMPLE, workingSet } from "../coordinator/memory_budget.js";
import { resolveOptions } from "../core/runtime/config.js";
import { ConfigError } from "../core/runtime/errors.js";
import { heldBytes, memoryHeld, release } from "../core/runtime/memory_accounting.js";
import { createMetrics } from "../core/runtime/metrics.js";
import { parseExposition } from "./helpers/prom_text.js";

test("memory budget - ctrain_memory_bytes reports rss and the bytes held for features and images", async () => {
  const registry = new Registry();
  createMetrics(registry, { job: "j", worker: "w1" });
  const before = memoryHeld();
  heldBytes("features", 3 * 2 ** 20);
  const exp = parseExposition(await registry.metrics());
  const value = (kind: string): number | undefined => exp.samples.find((s) => s.name === "ctrain_memory_bytes" && s.labels.kind === kind && s.labels.worker === "w1")?.value;
  assert.ok(value("rss")! > 10 * 2 ** 20, `rss ${value("rss")}`);
  assert.equal(value("features"), before.features + 3 * 2 ** 20);
  assert.equal(value("images"), before.images);
  release("features", 3 * 2 ** 20);
  assert.equal(memoryHeld().features, before.features);
});

test("memory budget - the working set grows with the index only: a million 3456-float rows (13.8 GB of features) fit in well under 2 GB", () => {
  const o = resolveOptions({});
  const small = workingSet(o, 100_000, 3456);
  const big = workingSet(o, 1_000_000, 3456);
  assert.equal(big.total - small.total, 900_000 * INDEX_BYTES_PER_SAMPLE);
  assert.equal(big.featureWindow, small.featureWindow);
  assert.ok(big.total < 2 * 2 ** 30, `${big.total} bytes`);
  assert.doesNotThrow(() => checkMemoryBudget(o, 1_000_000, 3456, 24 * 2 ** 30));
});

test("memory budget - a working set over half the machine is refused naming --data and the sizes", () => {
  const o = { ...resolveOptions({}), data: "synthetic:5000000" };
  assert.throws(() => checkMemoryBudget(o, 5_000_000, 1280, 2 * 2 ** 30), (e: unknown) =>
    e instanceof ConfigError && /--data synthetic:5000000: the coordinator would hold about \d+ MiB \(index of 5000000 samples \d+ MiB/.test(e.message) && /half of this machine's 2048 MiB/.test(e.message));
});

/**
 * Jobs that cannot fit the machine are refused before anything starts, naming what limits them:
 * more local workers than the cores and memory allow, and `--pooling none` features that do not fit in
 * memory or in the wasm heap (which crashed inside wasm after a minute, `memory access out of bounds`).
 */
import assert from "node:assert/strict";
import { availableParallelism } from "node:os";
import { mkdtemp, rm } from "node:fs/promises";
import { existsSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, test } from "node:test";
import { runCli } from "./helpers/cli.js";

let dir: string;
before(async () => {
  dir = await mkdtemp(join(tmpdir(), "ctrain-limits-"));
});
after(async () => rm(dir, { recursive: true, force: true }));

const base = (name: string): string[] => ["run", "--data", "fashion-mnist", "--backend", "wasm", "--cache-dir", join(dir, name, "cache"), "--out", join(dir, name, "out")];

test("limits - --workers 1000 is refused naming the cores and the memory; nothing is started", async () => {
  const t0 = performance.now();
  const r = await runCli([...base("workers"), "--workers", "1000"], { timeoutMs: 60_000 });
  assert.equal(r.code, 2, r.stderr);
  assert.match(r.stderr, new RegExp(`--workers 1000: this machine has ${availableParallelism()} cores and \\d+ MiB of memory`));
  assert.match(r.stderr, /Use --workers \d+ or fewer/);
  assert.ok(performance.now() - t0 < 30_000);
  assert.equal(existsSync(join(dir, "workers")), false);
});

// Features stream from the cache (memory holds a window of rows), so what they must fit is --cache-dir: 70k x 451584 floats is 126 GB.
test("limits - --pooling none features larger than the cache disk are refused naming the size", async () => {
  const r = await runCli([...base("mem"), "--pooling", "none", "--feature-layer", "block_3_expand_relu", "--input-size", "224", "--workers", "1"], { timeoutMs: 60_000 });
  assert.equal(r.code, 2, r.stderr);
  assert.match(r.stderr, /--cache-dir .*: \d+ MiB free on .*, about \d+ MiB needed for the feature cache \(\d+ samples x 451584 floats\)/);
});

test("limits - a head too big for the wasm heap is refused before training", async () => {
  const r = await runCli([...base("heap"), "--pooling", "none", "--feature-layer", "block_3_expand_relu", "--input-size", "224", "--limit", "50", "--head-units", "512", "--workers", "1"], { timeoutMs: 60_000 });
  assert.equal(r.code, 2, r.stderr);
  assert.match(r.stderr, /--head-units 512 .* MiB of wasm memory/);
});

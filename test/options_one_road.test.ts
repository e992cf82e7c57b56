/**
 * Every setting reaches the code by one road (issue 13 item 3): the option table, from a flag, the
 * environment or a config file -- flags win, then the environment -- validated once; one rule for
 * "data-parallel"; one default batch size; `ctrain worker`'s own table.
 */
import assert from "node:assert/strict";
import { mkdtemp, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { test } from "node:test";
import { DEFAULT_BATCH_SIZE, fineTunesDataParallel, loadOptions, parseArgs, parseWorkerArgs, resolveOptions } from "../core/runtime/config.js";
import { ConfigError } from "../core/runtime/errors.js";

test("options - flags win over the environment, which wins over the config file", async () => {
  const dir = await mkdtemp(join(tmpdir(), "ctrain-options-"));
  try {
    const file = join(dir, "job.yaml");
    await writeFile(file, "checksum-every: 7\ncheckpoint-every: 9\nstep-timeout-ms: 5000\n");
    const o = loadOptions(parseArgs(["--config", file, "--checksum-every", "3"]), { CTRAIN_DP_CHECKSUM_EVERY: "4", CTRAIN_DP_CHECKPOINT_EVERY: "8" });
    assert.deepEqual([o.checksumEvery, o.checkpointEvery, o.stepTimeoutMs], [3, 8, 5000]);
    const d = loadOptions(parseArgs([]), {});
    assert.deepEqual([d.checksumEvery, d.checkpointEvery, d.stepTimeoutMs], [10, 20, 30_000]);
    assert.throws(() => loadOptions(parseArgs(["--config", file]), { CTRAIN_DP_STEP_TIMEOUT_MS: "0" }), (e: unknown) => e instanceof ConfigError && /CTRAIN_DP_STEP_TIMEOUT_MS\) must be between 100 and/.test(e.message));
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
});

test("options - one rule decides data-parallel fine-tuning", () => {
  const dp = (workers: number, dataParallel?: "auto" | "on" | "off") => fineTunesDataParallel(resolveOptions({ workers, ...(dataParallel ? { dataParallel } : {}) }));
  assert.deepEqual([dp(1), dp(2), dp(2, "off"), dp(1, "on")], [false, true, false, true]);
});

test("options - one default batch size for training and extraction", () => {
  const o = resolveOptions({});
  assert.equal(o.batchSize, DEFAULT_BATCH_SIZE);
  assert.equal(o.extractBatchSize, DEFAULT_BATCH_SIZE);
});

test("options - ctrain worker reads its table: CTRAIN_NATS_URL under --nats; no batch size of its own", () => {
  const a = parseWorkerArgs(["--job", "j1"], [], { CTRAIN_NATS_URL: "nats://a:4222" });
  assert.equal(a.options.nats, "nats://a:4222");
  const b = parseWorkerArgs(["--nats", "nats://b:4222"], [], { CTRAIN_NATS_URL: "nats://a:4222" });
  assert.equal(b.options.nats, "nats://b:4222");
  assert.throws(() => parseWorkerArgs(["--batch-size", "8"]), /ctrain worker has no --batch-size: images per forward pass are the job's --extract-batch-size/);
  assert.throws(() => parseWorkerArgs(["--metrics-port", "70000"]), /--metrics-port \(flag\) must be between -1 and 65535/);
  assert.throws(() => parseWorkerArgs(["--worker-idd", "x"]), /Did you mean --worker-id\?/);
});

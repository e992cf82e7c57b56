/**
 * The short chaos run of `npm test`: the clean job, then workers SIGKILLed mid-shard and the NATS
 * server restarted mid-job (test/chaos/scenarios.ts), each checked against the clean run: the job
 * completes, every planned sample is in the committed cache exactly once with the clean run's values,
 * and the head is the clean run's. `npm run chaos` runs every scenario on a larger job.
 *
 * The two fault runs only need the clean run's artifacts, and each has its own nats-server, job id and
 * folders: they run at the same time, once the clean run is over. Faults fire on observed progress
 * (shards done, claims), not on time, so the extra load moves when they land, not whether they do.
 */
import assert from "node:assert/strict";
import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, describe, test } from "node:test";
import { DEFAULT_CONFIG, formatTable, plannedIds, runScenario, SCENARIOS, type ChaosConfig, type RunArtifacts, type ScenarioResult } from "./chaos/scenarios.js";

const scenario = (name: string) => SCENARIOS.find((s) => s.name === name)!;

function assertClean(r: ScenarioResult): void {
  const why = formatTable([r]);
  assert.equal(r.completed, true, why);
  assert.equal(r.samples_lost, 0, why);
  assert.equal(r.samples_duplicated, 0, why);
  assert.equal(r.samples_foreign, 0, why);
  assert.ok(r.ok, why);
}

describe("chaos", { concurrency: true }, () => {
  let cfg: ChaosConfig;
  let planned: string[];
  let clean: Promise<{ result: ScenarioResult; artifacts: RunArtifacts }> | undefined;
  /** The clean run, started by whichever test asks first. */
  const cleanRun = () => (clean ??= runScenario(scenario("clean"), cfg, planned));
  /** The clean run's artifacts, or undefined when it was not clean. */
  const cleanBaseline = async (): Promise<RunArtifacts | undefined> => {
    const { result, artifacts } = await cleanRun();
    try {
      assertClean(result);
      return artifacts;
    } catch {
      return undefined;
    }
  };
  before(async () => {
    cfg = { ...DEFAULT_CONFIG, dir: await mkdtemp(join(tmpdir(), "ctrain-chaos-test-")), limit: 120, shardSize: 12, timeoutMs: 150_000 };
    planned = await plannedIds(cfg);
  });
  after(async () => {
    await cleanRun().catch(() => undefined);
    await rm(cfg.dir, { recursive: true, force: true });
  });

  test("chaos - clean job: every planned sample once", { timeout: 180_000 }, async () => {
    const { result } = await cleanRun();
    assertClean(result);
  });

  test("chaos - workers SIGKILLed mid-shard and replaced: nothing lost or duplicated, same features and head", { timeout: 330_000 }, async () => {
    const baseline = await cleanBaseline();
    assert.ok(baseline, "the clean run failed");
    const { result } = await runScenario(scenario("kill-workers"), cfg, planned, baseline);
    assertClean(result);
    assert.ok(result.faults.some((f) => f.includes("SIGKILL")), `no worker was killed: ${formatTable([result])}`);
    assert.equal(result.feature_max_diff, 0, "features as in the clean run");
    assert.equal(result.weights_max_diff, 0, "head as in the clean run");
  });

  test("chaos - NATS server restarted mid-job: nothing lost or duplicated, same features and head", { timeout: 330_000 }, async () => {
    const baseline = await cleanBaseline();
    assert.ok(baseline, "the clean run failed");
    const { result } = await runScenario(scenario("nats-restart"), cfg, planned, baseline);
    assertClean(result);
    assert.ok(result.faults.some((f) => f.includes("NATS restart")), `the server was not restarted: ${formatTable([result])}`);
    assert.equal(result.feature_max_diff, 0, "features as in the clean run");
    assert.equal(result.weights_max_diff, 0, "head as in the clean run");
  });
});

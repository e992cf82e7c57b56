/**
 * `npm run chaos`: every scenario of test/chaos/scenarios.ts, the clean run first (the baseline the
 * others are compared with), then the table on stdout and bench/results/chaos.json. Exits 1 when a
 * scenario failed, lost or duplicated samples, or differed from the clean run.
 *
 *   node dist/test/chaos/run.js [--seed N] [--limit N] [--shard-size N] [--only a,b|ft|aug|run] [--timeout S] [--keep] [--out FILE] [--log-dir DIR]
 * The `run-*` rows (test/chaos/run_scenarios.ts) drive `ctrain run` with its embedded nats-server.
 */
import { mkdir, mkdtemp, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { parseArgs } from "node:util";
import { RUN_SCENARIOS, runRunScenario } from "./run_scenarios.js";
import { AUGMENT_INPUT_SIZE, DEFAULT_CONFIG, formatTable, jobArgs, killRunning, plannedIds, runScenario, SCENARIOS, type ChaosConfig, type RunArtifacts, type Scenario, type ScenarioResult } from "./scenarios.js";

const RESULTS = join(dirname(fileURLToPath(import.meta.url)), "..", "..", "..", "bench", "results", "chaos.json");

async function main(): Promise<number> {
  const { values } = parseArgs({
    options: {
      seed: { type: "string" }, limit: { type: "string" }, "shard-size": { type: "string" }, only: { type: "string" },
      timeout: { type: "string" }, keep: { type: "boolean" }, out: { type: "string" }, "log-dir": { type: "string" },
    },
  });
  const dir = await mkdtemp(join(tmpdir(), "ctrain-chaos-"));
  const cfg: ChaosConfig = {
    ...DEFAULT_CONFIG, dir,
    ...(values.seed ? { seed: Number(values.seed) } : {}),
    ...(values.limit ? { limit: Number(values.limit) } : {}),
    ...(values["shard-size"] ? { shardSize: Number(values["shard-size"]) } : {}),
    ...(values.timeout ? { timeoutMs: Number(values.timeout) * 1000 } : {}),
    ...(values["log-dir"] ? { logDir: values["log-dir"] } : {}),
  };
  const only = values.only?.split(",");
  // The clean runs are the baselines: "clean" for extraction + head, "ft-clean" for fine-tuning, "aug-clean" for
  // method 2 (its own input size: only compared with method-2 rows, so not needed when only those run).
  const isAug = (name: string): boolean => name === "aug" || SCENARIOS.some((x) => x.augment && x.name === name);
  const wanted = (s: Scenario): boolean => !only || only.includes(s.name) || (s.name === "clean" && !only.every(isAug))
    || (s.name === "ft-clean" && SCENARIOS.some((x) => x.fineTune && only.includes(x.name))) || (s.name === "aug-clean" && only.some(isAug))
    || (!!s.fineTune && only.includes("ft")) || (!!s.augment && only.includes("aug"));
  const scenarios = SCENARIOS.filter(wanted);
  const planned = await plannedIds(cfg);
  console.error(`chaos: ${scenarios.length} scenario(s), seed ${cfg.seed}, ${planned.length} samples in shards of ${cfg.shardSize}, input ${cfg.inputSize}, ack wait ${cfg.ackWaitS} s; work dir ${dir}`);
  const rows: ScenarioResult[] = [];
  const baselines = new Map<string, RunArtifacts>();
  const t0 = performance.now();
  try {
    for (const sc of scenarios) {
      console.error(`chaos: ${sc.name} (${sc.workers} worker(s)${sc.fineTune ? ", fine-tuning" : sc.augment ? ", method 2 on the workers" : ""})...`);
      const clean = baselines.get("clean");
      // ft-clean against clean: the same features; its model and time are its own (fine-tuned). aug-clean: its own input size.
      const baseline = sc.name === "ft-clean" ? (clean ? { wallS: Number.NaN, features: clean.features } : undefined)
        : sc.name === "aug-clean" ? undefined : baselines.get(sc.fineTune ? "ft-clean" : sc.augment ? "aug-clean" : "clean");
      const { result, artifacts } = await runScenario(sc, cfg, planned, baseline);
      if (sc.name === "clean" || sc.name === "ft-clean" || sc.name === "aug-clean") {
        baselines.set(sc.name, artifacts);
        result.overhead = 1;
      }
      rows.push(result);
      console.error(`chaos: ${sc.name}: ${result.ok ? "ok" : "FAIL"} in ${result.wall_s} s, faults: ${result.faults.join("; ") || "none"}`);
    }
    for (const sc of RUN_SCENARIOS.filter((s) => !only || only.includes(s.name) || only.includes("run"))) {
      console.error(`chaos: ${sc.name} (ctrain run, ${sc.workers} worker(s))...`);
      const result = await runRunScenario(sc, cfg, planned, jobArgs(cfg), baselines.get("clean"));
      rows.push(result);
      console.error(`chaos: ${sc.name}: ${result.ok ? "ok" : "FAIL"} in ${result.wall_s} s, faults: ${result.faults.join("; ") || "none"}`);
    }
  } finally {
    if (!values.keep) await rm(dir, { recursive: true, force: true });
  }
  console.log(formatTable(rows));
  const file = values.out ?? RESULTS;
  await mkdir(dirname(file), { recursive: true });
  await writeFile(file, JSON.stringify({
    generated_at: new Date().toISOString(),
    config: { seed: cfg.seed, limit: cfg.limit, samples: planned.length, shard_size: cfg.shardSize, input_size: cfg.inputSize, augment_input_size: AUGMENT_INPUT_SIZE, ack_wait_s: cfg.ackWaitS, max_deliver: cfg.maxDeliver, backend: "wasm" },
    seconds: Number(((performance.now() - t0) / 1000).toFixed(1)),
    scenarios: rows,
  }, null, 2) + "\n");
  console.error(`chaos: wrote ${file}`);
  return rows.every((r) => r.ok) ? 0 : 1;
}

// Interrupted: the scenario's ctrain processes go too (nats-servers go with the helper's own hook).
for (const sig of ["SIGINT", "SIGTERM"] as const) {
  process.once(sig, () => {
    killRunning();
    process.exit(130);
  });
}

main().then((code) => process.exit(code), (err: unknown) => {
  console.error(err);
  process.exit(2);
});

/**
 * The monitoring files under deploy/ against the metrics core/runtime/metrics.ts really exports:
 * promtool accepts the scrape config and the rules, every PromQL expression of the Grafana dashboard
 * and the alert rules names only metrics that exist, and a real Prometheus started on the shipped
 * config (targets written the way `ctrain run` writes them) scrapes a ctrain process, evaluates the
 * rules and accepts every dashboard query.
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import { mkdtemp, readFile, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { promisify } from "node:util";
import { Registry } from "prom-client";
import { parse as parseYaml } from "yaml";
import { createMetrics, serveMetrics, writeScrapeTargets } from "../core/runtime/metrics.js";
import { parseExposition, seriesNames } from "./helpers/prom_text.js";
import {
  DASHBOARD_VARIABLES, INSTALL_HINT, PROM_DIR, ROOT, allPanels, alertRules, dashboardExpressions, eventually, loadDashboard, promQuery, startPrometheus, stopPrometheus,
  writeTestConfig, type PromHandle,
} from "./helpers/prometheus.js";

const run = promisify(execFile);

/** Values a test puts in for the dashboard's variables; nothing else may appear in an expression. */
const VARIABLES: Record<(typeof DASHBOARD_VARIABLES)[number], string> = { $job: "ptest", $worker: ".*", $__rate_interval: "1m" };

/** Series names (with histogram suffixes) a fresh ctrain process exports. */
async function exportedNames(): Promise<Set<string>> {
  const registry = new Registry();
  createMetrics(registry, { job: "names", worker: "w0" });
  return seriesNames(parseExposition(await registry.metrics()).types);
}

/** Metric names in a PromQL expression: ctrain_*, and the default process/nodejs metrics. */
function metricNames(expr: string): string[] {
  return [...expr.matchAll(/\b((?:ctrain|process|nodejs)_[a-z0-9_]+)\b/g)].map((m) => m[1]);
}

function substitute(expr: string): string {
  return expr.replace(/\$\{?(__rate_interval|job|worker)\}?/g, (_all, name: string) => VARIABLES[`$${name}` as keyof typeof VARIABLES]);
}

async function promtool(args: string[]): Promise<{ stdout: string; stderr: string }> {
  try {
    return await run("promtool", args, { cwd: ROOT });
  } catch (err) {
    const e = err as NodeJS.ErrnoException & { stdout?: string; stderr?: string };
    if (e.code === "ENOENT") assert.fail(`promtool not found in PATH: ${INSTALL_HINT}`);
    assert.fail(`promtool ${args.join(" ")} failed:\n${e.stdout ?? ""}${e.stderr ?? ""}`);
  }
}

test("metrics - promtool accepts deploy/prometheus/prometheus.yml", async () => {
  const { stdout, stderr } = await promtool(["check", "config", join(PROM_DIR, "prometheus.yml")]);
  assert.match(stdout + stderr, /SUCCESS/);
});

test("metrics - promtool accepts deploy/prometheus/alerts.yml", async () => {
  const { stdout, stderr } = await promtool(["check", "rules", join(PROM_DIR, "alerts.yml")]);
  assert.match(stdout + stderr, /SUCCESS: 4 rules found/);
});

test("metrics - the scrape config keeps ctrain's job label and watches runs/ctrain-targets/*.json", async () => {
  const cfg = parseYaml(await readFile(join(PROM_DIR, "prometheus.yml"), "utf8")) as {
    rule_files: string[];
    scrape_configs: { job_name: string; honor_labels?: boolean; file_sd_configs?: { files: string[] }[] }[];
  };
  assert.ok(cfg.rule_files.includes("alerts.yml"));
  const ctrain = cfg.scrape_configs.find((c) => c.job_name === "ctrain");
  assert.ok(ctrain, "a scrape job named ctrain");
  assert.equal(ctrain.honor_labels, true, "without honor_labels the job id would become exported_job");
  assert.deepEqual(ctrain.file_sd_configs?.[0]?.files, ["../../runs/ctrain-targets/*.json"]);
  for (const c of cfg.scrape_configs) assert.equal(c.honor_labels, true, `honor_labels in ${c.job_name}`);
  // The example targets file has the shape writeScrapeTargets writes.
  const example = JSON.parse(await readFile(join(PROM_DIR, "ctrain-targets.example.json"), "utf8")) as { targets: string[]; labels: Record<string, string> }[];
  for (const g of example) {
    assert.equal(g.targets.length, 1);
    assert.deepEqual(Object.keys(g.labels).sort(), ["job", "worker"]);
  }
});

test("metrics - the PodMonitor selects ctrain pods on the metrics port", async () => {
  const pm = parseYaml(await readFile(join(PROM_DIR, "podmonitor.yaml"), "utf8")) as {
    apiVersion: string;
    kind: string;
    metadata: { name: string };
    spec: { selector: { matchLabels: Record<string, string> }; podMetricsEndpoints: { port: string; path?: string; honorLabels?: boolean }[] };
  };
  assert.equal(pm.apiVersion, "monitoring.coreos.com/v1");
  assert.equal(pm.kind, "PodMonitor");
  assert.equal(pm.spec.selector.matchLabels["app.kubernetes.io/name"], "ctrain");
  assert.equal(pm.spec.podMetricsEndpoints[0].port, "metrics");
  assert.equal(pm.spec.podMetricsEndpoints[0].path ?? "/metrics", "/metrics");
  assert.equal(pm.spec.podMetricsEndpoints[0].honorLabels, true);
});

test("metrics - the Grafana dashboard parses and has job, worker and datasource variables", async () => {
  const d = await loadDashboard();
  assert.ok(d.schemaVersion >= 36, `schemaVersion ${d.schemaVersion}`);
  assert.ok(d.uid && d.title);
  const vars = new Map(d.templating.list.map((v) => [v.name, v]));
  assert.equal(vars.get("datasource")?.type, "datasource");
  assert.equal(vars.get("job")?.type, "query");
  assert.equal(vars.get("worker")?.type, "query");
  const ids = allPanels(d.panels).map((p) => p.id);
  assert.equal(new Set(ids).size, ids.length, "panel ids are unique");
  const names = await exportedNames();
  for (const v of ["job", "worker"]) {
    const def = vars.get(v)?.definition ?? "";
    for (const n of metricNames(def)) assert.ok(names.has(n), `variable ${v} uses unknown metric ${n}`);
  }
});

test("metrics - every dashboard panel has queries naming only exported metrics", async () => {
  const d = await loadDashboard();
  const names = await exportedNames();
  const panels = allPanels(d.panels).filter((p) => p.type !== "row");
  assert.ok(panels.length >= 10, `${panels.length} panels`);
  for (const p of panels) {
    assert.ok(p.targets && p.targets.length > 0, `panel "${p.title}" has targets`);
    for (const t of p.targets) {
      const expr = t.expr ?? "";
      assert.ok(expr.trim() !== "", `panel "${p.title}" target ${t.refId} has an expression`);
      const used = metricNames(expr);
      assert.ok(used.length > 0 || /\bup\b/.test(expr), `panel "${p.title}": no metric in ${expr}`);
      for (const n of used) assert.ok(names.has(n), `panel "${p.title}" uses ${n}, which core/runtime/metrics.ts does not export`);
      for (const v of expr.match(/\$\{?[A-Za-z_]+\}?/g) ?? []) {
        assert.ok(v.replace(/[{}]/g, "") in VARIABLES, `panel "${p.title}" uses variable ${v}; only $job, $worker, $__rate_interval are allowed`);
      }
    }
  }
  // The panels the job needs, by the metrics they show.
  const all = (await dashboardExpressions()).map((e) => e.expr).join("\n");
  for (const n of [
    "ctrain_progress_ratio", "ctrain_eta_seconds", "ctrain_extraction_images_per_second", "ctrain_step_duration_seconds_bucket",
    "ctrain_allreduce_duration_seconds_sum", "ctrain_loss", "ctrain_accuracy", "ctrain_workers", "ctrain_skipped_inputs_total",
    "ctrain_decode_errors_total", "ctrain_dropped_messages_total", "ctrain_backend_info", "ctrain_step_compute_seconds", "ctrain_step_wait_seconds",
  ]) {
    assert.ok(all.includes(n), `no panel shows ${n}`);
  }
});

test("metrics - alert rules name only exported metrics", async () => {
  const rules = await alertRules();
  const names = await exportedNames();
  assert.deepEqual(rules.map((r) => r.alert).sort(), ["CtrainLossNaN", "CtrainNoProgress", "CtrainStraggler", "CtrainWorkerDown"]);
  for (const r of rules) {
    assert.doesNotMatch(r.expr, /\$/, `${r.alert} must not use dashboard variables`);
    for (const n of metricNames(r.expr)) assert.ok(names.has(n), `${r.alert} uses ${n}, which core/runtime/metrics.ts does not export`);
  }
  assert.match(rules.find((r) => r.alert === "CtrainLossNaN")!.expr, /ctrain_loss != ctrain_loss/);
  assert.match(rules.find((r) => r.alert === "CtrainNoProgress")!.expr, /ctrain_last_progress_timestamp_seconds/);
  assert.match(rules.find((r) => r.alert === "CtrainStraggler")!.expr, /ctrain_step_compute_seconds[\s\S]*1\.5 \* quantile by \(job\) \(0\.5/);
});

test("metrics - promtool's unit tests of the alert rules pass (deploy/prometheus/alerts_test.yml: the straggler fires for the slow worker only)", async () => {
  const { stdout, stderr } = await promtool(["test", "rules", join(PROM_DIR, "alerts_test.yml")]);
  assert.match(stdout + stderr, /SUCCESS/);
});

test("metrics - the dashboard shows the slowest worker and compute/wait per worker", async () => {
  const d = await loadDashboard();
  const panels = allPanels(d.panels);
  const slowest = panels.find((p) => p.title === "Slowest worker (compute per step)");
  assert.ok(slowest, "a panel names the slowest worker");
  assert.match(slowest.targets![0]!.expr!, /topk\(1, .*ctrain_step_compute_seconds/);
  const split = panels.find((p) => p.title === "Compute and wait per step, per worker");
  assert.deepEqual(split?.targets?.map((t) => metricNames(t.expr ?? "")[0]), ["ctrain_step_compute_seconds", "ctrain_step_wait_seconds"]);
  assert.ok(panels.some((p) => p.title === "Extraction images/s per worker"), "extraction throughput per worker");
});

// ---- a real Prometheus ----


test("metrics - a real Prometheus on the shipped config scrapes ctrain, fires rules and runs every dashboard query", { timeout: 120_000 }, async () => {
  const dir = await mkdtemp(join(tmpdir(), "ctrain-prom-"));
  const registry = new Registry();
  const m = createMetrics(registry, { job: "ptest", worker: "w0" });
  const srv = await serveMetrics(registry, 0, "127.0.0.1");
  let prom: PromHandle | undefined;
  try {
    m.setBackend("wasm");
    m.countImages("extract", 64);
    m.observeStep("fine_tune", 0.3);
    m.observeAllreduce(0.05, 1000, 1000);
    m.setWorkers({ alive: 1, lost: 1 });
    m.setEvaluation("fine_tune", "train", { loss: Number.NaN, accuracy: 0.1 });
    m.setStepTiming("w0", 0.25, 0.05);

    // The shipped config, faster, without the static example (its target does not exist here).
    const configFile = await writeTestConfig(dir, join(dir, "ctrain-targets.json"));
    await writeScrapeTargets(join(dir, "ctrain-targets.json"), [{ address: `127.0.0.1:${srv.port}`, job: "ptest", worker: "w0" }]);

    prom = await startPrometheus(configFile, join(dir, "data"));
    const base = prom.base;

    const info = await eventually("ctrain_backend_info in Prometheus", async () => {
      const r = await promQuery(base, "ctrain_backend_info");
      return r.data?.result.length ? r.data.result : undefined;
    });
    assert.equal(info.length, 1);
    assert.equal(info[0].metric.job, "ptest", "honor_labels keeps the ctrain job id as job");
    assert.equal(info[0].metric.worker, "w0");
    assert.equal(info[0].metric.backend, "wasm");
    assert.equal(info[0].value[1], "1");
    assert.equal(info[0].metric.exported_job, undefined);
    const up = await promQuery(base, 'up{job="ptest",worker="w0"}');
    assert.equal(up.data?.result[0]?.value[1], "1", "the target's up series carries job and worker");

    // Rules: loss NaN fires at once (for: 0m); a lost worker makes CtrainWorkerDown pending (for: 1m).
    await eventually("CtrainLossNaN firing and CtrainWorkerDown pending", async () => {
      const res = (await (await fetch(`${base}/api/v1/alerts`)).json()) as { data: { alerts: { labels: Record<string, string>; state: string }[] } };
      const state = (name: string): string | undefined => res.data.alerts.find((a) => a.labels.alertname === name)?.state;
      return state("CtrainLossNaN") === "firing" && state("CtrainWorkerDown") === "pending" ? true : undefined;
    });
    const noProgress = await promQuery(base, 'ALERTS{alertname="CtrainNoProgress"}');
    assert.equal(noProgress.data?.result.length, 0, "a job that just progressed is not stuck");

    // Every dashboard and rule expression is valid PromQL once the variables are put in.
    await eventually("two scrapes, so rate() has data", async () => {
      const r = await promQuery(base, 'count_over_time(ctrain_up{job="ptest"}[1m])');
      return Number(r.data?.result[0]?.value[1] ?? 0) >= 2 ? true : undefined;
    });
    const exprs = [...(await dashboardExpressions()), ...(await alertRules()).map((r) => ({ panel: `alert ${r.alert}`, expr: r.expr }))];
    const empty: string[] = [];
    for (const { panel, expr } of exprs) {
      const r = await promQuery(base, substitute(expr));
      assert.equal(r.status, "success", `${panel}: ${substitute(expr)}: ${r.error}`);
      if (!r.data?.result.length) empty.push(panel);
    }
    // Queries over series this test set must return data.
    for (const p of ["Backend in use", "Loss per phase and split", "Workers by state", "Images processed/s per worker and phase", "Step time p50 / p95", "Slowest worker (compute per step)", "Compute and wait per step, per worker"]) {
      assert.ok(!empty.includes(p), `"${p}" returned no data; empty: ${empty.join(", ")}`);
    }
  } finally {
    if (prom) await stopPrometheus(prom.proc);
    await srv.close();
    await rm(dir, { recursive: true, force: true });
  }
});

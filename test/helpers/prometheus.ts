/**
 * A real Prometheus for tests, and the PromQL the shipped monitoring files use: the Grafana dashboard's
 * expressions and the alert rules, with the dashboard variables put in. Shared by
 * test/prometheus_files.test.ts (a synthetic metrics server) and test/prometheus_job.test.ts (a real job).
 */
import assert from "node:assert/strict";
import { spawn, type ChildProcess } from "node:child_process";
import { copyFile, readFile, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { parse as parseYaml, stringify as stringifyYaml } from "yaml";
import { freePort } from "./free_port.js";

// Tests run from dist/test/helpers/; the deploy files stay in the source tree.
export const ROOT = fileURLToPath(new URL("../../../", import.meta.url));
export const PROM_DIR = join(ROOT, "deploy/prometheus");
export const DASHBOARD = join(ROOT, "deploy/grafana/ctrain-dashboard.json");
export const INSTALL_HINT = "install it with `apt-get install -y prometheus` (Debian package, ships prometheus and promtool)";

/** Dashboard variables a test may put in; nothing else may appear in an expression. */
export const DASHBOARD_VARIABLES = ["$job", "$worker", "$__rate_interval"] as const;

export interface Panel {
  id: number;
  type: string;
  title: string;
  targets?: { expr?: string; refId?: string }[];
  panels?: Panel[];
}
export interface Dashboard {
  schemaVersion: number;
  uid: string;
  title: string;
  panels: Panel[];
  templating: { list: { name: string; type: string; query?: unknown; definition?: string }[] };
}
export interface Rule {
  alert?: string;
  record?: string;
  expr: string;
  for?: string;
}
/** One PromQL expression of the monitoring files and where it comes from (`panel title/refId` or `alert <name>`). */
export interface NamedExpr {
  name: string;
  expr: string;
}

export async function loadDashboard(): Promise<Dashboard> {
  return JSON.parse(await readFile(DASHBOARD, "utf8")) as Dashboard;
}

export function allPanels(panels: Panel[]): Panel[] {
  return panels.flatMap((p) => [p, ...allPanels(p.panels ?? [])]);
}

/** Every target expression of the dashboard, named by panel title (plus refId when a panel has several). */
export async function dashboardExpressions(): Promise<{ panel: string; refId?: string; expr: string }[]> {
  const d = await loadDashboard();
  return allPanels(d.panels).flatMap((p) => (p.targets ?? []).map((t) => ({ panel: p.title, refId: t.refId, expr: t.expr ?? "" })));
}

export async function alertRules(): Promise<Rule[]> {
  const doc = parseYaml(await readFile(join(PROM_DIR, "alerts.yml"), "utf8")) as { groups: { name: string; rules: Rule[] }[] };
  return doc.groups.flatMap((g) => g.rules);
}

/** Dashboard targets (`<panel>/<refId>`) and alert rules (`alert <name>`) as one list. */
export async function monitoringExpressions(): Promise<NamedExpr[]> {
  const dash = (await dashboardExpressions()).map((e) => ({ name: `${e.panel}/${e.refId ?? "A"}`, expr: e.expr }));
  const rules = (await alertRules()).map((r) => ({ name: r.alert ? `alert ${r.alert}` : `record ${r.record}`, expr: r.expr }));
  return [...dash, ...rules];
}

/** Put values in for `$job`, `$worker`, `$__rate_interval` (also the `${name}` spelling). */
export function substitute(expr: string, values: { job: string; worker: string; rateInterval: string }): string {
  const v: Record<string, string> = { job: values.job, worker: values.worker, __rate_interval: values.rateInterval };
  return expr.replace(/\$\{?(__rate_interval|job|worker)\}?/g, (_all, name: string) => v[name]);
}

/**
 * Write a copy of the shipped prometheus.yml into `dir` for a test: scrape and rule evaluation every
 * second, only the `ctrain` scrape job, its file_sd pointed at `targetsFile` (re-read every second),
 * and the shipped alerts.yml next to it. Returns the config file.
 */
export async function writeTestConfig(dir: string, targetsFile?: string): Promise<string> {
  const cfg = parseYaml(await readFile(join(PROM_DIR, "prometheus.yml"), "utf8")) as {
    global: Record<string, string>;
    scrape_configs: { job_name: string; file_sd_configs?: { files: string[]; refresh_interval?: string }[] }[];
  };
  cfg.global.scrape_interval = "1s";
  cfg.global.evaluation_interval = "1s";
  // The static example's target does not exist here.
  cfg.scrape_configs = cfg.scrape_configs.filter((c) => c.job_name === "ctrain");
  if (targetsFile) {
    for (const sd of cfg.scrape_configs[0].file_sd_configs ?? []) {
      sd.files = [targetsFile];
      sd.refresh_interval = "1s";
    }
  }
  const file = join(dir, "prometheus.yml");
  await writeFile(file, stringifyYaml(cfg));
  await copyFile(join(PROM_DIR, "alerts.yml"), join(dir, "alerts.yml"));
  return file;
}

export interface PromHandle {
  base: string;
  proc: ChildProcess;
  log: () => string;
}

/** Start `prometheus` on a free port and wait until /-/ready answers; a clear failure when it is not installed. */
export async function startPrometheus(configFile: string, dataDir: string): Promise<PromHandle> {
  // freePort can race with another process; retry a few times on an early exit.
  for (let attempt = 0; ; attempt++) {
    const port = await freePort();
    let out = "";
    const proc = spawn(
      "prometheus",
      [`--config.file=${configFile}`, `--storage.tsdb.path=${dataDir}`, `--web.listen-address=127.0.0.1:${port}`, "--log.level=warn"],
      { stdio: ["ignore", "pipe", "pipe"] },
    );
    const spawnError = new Promise<Error>((resolve) => proc.once("error", resolve));
    proc.stdout!.on("data", (b: Buffer) => (out += b.toString()));
    proc.stderr!.on("data", (b: Buffer) => (out += b.toString()));
    const base = `http://127.0.0.1:${port}`;
    const deadline = Date.now() + 30_000;
    while (Date.now() < deadline) {
      const err = await Promise.race([spawnError, new Promise<undefined>((r) => setTimeout(r, 100, undefined))]);
      if (err) {
        if ((err as NodeJS.ErrnoException).code === "ENOENT") assert.fail(`prometheus not found in PATH: ${INSTALL_HINT}`);
        throw err;
      }
      if (proc.exitCode !== null) break;
      try {
        if ((await fetch(`${base}/-/ready`)).ok) return { base, proc, log: () => out };
      } catch {
        // not listening yet
      }
    }
    await stopPrometheus(proc);
    if (attempt >= 2 || !/address already in use/.test(out)) assert.fail(`prometheus did not become ready:\n${out}`);
  }
}

export async function stopPrometheus(proc: ChildProcess): Promise<void> {
  if (proc.exitCode !== null || proc.signalCode !== null) return;
  const exited = new Promise<void>((r) => proc.once("exit", () => r()));
  proc.kill("SIGTERM");
  const timer = setTimeout(() => proc.kill("SIGKILL"), 5_000);
  await exited;
  clearTimeout(timer);
}

export interface InstantResult {
  status: string;
  error?: string;
  data?: { result: { metric: Record<string, string>; value: [number, string] }[] };
}
export interface RangeResult {
  status: string;
  error?: string;
  data?: { result: { metric: Record<string, string>; values: [number, string][] }[] };
}

/** GET /api/v1/query; `time` in Unix seconds (default: now). */
export async function promQuery(base: string, query: string, time?: number): Promise<InstantResult> {
  const at = time === undefined ? "" : `&time=${time}`;
  const res = await fetch(`${base}/api/v1/query?query=${encodeURIComponent(query)}${at}`);
  return (await res.json()) as InstantResult;
}

/** GET /api/v1/query_range from `start` to `end` (Unix seconds) every `step` seconds. */
export async function promQueryRange(base: string, query: string, start: number, end: number, step = 1): Promise<RangeResult> {
  const res = await fetch(`${base}/api/v1/query_range?query=${encodeURIComponent(query)}&start=${start}&end=${end}&step=${step}`);
  return (await res.json()) as RangeResult;
}

/** Poll `fn` until it returns a value other than undefined, or fail after `timeoutMs` with `what`. */
export async function eventually<T>(what: string, fn: () => Promise<T | undefined>, timeoutMs = 30_000): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const v = await fn();
    if (v !== undefined) return v;
    if (Date.now() > deadline) assert.fail(`timed out after ${timeoutMs} ms waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 250));
  }
}

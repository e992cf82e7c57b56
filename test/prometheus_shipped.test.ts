/**
 * The documented Prometheus set-up as a user runs it (issue 16 item 6): the shipped
 * deploy/prometheus/prometheus.yml and alerts.yml, copied unchanged next to a `runs/` folder, and
 * `ctrain run` without --out (run folder runs/<job>). A real Prometheus must list every process of
 * the run on its targets page, a cache-hit run's coordinator too, nothing else (no example target
 * that is down), and drop the run's targets when it ends.
 */
import assert from "node:assert/strict";
import { copyFile, mkdir, mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, test } from "node:test";
import { runCli, type CliResult } from "./helpers/cli.js";
import { PROM_DIR, eventually, startPrometheus, stopPrometheus, type PromHandle } from "./helpers/prometheus.js";

interface Target { labels: Record<string, string>; health: string }

let root: string;
let prom: PromHandle | undefined;

before(async () => {
  root = await mkdtemp(join(tmpdir(), "ctrain-shipped-"));
  const deploy = join(root, "deploy", "prometheus");
  await mkdir(deploy, { recursive: true });
  for (const f of ["prometheus.yml", "alerts.yml"]) await copyFile(join(PROM_DIR, f), join(deploy, f));
  // The README's command, from the repository root; runs/ does not exist yet.
  prom = await startPrometheus(join(deploy, "prometheus.yml"), join(root, "prom-data"));
});
after(async () => {
  if (prom) await stopPrometheus(prom.proc);
  await rm(root, { recursive: true, force: true });
});

async function activeTargets(): Promise<Target[]> {
  const res = (await (await fetch(`${prom!.base}/api/v1/targets?state=active`)).json()) as { data: { activeTargets: Target[] } };
  return res.data.activeTargets;
}

/** Runs `ctrain run` in the fake repository root, recording the workers Prometheus lists for the job meanwhile. */
async function runWatching(job: string, args: string[]): Promise<{ r: CliResult; seen: Set<string>; others: Set<string> }> {
  const seen = new Set<string>();
  const others = new Set<string>();
  let done = false;
  const running = runCli(["run", "--job", job, "--cache-dir", join(root, "cache"), "--log-format", "json", ...args], { cwd: root }).finally(() => (done = true));
  while (!done) {
    for (const t of await activeTargets()) (t.labels.job === job ? seen : others).add(t.labels.worker ?? t.labels.job);
    await Promise.race([running, new Promise((r) => setTimeout(r, 250))]);
  }
  return { r: await running, seen, others };
}

const JOB = ["--data", "fashion-mnist", "--limit", "300", "--input-size", "64", "--feature-layer", "block_12_add", "--workers", "2"];

test("prometheus as shipped - the targets page lists every process of a run, then drops them", { timeout: 240_000 }, async () => {
  // Enough head epochs that the run outlives discovery: file_sd's 5 s refresh, then the scrape pool's sync
  // (up to 5 s more). A run of 10.9 s (400 epochs on a quiet machine) was missed once.
  const { r, seen, others } = await runWatching("shipped-1", [...JOB, "--epochs", "1000"]);
  assert.equal(r.code, 0, r.stderr.slice(-3000));
  assert.deepEqual([...seen].sort(), ["coordinator", "shipped-1-w0", "shipped-1-w1"], `targets seen: ${[...seen].join(", ")}`);
  assert.deepEqual([...others], [], "no target but the run's (the static example would be down forever)");
  await eventually("the finished run's targets leave Prometheus", async () => ((await activeTargets()).length === 0 ? true : undefined), 20_000);
});

test("prometheus as shipped - a cache-hit run, which starts no worker, lists its coordinator", { timeout: 180_000 }, async () => {
  // The run must outlive discovery (as above): 150 epochs of this small head took 4.2 s on a quiet machine.
  const { r, seen } = await runWatching("shipped-2", [...JOB, "--epochs", "1000"]);
  assert.equal(r.code, 0, r.stderr.slice(-3000));
  assert.match(r.stderr, /feature cache hit/);
  assert.deepEqual([...seen], ["coordinator"]);
});

/**
 * Observability of a real job (issue 6 acceptance): a real Prometheus on the shipped scrape config and
 * alert rules watches a small distributed `ctrain run` (embedded nats-server, 2 worker processes,
 * Fashion-MNIST, data-parallel fine-tuning) through the targets file the run writes. Afterwards every
 * PromQL expression of the Grafana dashboard and of the alert rules is evaluated over the job's time
 * range through the HTTP API and must return data, except the few listed in EXPECTED_EMPTY with the
 * reason; those must stay empty. Alongside, the test scrapes the coordinator's and a worker's /metrics
 * itself during the run and checks names, types, labels and that counters only go up.
 *
 * Processes stop serving /metrics when the job ends (and Prometheus then marks their series stale), so
 * the expressions are evaluated as a range query over the job's lifetime, not as one instant query.
 */
import { after, before, describe, test } from "node:test";
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { mkdtemp, readFile, rm } from "node:fs/promises";
import { randomBytes } from "node:crypto";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { PHASES, SPLITS, SHARD_STATES, WORKER_STATES } from "../core/runtime/metrics.js";
import { CTRAIN_BIN } from "./helpers/cli.js";
import { parseExposition, seriesKey, seriesNames, type Exposition } from "./helpers/prom_text.js";
import {
  alertRules, DASHBOARD_VARIABLES, monitoringExpressions, promQueryRange, startPrometheus, stopPrometheus, substitute, writeTestConfig,
  type PromHandle, type RangeResult,
} from "./helpers/prometheus.js";

const JOB = `obs-${randomBytes(3).toString("hex")}`;
/** Values put in for the dashboard variables: this job, every worker, a window that spans several 1 s scrapes. */
const VARS = { job: JOB, worker: ".*", rateInterval: "1m" };

/**
 * Expressions that return nothing in a healthy job on clean data, by name (`<panel>/<refId>` or
 * `alert <name>`), with the reason. The test fails if one of them returns data, so a change that makes
 * them fire (or a new feature that fills them) is noticed and this list updated.
 */
const EXPECTED_EMPTY: ReadonlyMap<string, string> = new Map([
  ["alert CtrainWorkerDown", "every worker stays up and none is declared lost"],
  ["alert CtrainNoProgress", "the job progresses every second; the alert needs 10 minutes without progress"],
  ["alert CtrainLossNaN", "the loss stays finite"],
  ["alert CtrainStraggler", "both replicas compute at about the same speed (test/stragglers.test.ts makes one slow)"],
]);

/** The parts of the alert expressions that must have data while the job runs (the alert's inputs). */
const ALERT_INPUTS: readonly string[] = [
  `up{job="${JOB}",worker!=""}`,
  `ctrain_workers{job="${JOB}",state="lost"}`,
  `time() - max by (job) (ctrain_last_progress_timestamp_seconds{job="${JOB}"})`,
  `ctrain_loss{job="${JOB}"} == ctrain_loss{job="${JOB}"}`,
  `ctrain_step_compute_seconds{job="${JOB}"} > 0`,
];

/** deploy/prometheus/prometheus.yml's scrape interval, s. */
const SHIPPED_SCRAPE_INTERVAL_S = 15;

/** Seconds in a Prometheus duration such as 1m, 30s, 0m. */
function durationSeconds(d: string): number {
  const m = /^(\d+)(ms|s|m|h)$/.exec(d.trim());
  assert.ok(m, `duration ${d}`);
  return Number(m[1]) * { ms: 0.001, s: 1, m: 60, h: 3600 }[m[2] as "ms" | "s" | "m" | "h"];
}

/** Longest run of samples 1 s apart (the range queries' step) in a range result series. */
function longestRun(values: readonly [number, string][]): number {
  let best = 0;
  let run = 0;
  for (let i = 0; i < values.length; i++) {
    run = i > 0 && Math.round(values[i]![0] - values[i - 1]![0]) === 1 ? run + 1 : 1;
    best = Math.max(best, run);
  }
  return best;
}

/** Type of every ctrain family core/runtime/metrics.ts exports. */
const FAMILY_TYPES: Record<string, string> = {
  ctrain_up: "gauge", ctrain_images_processed_total: "counter", ctrain_shards: "gauge", ctrain_extraction_images_per_second: "gauge",
  ctrain_step_duration_seconds: "histogram", ctrain_allreduce_duration_seconds: "histogram", ctrain_allreduce_bytes_total: "counter",
  ctrain_loss: "gauge", ctrain_accuracy: "gauge", ctrain_workers: "gauge", ctrain_epoch: "gauge", ctrain_step: "gauge",
  ctrain_progress_ratio: "gauge", ctrain_eta_seconds: "gauge", ctrain_last_progress_timestamp_seconds: "gauge",
  ctrain_skipped_inputs_total: "counter", ctrain_decode_errors_total: "counter", ctrain_dropped_messages_total: "counter", ctrain_backend_info: "gauge",
  ctrain_step_compute_seconds: "gauge", ctrain_step_wait_seconds: "gauge",
  ctrain_memory_bytes: "gauge",
};
/** Families the coordinator sets per fine-tuning replica: their `worker` label names a replica, not the process. */
const PER_REPLICA = new Set(["ctrain_step_compute_seconds", "ctrain_step_wait_seconds"]);
/** Families whose series carry the process's `worker` label. */
const PER_PROCESS = new Set([
  "ctrain_up", "ctrain_images_processed_total", "ctrain_extraction_images_per_second", "ctrain_step_duration_seconds", "ctrain_allreduce_duration_seconds",
  "ctrain_allreduce_bytes_total", "ctrain_decode_errors_total", "ctrain_dropped_messages_total", "ctrain_backend_info", "ctrain_memory_bytes",
]);

interface LogLine {
  ts: string;
  msg: string;
  [k: string]: unknown;
}
interface Scrape {
  at: number;
  text: string;
  exp: Exposition;
}
interface JobRun {
  code: number | null;
  lines: LogLine[];
  output: string;
  /** Unix seconds: the run logged its metrics endpoints / finished fine-tuning (workers still up). */
  start: number;
  end: number;
  /** /metrics texts taken during the run, by process (`coordinator`, `<job>-w0`). */
  scrapes: Map<string, Scrape[]>;
  targetsFile: string;
}

let dir = "";
let prom: PromHandle | undefined;
let job: JobRun;

/** Family of a series name: the name itself or, for histogram series, the name without the suffix. */
function familyOf(name: string, types: Map<string, string>): string {
  if (types.has(name)) return name;
  const base = name.replace(/_(bucket|sum|count)$/, "");
  return types.has(base) ? base : name;
}

/** Run the job, scraping `coordinator` and worker 0 directly about every second until it exits. */
async function runJob(cacheDir: string, out: string): Promise<JobRun> {
  const args = [
    CTRAIN_BIN, "run", "--data", "fashion-mnist", "--limit", "300", "--input-size", "64", "--epochs", "30", "--head-units", "16",
    "--fine-tune-layers", "3", "--fine-tune-epochs", "2", "--batch-size", "32", "--shard-size", "64", "--backend", "wasm", "--workers", "2",
    "--cache-dir", cacheDir, "--out", out, "--job", JOB, "--metrics-port", "0", "--log-format", "json", "--seed", "7",
  ];
  const child = spawn(process.execPath, args, { stdio: ["ignore", "pipe", "pipe"], env: { ...process.env, CTRAIN_LOG_LEVEL: "info" } });
  const lines: LogLine[] = [];
  let output = "";
  let buf = "";
  const onData = (d: Buffer): void => {
    const s = d.toString();
    output = (output + s).slice(-200_000);
    buf += s;
    for (let i = buf.indexOf("\n"); i >= 0; i = buf.indexOf("\n")) {
      const line = buf.slice(0, i);
      buf = buf.slice(i + 1);
      if (!line.startsWith("{")) continue;
      try {
        lines.push(JSON.parse(line) as LogLine);
      } catch {
        // not a log line
      }
    }
  };
  child.stdout.on("data", onData);
  child.stderr.on("data", onData);
  const exited = new Promise<number | null>((r) => child.once("close", (code) => r(code)));
  const killer = setTimeout(() => child.kill("SIGKILL"), 300_000);
  let done = false;
  void exited.then(() => (done = true));

  const scrapes = new Map<string, Scrape[]>();
  const endpoints = new Map<string, string>();
  while (!done) {
    if (endpoints.size === 0) {
      const l = lines.find((x) => x.msg === "metrics endpoints");
      for (const t of (l?.targets as string[] | undefined) ?? []) {
        const [who, url] = t.split("=", 2);
        if (who === "coordinator" || who === `${JOB}-w0`) endpoints.set(who, url);
      }
    }
    for (const [who, url] of endpoints) {
      try {
        const res = await fetch(url, { signal: AbortSignal.timeout(2000) });
        if (!res.ok) continue;
        const text = await res.text();
        const list = scrapes.get(who) ?? [];
        list.push({ at: Date.now() / 1000, text, exp: parseExposition(text) });
        scrapes.set(who, list);
      } catch {
        // not listening yet, or gone at the end of the job
      }
    }
    await Promise.race([exited, new Promise((r) => setTimeout(r, 1000))]);
  }
  clearTimeout(killer);
  const code = await exited;
  const when = (msg: string): number => {
    const l = lines.find((x) => x.msg === msg);
    assert.ok(l, `the run logged "${msg}"; exit ${code}\n${output.slice(-4000)}`);
    return Date.parse(l.ts) / 1000;
  };
  return { code, lines, output, start: when("metrics endpoints"), end: when("fine-tuned"), scrapes, targetsFile: join(out, "..", "ctrain-targets", `${JOB}.json`) };
}

async function range(query: string): Promise<RangeResult> {
  const r = await promQueryRange(prom!.base, query, Math.floor(job.start), Math.ceil(job.end), 1);
  assert.equal(r.status, "success", `${query}: ${r.error}`);
  return r;
}

/** Label values seen over the job for `label` in the result of `query`. */
async function labelValues(query: string, label: string): Promise<Set<string>> {
  return new Set((await range(query)).data!.result.map((s) => s.metric[label]));
}

describe("observability", { timeout: 420_000 }, () => {
  before(async () => {
    dir = await mkdtemp(join(tmpdir(), "ctrain-obs-"));
    const out = join(dir, "out");
    // The targets file does not exist yet: Prometheus has no target until the run writes it.
    prom = await startPrometheus(await writeTestConfig(dir, join(dir, "ctrain-targets", `${JOB}.json`)), join(dir, "data"));
    job = await runJob(join(dir, "cache"), out);
    assert.equal(job.code, 0, `ctrain run failed:\n${job.output.slice(-6000)}`);
    // Let the rule evaluations after the last scrape land before querying.
    await new Promise((r) => setTimeout(r, 1500));
  });
  after(async () => {
    if (prom) await stopPrometheus(prom.proc);
    if (dir) await rm(dir, { recursive: true, force: true });
  });

  test("observability - Prometheus discovers every process of the run with the job id as job label", async () => {
    const up = await range(`max_over_time(up{worker=~".*-w0"}[5m]) == 1`);
    assert.equal(up.data!.result.length, 1, `worker 0 was up at some point: ${JSON.stringify(up.data!.result)}`);
    assert.equal(up.data!.result[0].metric.job, JOB, "honor_labels keeps the ctrain job id as job");
    assert.equal(up.data!.result[0].metric.worker, `${JOB}-w0`);
    const workers = await labelValues(`up{job="${JOB}"} == 1`, "worker");
    assert.deepEqual([...workers].sort(), ["coordinator", `${JOB}-w0`, `${JOB}-w1`].sort());
    // The process's own labels and the target's agree: no exported_job/exported_worker.
    // One process can show two series over the job: engine "none" until its frozen graph is built,
    // then the engine in use (a slow machine gets scraped in between). Every process has one.
    const info = await range(`ctrain_backend_info{job="${JOB}"}`);
    assert.deepEqual([...new Set(info.data!.result.map((s) => s.metric.worker))].sort(), [...workers].sort());
    for (const s of info.data!.result) {
      assert.equal(s.metric.exported_job, undefined);
      assert.equal(s.metric.exported_worker, undefined);
      assert.equal(s.metric.backend, "wasm");
    }
    // The dashboard's variables list this job and its processes.
    const jobs = (await (await fetch(`${prom!.base}/api/v1/label/job/values?match[]=ctrain_up&start=${job.start}&end=${job.end}`)).json()) as { data: string[] };
    assert.ok(jobs.data.includes(JOB), `$job offers ${JOB}: ${jobs.data.join(", ")}`);
    const ws = (await (await fetch(`${prom!.base}/api/v1/label/worker/values?match[]=${encodeURIComponent(`ctrain_up{job="${JOB}"}`)}&start=${job.start}&end=${job.end}`)).json()) as { data: string[] };
    assert.deepEqual(ws.data.sort(), [...workers].sort());
  });

  test("observability - every dashboard and alert expression returns data from the job, except the expected empty ones", async () => {
    const exprs = await monitoringExpressions();
    // An alert with `for: 1m` holds after a minute of true evaluations, 4 scrapes at the shipped 15 s;
    // this Prometheus scrapes every second (timeout 1 s), so a worker busy loading its model can miss one
    // scrape. An alert expression counts as "returned data" once it holds for that many seconds here.
    const holdFor = new Map((await alertRules()).map((r) => [`alert ${r.alert}`, Math.max(1, Math.round(durationSeconds(r.for ?? "0s") / SHIPPED_SCRAPE_INTERVAL_S))]));
    const names = new Set(exprs.map((e) => e.name));
    for (const n of EXPECTED_EMPTY.keys()) assert.ok(names.has(n), `EXPECTED_EMPTY names "${n}", which is no dashboard target or alert any more`);
    const empty: string[] = [];
    const unexpected: string[] = [];
    for (const { name, expr } of exprs) {
      const q = substitute(expr, VARS);
      for (const v of DASHBOARD_VARIABLES) assert.ok(!q.includes(v), `${name}: ${v} left in ${q}`);
      // Alert rules carry no job selector: keep them to this job's series.
      const r = await range(name.startsWith("alert ") ? `(${q}) and on (job) ctrain_up{job="${JOB}"}` : q);
      const hasData = r.data!.result.some((s) => longestRun(s.values) >= (holdFor.get(name) ?? 1));
      if (!hasData && !EXPECTED_EMPTY.has(name)) empty.push(`${name}: ${q}`);
      if (hasData && EXPECTED_EMPTY.has(name)) unexpected.push(`${name} (${EXPECTED_EMPTY.get(name)}): ${JSON.stringify(r.data!.result.slice(0, 3).map((s) => s.metric))}`);
    }
    assert.deepEqual(empty, [], `expressions without data over the job:\n${empty.join("\n")}`);
    assert.deepEqual(unexpected, [], `expressions expected empty that returned data (update EXPECTED_EMPTY if the feature now exists):\n${unexpected.join("\n")}`);
    // The alerts are quiet because their conditions are false, not because their inputs are missing.
    for (const q of ALERT_INPUTS) assert.ok((await range(q)).data!.result.length > 0, `alert input ${q} has data`);
    const alerts = await range(`ALERTS{job="${JOB}"}`);
    const held = alerts.data!.result.filter((a) => a.metric.alertstate === "firing" || longestRun(a.values) >= (holdFor.get(`alert ${a.metric.alertname}`) ?? 1));
    assert.deepEqual(held.map((a) => `${a.metric.alertname} ${a.metric.alertstate} for ${longestRun(a.values)} s`), [], "no alert firing, or pending for its scaled `for`, while a healthy job runs");
  });

  test("observability - the dashboard's panels show every phase, split and state of the job", async () => {
    assert.deepEqual([...await labelValues(`ctrain_images_processed_total{job="${JOB}"}`, "phase")].sort(), [...PHASES].sort(), "images processed in every phase");
    assert.deepEqual([...await labelValues(`ctrain_step_duration_seconds_count{job="${JOB}"}`, "phase")].sort(), ["fine_tune", "head"], "step times of head training and fine-tuning");
    for (const phase of ["head", "fine_tune"]) {
      for (const metric of ["ctrain_loss", "ctrain_accuracy"]) {
        const splits = await labelValues(`${metric}{job="${JOB}",phase="${phase}"}`, "split");
        const want = phase === "head" ? [...SPLITS] : ["train", "val"]; // fine_tune test is set right before the run ends
        for (const s of want) assert.ok(splits.has(s), `${metric} ${phase}/${s} (have ${[...splits].join(", ")})`);
      }
    }
    assert.deepEqual([...await labelValues(`ctrain_shards{job="${JOB}"}`, "state")].sort(), [...SHARD_STATES].sort());
    assert.deepEqual([...await labelValues(`ctrain_workers{job="${JOB}"}`, "state")].sort(), [...WORKER_STATES].sort());
    const alive = await range(`max_over_time(ctrain_workers{job="${JOB}",state="alive"}[5m])`);
    assert.equal(Math.max(...alive.data!.result.flatMap((s) => s.values.map((v) => Number(v[1])))), 2, "both workers alive at some point");
    const done = await range(`ctrain_shards{job="${JOB}",state="done"} > 0`);
    assert.ok(done.data!.result.length > 0, "shards reach done");
    const rate = await labelValues(`ctrain_extraction_images_per_second{job="${JOB}"} > 0`, "worker");
    assert.deepEqual([...rate].sort(), [`${JOB}-w0`, `${JOB}-w1`], "both workers report extraction throughput");
    const progress = await labelValues(`ctrain_progress_ratio{job="${JOB}",worker="coordinator"} > 0`, "phase");
    assert.deepEqual([...progress].sort(), [...PHASES].sort(), "the coordinator reports progress of every phase");
    const epochs = await labelValues(`ctrain_epoch{job="${JOB}",worker="coordinator"}`, "phase");
    assert.ok(epochs.has("head") && epochs.has("fine_tune"), `epoch of head and fine_tune (have ${[...epochs].join(", ")})`);
  });

  test("observability - /metrics of the coordinator and a worker across the job: names, types, labels, counters only go up", () => {
    for (const who of ["coordinator", `${JOB}-w0`]) {
      const list = job.scrapes.get(who) ?? [];
      assert.ok(list.length >= 3, `${who}: at least 3 scrapes during the job, got ${list.length}`);
      for (const { exp, text } of list) {
        // Every ctrain family is declared with its type, whether or not it has series yet.
        for (const [name, type] of Object.entries(FAMILY_TYPES)) assert.equal(exp.types.get(name), type, `${who}: # TYPE ${name} ${type}`);
        assert.ok(exp.types.has("process_cpu_seconds_total") && exp.types.has("nodejs_eventloop_lag_p99_seconds"), `${who}: default process metrics`);
        const declared = seriesNames(exp.types);
        for (const s of exp.samples) {
          assert.ok(declared.has(s.name), `${who}: ${s.name} has no # TYPE line`);
          if (!s.name.startsWith("ctrain_")) continue;
          const family = familyOf(s.name, exp.types);
          assert.ok(family in FAMILY_TYPES, `${who}: unknown family ${family}`);
          assert.equal(s.labels.job, JOB, `${who}: ${seriesKey(s)} carries the job id`);
          if (PER_PROCESS.has(family)) assert.equal(s.labels.worker, who, `${who}: ${seriesKey(s)} carries its worker label`);
          else if (PER_REPLICA.has(family)) assert.ok(who === "coordinator" && s.labels.worker?.startsWith(`${JOB}-w`), `${who}: ${seriesKey(s)} names a replica, set by the coordinator`);
          else assert.equal(s.labels.worker, undefined, `${who}: ${seriesKey(s)} is job-wide, without a worker label`);
          if ("phase" in s.labels) assert.ok((PHASES as readonly string[]).includes(s.labels.phase), `${who}: phase of ${seriesKey(s)}`);
          if ("split" in s.labels) assert.ok((SPLITS as readonly string[]).includes(s.labels.split), `${who}: split of ${seriesKey(s)}`);
        }
        assert.doesNotMatch(text, /\bNaN\b/, `${who}: no NaN during a healthy job`);
      }
      // Counters and histogram series never go down or disappear between scrapes of one process.
      const monotonic = (exp: Exposition): Map<string, number> => {
        const m = new Map<string, number>();
        for (const s of exp.samples) {
          const type = exp.types.get(familyOf(s.name, exp.types));
          if (type === "counter" || (type === "histogram" && /_(bucket|sum|count)$/.test(s.name))) m.set(seriesKey(s), s.value);
        }
        return m;
      };
      for (let i = 1; i < list.length; i++) {
        const before = monotonic(list[i - 1].exp);
        const now = monotonic(list[i].exp);
        for (const [key, v] of before) {
          assert.ok(now.has(key), `${who}: ${key} disappeared between scrape ${i - 1} and ${i}`);
          assert.ok(now.get(key)! >= v, `${who}: ${key} went down from ${v} to ${now.get(key)} between scrape ${i - 1} and ${i}`);
        }
      }
      const last = list.at(-1)!.exp.samples;
      const images = last.filter((s) => s.name === "ctrain_images_processed_total");
      assert.ok(images.length > 0 && images.every((s) => s.value > 0), `${who}: images processed counted`);
    }
    // What each role fills.
    const worker = job.scrapes.get(`${JOB}-w0`)!.flatMap((s) => s.exp.samples.map((x) => x.name));
    for (const n of ["ctrain_extraction_images_per_second", "ctrain_allreduce_bytes_total", "ctrain_allreduce_duration_seconds_count", "ctrain_step_duration_seconds_count"]) {
      assert.ok(worker.includes(n), `worker 0 exports ${n}`);
    }
    const coordinator = job.scrapes.get("coordinator")!.flatMap((s) => s.exp.samples.map((x) => x.name));
    for (const n of ["ctrain_shards", "ctrain_workers", "ctrain_loss", "ctrain_accuracy", "ctrain_progress_ratio", "ctrain_eta_seconds", "ctrain_epoch", "ctrain_step"]) {
      assert.ok(coordinator.includes(n), `the coordinator exports ${n}`);
    }
  });

  test(
    "observability - the run takes its processes out of the targets file when it ends",
    async () => {
      const groups = JSON.parse(await readFile(job.targetsFile, "utf8")) as unknown[];
      assert.deepEqual(groups, []);
    },
  );
});

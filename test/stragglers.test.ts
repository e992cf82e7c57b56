/**
 * Stragglers visible, end to end: a real nats-server, a real `ctrain coordinator` and two real
 * `ctrain worker` processes fine-tuning data-parallel (Fashion-MNIST, MobileNetV2 top block, wasm).
 * One worker is slowed by SIGSTOP/SIGCONT (stopped 90% of the time for a while): the coordinator must
 * log it as the straggler by name, its `ctrain_step_compute_seconds` must stand out on the
 * coordinator's /metrics, and the shipped CtrainStraggler rule, fed with the scraped series through
 * `promtool test rules`, must fire for it and only it. The job then finishes normally.
 */
import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import { mkdtemp, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, test } from "node:test";
import { promisify } from "node:util";
import { stringify } from "yaml";
import { Cluster, stopAll, waitExit, type Proc } from "./helpers/cluster.js";
import { check, startNatsServer, type NatsServer } from "./helpers/nats_server.js";
import { PROM_DIR } from "./helpers/prometheus.js";

const run = promisify(execFile);

const JOB_ARGS = [
  "--data", "fashion-mnist", "--limit", "600", "--input-size", "64", "--epochs", "1", "--head-units", "16", "--dropout", "0",
  "--fine-tune-layers", "3", "--fine-tune-epochs", "3", "--batch-size", "32", "--backend", "wasm", "--log-format", "json", "--seed", "42",
];
// 3 fine-tuning epochs of 19 steps: the throttling below takes about 8 of them (a slowed step lasts about
// one throttle cycle), the steps before it about 12 even on a fast machine, so the job outlasts the
// detection with steps to spare; every epoch beyond that only adds time after the checks.
/** promtool's sample interval for the scraped values (one scrape per throttle cycle = one 15 s step). */
const INTERVAL_S = 15;

let dir: string;
let nats: NatsServer;
let cluster: Cluster;

before(async () => {
  dir = await mkdtemp(join(tmpdir(), "ctrain-straggler-"));
  nats = await startNatsServer();
  cluster = new Cluster({ dir, jobArgs: JOB_ARGS, coordinatorArgs: ["--workers", "2", "--data-parallel", "on"], logLevel: "info" });
});

after(async () => {
  cluster?.killAll();
  await nats?.stop();
  await rm(dir, { recursive: true, force: true });
});

type Scrape = Map<string, number>;

/** The coordinator's ctrain_step_compute_seconds per worker. */
async function computeByWorker(c: Proc, job: string): Promise<Scrape> {
  const e = await c.metrics();
  const out: Scrape = new Map();
  for (const s of e.samples) if (s.name === "ctrain_step_compute_seconds" && s.labels["job"] === job) out.set(s.labels["worker"]!, s.value);
  return out;
}

/** The rule's test on one scrape, for choosing promtool's evaluation time: who is over 1.5x the median of the non-zero values. */
function slowOnes(s: Scrape): string[] {
  const v = [...s.values()].filter((x) => x > 0).sort((a, b) => a - b);
  if (v.length < 2) return [];
  const med = v.length % 2 ? v[v.length >> 1]! : (v[v.length / 2 - 1]! + v[v.length / 2]!) / 2;
  return [...s].filter(([, x]) => x > 0 && x > 1.5 * med).map(([w]) => w);
}

test("stragglers - a worker slowed by SIGSTOP is logged by name, stands out in ctrain_step_compute_seconds, and only it fires CtrainStraggler", { timeout: 600_000 }, async () => {
  const job = "strag";
  const c = await cluster.coordinator(nats.url, job);
  const ws = [await cluster.worker(nats.url, job, "strag-w0"), await cluster.worker(nats.url, job, "strag-w1")];
  const [fast, slow] = ws as [Proc, Proc];
  try {
    await slow.waitFor("training", 400_000);
    // Both replicas have reported steps: every series is non-zero.
    await check(async () => {
      const s = await computeByWorker(c, job);
      return s.get(fast.name)! > 0 && s.get(slow.name)! > 0 ? true : undefined;
    }, 120_000, 250);

    // Throttle the slow one (stopped 900 ms of every second) until the coordinator has logged it
    // and the scraped gauge has shown it slow on 6 scrapes in a row (the rule's `for: 1m` at 15 s).
    const scrapes: Scrape[] = [];
    let inARow = 0;
    for (let cycle = 0; cycle < 120 && !(inARow >= 6 && c.logged("straggler").length > 0); cycle++) {
      slow.proc.kill("SIGSTOP");
      await new Promise((r) => setTimeout(r, 900));
      slow.proc.kill("SIGCONT");
      await new Promise((r) => setTimeout(r, 100));
      const s = await computeByWorker(c, job);
      scrapes.push(s);
      inARow = slowOnes(s).includes(slow.name) ? inARow + 1 : 0;
    }
    slow.proc.kill("SIGCONT");
    assert.ok(inARow >= 6, `the slowed worker's compute never stood out for 6 scrapes: ${JSON.stringify(scrapes.map((s) => Object.fromEntries(s)))}`);

    // The coordinator names the straggler, and only it.
    const logged = c.logged("straggler");
    assert.ok(logged.length >= 1, `no straggler logged\n${c.tail()}`);
    assert.deepEqual([...new Set(logged.map((l) => l["worker"]))], [slow.name], JSON.stringify(logged));
    assert.ok(Number(logged[0]!["ratio"]) > 1.5, JSON.stringify(logged[0]));
    // The metric: the slowed worker over 1.5x the median on the last scrapes; the other never.
    for (const s of scrapes) assert.ok(!slowOnes(s).includes(fast.name), `the undisturbed worker looked slow: ${JSON.stringify(Object.fromEntries(s))}`);

    // The shipped rule on the scraped series (one scrape per 15 s step): at the last scrape it fires
    // for the slowed worker, and for nobody at any earlier evaluation where it had not lasted 1m.
    const series = [fast.name, slow.name].map((w) => ({
      series: `ctrain_step_compute_seconds{job="${job}",worker="${w}",instance="coordinator"}`,
      values: scrapes.map((s) => String(s.get(w) ?? 0)).join(" "),
    }));
    const last = (scrapes.length - 1) * INTERVAL_S;
    const rules = {
      rule_files: [join(PROM_DIR, "alerts.yml")],
      evaluation_interval: `${INTERVAL_S}s`,
      tests: [{
        interval: `${INTERVAL_S}s`,
        input_series: series,
        alert_rule_test: [
          { eval_time: "0s", alertname: "CtrainStraggler", exp_alerts: [] },
          {
            eval_time: `${last}s`, alertname: "CtrainStraggler",
            exp_alerts: [{
              exp_labels: { severity: "warning", job, worker: slow.name, instance: "coordinator" },
              exp_annotations: {
                summary: `ctrain job ${job}: worker ${slow.name} is a straggler`,
                description: `Worker ${slow.name} computes each step more than 1.5x slower than the median worker, so every step waits for it. Check its node (CPU throttling, noisy neighbours, a stopped process) or remove it; the job re-plans without a lost worker.`,
              },
            }],
          },
        ],
      }],
    };
    const file = join(dir, "straggler_rules_test.yml");
    await writeFile(file, stringify(rules));
    const r = await run("promtool", ["test", "rules", file]).catch((e: { stdout?: string; stderr?: string }) => ({ stdout: e.stdout ?? "", stderr: e.stderr ?? String(e) }));
    assert.match(r.stdout + r.stderr, /SUCCESS/, `promtool:\n${r.stdout}${r.stderr}\n${stringify(series)}`);

    // Fault semantics unchanged: the job finishes.
    const code = await waitExit(c, 400_000);
    assert.equal(code, 0, `coordinator ended with ${code}\n${c.tail()}\n${ws.map((w) => w.tail()).join("\n")}`);
  } finally {
    slow.proc.kill("SIGCONT");
    await stopAll([...ws, c]);
  }
});

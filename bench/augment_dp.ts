/**
 * bench/augment_dp: method 2's head phase (`--method augment`: frozen base + dense head trained on
 * augmented images) data-parallel on N = 1, 2, 4 `ctrain worker` processes (wasm + onnxruntime) through
 * a private nats-server, Fashion-MNIST, default augmentation, the same global batch for every N.
 *
 * Each N runs a whole `ctrain coordinator --method augment --data-parallel on` job; the feature cache
 * (validation and test of method 2 run on it) is shared, so only the first job extracts. The figures
 * come from each worker's "training done" log of the head phase: fit() wall seconds, seconds in
 * averaging (reduce-scatter + fan-out, waiting for the slowest peer included), and the image batches'
 * busy time (core/training/image_batches.ts onTiming: decode + augment, frozen forward). With prefetch,
 * batch b+1 is decoded, augmented and run through the frozen base while step b trains and averages,
 * so those two are busy times beside the wall step, not parts of it. "head + wait" is the wall step
 * less averaging: the head's forward/backward, the previous update, and the wait for a prefetched batch
 * that was not ready yet (train_loop does not time that wait apart; when the head step is small, as
 * for a dense head, it is mostly that wait). N=4 on this 2-core machine is 4 processes sharing 2
 * cores: it measures overhead, not scaling.
 *
 * --rounds R repeats the Ns R times, interleaved (1,2,4,1,2,4), and reports each run and the means.
 * --threads T sets the job's onnxruntime threads per worker (`ctrain coordinator --threads`; default:
 * the job's, cores / local workers), e.g. 1 to compare N workers as if each had one core.
 *
 *   node dist/bench/augment_dp.js [--limit 2000] [--input-size 64] [--epochs 1] [--batch-size 64] [--workers 1,2,4] [--rounds 1] [--threads T] [--out FILE]
 */
import { execFileSync } from "node:child_process";
import { runCtrain } from "./ctrain_process.js";
import { mkdtemp, readFile, rm, writeFile } from "node:fs/promises";
import { availableParallelism, cpus, loadavg, tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { startEmbeddedNats } from "../coordinator/embedded_nats.js";
import { natsAuthEnv } from "../core/runtime/nats_connect.js";

const arg = (name: string, def: string): string => {
  const i = process.argv.indexOf(`--${name}`);
  return i >= 0 ? process.argv[i + 1]! : def;
};
const r = (x: number, d = 4): number => Number(x.toFixed(d));
const TARGETS = { n2_over_n1_images_per_second_at_least: 1.7, averaging_share_at_n2_at_most: 0.15 };


/** A worker's "training done" line of the head phase (worker/replica_session.ts). */
interface Done {
  steps_run: number;
  train_seconds: number;
  allreduce_seconds: number;
  step_seconds: number;
  allreduce_bytes_per_step: number;
  prep_batches?: number;
  decode_augment_seconds?: number;
  frozen_forward_seconds?: number;
}

interface Settings {
  limit: string;
  inputSize: string;
  epochs: string;
  batch: string;
  /** onnxruntime threads per worker ("" = the job's default). */
  threads: string;
  natsUrl: string;
  auth: Record<string, string>;
  dir: string;
}

/** Busy and total jiffies of all cores since boot (/proc/stat); undefined where there is none. */
async function cpuJiffies(): Promise<{ busy: number; total: number } | undefined> {
  const first = (await readFile("/proc/stat", "utf8").catch(() => "")).split("\n")[0] ?? "";
  const v = first.trim().split(/\s+/).slice(1).map(Number);
  if (!first.startsWith("cpu ") || v.length < 5) return undefined;
  const total = v.reduce((a, b) => a + b, 0);
  return { busy: total - v[3]! - (v[4] ?? 0), total };
}

/** One whole method-2 job on `n` fresh workers; the workers' head-phase "training done" lines and the machine's CPU busy share over the job. */
async function job(n: number, s: Settings, round: number): Promise<{ done: Done[]; seconds: number; cpuBusy: number }> {
  const cpu0 = await cpuJiffies();
  const name = `benchaug${n}r${round}`;
  const workers = Array.from({ length: n }, (_, i) => runCtrain(["worker", "--nats", s.natsUrl, "--job", name, "--worker-id", `${name}-w${i}`, "--backend", "wasm", "--metrics-port", "-1", "--log-format", "json"], s.auth));
  const t0 = performance.now();
  const coord = await runCtrain([
    "coordinator", "--nats", s.natsUrl, "--job", name, "--data", "fashion-mnist", "--limit", s.limit, "--input-size", s.inputSize, "--method", "augment",
    "--epochs", s.epochs, "--fine-tune-epochs", "0", "--batch-size", s.batch, "--backend", "wasm", "--workers", String(n), "--data-parallel", "on",
    "--cache-dir", join(s.dir, "cache"), "--out", join(s.dir, name), "--metrics-port", "-1", "--log-format", "json", "--seed", "42",
    ...(s.threads ? ["--threads", s.threads] : []),
  ], s.auth).done;
  const seconds = (performance.now() - t0) / 1000;
  const cpu1 = await cpuJiffies();
  const cpuBusy = cpu0 && cpu1 ? (cpu1.busy - cpu0.busy) / Math.max(1, cpu1.total - cpu0.total) : NaN;
  // Workers stay up after a job: stop them (SIGTERM drains).
  for (const w of workers) w.proc.kill("SIGTERM");
  const logs = await Promise.all(workers.map((w) => w.done));
  if (coord.code !== 0) {
    const warnings = logs.map((w) => w.lines.filter((l) => l["level"] !== "info").slice(-6));
    throw new Error(`coordinator N=${n} exited ${coord.code}: ${JSON.stringify(coord.lines.slice(-3))}; workers' last warnings: ${JSON.stringify(warnings)}`);
  }
  const done = logs.flatMap((w) => w.lines.filter((l) => l["msg"] === "training done" && l["phase"] === "head")) as unknown as Done[];
  if (done.length !== n) throw new Error(`N=${n}: ${done.length} of ${n} workers reported a head-phase "training done" (did the head phase run in the coordinator? ${JSON.stringify(coord.lines.filter((l) => l["level"] === "warn").slice(-3))})`);
  return { done, seconds, cpuBusy };
}

/** The per-N row: images/s and the per-step split (means over the workers). */
function row(n: number, batch: number, d: { done: Done[]; seconds: number; cpuBusy: number }, load: number): Record<string, number> {
  const mean = (f: (x: Done) => number): number => d.done.reduce((a, x) => a + f(x), 0) / d.done.length;
  const steps = d.done[0]!.steps_run;
  const step = mean((x) => x.step_seconds);
  const avg = mean((x) => x.allreduce_seconds) / steps;
  const slowest = Math.max(...d.done.map((x) => x.train_seconds));
  return {
    workers: n, steps, global_batch: batch, images_per_second: r((steps * batch) / slowest, 2),
    wall_step_seconds: r(step), decode_augment_busy_seconds_per_step: r(mean((x) => x.decode_augment_seconds ?? NaN) / steps),
    frozen_forward_busy_seconds_per_step: r(mean((x) => x.frozen_forward_seconds ?? NaN) / steps), head_step_and_batch_wait_seconds: r(step - avg),
    averaging_seconds_per_step: r(avg), averaging_share: r(avg / step, 3), averaging_bytes_per_step_per_worker: Math.round(mean((x) => x.allreduce_bytes_per_step)), job_seconds: r(d.seconds, 1), machine_cpu_busy_share: r(d.cpuBusy, 3), load_average_at_start: r(load, 2),
  };
}

function table(rows: Record<string, number>[]): string {
  const cols: [string, string][] = [
    ["round", "round"], ["N", "workers"], ["img/s", "images_per_second"], ["wall step s", "wall_step_seconds"], ["decode+aug s", "decode_augment_busy_seconds_per_step"],
    ["frozen fwd s", "frozen_forward_busy_seconds_per_step"], ["head+wait s", "head_step_and_batch_wait_seconds"], ["averaging s", "averaging_seconds_per_step"], ["avg share", "averaging_share"], ["cpu busy", "machine_cpu_busy_share"],
  ];
  const lines = [cols.map(([h]) => h.padStart(13)).join("")];
  for (const x of rows) lines.push(cols.map(([, k]) => String(x[k]).padStart(13)).join(""));
  return lines.join("\n");
}

/** Mean of `key` over the rows of `n` workers (all rounds); undefined when none ran. */
function meanOf(rows: Record<string, number>[], n: number, key: string): number | undefined {
  const xs = rows.filter((x) => x["workers"] === n).map((x) => x[key]!);
  return xs.length ? xs.reduce((a, b) => a + b, 0) / xs.length : undefined;
}

/** Speed-ups against N=1 (means over rounds, and each round's), and whether the targets were met. */
function ratios(rows: Record<string, number>[]): Record<string, unknown> {
  const ratio = (rs: Record<string, number>[], n: number): number | null => {
    const a = meanOf(rs, n, "images_per_second"), b = meanOf(rs, 1, "images_per_second");
    return a !== undefined && b !== undefined ? r(a / b, 3) : null;
  };
  const rounds = [...new Set(rows.map((x) => x["round"]!))];
  const n2 = ratio(rows, 2), share = meanOf(rows, 2, "averaging_share") ?? null;
  return {
    n2_over_n1_images_per_second: n2, n4_over_n1_images_per_second: ratio(rows, 4), averaging_share_at_n2: share === null ? null : r(share, 3),
    per_round: rounds.map((k) => { const rs = rows.filter((x) => x["round"] === k); return { round: k, n2_over_n1: ratio(rs, 2), n4_over_n1: ratio(rs, 4) }; }),
    targets: TARGETS,
    targets_met: {
      n2_speedup: n2 === null ? null : n2 >= TARGETS.n2_over_n1_images_per_second_at_least,
      averaging_share_at_n2: share === null ? null : share <= TARGETS.averaging_share_at_n2_at_most,
    },
  };
}

const uptime = (): string => { try { return execFileSync("uptime", { encoding: "utf8" }).trim(); } catch { return loadavg().map((x) => x.toFixed(2)).join(", "); } };

async function main(): Promise<void> {
  const s0 = { limit: arg("limit", "2000"), inputSize: arg("input-size", "64"), epochs: arg("epochs", "1"), batch: arg("batch-size", "64"), threads: arg("threads", "") };
  if (s0.threads && !(Number.isInteger(Number(s0.threads)) && Number(s0.threads) >= 1)) throw new Error(`--threads takes a whole number >= 1, got ${JSON.stringify(s0.threads)}`);
  const ns = arg("workers", "1,2,4").split(",").map(Number);
  if (ns.some((n) => !Number.isInteger(n) || n < 1)) throw new Error(`--workers takes a comma-separated list of worker counts >= 1, got ${JSON.stringify(arg("workers", ""))}`);
  const rounds = Number(arg("rounds", "1"));
  if (!Number.isInteger(rounds) || rounds < 1) throw new Error(`--rounds takes a whole number >= 1, got ${JSON.stringify(arg("rounds", ""))}`);
  const before = uptime();
  const dir = await mkdtemp(join(tmpdir(), "ctrain-bench-aug-"));
  const nats = await startEmbeddedNats();
  const s: Settings = { ...s0, natsUrl: nats.url, auth: natsAuthEnv(nats.credentials.coordinator), dir };
  const rows: Record<string, number>[] = [];
  try {
    // Rounds interleave the Ns (1,2,4,1,2,4...) so that each ratio compares runs under similar load.
    for (let k = 1; k <= rounds; k++) {
      for (const n of ns) {
        const load = loadavg()[0]!;
        rows.push({ round: k, ...row(n, Number(s.batch), await job(n, s, k), load) });
        console.log(JSON.stringify(rows.at(-1)));
      }
    }
  } finally {
    await nats.stop();
    await rm(dir, { recursive: true, force: true });
  }
  await report(s0, rows, before);
}

async function report(s: Omit<Settings, "natsUrl" | "auth" | "dir">, rows: Record<string, number>[], before: string): Promise<void> {
  const out = {
    bench: "augment_dp", when: new Date().toISOString(), command: `node ${process.argv.slice(1).map((a) => a.replace(/^.*\/dist\//, "dist/")).join(" ")}`,
    machine: { cpus: cpus().length, parallelism: availableParallelism(), model: cpus()[0]?.model ?? "" },
    load: { before, after: uptime() },
    setup: { data: "fashion-mnist", method: "augment (head phase; default augmentation)", limit: Number(s.limit), input_size: Number(s.inputSize), epochs: Number(s.epochs), global_batch: Number(s.batch), backend: "wasm + onnxruntime (frozen base)", onnxruntime_threads_per_worker: s.threads ? Number(s.threads) : "job default (cores / local workers)" },
    columns: {
      images_per_second: "training images per second: steps x global batch / fit() wall seconds of the slowest worker",
      wall_step_seconds: "fit() wall seconds per step (mean over workers)",
      decode_augment_busy_seconds_per_step: "busy seconds per step decoding + augmenting this worker's part (prefetched: overlaps the previous step)",
      frozen_forward_busy_seconds_per_step: "busy seconds per step of the frozen base's forward on this worker's part (onnxruntime; prefetched: overlaps the previous step)",
      head_step_and_batch_wait_seconds: "wall step less averaging: the head's forward/backward, the previous update, and the wait for the prefetched batch when it is not ready yet (not timed apart)",
      averaging_seconds_per_step: "gradient averaging per step, waiting for the slowest peer included",
      averaging_share: "averaging / wall step",
      averaging_bytes_per_step_per_worker: "bytes sent + received per step by one worker (the head's gradient; 0 for one worker)",
      machine_cpu_busy_share: "share of all cores' time busy (any process, other helpers' included) over the whole job (/proc/stat), extraction of a cold cache included at the first N",
    },
    note: "Other helpers share this machine's 2 cores (see load). N=4 is 4 worker processes sharing 2 cores: it shows overhead, not scaling. Ratios come from the same run (means over its rounds; per_round for each). The image batch times are wall times of busy parts: on a loaded machine they include time the process waited for a core.",
    results: rows, ...ratios(rows),
  };
  const file = arg("out", join(fileURLToPath(new URL("../../bench/results/", import.meta.url)), "augment_dp.json"));
  await writeFile(file, JSON.stringify(out, null, 2) + "\n");
  console.log(table(rows));
  console.log(JSON.stringify(ratios(rows)));
  console.log(`wrote ${file}`);
}

await main();

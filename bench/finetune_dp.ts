/**
 * bench/finetune_dp: data-parallel fine-tuning step time split into compute and communication, for
 * N = 1, 2 worker processes (`ctrain worker`, wasm) on this machine, through a private nats-server.
 *
 * Each N runs a whole `ctrain coordinator --data-parallel on` job (Fashion-MNIST, MobileNetV2 top
 * block); the activation cache is shared, so only the first run extracts. The figures come from each
 * worker's "training done" log: wall seconds of fit(), seconds spent in averaging (reduce-scatter +
 * fan-out, including waiting for the slowest peer), bytes sent + received per step. Compute is the
 * difference (forward, backward, optimizer update, slicing). Writes bench/results/finetune_dp.json.
 *
 * With --profile every worker runs under `node --cpu-prof` and each result carries the breakdown of
 * the workers' CPU (bench/cpu_profile.ts: compute, averaging costs, NATS, GC, waiting).
 *
 * --bucket-bytes passes the chunk size to the job (default: the job's); --baseline FILE embeds that
 * file's results (a run of the code before a change) under `before`, for a before/after table.
 *
 *   node dist/bench/finetune_dp.js [--limit 600] [--input-size 96] [--fine-tune-layers 3] [--batch-size 32] [--epochs 2] [--workers 1,2] [--wire-dtype fp32|fp16] [--bucket-bytes N] [--profile] [--baseline FILE] [--out FILE]
 */
import { type CtrainProcess, runCtrain } from "./ctrain_process.js";
import { mkdir, mkdtemp, readFile, rm, writeFile } from "node:fs/promises";
import { availableParallelism, cpus, loadavg, tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { startEmbeddedNats } from "../coordinator/embedded_nats.js";
import { profileBreakdown } from "./cpu_profile.js";
import { natsAuthEnv } from "../core/runtime/nats_connect.js";

const arg = (name: string, def: string): string => {
  const i = process.argv.indexOf(`--${name}`);
  return i >= 0 ? process.argv[i + 1]! : def;
};
const r = (x: number, d = 4): number => Number(x.toFixed(d));

interface Done {
  worker: string;
  steps_run: number;
  train_seconds: number;
  allreduce_seconds: number;
  step_seconds: number;
  allreduce_bytes_per_step: number;
}

function run(args: string[], env: Record<string, string> = {}, profileDir?: string): CtrainProcess {
  return runCtrain(args, env, profileDir ? ["--cpu-prof", "--cpu-prof-dir", profileDir] : []);
}

async function main(): Promise<void> {
  const limit = arg("limit", "600");
  const inputSize = arg("input-size", "96");
  const layers = arg("fine-tune-layers", "3");
  const batch = arg("batch-size", "32");
  const epochs = arg("epochs", "2");
  const ns = arg("workers", "1,2").split(",").map(Number);
  const profile = process.argv.includes("--profile");
  const wire = arg("wire-dtype", "fp32");
  const bucket = arg("bucket-bytes", "");
  const baseline = process.argv.includes("--baseline") ? (JSON.parse(await readFile(arg("baseline", ""), "utf8")) as Record<string, unknown>) : undefined;
  const dir = await mkdtemp(join(tmpdir(), "ctrain-bench-dp-"));
  const nats = await startEmbeddedNats();
  // One server for every job of the bench: each process gets the coordinator's (unrestricted) user.
  const auth = natsAuthEnv(nats.credentials.coordinator);
  const results: Record<string, unknown>[] = [];
  try {
    for (const n of ns) {
      const job = `benchdp${n}`;
      const profileDir = profile ? join(dir, `prof-${n}`) : undefined;
      if (profileDir) await mkdir(profileDir, { recursive: true });
      const load = loadavg()[0]!;
      const workers = Array.from({ length: n }, (_, i) => run(["worker", "--nats", nats.url, "--job", job, "--worker-id", `${job}-w${i}`, "--backend", "wasm", "--metrics-port", "-1", "--log-format", "json"], auth, profileDir));
      const coord = await run([
        "coordinator", "--nats", nats.url, "--job", job, "--data", "fashion-mnist", "--limit", limit, "--input-size", inputSize, "--epochs", "1",
        "--fine-tune-layers", layers, "--fine-tune-epochs", epochs, "--batch-size", batch, "--dropout", "0", "--backend", "wasm", "--workers", String(n),
        "--data-parallel", "on", "--wire-dtype", wire, ...(bucket ? ["--bucket-bytes", bucket] : []), "--cache-dir", join(dir, "cache"), "--out", join(dir, job), "--metrics-port", "-1", "--log-format", "json", "--seed", "42",
      ], auth).done;
      if (coord.code !== 0) {
        for (const w of workers) w.proc.kill("SIGTERM");
        const logs = (await Promise.all(workers.map((w) => w.done))).map((w) => w.lines.filter((l) => l["level"] !== "info" || String(l["msg"]).includes("lost") || String(l["msg"]).includes("fail")).slice(-6));
        throw new Error(`coordinator N=${n} exited ${coord.code}: ${JSON.stringify(coord.lines.slice(-3))}; workers' last warnings: ${JSON.stringify(logs)}`);
      }
      // Workers stay up after a job: stop them (SIGTERM drains).
      for (const w of workers) w.proc.kill("SIGTERM");
      const done = (await Promise.all(workers.map((w) => w.done))).flatMap((w) => w.lines.filter((l) => l["msg"] === "training done")) as unknown as Done[];
      if (done.length === 0) throw new Error(`N=${n}: no worker reported "training done"`);
      const mean = (f: (d: Done) => number): number => done.reduce((a, d) => a + f(d), 0) / done.length;
      const steps = done[0]!.steps_run;
      const step = mean((d) => d.step_seconds);
      const comm = mean((d) => d.allreduce_seconds) / steps;
      const res = {
        workers: n, steps, step_seconds: r(step), compute_seconds_per_step: r(step - comm), allreduce_seconds_per_step: r(comm),
        communication_share: r(comm / step, 3), bytes_per_step_per_worker: Math.round(mean((d) => d.allreduce_bytes_per_step)),
        images_per_second: r((steps * Number(batch)) / mean((d) => d.train_seconds), 2),
        load_average_at_start: r(load, 2),
        // With --profile: where the workers' CPU went over the whole worker life (extraction of a cold cache included).
        ...(profileDir ? { profile: await profileBreakdown(profileDir) } : {}),
      };
      console.log(JSON.stringify(res));
      results.push(res);
    }
  } finally {
    await nats.stop();
    await rm(dir, { recursive: true, force: true });
  }
  await mkdir(new URL("./results/", import.meta.url), { recursive: true }).catch(() => undefined);
  const out = {
    bench: "finetune_dp", when: new Date().toISOString(), machine: { cpus: cpus().length, parallelism: availableParallelism(), model: cpus()[0]?.model ?? "" },
    setup: { data: "fashion-mnist", limit: Number(limit), input_size: Number(inputSize), fine_tune_layers: layers, global_batch: Number(batch), epochs: Number(epochs), backend: "wasm", wire, bucket_bytes: bucket ? Number(bucket) : "job default" },
    note: "compute = fit wall time per step minus time in averaging (which includes waiting for the slowest peer); bytes = sent + received per worker per step. On 2 shared cores N=2 workers also compete for CPU.",
    results,
    ...(baseline ? { before: baseline } : {}),
  };
  const file = arg("out", join(fileURLToPath(new URL("../../bench/results/", import.meta.url)), "finetune_dp.json"));
  await writeFile(file, JSON.stringify(out, null, 2) + "\n");
  console.log(`wrote ${file}`);
}

await main();

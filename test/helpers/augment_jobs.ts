/**
 * `--method augment` jobs as a user runs them, for the data-parallel tests of method 2
 * (test/augment_dp*.test.ts): a real nats-server, `ctrain coordinator` and `ctrain worker` processes
 * with the same small job (Fashion-MNIST, 200 training images at input 32, the real MobileNetV2 base,
 * head then 3 top layers fine-tuned), and the one-process reference they are compared with. Default
 * dropout (0.5) and default augmentation: both are drawn per (seed, epoch, global sample index), so a
 * worker's part of a batch gets the same masks and transforms as those samples in one process.
 */
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { mkdtemp, readFile, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { CTRAIN_BIN } from "./cli.js";
import { Proc } from "./cluster.js";
import { startNatsServer, type NatsServer } from "./nats_server.js";

export const AUGMENT_JOB_ARGS = [
  "--data", "fashion-mnist", "--limit", "200", "--input-size", "32", "--epochs", "4", "--head-units", "16",
  "--method", "augment",
  "--fine-tune-layers", "3", "--fine-tune-epochs", "1", "--fine-tune-learning-rate", "0.001", "--restore-best-weights", "false", "--batch-size", "24",
  "--backend", "wasm", "--log-format", "json", "--seed", "7", "--metrics-port", "-1",
];

/** `args` with each option of `options` set to its value (replaced where given, else appended). */
export function withOptions(args: readonly string[], options: Record<string, string>): string[] {
  const out = [...args];
  for (const [flag, value] of Object.entries(options)) {
    const i = out.indexOf(flag);
    if (i >= 0) out[i + 1] = value;
    else out.push(flag, value);
  }
  return out;
}

/** A phase in summary.json: who trained it, its epochs (fewer than asked when stopped early) and the best one (restored). */
export interface PhaseSummary {
  workers: number;
  epochs: number;
  epochs_asked?: number;
  best_epoch?: number;
  val_accuracy: number;
}

export interface AugmentSummary {
  samples: { train: number };
  phases: { head: PhaseSummary; fine_tune: PhaseSummary };
}

/** One folder, one nats-server, the processes started (all killed by `close`), and the reference weights. */
export class AugmentJobs {
  readonly procs: Proc[] = [];
  /** The one-process run's head-only classifier (model-head/) and fine-tuned one (model/). */
  reference: { head: Float32Array; fineTuned: Float32Array } = { head: new Float32Array(0), fineTuned: new Float32Array(0) };

  private constructor(readonly dir: string, readonly nats: NatsServer, readonly args: readonly string[]) {}

  /** A folder and a nats-server, and the one-process reference run of the job `args` (which fills the shared feature cache). */
  static async start(args: readonly string[] = AUGMENT_JOB_ARGS): Promise<AugmentJobs> {
    const jobs = new AugmentJobs(await mkdtemp(join(tmpdir(), "ctrain-augdp-")), await startNatsServer(), args);
    const ref = jobs.ctrain("reference", ["run", ...args, "--workers", "1", "--cache-dir", join(jobs.dir, "cache"), "--out", join(jobs.dir, "reference")]);
    await jobs.succeeds(ref, []);
    assert.equal((await jobs.summary("reference")).phases.head.workers, 1, "the reference trained in one process");
    jobs.reference = { head: await jobs.weights("reference"), fineTuned: await jobs.weights("reference", "model") };
    // Fine-tuning moves the weights well beyond the tolerance, so a fine-tuned comparison can fail.
    assert.ok(maxAbsDiff(jobs.reference.head, jobs.reference.fineTuned) > 1e-3, "fine-tuning changed the weights");
    return jobs;
  }

  ctrain(name: string, args: string[], env: NodeJS.ProcessEnv = {}, metricsPort?: number): Proc {
    const proc = spawn(process.execPath, [CTRAIN_BIN, ...args], { env: { ...process.env, ...env }, stdio: ["ignore", "pipe", "pipe"] });
    const p = new Proc(name, proc, metricsPort);
    this.procs.push(p);
    return p;
  }

  worker(job: string, id: string, o: { env?: NodeJS.ProcessEnv; metricsPort?: number } = {}): Proc {
    const port = o.metricsPort ?? -1;
    return this.ctrain(id, ["worker", "--nats", this.nats.url, "--job", job, "--worker-id", id, "--backend", "wasm", "--metrics-port", String(port), "--log-format", "json"], o.env, o.metricsPort);
  }

  /** A coordinator of the job on `workers` workers (data-parallel even with one); `fineTune: false` stops after the head phase. */
  coordinator(job: string, workers: number, env: NodeJS.ProcessEnv = {}, o: { fineTune?: boolean } = {}): Proc {
    const args = o.fineTune === false ? withOptions(this.args, { "--fine-tune-layers": "0" }) : this.args;
    return this.ctrain(`coordinator-${job}`, [
      "coordinator", "--nats", this.nats.url, "--job", job, ...args, "--workers", String(workers), "--data-parallel", "on", "--cache-dir", join(this.dir, "cache"), "--out", join(this.dir, job),
    ], env);
  }

  async succeeds(c: Proc, others: Proc[]): Promise<void> {
    const code = await exitCode(c);
    assert.equal(code, 0, `${c.name} ended with ${code}\n${c.tail()}\n${others.map((o) => o.tail()).join("\n")}`);
  }

  /** A job's head-only classifier (model-head/, saved before fine-tuning) or its fine-tuned one (model/). */
  async weights(job: string, model: "model-head" | "model" = "model-head"): Promise<Float32Array> {
    const bin = await readFile(join(this.dir, job, model, "weights.bin"));
    return new Float32Array(bin.buffer.slice(bin.byteOffset, bin.byteOffset + bin.byteLength));
  }

  async summary(job: string): Promise<AugmentSummary> {
    return JSON.parse(await readFile(join(this.dir, job, "summary.json"), "utf8")) as AugmentSummary;
  }

  async close(): Promise<void> {
    await stop(this.procs);
    await this.nats.stop();
    await rm(this.dir, { recursive: true, force: true });
  }
}

export async function exitCode(c: Proc, timeoutMs = 240_000): Promise<number | null | "timeout"> {
  let timer: NodeJS.Timeout | undefined;
  const code = await Promise.race([c.exited, new Promise<"timeout">((r) => (timer = setTimeout(() => r("timeout"), timeoutMs)))]);
  clearTimeout(timer);
  return code;
}

export async function stop(ps: Proc[]): Promise<void> {
  for (const p of ps) if (p.alive) p.proc.kill("SIGKILL");
  await Promise.all(ps.map((p) => p.exited));
}

export function maxAbsDiff(a: Float32Array, b: Float32Array): number {
  assert.equal(a.length, b.length, "same model size");
  let m = 0;
  for (let i = 0; i < a.length; i++) m = Math.max(m, Math.abs(a[i]! - b[i]!));
  return m;
}

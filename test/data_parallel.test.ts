/**
 * Data-parallel fine-tuning end to end: a real nats-server, real `ctrain coordinator` and `ctrain
 * worker` processes, real Fashion-MNIST (a few hundred images, input 64) and the real MobileNetV2 top
 * block (--fine-tune-layers 3). The reference is the one-process path (`ctrain run --workers 1`) with
 * the same seed and global batch; every run shares one feature/activation cache so only the first
 * extracts. Dropout is on (the default 0.5): its masks, like every random draw of a step, are a
 * function of (seed, epoch, global sample index), so a worker's part of a batch drops what the one
 * process drops for those samples.
 */
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { mkdtemp, readFile, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, describe, test } from "node:test";
import { CTRAIN_BIN } from "./helpers/cli.js";
import { Proc } from "./helpers/cluster.js";
import { startNatsServer, type NatsServer } from "./helpers/nats_server.js";

const JOB_ARGS = [
  "--data", "fashion-mnist", "--limit", "200", "--input-size", "64", "--epochs", "1", "--head-units", "16",
  "--fine-tune-layers", "3", "--fine-tune-epochs", "3", "--batch-size", "32", "--backend", "wasm", "--log-format", "json", "--seed", "42", "--metrics-port", "-1",
];

let dir: string;
let nats: NatsServer;
const procs: Proc[] = [];
let reference: { weights: Float32Array; valAccuracy: number };

function ctrain(name: string, args: string[], env: NodeJS.ProcessEnv = {}): Proc {
  const proc = spawn(process.execPath, [CTRAIN_BIN, ...args], { env: { ...process.env, ...env }, stdio: ["ignore", "pipe", "pipe"] });
  const p = new Proc(name, proc);
  procs.push(p);
  return p;
}

function worker(job: string, id: string): Proc {
  return ctrain(id, ["worker", "--nats", nats.url, "--job", job, "--worker-id", id, "--backend", "wasm", "--metrics-port", "-1", "--log-format", "json"]);
}

function coordinator(job: string, workers: number, env: NodeJS.ProcessEnv = {}): Proc {
  return ctrain(`coordinator-${job}`, ["coordinator", "--nats", nats.url, "--job", job, ...JOB_ARGS, "--workers", String(workers), "--cache-dir", join(dir, "cache"), "--out", join(dir, job)], env);
}

async function succeeds(c: Proc, others: Proc[], timeoutMs = 150_000): Promise<void> {
  let timer: NodeJS.Timeout | undefined;
  const code = await Promise.race([c.exited, new Promise<string>((r) => (timer = setTimeout(() => r("timeout"), timeoutMs)))]);
  clearTimeout(timer);
  assert.equal(code, 0, `${c.name} ended with ${code}\n${c.tail()}\n${others.map((o) => o.tail()).join("\n")}`);
}

async function stop(ps: Proc[]): Promise<void> {
  for (const p of ps) if (p.proc.exitCode === null && p.proc.signalCode === null) p.proc.kill("SIGKILL");
  await Promise.all(ps.map((p) => p.exited));
}

async function result(out: string): Promise<{ weights: Float32Array; valAccuracy: number }> {
  const bin = await readFile(join(out, "model", "weights.bin"));
  const summary = JSON.parse(await readFile(join(out, "summary.json"), "utf8")) as { phases: { fine_tune: { val_accuracy: number } } };
  return { weights: new Float32Array(bin.buffer.slice(bin.byteOffset, bin.byteOffset + bin.byteLength)), valAccuracy: summary.phases.fine_tune.val_accuracy };
}

function maxAbsDiff(a: Float32Array, b: Float32Array): number {
  assert.equal(a.length, b.length, "same model size");
  let m = 0;
  for (let i = 0; i < a.length; i++) m = Math.max(m, Math.abs(a[i]! - b[i]!));
  return m;
}

/** Runs a job with N fresh workers and returns its result. */
async function dataParallelJob(job: string, n: number, env: NodeJS.ProcessEnv = {}): Promise<{ weights: Float32Array; valAccuracy: number; c: Proc; ws: Proc[] }> {
  const ws = Array.from({ length: n }, (_, i) => worker(job, `${job}-w${i}`));
  const c = coordinator(job, n, env);
  await succeeds(c, ws);
  await stop(ws);
  return { ...(await result(join(dir, job))), c, ws };
}

before(async () => {
  dir = await mkdtemp(join(tmpdir(), "ctrain-dp-"));
  nats = await startNatsServer();
  // The one-process reference (local fine-tuning); it also fills the shared cache.
  const ref = ctrain("reference", ["run", ...JOB_ARGS, "--workers", "1", "--cache-dir", join(dir, "cache"), "--out", join(dir, "reference")]);
  await succeeds(ref, []);
  reference = await result(join(dir, "reference"));
});

after(async () => {
  await stop(procs);
  await nats?.stop();
  await rm(dir, { recursive: true, force: true });
});

describe("data-parallel", () => {
  test("data-parallel - N=2 and N=3 workers reach the one-process weights (fp32 wire)", async () => {
    for (const n of [2, 3]) {
      const r = await dataParallelJob(`equiv${n}`, n);
      assert.ok(r.c.logged("membership").length >= 1, "a membership was planned");
      assert.equal(r.c.logged("data-parallel fine-tuning done").length, 1, "the data-parallel driver ran");
      const d = maxAbsDiff(r.weights, reference.weights);
      assert.ok(d < 1e-4, `N=${n}: max |w - w_ref| = ${d}`);
    }
  });

  test("data-parallel - member 0 SIGKILLed mid-fine-tune: the survivors finish, validate every epoch, accuracy as undisturbed", async () => {
    // Member 0 is the one with extra duties (checkpoints, boundary decisions, the reports the
    // coordinator reads): losing it is the hard case.
    const job = "kill";
    const ws = [0, 1, 2].map((i) => worker(job, `${job}-w${i}`));
    const c = coordinator(job, 3, { CTRAIN_DP_STEP_TIMEOUT_MS: "4000" });
    const plan = await c.waitFor("membership", 120_000);
    const members = plan["members"] as string[];
    const victim = ws.find((w) => w.name === members[0])!;
    await victim.waitFor("training", 120_000);
    await new Promise((r) => setTimeout(r, 1500));
    victim.proc.kill("SIGKILL");
    await succeeds(c, ws);
    const survivors = ws.filter((w) => w !== victim);
    const lost = c.logged("worker lost: new membership");
    assert.ok(lost.length >= 1, `the coordinator re-planned without the lost worker\n${c.tail()}`);
    assert.deepEqual(lost.at(-1)!["members"], members.slice(1));
    // Where the kill lands decides which recovery a survivor takes: a failed averaging round is redone,
    // gradients computed under the old membership are recomputed, or member 0's missing boundary
    // decision is reported. Each of them ends under the re-planned membership.
    const recoveries = ["redoing the step with the new membership", "membership changed during the step: recomputing my part", "no boundary decision from member 0", "membership changed at the training-epoch boundary"];
    for (const w of survivors) {
      assert.ok(recoveries.some((m) => w.logged(m).length > 0), `${w.name} recovered from the loss\n${w.tail()}`);
    }
    const history = JSON.parse(await readFile(join(dir, job, "history.json"), "utf8")) as { fine_tune: { epoch: number; val_accuracy?: number }[] };
    assert.equal(history.fine_tune.length, 3);
    for (const e of history.fine_tune) assert.ok(Number.isFinite(e.val_accuracy), `fine-tune epoch ${e.epoch} has a validation accuracy: ${JSON.stringify(e)}`);
    const r = await result(join(dir, job));
    assert.ok(Math.abs(r.valAccuracy - reference.valAccuracy) <= 0.01, `val accuracy ${r.valAccuracy} vs undisturbed ${reference.valAccuracy}`);
    // The redo recomputes the same global batch: the weights stay those of the undisturbed run.
    const d = maxAbsDiff(r.weights, reference.weights);
    assert.ok(d < 1e-4, `max |w - w_ref| = ${d}`);
    await stop(ws);
  });

  test("data-parallel - a worker that arrives mid-fine-tune joins at a training-epoch boundary; weights as one process", async (t) => {
    const job = "join";
    const ws = [0, 1].map((i) => worker(job, `${job}-w${i}`));
    // The late worker is started with the others but held (SIGSTOP) from the moment it joined the job
    // until the coordinator planned the first membership without it, so it arrives during training,
    // warm enough to be ready before the last boundary.
    const late = worker(job, `${job}-late`);
    const c = coordinator(job, 2);
    await late.waitFor("joined job", 60_000);
    late.proc.kill("SIGSTOP");
    await c.waitFor("membership", 120_000);
    late.proc.kill("SIGCONT");
    await succeeds(c, [...ws, late]);
    const joined = c.logged("workers joined at a training-epoch boundary");
    assert.equal(joined.length, 1, `one join\n${c.tail()}\n${late.tail()}`);
    assert.deepEqual(joined[0]!["joined"], [`${job}-late`]);
    assert.deepEqual(joined[0]!["members"], [`${job}-w0`, `${job}-w1`, `${job}-late`]);
    const at = joined[0]!["step"] as number;
    assert.ok(at > 0, `joined at step ${at}`);
    const j = late.logged("joining the training at a training-epoch boundary")[0];
    assert.equal(j?.["step"], at, "the joiner starts from member 0's state at the boundary step");
    for (const w of ws) assert.equal(w.logged("membership changed at the training-epoch boundary")[0]?.["step"], at, `${w.name} switched at the same step`);
    const done = late.logged("training done")[0];
    assert.ok((done?.["steps_run"] as number) > 0, `the joiner ran steps: ${JSON.stringify(done)}`);
    // Three replicas from step `at` on, two before: the same global batches, so the one-process weights.
    const r = await result(join(dir, job));
    const d = maxAbsDiff(r.weights, reference.weights);
    t.diagnostic(`joined at step ${at} of ${done?.["steps"]}; the joiner ran ${done?.["steps_run"]} steps; max |w - w_ref| = ${d.toExponential(2)}`);
    assert.ok(d < 1e-4, `max |w - w_ref| = ${d}`);
    await stop([...ws, late]);
  });

  test("data-parallel - a restarted coordinator resumes from the checkpoint cursor", async () => {
    const job = "resume";
    const env = { CTRAIN_DP_CHECKPOINT_EVERY: "5" };
    const first = [0, 1].map((i) => worker(job, `${job}-a${i}`));
    const c1 = coordinator(job, 2, env);
    const ck = await c1.waitFor("checkpoint saved", 120_000);
    // The whole job dies: coordinator and workers.
    await stop([c1, ...first]);
    const saved = (ck["step"] as number);
    assert.ok(saved >= 5, `checkpoint at step ${saved}`);
    const second = [0, 1].map((i) => worker(job, `${job}-b${i}`));
    const c2 = coordinator(job, 2, env);
    const resumed = await c2.waitFor("resuming fine-tuning from checkpoint", 120_000);
    assert.ok((resumed["step"] as number) >= saved, `resumed at step ${resumed["step"]}, checkpoint was at ${saved}`);
    await succeeds(c2, second);
    for (const w of second) {
      const from = w.logged("training")[0]?.["from"] as { step: number } | undefined;
      assert.equal(from?.step, resumed["step"], `${w.name} started at the checkpoint's step, not from 0`);
    }
    const r = await result(join(dir, job));
    const d = maxAbsDiff(r.weights, reference.weights);
    assert.ok(d < 1e-4, `resumed job's weights: max |w - w_ref| = ${d}`);
    await stop(second);
  });
});

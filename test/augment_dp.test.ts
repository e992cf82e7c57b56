/**
 * Method 2 (`--method augment`) data-parallel end to end, the head phase and fine-tuning with
 * augmentation (3 top layers): a real nats-server, real `ctrain coordinator` and `ctrain worker`
 * processes, real Fashion-MNIST (200 training images at input 32) and the real MobileNetV2 base (the
 * frozen part on each worker's inference engine). The reference is the one-process path (`ctrain
 * run --workers 1`) with the same seed and global batch; every run shares one feature cache so only
 * the reference extracts. Dropout 0 and identity augmentation (flip none, rotation/zoom/translation 0):
 * until augmentation is drawn per sample, a worker's slice of a batch would get other parameters than
 * the same samples in one process.
 */
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { mkdtemp, readFile, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, describe, test } from "node:test";
import { CTRAIN_BIN } from "./helpers/cli.js";
import { Proc } from "./helpers/cluster.js";
import { freePort } from "./helpers/free_port.js";
import { startNatsServer, type NatsServer } from "./helpers/nats_server.js";

const JOB_ARGS = [
  "--data", "fashion-mnist", "--limit", "200", "--input-size", "32", "--epochs", "4", "--head-units", "16", "--dropout", "0",
  "--method", "augment", "--augment-flip", "none", "--augment-rotation", "0", "--augment-zoom", "0", "--augment-translation", "0",
  "--fine-tune-layers", "3", "--fine-tune-epochs", "1", "--fine-tune-learning-rate", "0.001", "--restore-best-weights", "false", "--batch-size", "24", "--backend", "wasm", "--log-format", "json", "--seed", "7", "--metrics-port", "-1",
];

let dir: string;
let nats: NatsServer;
const procs: Proc[] = [];
let reference: Float32Array;
let referenceFineTuned: Float32Array;

interface Summary {
  samples: { train: number };
  phases: { head: { workers: number; epochs: number; val_accuracy: number }; fine_tune: { workers: number; epochs: number; val_accuracy: number } };
}

function ctrain(name: string, args: string[], env: NodeJS.ProcessEnv = {}, metricsPort?: number): Proc {
  const proc = spawn(process.execPath, [CTRAIN_BIN, ...args], { env: { ...process.env, ...env }, stdio: ["ignore", "pipe", "pipe"] });
  const p = new Proc(name, proc, metricsPort);
  procs.push(p);
  return p;
}

function worker(job: string, id: string, o: { env?: NodeJS.ProcessEnv; metricsPort?: number } = {}): Proc {
  const port = o.metricsPort ?? -1;
  return ctrain(id, ["worker", "--nats", nats.url, "--job", job, "--worker-id", id, "--backend", "wasm", "--metrics-port", String(port), "--log-format", "json"], o.env, o.metricsPort);
}

/** A coordinator of the job on `workers` workers; `fineTune: false` stops after the head phase. */
function coordinator(job: string, workers: number, env: NodeJS.ProcessEnv = {}, o: { fineTune?: boolean } = {}): Proc {
  const args = o.fineTune === false ? JOB_ARGS.map((a, i) => (JOB_ARGS[i - 1] === "--fine-tune-layers" ? "0" : a)) : JOB_ARGS;
  return ctrain(`coordinator-${job}`, ["coordinator", "--nats", nats.url, "--job", job, ...args, "--workers", String(workers), "--data-parallel", "on", "--cache-dir", join(dir, "cache"), "--out", join(dir, job)], env);
}

async function exitCode(c: Proc, timeoutMs = 120_000): Promise<number | null | "timeout"> {
  let timer: NodeJS.Timeout | undefined;
  const code = await Promise.race([c.exited, new Promise<"timeout">((r) => (timer = setTimeout(() => r("timeout"), timeoutMs)))]);
  clearTimeout(timer);
  return code;
}

async function succeeds(c: Proc, others: Proc[]): Promise<void> {
  const code = await exitCode(c);
  assert.equal(code, 0, `${c.name} ended with ${code}\n${c.tail()}\n${others.map((o) => o.tail()).join("\n")}`);
}

async function stop(ps: Proc[]): Promise<void> {
  for (const p of ps) if (p.alive) p.proc.kill("SIGKILL");
  await Promise.all(ps.map((p) => p.exited));
}

/** The head-only classifier (model-head/, saved before fine-tuning) or the fine-tuned one (model/). */
async function weights(out: string, model: "model-head" | "model" = "model-head"): Promise<Float32Array> {
  const bin = await readFile(join(out, model, "weights.bin"));
  return new Float32Array(bin.buffer.slice(bin.byteOffset, bin.byteOffset + bin.byteLength));
}

async function summary(out: string): Promise<Summary> {
  return JSON.parse(await readFile(join(out, "summary.json"), "utf8")) as Summary;
}

function maxAbsDiff(a: Float32Array, b: Float32Array): number {
  assert.equal(a.length, b.length, "same model size");
  let m = 0;
  for (let i = 0; i < a.length; i++) m = Math.max(m, Math.abs(a[i]! - b[i]!));
  return m;
}

before(async () => {
  dir = await mkdtemp(join(tmpdir(), "ctrain-augdp-"));
  nats = await startNatsServer();
  // The one-process reference (method 2 in this process); it also fills the shared feature cache.
  const ref = ctrain("reference", ["run", ...JOB_ARGS, "--workers", "1", "--cache-dir", join(dir, "cache"), "--out", join(dir, "reference")]);
  await succeeds(ref, []);
  assert.equal((await summary(join(dir, "reference"))).phases.head.workers, 1, "the reference trained in one process");
  reference = await weights(join(dir, "reference"));
  referenceFineTuned = await weights(join(dir, "reference"), "model");
  // Fine-tuning moves the weights well beyond the tolerance, so the fine-tuned comparison below can fail.
  assert.ok(maxAbsDiff(reference, referenceFineTuned) > 1e-3, "fine-tuning changed the weights");
});

after(async () => {
  await stop(procs);
  await nats?.stop();
  await rm(dir, { recursive: true, force: true });
});

describe("augment data-parallel", () => {
  test("augment data-parallel - 1, 2 and 3 workers train head and fine-tuned top to the one-process weights; images per worker in its metrics", async (t) => {
    for (const n of [1, 2, 3]) {
      const job = `aug${n}`;
      const port = await freePort();
      const ws = Array.from({ length: n }, (_, i) => worker(job, `${job}-w${i}`, i === 0 ? { metricsPort: port } : {}));
      const c = coordinator(job, n);
      await succeeds(c, ws);
      assert.equal(c.logged("--method augment trains in the coordinator process, not on the workers (data-parallel training covers fine-tuning on cached activations): drop --method augment to train across the workers").length, 0);
      assert.equal(c.logged("head phase on the workers").length, 1, `the head trained on the workers\n${c.tail()}`);
      assert.equal(c.logged("fine-tuning with augmentation on the workers").length, 1, `fine-tuning ran on the workers\n${c.tail()}`);
      const s = await summary(join(dir, job));
      assert.equal(s.phases.head.workers, n, `summary phases.head.workers`);
      const d = maxAbsDiff(await weights(join(dir, job)), reference);
      t.diagnostic(`N=${n}: max |w - w_ref| = ${d.toExponential(2)}`);
      assert.ok(d < 1e-4, `N=${n}: max |w - w_ref| = ${d}`);
      assert.equal(s.phases.fine_tune.workers, n, `summary phases.fine_tune.workers`);
      const f = maxAbsDiff(await weights(join(dir, job), "model"), referenceFineTuned);
      t.diagnostic(`N=${n}: fine-tuned max |w - w_ref| = ${f.toExponential(2)}`);
      assert.ok(f < 1e-4, `N=${n}: fine-tuned max |w - w_ref| = ${f}`);
      const m = await ws[0]!.metrics();
      const images = m.samples.filter((x) => x.name === "ctrain_images_processed_total" && x.labels["phase"] === "head").reduce((a, x) => a + x.value, 0);
      // Four epochs of this worker's part of each global batch: within one image per batch of train/n.
      const batches = 4 * Math.ceil(s.samples.train / 24);
      assert.ok(Math.abs(images - (4 * s.samples.train) / n) <= batches, `worker 0 counted ${images} head images, ${s.samples.train} train images, ${n} workers`);
      await stop(ws);
    }
  });

  test("augment data-parallel - a worker SIGKILLed mid-head-phase: the survivors finish both phases with the undisturbed weights", async () => {
    const job = "augkill";
    const ws = [0, 1, 2].map((i) => worker(job, `${job}-w${i}`));
    const c = coordinator(job, 3, { CTRAIN_DP_STEP_TIMEOUT_MS: "4000" });
    const plan = await c.waitFor("membership", 120_000);
    const members = plan["members"] as string[];
    const victim = ws.find((w) => w.name === members[1])!;
    await victim.waitFor("training", 120_000);
    await new Promise((r) => setTimeout(r, 1500));
    victim.proc.kill("SIGKILL");
    await succeeds(c, ws);
    const lost = c.logged("worker lost: new membership");
    assert.ok(lost.length >= 1, `the coordinator re-planned without the lost worker\n${c.tail()}`);
    assert.ok(!(lost.at(-1)!["members"] as string[]).includes(victim.name));
    const s = await summary(join(dir, job));
    assert.equal(s.phases.head.workers, 3, "every worker that trained a step counts");
    assert.equal(s.phases.head.epochs, 4);
    const d = maxAbsDiff(await weights(join(dir, job)), reference);
    assert.ok(d < 1e-4, `max |w - w_ref| = ${d}`);
    const f = maxAbsDiff(await weights(join(dir, job), "model"), referenceFineTuned);
    assert.ok(f < 1e-4, `fine-tuned: max |w - w_ref| = ${f}`);
    await stop(ws);
  });

  test("augment data-parallel - a worker without the data set is left out with a message naming the path; none with it stops the job", async () => {
    const missing = join(dir, "not-mounted", "fashion-mnist");
    const job = "augbad";
    const good = worker(job, `${job}-good`);
    const bad = worker(job, `${job}-bad`, { env: { CTRAIN_FASHION_MNIST_DIR: missing } });
    const c = coordinator(job, 2, {}, { fineTune: false });
    await succeeds(c, [good, bad]);
    const left = c.logged("worker left out: it cannot open the data set");
    assert.equal(left.length, 1, c.tail());
    assert.equal(left[0]!["worker"], `${job}-bad`);
    assert.match(String(left[0]!["error"]), new RegExp(`${missing}.*Mount the data set`, "s"));
    assert.equal((await summary(join(dir, job))).phases.head.workers, 1);
    await stop([good, bad]);

    const none = "augnone";
    const alone = worker(none, `${none}-bad`, { env: { CTRAIN_FASHION_MNIST_DIR: missing } });
    const c2 = coordinator(none, 1, {}, { fineTune: false });
    const code = await exitCode(c2);
    assert.notEqual(code, 0);
    assert.match(c2.stderr, /no worker can open the data set/);
    assert.match(c2.stderr, new RegExp(missing));
    await stop([alone]);
  });
});

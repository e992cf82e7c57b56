/**
 * Method 1's head data-parallel on the workers, end to end: a real nats-server, real `ctrain
 * coordinator` and `ctrain worker` processes, real Fashion-MNIST (300 images, input 64), the real
 * MobileNetV2 base. The reference is `ctrain run --workers 2` with the default `--data-parallel auto`,
 * which keeps a head this small in the coordinator (and says why). A shuffle buffer of 0.5 MiB cuts
 * the 1280-d features into blocks of 16 rows and windows of 3 blocks, so the replicas' stream crosses
 * several windows, as a large cache would.
 */
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { mkdtemp, readFile, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, describe, test } from "node:test";
import { connect } from "nats";
import { CTRAIN_BIN } from "./helpers/cli.js";
import { Proc } from "./helpers/cluster.js";
import { startNatsServer, type NatsServer } from "./helpers/nats_server.js";
import { jobNames } from "../proto/subjects.js";

const JOB_ARGS = [
  "--data", "fashion-mnist", "--limit", "300", "--input-size", "64", "--epochs", "3", "--head-units", "16", "--batch-size", "32",
  "--shuffle-buffer-mib", "0.5", "--lr-schedule", "cosine", "--backend", "wasm", "--log-format", "json", "--seed", "42", "--metrics-port", "-1",
];

let dir: string;
let nats: NatsServer;
const procs: Proc[] = [];
let reference: Proc;

function ctrain(name: string, args: string[]): Proc {
  const p = new Proc(name, spawn(process.execPath, [CTRAIN_BIN, ...args], { stdio: ["ignore", "pipe", "pipe"] }));
  procs.push(p);
  return p;
}

async function succeeds(c: Proc, others: Proc[], timeoutMs = 150_000): Promise<void> {
  let timer: NodeJS.Timeout | undefined;
  const code = await Promise.race([c.exited, new Promise<string>((r) => (timer = setTimeout(() => r("timeout"), timeoutMs)))]);
  clearTimeout(timer);
  assert.equal(code, 0, `${c.name} ended with ${code}\n${c.tail()}\n${others.map((o) => o.tail()).join("\n")}`);
}

async function weights(out: string): Promise<Float32Array> {
  const bin = await readFile(join(out, "model", "weights.bin"));
  return new Float32Array(bin.buffer.slice(bin.byteOffset, bin.byteOffset + bin.byteLength));
}

type Epoch = { epoch: number; val_loss: number; val_accuracy: number };
async function headHistory(out: string): Promise<Epoch[]> {
  return (JSON.parse(await readFile(join(out, "history.json"), "utf8")) as { head: Epoch[] }).head;
}

before(async () => {
  dir = await mkdtemp(join(tmpdir(), "ctrain-fhdp-"));
  nats = await startNatsServer();
  reference = ctrain("reference", ["run", ...JOB_ARGS, "--workers", "2", "--cache-dir", join(dir, "cache"), "--out", join(dir, "reference")]);
  await succeeds(reference, []);
});

after(async () => {
  for (const p of procs) if (p.proc.exitCode === null && p.proc.signalCode === null) p.proc.kill("SIGKILL");
  await Promise.all(procs.map((p) => p.exited));
  await nats?.stop();
  await rm(dir, { recursive: true, force: true });
});

describe("head on the workers (method 1)", () => {
  test("--data-parallel auto keeps a small head in the coordinator and logs both estimates", () => {
    const place = reference.logged("head placement");
    assert.equal(place.length, 1, reference.tail());
    assert.equal(place[0]!["on_workers"], false);
    assert.equal(place[0]!["why"], "estimated faster here");
    assert.ok(Number(place[0]!["estimated_seconds_on_workers"]) > Number(place[0]!["estimated_seconds_here"]), JSON.stringify(place[0]));
    assert.equal(reference.logged("head phase on the workers").length, 0);
  });

  test("--data-parallel on: 2 workers stream the feature blocks and end with the one-process weights and validation; the blocks are deleted", async () => {
    const job = "fhead2";
    const ws = [0, 1].map((i) => ctrain(`w${i}`, ["worker", "--nats", nats.url, "--job", job, "--worker-id", `${job}-w${i}`, "--backend", "wasm", "--metrics-port", "-1", "--log-format", "json"]));
    const c = ctrain("coordinator", ["coordinator", "--nats", nats.url, "--job", job, ...JOB_ARGS, "--workers", "2", "--data-parallel", "on", "--cache-dir", join(dir, "cache"), "--out", join(dir, job)]);
    await succeeds(c, ws);
    const stream = c.logged("head phase on the workers");
    assert.equal(stream.length, 1, c.tail());
    assert.deepEqual([stream[0]!["block_rows"], stream[0]!["window_blocks"]], [16, 3]);
    assert.ok(Number(stream[0]!["rows"]) > 16 * 3 * 2, "the train split spans more than two windows");
    for (const w of ws) assert.equal(w.logged("training replica ready").filter((l) => l["input"] === "features").length, 1, w.tail());
    assert.equal((await c.waitFor("data-parallel training done"))["workers"], 2);

    let d = 0;
    const [a, b] = [await weights(join(dir, job)), await weights(join(dir, "reference"))];
    assert.equal(a.length, b.length);
    for (let i = 0; i < a.length; i++) d = Math.max(d, Math.abs(a[i]! - b[i]!));
    assert.ok(d < 1e-5, `max |w - w_ref| = ${d}`);
    const [h, ref] = [await headHistory(join(dir, job)), await headHistory(join(dir, "reference"))];
    assert.equal(h.length, 3);
    for (const [i, e] of h.entries()) assert.ok(Math.abs(e.val_loss - ref[i]!.val_loss) < 1e-4, `epoch ${e.epoch}: val_loss ${e.val_loss} on the workers, ${ref[i]!.val_loss} in one process`);

    const nc = await connect({ servers: nats.url });
    try {
      const os = await nc.jetstream().views.os(jobNames(job).checkpointsBucket);
      const left = (await os.list()).filter((i) => i.name.startsWith("rows-"));
      assert.deepEqual(left.map((i) => i.name), [], "no feature block is left in the store");
    } finally {
      await nc.close();
    }
  });
});

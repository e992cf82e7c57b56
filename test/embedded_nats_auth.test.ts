/**
 * The embedded nats-server of `ctrain run` as an attacker on the same machine meets it: without
 * credentials it does not let a client in; with a worker's credentials a client cannot inject a task,
 * a step plan, a control message, a membership key or another worker's averaged slice, while what a
 * worker must send (gradients to any slice owner, its own averaged slice, heartbeats) still goes
 * through. Then a whole `ctrain run --workers 2` with data-parallel fine-tuning runs under those
 * permissions, and the workers' passwords appear in no argv and no log line.
 */
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { readFileSync, statSync } from "node:fs";
import { mkdtemp, readdir, readFile, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, test } from "node:test";
import { connect, type NatsConnection } from "nats";
import { startEmbeddedNats, type EmbeddedNats } from "../coordinator/embedded_nats.js";
import { ensureTaskQueue } from "../proto/extraction_wire.js";
import { connectNats, NatsConnectError } from "../core/runtime/nats_connect.js";
import { TRAINING_KEYS } from "../proto/training_wire.js";
import { encode, makeHeader } from "../proto/codec.js";
import { jobNames } from "../proto/subjects.js";
import { CTRAIN_BIN } from "./helpers/cli.js";
import { check } from "./helpers/nats_server.js";

const JOB = "sec";
const names = jobNames(JOB);
let dir: string;
let nats: EmbeddedNats;
const conns: NatsConnection[] = [];

before(async () => {
  dir = await mkdtemp(join(tmpdir(), "ctrain-embauth-"));
  nats = await startEmbeddedNats({ job: JOB, workers: ["sec-w0", "sec-w1"] });
});
after(async () => {
  for (const c of conns) await c.close().catch(() => undefined);
  await nats?.stop();
  await rm(dir, { recursive: true, force: true });
});

async function as(who: "coordinator" | "sec-w0" | "sec-w1"): Promise<NatsConnection> {
  const auth = who === "coordinator" ? nats.credentials.coordinator : nats.credentials.workers.get(who)!;
  const nc = await connectNats(nats.url, auth, { name: `test-${who}` });
  conns.push(nc);
  return nc;
}

/** Subjects `from` publishes on, in order, as seen by a coordinator subscribed to the whole job. */
async function delivered(from: NatsConnection, subjects: string[]): Promise<string[]> {
  const tap = await as("coordinator");
  const seen: string[] = [];
  tap.subscribe(names.all, { callback: (_e, m) => seen.push(m.subject) });
  await tap.flush();
  for (const s of subjects) from.publish(s, encode("Control", { header: makeHeader(JOB, "intruder"), kind: "stop", reason: "forged", phase: "fine_tune" }));
  from.publish(names.heartbeat, new Uint8Array([1])); // a sentinel the worker may send: everything before it has been routed or refused
  await check(() => seen.includes(names.heartbeat), 5000);
  return seen.filter((s) => s !== names.heartbeat);
}

test("embedded nats - a client without credentials is refused", async () => {
  await assert.rejects(connectNats(nats.url, {}, { name: "anon" }), (e: unknown) => e instanceof NatsConnectError && e.reason === "auth");
  await assert.rejects(connect({ servers: nats.url, user: "coordinator", pass: "guess" }), /Authorization/i);
  // The config holding the passwords is readable by its owner only.
  const conf = (await readdir(join(tmpdir()))).map((d) => join(tmpdir(), d, "server.conf")).find((f) => {
    try {
      return readFileSync(f, "utf8").includes(nats.credentials.coordinator.pass!);
    } catch {
      return false;
    }
  });
  assert.ok(conf, "the embedded server's config");
  assert.equal(statSync(conf).mode & 0o077, 0, `${conf} is private`);
});

test("embedded nats - a worker's credentials cannot inject a task, a plan, a control or another slice; its own traffic goes through", async () => {
  const coord = await as("coordinator");
  await ensureTaskQueue(await coord.jetstreamManager(), names, { ackWaitMs: 30_000, maxDeliver: 5 });
  const coordKv = await coord.jetstream().views.kv(names.stateBucket, { history: 1 });
  const w0 = await as("sec-w0");
  const task = encode("ShardTask", { header: makeHeader(JOB, "coordinator"), shardId: "r0123456789abcdef.shard-00000", ids: ["x"], labels: [0], splits: ["train"], attempt: 1 });
  await assert.rejects(w0.jetstream().publish(names.tasks, task), /permission/i, "a task through JetStream");
  const kv = await w0.jetstream().views.kv(names.stateBucket, { history: 1 });
  await assert.rejects(kv.put(TRAINING_KEYS.members, new Uint8Array([1])), /permission/i, "a membership plan in the state KV");
  await assert.rejects(kv.put(TRAINING_KEYS.spec, new Uint8Array([1])), /permission/i, "a fine-tuning spec");
  await kv.put(TRAINING_KEYS.report("sec-w0"), new Uint8Array([1]));
  await assert.rejects(kv.put(TRAINING_KEYS.report("sec-w1"), new Uint8Array([1])), /permission/i, "another worker's report");
  assert.equal(await coordKv.get(TRAINING_KEYS.members), null);
  assert.equal((await (await coord.jetstreamManager()).streams.info(names.tasksStream)).state.messages, 0, "no task was queued");

  const seen = await delivered(w0, [names.tasks, names.stepPlan, names.control, names.averaged("sec-w1"), names.gradients("sec-w1"), names.averaged("sec-w0")]);
  assert.deepEqual(seen, [names.gradients("sec-w1"), names.averaged("sec-w0")], "only the worker's own traffic reaches the job");
});

test("embedded nats - ctrain run --workers 2 fine-tunes data-parallel under worker permissions; no password in argv or logs", { timeout: 240_000 }, async () => {
  const out = join(dir, "out");
  const args = [
    CTRAIN_BIN, "run", "--data", "fashion-mnist", "--limit", "64", "--input-size", "64", "--epochs", "2", "--head-units", "8", "--fine-tune-layers", "3",
    "--fine-tune-epochs", "1", "--batch-size", "16", "--shard-size", "16", "--backend", "wasm", "--workers", "2", "--job", "authrun",
    "--cache-dir", join(dir, "cache"), "--out", out, "--metrics-port", "-1", "--log-format", "json", "--seed", "3",
  ];
  const child = spawn(process.execPath, args, { stdio: ["ignore", "pipe", "pipe"], env: { ...process.env, CTRAIN_LOG_LEVEL: "debug" } });
  let output = "";
  child.stdout.on("data", (d: Buffer) => (output += d.toString()));
  child.stderr.on("data", (d: Buffer) => (output += d.toString()));
  const exited = new Promise<number | null>((r) => child.once("close", (c) => r(c)));
  // The workers are children of `ctrain run`: read their argv and environment as another local process could.
  const secrets = new Set<string>();
  const argvs: string[] = [];
  while (child.exitCode === null && secrets.size < 2) {
    for (const pid of await readdir("/proc").catch(() => [] as string[])) {
      if (!/^\d+$/.test(pid)) continue;
      try {
        const stat = await readFile(`/proc/${pid}/stat`, "utf8");
        if (Number(stat.slice(stat.lastIndexOf(")") + 2).split(" ")[1]) !== child.pid) continue;
        const env = (await readFile(`/proc/${pid}/environ`, "utf8")).split("\0");
        const pass = env.find((e) => e.startsWith("CTRAIN_NATS_PASS="))?.slice("CTRAIN_NATS_PASS=".length);
        if (pass) {
          secrets.add(pass);
          argvs.push(await readFile(`/proc/${pid}/cmdline`, "utf8"));
        }
      } catch {
        // gone, or not ours
      }
    }
    await new Promise((r) => setTimeout(r, 100));
  }
  const code = await exited;
  assert.equal(code, 0, output.slice(-4000));
  assert.equal(secrets.size, 2, "each worker got its own password through its environment");
  const summary = JSON.parse(await readFile(join(out, "summary.json"), "utf8")) as { phases: { fine_tune: { epochs: number } } };
  assert.equal(summary.phases.fine_tune.epochs, 1);
  assert.match(output, /data-parallel fine-tuning done/, "fine-tuning ran on the workers");
  assert.doesNotMatch(output, /Violation/i, "the server refused something a worker needs");
  for (const s of secrets) {
    for (const a of argvs) assert.ok(!a.includes(s), "a password in a worker's argv");
    assert.ok(!output.includes(s), "a password in the log");
  }
});

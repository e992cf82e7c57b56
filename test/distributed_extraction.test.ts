/**
 * Distributed feature extraction end to end: a real nats-server per test, real `ctrain coordinator`
 * and `ctrain worker` processes, real Fashion-MNIST images (a few hundred, input 64) and MobileNetV2.
 * Chaos by schedule: a worker SIGKILLed mid-shard, the NATS server restarted mid-job, the coordinator
 * SIGKILLed and restarted with the same job id, a worker joining late, garbage and foreign messages on
 * the job's subjects, and a server that requires credentials.
 *
 * "Exactly once" is checked on the committed feature cache (every planned sample id once, nothing
 * else) and, where the test says so, on the workers' own logs (every shard extracted once).
 */
import assert from "node:assert/strict";
import { existsSync } from "node:fs";
import { mkdtemp, readdir, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, describe, test } from "node:test";
import { connect } from "nats";
import { planShards } from "../coordinator/shard_planner.js";
import { openDataset } from "../core/datasets/open.js";
import { FeatureCache, type FeatureSet } from "../core/datasets/feature_store.js";
import { decode, encode, makeHeader, type FeatureShard, type ShardTask } from "../proto/codec.js";
import { float32ToBytes } from "../proto/tensor_codec.js";
import { jobNames } from "../proto/subjects.js";
import { Cluster, killNow, type Proc, shardsDone, stopAll, waitExit } from "./helpers/cluster.js";
import { check, startNatsServer, type NatsServer } from "./helpers/nats_server.js";

const LIMIT = 120; // 120 train + 24 val + 24 test = 168 samples
const SHARD = 28; // 6 shards
const JOB_ARGS = ["--data", "fashion-mnist", "--limit", String(LIMIT), "--input-size", "64", "--shard-size", String(SHARD), "--epochs", "1", "--head-units", "16", "--backend", "wasm", "--log-format", "json", "--seed", "42"];

let dir: string;
let planIds: string[];
before(async () => {
  dir = await mkdtemp(join(tmpdir(), "ctrain-dist-"));
  cluster = new Cluster({ dir, jobArgs: JOB_ARGS });
  const ds = await openDataset("fashion-mnist", { seed: 42, valSplit: 0.1, testSplit: 0.1, limit: LIMIT, maxPixels: 40_000_000 });
  planIds = planShards(ds.samples, SHARD).flatMap((s) => s.samples.map((x) => x.id)).sort();
});
after(async () => {
  const procs = cluster?.procs ?? [];
  if (process.env.CTRAIN_TEST_DEBUG) for (const p of procs) console.error(p.proc.exitCode, p.tail());
  for (const p of procs) if (p.proc.exitCode === null && p.proc.signalCode === null) p.proc.kill("SIGKILL");
  await rm(dir, { recursive: true, force: true });
});

// Processes, log parsing and waiting live in helpers/cluster.ts (shared with test/chaos/).
// Workers are stopped with a drain (stopAll) where the test reads their logs afterwards (a "shard done"
// line comes after the shard's notice, so only a finished worker surely has all of them) or checks what
// they log while draining; elsewhere they are SIGKILLed (killNow), which spares waiting out their pull.
let cluster: Cluster;
const ctrain = (name: string, args: string[], env: NodeJS.ProcessEnv = {}, metricsPort?: number): Proc => cluster.ctrain(name, args, env, metricsPort);
const worker = (url: string, job: string, id: string, extra: string[] = [], env: NodeJS.ProcessEnv = {}): Promise<Proc> => cluster.worker(url, job, id, extra, env);
const coordinator = (url: string, job: string, extra: string[] = [], env: NodeJS.ProcessEnv = {}): Promise<Proc> => cluster.coordinator(url, job, extra, env);

async function expectSuccess(c: Proc, others: Proc[], timeoutMs = 120_000): Promise<void> {
  const code = await waitExit(c, timeoutMs);
  assert.equal(code, 0, `coordinator ended with ${code}\n${c.tail()}\n${others.map((o) => o.tail()).join("\n")}`);
}

/** The one committed cache entry of a job. */
async function committed(job: string): Promise<FeatureSet> {
  const root = join(dir, job, "cache");
  const entries = (await readdir(root)).filter((n) => existsSync(join(root, n, "meta.json")));
  assert.equal(entries.length, 1, `one committed cache entry expected in ${root}, found ${entries.join(", ")}`);
  return new FeatureCache(root).load(entries[0]);
}

function assertExactlyOnce(set: FeatureSet): void {
  assert.equal(set.skipped.length, 0);
  assert.equal(set.ids.length, planIds.length, "sample count");
  assert.deepEqual([...set.ids].sort(), planIds, "every planned sample once, nothing else");
}

describe("distributed extraction", { concurrency: false }, () => {
  let server: NatsServer;
  before(async () => {
    server = await startNatsServer();
  });
  after(async () => {
    await server?.stop();
  });

  test("distributed - features equal the single-process features for the same samples", { timeout: 180_000 }, async () => {
    const job = "dist-equal";
    const w = [await worker(server.url, job, "eq-w0"), await worker(server.url, job, "eq-w1")];
    // No fault here, so no shard may be redelivered: an ack wait far above any pause of a loaded machine
    // (the workers also send in-progress acks on a timer) makes "each shard once" a sound assertion.
    const c = await coordinator(server.url, job, ["--ack-wait", "30"]);
    const local = ctrain("local", ["run", ...JOB_ARGS, "--workers", "1", "--job", "dist-local", "--cache-dir", join(dir, "dist-local", "cache"), "--out", join(dir, "dist-local", "out"), "--metrics-port", "-1"]);
    try {
      await expectSuccess(c, w);
      assert.equal(await local.exited, 0, local.tail());
    } finally {
      await stopAll(w);
    }
    const dist = await committed(job);
    const single = await committed("dist-local");
    assertExactlyOnce(dist);
    assert.deepEqual(dist.ids, single.ids, "same ids in the same order");
    assert.deepEqual([...dist.labels], [...single.labels]);
    assert.deepEqual(dist.splits, single.splits);
    assert.equal(dist.features.length, single.features.length);
    let maxDiff = 0;
    for (let i = 0; i < dist.features.length; i++) maxDiff = Math.max(maxDiff, Math.abs(dist.features[i] - single.features[i]));
    assert.ok(maxDiff <= 1e-4, `max |distributed - single| = ${maxDiff}`);
    // Both workers took part and each shard was extracted once.
    const done = shardsDone(w);
    assert.equal(done.size, Math.ceil(planIds.length / SHARD));
    assert.ok([...done.values()].every((n) => n === 1), JSON.stringify([...done]));
  });

  test("distributed - a worker SIGKILLed mid-shard: the shard is redelivered, every sample once", { timeout: 180_000 }, async () => {
    const job = "dist-killworker";
    const victim = await worker(server.url, job, "kw-victim");
    const c = await coordinator(server.url, job);
    const claimed = await victim.waitFor("shard claimed", 90_000);
    // Its first shard: the model is still loading or the first batches are running. Kill it now.
    victim.proc.kill("SIGKILL");
    await victim.exited;
    assert.equal(victim.logged("shard done").filter((l) => l.shard === claimed.shard).length, 0, "the victim must not have finished the shard");
    const survivor = await worker(server.url, job, "kw-survivor");
    try {
      await expectSuccess(c, [survivor]);
    } finally {
      await killNow([survivor]);
    }
    assertExactlyOnce(await committed(job));
    const redelivered = survivor.logged("shard claimed").find((l) => l.shard === claimed.shard);
    assert.ok(redelivered, `the killed shard ${String(claimed.shard)} went to the survivor`);
    assert.ok(Number(redelivered.delivery) >= 2, `delivery ${String(redelivered.delivery)} of the killed shard`);
  });

  test("distributed - NATS server restarted mid-job: clients reconnect, the job completes exactly once", { timeout: 180_000 }, async () => {
    const job = "dist-natsrestart";
    const own = await startNatsServer();
    const w = [await worker(own.url, job, "nr-w0"), await worker(own.url, job, "nr-w1")];
    const c = await coordinator(own.url, job);
    try {
      await w[0].waitFor("shard done", 90_000);
      await own.restart();
      await expectSuccess(c, w);
    } finally {
      await killNow(w);
      await own.stop();
    }
    assertExactlyOnce(await committed(job));
    assert.ok(w.some((x) => x.lines.some((l) => l.msg === "NATS reconnect")) || c.lines.some((l) => l.msg === "NATS reconnect"), "a reconnect was logged");
  });

  test("distributed - coordinator SIGKILLed and restarted with the same job id: finished shards are not extracted again", { timeout: 180_000 }, async () => {
    const job = "dist-killcoord";
    const w = [await worker(server.url, job, "kc-w0"), await worker(server.url, job, "kc-w1")];
    // Only the coordinator fails here: a long ack wait keeps load pauses from redelivering a worker's shard.
    const c1 = await coordinator(server.url, job, ["--ack-wait", "30"]);
    try {
      await check(() => shardsDone(w).size >= 2, 90_000, 50);
      c1.proc.kill("SIGKILL");
      await c1.exited;
      const c2 = await coordinator(server.url, job, ["--ack-wait", "30"]);
      await expectSuccess(c2, w);
      const fetched = c2.lines.find((l) => l.msg === "shards already in the object store: fetching without extraction" || l.msg === "extracting features");
      assert.ok(fetched, c2.tail());
    } finally {
      await stopAll(w);
    }
    assertExactlyOnce(await committed(job));
    const done = shardsDone(w);
    assert.equal(done.size, Math.ceil(planIds.length / SHARD), "every shard extracted");
    assert.ok([...done.values()].every((n) => n === 1), `a shard was extracted twice: ${JSON.stringify([...done])}`);
  });

  test("distributed - auth: an unauthenticated worker is refused, the authenticated job completes", { timeout: 180_000 }, async () => {
    const job = "dist-auth";
    const secure = await startNatsServer({ auth: { user: "ctrain", pass: "s3cret-pass" } });
    try {
      const anon = await worker(secure.url, job, "auth-anon");
      const code = await anon.exited;
      assert.equal(code, 2, anon.tail());
      assert.match(anon.stderr, /refused the credentials/);
      const wrong = await worker(secure.url, job, "auth-wrong", ["--nats-user", "ctrain"], { CTRAIN_NATS_PASS: "nope" });
      assert.equal(await wrong.exited, 2, wrong.tail());
      const creds = { CTRAIN_NATS_PASS: "s3cret-pass" };
      const w = await worker(secure.url, job, "auth-w0", ["--nats-user", "ctrain"], creds);
      const c = await coordinator(secure.url, job, ["--nats-user", "ctrain"], creds);
      try {
        await expectSuccess(c, [w]);
      } finally {
        await stopAll([w]);
      }
      assertExactlyOnce(await committed(job));
      assert.ok(!w.stderr.includes("s3cret-pass") && !c.stderr.includes("s3cret-pass"), "the password never reaches the logs");
    } finally {
      await secure.stop();
    }
  });

  test("distributed - shard-done notices that never arrive (an ACL denies them): the fallback sweep finds the stored shards, each once", { timeout: 180_000 }, async () => {
    const job = "dist-quiet";
    const denied = jobNames(job).shardDone;
    const quiet = await startNatsServer({
      config: `authorization { users: [
        { user: "coord", password: "c-pass" }
        { user: "worker", password: "w-pass", permissions: { publish: { deny: [${JSON.stringify(denied)}] } } }
      ] }`,
    });
    try {
      const w = await worker(quiet.url, job, "quiet-w0", ["--nats-user", "worker"], { CTRAIN_NATS_PASS: "w-pass" });
      const c = await coordinator(quiet.url, job, ["--nats-user", "coord", "--ack-wait", "30"], { CTRAIN_NATS_PASS: "c-pass" });
      // Nothing on the notice subject reaches the coordinator: count what the server lets through.
      const spy = await connect({ servers: quiet.url, user: "coord", pass: "c-pass" });
      let notices = 0;
      spy.subscribe(denied, { callback: () => void notices++ });
      try {
        await expectSuccess(c, [w]);
      } finally {
        await stopAll([w]);
        await spy.close();
      }
      assert.equal(notices, 0, "the ACL kept every notice from the coordinator");
      assertExactlyOnce(await committed(job));
      const done = shardsDone([w]);
      assert.equal(done.size, Math.ceil(planIds.length / SHARD));
      assert.ok([...done.values()].every((n) => n === 1), JSON.stringify([...done]));
    } finally {
      await quiet.stop();
    }
  });

  test("distributed - malformed and foreign messages on the job's subjects are dropped and counted", { timeout: 180_000 }, async () => {
    const job = "dist-garbage";
    const names = jobNames(job);
    const c = await coordinator(server.url, job);
    await c.waitFor("shard tasks queued", 90_000);
    const nc = await connect({ servers: server.url });
    try {
      // Garbage and another job's notice on the coordinator's subjects.
      nc.publish(names.shardDone, new Uint8Array([0xff, 0x01, 0x02, 0x03]));
      const foreign = encode("FeatureShard", {
        header: makeHeader("another-job", "intruder"), shardId: "r0123456789abcdef.shard-00000", ids: [], labels: [], splits: [], featureDims: [1280],
        features: new Uint8Array(0), skipped: [], worker: "intruder", seconds: 0,
      });
      nc.publish(names.shardDone, foreign);
      nc.publish(names.progress, new Uint8Array([1, 2, 3]));
      // A task that does not decode, and another job's task, on the work queue: workers terminate them.
      const js = nc.jetstream();
      await js.publish(names.tasks, new TextEncoder().encode("not a protobuf"));
      await js.publish(names.tasks, encode("ShardTask", { header: makeHeader("another-job", "intruder"), shardId: "r0123456789abcdef.shard-00000", ids: ["x"], labels: [0], splits: ["train"], attempt: 1 }));
      await nc.flush();
      const dropped = await check(async () => {
        const m = await c.metrics();
        const s = m.samples.filter((x) => x.name === "ctrain_dropped_messages_total");
        const by = (r: string) => s.filter((x) => x.labels.reason === r).reduce((a, x) => a + x.value, 0);
        return by("malformed") >= 2 && by("wrong_job") >= 1 ? { malformed: by("malformed"), wrong_job: by("wrong_job") } : undefined;
      }, 15_000, 200);
      assert.ok(dropped.malformed >= 2 && dropped.wrong_job >= 1);
      // The worker joins now: it drops the two bad tasks, does the real ones, the job completes.
      const w = await worker(server.url, job, "gb-w0");
      try {
        await expectSuccess(c, [w]);
        const wm = await w.metrics();
        const ws = wm.samples.filter((x) => x.name === "ctrain_dropped_messages_total");
        assert.ok(ws.some((x) => x.labels.reason === "malformed" && x.value >= 1), "the worker counted the malformed task");
        assert.ok(ws.some((x) => x.labels.reason === "wrong_job" && x.value >= 1), "the worker counted the foreign task");
      } finally {
        await killNow([w]);
      }
      assertExactlyOnce(await committed(job));
    } finally {
      await nc.close();
    }
  });

  test("distributed - a forged worker's results (labels, splits, ids, count, feature size, dtype not the plan's) are rejected, counted by reason, never cached", { timeout: 180_000 }, async () => {
    const job = "dist-forged";
    const names = jobNames(job);
    const c = await coordinator(server.url, job);
    await c.waitFor("shard tasks queued", 90_000);
    const nc = await connect({ servers: server.url });
    const FORGED = 0.25;
    // Each forgery answers one task; the coordinator must refuse all six and queue them again.
    const forgeries: ((t: ShardTask) => Partial<FeatureShard> & { dtype?: string })[] = [
      (t) => ({ labels: t.labels.map((l) => (l + 1) % 10) }),
      (t) => ({ splits: t.splits.map((x) => (x === "train" ? "test" : "train")) }),
      (t) => ({ ids: [...t.ids.slice(1), "intruder.png"] }),
      (t) => ({ ids: t.ids.slice(1), labels: t.labels.slice(1), splits: t.splits.slice(1) }),
      () => ({ featureDims: [7] }),
      () => ({ dtype: "fp16" }), // half the bytes: float16 rows where float32 is the format
    ];
    try {
      const js = nc.jetstream();
      const consumer = await js.consumers.get(names.tasksStream, names.tasksConsumer);
      const os = await js.views.os(names.featuresBucket);
      const forgedShards: string[] = [];
      for (const forge of forgeries) {
        const msg = await consumer.next({ expires: 10_000 });
        assert.ok(msg, "a task for the forger");
        const t = decode("ShardTask", msg.data, { job });
        const { dtype, ...f } = { ids: t.ids, labels: t.labels, splits: t.splits, featureDims: [1280], dtype: "fp32", ...forge(t) };
        const dim = f.featureDims.reduce((a, b) => a * b, 1);
        const rows = float32ToBytes(new Float32Array(f.ids.length * dim).fill(FORGED));
        const shard = encode("FeatureShard", {
          header: makeHeader(job, "forger"), shardId: t.shardId, ...f, features: dtype === "fp16" ? rows.subarray(0, rows.length / 2) : rows,
          skipped: [], worker: "forger", seconds: 1,
        });
        await os.putBlob({ name: t.shardId }, shard);
        nc.publish(names.shardDone, encode("FeatureShard", { header: makeHeader(job, "forger"), shardId: t.shardId, ids: [], labels: [], splits: [], featureDims: [1280], features: new Uint8Array(0), skipped: [], worker: "forger", seconds: 1 }));
        await msg.ackAck();
        forgedShards.push(t.shardId);
      }
      const reasons = ["shard_labels", "shard_splits", "shard_ids", "shard_count", "shard_dim", "bad_shape"];
      await check(async () => {
        const m = await c.metrics();
        const s = m.samples.filter((x) => x.name === "ctrain_dropped_messages_total");
        return reasons.every((r) => s.some((x) => x.labels.reason === r && x.value >= 1));
      }, 20_000, 200);
      const w = await worker(server.url, job, "fg-w0");
      try {
        await expectSuccess(c, [w]);
      } finally {
        await stopAll([w]);
      }
      // The honest worker extracted the six refused shards again; the cache holds the plan's labels and splits and no forged row.
      const done = shardsDone([w]);
      for (const wire of forgedShards) assert.equal(done.get(wire), 1, `shard ${wire} extracted again by the honest worker`);
      const set = await committed(job);
      assertExactlyOnce(set);
      const ds = await openDataset("fashion-mnist", { seed: 42, valSplit: 0.1, testSplit: 0.1, limit: LIMIT, maxPixels: 40_000_000 });
      const plan = new Map(ds.samples.map((x) => [x.id, x]));
      set.ids.forEach((id, i) => {
        assert.equal(set.labels[i], plan.get(id)!.label, `label of ${id}`);
        assert.equal(set.splits[i], plan.get(id)!.split, `split of ${id}`);
      });
      const dim = set.meta.featureDim;
      for (let r = 0; r < set.ids.length; r++) assert.ok(set.features.subarray(r * dim, (r + 1) * dim).some((v) => v !== FORGED), `row ${set.ids[r]} is forged`);
    } finally {
      await nc.close();
    }
  });

  test("distributed - a worker that joins late takes work", { timeout: 180_000 }, async () => {
    const job = "dist-late";
    const early = await worker(server.url, job, "late-w0");
    const c = await coordinator(server.url, job);
    await early.waitFor("shard done", 90_000);
    // Hold the early worker while the late one starts, so that the late one surely finds work left
    // (otherwise a fast early worker may finish every shard while the late one loads its model).
    early.proc.kill("SIGSTOP");
    const late = await worker(server.url, job, "late-w1");
    try {
      await late.waitFor("shard done", 90_000);
      early.proc.kill("SIGCONT");
      await expectSuccess(c, [early, late]);
    } finally {
      early.proc.kill("SIGCONT");
      await killNow([early, late]);
    }
    assertExactlyOnce(await committed(job));
    assert.ok(late.logged("shard done").length >= 1, `the late worker did no shard\n${late.tail()}`);
    assert.ok(c.lines.some((l) => l.msg === "worker joined" && l.worker === "late-w1"), "the coordinator saw it join");
  });

  test("distributed - a shard too big for a worker's memory fails the job with a clear error, the worker survives", { timeout: 180_000 }, async () => {
    const job = "dist-memory";
    // 28 samples x 1280 features plus two batches of 64x64 images need about 2 MiB; allow 1 MiB.
    const w = await worker(server.url, job, "mem-w0", [], { CTRAIN_WORKER_MEMORY_BYTES: String(2 ** 20) });
    const c = await coordinator(server.url, job, ["--max-deliver", "2"]);
    try {
      const code = await waitExit(c, 120_000);
      assert.notEqual(code, 0, "the job fails");
      assert.match(c.stderr, /shard \S+ needs about \d+ MiB \(28 samples x 1280 features\) but this worker may use 1 MiB per shard: lower --shard-size/);
      assert.ok(w.alive, `the worker is still running\n${w.tail()}`);
      assert.ok(w.logged("shard failed for good").length >= 1);
    } finally {
      await killNow([w, c]);
    }
  });
});

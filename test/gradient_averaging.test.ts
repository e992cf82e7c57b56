/**
 * Gradient averaging over a real nats-server: exact weighted means for N = 2 and 3 across sizes (one
 * smaller than N, one that needs chunking), fp32 and fp16, O(G) bytes per worker, hostile messages
 * dropped and counted, NaN and silent members, membership changes, a member a step ahead, and N
 * workers training with fit() ending where one process with the global batch ends.
 */
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { fileURLToPath } from "node:url";
import { after, before, describe, test } from "node:test";
import { connect, type NatsConnection } from "nats";
import * as tf from "@tensorflow/tfjs";
import { selectBackend } from "../core/models/backend.js";
import { MembershipChanged, WorkerLostError } from "../core/runtime/errors.js";
import { Rng } from "../core/runtime/rng.js";
import { bytesPerElement, decodeValues, encodeValues, planChunks, sliceRanges, type WireDtype } from "../proto/tensor_codec.js";
import { fit } from "../core/training/train_loop.js";
import { crc32 } from "../proto/checksum.js";
import { encode, makeHeader, type TensorChunk } from "../proto/codec.js";
import { jobNames } from "../proto/subjects.js";
import { GradientAverager, gradientHookFor, type AveragerMetrics } from "../worker/gradient_averaging.js";
import { ConfigError, NonFiniteGradientError, StepPeersLostError } from "../core/runtime/errors.js";
import { weightsChecksum } from "../worker/weights_checksum.js";
import { DP_CONV, DP_SETUP, dpConvData, dpConvModel, dpData, dpModel, type DpFitArgs } from "./helpers/dp_fit_setup.js";
import { startNatsServer, check, type NatsServer } from "./helpers/nats_server.js";

let server: NatsServer;
const conns: NatsConnection[] = [];
let jobSeq = 0;

before(async () => {
  server = await startNatsServer({ jetstream: false });
});
after(async () => {
  for (const nc of conns) await nc.close().catch(() => undefined);
  await server?.stop();
});

async function conn(): Promise<NatsConnection> {
  const nc = await connect({ servers: server.url });
  conns.push(nc);
  return nc;
}

/** Records what the averager reports. */
class Recorder implements AveragerMetrics {
  drops = new Map<string, number>();
  allreduces: Array<{ seconds: number; sent: number; received: number }> = [];
  observeAllreduce(seconds: number, sent: number, received: number): void {
    this.allreduces.push({ seconds, sent, received });
  }
  droppedMessage(reason: string, n = 1): void {
    this.drops.set(reason, (this.drops.get(reason) ?? 0) + n);
  }
  get dropped(): number {
    let t = 0;
    for (const v of this.drops.values()) t += v;
    return t;
  }
}

interface Group {
  job: string;
  members: string[];
  averagers: GradientAverager[];
  metrics: Recorder[];
  close(): Promise<void>;
}

/** N averagers of a fresh job, each on its own connection, members w0..w{N-1}. */
async function group(n: number, opts: { dtype?: WireDtype; timeoutMs?: number; bucketBytes?: number } = {}): Promise<Group> {
  const job = `ar-${process.pid}-${++jobSeq}`;
  const members = Array.from({ length: n }, (_, i) => `w${i}`);
  const metrics = members.map(() => new Recorder());
  const averagers = await Promise.all(
    members.map(async (self, i) =>
      GradientAverager.open({ nc: await conn(), job, self, members, epoch: 1, wireDtype: opts.dtype, timeoutMs: opts.timeoutMs ?? 10_000, bucketBytes: opts.bucketBytes, metrics: metrics[i] }),
    ),
  );
  return { job, members, averagers, metrics, close: async () => void (await Promise.all(averagers.map((a) => a.close()))) };
}

function randomVector(len: number, rng: Rng): Float32Array {
  const v = new Float32Array(len);
  for (let i = 0; i < len; i++) v[i] = rng.next() * 2 - 1;
  return v;
}

/** sum(n_i g_i) / sum(n_i) in float64. */
function weightedMean(grads: Float32Array[], counts: number[]): Float64Array {
  const out = new Float64Array(grads[0]!.length);
  const total = counts.reduce((a, b) => a + b, 0);
  grads.forEach((g, k) => {
    for (let i = 0; i < g.length; i++) out[i]! += g[i]! * counts[k]!;
  });
  for (let i = 0; i < out.length; i++) out[i]! /= total;
  return out;
}

function maxAbsDiff(a: ArrayLike<number>, b: ArrayLike<number>): number {
  assert.equal(a.length, b.length);
  let m = 0;
  for (let i = 0; i < a.length; i++) m = Math.max(m, Math.abs(a[i]! - b[i]!));
  return m;
}

describe("allreduce - averaging", () => {
  for (const dtype of ["fp32", "fp16"] as const) {
    for (const n of [2, 3]) {
      test(`allreduce - ${n} members get the exact weighted mean (${dtype})`, async () => {
        const g = await group(n, { dtype });
        const rng = new Rng(1000 + n);
        const counts = [5, 3, 1].slice(0, n);
        const tol = dtype === "fp32" ? 1e-6 : 2e-3;
        const bpe = bytesPerElement(dtype);
        // 1 and 2 are smaller than N=3 (empty slices); 600_001 elements (2.4 MB fp32, 1.2 MB fp16) need
        // several chunks per slice.
        const sizes = [1, 2, 7, 1000, 600_001];
        for (const [step, len] of sizes.entries()) {
          const grads = g.members.map(() => randomVector(len, rng));
          const results = await Promise.all(g.averagers.map((a, i) => a.average(step, grads[i]!, counts[i]!)));
          const want = weightedMean(grads, counts);
          for (const r of results) assert.ok(maxAbsDiff(r, want) <= tol, `len ${len}: error ${maxAbsDiff(r, want)} > ${tol}`);
          for (const r of results.slice(1)) assert.deepEqual(r, results[0], `len ${len}: every member holds identical values`);
          if (len >= 100_000) {
            // O(G) per worker: G(N-1)/N gradient + G/N averaged sent; 2G(N-1)/N received (plus headers).
            for (const a of g.averagers) {
              const s = a.lastStats!;
              assert.ok(s.bytesSent <= 1.02 * len * bpe, `${a.self} sent ${s.bytesSent} bytes for G = ${len * bpe}`);
              assert.ok(s.bytesSent >= len * bpe, `${a.self} sent ${s.bytesSent}`);
              const recv = (2 * (n - 1)) / n * len * bpe;
              assert.ok(s.bytesReceived >= recv && s.bytesReceived <= 1.02 * recv, `${a.self} received ${s.bytesReceived}, expected about ${recv}`);
              assert.ok(s.messagesSent > 2, "the vector was chunked");
            }
          }
        }
        for (const m of g.metrics) {
          assert.equal(m.dropped, 0, `nothing dropped: ${JSON.stringify([...m.drops])}`);
          assert.equal(m.allreduces.length, sizes.length);
        }
        await g.close();
      });
    }
  }

  test("allreduce - a bucket that cannot fit the server's max_payload is refused naming --bucket-bytes", async () => {
    const nc = await conn();
    const max = nc.info!.max_payload;
    await assert.rejects(
      GradientAverager.open({ nc, job: `job${++jobSeq}`, self: "w0", members: ["w0"], epoch: 1, bucketBytes: max }),
      (e: unknown) => e instanceof ConfigError && /--bucket-bytes/.test((e as Error).message) && new RegExp(`max_payload of ${max}`).test((e as Error).message),
    );
  });

  test("allreduce - one member alone returns its own gradient without the network", async () => {
    const g = await group(1);
    const v = randomVector(100, new Rng(3));
    assert.deepEqual(await g.averagers[0]!.average(0, v, 4), v);
    assert.equal(g.averagers[0]!.lastStats!.bytesSent, 0);
    await g.close();
  });

  test("allreduce - reuseResult alternates two result buffers and every step is still the exact weighted mean", async () => {
    for (const dtype of ["fp32", "fp16"] as const) {
      const g = await group(2, { dtype, bucketBytes: 4096 });
      const rng = new Rng(31);
      const tol = dtype === "fp32" ? 1e-6 : 2e-3;
      const returned: Float32Array[][] = [[], []];
      for (let step = 0; step < 4; step++) {
        const grads = g.members.map(() => randomVector(5001, rng));
        const results = await Promise.all(g.averagers.map((a, i) => a.average(step, grads[i]!, [3, 2][i]!, { reuseResult: true })));
        const want = weightedMean(grads, [3, 2]);
        for (const r of results) assert.ok(maxAbsDiff(r, want) <= tol, `${dtype} step ${step}: error ${maxAbsDiff(r, want)}`);
        assert.deepEqual(results[1], results[0], "every member holds identical values");
        results.forEach((r, i) => returned[i]!.push(r));
      }
      for (const r of returned) {
        assert.notEqual(r[1], r[0], "the next step writes into the other buffer");
        assert.equal(r[2], r[0], "the next-but-one step reuses the first");
        assert.equal(r[3], r[1]);
      }
      await g.close();
    }
  });

  test("allreduce - a member with no samples contributes nothing", async () => {
    const g = await group(3);
    const rng = new Rng(9);
    const grads = g.members.map(() => randomVector(50, rng));
    grads[2]!.fill(NaN); // ignored: no samples behind it (e.g. an empty part of a short last batch)
    const results = await Promise.all(g.averagers.map((a, i) => a.average(0, grads[i]!, [4, 2, 0][i]!)));
    const want = weightedMean(grads.slice(0, 2), [4, 2]);
    for (const r of results) assert.ok(maxAbsDiff(r, want) <= 1e-6);
    await g.close();
  });

  test("allreduce - members running ahead hold the next step's chunks until it starts", async () => {
    const g = await group(3, { bucketBytes: 4096 });
    const rng = new Rng(21);
    const steps = 6;
    const grads = Array.from({ length: steps }, () => g.members.map(() => randomVector(5000, rng)));
    // Each member loops on its own: a fast one sends step s+1 while a slow owner still finishes s.
    const runs = g.averagers.map(async (a, i) => {
      const out: Float32Array[] = [];
      for (let s = 0; s < steps; s++) out.push(await a.average(s, grads[s]![i]!, i + 1));
      return out;
    });
    const results = await Promise.all(runs);
    for (let s = 0; s < steps; s++) {
      const want = weightedMean(grads[s]!, [1, 2, 3]);
      for (const r of results) assert.ok(maxAbsDiff(r[s]!, want) <= 1e-6, `step ${s}`);
    }
    for (const m of g.metrics) assert.equal(m.dropped, 0, JSON.stringify([...m.drops]));
    await g.close();
  });
});

describe("allreduce - hostile input", () => {
  test("allreduce - stale-epoch, wrong-step, foreign-job, NaN and garbage messages are dropped, counted and never applied", async () => {
    const g = await group(2);
    const rng = new Rng(5);
    const len = 64;
    const g0 = g.members.map(() => randomVector(len, rng));
    await Promise.all(g.averagers.map((a, i) => a.average(0, g0[i]!, 2)));

    const names = jobNames(g.job);
    const intruder = await conn();
    const bogus = new Float32Array(len / 2).fill(1000);
    const chunk = (over: { job?: string; sender?: string; epoch?: number; step?: number; data?: Uint8Array; checksum?: number; sampleCount?: number }): Uint8Array => {
      const data = over.data ?? encodeValues(bogus, "fp32");
      const m: TensorChunk = {
        header: makeHeader(over.job ?? g.job, over.sender ?? "w1", over.epoch ?? 1, over.step ?? 1),
        bucketId: 0, chunkIndex: 0, chunkCount: 2, offset: 0, length: len / 2, dtype: "fp32", data,
        sampleCount: over.sampleCount ?? 1000, checksum: over.checksum ?? crc32(data),
      };
      return encode("GradientChunk", m);
    };
    const nan = encodeValues(new Float32Array(len / 2).fill(NaN), "fp32");
    const injected: Array<[string, Uint8Array, string]> = [
      [names.gradients("w0"), new TextEncoder().encode("not a protobuf at all"), "malformed"],
      [names.gradients("w0"), chunk({ checksum: 12345 }), "malformed"],
      [names.gradients("w0"), chunk({ job: "other-job" }), "wrong_job"],
      [names.gradients("w0"), chunk({ epoch: 0 }), "stale_epoch"],
      [names.gradients("w0"), chunk({ step: 0 }), "wrong_step"], // late: step 0 is over
      [names.gradients("w0"), chunk({ step: 9 }), "wrong_step"], // far ahead
      [names.gradients("w0"), chunk({ data: nan }), "non_finite"],
      [names.averaged("w1"), chunk({ step: 0 }), "wrong_step"], // same layout as an AveragedChunk, but late
    ];
    for (const [subject, bytes] of injected) intruder.publish(subject, bytes);
    // A well-formed chunk of the next step from a non-member: held until step 1 starts, then refused.
    intruder.publish(names.gradients("w0"), chunk({ sender: "intruder" }));
    await intruder.flush();
    const m0 = g.metrics[0]!;
    const m1 = g.metrics[1]!;
    await check(() => m0.dropped + m1.dropped >= injected.length);

    const g1 = g.members.map(() => randomVector(len, rng));
    const results = await Promise.all(g.averagers.map((a, i) => a.average(1, g1[i]!, [3, 1][i]!)));
    const want = weightedMean(g1, [3, 1]);
    for (const r of results) assert.ok(maxAbsDiff(r, want) <= 1e-6, `result unchanged by injected messages (error ${maxAbsDiff(r, want)})`);
    const drops = new Map<string, number>();
    for (const m of g.metrics) for (const [k, v] of m.drops) drops.set(k, (drops.get(k) ?? 0) + v);
    assert.equal(drops.get("malformed"), 2);
    assert.equal(drops.get("wrong_job"), 1);
    assert.equal(drops.get("stale_epoch"), 1);
    assert.equal(drops.get("non_finite"), 1);
    assert.equal(drops.get("unknown_sender"), 1);
    // A GradientChunk parses as an AveragedChunk (same layout): the one on avg.w1 is dropped as late.
    assert.equal(drops.get("wrong_step"), 3);
    assert.equal(m0.dropped + m1.dropped, injected.length + 1);
    await g.close();
  });

  test("allreduce - a NaN gradient stops its member before it sends; peers time out naming it, then redo the step without it", async () => {
    const g = await group(3, { timeoutMs: 1500 });
    const rng = new Rng(8);
    const grads = g.members.map(() => randomVector(300, rng));
    grads[1]![17] = NaN;
    const t0 = Date.now();
    const settled = await Promise.allSettled(g.averagers.map((a, i) => a.average(0, grads[i]!, 2)));
    assert.ok(Date.now() - t0 < 1500 + 2000, "within the timeout");
    const [r0, r1, r2] = settled;
    assert.equal(r1!.status, "rejected");
    assert.ok((r1 as PromiseRejectedResult).reason instanceof NonFiniteGradientError);
    assert.match(String((r1 as PromiseRejectedResult).reason.message), /element 17.*nothing was sent/);
    for (const r of [r0, r2]) {
      assert.equal(r!.status, "rejected");
      const err = (r as PromiseRejectedResult).reason as StepPeersLostError;
      assert.ok(err instanceof WorkerLostError, String(err));
      assert.equal(err.worker, "w1");
      assert.deepEqual(err.missingGradients, ["w1"]);
      assert.match(err.message, /no gradient from "w1"/);
    }
    // Nothing from w1 was ever applied: no chunk of it was even received.
    for (const m of g.metrics) assert.equal(m.allreduces.length, 0);
    // Elastic: the survivors move to epoch 2 and redo step 0.
    const survivors = [g.averagers[0]!, g.averagers[2]!];
    await Promise.all(survivors.map((a) => a.setMembership(2, ["w0", "w2"])));
    const results = await Promise.all(survivors.map((a, k) => a.average(0, grads[k * 2]!, 2)));
    const want = weightedMean([grads[0]!, grads[2]!], [2, 2]);
    for (const r of results) assert.ok(maxAbsDiff(r, want) <= 1e-6);
    await g.close();
  });

  test("allreduce - a member that completed a step a survivor must redo resends what it applied; both meet at the next step", async () => {
    // w0 completes step 0; w1 gives up on it (its timeout fires before w2's averaged slice comes), then
    // w2 is gone. w1 redoes step 0 under the new membership while w0 already runs step 1.
    const job = `ar-${process.pid}-${++jobSeq}`;
    const members = ["w0", "w1", "w2"];
    const dtype = "fp16";
    const bucketBytes = 4096;
    const len = 5000; // 10 KB in fp16: several chunks per slice
    const [m0, m1] = [new Recorder(), new Recorder()];
    const a0 = await GradientAverager.open({ nc: await conn(), job, self: "w0", members, epoch: 1, wireDtype: dtype, bucketBytes, timeoutMs: 20_000, metrics: m0 });
    const a1 = await GradientAverager.open({ nc: await conn(), job, self: "w1", members, epoch: 1, wireDtype: dtype, bucketBytes, timeoutMs: 4000, metrics: m1 });
    const rng = new Rng(77);
    const g = members.map(() => randomVector(len, rng));
    const n = [4, 3, 2];
    // w2 is played by hand: its gradient chunks for w0's and w1's slices now, its averaged slice later.
    const w2 = await conn();
    const names = jobNames(job);
    const slices = sliceRanges(len, 3);
    const chunks = planChunks([len], { dtype, bucketBytes, slices });
    const send = (type: "GradientChunk" | "AveragedChunk", subject: string, values: Float32Array, c: (typeof chunks)[number], sampleCount: number): void => {
      const data = encodeValues(values.subarray(c.offset, c.offset + c.length), dtype);
      w2.publish(subject, encode(type, {
        header: makeHeader(job, "w2", 1, 0), bucketId: c.bucketId, chunkIndex: c.chunkIndex, chunkCount: c.chunkCount,
        offset: c.offset, length: c.length, dtype, data, sampleCount, checksum: crc32(data),
      }));
    };
    const step0 = [a0.average(0, g[0]!, n[0]!), a1.average(0, g[1]!, n[1]!).then(() => assert.fail("w1 cannot complete step 0"), (e: unknown) => e)];
    for (const c of chunks) if (c.slice !== 2) send("GradientChunk", names.gradients(members[c.slice]!), g[2]!, c, n[2]!);
    await w2.flush();
    const lost = (await step0[1]) as StepPeersLostError;
    assert.ok(lost instanceof StepPeersLostError, String(lost));
    assert.deepEqual(lost.missingAveraged, ["w2"]);
    // Now w2's averaged slice: only w0 is still waiting for it.
    const mean = weightedMean(g, n);
    const avg2 = Float32Array.from(mean);
    for (const c of chunks) if (c.slice === 2) send("AveragedChunk", names.averaged("w2"), avg2, c, 9);
    await w2.flush();
    const r0 = (await step0[0]) as Float32Array;
    assert.ok(maxAbsDiff(r0, mean) <= 2e-3, "w0 applied the step-0 mean of all three");
    // The coordinator drops w2. w0 goes on to step 1; w1 redoes step 0 (its part of the batch is now bigger).
    await Promise.all([a0.setMembership(2, ["w0", "w1"]), a1.setMembership(2, ["w0", "w1"])]);
    const h = [randomVector(len, rng), randomVector(len, rng)];
    const step1 = a0.average(1, h[0]!, 5);
    const redo = await a1.average(0, randomVector(len, rng), 6);
    assert.deepEqual(redo, r0, "the redo returns exactly what w0 applied");
    assert.equal(a0.replaysSent, 1);
    assert.equal(a1.replaysApplied, 1);
    const r1 = await a1.average(1, h[1]!, 2);
    assert.deepEqual(await step1, r1, "step 1 is averaged together again, identical on both");
    assert.ok(maxAbsDiff(r1, weightedMean(h, [5, 2])) <= 2e-3);
    // The replay is exact fp32 of fp16-rounded values: re-encoding changes nothing.
    assert.deepEqual(decodeValues(encodeValues(redo, "fp16"), "fp16"), redo);
    assert.equal(m0.dropped, 0, JSON.stringify([...m0.drops]));
    await Promise.all([a0.close(), a1.close()]);
  });

  test("allreduce - gradientHookFor redoes a failed step under the same step number", async () => {
    const g = await group(2, { timeoutMs: 500 });
    const model = dpModel();
    const hook = gradientHookFor(g.averagers[0]!, model, { firstStep: 7 });
    const grads = (): tf.NamedTensorMap => Object.fromEntries(model.trainableWeights.map((w) => [(w.read() as tf.Variable).name, tf.ones(w.shape as number[])]));
    const first = grads();
    await assert.rejects(hook(first, 2), StepPeersLostError); // w1 never sends
    await g.averagers[0]!.setMembership(2, ["w0"]);
    tf.dispose(await hook(first, 2));
    assert.equal(g.averagers[0]!.lastStats?.step, 7, "the redo is step 7 again, not 8");
    const second = grads();
    tf.dispose(await hook(second, 2));
    assert.equal(g.averagers[0]!.lastStats?.step, 8);
    tf.dispose([first, second]);
    model.dispose();
    await g.close();
  });

  test("allreduce - a member that never sends is named within the timeout", async () => {
    const g = await group(3, { timeoutMs: 1000 });
    const rng = new Rng(4);
    const t0 = Date.now();
    const settled = await Promise.allSettled([0, 1].map((i) => g.averagers[i]!.average(0, randomVector(100, rng), 1)));
    const elapsed = Date.now() - t0;
    assert.ok(elapsed >= 900 && elapsed < 3000, `elapsed ${elapsed} ms`);
    for (const r of settled) {
      assert.equal(r.status, "rejected");
      const err = (r as PromiseRejectedResult).reason as StepPeersLostError;
      assert.ok(err instanceof WorkerLostError);
      assert.equal(err.worker, "w2");
      assert.match(err.message, /"w2"/);
    }
    await g.close();
  });

  test("allreduce - a membership change during a step ends it with MembershipChanged; old-epoch messages are then stale", async () => {
    const g = await group(2, { timeoutMs: 5000 });
    const p = g.averagers[0]!.average(0, new Float32Array(10), 1).then(() => undefined, (e: unknown) => e);
    await g.averagers[0]!.setMembership(2, ["w0", "w1"]);
    assert.ok((await p) instanceof MembershipChanged);
    // w1 still on epoch 1: its chunks are stale for w0; w0 times out as w1 on epoch 2 never comes.
    const late = g.averagers[1]!.average(0, new Float32Array(10), 1).catch((e: Error) => e);
    await check(() => (g.metrics[0]!.drops.get("stale_epoch") ?? 0) >= 1);
    await g.close();
    assert.ok((await late) instanceof Error);
  });
});

describe("allreduce - training", () => {
  before(async () => {
    await selectBackend("cpu");
  });

  /** Weights of one process training on the whole global batch. */
  async function reference(): Promise<number[][]> {
    const model = dpModel();
    const opt = tf.train.sgd(DP_SETUP.learningRate);
    await fit(model, dpData(), { epochs: DP_SETUP.epochs, batchSize: DP_SETUP.batchSize, seed: DP_SETUP.seed, numClasses: DP_SETUP.classes, optimizer: opt });
    const w = model.trainableWeights.map((v) => Array.from(v.read().dataSync()));
    model.dispose();
    opt.dispose();
    return w;
  }

  type Digest = { checksum: number; parameterCount: number; sum: number };
  type WorkerResult = { self: string; digest: Digest; weights: number[][]; sweep?: { size: number; digest: Digest; weights: number[][] }[] };
  function runWorker(args: DpFitArgs): Promise<WorkerResult> {
    const script = fileURLToPath(new URL("./helpers/dp_fit_worker.js", import.meta.url));
    return new Promise((resolve, reject) => {
      const p = spawn(process.execPath, [script, JSON.stringify(args)], { stdio: ["ignore", "pipe", "pipe"] });
      let out = "";
      let err = "";
      p.stdout.on("data", (d: Buffer) => (out += d.toString()));
      p.stderr.on("data", (d: Buffer) => (err += d.toString()));
      p.on("exit", (code) => (code === 0 ? resolve(JSON.parse(out)) : reject(new Error(`worker ${args.self} exited ${code}: ${err.slice(-2000)}`))));
    });
  }

  /** Starts one dp_fit_worker per member, lets them go once all are subscribed, returns their results. */
  async function runGroup(job: string, members: string[], sweep?: DpFitArgs["sweep"]): Promise<WorkerResult[]> {
    const nc = await conn();
    const ready = nc.subscribe(`${job}-ready`, { max: members.length });
    await nc.flush();
    const workers = members.map((self) => runWorker({ url: server.url, job, self, members, ...(sweep ? { sweep } : {}) }));
    for await (const _ of ready) {
      // wait for every member
    }
    nc.publish(`${job}-go`);
    return Promise.all(workers);
  }

  for (const n of [2, 3]) {
    test(`allreduce - ${n} workers training with fit() on slices of the global batch end with the weights of one process on the whole batch`, async () => {
      const want = await reference();
      const job = `fit-${process.pid}-${n}`;
      const members = Array.from({ length: n }, (_, i) => `w${i}`);
      const results = await runGroup(job, members);
      for (const r of results) {
        assert.deepEqual(r.digest, results[0]!.digest, "every replica holds bit-identical weights");
        r.weights.forEach((w, k) => assert.ok(maxAbsDiff(w, want[k]!) <= 1e-5, `${r.self} weight ${k} differs from the single-process run by ${maxAbsDiff(w, want[k]!)}`));
      }
    });
  }

  test("allreduce - conv model on wasm, every training-set size from 1 to 3 batches, N = 2 and 3: no member fails on an empty slice, weights as one process", async () => {
    const sizes = Array.from({ length: 3 * DP_CONV.batchSize }, (_, i) => i + 1);
    const reference: number[][][] = [];
    for (const n of sizes) {
      const model = dpConvModel();
      const opt = tf.train.sgd(DP_CONV.learningRate);
      await fit(model, dpConvData(n), { epochs: 1, batchSize: DP_CONV.batchSize, seed: DP_CONV.seed, numClasses: DP_CONV.classes, optimizer: opt });
      reference.push(model.trainableWeights.map((v) => Array.from(v.read().dataSync())));
      model.dispose();
      opt.dispose();
    }
    for (const n of [2, 3]) {
      const job = `sweep-${process.pid}-${n}`;
      const members = Array.from({ length: n }, (_, i) => `w${i}`);
      const results = await runGroup(job, members, { sizes });
      for (const r of results) {
        assert.equal(r.sweep!.length, sizes.length);
        r.sweep!.forEach((s, i) => {
          assert.deepEqual(s.digest, results[0]!.sweep![i]!.digest, `N=${n}, ${s.size} samples: every replica holds the same weights`);
          s.weights.forEach((w, k) => assert.ok(maxAbsDiff(w, reference[i]![k]!) <= 1e-4, `N=${n}, ${s.size} samples: ${r.self} weight ${k} differs by ${maxAbsDiff(w, reference[i]![k]!)}`));
        });
      }
    }
  });

  test("allreduce - gradientHookFor returns fresh tensors in model order and the weights checksum tracks the weights", async () => {
    const g = await group(2);
    const models = [dpModel(), dpModel()];
    const hooks = g.averagers.map((a, i) => gradientHookFor(a, models[i]!));
    const gradsFor = (m: tf.LayersModel, scale: number): tf.NamedTensorMap => {
      const out: tf.NamedTensorMap = {};
      for (const w of m.trainableWeights) out[(w.read() as tf.Variable).name] = tf.fill(w.shape as number[], scale);
      return out;
    };
    const before = tf.memory().numTensors;
    const inputs = [gradsFor(models[0]!, 1), gradsFor(models[1]!, 4)];
    const outs = await Promise.all(hooks.map((h, i) => h(inputs[i]!, [1, 3][i]!)));
    for (const [i, out] of outs.entries()) {
      assert.deepEqual(Object.keys(out).sort(), Object.keys(inputs[i]!).sort());
      for (const t of Object.values(out)) for (const v of t.dataSync()) assert.ok(Math.abs(v - (1 * 1 + 4 * 3) / 4) < 1e-6);
    }
    tf.dispose(inputs);
    tf.dispose(outs);
    assert.equal(tf.memory().numTensors, before, "no tensor leaked");
    const d0 = weightsChecksum(models[0]!);
    assert.deepEqual(weightsChecksum(models[1]!), d0, "same init, same digest");
    const w = models[1]!.trainableWeights[0]!;
    w.write(tf.tidy(() => w.read().add(1e-3)));
    assert.notEqual(weightsChecksum(models[1]!).checksum, d0.checksum);
    models.forEach((m) => m.dispose());
    await g.close();
  });
});

/**
 * DataParallelDriver against a real nats-server, with the replicas played by the test: it writes
 * their heartbeats and reports into the job's KV buckets and reads the plans the driver publishes.
 * No model and no worker process, so each membership path runs in seconds (the whole job with real
 * workers runs in data_parallel.test.ts).
 */
import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";
import { connect, type KV, type NatsConnection, type ObjectStore } from "nats";
import { DataParallelDriver, type DriveResult } from "../coordinator/data_parallel_driver.js";
import { ReplicaFailedError, WorkersUnavailableError } from "../core/runtime/errors.js";
import { createLogger } from "../core/runtime/log.js";
import { encodeState, putBytes, type TrainingState } from "../core/training/checkpoints.js";
import { encode, makeHeader } from "../proto/codec.js";
import { jobNames, WORKER_REGISTRY_TTL_MS } from "../proto/subjects.js";
import {
  completeAttempt, decodeMembershipPlan, encodeBoundaryDecision, encodeReport, TRAINING_KEYS, TRAINING_OBJECTS, type MembershipPlan, type TrainingReport,
} from "../proto/training_wire.js";
import type { TrainingControls } from "../core/training/train_loop.js";
import { check, startNatsServer, type NatsServer } from "./helpers/nats_server.js";

let server: NatsServer;
let nc: NatsConnection;

before(async () => {
  server = await startNatsServer();
  nc = await connect({ servers: server.url });
});

after(async () => {
  await nc?.drain();
  await server?.stop();
});

const state0: TrainingState = { cursor: { epoch: 0, batch: 0, step: 0 }, weights: [], optimizer: [], meta: {} };

/** A job's stores, a driver for it and the replicas' side of the protocol. */
async function setup(job: string, workers: number, readyTimeoutMs = 20_000, controls?: TrainingControls) {
  const names = jobNames(job);
  const js = nc.jetstream();
  const state: KV = await js.views.kv(names.stateBucket, { history: 1 });
  const registry: KV = await js.views.kv(names.workersBucket, { history: 1, ttl: WORKER_REGISTRY_TTL_MS });
  const os: ObjectStore = await js.views.os(names.checkpointsBucket);
  const attempt = completeAttempt({
    attempt: "a1", model: "m", inputSize: 64, featureLayer: "out_relu", pooling: "avg", fineTuneLayers: "3", learningRate: 1e-3, seed: 1, globalBatch: 12, epochs: 2, numClasses: 3, fingerprint: "fp", controls,
  });
  const lines: Record<string, unknown>[] = [];
  const log = createLogger({ job, format: "json", level: "debug", stream: { write: (s: string) => lines.push(JSON.parse(s) as Record<string, unknown>) } });
  const driver = new DataParallelDriver({ job, log, state, registry, os, attempt, start: state0, totalSteps: 8, workers, readyTimeoutMs });
  const plans: MembershipPlan[] = [];
  const w = await state.watch({ key: TRAINING_KEYS.members });
  void (async () => {
    for await (const e of w) if (e.operation === "PUT") plans.push(decodeMembershipPlan(job, "a1", e.value)!);
  })();
  return {
    driver, plans, lines, stopWatch: () => w.stop(),
    alive: (worker: string) => registry.put(worker, encode("Heartbeat", { header: makeHeader(job, worker), worker, state: "training", backend: "wasm", host: "h", pid: 1, imagesPerSecond: 0, shardId: "", shardsDone: 0 })),
    gone: (worker: string) => registry.delete(worker),
    report: (worker: string, r: Omit<TrainingReport, "attempt" | "worker" | "at">) => state.put(TRAINING_KEYS.report(worker), encodeReport(job, { ...r, attempt: "a1", worker, at: Date.now() })),
    decide: (step: number, epoch: number) => state.put(TRAINING_KEYS.boundary, encodeBoundaryDecision(job, "w0", "a1", { step, epoch })),
    storeFinal: (step: number, epoch = 2) => putBytes(os, TRAINING_OBJECTS.final("a1"), encodeState({ ...state0, cursor: { epoch, batch: 0, step }, meta: { complete: true } })),
  };
}

describe("data-parallel driver", () => {
  test("data-parallel driver - plans the ready replicas, drops a member a survivor names lost, admits a joiner at member 0's boundary, ends on member 0's done", async () => {
    const s = await setup("drv1", 3);
    for (const w of ["w0", "w1", "w2"]) await s.alive(w);
    const run: Promise<DriveResult> = s.driver.run();
    for (const w of ["w2", "w1", "w0"]) await s.report(w, { state: "ready", step: 0 });
    await check(() => s.plans.length === 1, 10_000);
    assert.deepEqual(s.plans[0], { epoch: 1, members: ["w0", "w1", "w2"], joining: [] });
    // w2's heartbeat is gone and w0's step timed out on it.
    await s.gone("w2");
    await s.report("w0", { state: "peers_lost", step: 3, lost: ["w2"], epoch: 1 });
    await check(() => s.plans.length === 2, 10_000);
    assert.deepEqual(s.plans[1], { epoch: 2, members: ["w0", "w1"], joining: [] });
    // w2 comes back and says it waits: proposed for the next boundary, admitted when member 0 applies it.
    await s.alive("w2");
    await s.report("w2", { state: "waiting", step: 3 });
    await check(() => s.plans.length === 3, 10_000);
    assert.deepEqual(s.plans[2], { epoch: 3, members: ["w0", "w1", "w2"], joining: ["w2"] });
    await s.decide(4, 3);
    await check(() => s.lines.some((l) => l.msg === "workers joined at a training-epoch boundary"), 10_000);
    const h = [{ epoch: 0, loss: 1, accuracy: 0.5, seconds: 1, samples_per_second: 10 }];
    await s.report("w1", { state: "done", step: 8, history: h, allreduce_seconds: 1, allreduce_bytes: 10 });
    await s.storeFinal(8);
    await s.report("w0", { state: "done", step: 8, history: h, allreduce_seconds: 3, allreduce_bytes: 30 });
    const r = await run;
    s.stopWatch();
    assert.equal(r.final.cursor.step, 8);
    assert.deepEqual(r.history, h);
    assert.deepEqual(r.allreduce, { seconds: 2, bytes: 20, workers: 3 });
  });

  test("data-parallel driver - a replica that cannot load stops the attempt with ReplicaFailedError", async () => {
    const s = await setup("drv2", 2);
    await s.alive("w0");
    const run = s.driver.run();
    await s.report("w0", { state: "failed", error: "Error: no such model" });
    await assert.rejects(run, (e: unknown) => e instanceof ReplicaFailedError && e.worker === "w0" && /could not start fine-tuning: Error: no such model/.test(e.message));
    s.stopWatch();
  });

  test("data-parallel driver - no replica ready in time, or the last member lost, is WorkersUnavailableError", async () => {
    const none = await setup("drv3", 1, 300);
    await assert.rejects(none.driver.run(), (e: unknown) => e instanceof WorkersUnavailableError && /within 300 ms/.test(e.message));
    none.stopWatch();
    const s = await setup("drv4", 1);
    await s.alive("w0");
    const run = s.driver.run();
    await s.report("w0", { state: "ready", step: 0 });
    await check(() => s.plans.length === 1, 10_000);
    await s.gone("w0");
    await assert.rejects(run, (e: unknown) => e instanceof WorkersUnavailableError && /every fine-tuning worker was lost \(last: w0\)/.test(e.message));
    s.stopWatch();
  });

  test("data-parallel driver - under early stopping a waiting worker is proposed to join, and member 0's done ends the attempt before its epochs", async () => {
    const s = await setup("drv5", 2, 20_000, { earlyStoppingPatience: 1, restoreBestWeights: true });
    for (const w of ["w0", "w1"]) await s.alive(w);
    const run: Promise<DriveResult> = s.driver.run();
    for (const w of ["w0", "w1"]) await s.report(w, { state: "ready", step: 0 });
    await check(() => s.plans.length === 1, 10_000);
    await s.gone("w1");
    await s.report("w0", { state: "peers_lost", step: 2, lost: ["w1"], epoch: 1 });
    await check(() => s.plans.length === 2, 10_000);
    // w1 is back and waits: the join state carries the controls' state, so it is proposed as without controls.
    await s.alive("w1");
    await s.report("w1", { state: "waiting", step: 2 });
    await check(() => s.plans.length === 3, 10_000);
    assert.deepEqual(s.plans[2], { epoch: 3, members: ["w0", "w1"], joining: ["w1"] });
    // Stopped early after epoch 1 of 2 (step 4 of 8), epoch 1's weights restored.
    const h = [{ epoch: 1, loss: 1, accuracy: 0.5, val_loss: 0.9, val_accuracy: 0.6, best: true as const, seconds: 1, samples_per_second: 10 }];
    await s.storeFinal(4, 1);
    await s.report("w0", { state: "done", step: 4, history: h });
    const r = await run;
    s.stopWatch();
    assert.equal(s.plans.length, 3, "one join proposed, never applied: the attempt stopped first");
    assert.equal(r.final.cursor.step, 4);
    assert.deepEqual(r.history, h);
  });
});

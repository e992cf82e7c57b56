/**
 * Data-parallel fine-tuning across ctrain workers: the coordinator's driver.
 *
 * Design
 * - Spec. The coordinator publishes one training spec per attempt: a JobSpec (model, input size,
 *   feature layer, pooling, --fine-tune-layers, learning rate, seed, global batch, classes, wire dtype;
 *   `extra`: attempt id, epochs, checksum/checkpoint periods, step timeout, config fingerprint) under
 *   TRAINING_KEYS.spec in the job's state KV. Beside it, in the job's checkpoints object store: the
 *   trained head (topology + weights), the start state (every weight of top + head, the optimizer's
 *   state, the data cursor; core/training/checkpoints.ts) and the training rows.
 * - Data. The rows are the cached activations at the cut that the one-process path trains on; the
 *   coordinator already has them (runJob extracted them through the workers), so it puts the train
 *   and validation sets into the object store once and every worker fetches them whole. That is the
 *   simplest correct choice: the global batches are a seeded permutation of all rows, so over an
 *   epoch every worker touches every part of the data anyway; recomputing activations per worker
 *   would redo the frozen bottom N times. Cost: the activation set once per worker (at input 96 and
 *   3 fine-tuned layers, 3x3x320 floats = 11.5 KB per image).
 * - Replicas. Each worker (worker/training_worker.ts) builds the same trainable part (top from the
 *   pretrained weights + pooling + the head from the same weights) and restores the start state, so
 *   all replicas start bit-identical, then runs train_loop's fit() -- the one step implementation of
 *   the one-process path -- with `sliceOf` (member i takes the i-th contiguous part of each global
 *   batch, by member index) and gradientHookFor(averager) (weighted by sample count, so N workers on
 *   global batch B give the mean gradient of B). The coordinator is not on the gradient path: it
 *   plans membership and watches.
 * - Membership. Workers report `ready` (their averager subscribed) in the state KV; the coordinator
 *   puts a StepPlan (header.epoch = membership epoch 1, members in order) under TRAINING_KEYS.members.
 *   A member lost mid-step (its heartbeat gone from the worker registry, or named by the survivors'
 *   `peers_lost` reports after StepPeersLostError) is removed: membership epoch + 1, new StepPlan; the
 *   survivors call setMembership, recompute their part of the same global batch and average again.
 *   The update is applied only after averaging succeeded, so no replica holds a half-applied step.
 * - Joining (elastic scale-up). A replica that becomes ready after the first plan (a worker started
 *   late, or a member left out earlier that reports `waiting`) is proposed: a StepPlan with the
 *   current members unchanged plus the newcomers in `joining`, under a new epoch. The members go on
 *   as they are. At the first step S of every training epoch member 0 decides -- a Control
 *   EPOCH_BOUNDARY under TRAINING_KEYS.boundary naming the proposal's epoch (after putting its state
 *   at S, weights + Adam moments + cursor, as CHECKPOINT_OBJECTS.join) or the current one -- and
 *   every member waits for that decision before averaging step S. The joiners restore the join state
 *   and everyone runs step S under the new membership; a weights checksum of step S from every member
 *   proves the joiners start from the same replica. Plans and decisions live in one KV subject tree
 *   (TRAINING_KEYS.plan), so every replica reads them in one order and reaches the same membership
 *   (worker/membership_view.ts); a proposal withdrawn by a later plan is not applied by a late decision.
 * - Consistency. Every K steps each replica publishes WeightsChecksum; replicas compare and a
 *   mismatch fails the job with ReplicaMismatchError.
 * - Checkpoints. Member 0 puts the state (weights + Adam moments + cursor (epoch, batch, step)) to
 *   the object store as `latest` every M steps, and the final state at the end; the coordinator copies
 *   them to <out>/checkpoints/. A coordinator restarted with the same job id finds `latest` (same
 *   config fingerprint) and makes it the start state of a new attempt: fit() resumes at
 *   initialEpoch + initialBatch, completed steps are not redone. A new spec supersedes the old
 *   attempt: workers still running it stop.
 * - Survivors one step apart: a member can complete a step that another survivor gave up on a moment
 *   earlier (its timeout fired first, or the new plan aborted it with the last slice in flight). The
 *   one ahead resends the averaged vector it applied and the other takes it as the step's result
 *   ("Catch-up" in worker/gradient_averaging.ts), so both apply the same update and meet at the next
 *   step.
 */
import type { JetStreamClient, KV, NatsConnection, ObjectStore } from "nats";
import * as tf from "@tensorflow/tfjs";
import type { Pooling, WireDtype } from "../core/runtime/config.js";
import { ensureTaskQueue, DEFAULT_ACK_WAIT_MS, DEFAULT_MAX_DELIVER } from "../proto/extraction_wire.js";
import type { Logger } from "../core/runtime/log.js";
import type { CtrainMetrics } from "../core/runtime/metrics.js";
import { WorkersUnavailableError } from "../core/runtime/errors.js";
import { fineTuneModel, type SplitBase } from "../core/models/model_split.js";
import { sliceRanges } from "../proto/tensor_codec.js";
import { type ArrayData, type EpochStats, evaluate, epochBatches } from "../core/training/train_loop.js";
import { decode, DecodeError, encode, makeHeader, type JobSpec } from "../proto/codec.js";
import { jobNames, WORKER_REGISTRY_TTL_MS } from "../proto/subjects.js";
import { captureState, CHECKPOINT_OBJECTS, decodeState, encodeState, getBytes, putBytes, restoreState, writeStateFile, type TrainingState } from "../core/training/checkpoints.js";
import type { FineTuneResult } from "./fine_tuning.js";
import { confusionMatrix } from "./head_training.js";
import { decodeReport, encodeDataObject, encodeHeadObject, TRAINING_KEYS, type TrainingReport } from "../proto/training_wire.js";
import { StragglerMonitor } from "./straggler_monitor.js";

export interface DataParallelOptions {
  nc: NatsConnection;
  job: string;
  log: Logger;
  metrics?: CtrainMetrics;
  model: string;
  inputSize: number;
  featureLayer: string;
  pooling: Pooling;
  fineTuneLayers: string;
  learningRate: number;
  seed: number;
  /** Global batch (split across the members). */
  batchSize: number;
  epochs: number;
  numClasses: number;
  wireDtype?: WireDtype;
  /** Workers to wait for before the first step. */
  workers: number;
  /** How long to wait for `workers` replicas to be ready before starting with those that are, ms. Default 120000. */
  readyTimeoutMs?: number;
  /** Steps between replica checksum exchanges. Default 10 (CTRAIN_DP_CHECKSUM_EVERY). */
  checksumEvery?: number;
  /** Steps between checkpoints. Default 20 (CTRAIN_DP_CHECKPOINT_EVERY); 0 = only the final state. */
  checkpointEvery?: number;
  /** Step deadline before peers count as lost, ms. Default 30000 (CTRAIN_DP_STEP_TIMEOUT_MS). */
  stepTimeoutMs?: number;
  /** Run folder: checkpoints are copied to <out>/checkpoints/. */
  out?: string;
  onBatchProgress?: (step: number, totalSteps: number, epoch: number) => void;
  onEpochEnd?: (s: EpochStats) => void | Promise<void>;
  signal?: AbortSignal;
}

/** Fingerprint of what a checkpoint is valid for. */
function fingerprint(o: DataParallelOptions, trainRows: number): string {
  return JSON.stringify([o.model, o.inputSize, o.featureLayer, o.pooling, o.fineTuneLayers, o.learningRate, o.seed, o.batchSize, o.numClasses, trainRows]);
}

const envInt = (name: string, def: number): number => {
  const v = process.env[name];
  return v !== undefined && /^\d+$/.test(v) ? Number(v) : def;
};

/** Fine-tunes split.top + head data-parallel over the job's workers; the trained weights end up in them. */
export async function runDataParallelFineTune(split: SplitBase, head: tf.LayersModel, data: { train: ArrayData; val: ArrayData; test: ArrayData }, o: DataParallelOptions): Promise<FineTuneResult> {
  const t0 = performance.now();
  const { nc, job, log } = o;
  const names = jobNames(job);
  const js: JetStreamClient = nc.jetstream();
  await ensureTaskQueue(await nc.jetstreamManager(), names, { ackWaitMs: DEFAULT_ACK_WAIT_MS, maxDeliver: DEFAULT_MAX_DELIVER }); // workers bind to the job through it
  const os: ObjectStore = await js.views.os(names.checkpointsBucket);
  const state: KV = await js.views.kv(names.stateBucket, { history: 1 });
  const registry: KV = await js.views.kv(names.workersBucket, { history: 1, ttl: WORKER_REGISTRY_TTL_MS });
  const checksumEvery = o.checksumEvery ?? envInt("CTRAIN_DP_CHECKSUM_EVERY", 10);
  const checkpointEvery = o.checkpointEvery ?? envInt("CTRAIN_DP_CHECKPOINT_EVERY", 20);
  const stepTimeoutMs = o.stepTimeoutMs ?? envInt("CTRAIN_DP_STEP_TIMEOUT_MS", 30_000);
  const attempt = `${Date.now().toString(36)}${Math.floor(Math.random() * 1e4).toString(36)}`;
  const fp = fingerprint(o, data.train.y.length);
  const sender = `coordinator-${attempt}`;
  const stepsPerEpoch = epochBatches(data.train.y.length, o.batchSize, o.seed, 0).length;
  const totalSteps = stepsPerEpoch * o.epochs;

  const model = fineTuneModel(split, head, o.pooling, false);
  const optimizer = tf.train.adam(o.learningRate);
  try {
    const valBefore = evaluate(model, data.val, o.numClasses);
    // Resume: the job's latest checkpoint, when it was made for this configuration.
    let start: TrainingState = await captureState(model, optimizer, { epoch: 0, batch: 0, step: 0 }, { fingerprint: fp, history: [] });
    const latestBytes = await getBytes(os, CHECKPOINT_OBJECTS.latest).catch(() => null);
    if (latestBytes) {
      const latest = decodeState(latestBytes);
      if (latest.meta["fingerprint"] === fp) {
        start = latest;
        log.info("resuming fine-tuning from checkpoint", { step: latest.cursor.step, epoch: latest.cursor.epoch, batch: latest.cursor.batch, of_steps: totalSteps });
      } else log.info("ignoring a checkpoint of another configuration", { step: latest.cursor.step });
    }
    let final: TrainingState;
    let history = (start.meta["history"] as EpochStats[] | undefined) ?? [];
    let allreduce = { seconds: 0, bytes: 0, workers: 0 };
    if (start.cursor.step >= totalSteps) {
      log.info("fine-tuning already complete in the checkpoint", { step: start.cursor.step });
      final = start;
    } else {
      await putBytes(os, CHECKPOINT_OBJECTS.head(attempt), await encodeHeadObject(head));
      await putBytes(os, CHECKPOINT_OBJECTS.start(attempt), encodeState(start));
      await putBytes(os, CHECKPOINT_OBJECTS.data(attempt, "train"), encodeDataObject(data.train));
      await putBytes(os, CHECKPOINT_OBJECTS.data(attempt, "val"), encodeDataObject(data.val));
      const spec: JobSpec = {
        header: makeHeader(job, sender), data: `${names.checkpointsBucket}/${CHECKPOINT_OBJECTS.data(attempt, "train")}`, model: o.model, inputSize: o.inputSize, featureLayer: o.featureLayer, pooling: o.pooling,
        method: "cached", batchSize: o.batchSize, seed: o.seed, backend: "auto", limit: 0, valSplit: 0, testSplit: 0, shardSize: 0, maxPixels: 0,
        fineTuneLayers: o.fineTuneLayers, learningRate: o.learningRate, fineTuneLearningRate: o.learningRate, wireDtype: o.wireDtype ?? "fp32",
        headUnits: 0, dropout: 0, numClasses: o.numClasses, bucketBytes: 0, engine: "", threads: 0,
        extra: { role: "fine_tune", attempt, epochs: String(o.epochs), checksum_every: String(checksumEvery), checkpoint_every: String(checkpointEvery), timeout_ms: String(stepTimeoutMs), fingerprint: fp },
      };
      await state.put(TRAINING_KEYS.spec, encode("JobSpec", spec));
      log.info("training spec published", { attempt, from_step: start.cursor.step, steps: totalSteps, workers: o.workers, checkpoint_every: checkpointEvery, checksum_every: checksumEvery });
      const r = await drive(o, { state, registry, os, attempt, sender, start, totalSteps });
      final = r.final;
      history = r.history.length ? r.history : history;
      allreduce = r.allreduce;
      await state.delete(TRAINING_KEYS.spec).catch(() => undefined);
    }
    await restoreState(model, optimizer, { ...final, optimizer: [] });
    if (o.out) log.info("final checkpoint written", { file: await writeStateFile(o.out, "final", final) });
    const val = evaluate(model, data.val, o.numClasses);
    const test = evaluate(model, data.test, o.numClasses);
    if (history.length && history.at(-1)!.val_accuracy === undefined) Object.assign(history.at(-1)!, { val_loss: val.loss, val_accuracy: val.accuracy });
    log.info("data-parallel fine-tuning done", { steps: final.cursor.step, val_accuracy: Number(val.accuracy.toFixed(4)), allreduce_seconds_per_worker: Number(allreduce.seconds.toFixed(3)), allreduce_bytes_per_worker: allreduce.bytes });
    return {
      model, history,
      test: { loss: test.loss, accuracy: test.accuracy, samples: data.test.y.length, confusion: confusionMatrix(data.test.y, test.predictions, o.numClasses) },
      val_loss_before: valBefore.loss, val_accuracy: val.accuracy, seconds: (performance.now() - t0) / 1000,
    };
  } finally {
    optimizer.dispose();
  }
}

interface DriveContext {
  state: KV;
  registry: KV;
  os: ObjectStore;
  attempt: string;
  sender: string;
  start: TrainingState;
  totalSteps: number;
}

/** Membership and supervision until member 0 reports done. */
async function drive(o: DataParallelOptions, c: DriveContext): Promise<{ final: TrainingState; history: EpochStats[]; allreduce: { seconds: number; bytes: number; workers: number } }> {
  const { log, metrics } = o;
  const reports = new Map<string, TrainingReport>();
  const pending: TrainingReport[] = [];
  const stragglers = new StragglerMonitor({ log, ...(metrics ? { metrics } : {}) });
  let wake: (() => void) | undefined;
  const watch = await c.state.watch({ key: TRAINING_KEYS.reports });
  let boundaryWatch: Awaited<ReturnType<KV["watch"]>> | undefined;
  void (async () => {
    for await (const e of watch) {
      if (e.operation !== "PUT") continue;
      let r: TrainingReport;
      try {
        r = decodeReport(o.job, e.value);
      } catch (err) {
        const reason = err instanceof DecodeError ? err.reason : "malformed";
        metrics?.droppedMessage(reason);
        log.warn("dropped a training report that does not decode", { key: e.key, reason, error: err as Error });
        continue;
      }
      if (r.attempt !== c.attempt) continue;
      stragglers.onReport(r);
      reports.set(r.worker, r);
      if (r.state !== "loading" && r.state !== "ready") pending.push(r);
      wake?.();
    }
  })();
  const tick = (ms: number): Promise<void> => new Promise((r) => {
    const t = setTimeout(r, ms);
    wake = () => {
      clearTimeout(t);
      r();
    };
  });
  const alive = async (w: string): Promise<boolean> => {
    const e = await c.registry.get(w).catch(() => null);
    if (!e || e.operation !== "PUT" || e.value.length === 0) return false;
    try {
      const hb = decode("Heartbeat", e.value, { job: o.job });
      return hb.state !== "stopped" && Date.now() - e.created.getTime() < WORKER_REGISTRY_TTL_MS;
    } catch {
      return false;
    }
  };
  try {
    // 1. Wait for replicas.
    const deadline = Date.now() + (o.readyTimeoutMs ?? 120_000);
    const ready = (): string[] => [...reports.values()].filter((r) => r.state === "ready").map((r) => r.worker).sort();
    while (ready().length < o.workers && Date.now() < deadline) {
      if (o.signal?.aborted) throw o.signal.reason;
      const failed = [...reports.values()].find((r) => r.state === "failed");
      if (failed) throw new Error(`worker ${failed.worker} could not start fine-tuning: ${failed.error}`);
      await tick(500);
    }
    let members = ready();
    if (members.length === 0) throw new WorkersUnavailableError(`no worker became ready for fine-tuning within ${o.readyTimeoutMs ?? 120_000} ms`);
    if (members.length < o.workers) log.warn("starting fine-tuning with fewer workers than asked", { ready: members.length, asked: o.workers });
    // Membership epochs: `epoch` is the newest plan's; `activeEpoch` the one the replicas average under
    // (a proposal only becomes it when member 0 applies it at a boundary).
    let epoch = 1;
    let activeEpoch = 1;
    let proposal: { epoch: number; joiners: string[] } | undefined;
    const publish = async (joining: string[] = []): Promise<void> => {
      const all = [...members, ...joining];
      await c.state.put(TRAINING_KEYS.members, encode("StepPlan", {
        header: makeHeader(o.job, c.sender, epoch, c.start.cursor.step), trainEpoch: c.start.cursor.epoch, batchIndex: c.start.cursor.batch,
        // Sample ranges of a full global batch (a short last batch is cut the same way by memberSlice).
        members: all.map((w, i) => { const r = sliceRanges(o.batchSize, all.length)[i]!; return { worker: w, sampleOffset: r.offset, sampleCount: r.length, sliceOffset: 0, sliceLength: 0 }; }),
        globalBatch: o.batchSize, learningRate: o.learningRate, totalLength: 0, dtype: o.wireDtype ?? "fp32", joining,
      }));
      if (joining.length === 0) {
        activeEpoch = epoch;
        metrics?.setWorkers({ alive: members.length });
        log.info("membership", { epoch, members });
      } else log.info("join proposed for the next training-epoch boundary", { epoch, members, joining });
    };
    await publish();
    const drop = async (lost: string[], why: string): Promise<void> => {
      const gone = lost.filter((w) => members.includes(w));
      const goneJoiners = lost.filter((w) => proposal?.joiners.includes(w));
      if (gone.length === 0 && goneJoiners.length === 0) return;
      members = members.filter((w) => !gone.includes(w));
      for (const w of gone) stragglers.forget(w);
      if (members.length === 0) throw new Error(`every fine-tuning worker was lost (last: ${gone.join(", ")})`);
      // A pending proposal is withdrawn; its joiners that are still alive are proposed again.
      proposal = undefined;
      epoch++;
      if (gone.length) log.warn("worker lost: new membership", { lost: gone, why, epoch, members });
      else log.warn("joiner lost before its boundary: proposal withdrawn", { lost: goneJoiners, why, epoch });
      await publish();
    };
    // Member 0's boundary decisions: a proposal becomes the membership when one applies it.
    const decisions: { step: number; epoch: number }[] = [];
    boundaryWatch = await c.state.watch({ key: TRAINING_KEYS.boundary });
    void (async () => {
      for await (const e of boundaryWatch) {
        if (e.operation !== "PUT" || e.value.length === 0) continue;
        try {
          const d = decode("Control", e.value, { job: o.job, self: "coordinator", peer: "worker" });
          if (d.kind !== "epoch_boundary" || d.reason !== c.attempt) continue;
          decisions.push({ step: d.header.step, epoch: d.header.epoch });
          wake?.();
        } catch {
          metrics?.droppedMessage("decode_error");
        }
      }
    })();
    // 2. Supervise.
    let lastCheck = 0;
    let epochsSeen = 0;
    for (;;) {
      if (o.signal?.aborted) throw o.signal.reason;
      for (const d of decisions.splice(0)) {
        if (proposal && d.epoch === proposal.epoch) {
          members = [...members, ...proposal.joiners];
          activeEpoch = proposal.epoch;
          log.info("workers joined at a training-epoch boundary", { joined: proposal.joiners, step: d.step, epoch: activeEpoch, members });
          metrics?.setWorkers({ alive: members.length });
          proposal = undefined;
        }
      }
      for (const r of pending.splice(0)) {
        if (r.state === "failed") throw new Error(`fine-tuning failed on worker ${r.worker}: ${r.error}`);
        if (r.state === "checkpoint") {
          log.info("checkpoint saved", { step: r.step, cursor: r.cursor, by: r.worker });
          o.onBatchProgress?.(r.step ?? 0, c.totalSteps, r.cursor?.epoch ?? 0);
          if (o.out) {
            // Best effort, bounded: member 0 may overwrite `latest` while we read it, and a read whose
            // chunks were purged never ends (it stalled the whole supervision loop).
            const b = await Promise.race([getBytes(c.os, CHECKPOINT_OBJECTS.latest), new Promise<null>((r) => setTimeout(() => r(null), 5000).unref())]).catch(() => null);
            if (b) await writeStateFile(o.out, "latest", decodeState(b)).catch((err: unknown) => log.warn("checkpoint copy to --out failed", { error: err as Error }));
          }
        }
        if (r.state === "peers_lost" && r.epoch === activeEpoch) {
          // Trust a survivor's report only for peers whose heartbeat is gone or stale.
          const lost: string[] = [];
          for (const w of r.lost ?? []) if (!(await alive(w))) lost.push(w);
          await drop(lost.length ? lost : r.lost ?? [], "the survivors' step timed out");
        }
        if (r.state === "done" && r.worker === members[0]) {
          const b = await getBytes(c.os, CHECKPOINT_OBJECTS.final(c.attempt));
          if (!b) throw new Error(`member 0 (${r.worker}) reported done but ${CHECKPOINT_OBJECTS.final(c.attempt)} is not in the store`);
          const done = [...reports.values()].filter((x) => x.state === "done");
          const allreduce = {
            seconds: done.reduce((a, x) => a + (x.allreduce_seconds ?? 0), 0) / Math.max(1, done.length),
            bytes: done.reduce((a, x) => a + (x.allreduce_bytes ?? 0), 0) / Math.max(1, done.length),
            workers: members.length,
          };
          return { final: decodeState(b), history: r.history ?? [], allreduce };
        }
        if (r.state === "training" && r.history?.length && r.worker === members[0] && r.history.length > epochsSeen) {
          epochsSeen = r.history.length;
          // Progress between checkpoints (ctrain_progress_ratio, ctrain_epoch/step of fine_tune): member 0's step at the epoch's end.
          if (r.step !== undefined) o.onBatchProgress?.(r.step, c.totalSteps, epochsSeen - 1);
          await o.onEpochEnd?.(r.history.at(-1)!);
        }
      }
      // Heartbeat TTL: a member whose registry entry expired (or says stopped) is gone.
      if (Date.now() - lastCheck > 2000) {
        lastCheck = Date.now();
        const gone: string[] = [];
        for (const w of members) if (!(await alive(w))) gone.push(w);
        for (const w of proposal?.joiners ?? []) if (!(await alive(w))) gone.push(w);
        if (gone.length) await drop(gone, "no heartbeat");
      }
      // Elastic scale-up: replicas ready (or left out earlier and waiting) that are not members are proposed
      // to come in at the next training-epoch boundary, from member 0's state there.
      if (!proposal) {
        const joiners: string[] = [];
        for (const r of reports.values()) if ((r.state === "ready" || r.state === "waiting") && !members.includes(r.worker) && (await alive(r.worker))) joiners.push(r.worker);
        if (joiners.length) {
          joiners.sort();
          epoch++;
          proposal = { epoch, joiners };
          await publish(joiners);
        }
      }
      await tick(1000);
    }
  } finally {
    watch.stop();
    boundaryWatch?.stop();
  }
}

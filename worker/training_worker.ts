/**
 * The training role of a ctrain worker: one replica of data-parallel fine-tuning (the design is in
 * coordinator/data_parallel.ts). NatsWorker starts it when the coordinator puts a training spec
 * (JobSpec, `extra.role = "fine_tune"`) under TRAINING_KEYS.spec in the job's state KV.
 *
 * A replica: fetches the head model, the start state and the training rows (cached activations at the
 * cut) from the job's checkpoints object store; builds top + pooling + head exactly as the one-process
 * path does (fine_tuning.ts fineTuneModel); opens its GradientAverager as the only member (so its
 * gradient subject exists before any peer can send to it) and reports `ready`; then waits for the
 * coordinator's membership (a StepPlan under TRAINING_KEYS.members) and runs train_loop's fit() with
 * `sliceOf` = its contiguous part of every global batch (by member index) and the averaging hook.
 *
 * Elastic: the optimizer update runs only after averaging returned, so when averaging fails
 * (StepPeersLostError, or the coordinator moved the membership on) the weights and the optimizer are
 * still those of the last completed step. The hook reports the lost peers, waits for the next
 * membership epoch, recomputes its part of the SAME global batch under the new membership and
 * averages again; fit() never sees the failure. A replica left out of the new membership stops.
 *
 * Consistency: every `checksumEvery` steps each replica publishes a WeightsChecksum; every replica
 * compares the members' checksums of that step and stops the job with ReplicaMismatchError on any
 * difference. Member 0 writes a checkpoint every `checkpointEvery` steps (before the step runs, so
 * its cursor is exact) and the final state.
 */
import type { KV, NatsConnection, ObjectStore, Subscription } from "nats";
import * as tf from "@tensorflow/tfjs";
import { activeBackend } from "../core/backend.js";
import { MembershipChanged, WorkerLostError } from "../core/errors.js";
import type { Logger } from "../core/log.js";
import type { CtrainMetrics } from "../core/metrics.js";
import { buildSplit } from "../core/model_split.js";
import { loadPretrained } from "../core/model_zoo.js";
import { computeGradients, type EpochStats, fit, takeRows, type ArrayData } from "../core/train_loop.js";
import { registerWasmTrainingKernels } from "../core/wasm_kernels.js";
import { decode, encode, makeHeader, type JobSpec, type StepPlan } from "../proto/codec.js";
import { jobNames } from "../proto/subjects.js";
import { CHECKPOINT_OBJECTS, captureState, decodeState, encodeState, getBytes, putBytes, restoreState, type DataCursor } from "../coordinator/checkpoints.js";
import { decodeDataObject, decodeHeadObject, memberSlice, TRAINING_KEYS, type TrainingReport } from "../coordinator/data_parallel.js";
import { fineTuneModel } from "../coordinator/fine_tuning.js";
import { GradientAverager, gradientHookFor, StepPeersLostError } from "./gradient_averaging.js";
import { weightsChecksum } from "./weights_checksum.js";

/** Replicas disagree on their weights after the same step: a missed or double-applied update. */
export class ReplicaMismatchError extends Error {
  override name = "ReplicaMismatchError";
  constructor(readonly step: number, detail: string) {
    super(`step ${step}: replicas' weights differ (${detail}); the job stops. Rerun from the last checkpoint; if it repeats, check that every worker runs the same backend and version`);
  }
}

/** This replica was left out of the membership (the others went on without it). */
export class EvictedError extends Error {
  override name = "EvictedError";
}

export interface TrainingWorkerOptions {
  nc: NatsConnection;
  job: string;
  self: string;
  spec: JobSpec;
  /** The job's state KV (spec, membership, reports). */
  state: KV;
  log: Logger;
  metrics?: CtrainMetrics;
  /** Aborted when the coordinator replaces the spec (a new attempt) or the worker drains. */
  signal?: AbortSignal;
}

/** Runs one training attempt to its end. Reports every outcome in the state KV. */
export async function runTrainingWorker(o: TrainingWorkerOptions): Promise<void> {
  const { nc, job, self, spec, state, log, metrics } = o;
  const names = jobNames(job);
  const x = spec.extra;
  const attempt = x["attempt"]!;
  const epochs = Number(x["epochs"]);
  const checksumEvery = Number(x["checksum_every"] ?? 10);
  const checkpointEvery = Number(x["checkpoint_every"] ?? 0);
  const timeoutMs = Number(x["timeout_ms"] ?? 30_000);
  const report = async (r: Omit<TrainingReport, "attempt" | "worker" | "at">): Promise<void> => {
    const full: TrainingReport = { ...r, attempt, worker: self, at: Date.now() };
    await state.put(TRAINING_KEYS.report(self), new TextEncoder().encode(JSON.stringify(full))).catch((err: unknown) => log.warn("training report not stored", { error: err as Error }));
  };
  const js = nc.jetstream();
  const os: ObjectStore = await js.views.os(names.checkpointsBucket);
  const fetchObject = async (name: string): Promise<Uint8Array> => {
    const b = await getBytes(os, name);
    if (!b) throw new Error(`object ${name} is missing from ${names.checkpointsBucket} (was the coordinator's store lost?)`);
    return b;
  };

  let averager: GradientAverager | undefined;
  let checksumSub: Subscription | undefined;
  const disposables: tf.LayersModel[] = [];
  let optimizer: tf.Optimizer | undefined;
  try {
    await report({ state: "loading" });
    if (activeBackend()?.tfBackend === "wasm") registerWasmTrainingKernels();
    const source = await loadPretrained(spec.model);
    const split = await buildSplit(source, { inputSize: spec.inputSize, featureLayer: spec.featureLayer, unfreeze: spec.fineTuneLayers });
    disposables.push(split.bottom, split.top);
    const head = await decodeHeadObject(await fetchObject(CHECKPOINT_OBJECTS.head(attempt)));
    disposables.push(head);
    const model = fineTuneModel(split, head, spec.pooling, false);
    optimizer = tf.train.adam(spec.fineTuneLearningRate);
    const start = decodeState(await fetchObject(CHECKPOINT_OBJECTS.start(attempt)));
    await restoreState(model, optimizer, start);
    const train = decodeDataObject(await fetchObject(CHECKPOINT_OBJECTS.data(attempt, "train")));
    const val = decodeDataObject(await fetchObject(CHECKPOINT_OBJECTS.data(attempt, "val")));

    // Membership: the latest StepPlan under TRAINING_KEYS.members, watched; waiters resolve on a newer epoch.
    let membership: StepPlan | undefined;
    const waiters: { minEpoch: number; resolve: (p: StepPlan) => void }[] = [];
    const watch = await state.watch({ key: TRAINING_KEYS.members });
    void (async () => {
      for await (const e of watch) {
        if (e.operation !== "PUT" || e.value.length === 0) continue;
        let plan: StepPlan;
        try {
          plan = decode("StepPlan", e.value, { job, self: "worker", peer: "coordinator" });
        } catch (err) {
          metrics?.droppedMessage("decode_error");
          log.warn("dropped a membership plan that does not decode", { error: err as Error });
          continue;
        }
        if (plan.header.sender !== `coordinator-${attempt}`) continue; // another attempt's plan
        if (membership && plan.header.epoch <= membership.header.epoch) continue;
        membership = plan;
        // A step in flight under an older membership cannot finish: end it now rather than at the timeout.
        if (averager && plan.header.epoch > averager.epoch) averager.abort(new MembershipChanged(plan.header.epoch, `membership epoch ${plan.header.epoch}: redo the step`));
        for (const w of waiters.splice(0)) {
          if (plan.header.epoch >= w.minEpoch) w.resolve(plan);
          else waiters.push(w);
        }
      }
    })();
    const nextMembership = (minEpoch: number): Promise<StepPlan> => {
      if (membership && membership.header.epoch >= minEpoch) return Promise.resolve(membership);
      return new Promise((resolve, reject) => {
        waiters.push({ minEpoch, resolve });
        o.signal?.addEventListener("abort", () => reject(o.signal!.reason), { once: true });
      });
    };
    const membersOf = (p: StepPlan): string[] => p.members.map((m) => m.worker);

    averager = await GradientAverager.open({ nc, job, self, members: [self], epoch: 0, wireDtype: spec.wireDtype === "fp16" ? "fp16" : "fp32", bucketBytes: spec.bucketBytes || undefined, metrics, timeoutMs });
    await report({ state: "ready", step: start.cursor.step });
    log.info("training replica ready", { attempt, parameters: model.countParams(), train_rows: train.y.length, cursor: start.cursor });
    let plan = await nextMembership(1);
    if (!membersOf(plan).includes(self)) throw new EvictedError(`not a member of membership epoch ${plan.header.epoch}`);
    await averager.setMembership(plan.header.epoch, membersOf(plan));
    const av = averager;

    // Replica checksums: step -> worker -> crc/sum; compared once every current member's is in.
    const stop = new AbortController();
    const onOuterAbort = (): void => stop.abort(o.signal!.reason);
    o.signal?.addEventListener("abort", onOuterAbort, { once: true });
    const sums = new Map<number, Map<string, { checksum: number; sum: number }>>();
    const compare = (step: number): void => {
      const got = sums.get(step);
      if (!got || !av.members.every((m) => got.has(m))) return;
      sums.delete(step);
      const mine = got.get(self)!;
      const bad = [...got].filter(([, d]) => d.checksum !== mine.checksum);
      if (bad.length > 0) stop.abort(new ReplicaMismatchError(step, `${self} crc ${mine.checksum} sum ${mine.sum}; ${bad.map(([w, d]) => `${w} crc ${d.checksum} sum ${d.sum}`).join("; ")}`));
    };
    checksumSub = nc.subscribe(names.weights, {
      callback: (err, msg) => {
        if (err) return;
        try {
          const w = decode("WeightsChecksum", msg.data, { job, self: "worker", peer: "worker" });
          if (!av.members.includes(w.worker)) return;
          const m = sums.get(w.header.step) ?? new Map();
          m.set(w.worker, { checksum: w.checksum, sum: w.sum });
          sums.set(w.header.step, m);
          compare(w.header.step);
        } catch {
          metrics?.droppedMessage("decode_error");
        }
      },
    });
    await nc.flush();

    const cursor: DataCursor = { ...start.cursor };
    let current: { indices: Int32Array; batch: number } = { indices: new Int32Array(0), batch: 0 };
    const partOf = (indices: Int32Array): Int32Array => memberSlice(indices, av.members, self);
    const history: EpochStats[] = [];
    const validation = av.members[0] === self ? val : undefined;
    let stepTimer: (() => number) | undefined;
    const allreduce = { seconds: 0, bytes: 0 };

    const hook = async (grads: tf.NamedTensorMap, samples: number): Promise<tf.NamedTensorMap> => {
      const step = cursor.step;
      if (checkpointEvery > 0 && step > start.cursor.step && step % checkpointEvery === 0 && av.members[0] === self) {
        const s = await captureState(model, optimizer!, cursor, { attempt, members: av.members, history, fingerprint: x["fingerprint"] });
        await putBytes(os, CHECKPOINT_OBJECTS.latest, encodeState(s));
        await report({ state: "checkpoint", step, cursor: { ...cursor } });
        log.info("checkpoint saved", { step, epoch: cursor.epoch, batch: cursor.batch });
      }
      let g = grads;
      let m = samples;
      let own = false;
      for (;;) {
        try {
          const out = await gradientHookFor(av, model, {
            firstStep: step,
            onAverage: (st) => {
              allreduce.seconds += st.seconds;
              allreduce.bytes += st.bytesSent + st.bytesReceived;
            },
          })(g, m);
          if (own) tf.dispose(g);
          return out;
        } catch (err) {
          if (!(err instanceof WorkerLostError || err instanceof MembershipChanged)) throw err;
          const lost = err instanceof StepPeersLostError ? (err.missingGradients.length ? err.missingGradients : err.missing) : [];
          log.warn("step failed: waiting for a new membership", { step, error: err.message, lost });
          await report({ state: "peers_lost", step, lost: [...lost], epoch: av.epoch });
          plan = await nextMembership(av.epoch + 1);
          if (!membersOf(plan).includes(self)) throw new EvictedError(`left out of membership epoch ${plan.header.epoch}`);
          await av.setMembership(plan.header.epoch, membersOf(plan));
          log.info("redoing the step with the new membership", { step, epoch: plan.header.epoch, members: av.members });
          // My part of the same global batch under the new membership; weights and optimizer are untouched.
          if (own) tf.dispose(g);
          const part = partOf(current.indices);
          const r = computeGradients(model, takeRows(train, part), spec.numClasses);
          g = r.grads;
          m = part.length;
          own = true;
        }
      }
    };

    await report({ state: "training", step: cursor.step });
    log.info("training", { attempt, members: av.members, membership_epoch: av.epoch, from: cursor });
    const fitStart = performance.now();
    await fit(model, train, {
      epochs, batchSize: spec.batchSize, seed: spec.seed, numClasses: spec.numClasses, optimizer, validation,
      initialEpoch: start.cursor.epoch, initialBatch: start.cursor.batch, signal: stop.signal,
      sliceOf: (indices, batch) => {
        stepTimer = metrics?.startStep("fine_tune");
        current = { indices, batch };
        return partOf(indices);
      },
      gradientHook: hook,
      onBatchEnd: ({ epoch, batch, batches, samples }) => {
        stepTimer?.();
        metrics?.countImages("fine_tune", samples);
        cursor.step++;
        if (batch + 1 >= batches) Object.assign(cursor, { epoch: epoch + 1, batch: 0 });
        else Object.assign(cursor, { epoch, batch: batch + 1 });
        metrics?.setEpoch("fine_tune", epoch + 1, cursor.step);
        if (checksumEvery > 0 && cursor.step % checksumEvery === 0) {
          const d = weightsChecksum(model);
          nc.publish(names.weights, encode("WeightsChecksum", { header: makeHeader(job, self, av.epoch, cursor.step), worker: self, checksum: d.checksum, parameterCount: d.parameterCount, sum: d.sum }));
        }
      },
      onEpochEnd: async (s) => {
        history.push(s);
        await report({ state: "training", step: cursor.step, cursor: { ...cursor }, history });
      },
    });
    // Let the last checksums arrive and be compared before declaring success.
    await nc.flush();
    await new Promise((r) => setTimeout(r, 200));
    if (stop.signal.aborted) throw stop.signal.reason;
    if (av.members[0] === self) {
      const s = await captureState(model, optimizer, cursor, { attempt, members: av.members, history, fingerprint: x["fingerprint"] });
      await putBytes(os, CHECKPOINT_OBJECTS.final(attempt), encodeState(s));
      await putBytes(os, CHECKPOINT_OBJECTS.latest, encodeState(s));
    }
    await report({ state: "done", step: cursor.step, cursor: { ...cursor }, history, allreduce_seconds: allreduce.seconds, allreduce_bytes: allreduce.bytes, members: [...av.members] });
    const stepsRun = cursor.step - start.cursor.step;
    const trainSeconds = (performance.now() - fitStart) / 1000;
    log.info("training done", {
      attempt, steps: cursor.step, steps_run: stepsRun, train_seconds: Number(trainSeconds.toFixed(3)), allreduce_seconds: Number(allreduce.seconds.toFixed(3)),
      step_seconds: stepsRun ? Number((trainSeconds / stepsRun).toFixed(4)) : 0, allreduce_bytes_per_step: stepsRun ? Math.round(allreduce.bytes / stepsRun) : 0,
    });
  } catch (err) {
    const e = err instanceof Error ? err : new Error(String(err));
    if (o.signal?.aborted) {
      log.info("training attempt superseded or stopped", { attempt, reason: String(o.signal.reason) });
    } else if (e instanceof EvictedError) {
      log.warn("left out of the membership: this replica stops", { attempt, error: e.message });
      await report({ state: "evicted", error: e.message });
    } else {
      log.error("training failed", { attempt, error: e });
      await report({ state: "failed", error: `${e.name}: ${e.message}` });
    }
  } finally {
    checksumSub?.unsubscribe();
    await averager?.close();
    optimizer?.dispose();
    for (const m of disposables) m.dispose();
  }
}

/**
 * The training role of a ctrain worker: one replica of data-parallel fine-tuning (the design is in
 * coordinator/data_parallel.ts). NatsWorker starts it when the coordinator puts a training spec
 * (JobSpec, `extra.role = "fine_tune"`) under TRAINING_KEYS.spec in the job's state KV.
 *
 * A replica: fetches the head model, the start state and the training rows (cached activations at the
 * cut) from the job's checkpoints object store; builds top + pooling + head exactly as the one-process
 * path does (core/models/model_split.ts fineTuneModel); opens its GradientAverager as the only member (so its
 * gradient subject exists before any peer can send to it) and reports `ready`; then waits for the
 * coordinator's membership (a StepPlan under TRAINING_KEYS.members) and runs train_loop's fit() with
 * `sliceOf` = its contiguous part of every global batch (by member index) and the averaging hook.
 *
 * Elastic: the optimizer update runs only after averaging returned, so when averaging fails
 * (StepPeersLostError, or the coordinator moved the membership on) the weights and the optimizer are
 * still those of the last completed step. The hook reports the lost peers, waits for the next
 * membership epoch, recomputes its part of the SAME global batch under the new membership and
 * averages again; fit() never sees the failure. Membership comes from one ordered watch over the
 * coordinator's plans and member 0's training-epoch-boundary decisions (worker/membership_view.ts):
 * a replica that is not a member (started late, or left out of a membership) reports `ready` /
 * `waiting` and is let in at a boundary from member 0's state there (the join protocol is described
 * in coordinator/data_parallel.ts).
 *
 * Consistency: every `checksumEvery` steps each replica publishes a WeightsChecksum; every replica
 * compares the members' checksums of that step and stops the job with ReplicaMismatchError on any
 * difference. Member 0 writes a checkpoint every `checkpointEvery` steps (before the step runs, so
 * its cursor is exact) and the final state.
 */
import type { KV, KvEntry, NatsConnection, ObjectStore, Subscription } from "nats";
import * as tf from "@tensorflow/tfjs";
import { activeBackend } from "../core/models/backend.js";
import { MembershipChanged, WorkerLostError } from "../core/runtime/errors.js";
import type { Logger } from "../core/runtime/log.js";
import type { CtrainMetrics } from "../core/runtime/metrics.js";
import { buildSplit, fineTuneModel } from "../core/models/model_split.js";
import { loadPretrained } from "../core/models/model_zoo.js";
import { computeGradients, type EpochStats, fit, takeRows } from "../core/training/train_loop.js";
import { registerWasmTrainingKernels } from "../core/models/wasm_kernels.js";
import { decode, DecodeError, encode, makeHeader, type JobSpec } from "../proto/codec.js";
import { jobNames } from "../proto/subjects.js";
import { CHECKPOINT_OBJECTS, captureState, decodeState, encodeState, getBytes, putBytes, restoreState, type DataCursor } from "../core/training/checkpoints.js";
import { decodeDataObject, decodeHeadObject, encodeReport, memberSlice, TRAINING_KEYS, type TrainingReport } from "../proto/training_wire.js";
import { GradientAverager, gradientHookFor, StepPeersLostError } from "./gradient_averaging.js";
import { MembershipView } from "./membership_view.js";
import { weightsChecksum } from "./weights_checksum.js";
import { StepTimer } from "./step_timing.js";
import { ReplicaMismatchError, EvictedError } from "../core/runtime/errors.js";
/** Re-exported from core/runtime/errors.ts, where every error that decides recovery lives. */
export { ReplicaMismatchError, EvictedError };

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
    await state.put(TRAINING_KEYS.report(self), encodeReport(job, full)).catch((err: unknown) => log.warn("training report not stored", { error: err as Error }));
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
  let watch: { stop(): void; [Symbol.asyncIterator](): AsyncIterator<KvEntry> } | undefined;
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
    const attemptStart = decodeState(await fetchObject(CHECKPOINT_OBJECTS.start(attempt)));
    await restoreState(model, optimizer, attemptStart);
    const train = decodeDataObject(await fetchObject(CHECKPOINT_OBJECTS.data(attempt, "train")));
    const val = decodeDataObject(await fetchObject(CHECKPOINT_OBJECTS.data(attempt, "val")));

    // Membership: one ordered watch over the coordinator's plans and member 0's boundary decisions.
    const view = new MembershipView();
    const notify: (() => void)[] = [];
    watch = await state.watch({ key: TRAINING_KEYS.plan });
    void (async () => {
      for await (const e of watch) {
        if (e.operation !== "PUT" || e.value.length === 0) continue;
        try {
          if (e.key === TRAINING_KEYS.members) {
            const plan = decode("StepPlan", e.value, { job, self: "worker", peer: "coordinator" });
            if (plan.header.sender !== `coordinator-${attempt}`) continue; // another attempt's plan
            const effect = view.applyPlan(plan.header.epoch, plan.members.map((m) => m.worker), plan.joining);
            // A step in flight under an older membership cannot finish: end it now rather than at the timeout.
            if (effect === "immediate" && averager && plan.header.epoch > averager.epoch) averager.abort(new MembershipChanged(plan.header.epoch, `membership epoch ${plan.header.epoch}: redo the step`));
            if (effect === "proposal") log.info("join proposed", { membership_epoch: plan.header.epoch, joining: plan.joining });
          } else if (e.key === TRAINING_KEYS.boundary) {
            const c = decode("Control", e.value, { job, self: "worker", peer: "worker" });
            if (c.kind !== "epoch_boundary" || c.reason !== attempt) continue;
            view.applyDecision(c.header.step, c.header.epoch);
          }
        } catch (err) {
          metrics?.droppedMessage(err instanceof DecodeError ? err.reason : "malformed");
          log.warn("dropped a membership message that does not decode", { key: e.key, error: err as Error });
          continue;
        } finally {
          for (const f of notify.splice(0)) f();
        }
      }
    })();
    /** Resolves true once `pred()` holds, false after `timeoutMs`; rejects when the attempt is stopped. */
    const until = async (pred: () => boolean, timeoutMs = Infinity): Promise<boolean> => {
      const end = Date.now() + timeoutMs;
      while (!pred()) {
        if (o.signal?.aborted) throw o.signal.reason;
        if (stop.signal.aborted) throw stop.signal.reason;
        const left = end - Date.now();
        if (left <= 0) return false;
        await new Promise<void>((r) => {
          const t = setTimeout(r, Math.min(left, 1000));
          notify.push(() => {
            clearTimeout(t);
            r();
          });
        });
      }
      return true;
    };

    averager = await GradientAverager.open({ nc, job, self, members: [self], epoch: 0, wireDtype: spec.wireDtype === "fp16" ? "fp16" : "fp32", bucketBytes: spec.bucketBytes || undefined, metrics, timeoutMs });
    const av = averager;
    await report({ state: "ready", step: attemptStart.cursor.step });
    log.info("training replica ready", { attempt, parameters: model.countParams(), train_rows: train.y.length, cursor: attemptStart.cursor });

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
      const bad = [...got].filter(([w, d]) => av.members.includes(w) && d.checksum !== mine.checksum);
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
    const publishChecksum = (step: number): void => {
      const d = weightsChecksum(model);
      nc.publish(names.weights, encode("WeightsChecksum", { header: makeHeader(job, self, av.epoch, step), worker: self, checksum: d.checksum, parameterCount: d.parameterCount, sum: d.sum }));
    };

    let cursor: DataCursor = { ...attemptStart.cursor };
    let history: EpochStats[] = [];
    let stepTimer: (() => number) | undefined;
    const allreduce = { seconds: 0, bytes: 0 };
    const timing = new StepTimer(); // per-step compute/wait split for the coordinator's straggler detection
    const decided = new Set<number>();
    /** Takes on the membership in force when it is newer than the averager's; true when it changed. */
    const adopt = async (): Promise<boolean> => {
      const cur = view.current;
      if (!cur || cur.epoch <= av.epoch) return false;
      if (!cur.members.includes(self)) throw new EvictedError(`left out of membership epoch ${cur.epoch}`);
      await av.setMembership(cur.epoch, cur.members);
      return true;
    };

    const fitStart = performance.now();
    let stintFrom = attemptStart.cursor.step;
    let waitingSince = -1; // view.seq after which a join must come (-1: the first membership of the attempt)
    for (;;) {
      // 1. Become a member: in the attempt's first membership, else let in at a training-epoch boundary.
      await until(() => (waitingSince < 0 && view.current?.origin.kind === "plan" && view.current.members.includes(self)) || view.joinFor(self, Math.max(0, waitingSince)) !== undefined);
      const sw = waitingSince < 0 && view.current?.origin.kind === "plan" && view.current.members.includes(self) ? undefined : view.joinFor(self, Math.max(0, waitingSince));
      if (sw) {
        const s = decodeState(await fetchObject(CHECKPOINT_OBJECTS.join(attempt, sw.epoch)));
        if (s.cursor.step !== sw.step) throw new Error(`join state of membership epoch ${sw.epoch} is at step ${s.cursor.step}, the boundary was step ${sw.step}`);
        await restoreState(model, optimizer, s);
        cursor = { ...s.cursor };
        history = [...((s.meta["history"] as EpochStats[] | undefined) ?? [])];
        log.info("joining the training at a training-epoch boundary", { attempt, step: sw.step, epoch: s.cursor.epoch, membership_epoch: sw.epoch, members: sw.members });
      }
      try {
        await adopt();
        if (!av.members.includes(self)) throw new EvictedError(`not a member of membership epoch ${view.current?.epoch}`);
        if (sw) publishChecksum(cursor.step); // the members publish theirs for this step at the boundary: a joiner that restored anything else stops the job
        stintFrom = cursor.step;
        await runStint();
        break;
      } catch (err) {
        if (!(err instanceof EvictedError)) throw err;
        log.warn("left out of the membership: waiting to be let in again", { attempt, step: cursor.step, error: err.message });
        await report({ state: "waiting", step: cursor.step, error: err.message });
        waitingSince = view.seq;
      }
    }

    /** Runs fit() from `cursor` until the attempt's last step (or an error). */
    async function runStint(): Promise<void> {
      let current: { indices: Int32Array; batch: number } = { indices: new Int32Array(0), batch: 0 };
      const partOf = (indices: Int32Array): Int32Array => memberSlice(indices, av.members, self);
      const hook = async (grads: tf.NamedTensorMap, samples: number): Promise<tf.NamedTensorMap> => {
        const step = cursor.step;
        let g = grads;
        let m = samples;
        let own = false;
        const recompute = (): void => {
          // My part of the same global batch under the new membership; weights and optimizer are untouched.
          if (own) tf.dispose(g);
          const part = partOf(current.indices);
          g = computeGradients(model, takeRows(train, part), spec.numClasses).grads;
          m = part.length;
          own = true;
        };
        // Training-epoch boundary: member 0 says whether a proposed join applies from this step; everyone waits for it.
        if (current.batch === 0 && step > stintFrom) {
          let changed = false;
          while (!view.boundaries.has(step)) {
            changed = (await adopt()) || changed;
            if (av.members[0] === self && !decided.has(step)) {
              decided.add(step);
              const p = view.pending;
              let epoch = av.epoch;
              if (p && view.current?.epoch === av.epoch) {
                const s = await captureState(model, optimizer!, cursor, { attempt, members: p.members, history, fingerprint: x["fingerprint"] });
                await putBytes(os, CHECKPOINT_OBJECTS.join(attempt, p.epoch), encodeState(s));
                epoch = p.epoch;
              }
              await state.put(TRAINING_KEYS.boundary, encode("Control", { header: makeHeader(job, self, epoch, step), kind: "epoch_boundary", reason: attempt, phase: "fine_tune" }));
            }
            const seen = await until(() => view.boundaries.has(step) || (view.current !== undefined && view.current.origin.kind === "plan" && view.current.epoch > av.epoch), timeoutMs);
            if (!seen) {
              // Member 0 did not decide in time: report it, and go on under the membership the coordinator plans next.
              const m0 = av.members[0]!;
              log.warn("no boundary decision from member 0", { step, member0: m0, timeout_ms: timeoutMs });
              await report({ state: "peers_lost", step, lost: [m0], epoch: av.epoch });
              await until(() => view.current !== undefined && view.current.epoch > av.epoch);
            }
          }
          changed = (await adopt()) || changed;
          if (changed) {
            log.info("membership changed at the training-epoch boundary", { step, membership_epoch: av.epoch, members: av.members });
            publishChecksum(step);
            recompute();
          }
        }
        if (checkpointEvery > 0 && step > attemptStart.cursor.step && step % checkpointEvery === 0 && av.members[0] === self) {
          const s = await captureState(model, optimizer!, cursor, { attempt, members: av.members, history, fingerprint: x["fingerprint"] });
          await putBytes(os, CHECKPOINT_OBJECTS.latest, encodeState(s));
          await report({ state: "checkpoint", step, cursor: { ...cursor } });
          log.info("checkpoint saved", { step, epoch: cursor.epoch, batch: cursor.batch });
        }
        const average = gradientHookFor(av, model, {
          firstStep: step,
          onAverage: (st) => {
            allreduce.seconds += st.seconds;
            allreduce.bytes += st.bytesSent + st.bytesReceived;
          },
        });
        timing.averaging();
        for (;;) {
          try {
            // A membership that changed while the gradients were computed: redo them under it first.
            if (await adopt()) recompute();
            const caughtUp = av.replaysApplied;
            const out = await average(g, m);
            if (av.replaysApplied > caughtUp) log.info("caught up: applied the step as a member that had completed it did", { step, membership_epoch: av.epoch });
            if (own) tf.dispose(g);
            timing.averaged(step);
            const due = timing.takeDue();
            if (due) void report({ state: "training", step, step_timings: due });
            return out;
          } catch (err) {
            if (!(err instanceof WorkerLostError || err instanceof MembershipChanged)) {
              if (own) tf.dispose(g);
              throw err;
            }
            const lost = err instanceof StepPeersLostError ? (err.missingGradients.length ? err.missingGradients : err.missing) : [];
            log.warn("step failed: waiting for a new membership", { step, error: err.message, lost });
            await report({ state: "peers_lost", step, lost: [...lost], epoch: av.epoch });
            await until(() => view.current !== undefined && view.current.epoch > av.epoch);
            log.info("redoing the step with the new membership", { step, epoch: view.current!.epoch, members: view.current!.members });
          }
        }
      };

      await report({ state: "training", step: cursor.step });
      log.info("training", { attempt, members: av.members, membership_epoch: av.epoch, from: cursor });
      await fit(model, train, {
        epochs, batchSize: spec.batchSize, seed: spec.seed, numClasses: spec.numClasses, optimizer: optimizer!,
        // Every replica validates (identical weights give identical figures), so whichever is member 0 when an epoch
        // ends has them, also after the first member 0 was lost. No wall time: the others would wait for it anyway.
        validation: val,
        initialEpoch: cursor.epoch, initialBatch: cursor.batch, signal: stop.signal,
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
          if (checksumEvery > 0 && cursor.step % checksumEvery === 0) publishChecksum(cursor.step);
        },
        onEpochEnd: async (s) => {
          history.push(s);
          await report({ state: "training", step: cursor.step, cursor: { ...cursor }, history });
        },
      });
    }

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
    const stepsRun = cursor.step - stintFrom;
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
    watch?.stop();
    await averager?.close();
    optimizer?.dispose();
    for (const m of disposables) m.dispose();
  }
}

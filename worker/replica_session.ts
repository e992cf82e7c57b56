/**
 * One replica of one data-parallel training attempt, as an object with one method per part of its
 * life (the protocol is described in worker/training_worker.ts and coordinator/data_parallel.ts):
 * load -> watch membership -> open the averager -> become a member (first plan, or a join at a
 * boundary from member 0's state) -> run fit() with the step hook (boundary decision, checkpoint,
 * averaging with redo on a lost peer) -> finish (final state, `done`) -> close.
 *
 * What it trains and on what (head or top + head; cached activation rows or images through a frozen
 * stage) is worker/replica_data.ts. fit() runs over that BatchSource, whose `sliceOf` cuts this
 * replica's part of each global batch; an image source cuts the next batch while the current one
 * trains (prefetch), so the batch in flight is looked up by the data cursor, and a part cut under a
 * membership that changed since is cut again before it is averaged.
 *
 * The decisions that need no broker (cursor accounting, which steps checksum / checkpoint / decide,
 * whom a failed step names, the reports) are in worker/replica_steps.ts and the checksum comparison in
 * worker/replica_checksums.ts, both unit-tested without NATS.
 */
import type { KV, KvEntry, NatsConnection, ObjectStore, Subscription } from "nats";
import * as tf from "@tensorflow/tfjs";
import { activeBackend } from "../core/models/backend.js";
import { EvictedError, MembershipChanged, ReplicaFailedError, WorkerLostError } from "../core/runtime/errors.js";
import type { EngineProvider } from "../core/runtime/config.js";
import type { Logger } from "../core/runtime/log.js";
import type { CtrainMetrics } from "../core/runtime/metrics.js";
import { type BatchSource, computeGradients, type ControlsState, type EpochStats, fit, type TrainingControls } from "../core/training/train_loop.js";
import { registerWasmTrainingKernels } from "../core/models/wasm_kernels.js";
import { DecodeError } from "../proto/codec.js";
import { jobNames, type JobNames } from "../proto/subjects.js";
import { captureState, decodeState, encodeState, getBytes, putBytes, restoreState, type DataCursor, type TrainingState } from "../core/training/checkpoints.js";
import {
  attemptPhase, controlsOf, decodeBoundaryDecision, decodeMembershipPlan, decodeWeightsChecksum, encodeBoundaryDecision, encodeReport,
  encodeWeightsChecksum, memberSlice, TRAINING_KEYS, TRAINING_OBJECTS, type TrainingAttempt, type TrainingPhase,
} from "../proto/training_wire.js";
import { ExtractorCache } from "./extractor_cache.js";
import { loadReplicaData, type ReplicaData } from "./replica_data.js";
import { StepTimer } from "./step_timing.js";
import { GradientAverager, gradientHookFor } from "./gradient_averaging.js";
import { MembershipView, type JoinSwitch } from "./membership_view.js";
import { weightsChecksum } from "./weights_checksum.js";
import { ChecksumBook } from "./replica_checksums.js";
import { advanceCursor, buildReport, doneReport, endReport, isBoundaryStep, isCheckpointStep, isChecksumStep, lostPeersOf, trainingSummary, type ReportBody } from "./replica_steps.js";

/** The epochs a state's attempt had trained when it was captured (a copy). */
function historyOf(s: TrainingState): EpochStats[] {
  return [...((s.meta["history"] as EpochStats[] | undefined) ?? [])];
}

export interface TrainingWorkerOptions {
  nc: NatsConnection;
  job: string;
  self: string;
  /** The attempt to run (JobSpec.training of the spec under TRAINING_KEYS.spec). */
  attempt: TrainingAttempt;
  /** The job's state KV (spec, membership, reports). */
  state: KV;
  log: Logger;
  metrics?: CtrainMetrics;
  /** Aborted when the coordinator replaces the spec (a new attempt) or the worker drains. */
  signal?: AbortSignal;
  /** The worker's models and data sets (an image attempt opens its data set and frozen stage there). Default: a new cache. */
  cache?: ExtractorCache;
  /** onnxruntime threads of the frozen stage when the attempt leaves it to the worker. Default: this machine's cores. */
  threads?: number;
  /** onnxruntime execution provider of this machine. Default auto. */
  provider?: EngineProvider;
}

/** What load() builds: the trainable part and its data, its optimizer, the attempt's start state. */
interface Replica {
  model: tf.LayersModel;
  optimizer: tf.Optimizer;
  start: TrainingState;
  data: ReplicaData;
  /** The training rows, cut to this replica's part of each global batch (see {@link ReplicaSession.sliceOf}). */
  source: BatchSource;
}

/** A global batch whose part this replica took: its indices, and the membership epoch the part was cut under. */
interface SlicedBatch {
  indices: Int32Array;
  epoch: number;
  membershipEpoch: number;
}

/** A step's local gradients; owned (and disposed here) once recomputed under a new membership. */
class StepGradients {
  private own = false;
  constructor(public grads: tf.NamedTensorMap, public samples: number) {}
  replace(next: { grads: tf.NamedTensorMap; samples: number }): void {
    this.dispose();
    Object.assign(this, next);
    this.own = true;
  }
  dispose(): void {
    if (this.own) tf.dispose(this.grads);
    this.own = false;
  }
}

export class ReplicaSession {
  private readonly a: TrainingAttempt;
  private readonly names: JobNames;
  /** Aborted by a checksum mismatch or when the attempt is stopped from outside. */
  private readonly stop = new AbortController();
  private readonly onOuterAbort = (): void => this.stop.abort(this.o.signal?.reason);
  private readonly view = new MembershipView();
  private readonly notify: (() => void)[] = [];
  private readonly checksums: ChecksumBook;
  private data: ReplicaData | undefined;
  private readonly decided = new Set<number>();
  private readonly allreduce = { seconds: 0, bytes: 0 };
  private os: ObjectStore | undefined;
  private replica: Replica | undefined;
  /** Kept apart from `replica` so that close() disposes it even when load() failed halfway. */
  private optimizer: tf.Optimizer | undefined;
  private averager: GradientAverager | undefined;
  private checksumSub: Subscription | undefined;
  private watch: { stop(): void; [Symbol.asyncIterator](): AsyncIterator<KvEntry> } | undefined;
  private cursor: DataCursor = { epoch: 0, batch: 0, step: 0 };
  private history: EpochStats[] = [];
  /** Step at which the current stint (first membership, or a join) started. */
  private stintFrom = 0;
  /**
   * The global batches whose part was taken, by batch index. With an image source the next batch is
   * cut while the current one trains, so the step in flight is found by the cursor, not by the last cut.
   */
  private readonly sliced = new Map<number, SlicedBatch>();
  private readonly phase: TrainingPhase;
  /**
   * The attempt's training controls, applied by fit() on every replica: each validates the same rows with identical
   * weights, so all stop at the same epoch and restore the same best epoch. Their state (patience, plateau count and
   * rate, best epoch and weights) travels with every state this replica stores (checkpoint, join) and fit() goes on
   * from the one it started from (a resumed attempt's start, a join), so a resumed or joined fit decides as the others do.
   */
  private readonly controls: TrainingControls;
  /** The controls' state the next fit() goes on from: the attempt's start state's, or the join state's. */
  private controlsFrom: ControlsState | undefined;
  /** fit()'s reader of its controls' state (as of the last epoch end). */
  private readControls: (() => ControlsState) | undefined;
  private stepTimer: (() => number) | undefined;
  /** Samples (images, for an image attempt) this replica trained on in this attempt: its images/s in the done log. */
  private samplesRun = 0;
  /** Samples of the gradients this replica averaged for the step just applied (its part under the membership the step ran under). */
  private stepSamples: number | undefined;
  private fitStart = 0;

  constructor(private readonly o: TrainingWorkerOptions) {
    this.a = o.attempt;
    this.phase = attemptPhase(o.attempt);
    this.controls = controlsOf(o.attempt);
    this.names = jobNames(o.job);
    this.checksums = new ChecksumBook(o.self);
  }

  /** Runs the attempt to its end; reports every outcome in the state KV and never throws. */
  async run(): Promise<void> {
    if (this.o.signal?.aborted) this.onOuterAbort();
    else this.o.signal?.addEventListener("abort", this.onOuterAbort, { once: true });
    try {
      await this.report({ state: "loading" });
      await this.load();
      await this.watchMembership();
      await this.openAverager();
      await this.subscribeChecksums();
      await this.trainAsMember();
      await this.finish();
    } catch (err) {
      await this.onEnd(err);
    } finally {
      await this.close();
    }
  }

  private get r(): Replica {
    if (!this.replica) throw new Error("replica used before load()");
    return this.replica;
  }

  private get store(): ObjectStore {
    if (!this.os) throw new Error("object store used before load()");
    return this.os;
  }

  private get av(): GradientAverager {
    if (!this.averager) throw new Error("averager used before openAverager()");
    return this.averager;
  }

  /** Per-step compute/wait split for the coordinator's straggler detection. */
  private readonly timing = new StepTimer();

  private async report(body: ReportBody): Promise<void> {
    const r = buildReport(this.a.attempt, this.o.self, body);
    await this.o.state.put(TRAINING_KEYS.report(this.o.self), encodeReport(this.o.job, r)).catch((err: unknown) => this.o.log.warn("training report not stored", { error: err as Error }));
  }

  private async fetchObject(name: string): Promise<Uint8Array> {
    const b = await getBytes(this.store, name);
    if (!b) throw new ReplicaFailedError(this.o.self, `object ${name} is missing from ${this.names.checkpointsBucket} (was the coordinator's store lost?)`);
    return b;
  }

  /** Builds the trainable part as the one-process path does (worker/replica_data.ts) and restores the attempt's start state. */
  private async load(): Promise<void> {
    if (activeBackend()?.tfBackend === "wasm") registerWasmTrainingKernels();
    this.os = await this.o.nc.jetstream().views.os(this.names.checkpointsBucket);
    const data = await loadReplicaData(this.a, {
      self: this.o.self, fetch: (name) => this.fetchObject(name), cache: this.o.cache ?? new ExtractorCache(), threads: this.o.threads, provider: this.o.provider,
    });
    this.data = data;
    const optimizer = tf.train.adam(this.a.learningRate);
    this.optimizer = optimizer;
    const start = decodeState(await this.fetchObject(TRAINING_OBJECTS.start(this.a.attempt)));
    await restoreState(data.model, optimizer, start);
    this.replica = { model: data.model, optimizer, start, data, source: data.source((indices, b, epoch) => this.sliceOf(indices, b, epoch)) };
  }

  /** Takes this replica's part of global batch `batch` under the current membership and notes it (the step hook may need to cut it again). */
  private sliceOf(indices: Int32Array, batch: number, epoch: number): Int32Array {
    this.sliced.set(batch, { indices, epoch, membershipEpoch: this.av.epoch });
    return this.myPart(indices);
  }

  /** One ordered watch over the coordinator's plans and member 0's boundary decisions. */
  private async watchMembership(): Promise<void> {
    const watch = await this.o.state.watch({ key: TRAINING_KEYS.plan });
    this.watch = watch;
    void (async () => {
      for await (const e of watch) {
        if (e.operation !== "PUT" || e.value.length === 0) continue;
        try {
          this.applyMembershipEntry(e.key, e.value);
        } catch (err) {
          this.o.metrics?.droppedMessage(err instanceof DecodeError ? err.reason : "malformed");
          this.o.log.warn("dropped a membership message that does not decode", { key: e.key, error: err as Error });
        } finally {
          for (const f of this.notify.splice(0)) f();
        }
      }
    })();
  }

  private applyMembershipEntry(key: string, value: Uint8Array): void {
    if (key === TRAINING_KEYS.members) {
      const plan = decodeMembershipPlan(this.o.job, this.a.attempt, value);
      if (!plan) return; // another attempt's plan
      const effect = this.view.applyPlan(plan.epoch, plan.members, plan.joining);
      // A step in flight under an older membership cannot finish: end it now rather than at the timeout.
      if (effect === "immediate" && this.averager && plan.epoch > this.averager.epoch) this.averager.abort(new MembershipChanged(plan.epoch, `membership epoch ${plan.epoch}: redo the step`));
      if (effect === "proposal") this.o.log.info("join proposed", { membership_epoch: plan.epoch, joining: plan.joining });
    } else if (key === TRAINING_KEYS.boundary) {
      const d = decodeBoundaryDecision(this.o.job, this.a.attempt, value, "worker");
      if (d) this.view.applyDecision(d.step, d.epoch);
    }
  }

  /** Resolves true once `pred()` holds, false after `timeoutMs`; rejects when the attempt is stopped. */
  private async until(pred: () => boolean, timeoutMs = Infinity): Promise<boolean> {
    const end = Date.now() + timeoutMs;
    while (!pred()) {
      if (this.o.signal?.aborted) throw this.o.signal.reason;
      if (this.stop.signal.aborted) throw this.stop.signal.reason;
      const left = end - Date.now();
      if (left <= 0) return false;
      await new Promise<void>((r) => {
        const t = setTimeout(r, Math.min(left, 1000));
        this.notify.push(() => {
          clearTimeout(t);
          r();
        });
      });
    }
    return true;
  }

  /** Opens the averager as the only member (so its gradient subject exists before any peer sends to it) and reports `ready`. */
  private async openAverager(): Promise<void> {
    const { nc, job, self, metrics } = this.o;
    this.averager = await GradientAverager.open({ nc, job, self, members: [self], epoch: 0, wireDtype: this.a.wireDtype, bucketBytes: this.a.bucketBytes || undefined, metrics, timeoutMs: this.a.stepTimeoutMs });
    await this.report({ state: "ready", step: this.r.start.cursor.step });
    this.o.log.info("training replica ready", { attempt: this.a.attempt, phase: this.phase, input: this.a.images ? "images" : this.a.features ? "features" : "rows", parameters: this.r.model.countParams(), train_rows: this.r.data.trainSamples, cursor: this.r.start.cursor });
  }

  private async subscribeChecksums(): Promise<void> {
    this.checksumSub = this.o.nc.subscribe(this.names.weights, {
      callback: (err, msg) => {
        if (!err) this.onChecksum(msg.data);
      },
    });
    await this.o.nc.flush();
  }

  private onChecksum(bytes: Uint8Array): void {
    try {
      const mismatch = this.checksums.record(decodeWeightsChecksum(this.o.job, bytes), this.av.members);
      if (mismatch) this.stop.abort(mismatch);
    } catch {
      this.o.metrics?.droppedMessage("decode_error");
    }
  }

  private publishChecksum(step: number): void {
    const d = weightsChecksum(this.r.model);
    this.o.nc.publish(this.names.weights, encodeWeightsChecksum(this.o.job, this.av.epoch, { worker: this.o.self, step, ...d }));
  }

  /** Takes on the membership in force when it is newer than the averager's; true when it changed. */
  private async adopt(): Promise<boolean> {
    const cur = this.view.current;
    if (!cur || cur.epoch <= this.av.epoch) return false;
    if (!cur.members.includes(this.o.self)) throw new EvictedError(`left out of membership epoch ${cur.epoch}`);
    await this.av.setMembership(cur.epoch, cur.members);
    return true;
  }

  /** Becomes a member and trains to the attempt's end; a replica left out waits to be let in again at a boundary. */
  private async trainAsMember(): Promise<void> {
    this.cursor = { ...this.r.start.cursor };
    // A resumed attempt goes on with the epochs before its checkpoint: the history member 0 reports is the phase's whole.
    this.history = historyOf(this.r.start);
    this.controlsFrom = this.r.start.controls;
    this.stintFrom = this.cursor.step;
    this.fitStart = performance.now();
    let waitingSince = -1; // view.seq after which a join must come (-1: the first membership of the attempt)
    for (;;) {
      const sw = await this.becomeMember(waitingSince);
      try {
        await this.adopt();
        if (!this.av.members.includes(this.o.self)) throw new EvictedError(`not a member of membership epoch ${this.view.current?.epoch}`);
        if (sw) this.publishChecksum(this.cursor.step); // the members publish theirs for this step at the boundary: a joiner that restored anything else stops the job
        this.stintFrom = this.cursor.step;
        await this.runStint();
        return;
      } catch (err) {
        if (!(err instanceof EvictedError)) throw err;
        this.o.log.warn("left out of the membership: waiting to be let in again", { attempt: this.a.attempt, step: this.cursor.step, error: err.message });
        await this.report({ state: "waiting", step: this.cursor.step, error: err.message });
        waitingSince = this.view.seq;
      }
    }
  }

  /** Waits to be in the attempt's first membership (undefined) or let in at a boundary (the join, whose state is restored). */
  private async becomeMember(waitingSince: number): Promise<JoinSwitch | undefined> {
    const inFirstPlan = (): boolean => waitingSince < 0 && this.view.current?.origin.kind === "plan" && this.view.current.members.includes(this.o.self);
    const join = (): JoinSwitch | undefined => this.view.joinFor(this.o.self, Math.max(0, waitingSince));
    await this.until(() => inFirstPlan() || join() !== undefined);
    if (inFirstPlan()) return undefined;
    const sw = join()!;
    await this.restoreJoin(sw);
    return sw;
  }

  private async restoreJoin(sw: JoinSwitch): Promise<void> {
    const s = decodeState(await this.fetchObject(TRAINING_OBJECTS.join(this.a.attempt, sw.epoch)));
    if (s.cursor.step !== sw.step) throw new ReplicaFailedError(this.o.self, `join state of membership epoch ${sw.epoch} is at step ${s.cursor.step}, the boundary was step ${sw.step}`);
    await restoreState(this.r.model, this.r.optimizer, s);
    this.cursor = { ...s.cursor };
    this.history = historyOf(s);
    this.controlsFrom = s.controls;
    this.o.log.info("joining the training at a training-epoch boundary", { attempt: this.a.attempt, step: sw.step, epoch: s.cursor.epoch, membership_epoch: sw.epoch, members: sw.members });
  }

  /** Runs fit() from the cursor until the attempt's last step (or an error). */
  private async runStint(): Promise<void> {
    await this.report({ state: "training", step: this.cursor.step });
    this.o.log.info("training", { attempt: this.a.attempt, members: this.av.members, membership_epoch: this.av.epoch, from: this.cursor });
    const { model, optimizer, source } = this.r;
    this.stepTimer = this.o.metrics?.startStep(this.phase);
    this.timing.restart();
    // Every replica validates (the source's val rows: identical weights give identical figures), so whichever is
    // member 0 when an epoch ends has them, also after the first member 0 was lost. No wall time: the others would wait for it anyway.
    await fit(model, source, {
      epochs: this.a.epochs, batchSize: this.a.globalBatch, seed: this.a.seed, numClasses: this.a.numClasses, optimizer,
      initialEpoch: this.cursor.epoch, initialBatch: this.cursor.batch, signal: this.stop.signal, controls: this.controls,
      initialControls: this.controlsFrom, onControls: (read) => (this.readControls = read),
      gradientHook: (grads, samples) => this.stepHook(grads, samples),
      onBatchEnd: (info) => this.onBatchEnd(info),
      onEpochEnd: async (s) => {
        this.history.push(s);
        await this.report({ state: "training", step: this.cursor.step, cursor: { ...this.cursor }, history: this.history });
      },
    });
    this.markBest();
  }

  /** fit() marks the best epoch among its own; one from before a resume or join is in the history this replica carries. */
  private markBest(): void {
    const epoch = this.readControls?.().bestEpoch;
    if (!this.controls.restoreBestWeights || !epoch) return;
    const best = this.history.find((h) => h.epoch === epoch);
    if (best) best.best = true;
  }

  /** The state stored for a checkpoint or a join: weights, optimizer, cursor, and the controls' state fit() would go on from. */
  private async captureWith(members: readonly string[]): Promise<TrainingState> {
    const s = await captureState(this.r.model, this.r.optimizer, this.cursor, this.stateMeta(members));
    const controls = this.readControls?.();
    return controls ? { ...s, controls } : s;
  }

  /** This replica's contiguous part of a global batch under the current membership. */
  private myPart(indices: Int32Array): Int32Array {
    return memberSlice(indices, this.av.members, this.o.self);
  }

  private onBatchEnd(done: { epoch: number; batch: number; batches: number; samples: number }): void {
    this.stepTimer?.();
    this.stepTimer = this.o.metrics?.startStep(this.phase);
    // fit() counts the part it cut; a step redone under another membership trained the part cut again.
    const samples = this.stepSamples ?? done.samples;
    this.stepSamples = undefined;
    this.o.metrics?.countImages(this.phase, samples);
    this.samplesRun += samples;
    this.cursor = advanceCursor(this.cursor, done);
    this.o.metrics?.setEpoch(this.phase, done.epoch + 1, this.cursor.step);
    if (isChecksumStep(this.cursor.step, this.a.checksumEvery)) this.publishChecksum(this.cursor.step);
  }

  /** fit()'s gradient hook: boundary decision, checkpoint, then averaging (redone under a new membership until it succeeds). */
  private async stepHook(grads: tf.NamedTensorMap, samples: number): Promise<tf.NamedTensorMap> {
    const step = this.cursor.step;
    const g = new StepGradients(grads, samples);
    try {
      // A part cut ahead (prefetch) under a membership that has changed since: cut it again under this one.
      if (this.inFlight().membershipEpoch !== this.av.epoch) {
        this.o.log.info("part cut ahead under an older membership: cutting it again", { step, membership_epoch: this.av.epoch });
        g.replace(await this.recompute());
      }
      if (isBoundaryStep(step, this.cursor.batch, this.stintFrom) && (await this.atBoundary(step))) g.replace(await this.recompute());
      await this.maybeCheckpoint(step);
      const averaged = await this.averageStep(step, g);
      this.stepSamples = g.samples;
      return averaged;
    } finally {
      g.dispose();
    }
  }

  /** The global batch of the step in flight (the cursor's batch; cut by sliceOf in this epoch). */
  private inFlight(): SlicedBatch {
    const b = this.sliced.get(this.cursor.batch);
    if (!b || b.epoch !== this.cursor.epoch) throw new Error(`replica: batch ${this.cursor.batch} of epoch ${this.cursor.epoch} runs but was never cut`);
    return b;
  }

  /** My part of the same global batch under the current membership (through the same source); weights and optimizer are untouched. */
  private async recompute(): Promise<{ grads: tf.NamedTensorMap; samples: number }> {
    const b = this.inFlight();
    const rows = await this.r.source.batch(b.indices, this.cursor.batch, b.epoch);
    return { grads: computeGradients(this.r.model, rows, this.a.numClasses, this.controls.loss, { seed: this.a.seed, epoch: b.epoch }).grads, samples: rows.y.length };
  }

  /** Training-epoch boundary: member 0 says whether a proposed join applies from this step; everyone waits for it. True when the membership changed. */
  private async atBoundary(step: number): Promise<boolean> {
    let changed = false;
    while (!this.view.boundaries.has(step)) {
      changed = (await this.adopt()) || changed;
      if (this.av.members[0] === this.o.self && !this.decided.has(step)) {
        this.decided.add(step);
        await this.decideBoundary(step);
      }
      const newerPlan = (): boolean => {
        const c = this.view.current;
        return c !== undefined && c.origin.kind === "plan" && c.epoch > this.av.epoch;
      };
      const seen = await this.until(() => this.view.boundaries.has(step) || newerPlan(), this.a.stepTimeoutMs);
      if (!seen) await this.member0Silent(step);
    }
    changed = (await this.adopt()) || changed;
    if (changed) {
      this.o.log.info("membership changed at the training-epoch boundary", { step, membership_epoch: this.av.epoch, members: this.av.members });
      this.publishChecksum(step);
    }
    return changed;
  }

  /** Member 0's decision: apply the pending proposal (after storing the state joiners start from) or keep the membership. */
  private async decideBoundary(step: number): Promise<void> {
    const p = this.view.pending;
    let epoch = this.av.epoch;
    if (p && this.view.current?.epoch === this.av.epoch) {
      const s = await this.captureWith(p.members);
      await putBytes(this.store, TRAINING_OBJECTS.join(this.a.attempt, p.epoch), encodeState(s));
      epoch = p.epoch;
    }
    await this.o.state.put(TRAINING_KEYS.boundary, encodeBoundaryDecision(this.o.job, this.o.self, this.a.attempt, { step, epoch }));
  }

  /** Member 0 did not decide in time: report it, and go on under the membership the coordinator plans next. */
  private async member0Silent(step: number): Promise<void> {
    const m0 = this.av.members[0]!;
    this.o.log.warn("no boundary decision from member 0", { step, member0: m0, timeout_ms: this.a.stepTimeoutMs });
    await this.report({ state: "peers_lost", step, lost: [m0], epoch: this.av.epoch });
    await this.until(() => this.view.current !== undefined && this.view.current.epoch > this.av.epoch);
  }

  private stateMeta(members: readonly string[], complete = false): Record<string, unknown> {
    return { attempt: this.a.attempt, members, history: this.history, fingerprint: this.a.fingerprint, ...(complete ? { complete } : {}) };
  }

  private async maybeCheckpoint(step: number): Promise<void> {
    if (!isCheckpointStep(step, { attemptStartStep: this.r.start.cursor.step, every: this.a.checkpointEvery, member0: this.av.members[0] === this.o.self })) return;
    const s = await this.captureWith(this.av.members);
    await putBytes(this.store, TRAINING_OBJECTS.latestOf(this.phase), encodeState(s));
    await this.report({ state: "checkpoint", step, cursor: { ...this.cursor } });
    this.o.log.info("checkpoint saved", { step, epoch: this.cursor.epoch, batch: this.cursor.batch });
  }

  /** Averages `g`; a lost peer or a new membership waits for the next membership and averages again (recomputed under it). */
  private async averageStep(step: number, g: StepGradients): Promise<tf.NamedTensorMap> {
    const av = this.av;
    const average = gradientHookFor(av, this.r.model, {
      firstStep: step,
      onAverage: (st) => {
        this.allreduce.seconds += st.seconds;
        this.allreduce.bytes += st.bytesSent + st.bytesReceived;
      },
    });
    this.timing.averaging();
    for (;;) {
      try {
        // A membership that changed while the gradients were computed: redo them under it first.
        if (await this.adopt()) {
          this.o.log.info("membership changed during the step: recomputing my part", { step, membership_epoch: this.av.epoch, members: this.av.members });
          g.replace(await this.recompute());
        }
        const caughtUp = av.replaysApplied;
        const out = await average(g.grads, g.samples);
        if (av.replaysApplied > caughtUp) this.o.log.info("caught up: applied the step as a member that had completed it did", { step, membership_epoch: av.epoch });
        this.reportTimings(step);
        return out;
      } catch (err) {
        if (!(err instanceof WorkerLostError || err instanceof MembershipChanged)) throw err;
        await this.awaitNewMembership(step, err);
      }
    }
  }

  /** Hands the coordinator this replica's compute/wait split of recent steps (at most once a second; fire and forget). */
  private reportTimings(step: number): void {
    this.timing.averaged(step);
    const due = this.timing.takeDue();
    if (due) void this.report({ state: "training", step, step_timings: due });
  }

  private async awaitNewMembership(step: number, err: Error): Promise<void> {
    const lost = lostPeersOf(err);
    this.o.log.warn("step failed: waiting for a new membership", { step, error: err.message, lost });
    await this.report({ state: "peers_lost", step, lost, epoch: this.av.epoch });
    await this.until(() => this.view.current !== undefined && this.view.current.epoch > this.av.epoch);
    this.o.log.info("redoing the step with the new membership", { step, epoch: this.view.current!.epoch, members: this.view.current!.members });
  }

  /**
   * Lets the last checksums arrive and be compared, stores the final state (member 0) and reports `done`. Runs after
   * fit() returned, so the state is the one fit() ended with: the best epoch's weights when restoring them, and an
   * early-stopped cursor short of the attempt's steps (marked `complete`, so a restarted coordinator does not resume it).
   */
  private async finish(): Promise<void> {
    await this.o.nc.flush();
    await new Promise((r) => setTimeout(r, 200));
    if (this.stop.signal.aborted) throw this.stop.signal.reason;
    if (this.av.members[0] === this.o.self) {
      const s = encodeState(await captureState(this.r.model, this.r.optimizer, this.cursor, this.stateMeta(this.av.members, true)));
      await putBytes(this.store, TRAINING_OBJECTS.final(this.a.attempt), s);
      await putBytes(this.store, TRAINING_OBJECTS.latestOf(this.phase), s);
    }
    await this.report(doneReport(this.cursor, this.history, this.allreduce, this.av.members));
    const seconds = (performance.now() - this.fitStart) / 1000;
    this.o.log.info("training done", {
      attempt: this.a.attempt, phase: this.phase, ...trainingSummary(this.cursor.step, this.cursor.step - this.stintFrom, seconds, this.allreduce),
      samples: this.samplesRun, samples_per_second: seconds > 0 ? Number((this.samplesRun / seconds).toFixed(1)) : 0, ...this.r.data.prepTimes?.take(),
    });
  }

  private async onEnd(err: unknown): Promise<void> {
    const e = err instanceof Error ? err : new Error(String(err));
    const stopped = this.o.signal?.aborted ?? false;
    if (stopped) this.o.log.info("training attempt superseded or stopped", { attempt: this.a.attempt, reason: String(this.o.signal?.reason) });
    else if (e instanceof EvictedError) this.o.log.warn("left out of the membership: this replica stops", { attempt: this.a.attempt, error: e.message });
    else this.o.log.error("training failed", { attempt: this.a.attempt, error: e });
    const body = endReport(e, stopped);
    if (body) await this.report(body);
  }

  private async close(): Promise<void> {
    this.o.signal?.removeEventListener("abort", this.onOuterAbort);
    this.checksumSub?.unsubscribe();
    this.watch?.stop();
    await this.averager?.close();
    this.optimizer?.dispose();
    this.data?.dispose();
  }
}

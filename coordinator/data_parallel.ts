/**
 * Data-parallel fine-tuning across ctrain workers: the coordinator's driver.
 *
 * Design
 * - Spec. The coordinator publishes one training spec per attempt under TRAINING_KEYS.spec in the
 *   job's state KV: a JobSpec whose `training` is a typed TrainingAttempt (model, input size, feature
 *   layer, pooling, --fine-tune-layers, learning rate, seed, global batch, classes, wire dtype, attempt
 *   id, epochs, checksum/checkpoint periods, step timeout, config fingerprint; proto/training_wire.ts,
 *   defaults in core/training/data_parallel_settings.ts). Beside it, in the job's checkpoints object
 *   store (TRAINING_OBJECTS): the trained head (topology + weights), the start state (every weight of
 *   top + head, the optimizer's state, the data cursor; core/training/checkpoints.ts) and the rows.
 * - Images (--method augment). An attempt may instead carry `images` (the data set and the frozen stage
 *   as an extraction round names them, and the augmentation) and `phase` (head or fine_tune): the
 *   train object is then the sample ids in the coordinator's row order, and each worker opens the
 *   images and runs the frozen stage on its own part of every global batch (coordinator/augment_data_parallel.ts,
 *   worker/replica_data.ts). A worker that cannot open the data set reports DataUnavailableError and
 *   is left out; the others train (none left: WorkersUnavailableError).
 * - Data. Cached rows (the activations at the cut for fine-tuning, the features for method 1's head)
 *   are streamed: the coordinator puts the cache entry's train and val splits into the object store as
 *   the blocks its own stream reads (`features`, coordinator/cached_rows_on_workers.ts), and every
 *   replica walks the same seeded block order, holding two shuffle windows. Recomputing activations
 *   per worker would redo the frozen bottom N times; each replica instead reads every block once per
 *   epoch (at input 96 and 3 fine-tuned layers, 3x3x320 floats = 11.5 KB per image). An attempt
 *   without `features` or `images` carries its rows whole (`data-<attempt>-train`/`-val`).
 * - Replicas. Each worker (worker/replica_session.ts) builds the same trainable part (top from the
 *   pretrained weights + pooling + the head from the same weights) and restores the start state, so
 *   all replicas start bit-identical, then runs train_loop's fit() -- the one step implementation of
 *   the one-process path -- with `sliceOf` (member i takes the i-th contiguous part of each global
 *   batch, by member index) and gradientHookFor(averager) (weighted by sample count, so N workers on
 *   global batch B give the mean gradient of B). The coordinator is not on the gradient path: it
 *   plans membership and watches.
 * - Membership. The rules are coordinator/membership_planner.ts (pure, unit-tested); the I/O around
 *   them is coordinator/data_parallel_driver.ts. Workers report `ready` (their averager subscribed) in
 *   the state KV; the coordinator puts a StepPlan (header.epoch = membership epoch 1, members in order) under TRAINING_KEYS.members.
 *   A member lost mid-step (its heartbeat gone from the worker registry, or named by the survivors'
 *   `peers_lost` reports after StepPeersLostError) is removed: membership epoch + 1, new StepPlan; the
 *   survivors call setMembership, recompute their part of the same global batch and average again.
 *   The update is applied only after averaging succeeded, so no replica holds a half-applied step.
 * - Joining (elastic scale-up). A replica that becomes ready after the first plan (a worker started
 *   late, or a member left out earlier that reports `waiting`) is proposed: a StepPlan with the
 *   current members unchanged plus the newcomers in `joining`, under a new epoch. The members go on
 *   as they are. At the first step S of every training epoch member 0 decides -- a Control
 *   EPOCH_BOUNDARY under TRAINING_KEYS.boundary naming the proposal's epoch (after putting its state
 *   at S, weights + Adam moments + cursor + the training controls' state, as TRAINING_OBJECTS.join) or the current one -- and
 *   every member waits for that decision before averaging step S. The joiners restore the join state
 *   and everyone runs step S under the new membership; a weights checksum of step S from every member
 *   proves the joiners start from the same replica. Plans and decisions live in one KV subject tree
 *   (TRAINING_KEYS.plan), so every replica reads them in one order and reaches the same membership
 *   (worker/membership_view.ts); a proposal withdrawn by a later plan is not applied by a late decision.
 * - Training controls. The attempt carries Keras' controls (TrainingAttempt.controls: early stopping,
 *   best weights, cosine / plateau schedule, class weights, label smoothing) and every replica passes
 *   them to fit(). Each validates after every epoch on the same rows with identical weights, so all
 *   take the same decisions: they stop at the same epoch (the attempt ends before `epochs`; member 0's
 *   `done` ends it as always) and put the same best epoch back before member 0 stores the final state.
 *   The cosine rate is a function of the epoch; patience, the best figure and epoch, the best weights and
 *   a plateau's count and reduced rate (fit()'s ControlsState, as of the last epoch end) go into every
 *   state member 0 stores, checkpoint and join alike, and fit() goes on from them: a resumed attempt and
 *   a joiner decide as the uninterrupted members would. A final state is marked `complete`, so an
 *   early-stopped phase is not resumed by a restarted coordinator.
 * - Consistency. Every K steps each replica publishes WeightsChecksum; replicas compare and a
 *   mismatch fails the job with ReplicaMismatchError.
 * - Checkpoints. Member 0 puts the state (weights + Adam moments + cursor (epoch, batch, step) + controls) to
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
import type { KV, NatsConnection, ObjectStore } from "nats";
import * as tf from "@tensorflow/tfjs";
import type { Pooling, WireDtype } from "../core/runtime/config.js";
import { ensureTaskQueue, DEFAULT_ACK_WAIT_MS, DEFAULT_MAX_DELIVER } from "../proto/extraction_wire.js";
import type { Logger } from "../core/runtime/log.js";
import type { CtrainMetrics } from "../core/runtime/metrics.js";
import { type ArrayData, type EpochStats, epochBatches, type TrainingControls } from "../core/training/train_loop.js";
import { DATA_PARALLEL_DEFAULTS } from "../core/training/data_parallel_settings.js";
import { jobNames, WORKER_REGISTRY_TTL_MS } from "../proto/subjects.js";
import { captureState, decodeState, encodeState, getBytesWithin, putBytes, restoreState, writeStateFile, type TrainingState } from "../core/training/checkpoints.js";
import { completeAttempt, encodeDataObject, toControlsMessage, encodeHeadObject, encodeTrainingSpec, TRAINING_KEYS, TRAINING_OBJECTS, type TrainingAttempt, type TrainingPhase } from "../proto/training_wire.js";
import type { FeatureInput, ImageInput } from "../proto/codec.js";
import { DataParallelDriver, type DriveResult } from "./data_parallel_driver.js";

export { DATA_PARALLEL_DEFAULTS };

/**
 * Everything data-parallel fine-tuning takes. Every setting is a field here (nothing is read from the
 * environment); the tunables' defaults are DATA_PARALLEL_DEFAULTS (core/training/data_parallel_settings.ts),
 * which the option table shows and validates.
 */
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
  /** Global batch (split across the members), samples per step. */
  batchSize: number;
  epochs: number;
  numClasses: number;
  /** Gradient dtype on the wire. Default fp32. */
  wireDtype?: WireDtype;
  /** Upper bound of one gradient bucket on the wire, bytes (`--bucket-bytes`). Default DATA_PARALLEL_DEFAULTS.bucketBytes. */
  bucketBytes?: number;
  /** Workers to wait for before the first step. */
  workers: number;
  /** How long to wait for `workers` replicas to be ready before starting with those that are, ms. Default 120000. */
  readyTimeoutMs?: number;
  /** Steps between replica checksum exchanges; 0 = never. Default 10. */
  checksumEvery?: number;
  /** Steps between checkpoints; 0 = only the final state. Default 20. */
  checkpointEvery?: number;
  /** Step deadline before peers count as lost, ms. Default 30000. */
  stepTimeoutMs?: number;
  /** Run folder: checkpoints are copied to <out>/checkpoints/. */
  out?: string;
  /** What the attempt trains: `fine_tune` (top + head, the default) or `head` (the head alone). */
  phase?: TrainingPhase;
  /** Image-fed attempts (--method augment): the data set, frozen stage and augmentation the replicas use. Absent: rows (cached activations). */
  images?: ImageInput;
  /** A head attempt on cached features (method 1): the entry's block objects the replicas stream (coordinator/cached_rows_on_workers.ts). */
  features?: FeatureInput;
  /**
   * Keras' training controls (early stopping, best weights, schedule, class weights, label smoothing), applied by
   * every replica. Default none. Their state is in every checkpoint and join state: a resumed attempt and a joiner
   * go on with the patience, plateau rate and best weights where they were.
   */
  controls?: TrainingControls;
  onBatchProgress?: (step: number, totalSteps: number, epoch: number) => void;
  onEpochEnd?: (s: EpochStats) => void | Promise<void>;
  signal?: AbortSignal;
}

/** The job's stores the attempt uses (the task queue is ensured too: workers bind to the job through it). */
interface Stores {
  os: ObjectStore;
  state: KV;
  registry: KV;
}

/** Fingerprint of what a checkpoint is valid for (a fine-tuning attempt on activations keeps the fingerprint it always had). */
function fingerprint(o: DataParallelOptions, trainRows: number): string {
  const input = o.images ? [o.images.frozen.extractorFingerprint, o.images.frozen.datasetFingerprint, o.images.augment ?? null] : o.features ? ["features", o.features.entry, o.features.blockRows, o.features.windowBlocks] : null;
  const kind = (o.phase ?? "fine_tune") === "fine_tune" && !input ? [] : [o.phase ?? "fine_tune", input];
  // Controls change the training (schedule, loss, stopping): a checkpoint made under others does not resume.
  const controls = o.controls ? [toControlsMessage(o.controls)] : [];
  return JSON.stringify([o.model, o.inputSize, o.featureLayer, o.pooling, o.fineTuneLayers, o.learningRate, o.seed, o.batchSize, o.numClasses, trainRows, ...kind, ...controls]);
}

/** A fresh attempt id (base 36 time + a random suffix). */
function newAttemptId(): string {
  return `${Date.now().toString(36)}${Math.floor(Math.random() * 1e4).toString(36)}`;
}

/** The training attempt the replicas run: every setting typed, the defaults applied once (completeAttempt). */
export function attemptOf(o: DataParallelOptions, attempt: string, trainRows: number): TrainingAttempt {
  return completeAttempt({
    attempt, model: o.model, inputSize: o.inputSize, featureLayer: o.featureLayer, pooling: o.pooling, fineTuneLayers: o.fineTuneLayers,
    learningRate: o.learningRate, seed: o.seed, globalBatch: o.batchSize, epochs: o.epochs, numClasses: o.numClasses, fingerprint: fingerprint(o, trainRows),
    wireDtype: o.wireDtype, bucketBytes: o.bucketBytes, checksumEvery: o.checksumEvery, checkpointEvery: o.checkpointEvery, stepTimeoutMs: o.stepTimeoutMs,
    phase: o.phase ?? "fine_tune", images: o.images ?? null, features: o.features ?? null, controls: o.controls ?? null,
  });
}

async function openStores(nc: NatsConnection, job: string): Promise<Stores> {
  const names = jobNames(job);
  const js = nc.jetstream();
  await ensureTaskQueue(await nc.jetstreamManager(), names, { ackWaitMs: DEFAULT_ACK_WAIT_MS, maxDeliver: DEFAULT_MAX_DELIVER });
  return {
    os: await js.views.os(names.checkpointsBucket),
    state: await js.views.kv(names.stateBucket, { history: 1 }),
    registry: await js.views.kv(names.workersBucket, { history: 1, ttl: WORKER_REGISTRY_TTL_MS }),
  };
}

/** Tries at reading `latest`, and how long one may take (the state of the trainable part and its Adam moments: megabytes at most). */
const LATEST_READS = 5;
const LATEST_READ_MS = 5000;

/**
 * The job's latest checkpoint of a phase, or null. A coordinator restarted while the replicas of its
 * attempt still train reads `latest` as member 0 rewrites it: a read that stalls is done again.
 */
async function readLatest(os: ObjectStore, name: string, log: Logger): Promise<Uint8Array | null> {
  for (let i = 1; i <= LATEST_READS; i++) {
    const b = await getBytesWithin(os, name, LATEST_READ_MS).catch(() => null);
    if (b !== undefined) return b;
    log.info("checkpoint rewritten while it was read: reading it again", { name, try: i });
  }
  log.warn("cannot read the latest checkpoint (rewritten during every read): starting the phase afresh", { name, tries: LATEST_READS });
  return null;
}

/** The attempt's start state: the job's latest checkpoint when it was made for this configuration, else the model as it is. */
async function startState(o: DataParallelOptions, os: ObjectStore, model: tf.LayersModel, optimizer: tf.Optimizer, fp: string, totalSteps: number): Promise<TrainingState> {
  const fresh = await captureState(model, optimizer, { epoch: 0, batch: 0, step: 0 }, { fingerprint: fp, history: [] });
  const bytes = await readLatest(os, TRAINING_OBJECTS.latestOf(o.phase ?? "fine_tune"), o.log);
  if (!bytes) return fresh;
  const latest = decodeState(bytes);
  if (latest.meta["fingerprint"] !== fp) {
    o.log.info("ignoring a checkpoint of another configuration", { step: latest.cursor.step });
    return fresh;
  }
  o.log.info(`resuming ${(o.phase ?? "fine_tune") === "head" ? "the head phase" : "fine-tuning"} from checkpoint`, { step: latest.cursor.step, epoch: latest.cursor.epoch, batch: latest.cursor.batch, of_steps: totalSteps });
  return latest;
}

/**
 * What the replicas of an attempt fetch besides the head and the start state: the train object (rows
 * of cached activations, or the sample list of an image attempt: encodeSampleList) and the val rows.
 * A head attempt on cached features has neither: its rows are block objects the caller put (`features`).
 */
export interface AttemptData {
  train?: Uint8Array;
  val?: ArrayData;
  /** Training samples (rows or images). */
  trainSamples: number;
}

/** Puts what every replica fetches (head, start state, data) and then the spec that starts them. */
async function publishAttempt(o: DataParallelOptions, s: Stores, a: TrainingAttempt, head: tf.LayersModel, start: TrainingState, data: AttemptData, totalSteps: number): Promise<void> {
  await putBytes(s.os, TRAINING_OBJECTS.head(a.attempt), await encodeHeadObject(head));
  await putBytes(s.os, TRAINING_OBJECTS.start(a.attempt), encodeState(start));
  if (data.train) await putBytes(s.os, TRAINING_OBJECTS.data(a.attempt, "train"), data.train);
  if (data.val) await putBytes(s.os, TRAINING_OBJECTS.data(a.attempt, "val"), encodeDataObject(data.val));
  await s.state.put(TRAINING_KEYS.spec, encodeTrainingSpec(o.job, a));
  o.log.info("training spec published", { attempt: a.attempt, phase: a.phase, input: a.images ? "images" : a.features ? "features" : "rows", from_step: start.cursor.step, steps: totalSteps, workers: o.workers, checkpoint_every: a.checkpointEvery, checksum_every: a.checksumEvery });
}

/** Runs the attempt on the workers (or nothing when the checkpoint is already complete). */
async function trainOnWorkers(o: DataParallelOptions, s: Stores, head: tf.LayersModel, start: TrainingState, data: AttemptData, totalSteps: number): Promise<DriveResult> {
  const history = (start.meta["history"] as EpochStats[] | undefined) ?? [];
  // `complete`: the attempt that stored it ended (early stopping ends it before totalSteps).
  if (start.cursor.step >= totalSteps || start.meta["complete"] === true) {
    o.log.info("data-parallel training already complete in the checkpoint", { phase: o.phase ?? "fine_tune", step: start.cursor.step });
    // The workers finished the attempt while no coordinator ran (it was restarted): the final membership trained it.
    return { final: start, history, allreduce: { seconds: 0, bytes: 0, workers: 0 }, trainedBy: (start.meta["members"] as string[] | undefined) ?? [] };
  }
  const a = attemptOf(o, newAttemptId(), data.trainSamples);
  await publishAttempt(o, s, a, head, start, data, totalSteps);
  const r = await new DataParallelDriver({
    job: o.job, log: o.log, metrics: o.metrics, state: s.state, registry: s.registry, os: s.os, attempt: a, start, totalSteps, workers: o.workers,
    readyTimeoutMs: o.readyTimeoutMs ?? DATA_PARALLEL_DEFAULTS.readyTimeoutMs, out: o.out, onBatchProgress: o.onBatchProgress, onEpochEnd: o.onEpochEnd, signal: o.signal,
  }).run();
  await s.state.delete(TRAINING_KEYS.spec).catch(() => undefined);
  return { ...r, history: r.history.length ? r.history : history };
}

/** What {@link trainDataParallel} leaves besides the trained weights (in the model it was given). */
export interface DataParallelRun {
  history: EpochStats[];
  /** Steps of the attempt (the final state's cursor). */
  steps: number;
  /** Distinct workers that were members of the attempt at some step (a checkpoint already complete: its final membership). */
  workers: number;
}

/**
 * Trains `model` (the coordinator's copy of the trainable part; `head` is the part of it the replicas
 * receive as a model) data-parallel on the job's workers: start state (a matching checkpoint, or
 * the model as it is), attempt, supervision; the final weights are restored into `model`.
 */
export async function trainDataParallel(model: tf.LayersModel, head: tf.LayersModel, data: AttemptData, o: DataParallelOptions): Promise<DataParallelRun> {
  const stores = await openStores(o.nc, o.job);
  const totalSteps = epochBatches(data.trainSamples, o.batchSize, o.seed, 0).length * o.epochs;
  const optimizer = tf.train.adam(o.learningRate);
  try {
    const start = await startState(o, stores.os, model, optimizer, fingerprint(o, data.trainSamples), totalSteps);
    const { final, history, allreduce, trainedBy } = await trainOnWorkers(o, stores, head, start, data, totalSteps);
    await restoreState(model, optimizer, { ...final, optimizer: [] });
    if (o.out) o.log.info("final checkpoint written", { file: await writeStateFile(o.out, TRAINING_OBJECTS.fileOf(o.phase ?? "fine_tune", "final"), final) });
    o.log.info("data-parallel training done", { phase: o.phase ?? "fine_tune", steps: final.cursor.step, workers: trainedBy.length, allreduce_seconds_per_worker: Number(allreduce.seconds.toFixed(3)), allreduce_bytes_per_worker: allreduce.bytes });
    return { history, steps: final.cursor.step, workers: trainedBy.length };
  } finally {
    optimizer.dispose();
  }
}

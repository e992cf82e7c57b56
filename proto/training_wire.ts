/**
 * The wire contract of data-parallel training between the coordinator and the replicas, beside
 * extraction_wire.ts: the keys of the job's state KV the training role uses, the training spec
 * (JobSpec.training, a typed TrainingAttempt with one set of defaults), the membership plans and
 * boundary decisions, the TrainingReport a replica puts there (protobuf messages, checked on read),
 * how a global batch is cut among members, and the two blobs every replica fetches from the
 * checkpoints object store (the training rows and the trained head).
 */
import * as tf from "@tensorflow/tfjs";
import { type Augmentation, decode, encode, makeHeader, type JobSpec, type TrainingAttempt, type TrainingControlsMessage } from "./codec.js";
import type { AugmentOptions, FillMode } from "../core/datasets/augment.js";
import { packArrays, unpackArrays } from "../core/training/checkpoints.js";
import { DATA_PARALLEL_DEFAULTS } from "../core/training/data_parallel_settings.js";
import { sliceRanges } from "./tensor_codec.js";
import type { ArrayData, EpochStats, TrainingControls } from "../core/training/train_loop.js";
import type { LrSchedule, Monitor } from "../core/runtime/config.js";

export type { TrainingAttempt };

/**
 * The settings of an attempt that may be left out; they take DATA_PARALLEL_DEFAULTS (and fp32 on the
 * wire), phase `fine_tune` and no images (cached activations).
 */
type Tunable = "wireDtype" | "bucketBytes" | "checksumEvery" | "checkpointEvery" | "stepTimeoutMs" | "phase" | "images" | "features";
export type TrainingAttemptInput = Omit<TrainingAttempt, Tunable | "controls"> & Partial<Pick<TrainingAttempt, Tunable>> & {
  /** The training controls the replicas apply (core TrainingControls; left-out fields take train_loop's defaults). Absent: none. */
  controls?: TrainingControls | null;
};

/**
 * `a` with every left-out setting at its default (the only place training defaults are applied); the
 * controls' defaults are train_loop's (monitor val_loss, constant rate, plateau patience 2 and factor 0.2).
 */
export function completeAttempt(a: TrainingAttemptInput): TrainingAttempt {
  const d = DATA_PARALLEL_DEFAULTS;
  return {
    ...a, wireDtype: a.wireDtype ?? "fp32", bucketBytes: a.bucketBytes ?? d.bucketBytes, checksumEvery: a.checksumEvery ?? d.checksumEvery,
    checkpointEvery: a.checkpointEvery ?? d.checkpointEvery, stepTimeoutMs: a.stepTimeoutMs ?? d.stepTimeoutMs, phase: a.phase || "fine_tune", images: a.images ?? null,
    features: a.features ?? null, controls: a.controls ? toControlsMessage(a.controls) : null,
  };
}

/** Training controls on the wire, every field set. */
export function toControlsMessage(c: TrainingControls): TrainingControlsMessage {
  return {
    earlyStoppingPatience: c.earlyStoppingPatience ?? 0, restoreBestWeights: c.restoreBestWeights ?? false, monitor: c.monitor ?? "val_loss",
    lrSchedule: c.lrSchedule ?? "constant", lrPatience: c.lrPatience ?? 2, lrFactor: c.lrFactor ?? 0.2,
    classWeights: c.loss?.classWeights ? Array.from(c.loss.classWeights) : [], labelSmoothing: c.loss?.labelSmoothing ?? 0,
  };
}

/** The controls an attempt's replicas pass to fit() (an attempt without any, from an older coordinator: none, i.e. plain training). */
export function controlsOf(a: Pick<TrainingAttempt, "controls">): TrainingControls {
  const c = a.controls;
  if (!c) return {};
  return {
    earlyStoppingPatience: c.earlyStoppingPatience, restoreBestWeights: c.restoreBestWeights, monitor: (c.monitor || "val_loss") as Monitor,
    lrSchedule: (c.lrSchedule || "constant") as LrSchedule, lrPatience: c.lrPatience || 2, lrFactor: c.lrFactor || 0.2,
    loss: { ...(c.classWeights.length ? { classWeights: Float32Array.from(c.classWeights) } : {}), labelSmoothing: c.labelSmoothing },
  };
}

/** The phases an attempt trains. */
export const TRAINING_PHASES = ["head", "fine_tune"] as const;
export type TrainingPhase = (typeof TRAINING_PHASES)[number];

/** The phase of an attempt (an older coordinator's attempt, without one, is fine-tuning). */
export function attemptPhase(a: Pick<TrainingAttempt, "phase">): TrainingPhase {
  return a.phase === "head" ? "head" : "fine_tune";
}

/** Augmentation on the wire (null = none). */
export function toAugmentation(o: AugmentOptions | null): Augmentation | null {
  return o ? { flip: o.flip, rotation: o.rotation, zoom: o.zoom, translation: o.translation, fillMode: o.fillMode, fillValue: o.fillValue } : null;
}

/** An attempt's augmentation as the image batches take it (null = none). */
export function fromAugmentation(a: Augmentation | null | undefined): AugmentOptions | null {
  return a ? { flip: a.flip, rotation: a.rotation, zoom: a.zoom, translation: a.translation, fillMode: a.fillMode as FillMode, fillValue: a.fillValue } : null;
}

/**
 * Name of the error a replica fails with when it cannot open the attempt's images (a data set path
 * missing on its machine): the coordinator leaves that worker out and goes on with the others.
 */
export const DATA_UNAVAILABLE = "DataUnavailableError";

/** Whether `r` is a replica that could not open the attempt's data (it never joins; the others go on). */
export function cannotJoin(r: Pick<TrainingReport, "state" | "error">): boolean {
  return r.state === "failed" && (r.error ?? "").startsWith(`${DATA_UNAVAILABLE}:`);
}

/** Sender id of the coordinator of attempt `attempt`: a replica takes plans only from its own attempt's coordinator. */
export function coordinatorSender(attempt: string): string {
  return `coordinator-${attempt}`;
}

/** The training spec put under TRAINING_KEYS.spec: a JobSpec with only `header` and `training` set. */
export function encodeTrainingSpec(job: string, a: TrainingAttempt): Uint8Array {
  return encode("JobSpec", { header: makeHeader(job, coordinatorSender(a.attempt)), training: a });
}

/** The attempt of a decoded JobSpec, or undefined when the spec is not a training spec. */
export function trainingAttemptOf(spec: JobSpec): TrainingAttempt | undefined {
  return spec.training ?? undefined;
}

/** A membership the coordinator plans: members in order; `joining` (a subset) come in at the next boundary. */
export interface MembershipPlan {
  epoch: number;
  members: readonly string[];
  joining: readonly string[];
}

/**
 * StepPlan of `plan` (header.epoch = membership epoch, header.step / trainEpoch / batchIndex = the
 * attempt's start cursor). Sample ranges are those of a full global batch; a short last batch is cut
 * the same way by memberSlice.
 */
export function encodeMembershipPlan(job: string, a: TrainingAttempt, plan: MembershipPlan, start: { epoch: number; batch: number; step: number }): Uint8Array {
  const ranges = sliceRanges(a.globalBatch, plan.members.length);
  return encode("StepPlan", {
    header: makeHeader(job, coordinatorSender(a.attempt), plan.epoch, start.step), trainEpoch: start.epoch, batchIndex: start.batch,
    members: plan.members.map((w, i) => ({ worker: w, sampleOffset: ranges[i]!.offset, sampleCount: ranges[i]!.length, sliceOffset: 0, sliceLength: 0 })),
    globalBatch: a.globalBatch, learningRate: a.learningRate, totalLength: 0, dtype: a.wireDtype, joining: [...plan.joining],
  });
}

/** The plan in StepPlan bytes, or undefined for another attempt's plan. Throws DecodeError for bytes that do not decode. */
export function decodeMembershipPlan(job: string, attempt: string, bytes: Uint8Array): MembershipPlan | undefined {
  const p = decode("StepPlan", bytes, { job, self: "worker", peer: "coordinator" });
  if (p.header.sender !== coordinatorSender(attempt)) return undefined;
  return { epoch: p.header.epoch, members: p.members.map((m) => m.worker), joining: p.joining };
}

/** Member 0's decision at boundary `step`: membership epoch `epoch` from that step on (Control EPOCH_BOUNDARY). */
export interface BoundaryDecision {
  step: number;
  epoch: number;
}

export function encodeBoundaryDecision(job: string, self: string, attempt: string, d: BoundaryDecision): Uint8Array {
  return encode("Control", { header: makeHeader(job, self, d.epoch, d.step), kind: "epoch_boundary", reason: attempt, phase: "fine_tune" });
}

/** The decision in Control bytes, or undefined for another attempt's or another kind. Throws DecodeError for bytes that do not decode. */
export function decodeBoundaryDecision(job: string, attempt: string, bytes: Uint8Array, self: "worker" | "coordinator"): BoundaryDecision | undefined {
  const c = decode("Control", bytes, { job, self, peer: "worker" });
  if (c.kind !== "epoch_boundary" || c.reason !== attempt) return undefined;
  return { step: c.header.step, epoch: c.header.epoch };
}

/** A replica's weights digest at a step (WeightsChecksum on the job's weights subject). */
export interface ReplicaDigest {
  worker: string;
  step: number;
  checksum: number;
  sum: number;
}

export function encodeWeightsChecksum(job: string, epoch: number, d: ReplicaDigest & { parameterCount: number }): Uint8Array {
  return encode("WeightsChecksum", { header: makeHeader(job, d.worker, epoch, d.step), worker: d.worker, checksum: d.checksum, parameterCount: d.parameterCount, sum: d.sum });
}

/** Throws DecodeError for bytes that are not a WeightsChecksum of `job`. */
export function decodeWeightsChecksum(job: string, bytes: Uint8Array): ReplicaDigest {
  const w = decode("WeightsChecksum", bytes, { job, self: "worker", peer: "worker" });
  return { worker: w.worker, step: w.header.step, checksum: w.checksum, sum: w.sum };
}

/** Keys of the training role in the job's state KV. */
export const TRAINING_KEYS = {
  spec: "ft.spec",
  /** StepPlan: the membership (coordinator). */
  members: "ft.plan.members",
  /** Control EPOCH_BOUNDARY: member 0's decision at a training-epoch boundary. */
  boundary: "ft.plan.boundary",
  /** Both, watched as one ordered stream by every replica. */
  plan: "ft.plan.>",
  report: (worker: string) => `ft.report.${worker}`,
  reports: "ft.report.>",
} as const;

/** Object names of the training role in the job's checkpoints object store. */
export const TRAINING_OBJECTS = {
  /** The state the replicas start from (head weights, fresh optimizer, or a resumed checkpoint). */
  start: (attempt: string) => `start-${attempt}`,
  /** Training rows (cached activations) of the attempt. */
  data: (attempt: string, split: "train" | "val") => `data-${attempt}-${split}`,
  /** The trained head model (topology + weights). */
  head: (attempt: string) => `head-${attempt}`,
  /** The latest periodic checkpoint of the job's fine-tuning, whatever the attempt (what a restarted coordinator resumes). */
  latest: "latest",
  /**
   * The latest checkpoint of a phase, whatever the attempt: {@link latest} for fine-tuning, `latest-head`
   * for the head phase, so that a restarted coordinator that redoes the (complete) head phase does not
   * overwrite fine-tuning's progress.
   */
  latestOf: (phase: "head" | "fine_tune") => (phase === "head" ? "latest-head" : "latest"),
  /** The file name (under <out>/checkpoints/) of a phase's `latest` or `final` checkpoint: `head-` before the head phase's. */
  fileOf: (phase: "head" | "fine_tune", which: "latest" | "final") => (phase === "head" ? `head-${which}` : which),
  /**
   * Block k of a split of a head attempt's cached features (TrainingAttempt.features): named by the
   * cache entry and the block size, not the attempt, so a restarted coordinator's new attempt finds
   * the blocks already stored.
   */
  rowBlock: (entry: string, blockRows: number, split: "train" | "val", k: number) => `rows-${entry}-${blockRows}-${split}-${k}`,
  /** The phase's end state. */
  final: (attempt: string) => `final-${attempt}`,
  /** Member 0's state at the boundary where the join of membership epoch `epoch` applies (what joiners start from). */
  join: (attempt: string, epoch: number) => `join-${attempt}-${epoch}`,
} as const;

/** What a replica reports in the state KV (a TrainingReport message; the latest per worker). */
export interface TrainingReport {
  attempt: string;
  worker: string;
  at: number;
  state: "loading" | "ready" | "waiting" | "training" | "checkpoint" | "peers_lost" | "done" | "failed" | "evicted";
  step?: number;
  epoch?: number;
  lost?: string[];
  cursor?: { epoch: number; batch: number; step: number };
  history?: EpochStats[];
  error?: string;
  members?: string[];
  allreduce_seconds?: number;
  allreduce_bytes?: number;
  /** Steps since the previous report: compute and averaging (wait) seconds each (coordinator/straggler_detector.ts). */
  step_timings?: { step: number; compute_seconds: number; wait_seconds: number }[];
}

export function encodeReport(job: string, r: TrainingReport): Uint8Array {
  return encode("TrainingReport", {
    header: makeHeader(job, r.worker, r.epoch ?? 0, r.step ?? 0), attempt: r.attempt, worker: r.worker, state: r.state, atUnixMs: r.at,
    lost: r.lost ?? [], cursor: r.cursor ? { trainEpoch: r.cursor.epoch, batchIndex: r.cursor.batch, step: r.cursor.step } : null,
    history: (r.history ?? []).map((e) => ({
      epoch: e.epoch, loss: e.loss, accuracy: e.accuracy, hasValidation: e.val_loss !== undefined, valLoss: e.val_loss ?? 0, valAccuracy: e.val_accuracy ?? 0,
      seconds: e.seconds, samplesPerSecond: e.samples_per_second, lr: e.lr ?? 0, best: e.best === true,
    })),
    error: r.error ?? "", members: r.members ?? [], allreduceSeconds: r.allreduce_seconds ?? 0, allreduceBytes: r.allreduce_bytes ?? 0,
    stepTimings: (r.step_timings ?? []).map((t) => ({ step: t.step, computeSeconds: t.compute_seconds, waitSeconds: t.wait_seconds })),
  });
}

/** Throws DecodeError for bytes that are not a TrainingReport of `job`. */
export function decodeReport(job: string, bytes: Uint8Array): TrainingReport {
  const m = decode("TrainingReport", bytes, { job, self: "coordinator", peer: "worker" });
  return {
    attempt: m.attempt, worker: m.worker, at: m.atUnixMs, state: m.state, step: m.header.step, epoch: m.header.epoch,
    ...(m.lost.length ? { lost: m.lost } : {}),
    ...(m.cursor ? { cursor: { epoch: m.cursor.trainEpoch, batch: m.cursor.batchIndex, step: m.cursor.step } } : {}),
    ...(m.history.length ? {
      history: m.history.map((e) => ({
        epoch: e.epoch, loss: e.loss, accuracy: e.accuracy, ...(e.hasValidation ? { val_loss: e.valLoss, val_accuracy: e.valAccuracy } : {}),
        seconds: e.seconds, samples_per_second: e.samplesPerSecond, ...(e.lr ? { lr: e.lr } : {}), ...(e.best ? { best: true as const } : {}),
      })),
    } : {}),
    ...(m.error ? { error: m.error } : {}),
    ...(m.members.length ? { members: m.members } : {}),
    allreduce_seconds: m.allreduceSeconds, allreduce_bytes: m.allreduceBytes,
    ...(m.stepTimings?.length ? { step_timings: m.stepTimings.map((t) => ({ step: t.step, compute_seconds: t.computeSeconds, wait_seconds: t.waitSeconds })) } : {}),
  };
}

/** Member `self`'s contiguous part of a global batch (sample order kept). */
export function memberSlice(indices: Int32Array, members: readonly string[], self: string): Int32Array {
  const r = sliceRanges(indices.length, members.length)[members.indexOf(self)]!;
  return indices.subarray(r.offset, r.offset + r.length);
}

/** The train samples of an image-fed attempt: ids (the data set's stable ids) and labels, in the coordinator's row order. */
export interface SampleList {
  ids: string[];
  labels: Int32Array;
}

export function encodeSampleList(s: SampleList): Uint8Array {
  return packArrays({ ids: s.ids, labels: Array.from(s.labels) }, []);
}

export function decodeSampleList(bytes: Uint8Array): SampleList {
  const { header } = unpackArrays(bytes);
  const ids = header["ids"] as string[], labels = header["labels"] as number[];
  if (!Array.isArray(ids) || !Array.isArray(labels) || ids.length !== labels.length) throw new Error("the attempt's sample list is malformed (ids and labels differ in length)");
  return { ids, labels: Int32Array.from(labels) };
}

export function encodeDataObject(d: ArrayData): Uint8Array {
  return packArrays({ sampleShape: d.sampleShape, y: Array.from(d.y) }, [{ shape: [d.x.length], data: d.x }]);
}

export function decodeDataObject(bytes: Uint8Array): ArrayData {
  const { header, arrays } = unpackArrays(bytes);
  return { x: arrays[0]!.data, sampleShape: header["sampleShape"] as number[], y: Int32Array.from(header["y"] as number[]) };
}

/** The head as one blob: topology and weight specs as JSON, the float32 weight data. */
export async function encodeHeadObject(head: tf.LayersModel): Promise<Uint8Array> {
  let art: tf.io.ModelArtifacts | undefined;
  await head.save(tf.io.withSaveHandler(async (a) => {
    art = a;
    return { modelArtifactsInfo: { dateSaved: new Date(), modelTopologyType: "JSON" } };
  }));
  const wd = art!.weightData!;
  const buf = Array.isArray(wd) ? tf.io.concatenateArrayBuffers(wd) : wd;
  for (const s of art!.weightSpecs ?? []) if (s.dtype !== "float32") throw new Error(`head weight ${s.name} is ${s.dtype}; only float32 heads are sent`);
  return packArrays({ topology: art!.modelTopology, weightSpecs: art!.weightSpecs }, [{ shape: [buf.byteLength / 4], data: new Float32Array(buf) }]);
}

export async function decodeHeadObject(bytes: Uint8Array): Promise<tf.LayersModel> {
  const { header, arrays } = unpackArrays(bytes);
  const data = arrays[0]!.data;
  return tf.loadLayersModel(tf.io.fromMemory({
    modelTopology: header["topology"] as object, weightSpecs: header["weightSpecs"] as tf.io.WeightsManifestEntry[],
    weightData: data.buffer.slice(data.byteOffset, data.byteOffset + data.byteLength),
  }));
}

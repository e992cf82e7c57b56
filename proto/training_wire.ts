/**
 * The wire contract of data-parallel training between the coordinator and the replicas, beside
 * extraction_wire.ts: the keys of the job's state KV the training role uses, the TrainingReport a
 * replica puts there (a protobuf message, checked on read), how a global batch is cut among members,
 * and the two blobs every replica fetches from the checkpoints object store (the training rows and
 * the trained head).
 */
import * as tf from "@tensorflow/tfjs";
import { decode, encode, makeHeader } from "./codec.js";
import { packArrays, unpackArrays } from "../core/training/checkpoints.js";
import { sliceRanges } from "./tensor_codec.js";
import type { ArrayData, EpochStats } from "../core/training/train_loop.js";

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
      seconds: e.seconds, samplesPerSecond: e.samples_per_second,
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
        seconds: e.seconds, samples_per_second: e.samplesPerSecond,
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

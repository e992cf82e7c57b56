/**
 * Data-parallel training on cached rows, streamed: method 1's head on the cached features (when the
 * workers are estimated to be faster: coordinator/head_placement.ts), and fine-tuning on the cached
 * activations at the cut. Neither this process nor a worker holds a split: both read blocks.
 *
 * The coordinator cuts the train and val splits of the cache entry into the blocks its own stream
 * reads (core/training/feature_batches.ts streamLayout) and puts each block (rows + labels) into the
 * job's checkpoints store once, named by the entry (TRAINING_OBJECTS.rowBlock): a restarted
 * coordinator finds them there. The attempt (TrainingAttempt.features) names the blocks; every
 * replica walks the one-process path's seeded block order and shuffle windows, so global batch b is
 * the same rows as in this process, and gathers only its part of each batch from the blocks of the
 * current window (fetched together when the window starts; two windows held at most). The rest is
 * the data-parallel attempt of coordinator/data_parallel.ts: same initial weights, averaged
 * gradients, membership changes, checkpoints, training controls. Test runs here, streamed from the
 * cache; the blocks are purged when the phase ends.
 *
 * Cost: each replica reads the whole train split every epoch (its part of every batch is spread
 * over the window) -- N reads of the rows per epoch through NATS against N times the compute.
 */
import type * as tf from "@tensorflow/tfjs";
import type { JetStreamManager, NatsConnection, ObjectStore } from "nats";
import { fineTuneModel, type SplitBase } from "../core/models/model_split.js";
import type { FineTuneResult } from "./fine_tuning.js";
import { type FeatureSet, rowsOf } from "../core/datasets/feature_store.js";
import { buildHead } from "../core/models/head.js";
import { putBytes } from "../core/training/checkpoints.js";
import { resultEpoch } from "../core/training/train_loop.js";
import { evaluateSplit, readBlock, splitLabels, splitRows, streamLayout, type StreamLayout, type StreamOptions } from "../core/training/feature_batches.js";
import type { Logger } from "../core/runtime/log.js";
import { jobNames } from "../proto/subjects.js";
import { purgeObject } from "../proto/extraction_wire.js";
import { encodeDataObject, TRAINING_OBJECTS } from "../proto/training_wire.js";
import type { FeatureInput } from "../proto/codec.js";
import type { FineTuneAttemptOptions, HeadOnWorkers } from "./augment_data_parallel.js";
import { trainDataParallel } from "./data_parallel.js";
import { confusionMatrix, type HeadTrainingOptions } from "./head_training.js";
import type { PhaseProgress } from "./phases/progress.js";
import type { JobContext } from "./phases/setup.js";

/** Blocks put or deleted at once: enough to hide a round trip each, few enough for the server's pending acks. */
const BLOCK_CONCURRENCY = 8;

/** The attempt's view of the entry: its block objects' names, the stream layout and the rows' shape (the head's flat features, or fine-tuning's [h, w, c]). */
export function featureInputOf(set: FeatureSet, layout: StreamLayout, sampleShape = [set.meta.featureDim]): FeatureInput {
  return {
    entry: set.meta.key.slice(0, 32), trainRows: splitRows(set, "train").length, valRows: splitRows(set, "val").length,
    blockRows: layout.blockRows, windowBlocks: layout.windowBlocks, sampleShape,
  };
}

/** The names of every block of `f` (train, then val). */
function blockNames(f: FeatureInput): { split: "train" | "val"; k: number; name: string }[] {
  const out: { split: "train" | "val"; k: number; name: string }[] = [];
  for (const [split, rows] of [["train", f.trainRows], ["val", f.valRows]] as const)
    for (let k = 0; k * f.blockRows < rows; k++) out.push({ split, k, name: TRAINING_OBJECTS.rowBlock(f.entry, f.blockRows, split, k) });
  return out;
}

async function eachLimited<T>(items: readonly T[], limit: number, fn: (t: T) => Promise<void>): Promise<void> {
  let next = 0;
  const run = async (): Promise<void> => {
    while (next < items.length) await fn(items[next++]);
  };
  await Promise.all(Array.from({ length: Math.min(limit, items.length) }, run));
}

/** Puts every block of the entry's train and val splits that the store does not hold yet; returns the bytes put. */
export async function putFeatureBlocks(os: ObjectStore, set: FeatureSet, f: FeatureInput, log: Logger): Promise<number> {
  const held = new Set<string>();
  for (const info of await os.list()) held.add(info.name);
  const reader = rowsOf(set);
  const rows = { train: splitRows(set, "train"), val: splitRows(set, "val") };
  const todo = blockNames(f).filter((b) => !held.has(b.name));
  const t0 = performance.now();
  let bytes = 0;
  await eachLimited(todo, BLOCK_CONCURRENCY, async (b) => {
    const block = encodeDataObject(await readBlock(set, reader, rows[b.split], f.blockRows, b.k, f.sampleShape));
    await putBytes(os, b.name, block);
    bytes += block.length;
  });
  log.info("feature blocks stored for the workers", { blocks: todo.length, already_stored: blockNames(f).length - todo.length, mib: Math.round(bytes / 2 ** 20), seconds: Number(((performance.now() - t0) / 1000).toFixed(2)) });
  return bytes;
}

/**
 * Deletes the entry's blocks (the phase is over: a later head phase puts them again): purged, metadata
 * and chunks, not ObjectStore.delete()'s markers, which would keep the store's file blocks alive
 * (proto/extraction_wire.ts purgeObject).
 */
export async function deleteFeatureBlocks(jsm: JetStreamManager, os: ObjectStore, bucket: string, f: FeatureInput, log: Logger): Promise<void> {
  await eachLimited(blockNames(f), BLOCK_CONCURRENCY, async (b) => {
    await purgeObject(jsm, os, bucket, b.name).catch((err: unknown) => log.warn("could not delete a feature block", { name: b.name, error: err as Error }));
  });
}

/** Puts the entry's blocks, runs `train`, and purges the blocks however it ends. */
async function withBlocks<T>(nc: NatsConnection, job: string, set: FeatureSet, f: FeatureInput, log: Logger, train: () => Promise<T>): Promise<T> {
  const bucket = jobNames(job).checkpointsBucket;
  const os = await nc.jetstream().views.os(bucket);
  await putFeatureBlocks(os, set, f, log);
  try {
    return await train();
  } finally {
    await deleteFeatureBlocks(await nc.jetstreamManager(), os, bucket, f, log);
  }
}

/**
 * Fine-tunes split.top + head data-parallel over the job's workers on the cached activations at the
 * cut (`set`, rows [h, w, c]), streamed; the trained weights end up in them.
 */
export async function fineTuneActivationsOnWorkers(split: SplitBase, head: tf.LayersModel, set: FeatureSet, o: FineTuneAttemptOptions & { stream?: Omit<StreamOptions, "seed"> }): Promise<FineTuneResult & { workers: number }> {
  const t0 = performance.now();
  const shape = set.meta.featureShape;
  const f = featureInputOf(set, streamLayout(set.meta.featureDim, o.stream), shape);
  const model = fineTuneModel(split, head, o.pooling, false);
  const valBefore = await evaluateSplit(model, set, "val", o.numClasses, shape);
  o.log.info("fine-tuning on the workers", { rows: f.trainRows, val_rows: f.valRows, cut_shape: shape, block_rows: f.blockRows, window_blocks: f.windowBlocks, workers: o.workers });
  const { history, steps, workers } = await withBlocks(o.nc, o.job, set, f, o.log, () => trainDataParallel(model, head, { trainSamples: f.trainRows }, { ...o, phase: "fine_tune", features: f }));
  const test = await evaluateSplit(model, set, "test", o.numClasses, shape);
  const testY = splitLabels(set, "test");
  o.log.info("data-parallel fine-tuning done", { steps, val_accuracy: Number((resultEpoch(history)?.val_accuracy ?? NaN).toFixed(4)) });
  return {
    model, history, workers,
    test: { loss: test.loss, accuracy: test.accuracy, samples: testY.length, confusion: confusionMatrix(testY, test.predictions, o.numClasses) },
    val_loss_before: valBefore.loss, val_accuracy: resultEpoch(history)?.val_accuracy ?? NaN, seconds: (performance.now() - t0) / 1000,
  };
}

/** Trains a fresh head data-parallel over the workers on the cached features; test here, streamed. */
export async function trainFeatureHeadOnWorkers(ctx: JobContext, nc: NatsConnection, features: FeatureSet, o: HeadTrainingOptions, workers: number, progress: PhaseProgress): Promise<HeadOnWorkers> {
  const t0 = performance.now();
  const { opts, log } = ctx;
  const numClasses = features.meta.classes.length;
  const f = featureInputOf(features, streamLayout(features.meta.featureDim, o.streamOptions));
  const head = buildHead({ featureDim: features.meta.featureDim, numClasses, units: o.units, dropout: o.dropout, seed: o.seed });
  log.info("head phase on the workers", { rows: f.trainRows, val_rows: f.valRows, feature_dim: features.meta.featureDim, block_rows: f.blockRows, window_blocks: f.windowBlocks, workers });
  return withBlocks(nc, opts.job, features, f, log, async () => {
    const run = await trainDataParallel(head, head, { trainSamples: f.trainRows }, {
      nc, job: opts.job, log, metrics: ctx.metrics, model: opts.model, inputSize: opts.inputSize, featureLayer: opts.featureLayer, pooling: opts.pooling,
      fineTuneLayers: "0", learningRate: o.learningRate, seed: o.seed, batchSize: o.batchSize, epochs: o.epochs, numClasses, wireDtype: opts.wireDtype, workers, out: opts.out,
      checksumEvery: opts.checksumEvery, checkpointEvery: opts.checkpointEvery, stepTimeoutMs: opts.stepTimeoutMs, bucketBytes: opts.bucketBytes, phase: "head", features: f,
      controls: o.controls, onBatchProgress: progress.moveTo, onEpochEnd: progress.onEpochEnd,
    });
    const t = await evaluateSplit(head, features, "test", numClasses);
    const testY = splitLabels(features, "test");
    return {
      head, history: run.history, workers: run.workers, seconds: (performance.now() - t0) / 1000, val_accuracy: resultEpoch(run.history)?.val_accuracy ?? NaN,
      test: { loss: t.loss, accuracy: t.accuracy, samples: testY.length, confusion: confusionMatrix(testY, t.predictions, numClasses) },
    };
  });
}

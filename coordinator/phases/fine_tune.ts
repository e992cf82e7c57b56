/**
 * The fine-tuning phase: split the base, get the data (cached activations at the cut, extracted by
 * the cluster like the features; or images when augmenting), train top + head -- data-parallel on
 * the workers when the cluster offers it (activations, or images through the frozen bottom on each
 * worker), else in this process.
 * Returns the trained top for the export.
 */
import type * as tf from "@tensorflow/tfjs";
import type { JobOptions } from "../../core/runtime/config.js";
import type { FeatureSet } from "../../core/datasets/feature_store.js";
import { type FeatureExtractor, isOnnxSource } from "../../core/models/feature_model.js";
import type { PretrainedSource } from "../../core/models/model_zoo.js";
import { ConfigError } from "../../core/runtime/errors.js";
import { augmentOf } from "../../core/datasets/augment.js";
import { buildSplit, type SplitBase } from "../../core/models/model_split.js";
import { registerWasmTrainingKernels } from "../../core/models/wasm_kernels.js";
import { openImages, samplesOf } from "../../core/training/image_batches.js";
import { splitRows } from "../../core/training/feature_batches.js";
import { activationExtractor, fineTune, type FineTuneData, type FineTuneResult } from "../fine_tuning.js";
import { fineTuneActivationsOnWorkers } from "../cached_rows_on_workers.js";
import { type FineTuneAttemptOptions, fineTuneImagesOnWorkers } from "../augment_data_parallel.js";
import type { SampleRef } from "../../core/datasets/types.js";
import type { NatsConnection } from "nats";
import type { JobCluster, JobSummary } from "../job.js";
import { extractPhase } from "./extract.js";
import { type PhaseProgress, phaseProgress, round } from "./progress.js";
import type { JobContext } from "./setup.js";

export interface FineTuned {
  result: FineTuneResult;
  info: NonNullable<JobSummary["fine_tune"]>;
  /** The trained top: its weights go back into the full base for the export. */
  top: tf.LayersModel;
  /** Processes that trained it: 1 = this process, else the workers that were members data-parallel. */
  workers: number;
  dispose(): void;
}

/** Epochs of fine-tuning asked for (`--fine-tune-epochs`, else half the head's). */
export function fineTuneEpochsOf(opts: JobOptions): number {
  return opts.fineTuneEpochs > 0 ? opts.fineTuneEpochs : Math.max(1, Math.ceil(opts.epochs / 2));
}

/** The job's base when it can be fine-tuned: a TF.js layers model whose head-only classifier was built. */
export function trainableBase(ctx: JobContext, classifier: tf.LayersModel | undefined): PretrainedSource {
  if (!classifier || isOnnxSource(ctx.source)) throw new ConfigError(`fine-tuning needs a TF.js layers model; ${ctx.source.name} is an ONNX graph (inference only).`);
  return ctx.source;
}

/** Fine-tunes the top of `base` (see {@link trainableBase}) with the trained `head` (in place). */
export async function fineTunePhase(ctx: JobContext, cluster: JobCluster, base: PretrainedSource, features: FeatureSet, head: tf.LayersModel): Promise<FineTuned> {
  const { opts, log } = ctx;
  if (ctx.backend.tfBackend === "wasm") {
    const added = registerWasmTrainingKernels();
    if (added.length) log.info("wasm training kernels registered", { kernels: added });
  }
  const split = await buildSplit(base, { inputSize: opts.inputSize, featureLayer: opts.featureLayer, unfreeze: opts.fineTuneLayers });
  const augment = opts.method === "augment";
  log.info("fine-tuning", { unfreeze: opts.fineTuneLayers, cut_layer: split.plan.cutLayer, first_unfrozen: split.plan.firstUnfrozen, trainable_layers: split.plan.trainableLayers.length, cut_shape: split.cutShape, augmentation: augment, epochs: fineTuneEpochsOf(opts), learning_rate: opts.fineTuneLearningRate });
  const info: FineTuned["info"] = { unfreeze: opts.fineTuneLayers, cut_layer: split.plan.cutLayer, first_unfrozen: split.plan.firstUnfrozen, trainable_layers: split.plan.trainableLayers, augmentation: augment };
  const d = augment ? await imageData(ctx, base, features, split, cluster.trainer !== undefined) : await activationSet(ctx, cluster, base, split, info);
  try {
    const { workers, ...result } = await train(ctx, cluster, split, head, d);
    ctx.metrics?.setEvaluation("fine_tune", "test", { loss: result.test.loss, accuracy: result.test.accuracy });
    log.info("fine-tuned", { test_accuracy: round(result.test.accuracy), test_loss: round(result.test.loss), val_accuracy: round(result.val_accuracy), val_loss_before: round(result.val_loss_before), seconds: round(result.seconds, 2) });
    return { result, info, top: split.top, workers, dispose: () => { split.bottom.dispose(); split.top.dispose(); } };
  } finally {
    d.frozen?.dispose();
  }
}

/** The data of fine-tuning and, with images, the frozen bottom that runs on the inference engine every step. */
interface FineTuneInput {
  data: FineTuneData;
  frozen?: FeatureExtractor;
  /** With images: the train samples in row order (what data-parallel replicas open). */
  trainSamples?: SampleRef[];
}

/** Cached activations at the cut, extracted through the cluster like the features. */
async function activationSet(ctx: JobContext, cluster: JobCluster, base: PretrainedSource, split: SplitBase, info: FineTuned["info"]): Promise<FineTuneInput> {
  const cut = await activationExtractor(base, ctx.opts.inputSize, split.plan.cutLayer, ctx.engine);
  const ex = await extractPhase(ctx, cluster, cut).finally(() => cut.dispose());
  info.activation_cache = { key: ex.key, cache_hit: ex.cacheHit, images: ex.images, seconds: round(ex.seconds, 3) };
  return { data: { kind: "activation_set", set: ex.features, stream: { windowBytes: ctx.opts.shuffleBufferMib * 2 ** 20 } } };
}

/**
 * Images of every split; only top + head train in tfjs, the frozen bottom runs on the inference engine.
 * When the workers train, they decode the train images themselves: here the train split is opened
 * without decoding it up front (a memory budget of 0 decodes per batch, and nothing asks for a batch).
 */
async function imageData(ctx: JobContext, base: PretrainedSource, features: FeatureSet, split: SplitBase, onWorkers: boolean): Promise<FineTuneInput> {
  const samples = (s: "train" | "val" | "test") => samplesOf(ctx.dataset, features.ids, features.splits, s);
  const open = (s: "train" | "val" | "test", budget?: number) => openImages(ctx.dataset, samples(s), ctx.opts.inputSize, budget);
  const data: FineTuneData = { kind: "images", train: await open("train", onWorkers ? 0 : undefined), val: await open("val"), test: await open("test") };
  return { data, frozen: await activationExtractor(base, ctx.opts.inputSize, split.plan.cutLayer, ctx.engine), trainSamples: samples("train") };
}

/** Data-parallel on the workers when the cluster has a trainer (see {@link onWorkers}); else here. */
async function train(ctx: JobContext, cluster: JobCluster, split: SplitBase, head: tf.LayersModel, input: FineTuneInput): Promise<FineTuneResult & { workers: number }> {
  const { opts, log, metrics } = ctx;
  const { data, frozen } = input;
  const epochs = fineTuneEpochsOf(opts);
  const trainCount = data.kind === "activation_set" ? splitRows(data.set, "train").length : data.kind === "activations" ? data.train.y.length : data.train.labels.length;
  const progress = phaseProgress("fine_tune", epochs, Math.ceil(trainCount / opts.batchSize), log, metrics);
  const numClasses = ctx.dataset.classes.length;
  // With a trainer, on the workers (activations or images): the replicas apply the training controls.
  const nc = cluster.trainer ? await cluster.trainer() : undefined;
  progress.begin();
  try {
    if (nc) return await trainOnWorkers(ctx, { nc, workers: cluster.workers, epochs, progress }, split, head, input);
    const local = await fineTune(split, head, data, {
      epochs, batchSize: opts.batchSize, learningRate: opts.fineTuneLearningRate, seed: opts.seed, numClasses,
      pooling: opts.pooling, preprocessing: ctx.extractor.preprocessing, augment: data.kind === "images" ? augmentOf(opts) : null, frozen,
      controls: ctx.controls, onBatchEnd: progress.onBatchEnd, onEpochEnd: progress.onEpochEnd,
    });
    return { ...local, workers: 1 };
  } finally {
    progress.finish();
  }
}

/** Fine-tuning on the workers: cached activations (coordinator/data_parallel.ts) or images (coordinator/augment_data_parallel.ts). */
async function trainOnWorkers(ctx: JobContext, w: { nc: NatsConnection; workers: number; epochs: number; progress: PhaseProgress }, split: SplitBase, head: tf.LayersModel, input: FineTuneInput): Promise<FineTuneResult & { workers: number }> {
  const { opts, log, metrics } = ctx;
  const o: FineTuneAttemptOptions = {
    nc: w.nc, job: opts.job, log, metrics, model: opts.model, inputSize: opts.inputSize, featureLayer: opts.featureLayer, pooling: opts.pooling,
    fineTuneLayers: opts.fineTuneLayers, learningRate: opts.fineTuneLearningRate, seed: opts.seed, batchSize: opts.batchSize, epochs: w.epochs,
    numClasses: ctx.dataset.classes.length, wireDtype: opts.wireDtype, workers: w.workers, out: opts.out,
    checksumEvery: opts.checksumEvery, checkpointEvery: opts.checkpointEvery, stepTimeoutMs: opts.stepTimeoutMs, bucketBytes: opts.bucketBytes,
    controls: ctx.controls, onBatchProgress: w.progress.moveTo, onEpochEnd: w.progress.onEpochEnd,
  };
  const { data, frozen, trainSamples } = input;
  if (data.kind === "activation_set") return fineTuneActivationsOnWorkers(split, head, data.set, { ...o, stream: data.stream });
  if (data.kind === "activations") throw new Error("fine-tuning on the workers streams the activation cache entry (activation_set)");
  return fineTuneImagesOnWorkers(ctx, split, head, { ...data, trainSamples: trainSamples!, frozen: frozen! }, o);
}

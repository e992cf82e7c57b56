/**
 * A whole job, phase by phase: backend, data set, pretrained base, feature extraction (cached),
 * head training (method 1 on cached features, or method 2: frozen base + head on augmented images),
 * optional fine-tuning of the base's top layers (coordinator/fine_tuning.ts), export. Writes the run folder of DESIGN.md: model/, history.json, summary.json,
 * report.html. Options are validated before this is called; nothing here asks the user anything.
 */
import { mkdir, writeFile } from "node:fs/promises";
import { createRequire } from "node:module";
import { join } from "node:path";
import { version as tfjsVersion } from "@tensorflow/tfjs";
import { type BackendInfo, selectBackend } from "../core/models/backend.js";
import { jobFileText, type JobOptions, reproducibleOptions } from "../core/runtime/config.js";
import { openDataset } from "../core/datasets/open.js";
import type { Dataset, SkippedInput } from "../core/datasets/types.js";
import { buildFeatureExtractor, calibrationImages, type FeatureExtractor, isOnnxSource, loadModelSource, resolveSourceChoices } from "../core/models/feature_model.js";
import { ConfigError, storageError } from "../core/runtime/errors.js";
import { cacheKey, FeatureCache } from "../core/datasets/feature_store.js";
import { type ClassifierMetadata, composeClassifier } from "../core/models/head.js";
import type { Logger } from "../core/runtime/log.js";
import type { CtrainMetrics } from "../core/runtime/metrics.js";
import { saveModel, saveOnnxClassifier } from "../core/models/model_io.js";
import type { PretrainedSource } from "../core/models/model_zoo.js";
import { type EngineInfo, type EngineOptions, threadsFor } from "../core/models/inference_engine.js";
import { drawsBars, EpochBars } from "../core/runtime/progress.js";
import { checkControlsForDataParallel, classWeightsFor, controlsOf, trainCounts } from "../core/training/training_controls.js";
import type { EpochStats } from "../core/training/train_loop.js";
import { LocalShardExecutor } from "../worker/local_executor.js";
import { type AugmentOptions, augmentOf } from "../core/datasets/augment.js";
import { buildSplit, copyWeightsByName } from "../core/models/model_split.js";
import { registerWasmTrainingKernels } from "../core/models/wasm_kernels.js";
import { openImages, samplesOf, trainHeadWithAugmentation } from "./augment_training.js";
import type { ShardExecutor } from "../core/datasets/shards.js";
import { runExtraction } from "./extraction.js";
import { activationData, activationExtractor, fineTune, type FineTuneData, type FineTuneResult } from "./fine_tuning.js";
import { confusionMatrix, type HeadTrainingOptions, type HeadTrainingResult, resultEpoch, splitData, trainHead } from "./head_training.js";
import { renderReport } from "./report.js";
import { runDataParallelFineTune } from "./data_parallel.js";

export interface PhaseSummary {
  /** Epochs run (fewer than asked when early stopping ended the phase). */
  epochs: number;
  epochs_asked: number;
  /** The epoch whose weights the phase ended with (restore-best-weights), when not the last. */
  best_epoch?: number;
  val_accuracy: number;
  test_accuracy: number;
  test_loss: number;
  seconds: number;
}

/** summary.json (DESIGN.md lists the fields other work relies on). */
export interface JobSummary {
  job: string;
  backend: string;
  /** The inference engine of the frozen forward passes in this process (workers log and export their own). */
  engine: EngineInfo;
  /** Worker processes that extracted or trained; 0 when none was started (a cache hit); 1 = in this process. */
  workers: number;
  model: string;
  input_size: number;
  feature_layer: string;
  pooling: string;
  /** The preprocessing the base was fed (`--preprocessing auto` resolved). */
  preprocessing: string;
  method: string;
  /** `--method augment` only: what was done to each training image. */
  augmentation?: AugmentOptions;
  data: string;
  classes: string[];
  samples: { train: number; val: number; test: number };
  extraction: { images: number; seconds: number; images_per_second: number; cache_hit: boolean; cache_key: string; shards: number; shards_resumed: number };
  /** Fine-tuning only: which layers trained, where the base was cut, and the activation cache. */
  fine_tune?: { unfreeze: string; cut_layer: string; first_unfrozen: string; trainable_layers: string[]; augmentation: boolean; activation_cache?: { key: string; cache_hit: boolean; images: number; seconds: number } };
  phases: { head: PhaseSummary; fine_tune?: PhaseSummary };
  skipped_inputs: SkippedInput[];
  /** Every option that shaped the result (flag names; `auto` choices resolved): job.yaml holds the same. */
  options: Record<string, string | number | boolean>;
  versions: { ctrain: string; node: string; tfjs: string };
  seconds: number;
  finished_at: string;
}

export interface JobDeps {
  log: Logger;
  metrics?: CtrainMetrics;
  /** Builds the shard executor (default: in-process). Called only when something must be extracted. */
  executor?: (ctx: { dataset: Dataset; extractor: FeatureExtractor; backend: BackendInfo }) => Promise<ShardExecutor>;
  /** Workers to report in the summary when an executor is given. */
  workers?: number;
  /**
   * Data-parallel fine-tuning over NATS workers (coordinator/data_parallel.ts): the job's connection
   * (the caller may start its cluster on demand) and the workers to wait for. Absent: fine-tune in
   * this process. Used for cached activations; augmentation fine-tunes in this process.
   */
  dataParallel?: () => Promise<{ nc: import("nats").NatsConnection; workers: number }>;
}

/** A file of the run folder; a full or read-only disk becomes a StorageError naming it. */
async function writeOut(path: string, data: string): Promise<void> {
  await writeFile(path, data).catch((err: unknown) => Promise.reject(storageError(err, path, Buffer.byteLength(data))));
}

/** Images per forward pass of in-process extraction. */
const EXTRACT_BATCH = 32;

/** One line on the engine of the frozen forward passes; a warning when auto did not get onnx. */
function logEngine(log: Logger, e: EngineInfo): void {
  if (e.fallback) log.warn("inference engine: onnx not used, frozen forward passes run on tfjs", { requested: e.requested, reason: e.fallback });
  else log.info("inference engine", { engine: e.name, version: e.version, threads: e.threads, provider: e.provider, precision: e.precision });
}

const CTRAIN_VERSION = (createRequire(import.meta.url)("../../package.json") as { version: string }).version;

const round = (x: number, d = 4): number => (Number.isFinite(x) ? Number(x.toFixed(d)) : x);

export async function runJob(opts: JobOptions, deps: JobDeps): Promise<JobSummary> {
  const t0 = performance.now();
  const { log, metrics } = deps;
  const fineTuning = opts.fineTuneLayers.trim() !== "0";
  if (fineTuning && deps.dataParallel && opts.method !== "augment") checkControlsForDataParallel(opts, deps.workers ?? opts.workers);
  const backend = await selectBackend(opts.backend);
  log.info("compute backend", { backend: backend.name, requested: backend.requested, passed_over: backend.fallbacks.map((f) => `${f.name}: ${f.reason}`) });
  metrics?.setBackend(backend.name);

  const dataset = await openDataset(opts.data, { seed: opts.seed, valSplit: opts.valSplit, testSplit: opts.testSplit, limit: opts.limit, maxPixels: opts.maxPixels });
  const counts = { train: 0, val: 0, test: 0 };
  for (const s of dataset.samples) counts[s.split]++;
  log.info("data set", { data: dataset.name, classes: dataset.classes.length, ...counts, skipped_at_listing: dataset.skipped.length });
  for (const w of dataset.warnings ?? []) log.warn("data set", { data: dataset.name, warning: w });

  const loaded = await loadModelSource(opts.model);
  const choices = resolveSourceChoices(loaded, opts);
  if (choices.overridden)
    log.warn(`--preprocessing ${choices.preprocessing} replaces ${loaded.name}'s own preprocessing (${choices.overridden.declared}, from its ${choices.overridden.origin === "builtin" ? "training recipe" : "metadata"}): features will not match what its weights were trained on`);
  const source = choices.source;
  const engine: EngineOptions = {
    engine: opts.engine, threads: threadsFor(opts.threads, 1), provider: opts.engineProvider, precision: opts.enginePrecision,
    ...(opts.enginePrecision === "int8" ? { calibration: calibrationImages(dataset, opts.inputSize) } : {}),
  };
  const extractor = await buildFeatureExtractor(source, { inputSize: opts.inputSize, featureLayer: choices.featureLayer, pooling: opts.pooling, ...engine });
  // An ONNX model's `auto` feature tensor is known once its graph is probed.
  opts = { ...opts, featureLayer: extractor.featureLayer, preprocessing: extractor.preprocessing };
  logEngine(log, extractor.engine);
  metrics?.setEngine(extractor.engine.name);
  log.info("feature extractor", { model: source.name, input_size: opts.inputSize, feature_layer: opts.featureLayer, pooling: opts.pooling, feature_dim: extractor.featureDim, preprocessing: extractor.preprocessing, engine: extractor.engine.name });

  const cache = new FeatureCache(opts.cacheDir);
  const key = cacheKey(extractor.fingerprint, dataset.fingerprint);
  // Workers count in the summary only when something ran on them (a cache hit starts none).
  let workersUsed = false;
  const dataParallel = deps.dataParallel && (() => { workersUsed = true; return deps.dataParallel!(); });
  const executor: JobDeps["executor"] = deps.executor && ((ctx) => { workersUsed = true; return deps.executor!(ctx); });
  const makeExecutor = executor
    ? () => executor({ dataset, extractor, backend })
    : async () => new LocalShardExecutor(dataset, extractor, EXTRACT_BATCH, metrics);
  const extraction = await runExtraction({
    dataset, cache, key, shardSize: opts.shardSize, log, metrics, executor: makeExecutor,
    meta: { featureDim: extractor.featureDim, featureShape: extractor.featureShape, model: source.name, inputSize: opts.inputSize, featureLayer: opts.featureLayer, pooling: opts.pooling },
  });
  const features = extraction.features;

  const trainCount = features.splits.filter((s) => s === "train").length;
  const stepsPerEpoch = Math.ceil(trainCount / opts.batchSize);
  const bars = new EpochBars({ label: "head", epochs: opts.epochs, stepsPerEpoch, log });
  // On a terminal the epoch's bar shows its figures; the log event is for files and collectors.
  const epochLevel = drawsBars() ? "debug" : "info";
  let stepInPhase = 0;
  const numClasses = dataset.classes.length;
  const controls = controlsOf(opts, classWeightsFor(opts.classWeight, dataset.classes, trainCounts(dataset.samples, numClasses)));
  const headStep = stepMetrics(metrics, "head");
  const headOptions: HeadTrainingOptions = {
    epochs: opts.epochs, batchSize: opts.batchSize, learningRate: opts.learningRate, units: opts.headUnits, dropout: opts.dropout, seed: opts.seed, controls,
    onBatchEnd: ({ epoch, batch, samples, loss }) => {
      headStep({ batch, samples });
      stepInPhase++;
      bars.batch(epoch, loss);
      metrics?.setEpoch("head", epoch + 1, stepInPhase);
      metrics?.progress("head", stepInPhase, stepsPerEpoch * opts.epochs);
    },
    onEpochEnd: (s: EpochStats) => {
      metrics?.setEvaluation("head", "train", { loss: s.loss, accuracy: s.accuracy });
      if (s.val_loss !== undefined) metrics?.setEvaluation("head", "val", { loss: s.val_loss, accuracy: s.val_accuracy });
      bars.epochEnd(s);
      log[epochLevel]("epoch", { phase: "head", epoch: s.epoch, loss: round(s.loss), accuracy: round(s.accuracy), val_loss: round(s.val_loss ?? NaN), val_accuracy: round(s.val_accuracy ?? NaN), lr: s.lr });
    },
  };
  bars.begin();
  let head: HeadTrainingResult;
  // The head phase trains here, in this process, even with workers: on cached features it is the cheap
  // part (bench/head: 54k rows of 96-d features in 50 s); with --method augment the frozen base runs here too.
  if (deps.dataParallel && opts.method === "augment")
    log.warn("--method augment trains in the coordinator process, not on the workers (data-parallel training covers fine-tuning on cached activations): drop --method augment to train across the workers");
  if (opts.method === "augment") {
    // Method 2: images through the frozen base every step; validation/test on the cached features.
    const train = await openImages(dataset, samplesOf(dataset, features.ids, features.splits, "train"), opts.inputSize);
    log.info("augmentation", { images: train.labels.length, in_memory: train.inMemory, ...augmentOf(opts) });
    const r = await trainHeadWithAugmentation(
      { base: extractor, train, val: splitData(features, "val"), test: splitData(features, "test") },
      { ...headOptions, numClasses, augment: augmentOf(opts), preprocessing: extractor.preprocessing },
    );
    const testY = splitData(features, "test").y;
    head = {
      head: r.head, history: r.history, seconds: r.seconds, val_accuracy: resultEpoch(r.history)?.val_accuracy ?? NaN,
      test: { loss: r.test.loss, accuracy: r.test.accuracy, samples: testY.length, confusion: confusionMatrix(testY, r.test.predictions, numClasses) },
    };
  } else head = await trainHead(features, headOptions);
  bars.finish();
  metrics?.setEvaluation("head", "test", { loss: head.test.loss, accuracy: head.test.accuracy });
  log.info("head trained", { test_accuracy: round(head.test.accuracy), test_loss: round(head.test.loss), val_accuracy: round(head.val_accuracy), seconds: round(head.seconds, 2) });

  const meta: ClassifierMetadata = {
    classes: dataset.classes, inputSize: opts.inputSize, preprocessing: extractor.preprocessing, baseModel: source.name,
    featureLayer: opts.featureLayer, pooling: opts.pooling, job: opts.job,
  };
  const classifier = extractor.model ? composeClassifier(extractor.model, head.head, meta) : undefined;
  await mkdir(opts.out, { recursive: true }).catch((err: unknown) => Promise.reject(storageError(err, opts.out)));
  // With fine-tuning, model/ is the fine-tuned classifier and model-head/ keeps the head-only one.
  const modelDir = join(opts.out, fineTuning ? "model-head" : "model");
  if (classifier) await saveModel(classifier, modelDir);
  else await saveOnnxClassifier(extractor.onnxGraph!, head.head, meta, modelDir);

  let ft: FineTuneResult | undefined;
  let ftInfo: JobSummary["fine_tune"];
  if (fineTuning) {
    if (!classifier || isOnnxSource(source)) throw new ConfigError(`fine-tuning needs a TF.js layers model; ${source.name} is an ONNX graph (inference only).`);
    const r = await runFineTuning(opts, { log, metrics, dataset, source, features, head: head.head, cache, augment: opts.method === "augment", executor, dataParallel, backend, engine, extractorPreprocessing: extractor.preprocessing, controls });
    ft = r.result;
    ftInfo = r.info;
    // The trained top goes back into the full base (same layer names), so model/ has the same graph as model-head/.
    copyWeightsByName(r.top, extractor.model!);
    r.dispose();
    await saveModel(classifier, join(opts.out, "model"));
  }

  const summary: JobSummary = {
    job: opts.job,
    backend: backend.name,
    engine: extractor.engine,
    workers: !deps.executor ? 1 : workersUsed ? deps.workers ?? opts.workers : 0,
    model: source.name,
    input_size: opts.inputSize,
    feature_layer: opts.featureLayer,
    pooling: opts.pooling,
    preprocessing: extractor.preprocessing,
    method: opts.method,
    ...(opts.method === "augment" ? { augmentation: augmentOf(opts) } : {}),
    data: dataset.name,
    classes: dataset.classes,
    samples: { train: trainCount, val: features.splits.filter((s) => s === "val").length, test: head.test.samples },
    extraction: {
      images: extraction.images, seconds: round(extraction.seconds, 3),
      images_per_second: extraction.images > 0 ? round(extraction.images / extraction.seconds, 2) : 0,
      cache_hit: extraction.cacheHit, cache_key: key, shards: extraction.shards, shards_resumed: extraction.shardsResumed,
    },
    phases: { head: phaseSummary(head.history, opts.epochs, head) },
    ...(ftInfo ? { fine_tune: ftInfo } : {}),
    skipped_inputs: features.skipped,
    options: reproducibleOptions(opts),
    versions: { ctrain: CTRAIN_VERSION, node: process.versions.node, tfjs: tfjsVersion.tfjs },
    seconds: 0,
    finished_at: "",
  };
  if (ft) summary.phases.fine_tune = phaseSummary(ft.history, ftEpochsOf(opts), ft);
  summary.seconds = round((performance.now() - t0) / 1000, 3);
  summary.finished_at = new Date().toISOString();
  const history = ft ? { head: head.history, fine_tune: ft.history } : { head: head.history };
  await writeOut(join(opts.out, "history.json"), JSON.stringify(history, null, 2));
  await writeOut(join(opts.out, "summary.json"), JSON.stringify(summary, null, 2));
  await writeOut(join(opts.out, "job.yaml"), jobFileText(opts));
  await writeOut(join(opts.out, "report.html"), renderReport({
    job: opts.job, summary: summary as unknown as Record<string, unknown>, phases: ft ? [{ name: "head", history: head.history }, { name: "fine_tune", history: ft.history }] : [{ name: "head", history: head.history }],
    classes: dataset.classes, confusion: ft ? ft.test.confusion : head.test.confusion,
  }));
  head.head.dispose();
  extractor.dispose();
  return summary;
}

interface FineTuningContext {
  log: Logger;
  metrics?: CtrainMetrics;
  dataset: Dataset;
  source: PretrainedSource;
  features: Awaited<ReturnType<typeof runExtraction>>["features"];
  head: import("@tensorflow/tfjs").LayersModel;
  cache: FeatureCache;
  augment: boolean;
  executor?: JobDeps["executor"];
  dataParallel?: JobDeps["dataParallel"];
  backend: BackendInfo;
  engine: EngineOptions;
  extractorPreprocessing: FeatureExtractor["preprocessing"];
  controls: import("../core/training/train_loop.js").TrainingControls;
}

/**
 * The fine-tuning phase of a job: split the base, get the data (cached activations at the cut, or
 * images when augmenting), train top + head. Returns the trained top for the export.
 */
async function runFineTuning(opts: JobOptions, c: FineTuningContext): Promise<{ result: FineTuneResult; info: NonNullable<JobSummary["fine_tune"]>; top: import("@tensorflow/tfjs").LayersModel; dispose: () => void }> {
  const { log, metrics } = c;
  if (c.backend.tfBackend === "wasm") {
    const added = registerWasmTrainingKernels();
    if (added.length) log.info("wasm training kernels registered", { kernels: added });
  }
  const split = await buildSplit(c.source, { inputSize: opts.inputSize, featureLayer: opts.featureLayer, unfreeze: opts.fineTuneLayers });
  const epochs = ftEpochsOf(opts);
  log.info("fine-tuning", { unfreeze: opts.fineTuneLayers, cut_layer: split.plan.cutLayer, first_unfrozen: split.plan.firstUnfrozen, trainable_layers: split.plan.trainableLayers.length, cut_shape: split.cutShape, augmentation: c.augment, epochs, learning_rate: opts.fineTuneLearningRate });
  const info: NonNullable<JobSummary["fine_tune"]> = {
    unfreeze: opts.fineTuneLayers, cut_layer: split.plan.cutLayer, first_unfrozen: split.plan.firstUnfrozen, trainable_layers: split.plan.trainableLayers, augmentation: c.augment,
  };
  let data: FineTuneData;
  let frozenBottom: FeatureExtractor | undefined;
  if (!c.augment) {
    const cutExtractor = await activationExtractor(c.source, opts.inputSize, split.plan.cutLayer, c.engine);
    const key = cacheKey(cutExtractor.fingerprint, c.dataset.fingerprint);
    const ex = await runExtraction({
      dataset: c.dataset, cache: c.cache, key, shardSize: opts.shardSize, log, metrics,
      executor: c.executor ? () => c.executor!({ dataset: c.dataset, extractor: cutExtractor, backend: c.backend }) : async () => new LocalShardExecutor(c.dataset, cutExtractor, EXTRACT_BATCH, metrics),
      meta: { featureDim: cutExtractor.featureDim, featureShape: cutExtractor.featureShape, model: c.source.name, inputSize: opts.inputSize, featureLayer: split.plan.cutLayer, pooling: "none" },
    });
    cutExtractor.dispose();
    info.activation_cache = { key, cache_hit: ex.cacheHit, images: ex.images, seconds: round(ex.seconds, 3) };
    data = { kind: "activations", train: activationData(ex.features, "train"), val: activationData(ex.features, "val"), test: activationData(ex.features, "test") };
  } else {
    const open = (s: "train" | "val" | "test") => openImages(c.dataset, samplesOf(c.dataset, c.features.ids, c.features.splits, s), opts.inputSize);
    data = { kind: "images", train: await open("train"), val: await open("val"), test: await open("test") };
    // The frozen bottom runs on the inference engine every step; only top + head train in tfjs.
    frozenBottom = await activationExtractor(c.source, opts.inputSize, split.plan.cutLayer, c.engine);
  }
  const trainCount = data.kind === "activations" ? data.train.y.length : data.train.labels.length;
  const steps = Math.ceil(trainCount / opts.batchSize) * epochs;
  const bars = new EpochBars({ label: "fine-tune", epochs, stepsPerEpoch: Math.ceil(trainCount / opts.batchSize), log });
  const epochLevel = drawsBars() ? "debug" : "info";
  let step = 0;
  const fineTuneStep = stepMetrics(metrics, "fine_tune");
  const onBatchEnd = ({ epoch, batch, samples, loss }: { epoch: number; batch: number; samples: number; loss: number }): void => {
    fineTuneStep({ batch, samples });
    step++;
    bars.batch(epoch, loss);
    metrics?.setEpoch("fine_tune", epoch + 1, step);
    metrics?.progress("fine_tune", step, steps);
  };
  const onEpochEnd = (s: EpochStats): void => {
    metrics?.setEvaluation("fine_tune", "train", { loss: s.loss, accuracy: s.accuracy });
    if (s.val_loss !== undefined) metrics?.setEvaluation("fine_tune", "val", { loss: s.val_loss, accuracy: s.val_accuracy });
    bars.epochEnd(s);
    log[epochLevel]("epoch", { phase: "fine_tune", epoch: s.epoch, loss: round(s.loss), accuracy: round(s.accuracy), val_loss: round(s.val_loss ?? NaN), val_accuracy: round(s.val_accuracy ?? NaN), lr: s.lr });
  };
  const dp = c.dataParallel && data.kind === "activations" ? await c.dataParallel() : undefined;
  bars.begin();
  if (dp && opts.restoreBestWeights) log.info("data-parallel fine-tuning keeps its last epoch's weights (--restore-best-weights applies to the head phase and to fine-tuning in one process)");
  const result = dp && data.kind === "activations" ? await runDataParallelFineTune(split, c.head, data, {
    nc: dp.nc, job: opts.job, log, metrics, model: opts.model, inputSize: opts.inputSize, featureLayer: opts.featureLayer, pooling: opts.pooling,
    fineTuneLayers: opts.fineTuneLayers, learningRate: opts.fineTuneLearningRate, seed: opts.seed, batchSize: opts.batchSize, epochs,
    numClasses: c.dataset.classes.length, wireDtype: opts.wireDtype, workers: dp.workers, out: opts.out,
    onBatchProgress: (s, total, epoch) => { bars.moveTo(epoch, s, total); metrics?.setEpoch("fine_tune", epoch + 1, s); metrics?.progress("fine_tune", s, total); },
    onEpochEnd,
  }) : await fineTune(split, c.head, data, {
    epochs, batchSize: opts.batchSize, learningRate: opts.fineTuneLearningRate, seed: opts.seed, numClasses: c.dataset.classes.length,
    pooling: opts.pooling, preprocessing: c.extractorPreprocessing, augment: c.augment ? augmentOf(opts) : null, frozen: frozenBottom,
    controls: c.controls, onBatchEnd, onEpochEnd,
  });
  frozenBottom?.dispose();
  bars.finish();
  metrics?.setEvaluation("fine_tune", "test", { loss: result.test.loss, accuracy: result.test.accuracy });
  log.info("fine-tuned", { test_accuracy: round(result.test.accuracy), test_loss: round(result.test.loss), val_accuracy: round(result.val_accuracy), val_loss_before: round(result.val_loss_before), seconds: round(result.seconds, 2) });
  return { result, info, top: split.top, dispose: () => { split.bottom.dispose(); split.top.dispose(); } };
}

/** Epochs of fine-tuning asked for (`--fine-tune-epochs`, else half the head's). */
function ftEpochsOf(opts: JobOptions): number {
  return opts.fineTuneEpochs > 0 ? opts.fineTuneEpochs : Math.max(1, Math.ceil(opts.epochs / 2));
}

function phaseSummary(history: EpochStats[], asked: number, r: { val_accuracy: number; test: { accuracy: number; loss: number }; seconds: number }): PhaseSummary {
  const best = history.find((h) => h.best);
  return {
    epochs: history.length, epochs_asked: asked, ...(best && best !== history.at(-1) ? { best_epoch: best.epoch } : {}),
    val_accuracy: round(r.val_accuracy), test_accuracy: round(r.test.accuracy), test_loss: round(r.test.loss), seconds: round(r.seconds, 3),
  };
}

/**
 * Images and step time of a training loop that runs in this process (head training, one-process
 * fine-tuning), for ctrain_images_processed_total and ctrain_step_duration_seconds. A step is timed
 * from the previous batch's end; the first batch of an epoch is counted but not timed, because its
 * gap would include the previous epoch's validation.
 */
function stepMetrics(metrics: CtrainMetrics | undefined, phase: "head" | "fine_tune"): (info: { batch: number; samples: number }) => void {
  let last = 0;
  return ({ batch, samples }) => {
    const now = performance.now();
    if (batch > 0 && last > 0) metrics?.observeStep(phase, (now - last) / 1000);
    last = now;
    metrics?.countImages(phase, samples);
  };
}

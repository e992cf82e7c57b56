/**
 * The first step of a job: the compute backend, the data set and the pretrained base's feature
 * extractor, each logged once. What it returns is the context every later phase reads.
 */
import { type BackendInfo, selectBackend } from "../../core/models/backend.js";
import type { JobOptions } from "../../core/runtime/config.js";
import { openDataset } from "../../core/datasets/open.js";
import type { Dataset } from "../../core/datasets/types.js";
import { buildFeatureExtractor, calibrationImages, type FeatureExtractor, loadModelSource, type ModelSource, resolveSourceChoices } from "../../core/models/feature_model.js";
import { FeatureCache } from "../../core/datasets/feature_store.js";
import type { Logger } from "../../core/runtime/log.js";
import type { CtrainMetrics } from "../../core/runtime/metrics.js";
import { type EngineInfo, type EngineOptions, threadsFor } from "../../core/models/inference_engine.js";
import { classWeightsFor, controlsOf, trainCounts } from "../../core/training/training_controls.js";
import type { TrainingControls } from "../../core/training/train_loop.js";

/** What every phase of a job reads. `opts` has `auto` choices resolved (feature layer, preprocessing). */
export interface JobContext {
  opts: JobOptions;
  log: Logger;
  metrics?: CtrainMetrics;
  backend: BackendInfo;
  dataset: Dataset;
  /** The pretrained base: a TF.js layers model, or an ONNX graph (inference only). */
  source: ModelSource;
  /** The frozen base at the feature layer; disposed by the job at the end. */
  extractor: FeatureExtractor;
  /** Inference-engine options of every frozen forward pass (the fine-tuning cut's too). */
  engine: EngineOptions;
  cache: FeatureCache;
  controls: TrainingControls;
}

/** Backend, data set, extractor: the job's context. */
export async function setUpJob(opts: JobOptions, log: Logger, metrics?: CtrainMetrics, listed?: Dataset): Promise<JobContext> {
  const backend = await selectBackend(opts.backend);
  log.info("compute backend", { backend: backend.name, requested: backend.requested, passed_over: backend.fallbacks.map((f) => `${f.name}: ${f.reason}`) });
  metrics?.setBackend(backend.name);
  const dataset = await openJobDataset(opts, log, listed);
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
  const numClasses = dataset.classes.length;
  const controls = controlsOf(opts, classWeightsFor(opts.classWeight, dataset.classes, trainCounts(dataset.samples, numClasses)));
  return { opts, log, metrics, backend, dataset, source, extractor, engine, cache: new FeatureCache(opts.cacheDir), controls };
}

async function openJobDataset(opts: JobOptions, log: Logger, listed?: Dataset): Promise<Dataset> {
  const dataset = listed ?? await openDataset(opts.data, { seed: opts.seed, valSplit: opts.valSplit, testSplit: opts.testSplit, limit: opts.limit, maxPixels: opts.maxPixels });
  const counts = dataset.samples.counts();
  log.info("data set", { data: dataset.name, classes: dataset.classes.length, ...counts, skipped_at_listing: dataset.skipped.length });
  for (const w of dataset.warnings ?? []) log.warn("data set", { data: dataset.name, warning: w });
  return dataset;
}

/** One line on the engine of the frozen forward passes; a warning when auto did not get onnx. */
function logEngine(log: Logger, e: EngineInfo): void {
  if (e.fallback) log.warn("inference engine: onnx not used, frozen forward passes run on tfjs", { requested: e.requested, reason: e.fallback });
  else log.info("inference engine", { engine: e.name, version: e.version, threads: e.threads, provider: e.provider, precision: e.precision });
}

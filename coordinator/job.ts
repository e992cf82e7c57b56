/**
 * A whole job, phase by phase: backend, data set, pretrained base, feature extraction (cached),
 * head training, export. Writes the run folder of DESIGN.md: model/, history.json, summary.json,
 * report.html. Options are validated before this is called; nothing here asks the user anything.
 */
import { mkdir, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { type BackendInfo, selectBackend } from "../core/backend.js";
import type { JobOptions } from "../core/config.js";
import { openDataset } from "../core/datasets/open.js";
import type { Dataset, SkippedInput } from "../core/datasets/types.js";
import { buildFeatureExtractor, type FeatureExtractor } from "../core/feature_model.js";
import { cacheKey, FeatureCache } from "../core/feature_store.js";
import { composeClassifier } from "../core/head.js";
import type { Logger } from "../core/log.js";
import type { CtrainMetrics } from "../core/metrics.js";
import { saveModel } from "../core/model_io.js";
import { loadPretrained } from "../core/model_zoo.js";
import { Progress } from "../core/progress.js";
import type { EpochStats } from "../core/train_loop.js";
import { LocalShardExecutor } from "../worker/local_executor.js";
import { runExtraction, type ShardExecutor } from "./extraction.js";
import { trainHead } from "./head_training.js";
import { renderReport } from "./report.js";

export interface PhaseSummary {
  epochs: number;
  val_accuracy: number;
  test_accuracy: number;
  test_loss: number;
  seconds: number;
}

/** summary.json (DESIGN.md lists the fields other work relies on). */
export interface JobSummary {
  job: string;
  backend: string;
  workers: number;
  model: string;
  input_size: number;
  feature_layer: string;
  pooling: string;
  method: string;
  data: string;
  classes: string[];
  samples: { train: number; val: number; test: number };
  extraction: { images: number; seconds: number; images_per_second: number; cache_hit: boolean; cache_key: string; shards: number; shards_resumed: number };
  phases: { head: PhaseSummary; fine_tune?: PhaseSummary };
  skipped_inputs: SkippedInput[];
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
}

const round = (x: number, d = 4): number => (Number.isFinite(x) ? Number(x.toFixed(d)) : x);

export async function runJob(opts: JobOptions, deps: JobDeps): Promise<JobSummary> {
  const t0 = performance.now();
  const { log, metrics } = deps;
  const backend = await selectBackend(opts.backend);
  log.info("compute backend", { backend: backend.name, requested: backend.requested, passed_over: backend.fallbacks.map((f) => `${f.name}: ${f.reason}`) });
  metrics?.setBackend(backend.name);

  const dataset = await openDataset(opts.data, { seed: opts.seed, valSplit: opts.valSplit, testSplit: opts.testSplit, limit: opts.limit, maxPixels: opts.maxPixels });
  const counts = { train: 0, val: 0, test: 0 };
  for (const s of dataset.samples) counts[s.split]++;
  log.info("data set", { data: dataset.name, classes: dataset.classes.length, ...counts, skipped_at_listing: dataset.skipped.length });

  const source = await loadPretrained(opts.model);
  const extractor = await buildFeatureExtractor(source, { inputSize: opts.inputSize, featureLayer: opts.featureLayer, pooling: opts.pooling });
  log.info("feature extractor", { model: source.name, input_size: opts.inputSize, feature_layer: opts.featureLayer, pooling: opts.pooling, feature_dim: extractor.featureDim, preprocessing: extractor.preprocessing });

  const cache = new FeatureCache(opts.cacheDir);
  const key = cacheKey(extractor.fingerprint, dataset.fingerprint);
  const makeExecutor = deps.executor
    ? () => deps.executor!({ dataset, extractor, backend })
    : async () => new LocalShardExecutor(dataset, extractor, 32, metrics);
  const extraction = await runExtraction({
    dataset, cache, key, shardSize: opts.shardSize, log, metrics, executor: makeExecutor,
    meta: { featureDim: extractor.featureDim, featureShape: extractor.featureShape, model: source.name, inputSize: opts.inputSize, featureLayer: opts.featureLayer, pooling: opts.pooling },
  });
  const features = extraction.features;

  const trainCount = features.splits.filter((s) => s === "train").length;
  const stepsPerEpoch = Math.ceil(trainCount / opts.batchSize);
  const progress = new Progress({ label: "head", total: stepsPerEpoch * opts.epochs, unit: "step" });
  let stepInPhase = 0;
  const head = await trainHead(features, {
    epochs: opts.epochs, batchSize: opts.batchSize, learningRate: opts.learningRate, units: opts.headUnits, dropout: opts.dropout, seed: opts.seed,
    onBatchEnd: ({ epoch, loss }) => {
      stepInPhase++;
      progress.tick(1, `epoch ${epoch + 1}/${opts.epochs} loss ${loss.toFixed(4)}`);
      metrics?.setEpoch("head", epoch + 1, stepInPhase);
      metrics?.progress("head", stepInPhase, stepsPerEpoch * opts.epochs);
    },
    onEpochEnd: (s: EpochStats) => {
      metrics?.setEvaluation("head", "train", { loss: s.loss, accuracy: s.accuracy });
      if (s.val_loss !== undefined) metrics?.setEvaluation("head", "val", { loss: s.val_loss, accuracy: s.val_accuracy });
      log.info("epoch", { phase: "head", epoch: s.epoch, loss: round(s.loss), accuracy: round(s.accuracy), val_loss: round(s.val_loss ?? NaN), val_accuracy: round(s.val_accuracy ?? NaN) });
    },
  });
  progress.finish();
  metrics?.setEvaluation("head", "test", { loss: head.test.loss, accuracy: head.test.accuracy });
  log.info("head trained", { test_accuracy: round(head.test.accuracy), test_loss: round(head.test.loss), val_accuracy: round(head.val_accuracy), seconds: round(head.seconds, 2) });

  const classifier = composeClassifier(extractor.model, head.head, {
    classes: dataset.classes, inputSize: opts.inputSize, preprocessing: extractor.preprocessing, baseModel: source.name,
    featureLayer: opts.featureLayer, pooling: opts.pooling, job: opts.job,
  });
  await mkdir(opts.out, { recursive: true });
  await saveModel(classifier, join(opts.out, "model"));

  const summary: JobSummary = {
    job: opts.job,
    backend: backend.name,
    workers: deps.executor ? deps.workers ?? opts.workers : 1,
    model: source.name,
    input_size: opts.inputSize,
    feature_layer: opts.featureLayer,
    pooling: opts.pooling,
    method: opts.method,
    data: dataset.name,
    classes: dataset.classes,
    samples: { train: trainCount, val: features.splits.filter((s) => s === "val").length, test: head.test.samples },
    extraction: {
      images: extraction.images, seconds: round(extraction.seconds, 3),
      images_per_second: extraction.images > 0 ? round(extraction.images / extraction.seconds, 2) : 0,
      cache_hit: extraction.cacheHit, cache_key: key, shards: extraction.shards, shards_resumed: extraction.shardsResumed,
    },
    phases: { head: { epochs: head.history.length, val_accuracy: round(head.val_accuracy), test_accuracy: round(head.test.accuracy), test_loss: round(head.test.loss), seconds: round(head.seconds, 3) } },
    skipped_inputs: features.skipped,
    seconds: 0,
    finished_at: "",
  };
  summary.seconds = round((performance.now() - t0) / 1000, 3);
  summary.finished_at = new Date().toISOString();
  const history = { head: head.history };
  await writeFile(join(opts.out, "history.json"), JSON.stringify(history, null, 2));
  await writeFile(join(opts.out, "summary.json"), JSON.stringify(summary, null, 2));
  await writeFile(join(opts.out, "report.html"), renderReport({
    job: opts.job, summary: summary as unknown as Record<string, unknown>, phases: [{ name: "head", history: head.history }], classes: dataset.classes, confusion: head.test.confusion,
  }));
  head.head.dispose();
  extractor.dispose();
  return summary;
}

/**
 * The report phase: summary.json (DESIGN.md's fields), history.json, job.yaml (a config that reruns
 * the job) and report.html in the run folder. A full or read-only disk is a StorageError naming the file.
 */
import { writeFile } from "node:fs/promises";
import { createRequire } from "node:module";
import { join } from "node:path";
import { version as tfjsVersion } from "@tensorflow/tfjs";
import { jobFileText, reproducibleOptions } from "../../core/runtime/config.js";
import { augmentOf } from "../../core/datasets/augment.js";
import { storageError } from "../../core/runtime/errors.js";
import type { EpochStats } from "../../core/training/train_loop.js";
import type { HeadPhaseResult } from "./head.js";
import type { JobSummary, PhaseSummary } from "../job.js";
import { renderReport } from "../report.js";
import type { Extracted } from "./extract.js";
import { type FineTuned, fineTuneEpochsOf } from "./fine_tune.js";
import { round } from "./progress.js";
import type { JobContext } from "./setup.js";

const CTRAIN_VERSION = (createRequire(import.meta.url)("../../../package.json") as { version: string }).version;

/** What the job did, for the report: `workers` as the summary counts them. */
export interface JobOutcome {
  extracted: Extracted;
  head: HeadPhaseResult;
  fineTuned?: FineTuned;
  workers: number;
  /** performance.now() when the job started. */
  startedAt: number;
}

/** summary.json's content. */
export function summarize(ctx: JobContext, o: JobOutcome): JobSummary {
  const { opts, dataset, extractor } = ctx;
  const { extracted: x, head, fineTuned: ft } = o;
  return {
    job: opts.job, backend: ctx.backend.name, engine: extractor.engine, workers: o.workers, model: ctx.source.name,
    input_size: opts.inputSize, feature_layer: opts.featureLayer, pooling: opts.pooling, preprocessing: extractor.preprocessing, method: opts.method,
    ...(opts.method === "augment" ? { augmentation: augmentOf(opts) } : {}),
    data: dataset.name, classes: dataset.classes,
    samples: { train: count(x.features.splits, "train"), val: count(x.features.splits, "val"), test: head.test.samples },
    extraction: {
      images: x.images, seconds: round(x.seconds, 3), images_per_second: x.images > 0 ? round(x.images / x.seconds, 2) : 0,
      cache_hit: x.cacheHit, cache_key: x.key, shards: x.shards, shards_resumed: x.shardsResumed,
    },
    phases: { head: phaseSummary(head.history, opts.epochs, head), ...(ft ? { fine_tune: phaseSummary(ft.result.history, fineTuneEpochsOf(opts), { ...ft.result, workers: ft.workers }) } : {}) },
    ...(ft ? { fine_tune: ft.info } : {}),
    skipped_inputs: x.features.skipped,
    options: reproducibleOptions(opts),
    versions: { ctrain: CTRAIN_VERSION, node: process.versions.node, tfjs: tfjsVersion.tfjs },
    seconds: round((performance.now() - o.startedAt) / 1000, 3),
    finished_at: new Date().toISOString(),
  };
}

/** Writes history.json, summary.json, job.yaml and report.html; returns the summary. */
export async function reportPhase(ctx: JobContext, o: JobOutcome): Promise<JobSummary> {
  const { opts } = ctx;
  const { head, fineTuned: ft } = o;
  const summary = summarize(ctx, o);
  const phases = [{ name: "head", history: head.history }, ...(ft ? [{ name: "fine_tune", history: ft.result.history }] : [])];
  await writeOut(join(opts.out, "history.json"), JSON.stringify(Object.fromEntries(phases.map((p) => [p.name, p.history])), null, 2));
  await writeOut(join(opts.out, "summary.json"), JSON.stringify(summary, null, 2));
  await writeOut(join(opts.out, "job.yaml"), jobFileText(opts));
  await writeOut(join(opts.out, "report.html"), renderReport({
    job: opts.job, summary: summary as unknown as Record<string, unknown>, phases,
    classes: ctx.dataset.classes, confusion: ft ? ft.result.test.confusion : head.test.confusion,
  }));
  return summary;
}

const count = (splits: readonly string[], split: string): number => splits.filter((s) => s === split).length;

/** A file of the run folder; a full or read-only disk becomes a StorageError naming it. */
async function writeOut(path: string, data: string): Promise<void> {
  await writeFile(path, data).catch((err: unknown) => Promise.reject(storageError(err, path, Buffer.byteLength(data))));
}

function phaseSummary(history: EpochStats[], asked: number, r: { val_accuracy: number; test: { accuracy: number; loss: number }; seconds: number; workers: number }): PhaseSummary {
  const best = history.find((h) => h.best);
  return {
    workers: r.workers, epochs: history.length, epochs_asked: asked, ...(best && best !== history.at(-1) ? { best_epoch: best.epoch } : {}),
    val_accuracy: round(r.val_accuracy), test_accuracy: round(r.test.accuracy), test_loss: round(r.test.loss), seconds: round(r.seconds, 3),
  };
}

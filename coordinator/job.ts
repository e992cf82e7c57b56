/**
 * A whole job as a list of phases: set up (backend, data set, pretrained base), extract (features,
 * cached), head (method 1 on cached features, or method 2: frozen base + head on augmented images),
 * fine-tune (the base's top layers, optional), export (model/), report (history.json, summary.json,
 * job.yaml, report.html: the run folder of DESIGN.md). Each phase is a function in coordinator/phases/
 * that takes and returns plain data. Options are validated before this is called, and the cluster
 * (where extraction and data-parallel training run) is built by the caller: nothing here asks the
 * user anything or starts a process.
 */
import type { NatsConnection } from "nats";
import type { BackendInfo } from "../core/models/backend.js";
import type { JobOptions } from "../core/runtime/config.js";
import type { Dataset, SkippedInput } from "../core/datasets/types.js";
import type { FeatureExtractor } from "../core/models/feature_model.js";
import type { Logger } from "../core/runtime/log.js";
import type { CtrainMetrics } from "../core/runtime/metrics.js";
import type { EngineInfo } from "../core/models/inference_engine.js";
import type { AugmentOptions } from "../core/datasets/augment.js";
import type { ShardExecutor } from "../core/datasets/shards.js";
import { setUpJob } from "./phases/setup.js";
import { extractPhase } from "./phases/extract.js";
import { headPhase } from "./phases/head.js";
import { fineTunePhase, trainableBase } from "./phases/fine_tune.js";
import { exportFineTuned, exportHead } from "./phases/export.js";
import { reportPhase } from "./phases/report.js";

export interface PhaseSummary {
  /** Processes that trained the phase: 1 = the coordinator process; N = N workers data-parallel (every one that was a member at some step). */
  workers: number;
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

/** Builds the shard executor of one extraction (the job's features, or fine-tuning's activations). */
export type ExecutorFactory = (ctx: { dataset: Dataset; extractor: FeatureExtractor; backend: BackendInfo }) => Promise<ShardExecutor>;

/**
 * Where a job's work runs, built once by the CLI (cli/cluster.ts) from the options: the one road
 * `--workers` takes into a job. runJob calls `executor` and `trainer` only when there is work for
 * them, so a cache hit starts no process.
 */
export interface JobCluster {
  /** Extraction: in this process, or on the workers over NATS. */
  executor: ExecutorFactory;
  /** Worker processes behind `executor` and `trainer`; 0 = everything runs in this process. */
  workers: number;
  /**
   * Data-parallel training on the workers (coordinator/data_parallel.ts): the job's connection.
   * Absent: train in this process. Used for fine-tuning (on cached activations, or on images with
   * --method augment) and for the head phase of --method augment; method 1's head trains here.
   */
  trainer?: () => Promise<NatsConnection>;
}

export interface JobDeps {
  log: Logger;
  metrics?: CtrainMetrics;
  cluster: JobCluster;
  /** The data set preflight listed, if it ran (else the job lists it). */
  dataset?: Dataset;
}

/** Runs the job's phases in order; returns summary.json's content. */
export async function runJob(opts: JobOptions, deps: JobDeps): Promise<JobSummary> {
  const startedAt = performance.now();
  const fineTuning = opts.fineTuneLayers.trim() !== "0";
  const { cluster, used } = tracked(deps.cluster);
  const ctx = await setUpJob(opts, deps.log, deps.metrics, deps.dataset);
  try {
    const extracted = await extractPhase(ctx, cluster);
    const head = await headPhase(ctx, extracted.features, cluster);
    try {
      const classifier = await exportHead(ctx, head.head, fineTuning);
      const fineTuned = fineTuning ? await fineTunePhase(ctx, cluster, trainableBase(ctx, classifier), extracted.features, head.head) : undefined;
      if (fineTuned) {
        await exportFineTuned(ctx, classifier!, fineTuned.top);
        fineTuned.dispose();
      }
      // Workers count in the summary only when something ran on them (a cache hit starts none).
      const workers = cluster.workers === 0 ? 1 : used() ? cluster.workers : 0;
      return await reportPhase(ctx, { extracted, head, fineTuned, workers, startedAt });
    } finally {
      head.head.dispose();
    }
  } finally {
    ctx.extractor.dispose();
  }
}

/** The cluster, and whether any of its work was asked for. */
function tracked(c: JobCluster): { cluster: JobCluster; used: () => boolean } {
  let used = false;
  return {
    cluster: {
      workers: c.workers,
      executor: (x) => { used = true; return c.executor(x); },
      ...(c.trainer ? { trainer: () => { used = true; return c.trainer!(); } } : {}),
    },
    used: () => used,
  };
}

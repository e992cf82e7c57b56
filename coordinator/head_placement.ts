/**
 * Where method 1's head trains: in the coordinator, or data-parallel on the workers
 * (coordinator/cached_rows_on_workers.ts). `--data-parallel on` puts it on the workers, `off` here;
 * `auto` (the default) estimates both times and picks the workers only when they win by a margin.
 *
 * The estimate (constants measured by bench/head_placement.ts on 2-core machines, see its JSON):
 *   here:     rows x epochs x dim x units / LOCAL_MACS_PER_S
 *   workers:  STARTUP_S + the blocks' upload (rows x dim x 4 bytes at UPLOAD_BYTES_PER_S)
 *             + per step max(compute of B / N rows, ...) + the gradient's averaging (dim x units x 4
 *             bytes at ALLREDUCE_BYTES_PER_S) + STEP_OVERHEAD_S, x steps
 *   Small heads stay here: a step on a few dozen rows is faster than one round of averaging.
 */
import type { JobOptions } from "../core/runtime/config.js";

/** What the estimate needs to know about the job. */
export interface HeadJob {
  trainRows: number;
  featureDim: number;
  units: number;
  epochs: number;
  batchSize: number;
  workers: number;
}

/** Measured constants (bench/head_placement.ts). */
export const PLACEMENT_CONSTANTS = {
  /** Multiply-adds per second of head training (forward + backward + Adam, per first-layer weight and row) in one process. */
  localMacsPerS: 1.0e9,
  /** Seconds of a data-parallel attempt before the first step (spec, replicas load, ready, plan). */
  startupS: 5,
  /** Feature blocks put to the object store, bytes per second. */
  uploadBytesPerS: 100e6,
  /** Gradient averaging, bytes of gradient per second per worker. */
  allreduceBytesPerS: 200e6,
  /** Fixed cost of a data-parallel step (reports, hooks, a round of messages). */
  stepOverheadS: 0.004,
  /** The workers must beat this process by this factor for `auto` to pick them. */
  margin: 1.25,
} as const;

/** Seconds estimated for the head in this process and on the workers. */
export function headSeconds(j: HeadJob, c = PLACEMENT_CONSTANTS): { here: number; workers: number } {
  const macs = j.trainRows * j.epochs * j.featureDim * j.units;
  const steps = Math.ceil(j.trainRows / j.batchSize) * j.epochs;
  const gradientBytes = j.featureDim * j.units * 4;
  return {
    here: macs / c.localMacsPerS,
    workers: c.startupS + (j.trainRows * j.featureDim * 4) / c.uploadBytesPerS + macs / j.workers / c.localMacsPerS + steps * (gradientBytes / c.allreduceBytesPerS + c.stepOverheadS),
  };
}

/** Whether the head of method 1 trains on the workers, and why (for the log). */
export function headOnWorkers(opts: Pick<JobOptions, "dataParallel" | "method">, j: HeadJob): { workers: boolean; why: string; estimate?: { here: number; workers: number } } {
  if (opts.method === "augment") return { workers: false, why: "method augment places its head itself" };
  if (j.workers < 2 && opts.dataParallel !== "on") return { workers: false, why: "one worker" };
  if (opts.dataParallel === "off") return { workers: false, why: "--data-parallel off" };
  if (opts.dataParallel === "on") return { workers: true, why: "--data-parallel on" };
  const estimate = headSeconds(j);
  const workers = estimate.workers * PLACEMENT_CONSTANTS.margin < estimate.here;
  return { workers, why: workers ? "estimated faster on the workers" : "estimated faster here", estimate };
}

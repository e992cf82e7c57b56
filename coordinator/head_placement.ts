/**
 * Where method 1's head trains: in the coordinator, or data-parallel on the workers
 * (coordinator/cached_rows_on_workers.ts). `--data-parallel on` puts it on the workers, `off` here;
 * `auto` (the default) estimates both times and picks the workers only when they win by a margin.
 *
 * The estimate, with constants fitted to bench/head_placement (whole `ctrain run` jobs, 2 wasm
 * workers on a 2-core machine; see bench/results/head_placement.json):
 *   here:     rows x epochs x dim x units multiply-adds at LOCAL_MACS_PER_S
 *   workers:  startup + storing the blocks once + every replica reading the train split every epoch
 *             + the compute split N ways (at WORKER_EFFICIENCY of this process's speed per row)
 *             + per step the averaging of the whole head gradient (dim x units floats) + a fixed cost.
 * Every step exchanges the whole gradient whatever the batch, so on cached features the workers only
 * win with large global batches, many epochs and several workers; small heads stay here. Workers much
 * faster than this process (GPUs behind a CPU coordinator) are not modelled: `--data-parallel on`.
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

/** Constants fitted to bench/head_placement.ts (2-core machine, wasm, 2 workers, one nats-server). */
export const PLACEMENT_CONSTANTS = {
  /** Multiply-adds per second of head training (forward + backward + Adam, per first-layer weight and row) in one process: 0.78-1.16e9 measured. */
  localMacsPerS: 1.0e9,
  /** A replica's training speed per row relative to this process (the step hook, slicing, validation on every replica). */
  workerEfficiency: 0.8,
  /** Seconds of a data-parallel attempt before the first step (spec, replicas load, ready, plan). */
  startupS: 2,
  /** Feature blocks put to the object store once, bytes per second. */
  uploadBytesPerS: 100e6,
  /** Feature blocks each replica reads every epoch, bytes per second. */
  readBytesPerS: 100e6,
  /** Gradient averaging, bytes of gradient per second (per step: 22 ms for 1.3 MB, 59 ms for 3.5 MB measured). */
  allreduceBytesPerS: 60e6,
  /** Fixed cost of a data-parallel step (reports, hooks, a round of messages). */
  stepOverheadS: 0.002,
  /** The workers must beat this process by this factor for `auto` to pick them. */
  margin: 1.25,
} as const;

/** Seconds estimated for the head in this process and on the workers. */
export function headSeconds(j: HeadJob, c = PLACEMENT_CONSTANTS): { here: number; workers: number } {
  const macs = j.trainRows * j.epochs * j.featureDim * j.units;
  const steps = Math.ceil(j.trainRows / j.batchSize) * j.epochs;
  const gradientBytes = j.featureDim * j.units * 4;
  const splitBytes = j.trainRows * j.featureDim * 4;
  return {
    here: macs / c.localMacsPerS,
    workers: c.startupS + splitBytes / c.uploadBytesPerS + (splitBytes * j.epochs) / c.readBytesPerS + macs / j.workers / (c.localMacsPerS * c.workerEfficiency) +
      steps * (gradientBytes / c.allreduceBytesPerS + c.stepOverheadS),
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

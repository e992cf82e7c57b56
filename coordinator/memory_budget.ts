/**
 * The coordinator's bounded working set, estimated before any work: with the feature cache streamed
 * (core/training/feature_batches.ts) the head phase holds a window of rows, not the data set, so
 * what grows with N is only the per-sample index (ids, labels, splits). A job whose working set
 * would not fit this machine's memory is refused up front with the sizes and what to change; a job
 * whose features would not fit --cache-dir is refused by the room check next to it.
 */
import { totalmem } from "node:os";
import type { JobOptions } from "../core/runtime/config.js";
import { ConfigError } from "../core/runtime/errors.js";
import { DEFAULT_IMAGE_MEMORY_BYTES } from "../core/training/image_batches.js";
import { DEFAULT_WINDOW_BYTES } from "../core/training/feature_batches.js";

/**
 * Index bytes per sample held by the coordinator: the listing, the cache index (id, label, split),
 * order arrays, JSON while the index is written. Measured (bench/scale, synthetic, block_12_add):
 * coordinator peak RSS 414 MiB at 10^4 samples, 509 MiB at 10^5, about 1.1 KB per sample.
 */
export const INDEX_BYTES_PER_SAMPLE = 1200;
/** A coordinator process with tfjs, the model and onnxruntime loaded (measured 350-450 MB with MobileNetV2). */
export const COORDINATOR_BASE_BYTES = 512 * 2 ** 20;
/** Share of physical memory the coordinator may plan to use: the rest is the OS, page cache and local workers. */
const MEMORY_SHARE = 0.5;

/** What the working-set estimate is made of, in bytes. */
export interface WorkingSet {
  base: number;
  index: number;
  featureWindow: number;
  head: number;
  images: number;
  total: number;
}

const mib = (b: number): string => `${(b / 2 ** 20).toFixed(0)} MiB`;

/** The coordinator's bounded working set for `samples` rows of `featureDim` floats. */
export function workingSet(opts: Pick<JobOptions, "batchSize" | "headUnits" | "method" | "inputSize"> & Partial<Pick<JobOptions, "shuffleBufferMib">>, samples: number, featureDim: number): WorkingSet {
  const row = featureDim * 4;
  const base = COORDINATOR_BASE_BYTES;
  const index = samples * INDEX_BYTES_PER_SAMPLE;
  // Two shuffle windows' worth of blocks (at least two blocks), plus the batches in flight (current + prefetched + evaluation chunk).
  const featureWindow = Math.max(opts.shuffleBufferMib !== undefined ? opts.shuffleBufferMib * 2 ** 20 : DEFAULT_WINDOW_BYTES, 2 * 256 * row) + (2 * opts.batchSize + 1024) * row;
  // Kernel, gradient, two Adam moments.
  const head = 4 * featureDim * opts.headUnits * 4;
  const images = opts.method === "augment" ? Math.min(DEFAULT_IMAGE_MEMORY_BYTES, samples * opts.inputSize ** 2 * 3) : 0;
  return { base, index, featureWindow, head, images, total: base + index + featureWindow + head + images };
}

/** Refuses a job whose coordinator working set exceeds half of this machine's memory (`memory`: bytes, default the machine's). */
export function checkMemoryBudget(opts: JobOptions, samples: number, featureDim: number, memory = totalmem()): WorkingSet {
  const ws = workingSet(opts, samples, featureDim);
  const budget = memory * MEMORY_SHARE;
  if (ws.total > budget)
    throw new ConfigError(
      `--data ${opts.data}: the coordinator would hold about ${mib(ws.total)} (index of ${samples} samples ${mib(ws.index)}, feature window ${mib(ws.featureWindow)} for ${featureDim} floats per sample, head ${mib(ws.head)} with --head-units ${opts.headUnits}${ws.images ? `, images ${mib(ws.images)}` : ""}, process ${mib(ws.base)}), ` +
      `more than half of this machine's ${mib(memory)}. Use --limit, fewer --head-units, --pooling avg or max, or a machine with more memory.`,
    );
  return ws;
}

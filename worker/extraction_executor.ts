/**
 * Runs the frozen base over one shard of samples: decode + resize (sharp, on libuv's thread pool)
 * overlaps with the forward pass of the previous batch. A sample that cannot be decoded is skipped
 * and reported; any other error fails the whole shard so that it is retried (possibly elsewhere).
 */
import { totalmem } from "node:os";
import type { Dataset, SampleRef, SkippedInput } from "../core/datasets/types.js";
import { BadInputError } from "../core/runtime/errors.js";
import { DEFAULT_BATCH_SIZE } from "../core/runtime/config.js";
import type { FeatureExtractor } from "../core/models/feature_model.js";
import type { FeatureShardData } from "../core/datasets/feature_store.js";

export interface ExtractShardOptions {
  /** Images per forward pass. Default 32. */
  batchSize?: number;
  /** Called after each batch with the number of images it held (decoded + skipped). */
  onBatch?: (images: number, skipped: number) => void;
  /** Stop early (cooperative cancel); the shard then throws. */
  signal?: AbortSignal;
  /** Filled with where the shard's time went (seconds). */
  timing?: ShardTiming;
}

/** Where a shard's extraction time went: waiting for decoded images vs the frozen forward pass. */
export interface ShardTiming {
  /** Time the forward pass waited for the next batch to be decoded (decode not hidden behind the previous batch). */
  decodeWaitSeconds: number;
  /** Time in the frozen forward pass. */
  forwardSeconds: number;
}

type Decoded = { sample: SampleRef; rgb?: Uint8Array; skipped?: SkippedInput };

async function decode(dataset: Dataset, sample: SampleRef, size: number): Promise<Decoded> {
  try {
    return { sample, rgb: await dataset.readRgb(sample, size) };
  } catch (err) {
    if (err instanceof BadInputError) return { sample, skipped: { id: sample.id, reason: err.reason, message: err.message } };
    throw err;
  }
}

/** Features of every usable sample of the shard, in shard order. */
export async function extractShard(dataset: Dataset, extractor: FeatureExtractor, shardId: string, samples: SampleRef[], opts: ExtractShardOptions = {}): Promise<FeatureShardData> {
  const batchSize = opts.batchSize ?? DEFAULT_BATCH_SIZE;
  const size = extractor.inputSize;
  const pixels = size * size * 3;
  const out: FeatureShardData = { shardId, ids: [], labels: [], splits: [], features: new Float32Array(samples.length * extractor.featureDim), skipped: [] };
  const decodeBatch = (start: number) => Promise.all(samples.slice(start, start + batchSize).map((s) => decode(dataset, s, size)));
  let next = samples.length > 0 ? decodeBatch(0) : undefined;
  let row = 0;
  for (let start = 0; start < samples.length; start += batchSize) {
    if (opts.signal?.aborted) throw opts.signal.reason ?? new Error("extraction cancelled");
    const t0 = performance.now();
    const batch = await next!;
    const t1 = performance.now();
    // Start decoding the next batch before the forward pass of this one (onnxruntime runs it off the event loop).
    next = start + batchSize < samples.length ? decodeBatch(start + batchSize) : undefined;
    const good = batch.filter((d) => d.rgb);
    for (const d of batch) if (d.skipped) out.skipped.push(d.skipped);
    if (good.length > 0) {
      const rgb = new Uint8Array(good.length * pixels);
      good.forEach((d, i) => rgb.set(d.rgb!, i * pixels));
      const f = await extractor.extract(rgb, good.length);
      if (opts.timing) opts.timing.forwardSeconds += (performance.now() - t1) / 1000;
      out.features.set(f, row * extractor.featureDim);
      for (const d of good) {
        out.ids.push(d.sample.id);
        out.labels.push(d.sample.label);
        out.splits.push(d.sample.split);
      }
      row += good.length;
    }
    if (opts.timing) opts.timing.decodeWaitSeconds += (t1 - t0) / 1000;
    opts.onBatch?.(batch.length, batch.length - good.length);
  }
  out.features = out.features.slice(0, row * extractor.featureDim);
  return out;
}

/**
 * Bytes a worker holds for one shard at its peak: the features (kept, then copied into the
 * protobuf message and its wire bytes) plus the decoded images and tensors of two batches in flight.
 */
export function shardMemoryBytes(samples: number, featureDim: number, inputSize: number, batchSize: number): number {
  const features = samples * featureDim * 4 * 3;
  const batches = 2 * batchSize * inputSize * inputSize * 3 * (1 + 4 + 4);
  return features + batches;
}

/**
 * The memory this process may use: the machine's, or less under a cgroup limit (a pod's
 * `resources.limits.memory`, `docker run --memory`). Node reports "no limit" as undefined, 0 or 2^64.
 */
export function memoryLimit(total: number = totalmem(), constrained: number | undefined = process.constrainedMemory?.()): number {
  return constrained !== undefined && constrained > 0 && constrained < total ? constrained : total;
}

/**
 * Memory a worker may spend on one shard: CTRAIN_WORKER_MEMORY_BYTES, else half of
 * {@link memoryLimit} (so a pod's limit, not its node's memory). A shard above it is refused with a
 * clear error instead of the kernel killing the worker.
 */
export function shardMemoryBudget(env: NodeJS.ProcessEnv, totalMemory: number): number {
  const v = env.CTRAIN_WORKER_MEMORY_BYTES;
  if (v !== undefined && v !== "") {
    const n = Number(v);
    if (Number.isFinite(n) && n > 0) return n;
  }
  return Math.floor(totalMemory / 2);
}

/**
 * Extraction phase of a job: plan shards, skip the ones a previous (killed) run already stored,
 * hand the rest to a shard executor (in-process here; NATS workers in the distributed job), store
 * each returned shard idempotently, then join them into one committed cache entry.
 */
import { rm } from "node:fs/promises";
import type { Dataset } from "../core/datasets/types.js";
import type { FeatureCache, FeatureSet } from "../core/datasets/feature_store.js";
import type { Logger } from "../core/runtime/log.js";
import type { CtrainMetrics } from "../core/runtime/metrics.js";
import { Progress } from "../core/runtime/progress.js";
import type { ShardExecutor } from "../core/datasets/shards.js";
import { planShards } from "./shard_planner.js";

export interface ExtractionResult {
  features: FeatureSet;
  cacheHit: boolean;
  /** Images extracted by this run: not skipped inputs, not shards resumed from the cache. */
  images: number;
  seconds: number;
  shards: number;
  shardsResumed: number;
}

export interface ExtractionOptions {
  dataset: Dataset;
  cache: FeatureCache;
  key: string;
  shardSize: number;
  meta: { featureDim: number; featureShape: number[]; model: string; inputSize: number; featureLayer: string; pooling: string };
  executor: () => Promise<ShardExecutor>;
  log: Logger;
  metrics?: CtrainMetrics;
}

export async function runExtraction(o: ExtractionOptions): Promise<ExtractionResult> {
  const t0 = performance.now();
  const hit = await cacheHit(o, t0);
  if (hit) return hit;
  // One run at a time fills an entry; a run that waited here usually finds it committed.
  const release = await o.cache.lock(o.key, (holder) => o.log.info("waiting for another run extracting the same features", { key: o.key, holder }));
  try {
    return (await cacheHit(o, t0)) ?? (await extract(o, t0));
  } finally {
    await release();
  }
}

/** The cached entry of `o.key`, when there is a sound one. */
async function cacheHit(o: ExtractionOptions, t0: number): Promise<ExtractionResult | undefined> {
  let cached: FeatureSet | undefined;
  if (o.cache.has(o.key)) {
    try {
      cached = await o.cache.load(o.key);
    } catch (err) {
      // A damaged entry (truncated file, disk error) is rebuilt, not trusted and not fatal.
      o.log.warn("feature cache entry is damaged: extracting again", { key: o.key, error: (err as Error).message });
      await rm(o.cache.entryDir(o.key), { recursive: true, force: true });
    }
  }
  if (cached) {
    const features = cached;
    o.log.info("feature cache hit: nothing to extract", { key: o.key, samples: features.labels.length });
    return { features, cacheHit: true, images: 0, seconds: (performance.now() - t0) / 1000, shards: 0, shardsResumed: 0 };
  }
  return undefined;
}

/** Extracts the shards the partial entry lacks and commits the entry. */
async function extract(o: ExtractionOptions, t0: number): Promise<ExtractionResult> {
  const shards = planShards(o.dataset.samples, o.shardSize);
  const done = await o.cache.doneShards(o.key);
  const todo = shards.filter((s) => !done.has(s.id));
  const images = todo.reduce((a, s) => a + s.size, 0);
  o.log.info("extracting features", { key: o.key, shards: shards.length, resumed: shards.length - todo.length, images });
  const counts = { pending: todo.length, running: 0, done: shards.length - todo.length, failed: 0 };
  o.metrics?.setShards(counts);
  const progress = new Progress({ label: "extract", total: images, unit: "img", log: o.log });
  // What was extracted, not what was attempted: a bad file is a skipped input, not an image.
  let extracted = 0;
  if (todo.length > 0) {
    const executor = await o.executor();
    let seen = 0;
    await executor.run(
      todo,
      async (data) => {
        if (await o.cache.putShard(o.key, data)) extracted += data.ids.length;
        counts.done++;
        counts.pending = Math.max(0, counts.pending - 1);
        o.metrics?.setShards(counts);
        for (const s of data.skipped) o.metrics?.skippedInput(s.reason);
      },
      (n, skipped) => {
        seen += n;
        progress.tick(n, skipped ? `skipped ${skipped}` : undefined);
        o.metrics?.progress("extract", seen, images);
      },
    );
    progress.finish();
  }
  for (const s of o.dataset.skipped) o.metrics?.skippedInput(s.reason);
  const features = await o.cache.commit(o.key, { ...o.meta, classes: o.dataset.classes }, o.dataset.samples.ids(), o.dataset.skipped);
  const seconds = (performance.now() - t0) / 1000;
  o.log.info("features cached", { key: o.key, samples: features.ids.length, skipped: features.skipped.length, seconds: Number(seconds.toFixed(2)) });
  return { features, cacheHit: false, images: extracted, seconds, shards: shards.length, shardsResumed: shards.length - todo.length };
}

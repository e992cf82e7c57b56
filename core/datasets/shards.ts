/**
 * The unit of extraction work and what runs it. The coordinator plans shards
 * (coordinator/shard_planner.ts) and hands them to a ShardExecutor: the calling process
 * (worker/local_executor.ts) or workers over NATS (coordinator/nats_executor.ts).
 */
import type { SampleRef } from "./types.js";
import type { FeatureShardData } from "./feature_store.js";

export interface Shard {
  /** `shard-00042`: stable across runs for the same samples and shard size. */
  id: string;
  /** The shard's samples (a planned shard makes them on each read: take them once). */
  readonly samples: SampleRef[];
  /** How many samples, without making them (planned shards have it). */
  readonly size?: number;
}

/** A shard's sample count. */
export const shardSize = (s: Shard): number => s.size ?? s.samples.length;

/** Something that turns shards into features: the local process, or workers over NATS. */
export interface ShardExecutor {
  /** Extracts every shard, calling `onShard` once per shard (in any order) and `onImages` as images complete. */
  run(shards: Shard[], onShard: (data: FeatureShardData) => Promise<void>, onImages: (images: number, skipped: number) => void): Promise<void>;
  /** Backend and worker count, for the summary. */
  describe(): { workers: number };
}

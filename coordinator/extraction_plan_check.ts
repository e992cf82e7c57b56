/**
 * The trust boundary of extraction results: a worker supplies only feature rows, and what the
 * coordinator keeps is checked against the shard it asked for. Pure (no NATS): unit-tested in
 * test/extraction_round_units.test.ts.
 */
import type { FeatureShardData } from "../core/datasets/feature_store.js";
import type { Shard } from "../core/datasets/shards.js";
import { bytesToFloat32 } from "../proto/tensor_codec.js";
import type { FeatureShard } from "../proto/codec.js";
import { toWireSplit } from "../proto/splits.js";

/**
 * A worker's result disagrees with the shard the coordinator asked for. `reason` is the label of the
 * dropped-messages metric: `shard_ids` (a sample not in the plan, or listed twice), `shard_count`
 * (samples missing), `shard_labels` / `shard_splits` (not the plan's), `shard_dim` (feature size).
 */
export class ShardRejected extends Error {
  override name = "ShardRejected";
  constructor(readonly reason: "shard_ids" | "shard_count" | "shard_labels" | "shard_splits" | "shard_dim", message: string) {
    super(message);
  }
}

/**
 * Ids must be exactly the plan's samples (extracted or skipped, each once), labels and splits must
 * echo the plan's, rows must have the extractor's size (the codec already checked bytes = rows x
 * size x 4, i.e. float32). What is kept takes labels and splits from the plan, never from the worker.
 * Throws ShardRejected.
 */
export function checkAgainstPlan(fs: FeatureShard, wire: string, shard: Shard, featureDim: number): FeatureShardData {
  if (fs.shardId !== wire) throw new ShardRejected("shard_ids", `object ${wire} holds shard ${fs.shardId}`);
  const plan = new Map(shard.samples.map((x) => [x.id, x]));
  const got = new Set<string>();
  for (const id of [...fs.ids, ...fs.skipped.map((s) => s.id)]) {
    if (!plan.has(id) || got.has(id)) throw new ShardRejected("shard_ids", `sample ${id} is not in the plan of ${wire} or listed twice`);
    got.add(id);
  }
  if (got.size !== plan.size) throw new ShardRejected("shard_count", `${got.size} of ${plan.size} samples of ${wire} accounted for`);
  const dim = fs.featureDims.reduce((a, b) => a * b, 1);
  if (dim !== featureDim) throw new ShardRejected("shard_dim", `feature dim ${dim}, expected ${featureDim}`);
  const samples = fs.ids.map((id) => plan.get(id)!);
  const badLabel = samples.findIndex((x, i) => x.label !== fs.labels[i]);
  if (badLabel >= 0) throw new ShardRejected("shard_labels", `sample ${fs.ids[badLabel]} labelled ${fs.labels[badLabel]}, the plan says ${samples[badLabel].label}`);
  const badSplit = samples.findIndex((x, i) => toWireSplit(x.split) !== fs.splits[i]);
  if (badSplit >= 0) throw new ShardRejected("shard_splits", `sample ${fs.ids[badSplit]} in split ${fs.splits[badSplit]}, the plan says ${samples[badSplit].split}`);
  return {
    shardId: shard.id, ids: samples.map((x) => x.id), labels: samples.map((x) => x.label), splits: samples.map((x) => x.split),
    features: bytesToFloat32(fs.features), skipped: fs.skipped.map((s) => ({ id: s.id, reason: s.reason, message: s.message })),
  };
}

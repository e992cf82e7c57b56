/**
 * Cuts the samples of a job into extraction shards. Samples are dealt round-robin across classes
 * before cutting, so every shard holds every class where the data allows (a shard's features are a
 * usable sample of the data set on their own), and the plan depends only on the sample list and
 * the shard size: a restarted coordinator plans the same shard ids and skips the finished ones.
 *
 * A plan holds each shard as positions into the sample list (4 bytes a sample); a shard's
 * SampleRefs are made when something reads `samples`, so planning 10^7 images holds no object per image.
 */
import { SampleList } from "../core/datasets/sample_list.js";
import type { SampleRef } from "../core/datasets/types.js";
import type { Shard } from "../core/datasets/shards.js";

/** A planned shard: its samples' positions in the list, made into SampleRefs on each read of `samples`. */
export class PlannedShard implements Shard {
  constructor(
    readonly id: string,
    private readonly list: SampleList,
    private readonly positions: Uint32Array,
  ) {}

  get size(): number {
    return this.positions.length;
  }

  get samples(): SampleRef[] {
    return Array.from(this.positions, (k) => this.list.get(k));
  }
}

export function planShards(samples: SampleList | readonly SampleRef[], shardSize: number): PlannedShard[] {
  if (!(shardSize >= 1)) throw new RangeError(`shard size must be >= 1, got ${shardSize}`);
  const list = samples instanceof SampleList ? samples : SampleList.from(samples);
  // Positions of each label's samples, in list order: counted first, then filled (no array per sample).
  const seen = new Set<number>();
  for (let k = 0; k < list.length; k++) seen.add(list.label(k));
  const labels = [...seen].sort((a, b) => a - b);
  const slot = new Map(labels.map((l, i) => [l, i]));
  const counts = new Uint32Array(labels.length);
  for (let k = 0; k < list.length; k++) counts[slot.get(list.label(k))!]++;
  const queues = Array.from(counts, (n) => new Uint32Array(n));
  const filled = new Uint32Array(labels.length);
  for (let k = 0; k < list.length; k++) {
    const q = slot.get(list.label(k))!;
    queues[q][filled[q]++] = k;
  }
  const dealt = new Uint32Array(list.length);
  for (let i = 0, n = 0; n < list.length; i++) for (const q of queues) if (i < q.length) dealt[n++] = q[i];
  const shards: PlannedShard[] = [];
  const width = Math.max(5, String(Math.ceil(dealt.length / shardSize)).length);
  for (let i = 0; i < dealt.length; i += shardSize)
    shards.push(new PlannedShard(`shard-${String(i / shardSize).padStart(width, "0")}`, list, dealt.slice(i, i + shardSize)));
  return shards;
}

/**
 * Cuts the samples of a job into extraction shards. Samples are dealt round-robin across classes
 * before cutting, so every shard holds every class where the data allows (a shard's features are a
 * usable sample of the data set on their own), and the plan depends only on the sample list and
 * the shard size: a restarted coordinator plans the same shard ids and skips the finished ones.
 */
import type { SampleRef } from "../core/datasets/types.js";
import type { Shard } from "../core/datasets/shards.js";

export function planShards(samples: readonly SampleRef[], shardSize: number): Shard[] {
  if (!(shardSize >= 1)) throw new RangeError(`shard size must be >= 1, got ${shardSize}`);
  const byClass = new Map<number, SampleRef[]>();
  for (const s of samples) {
    let list = byClass.get(s.label);
    if (!list) byClass.set(s.label, (list = []));
    list.push(s);
  }
  const queues = [...byClass.entries()].sort((a, b) => a[0] - b[0]).map(([, v]) => v);
  const dealt: SampleRef[] = [];
  for (let i = 0; dealt.length < samples.length; i++) for (const q of queues) if (i < q.length) dealt.push(q[i]);
  const shards: Shard[] = [];
  const width = Math.max(5, String(Math.ceil(dealt.length / shardSize)).length);
  for (let i = 0; i < dealt.length; i += shardSize)
    shards.push({ id: `shard-${String(i / shardSize).padStart(width, "0")}`, samples: dealt.slice(i, i + shardSize) });
  return shards;
}

/**
 * bench/scale's head part, in its own process so its peak RSS is the head phase's alone:
 * `node scale_head_child.js <dir> <N> <epochs>` writes N rows of 3456 floats (block_12_add, pooling
 * none at input 96) as 256-row shards into a feature cache under <dir>, commits, loads and trains
 * the head on it streamed; writes <dir>/phases.json with seconds and rows/s per phase, the cache size,
 * and the process's peak RSS so far at the end of each phase (VmHWM: which phase set the peak).
 */
import { readFileSync, statSync } from "node:fs";
import { writeFile } from "node:fs/promises";
import { join } from "node:path";
import { trainHead } from "../coordinator/head_training.js";
import { FeatureCache } from "../core/datasets/feature_store.js";
import type { Split } from "../core/datasets/types.js";
import { selectBackend } from "../core/models/backend.js";
import { Rng } from "../core/runtime/rng.js";

const [dir, nArg, epochsArg] = process.argv.slice(2);
const n = Number(nArg);
const DIM = 3456;
const CLASSES = 10;
const SHARD = 256;

/** Peak RSS of this process so far, MiB. */
function peakMiB(): number {
  const m = /VmHWM:\s+(\d+) kB/.exec(readFileSync("/proc/self/status", "utf8"));
  return m ? Math.round(Number(m[1]) / 1024) : NaN;
}

async function main(): Promise<void> {
  await selectBackend("wasm");
  const cache = new FeatureCache(join(dir, "cache"));
  // Split by the index within its class (label = i % CLASSES), so every split holds every class.
  const splitOf = (i: number): Split => { const q = Math.floor(i / CLASSES) % 10; return q === 8 ? "val" : q === 9 ? "test" : "train"; };
  const t0 = performance.now();
  const rng = new Rng(1);
  for (let s = 0; s < n; s += SHARD) {
    const m = Math.min(SHARD, n - s);
    const ids: string[] = [], labels: number[] = [], splits: Split[] = [];
    const features = new Float32Array(m * DIM);
    for (let r = 0; r < m; r++) {
      const i = s + r;
      ids.push(`synthetic/${i}`); labels.push(i % CLASSES); splits.push(splitOf(i));
      for (let d = 0; d < DIM; d++) features[r * DIM + d] = (d % CLASSES === i % CLASSES ? 1 : 0) + rng.next() - 0.5;
    }
    await cache.putShard("k", { shardId: `shard-${String(s / SHARD).padStart(5, "0")}`, ids, labels, splits, features, skipped: [] });
  }
  const t1 = performance.now();
  const peakStored = peakMiB();
  const order = Array.from({ length: n }, (_, i) => `synthetic/${i}`);
  await cache.commit("k", { featureDim: DIM, featureShape: [6, 6, 96], classes: Array.from({ length: CLASSES }, (_, c) => String(c)), model: "synthetic", inputSize: 96, featureLayer: "block_12_add", pooling: "none" }, order);
  order.length = 0;
  const t2 = performance.now();
  const peakCommitted = peakMiB();
  const set = await cache.load("k");
  const size = statSync(join(cache.entryDir("k"), "features.f32")).size;
  const peakLoaded = peakMiB();
  const epochs = Number(epochsArg);
  const r = await trainHead(set, { epochs, batchSize: 32, learningRate: 1e-3, units: 256, dropout: 0.5, seed: 42 });
  const t3 = performance.now();
  const train = set.splits.filter((s) => s === "train").length;
  const rows = train * epochs + (n - train);
  await writeFile(join(dir, "phases.json"), JSON.stringify({
    phases: {
      store_shards: { seconds: Number(((t1 - t0) / 1000).toFixed(1)), rows_per_second: Math.round(n / ((t1 - t0) / 1000)), peak_rss_mib_so_far: peakStored },
      commit: { seconds: Number(((t2 - t1) / 1000).toFixed(1)), rows_per_second: Math.round(n / ((t2 - t1) / 1000)), peak_rss_mib_so_far: peakCommitted },
      head: { seconds: Number(((t3 - t2) / 1000).toFixed(1)), epochs, rows_per_second: Math.round(rows / ((t3 - t2) / 1000)), test_accuracy: r.test.accuracy, peak_rss_mib_after_load: peakLoaded, peak_rss_mib_so_far: peakMiB() },
    },
    feature_cache_mib: Math.round(size / 2 ** 20),
  }));
}

void main().catch((e: unknown) => { console.error(e); process.exit(1); });

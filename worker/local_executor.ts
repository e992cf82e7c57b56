/**
 * Shard executor that extracts in the calling process: the single-machine path (`--workers 1`),
 * and the reference the distributed executor is checked against.
 */
import type { Dataset } from "../core/datasets/types.js";
import type { FeatureExtractor } from "../core/models/feature_model.js";
import type { FeatureShardData } from "../core/datasets/feature_store.js";
import type { CtrainMetrics } from "../core/runtime/metrics.js";
import { shardSize, type Shard, type ShardExecutor } from "../core/datasets/shards.js";
import { extractShard } from "./extraction_executor.js";

export class LocalShardExecutor implements ShardExecutor {
  constructor(
    private readonly dataset: Dataset,
    private readonly extractor: FeatureExtractor,
    private readonly batchSize: number,
    private readonly metrics?: CtrainMetrics,
  ) {}

  describe(): { workers: number } {
    return { workers: 1 };
  }

  async run(shards: Shard[], onShard: (d: FeatureShardData) => Promise<void>, onImages: (n: number, skipped: number) => void): Promise<void> {
    for (const shard of shards) {
      const t0 = performance.now();
      const data = await extractShard(this.dataset, this.extractor, shard.id, shard.samples, {
        batchSize: this.batchSize,
        onBatch: (n, skipped) => {
          onImages(n, skipped);
          this.metrics?.countImages("extract", n - skipped);
        },
      });
      this.metrics?.setExtractionRate(shardSize(shard) / ((performance.now() - t0) / 1000));
      await onShard(data);
    }
  }
}

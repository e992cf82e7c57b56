/**
 * The distributed ShardExecutor: shards become ShardTasks on the job's JetStream work queue, workers
 * elsewhere extract them, put each FeatureShard into the job's object store (one object per shard,
 * overwritten with the same content on a redelivery) and announce it on `shardDone`. This side fetches,
 * checks and hands each shard to runExtraction exactly once.
 *
 * Delivery is at least once; exactly-once per sample comes from the object name (one per shard) and
 * the round's ledger (coordinator/extraction_ledger.ts), plus FeatureCache.putShard being idempotent. Notices are core NATS and may be
 * lost (a NATS restart, a coordinator restart), so the object store is also swept every few seconds:
 * a restarted coordinator finds the shards finished while it was down there and fetches them
 * without extracting again. Tasks are published with Nats-Msg-Id = their wire shard id, so a restart
 * within the stream's duplicate window never queues a shard twice.
 *
 * A shard that keeps failing is not retried forever: the consumer's max_deliver bounds it; the worker
 * that fails the last delivery records a terminal failure, and the server's MAX_DELIVERIES advisory
 * covers workers that died on it. Either fails the job with ShardFailedError naming the shard and the
 * last error.
 *
 * The round itself (publish, watch, verify, retry, fail, finish) is coordinator/extraction_round.ts;
 * this file is the ShardExecutor seam runExtraction calls.
 */
import type { NatsConnection } from "nats";
import type { JobOptions } from "../core/runtime/config.js";
import type { Dataset } from "../core/datasets/types.js";
import type { FeatureExtractor } from "../core/models/feature_model.js";
import type { FeatureShardData } from "../core/datasets/feature_store.js";
import type { Logger } from "../core/runtime/log.js";
import type { CtrainMetrics } from "../core/runtime/metrics.js";
import { DEFAULT_ACK_WAIT_MS, DEFAULT_MAX_DELIVER } from "../proto/extraction_wire.js";
import type { Shard, ShardExecutor } from "../core/datasets/shards.js";
import { ExtractionRoundRun, type ExecutorStats } from "./extraction_round.js";
export { checkAgainstPlan, ShardRejected } from "./extraction_plan_check.js";
export type { ExecutorStats } from "./extraction_round.js";

export interface NatsExecutorOptions {
  nc: NatsConnection;
  opts: JobOptions;
  log: Logger;
  metrics?: CtrainMetrics;
  /** Ack wait of the task consumer, ms. Default {@link DEFAULT_ACK_WAIT_MS}. */
  ackWaitMs?: number;
  /** Deliveries of a task before the job fails. Default {@link DEFAULT_MAX_DELIVER}. */
  maxDeliver?: number;
  /**
   * Fallback sweep period, ms: failure records are read every sweep; the object store is listed when no
   * shard-done notice came for a whole period, and every 10th sweep regardless. Default 2000.
   */
  sweepMs?: number;
  /** Aborting fails the extraction with the signal's reason (e.g. every local worker process died). */
  signal?: AbortSignal;
}

/** The executor factory for runJob's `deps.executor`. */
export function natsExecutorFactory(o: NatsExecutorOptions): (ctx: { dataset: Dataset; extractor: FeatureExtractor }) => Promise<NatsShardExecutor> {
  return async ({ dataset, extractor }) => new NatsShardExecutor(o, dataset, extractor);
}

export class NatsShardExecutor implements ShardExecutor {
  /** Summed over every round this executor ran. */
  readonly stats: ExecutorStats = { tasksPublished: 0, taskBytesOut: 0, shardsFetched: 0, featureBytesIn: 0, noticesIn: 0, noticeBytesIn: 0, storeListings: 0 };

  constructor(
    private readonly o: NatsExecutorOptions,
    private readonly dataset: Dataset,
    private readonly extractor: FeatureExtractor,
  ) {}

  describe(): { workers: number } {
    return { workers: this.o.opts.workers };
  }

  /** Extracts `shards` on the job's workers as one round; rejects with ShardFailedError when a shard gives up. */
  async run(shards: Shard[], onShard: (d: FeatureShardData) => Promise<void>, onImages: (n: number, skipped: number) => void): Promise<void> {
    const { nc, opts, log, metrics, signal } = this.o;
    const round = { nc, opts, log, metrics, signal, ackWaitMs: this.o.ackWaitMs ?? DEFAULT_ACK_WAIT_MS, maxDeliver: this.o.maxDeliver ?? DEFAULT_MAX_DELIVER, sweepMs: this.o.sweepMs ?? 2000 };
    await new ExtractionRoundRun(round, this.dataset, this.extractor, shards, { onShard, onImages }, this.stats).run();
  }
}

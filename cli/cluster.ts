/**
 * The cluster a job runs on, built once from the options by the command that runs the job and handed
 * to runJob (coordinator/job.ts): where extraction runs (this process, or the workers over NATS), how
 * many workers there are, and whether fine-tuning is data-parallel on them. `--workers` reaches the
 * job by this road only; the coordinator role never builds an executor itself.
 */
import type { NatsConnection } from "nats";
import { fineTunesDataParallel, type JobOptions } from "../core/runtime/config.js";
import type { Logger } from "../core/runtime/log.js";
import type { CtrainMetrics } from "../core/runtime/metrics.js";
import type { JobCluster } from "../coordinator/job.js";
import { natsExecutorFactory } from "../coordinator/nats_executor.js";
import { LocalShardExecutor } from "../worker/local_executor.js";

/** Everything in this process: extraction by `--extract-batch-size` images per forward pass, fine-tuning here. */
export function inProcessCluster(opts: JobOptions, metrics?: CtrainMetrics): JobCluster {
  return { workers: 0, executor: async ({ dataset, extractor }) => new LocalShardExecutor(dataset, extractor, opts.extractBatchSize, metrics) };
}

export interface NatsClusterOptions {
  /** The job's NATS connection; called when there is work (a cache hit connects nothing). */
  connect: () => Promise<NatsConnection>;
  log: Logger;
  metrics?: CtrainMetrics;
  /** Ack wait of the task consumer, ms. Default: the wire's (proto/extraction_wire.ts). */
  ackWaitMs?: number;
  /** Deliveries of a task before the job fails. Default: the wire's. */
  maxDeliver?: number;
  /** Aborting fails the extraction with the signal's reason (e.g. every local worker process died). */
  signal?: AbortSignal;
}

/** `--workers` workers behind NATS: extraction shards over the job's queue; fine-tuning data-parallel per {@link fineTunesDataParallel}. */
export function natsCluster(opts: JobOptions, o: NatsClusterOptions): JobCluster {
  return {
    workers: opts.workers,
    executor: async (ctx) => natsExecutorFactory({ nc: await o.connect(), opts, log: o.log, metrics: o.metrics, ackWaitMs: o.ackWaitMs, maxDeliver: o.maxDeliver, signal: o.signal })(ctx),
    ...(fineTunesDataParallel(opts) ? { trainer: o.connect } : {}),
  };
}

/** Whether `ctrain run` needs NATS and worker processes: several workers, a given server, or data-parallel asked for. */
export function runsOnWorkers(opts: JobOptions): boolean {
  return opts.workers > 1 || opts.nats !== "" || opts.dataParallel === "on";
}

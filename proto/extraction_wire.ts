/**
 * What coordinator and extraction workers agree on beyond the messages of trainer.proto: the
 * work-queue stream and consumer settings, the names of objects and KV keys of one extraction
 * round, and the shard failure record.
 *
 * A job may extract more than once (pooled features, then the activations at the fine-tuning cut),
 * with the same shard ids each time. Each round is named by its feature-cache key (extractor +
 * data set fingerprints), so its tasks, objects and JobSpec never mix with another round's:
 *   task / object name   `<round>.<shard id>`   (also the Nats-Msg-Id of the first publish)
 *   state KV keys        `spec.<round>`   the JobSpec a worker extracts this round with
 *                        `error.<round>.<shard>`   last error of a shard (retried)
 *                        `failed.<round>.<shard>`  the shard gave up (max deliveries): the job fails
 * Failure records are ShardError messages (trainer.proto), checked on read like any message.
 */
import { AckPolicy, DeliverPolicy, nanos, RetentionPolicy, StorageType, type JetStreamManager } from "nats";
import { decode, encode, makeHeader } from "./codec.js";
import type { JobNames } from "./subjects.js";

/** Time a worker may hold a task without an in-progress ack before it is redelivered, ms. */
export const DEFAULT_ACK_WAIT_MS = 30_000;
/** Deliveries of a task before it is given up (the job then fails naming the shard). */
export const DEFAULT_MAX_DELIVER = 5;
/** How long the stream remembers a Nats-Msg-Id, so a restarted coordinator does not publish a task twice. */
export const DUPLICATE_WINDOW_MS = 60 * 60_000;

/** JobSpec `extra` keys. */
export const SPEC_EXTRA = {
  round: "extraction_round",
  extractorFingerprint: "extractor_fingerprint",
  datasetFingerprint: "dataset_fingerprint",
  /** The preprocessing the coordinator's extractor uses (absent: the model's own). */
  preprocessing: "preprocessing",
  /** `--engine-precision` of the coordinator's extractor (absent: fp32). */
  precision: "engine_precision",
} as const;

/** Round id from a feature-cache key: `r` + 16 hex digits. */
export function roundId(cacheKey: string): string {
  return `r${cacheKey.slice(0, 16)}`;
}

export function wireShardId(round: string, shardId: string): string {
  return `${round}.${shardId}`;
}

/** Splits a wire shard id; undefined when it is not one. */
export function parseWireShardId(wire: string): { round: string; shardId: string } | undefined {
  const m = /^(r[0-9a-f]{16})\.([A-Za-z0-9_-]+)$/.exec(wire);
  return m ? { round: m[1], shardId: m[2] } : undefined;
}

export const specKey = (round: string): string => `spec.${round}`;
export const errorKey = (wire: string): string => `error.${wire}`;
export const failedKey = (wire: string): string => `failed.${wire}`;

/** A shard's last error (state KV, a ShardError message). */
export interface ShardErrorRecord {
  shard: string;
  worker: string;
  /** Delivery count of the attempt that failed. */
  attempt: number;
  error: string;
  /** Unix ms. */
  at: number;
}

export function encodeShardError(job: string, r: ShardErrorRecord): Uint8Array {
  return encode("ShardError", { header: makeHeader(job, r.worker), shardId: r.shard, worker: r.worker, attempt: r.attempt, error: r.error || "(no message)", atUnixMs: r.at });
}

/** Throws DecodeError for bytes that are not a ShardError of `job`. */
export function decodeShardError(job: string, bytes: Uint8Array): ShardErrorRecord {
  const m = decode("ShardError", bytes, { job, self: "coordinator", peer: "worker" });
  return { shard: m.shardId, worker: m.worker, attempt: m.attempt, error: m.error, at: m.atUnixMs };
}

/** Creates (or updates) the job's work-queue stream and its durable pull consumer. Idempotent. */
export async function ensureTaskQueue(jsm: JetStreamManager, names: JobNames, o: { ackWaitMs: number; maxDeliver: number }): Promise<void> {
  try {
    await jsm.streams.info(names.tasksStream);
  } catch {
    try {
      await jsm.streams.add({
        name: names.tasksStream,
        subjects: [names.tasks],
        retention: RetentionPolicy.Workqueue,
        storage: StorageType.File,
        duplicate_window: nanos(DUPLICATE_WINDOW_MS),
      });
    } catch (err) {
      // Another coordinator (or a restart racing us) created it first.
      await jsm.streams.info(names.tasksStream).catch(() => {
        throw err;
      });
    }
  }
  const config = {
    durable_name: names.tasksConsumer,
    ack_policy: AckPolicy.Explicit,
    deliver_policy: DeliverPolicy.All,
    ack_wait: nanos(o.ackWaitMs),
    max_deliver: o.maxDeliver,
    filter_subject: names.tasks,
  };
  try {
    await jsm.consumers.add(names.tasksStream, config);
  } catch {
    await jsm.consumers.update(names.tasksStream, names.tasksConsumer, { ack_wait: config.ack_wait, max_deliver: config.max_deliver });
  }
}

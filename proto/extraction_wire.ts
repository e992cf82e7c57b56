/**
 * What coordinator and extraction workers agree on beyond the messages of trainer.proto: the
 * work-queue stream and consumer settings, the names of objects and KV keys of one extraction
 * round, the round's settings (JobOptions + extractor <-> ExtractionRound) and the shard failure record.
 *
 * A job may extract more than once (pooled features, then the activations at the fine-tuning cut),
 * with the same shard ids each time. Each round is named by its feature-cache key (extractor +
 * data set fingerprints), so its tasks, objects and JobSpec never mix with another round's:
 *   task / object name   `<round>.<shard id>`   (also the Nats-Msg-Id of the first publish)
 *   state KV keys        `spec.<round>`   the JobSpec (kind extraction) a worker extracts this round with
 *                        `error.<round>.<shard>`   last error of a shard (retried)
 *                        `failed.<round>.<shard>`  the shard gave up (max deliveries): the job fails
 *                        `retry.<round>.<shard>`   attempts of a shard whose stored result was rejected
 * Failure records are ShardError messages (trainer.proto), checked on read like any message.
 */
import { AckPolicy, DeliverPolicy, nanos, RetentionPolicy, StorageType, type JetStreamManager, type ObjectStore } from "nats";
import type { BackendName, EngineName, EnginePrecision, JobOptions, Pooling } from "../core/runtime/config.js";
import type { OpenOptions } from "../core/datasets/open.js";
import type { Preprocessing } from "../core/models/model_zoo.js";
import { decode, encode, makeHeader, type ExtractionJobSpec, type ExtractionRound } from "./codec.js";
import type { JobNames } from "./subjects.js";

/** Time a worker may hold a task without an in-progress ack before it is redelivered, ms. */
export const DEFAULT_ACK_WAIT_MS = 30_000;
/** Deliveries of a task before it is given up (the job then fails naming the shard). */
export const DEFAULT_MAX_DELIVER = 5;
/** How long the stream remembers a Nats-Msg-Id, so a restarted coordinator does not publish a task twice. */
export const DUPLICATE_WINDOW_MS = 60 * 60_000;

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

/** Keys of an extraction round in the job's state KV (see the top of this file). */
export const ROUND_KEYS = {
  /** The round's JobSpec. */
  spec: (round: string): string => `spec.${round}`,
  /** Last error of a shard (a ShardError). */
  error: (wire: string): string => `error.${wire}`,
  /** A shard given up (a ShardError): the job fails naming it. */
  failed: (wire: string): string => `failed.${wire}`,
  /** Every `failed` key of a round (a KV key filter). */
  failedOfRound: (round: string): string => `failed.${round}.>`,
  /** Every `error` key of the job (what a worker may write: proto/nats_permissions.ts). */
  errorAll: "error.>",
  /** Every `failed` key of the job (what a worker may write). */
  failedAll: "failed.>",
  /** Attempts of a shard whose stored result was rejected (decimal text). */
  retry: (wire: string): string => `retry.${wire}`,
  /** The wire shard id of a `failed` key; undefined for any other key. */
  shardOfFailed(key: string): string | undefined {
    return key.startsWith("failed.") && parseWireShardId(key.slice("failed.".length)) ? key.slice("failed.".length) : undefined;
  },
} as const;

/**
 * Nats-Msg-Id of a task: the wire shard id on the first publish (so a restarted coordinator within
 * the duplicate window does not queue it twice), `<wire>@<attempt>` when it is published again.
 */
export function taskMessageId(wire: string, attempt: number): string {
  return attempt === 1 ? wire : `${wire}@${attempt}`;
}

/** The fields of the server's MAX_DELIVERIES advisory (JSON) that ctrain reads; undefined when it names no message. */
export function parseMaxDeliveriesAdvisory(bytes: Uint8Array): { streamSeq: number; deliveries?: number } | undefined {
  let a: { stream_seq?: unknown; deliveries?: unknown };
  try {
    a = JSON.parse(new TextDecoder().decode(bytes)) as typeof a;
  } catch {
    return undefined;
  }
  if (typeof a?.stream_seq !== "number" || !(a.stream_seq > 0)) return undefined;
  return { streamSeq: a.stream_seq, deliveries: typeof a.deliveries === "number" ? a.deliveries : undefined };
}

/** Attempt count stored under {@link ROUND_KEYS.retry}; 1 when absent or unreadable. */
export function decodeAttempts(bytes: Uint8Array | undefined): number {
  const n = bytes?.length ? Number(new TextDecoder().decode(bytes)) : 1;
  return Number.isSafeInteger(n) && n >= 1 ? n : 1;
}

export function encodeAttempts(n: number): Uint8Array {
  return new TextEncoder().encode(String(n));
}

/** What the coordinator knows when it opens a round: the job's options and its extractor and data set. */
export interface RoundSource {
  opts: Pick<JobOptions, "data" | "model" | "seed" | "valSplit" | "testSplit" | "limit" | "maxPixels" | "engine" | "threads" | "backend" | "extractBatchSize">;
  extractor: { inputSize: number; featureLayer: string; pooling: Pooling; preprocessing: Preprocessing; fingerprint: string; engine: { precision: EnginePrecision } };
  datasetFingerprint: string;
  round: string;
}

/** What an extraction worker needs of a round, in the domain's own types. */
export interface RoundSettings {
  round: string;
  /** Data set spec and how it is opened (split, capped). */
  data: string;
  open: OpenOptions;
  extractor: { model: string; inputSize: number; featureLayer: string; pooling: Pooling; preprocessing: Preprocessing; engine: EngineName; precision: EnginePrecision };
  /** onnxruntime threads per worker process; 0 = the worker decides. */
  threads: number;
  /** The coordinator's compute backend (the worker runs on its own). */
  backend: BackendName;
  /** Images per frozen forward pass. */
  imagesPerBatch: number;
  extractorFingerprint: string;
  datasetFingerprint: string;
}

/**
 * The ExtractionRound of a round. Every value comes from the job's options (their defaults are the
 * option table's, core/runtime/config.ts) or from the coordinator's extractor, which resolved the
 * feature layer, the preprocessing and the precision: the worker builds the same graph.
 */
export function toExtractionRound(s: RoundSource): ExtractionRound {
  const { opts: o, extractor: x } = s;
  return {
    round: s.round, data: o.data, seed: o.seed, valSplit: o.valSplit, testSplit: o.testSplit, limit: o.limit, maxPixels: o.maxPixels,
    model: o.model, inputSize: x.inputSize, featureLayer: x.featureLayer, pooling: x.pooling, preprocessing: x.preprocessing,
    engine: o.engine, precision: x.engine.precision, threads: o.threads, backend: o.backend, imagesPerBatch: o.extractBatchSize,
    extractorFingerprint: x.fingerprint, datasetFingerprint: s.datasetFingerprint,
  };
}

/** The JobSpec (kind extraction) the coordinator stores under {@link ROUND_KEYS.spec}. */
export function extractionJobSpec(job: string, s: RoundSource, sender = "coordinator"): ExtractionJobSpec {
  return { header: makeHeader(job, sender), extraction: toExtractionRound(s) };
}

/** A decoded round (the codec checked it) as the worker uses it. */
export function fromExtractionRound(r: ExtractionRound): RoundSettings {
  return {
    round: r.round, data: r.data, open: { seed: r.seed, valSplit: r.valSplit, testSplit: r.testSplit, limit: r.limit, maxPixels: r.maxPixels },
    extractor: { model: r.model, inputSize: r.inputSize, featureLayer: r.featureLayer, pooling: r.pooling, preprocessing: r.preprocessing, engine: r.engine, precision: r.precision },
    threads: r.threads, backend: r.backend, imagesPerBatch: r.imagesPerBatch, extractorFingerprint: r.extractorFingerprint, datasetFingerprint: r.datasetFingerprint,
  };
}

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

/** Object-store subject of an object's metadata: `$O.<bucket>.M.<name, base64url with padding>` (as nats.js names it). */
export function objectMetaSubject(bucket: string, name: string): string {
  return `$O.${bucket}.M.${Buffer.from(name, "utf8").toString("base64").replace(/\+/g, "-").replace(/\//g, "_")}`;
}

/**
 * Removes a stored feature shard from the object store, leaving nothing behind: its metadata message,
 * then its chunks. `ObjectStore.delete()` is not enough: it leaves a delete marker (a metadata message)
 * for every shard, spread over all the 8 MB blocks of the bucket's file store, so nats-server keeps
 * every block (the whole data set's features on disk: 1.4 GB at 10^5 images of block_12_add) and
 * reads all of them back into memory each time the bucket is listed (the coordinator's sweep): its
 * RSS grew with the data set (2.8 GiB at 10^5). Emptied blocks are removed, so the store holds only
 * shards in flight. Metadata first: a crash in between leaves chunks no one reads, never an object
 * whose chunks are gone (reading it would wait for them forever). Resolves false when there was none.
 */
export async function purgeObject(jsm: JetStreamManager, os: ObjectStore, bucket: string, name: string): Promise<boolean> {
  const info = await os.info(name);
  const stream = `OBJ_${bucket}`;
  await jsm.streams.purge(stream, { filter: objectMetaSubject(bucket, name) });
  if (!info) return false;
  await jsm.streams.purge(stream, { filter: `$O.${bucket}.C.${info.nuid}` });
  return !info.deleted;
}

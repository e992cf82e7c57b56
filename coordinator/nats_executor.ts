/**
 * The distributed ShardExecutor: shards become ShardTasks on the job's JetStream work queue, workers
 * elsewhere extract them, put each FeatureShard into the job's object store (one object per shard,
 * overwritten with the same content on a redelivery) and announce it on `shardDone`. This side fetches,
 * checks and hands each shard to runExtraction exactly once.
 *
 * Delivery is at least once; exactly-once per sample comes from the object name (one per shard) and
 * the `done` set here, plus FeatureCache.putShard being idempotent. Notices are core NATS and may be
 * lost (a NATS restart, a coordinator restart), so the object store is also swept every few seconds:
 * a restarted coordinator finds the shards finished while it was down there and fetches them
 * without extracting again. Tasks are published with Nats-Msg-Id = their wire shard id, so a restart
 * within the stream's duplicate window never queues a shard twice.
 *
 * A shard that keeps failing is not retried forever: the consumer's max_deliver bounds it; the worker
 * that fails the last delivery records a terminal failure, and the server's MAX_DELIVERIES advisory
 * covers workers that died on it. Either fails the job with ShardFailedError naming the shard and the
 * last error.
 */
import { type JetStreamClient, type JetStreamManager, type KV, type NatsConnection, type ObjectStore, type Subscription } from "nats";
import type { JobOptions } from "../core/runtime/config.js";
import type { Dataset, SampleRef, Split as DataSplit } from "../core/datasets/types.js";
import {
  decodeShardError, DEFAULT_ACK_WAIT_MS, DEFAULT_MAX_DELIVER, ensureTaskQueue, errorKey, failedKey, parseWireShardId, roundId, SPEC_EXTRA, specKey, wireShardId,
  type ShardErrorRecord,
} from "../proto/extraction_wire.js";
import { StorageError } from "../core/runtime/errors.js";
import type { FeatureExtractor } from "../core/models/feature_model.js";
import { cacheKey, type FeatureShardData } from "../core/datasets/feature_store.js";
import type { Logger } from "../core/runtime/log.js";
import type { CtrainMetrics } from "../core/runtime/metrics.js";
import { bytesToFloat32 } from "../proto/tensor_codec.js";
import { decode, DecodeError, encode, makeHeader, type FeatureShard, type JobSpec, type Split as WireSplit } from "../proto/codec.js";
import { jobNames, WORKER_REGISTRY_TTL_MS, type JobNames } from "../proto/subjects.js";
import type { Shard, ShardExecutor } from "../core/datasets/shards.js";
import { WorkerRegistryMonitor } from "./worker_registry.js";
import { ShardFailedError } from "../core/runtime/errors.js";
/** Re-exported from core/runtime/errors.ts, where every error that decides recovery lives. */
export { ShardFailedError };

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
  /** Workers to report in describe(). Default opts.workers. */
  workers?: number;
  /** Aborting fails the extraction with the signal's reason (e.g. every local worker process died). */
  signal?: AbortSignal;
}

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
 * The trust boundary of extraction results: a worker supplies only feature rows. Ids must be exactly
 * the plan's samples (extracted or skipped, each once), labels and splits must echo the plan's, rows
 * must have the extractor's size (the codec already checked bytes = rows x size x 4, i.e. float32).
 * What is kept takes labels and splits from the plan, never from the worker. Throws ShardRejected.
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
  const badSplit = samples.findIndex((x, i) => TO_WIRE_SPLIT[x.split] !== fs.splits[i]);
  if (badSplit >= 0) throw new ShardRejected("shard_splits", `sample ${fs.ids[badSplit]} in split ${fs.splits[badSplit]}, the plan says ${samples[badSplit].split}`);
  return {
    shardId: shard.id, ids: samples.map((x) => x.id), labels: samples.map((x) => x.label), splits: samples.map((x) => x.split),
    features: bytesToFloat32(fs.features), skipped: fs.skipped.map((s) => ({ id: s.id, reason: s.reason, message: s.message })),
  };
}

/** Coordinator-side cost counters (bench/extract_distributed.ts reads them). */
export interface ExecutorStats {
  tasksPublished: number;
  taskBytesOut: number;
  shardsFetched: number;
  featureBytesIn: number;
  noticesIn: number;
  noticeBytesIn: number;
  /** Object-store listings by the fallback sweep. */
  storeListings: number;
}

const TO_WIRE_SPLIT: Record<DataSplit, WireSplit> = { train: "train", val: "validation", test: "test" };
const FROM_WIRE_SPLIT: Record<WireSplit, DataSplit> = { train: "train", validation: "val", test: "test" };

/** The JobSpec of one extraction round. */
export function jobSpecFor(opts: JobOptions, extractor: FeatureExtractor, dataset: Dataset, round: string, sender = "coordinator"): JobSpec {
  const { featureLayer, pooling } = extractor;
  return {
    header: makeHeader(opts.job, sender),
    data: opts.data, model: opts.model, inputSize: extractor.inputSize, featureLayer, pooling, method: opts.method,
    batchSize: opts.batchSize, seed: opts.seed, backend: opts.backend, limit: opts.limit, valSplit: opts.valSplit, testSplit: opts.testSplit,
    shardSize: opts.shardSize, maxPixels: opts.maxPixels, fineTuneLayers: opts.fineTuneLayers, learningRate: opts.learningRate,
    fineTuneLearningRate: opts.fineTuneLearningRate, wireDtype: opts.wireDtype, headUnits: opts.headUnits, dropout: opts.dropout,
    numClasses: dataset.classes.length, bucketBytes: 0, engine: opts.engine, threads: opts.threads,
    extra: { [SPEC_EXTRA.round]: round, [SPEC_EXTRA.extractorFingerprint]: extractor.fingerprint, [SPEC_EXTRA.datasetFingerprint]: dataset.fingerprint, [SPEC_EXTRA.preprocessing]: extractor.preprocessing, [SPEC_EXTRA.precision]: extractor.engine.precision },
  };
}

/** The executor factory for runJob's `deps.executor`. */
export function natsExecutorFactory(o: NatsExecutorOptions): (ctx: { dataset: Dataset; extractor: FeatureExtractor }) => Promise<NatsShardExecutor> {
  return async ({ dataset, extractor }) => new NatsShardExecutor(o, dataset, extractor);
}

export class NatsShardExecutor implements ShardExecutor {
  readonly stats: ExecutorStats = { tasksPublished: 0, taskBytesOut: 0, shardsFetched: 0, featureBytesIn: 0, noticesIn: 0, noticeBytesIn: 0, storeListings: 0 };
  private readonly names: JobNames;

  constructor(
    private readonly o: NatsExecutorOptions,
    private readonly dataset: Dataset,
    private readonly extractor: FeatureExtractor,
  ) {
    this.names = jobNames(o.opts.job);
  }

  describe(): { workers: number } {
    return { workers: this.o.workers ?? this.o.opts.workers };
  }

  async run(shards: Shard[], onShard: (d: FeatureShardData) => Promise<void>, onImages: (n: number, skipped: number) => void): Promise<void> {
    const { nc, log, metrics, opts } = this.o;
    const names = this.names;
    const ackWaitMs = this.o.ackWaitMs ?? DEFAULT_ACK_WAIT_MS;
    const maxDeliver = this.o.maxDeliver ?? DEFAULT_MAX_DELIVER;
    const jsm: JetStreamManager = await nc.jetstreamManager();
    const js: JetStreamClient = nc.jetstream();
    await ensureTaskQueue(jsm, names, { ackWaitMs, maxDeliver });
    const state: KV = await js.views.kv(names.stateBucket, { history: 1 });
    const registryKv: KV = await js.views.kv(names.workersBucket, { history: 1, ttl: WORKER_REGISTRY_TTL_MS });
    const os: ObjectStore = await js.views.os(names.featuresBucket);

    const round = roundId(cacheKey(this.extractor.fingerprint, this.dataset.fingerprint));
    await state.put(specKey(round), encode("JobSpec", jobSpecFor(opts, this.extractor, this.dataset, round)));

    const pending = new Map<string, Shard>(shards.map((s) => [wireShardId(round, s.id), s]));
    const shardOf = (wire: string): Shard | undefined => pending.get(wire);
    const fetching = new Set<string>();
    const imagesSeen = new Map<string, number>();
    const counts = { pending: shards.length, running: 0, done: 0, failed: 0 };
    const running = new Set<string>();
    const setShards = (): void => metrics?.setShards({ ...counts, running: running.size, pending: pending.size - running.size });

    let finish!: () => void;
    let fail!: (e: Error) => void;
    const finished = new Promise<void>((resolve, reject) => {
      finish = resolve;
      fail = reject;
    });
    finished.catch(() => undefined); // rejections are awaited below; this keeps an early one from counting as unhandled
    let failed: Error | undefined;
    const failJob = (e: Error): void => {
      if (failed) return;
      failed = e;
      counts.failed++;
      setShards();
      fail(e);
    };

    // Republish a task whose stored result was unusable (or that a previous run gave up on).
    const publishTask = async (wire: string, attempt: number): Promise<void> => {
      const s = pending.get(wire);
      if (!s) return;
      const bytes = encode("ShardTask", {
        header: makeHeader(opts.job, "coordinator"), shardId: wire, ids: s.samples.map((x) => x.id), labels: s.samples.map((x) => x.label),
        splits: s.samples.map((x) => TO_WIRE_SPLIT[x.split]), attempt,
      });
      await js.publish(names.tasks, bytes, { msgID: attempt === 1 ? wire : `${wire}@${attempt}` });
      this.stats.tasksPublished++;
      this.stats.taskBytesOut += bytes.length;
    };

    const fetchShard = async (wire: string, worker?: string): Promise<void> => {
      const shard = shardOf(wire);
      if (!shard || fetching.has(wire) || failed) return;
      fetching.add(wire);
      try {
        const blob = await os.getBlob(wire);
        if (!blob) return; // announced but not visible yet: the sweep tries again
        this.stats.shardsFetched++;
        this.stats.featureBytesIn += blob.length;
        let data: FeatureShardData;
        let fs: FeatureShard | undefined;
        try {
          fs = decode("FeatureShard", blob, { job: opts.job, peer: "worker" });
          data = checkAgainstPlan(fs, wire, shard, this.extractor.featureDim);
        } catch (err) {
          if (!(err instanceof DecodeError) && !(err instanceof ShardRejected)) throw err;
          metrics?.droppedMessage(err.reason);
          if (err instanceof DecodeError) metrics?.decodeError();
          log.warn("dropped a stored feature shard; extracting it again", { shard: wire, reason: err.reason, error: err.message });
          await os.delete(wire).catch(() => undefined);
          const attempt = ((await state.get(`retry.${wire}`).then((e) => (e?.value.length ? Number(new TextDecoder().decode(e.value)) : 1)).catch(() => 1)) || 1) + 1;
          await state.put(`retry.${wire}`, new TextEncoder().encode(String(attempt)));
          // A worker that keeps sending bad results must not keep the job busy forever.
          if (attempt > maxDeliver) return failJob(shardFailed(wire, attempt - 1, { shard: wire, worker: fs?.worker ?? "?", attempt: attempt - 1, error: `result rejected: ${err.message}`, at: Date.now() }));
          await publishTask(wire, attempt);
          return;
        }
        await onShard(data);
        // Only once stored: removed before, a faster shard fetched alongside could empty `pending` and
        // finish the run while this one was still being written, and the commit then missed its samples.
        if (!pending.has(wire)) return;
        pending.delete(wire);
        running.delete(wire);
        counts.done++;
        setShards();
        const seen = imagesSeen.get(wire) ?? 0;
        onImages(Math.max(0, shard.samples.length - seen), data.skipped.length);
        log.debug("shard stored", { shard: shard.id, worker: fs.worker || worker, samples: data.ids.length, skipped: data.skipped.length, seconds: Number(fs.seconds.toFixed(3)) });
        if (pending.size === 0) finish();
      } catch (err) {
        // A disk that cannot take the shard will not take it on the next sweep either: stop now, saying where.
        if (err instanceof StorageError) failJob(err);
        else log.debug("fetching a shard failed (the sweep retries)", { shard: wire, error: err as Error });
      } finally {
        fetching.delete(wire);
      }
    };

    const subs: Subscription[] = [];
    const timers: NodeJS.Timeout[] = [];
    const sweepMs = this.o.sweepMs ?? 2000;
    let lastNotice = performance.now();
    let sweeps = 0;
    const registry = new WorkerRegistryMonitor(registryKv, opts.job, log, metrics);
    const onAbort = (): void => failJob(this.o.signal?.reason instanceof Error ? this.o.signal.reason : new Error(String(this.o.signal?.reason ?? "extraction aborted")));
    if (this.o.signal?.aborted) onAbort();
    this.o.signal?.addEventListener("abort", onAbort);
    try {
      // Shard-done notices: FeatureShard headers without samples.
      subs.push(nc.subscribe(names.shardDone, {
        callback: (_e, m) => {
          lastNotice = performance.now();
          this.stats.noticesIn++;
          this.stats.noticeBytesIn += m.data.length;
          let n: FeatureShard;
          try {
            n = decode("FeatureShard", m.data, { job: opts.job, peer: "worker" });
          } catch (err) {
            const reason = err instanceof DecodeError ? err.reason : "malformed";
            metrics?.droppedMessage(reason);
            log.warn("dropped a shard-done notice", { reason, error: err as Error });
            return;
          }
          if (!parseWireShardId(n.shardId)) {
            metrics?.droppedMessage("bad_shape");
            return;
          }
          void fetchShard(n.shardId, n.worker);
        },
      }));
      subs.push(nc.subscribe(names.progress, {
        callback: (_e, m) => {
          let p;
          try {
            p = decode("Progress", m.data, { job: opts.job, peer: "worker" });
          } catch (err) {
            metrics?.droppedMessage(err instanceof DecodeError ? err.reason : "malformed");
            return;
          }
          const shard = shardOf(p.shardId);
          if (!shard) return;
          if (!running.has(p.shardId)) {
            running.add(p.shardId);
            setShards();
            log.debug("shard claimed", { shard: shard.id, worker: p.worker });
          }
          const seen = imagesSeen.get(p.shardId) ?? 0;
          const now = Math.min(p.done, shard.samples.length);
          if (now > seen) {
            imagesSeen.set(p.shardId, now);
            onImages(now - seen, 0);
          }
        },
      }));
      const advisory = `$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.${names.tasksStream}.${names.tasksConsumer}`;
      subs.push(nc.subscribe(advisory, {
        callback: (_e, m) => {
          void (async () => {
            const a = JSON.parse(new TextDecoder().decode(m.data)) as { stream_seq?: number; deliveries?: number };
            if (!a.stream_seq) return;
            const sm = await jsm.streams.getMessage(names.tasksStream, { seq: a.stream_seq });
            const t = decode("ShardTask", sm.data, { job: opts.job });
            if (!pending.has(t.shardId)) return;
            const last = await readError(state, errorKey(t.shardId), opts.job, metrics, log);
            await jsm.streams.deleteMessage(names.tasksStream, a.stream_seq).catch(() => undefined);
            failJob(shardFailed(t.shardId, a.deliveries ?? maxDeliver, last));
          })().catch((err: unknown) => log.warn("cannot read a max-deliveries advisory", { error: err as Error }));
        },
      }));

      // Before publishing: shards already stored (a restart) are fetched, not extracted; shards a
      // previous run gave up on start over with a fresh message id.
      const stored = new Set<string>();
      for (const info of await os.list()) if (!info.deleted) stored.add(info.name);
      const resumed = [...pending.keys()].filter((w) => stored.has(w));
      if (resumed.length) log.info("shards already in the object store: fetching without extraction", { shards: resumed.length });
      for (const wire of pending.keys()) {
        if (stored.has(wire)) continue;
        const gaveUp = await state.get(failedKey(wire)).catch(() => null);
        if (gaveUp && gaveUp.operation === "PUT" && gaveUp.value.length) {
          await state.delete(failedKey(wire));
          await publishTask(wire, 2 + gaveUp.revision);
        } else await publishTask(wire, 1);
      }
      log.info("shard tasks queued", { round, shards: pending.size, stream: names.tasksStream, ack_wait_ms: ackWaitMs, max_deliver: maxDeliver });
      setShards();
      if (pending.size === 0) finish();
      await Promise.all(resumed.map((w) => fetchShard(w)));

      registry.start();
      const sweep = async (): Promise<void> => {
        if (failed || pending.size === 0) return;
        try {
          // Listing costs O(every shard of the job) (250-370 ms at 15,000 objects): while notices flow they
          // carry the progress, so list when they went quiet (a lost notice, the end) or every 10th sweep.
          if (++sweeps % 10 === 0 || performance.now() - lastNotice >= sweepMs) {
            this.stats.storeListings++;
            const list = await os.list();
            for (const info of list) if (!info.deleted && pending.has(info.name)) void fetchShard(info.name);
          }
          // Terminal failures recorded by workers.
          const keys = await state.keys(`failed.${round}.>`);
          for await (const k of keys) {
            const wire = k.slice("failed.".length);
            if (!pending.has(wire)) continue;
            const rec = await readError(state, k, opts.job, metrics, log);
            failJob(shardFailed(wire, rec?.attempt ?? maxDeliver, rec));
          }
          const c = registry.counts();
          if (c.alive === 0) log.debug("no worker alive: waiting for one", { pending: pending.size });
        } catch (err) {
          log.debug("sweep failed (retrying)", { error: err as Error });
        }
      };
      timers.push(setInterval(() => void sweep(), sweepMs));
      await finished;
    } finally {
      for (const t of timers) clearInterval(t);
      this.o.signal?.removeEventListener("abort", onAbort);
      // A last look at the registry: a worker that joined and finished its shards between two polls
      // (seconds, with onnxruntime) is still logged and counted as having taken part.
      await registry.poll();
      registry.stop();
      for (const s of subs) s.unsubscribe();
    }
  }
}

/** A worker's failure record; undefined when there is none, or when it does not decode (dropped and counted). */
async function readError(kv: KV, key: string, job: string, metrics: CtrainMetrics | undefined, log: Logger): Promise<ShardErrorRecord | undefined> {
  let e;
  try {
    e = await kv.get(key);
  } catch {
    return undefined;
  }
  if (!e || e.operation !== "PUT" || e.value.length === 0) return undefined;
  try {
    return decodeShardError(job, e.value);
  } catch (err) {
    const reason = err instanceof DecodeError ? err.reason : "malformed";
    metrics?.droppedMessage(reason);
    log.warn("dropped a shard error record that does not decode", { key, reason, error: err as Error });
    return undefined;
  }
}

function shardFailed(wire: string, deliveries: number, last: ShardErrorRecord | undefined): ShardFailedError {
  const shard = parseWireShardId(wire)?.shardId ?? wire;
  const lastError = last ? `${last.error} (worker ${last.worker}, delivery ${last.attempt})` : "no error was reported: the workers holding it died or timed out (ack wait)";
  return new ShardFailedError(shard, lastError, `shard ${shard} failed after ${deliveries} deliveries; last error: ${lastError}. Fix the cause and run the job again with the same --job to resume.`);
}

/** Samples of a shard as a worker sees them (for tests and tools). */
export function samplesOfTask(ids: string[], labels: number[], splits: WireSplit[]): SampleRef[] {
  return ids.map((id, i) => ({ id, label: labels[i], split: FROM_WIRE_SPLIT[splits[i]] }));
}

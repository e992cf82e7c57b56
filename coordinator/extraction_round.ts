/**
 * One extraction round on NATS, coordinator side: publish the round's spec and its shard tasks,
 * watch results (shard-done notices, progress, the server's max-deliveries advisory, a fallback sweep
 * of the object store and of failure records), verify each result against the plan, extract a
 * rejected one again or fail its shard, and finish when every shard is stored. The bookkeeping is
 * ExtractionLedger's (no NATS); the delivery semantics are described in nats_executor.ts.
 */
import type { JetStreamClient, JetStreamManager, KV, Msg, NatsConnection, ObjectStore, Subscription } from "nats";
import type { Dataset } from "../core/datasets/types.js";
import type { FeatureShardData } from "../core/datasets/feature_store.js";
import { cacheKey } from "../core/datasets/feature_store.js";
import type { Shard } from "../core/datasets/shards.js";
import type { FeatureExtractor } from "../core/models/feature_model.js";
import { StorageError } from "../core/runtime/errors.js";
import type { JobOptions } from "../core/runtime/config.js";
import type { Logger } from "../core/runtime/log.js";
import type { CtrainMetrics } from "../core/runtime/metrics.js";
import { decode, DecodeError, encode, makeHeader, type FeatureShard } from "../proto/codec.js";
import {
  decodeAttempts, decodeShardError, encodeAttempts, ensureTaskQueue, extractionJobSpec, parseMaxDeliveriesAdvisory, parseWireShardId, purgeObject, ROUND_KEYS, roundId,
  taskMessageId, type ShardErrorRecord,
} from "../proto/extraction_wire.js";
import { toWireSplit } from "../proto/splits.js";
import { jobNames, WORKER_REGISTRY_TTL_MS, type JobNames } from "../proto/subjects.js";
import { getBytesWithin, putTimeoutMs } from "../core/training/checkpoints.js";
import { checkAgainstPlan, ShardRejected } from "./extraction_plan_check.js";
import { ExtractionLedger, nextAttempt, shardFailed } from "./extraction_ledger.js";
import { WorkerRegistryMonitor } from "./worker_registry.js";

/** Settings of a round (NatsExecutorOptions resolved). */
export interface RoundOptions {
  nc: NatsConnection;
  opts: JobOptions;
  log: Logger;
  metrics?: CtrainMetrics;
  ackWaitMs: number;
  maxDeliver: number;
  /** Fallback sweep period, ms. */
  sweepMs: number;
  signal?: AbortSignal;
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

/** The job's stores a round uses. */
interface RoundStores {
  jsm: JetStreamManager;
  js: JetStreamClient;
  state: KV;
  os: ObjectStore;
  registry: WorkerRegistryMonitor;
}

/** Where a stored shard goes, and how images are counted (runExtraction's callbacks). */
interface RoundSink {
  onShard: (d: FeatureShardData) => Promise<void>;
  onImages: (n: number, skipped: number) => void;
}

export class ExtractionRoundRun {
  private readonly names: JobNames;
  private readonly round: string;
  private readonly ledger: ExtractionLedger;
  private readonly outcome = deferred();
  private stores!: RoundStores;
  private readonly subs: Subscription[] = [];
  private timer?: NodeJS.Timeout;
  private lastNotice = performance.now();
  private sweeps = 0;
  private readonly onAbort = (): void => {
    const r: unknown = this.o.signal?.reason;
    this.failRound(r instanceof Error ? r : new Error(String(r ?? "extraction aborted")));
  };

  constructor(
    private readonly o: RoundOptions,
    private readonly dataset: Dataset,
    private readonly extractor: FeatureExtractor,
    shards: readonly Shard[],
    private readonly sink: RoundSink,
    private readonly stats: ExecutorStats,
  ) {
    this.names = jobNames(o.opts.job);
    this.round = roundId(cacheKey(extractor.fingerprint, dataset.fingerprint));
    this.ledger = new ExtractionLedger(this.round, shards);
  }

  /** Runs the round to its end: resolves when every shard is stored, rejects with the error that ended it. */
  async run(): Promise<void> {
    this.stores = await this.open();
    if (this.o.signal?.aborted) this.onAbort();
    this.o.signal?.addEventListener("abort", this.onAbort);
    try {
      this.subscribe();
      const resumed = await this.queueTasks();
      await Promise.all(resumed.map((w) => this.fetch(w)));
      this.stores.registry.start();
      this.timer = setInterval(() => void this.sweep(), this.o.sweepMs);
      await this.outcome.promise;
    } finally {
      await this.close();
    }
  }

  /** Creates the task queue, opens the stores and publishes the round's spec. */
  private async open(): Promise<RoundStores> {
    const { nc, opts, log, metrics } = this.o;
    const jsm = await nc.jetstreamManager();
    const js = nc.jetstream();
    await ensureTaskQueue(jsm, this.names, { ackWaitMs: this.o.ackWaitMs, maxDeliver: this.o.maxDeliver });
    const state = await js.views.kv(this.names.stateBucket, { history: 1 });
    const registryKv = await js.views.kv(this.names.workersBucket, { history: 1, ttl: WORKER_REGISTRY_TTL_MS });
    const os = await js.views.os(this.names.featuresBucket);
    const spec = extractionJobSpec(opts.job, { opts, extractor: this.extractor, datasetFingerprint: this.dataset.fingerprint, round: this.round });
    await state.put(ROUND_KEYS.spec(this.round), encode("JobSpec", spec));
    return { jsm, js, state, os, registry: new WorkerRegistryMonitor(registryKv, opts.job, log, metrics) };
  }

  private async close(): Promise<void> {
    clearInterval(this.timer);
    this.o.signal?.removeEventListener("abort", this.onAbort);
    // A last look at the registry: a worker that joined and finished its shards between two polls
    // (seconds, with onnxruntime) is still logged and counted as having taken part.
    await this.stores.registry.poll();
    this.stores.registry.stop();
    for (const s of this.subs) s.unsubscribe();
  }

  private subscribe(): void {
    const { nc, log } = this.o;
    this.subs.push(nc.subscribe(this.names.shardDone, { callback: (_e, m) => this.onNotice(m) }));
    this.subs.push(nc.subscribe(this.names.progress, { callback: (_e, m) => this.onProgress(m) }));
    this.subs.push(nc.subscribe(this.names.tasksMaxDeliveries, {
      callback: (_e, m) => void this.onMaxDeliveries(m.data).catch((err: unknown) => log.warn("cannot read a max-deliveries advisory", { error: err as Error })),
    }));
  }

  /**
   * Publishes every pending shard's task, except shards already in the object store (a restart):
   * those are returned, to be fetched without extracting them again.
   */
  private async queueTasks(): Promise<string[]> {
    const stored = new Set<string>();
    for (const info of await this.stores.os.list()) if (!info.deleted) stored.add(info.name);
    const resumed = this.ledger.wires().filter((w) => stored.has(w));
    if (resumed.length) this.o.log.info("shards already in the object store: fetching without extraction", { shards: resumed.length });
    for (const wire of this.ledger.wires()) if (!stored.has(wire)) await this.publishTask(wire, await this.firstAttempt(wire));
    this.o.log.info("shard tasks queued", { round: this.round, shards: this.ledger.remaining, stream: this.names.tasksStream, ack_wait_ms: this.o.ackWaitMs, max_deliver: this.o.maxDeliver });
    this.setShards();
    if (this.ledger.finished) this.outcome.resolve();
    return resumed;
  }

  /** 1, or past the deliveries a previous run gave up after: that shard starts over with a fresh message id. */
  private async firstAttempt(wire: string): Promise<number> {
    const { state } = this.stores;
    const gaveUp = await state.get(ROUND_KEYS.failed(wire)).catch(() => null);
    if (!gaveUp || gaveUp.operation !== "PUT" || !gaveUp.value.length) return 1;
    await state.delete(ROUND_KEYS.failed(wire));
    return 2 + gaveUp.revision;
  }

  private async publishTask(wire: string, attempt: number): Promise<void> {
    const samples = this.ledger.shard(wire)?.samples;
    if (!samples) return;
    const bytes = encode("ShardTask", {
      header: makeHeader(this.o.opts.job, "coordinator"), shardId: wire, ids: samples.map((x) => x.id), labels: samples.map((x) => x.label),
      splits: samples.map((x) => toWireSplit(x.split)), attempt,
    });
    await this.stores.js.publish(this.names.tasks, bytes, { msgID: taskMessageId(wire, attempt) });
    this.stats.tasksPublished++;
    this.stats.taskBytesOut += bytes.length;
  }

  /** A shard-done notice (a FeatureShard header without samples): fetch the stored shard. */
  private onNotice(m: Msg): void {
    this.lastNotice = performance.now();
    this.stats.noticesIn++;
    this.stats.noticeBytesIn += m.data.length;
    let n: FeatureShard;
    try {
      n = decode("FeatureShard", m.data, { job: this.o.opts.job, peer: "worker" });
    } catch (err) {
      const reason = err instanceof DecodeError ? err.reason : "malformed";
      this.o.metrics?.droppedMessage(reason);
      this.o.log.warn("dropped a shard-done notice", { reason, error: err as Error });
      return;
    }
    if (!parseWireShardId(n.shardId)) {
      this.o.metrics?.droppedMessage("bad_shape");
      return;
    }
    void this.fetch(n.shardId, n.worker);
  }

  private onProgress(m: Msg): void {
    let p;
    try {
      p = decode("Progress", m.data, { job: this.o.opts.job, peer: "worker" });
    } catch (err) {
      this.o.metrics?.droppedMessage(err instanceof DecodeError ? err.reason : "malformed");
      return;
    }
    const r = this.ledger.progress(p.shardId, p.done);
    if (!r) return;
    if (r.claimed) {
      this.setShards();
      this.o.log.debug("shard claimed", { shard: this.ledger.shard(p.shardId)?.id, worker: p.worker });
    }
    if (r.images > 0) this.sink.onImages(r.images, 0);
  }

  /** The server gave up on a task (its workers died or timed out on every delivery): the shard fails. */
  private async onMaxDeliveries(data: Uint8Array): Promise<void> {
    const a = parseMaxDeliveriesAdvisory(data);
    if (!a) return;
    const { jsm, state } = this.stores;
    const sm = await jsm.streams.getMessage(this.names.tasksStream, { seq: a.streamSeq });
    const t = decode("ShardTask", sm.data, { job: this.o.opts.job });
    if (!this.ledger.shard(t.shardId)) return;
    const last = await this.readError(state, ROUND_KEYS.error(t.shardId));
    await jsm.streams.deleteMessage(this.names.tasksStream, a.streamSeq).catch(() => undefined);
    this.failRound(shardFailed(t.shardId, a.deliveries ?? this.o.maxDeliver, last));
  }

  /** Fetches a stored shard, verifies it and stores it; a disk error ends the round, anything else waits for the sweep. */
  private async fetch(wire: string, worker?: string): Promise<void> {
    const shard = this.ledger.shard(wire);
    if (!shard || !this.ledger.beginFetch(wire)) return;
    try {
      const info = await this.stores.os.info(wire);
      if (!info || info.deleted) return; // announced but not visible yet: the sweep tries again
      // A redelivered shard finished twice rewrites the object while it is read, and the read would
      // wait for the first copy's purged chunks forever (the ledger lets no second fetch start):
      // bounded, and a stalled read is left to the sweep, which reads the copy that stayed.
      const blob = await getBytesWithin(this.stores.os, wire, putTimeoutMs(info.size));
      if (blob === undefined) {
        this.o.log.info("reading a stored shard stalled (rewritten while read: finished twice?); the sweep reads it again", { shard: wire, bytes: info.size });
        return;
      }
      if (!blob) return;
      this.stats.shardsFetched++;
      this.stats.featureBytesIn += blob.length;
      const ok = await this.verify(blob, wire, shard);
      if (ok) await this.store(wire, ok.data, ok.fs, worker);
    } catch (err) {
      // A disk that cannot take the shard will not take it on the next sweep either: stop now, saying where.
      if (err instanceof StorageError) this.failRound(err);
      else this.o.log.debug("fetching a shard failed (the sweep retries)", { shard: wire, error: err as Error });
    } finally {
      this.ledger.endFetch(wire);
    }
  }

  /** The stored result checked against the plan; undefined when it was dropped (then it is extracted again). */
  private async verify(blob: Uint8Array, wire: string, shard: Shard): Promise<{ data: FeatureShardData; fs: FeatureShard } | undefined> {
    let fs: FeatureShard | undefined;
    try {
      fs = decode("FeatureShard", blob, { job: this.o.opts.job, peer: "worker" });
      return { data: checkAgainstPlan(fs, wire, shard, this.extractor.featureDim), fs };
    } catch (err) {
      if (!(err instanceof DecodeError) && !(err instanceof ShardRejected)) throw err;
      this.o.metrics?.droppedMessage(err.reason);
      if (err instanceof DecodeError) this.o.metrics?.decodeError();
      this.o.log.warn("dropped a stored feature shard; extracting it again", { shard: wire, reason: err.reason, error: err.message });
      await this.reExtract(wire, fs?.worker ?? "?", err.message);
      return undefined;
    }
  }

  /** Deletes a rejected result and queues the shard again, or fails it after maxDeliver attempts. */
  private async reExtract(wire: string, worker: string, why: string): Promise<void> {
    const { state } = this.stores;
    await this.dropObject(wire);
    const previous = await state.get(ROUND_KEYS.retry(wire)).then((e) => decodeAttempts(e?.value)).catch(() => 1);
    const { attempt, giveUp } = nextAttempt(previous, this.o.maxDeliver);
    await state.put(ROUND_KEYS.retry(wire), encodeAttempts(attempt));
    if (giveUp) return this.failRound(shardFailed(wire, attempt - 1, { shard: wire, worker, attempt: attempt - 1, error: `result rejected: ${why}`, at: Date.now() }));
    await this.publishTask(wire, attempt);
  }

  /** Hands a verified shard to runExtraction; it counts as done only once stored. */
  private async store(wire: string, data: FeatureShardData, fs: FeatureShard, worker?: string): Promise<void> {
    await this.sink.onShard(data);
    // The shard is on the coordinator's disk now (a restarted run resumes from there): drop it from
    // the object store, so nats-server holds only shards in flight, not the whole data set's features.
    await this.dropObject(wire);
    // Only once stored: completed before, a faster shard fetched alongside could finish the round
    // while this one was still being written, and the commit then missed its samples.
    const done = this.ledger.complete(wire);
    if (!done) return;
    this.setShards();
    this.sink.onImages(done.images, data.skipped.length);
    this.o.log.debug("shard stored", { shard: data.shardId, worker: fs.worker || worker, samples: data.ids.length, skipped: data.skipped.length, seconds: Number(fs.seconds.toFixed(3)) });
    if (this.ledger.finished) this.outcome.resolve();
  }

  /** The fallback for lost notices and for failures recorded while no advisory came. */
  private async sweep(): Promise<void> {
    if (this.ledger.failed || this.ledger.finished) return;
    try {
      // Listing costs O(every shard of the job) (250-370 ms at 15,000 objects): while notices flow they
      // carry the progress, so list when they went quiet (a lost notice, the end) or every 10th sweep.
      if (++this.sweeps % 10 === 0 || performance.now() - this.lastNotice >= this.o.sweepMs) await this.sweepStore();
      await this.sweepFailures();
      if (this.stores.registry.counts().alive === 0) this.o.log.debug("no worker alive: waiting for one", { pending: this.ledger.remaining });
    } catch (err) {
      this.o.log.debug("sweep failed (retrying)", { error: err as Error });
    }
  }

  private async sweepStore(): Promise<void> {
    this.stats.storeListings++;
    for (const info of await this.stores.os.list()) {
      if (info.deleted) continue;
      if (this.ledger.shard(info.name)) void this.fetch(info.name);
      // A second copy of a shard already stored (a redelivered task finished after the first): not needed.
      else if (parseWireShardId(info.name)?.round === this.round) await this.dropObject(info.name);
    }
  }

  /** Removes a shard's object, leaving no delete marker behind (see purgeObject); a failure is only logged. */
  private async dropObject(wire: string): Promise<void> {
    const { jsm, os } = this.stores;
    await purgeObject(jsm, os, this.names.featuresBucket, wire).catch((err: unknown) => this.o.log.debug("feature object not removed", { shard: wire, error: err as Error }));
  }

  /** Terminal failures recorded by workers. */
  private async sweepFailures(): Promise<void> {
    const { state } = this.stores;
    for await (const k of await state.keys(ROUND_KEYS.failedOfRound(this.round))) {
      const wire = ROUND_KEYS.shardOfFailed(k);
      if (!wire || !this.ledger.shard(wire)) continue;
      const rec = await this.readError(state, k);
      this.failRound(shardFailed(wire, rec?.attempt ?? this.o.maxDeliver, rec));
    }
  }

  /** A worker's failure record; undefined when there is none, or when it does not decode (dropped and counted). */
  private async readError(kv: KV, key: string): Promise<ShardErrorRecord | undefined> {
    const e = await kv.get(key).catch(() => null);
    if (!e || e.operation !== "PUT" || e.value.length === 0) return undefined;
    try {
      return decodeShardError(this.o.opts.job, e.value);
    } catch (err) {
      const reason = err instanceof DecodeError ? err.reason : "malformed";
      this.o.metrics?.droppedMessage(reason);
      this.o.log.warn("dropped a shard error record that does not decode", { key, reason, error: err as Error });
      return undefined;
    }
  }

  /** Ends the round with `e` (the first failure wins). */
  private failRound(e: Error): void {
    if (!this.ledger.fail(e)) return;
    this.setShards();
    this.outcome.reject(e);
  }

  private setShards(): void {
    this.o.metrics?.setShards(this.ledger.counts());
  }
}

function deferred(): { promise: Promise<void>; resolve: () => void; reject: (e: Error) => void } {
  let resolve!: () => void;
  let reject!: (e: Error) => void;
  const promise = new Promise<void>((res, rej) => {
    resolve = res;
    reject = rej;
  });
  promise.catch(() => undefined); // awaited in run(); this keeps an early rejection from counting as unhandled
  return { promise, resolve, reject };
}

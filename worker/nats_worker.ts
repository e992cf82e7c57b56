/**
 * An extraction worker over NATS. It registers in the job's worker registry (a Heartbeat in a KV
 * with a TTL, refreshed every few seconds), pulls ShardTasks one at a time from the job's durable
 * work-queue consumer, extracts them with the frozen base of the round's JobSpec (models are cached
 * across tasks and jobs), puts the FeatureShard into the object store under the task's shard id,
 * announces it, and only then acks. Long shards send in-progress acks so they are not redelivered
 * while still being worked on; a worker that dies simply stops acking and the shard goes to another.
 *
 * A task that does not decode (or belongs to another job) is terminated and counted: redelivering it
 * could never help. A shard whose extraction throws is nak'ed for another try until its last
 * delivery, where the worker records a terminal failure the coordinator turns into a job error.
 *
 * Life cycle after nats.js: `start()`, `status()` (events, a discriminated union on `type`),
 * `closed()`, `drain()` (finish the current shard, then leave) and `Symbol.asyncDispose`.
 */
import { hostname } from "node:os";
import type { Consumer, JetStreamClient, JetStreamManager, JsMsg, KV, NatsConnection, ObjectStore } from "nats";
import { encodeShardError, fromExtractionRound, parseWireShardId, ROUND_KEYS, type RoundSettings, type ShardErrorRecord } from "../proto/extraction_wire.js";
import type { BackendName, EngineProvider } from "../core/runtime/config.js";
import { calibrationImages, type FeatureExtractor } from "../core/models/feature_model.js";
import type { Dataset } from "../core/datasets/types.js";
import type { FeatureShardData } from "../core/datasets/feature_store.js";
import type { Logger } from "../core/runtime/log.js";
import type { CtrainMetrics } from "../core/runtime/metrics.js";
import { float32ToBytes } from "../proto/tensor_codec.js";
import { decode, DecodeError, encode, makeHeader, type Backend, type JobSpec, type ShardTask, type WorkerState } from "../proto/codec.js";
import { fromWireSplit, toWireSplit } from "../proto/splits.js";
import { jobNames, jobOfTasksStream, validateWorkerId, WORKER_REGISTRY_TTL_MS, type JobNames } from "../proto/subjects.js";
import { extractShard, memoryLimit, shardMemoryBudget, type ShardTiming } from "./extraction_executor.js";
import { ExtractorCache } from "./extractor_cache.js";
import { InProgressAcks } from "./in_progress_acks.js";
import { checkSameInputs, checkShardMemory, isLastDelivery } from "./shard_checks.js";
import { defaultThreads, type EngineInfo } from "../core/models/inference_engine.js";
import { TRAINING_KEYS, trainingAttemptOf } from "../proto/training_wire.js";
import { putBytes } from "../core/training/checkpoints.js";
import { runTrainingWorker } from "./training_worker.js";

/**
 * How long a replica may go on after its attempt's spec is deleted (the coordinator deletes it once
 * member 0 is done, when the others may still be comparing their last checksums and reporting done).
 */
const ATTEMPT_END_GRACE_MS = 15_000;

/** Events of a worker's life. */
export type WorkerStatus =
  | { type: "waiting"; job: string }
  | { type: "ready"; job: string }
  | { type: "claimed"; job: string; shard: string; delivery: number; samples: number }
  | { type: "progress"; job: string; shard: string; done: number; total: number }
  | { type: "shard_done"; job: string; shard: string; samples: number; skipped: number; seconds: number }
  | { type: "shard_failed"; job: string; shard: string; delivery: number; terminal: boolean; error: string }
  | { type: "dropped"; job: string; reason: string }
  | { type: "draining" }
  | { type: "stopped"; error?: Error };

export interface NatsWorkerOptions {
  nc: NatsConnection;
  /** Job id, or `any`: serve whichever job has tasks queued. */
  job: string;
  /** Worker id (a NATS-safe token). Default `<host>-<pid>`. */
  workerId?: string;
  log: Logger;
  metrics?: CtrainMetrics;
  /** Compute backend in use, for the registry. */
  backend: BackendName;
  /** onnxruntime threads when the job spec leaves it to the worker (0). Default: this machine's cores. */
  threads?: number;
  /** onnxruntime execution provider of this machine. Default auto (cuda when installed). */
  provider?: EngineProvider;
  /** Heartbeat period, ms. Default 3000 (the registry TTL is WORKER_REGISTRY_TTL_MS). */
  heartbeatMs?: number;
  /** How long one pull waits for a task, ms. Default 2000. */
  pullExpiresMs?: number;
  /** Models and data sets, shared across workers of one process. Default: a new cache. */
  cache?: ExtractorCache;
}

interface JobContext {
  names: JobNames;
  consumer: Consumer;
  state: KV;
  registry: KV;
  os: ObjectStore;
  ackWaitMs: number;
  maxDeliver: number;
  /** Settings of the extraction rounds seen, by round id. */
  rounds: Map<string, RoundSettings>;
}

/** One delivery of a task being worked on. */
interface TaskRun {
  ctx: JobContext;
  msg: JsMsg;
  task: ShardTask;
  /** The task's wire shard id (`<round>.<shard>`). */
  wire: string;
  delivery: number;
  acks: InProgressAcks;
  /** performance.now() when the delivery was taken. */
  t0: number;
}

/** Default worker id: host name and pid, made NATS-safe. */
export function defaultWorkerId(): string {
  const host = hostname().replace(/[^a-zA-Z0-9_-]/g, "-").replace(/^[^a-zA-Z0-9]+/, "").slice(0, 40) || "worker";
  return `${host}-${process.pid}`;
}

export class NatsWorker implements AsyncDisposable {
  readonly id: string;
  private readonly cache: ExtractorCache;
  private readonly jobs = new Map<string, JobContext>();
  private jsm!: JetStreamManager;
  private js!: JetStreamClient;
  private running = false;
  private draining = false;
  private loop?: Promise<void>;
  private heartbeatTimer?: NodeJS.Timeout;
  private stateNow: WorkerState = "starting";
  private currentShard = "";
  private shardsDone = 0;
  private rate = 0;
  private ready = false;
  private readonly events: WorkerStatus[] = [];
  /** Stops of the training watchers (drain). */
  private readonly training: (() => void)[] = [];
  private readonly waiters: ((r: IteratorResult<WorkerStatus>) => void)[] = [];
  private ended = false;
  private readonly done: Promise<Error | undefined>;
  private resolveDone!: (e: Error | undefined) => void;

  constructor(private readonly o: NatsWorkerOptions) {
    this.id = validateWorkerId(o.workerId ?? defaultWorkerId());
    if (o.job !== "any") jobNames(o.job);
    this.cache = o.cache ?? new ExtractorCache();
    this.done = new Promise((r) => (this.resolveDone = r));
  }

  /** True once a model is loaded and a job's queue is bound (the /readyz of `ctrain worker`). */
  isReady(): boolean {
    return this.ready && !this.draining;
  }

  /** Begins serving. Returns at once; watch `status()` or await `closed()`. */
  async start(): Promise<void> {
    if (this.running) throw new Error(`worker ${this.id} is already started`);
    this.running = true;
    this.jsm = await this.o.nc.jetstreamManager();
    this.js = this.o.nc.jetstream();
    this.heartbeatTimer = setInterval(() => void this.heartbeat(), this.o.heartbeatMs ?? 3000);
    this.loop = this.serve().then(
      () => this.end(),
      (err: unknown) => this.end(err instanceof Error ? err : new Error(String(err))),
    );
  }

  /** Events until the worker stops. One reader. */
  status(): AsyncIterable<WorkerStatus> {
    return {
      [Symbol.asyncIterator]: () => ({
        next: () => {
          const e = this.events.shift();
          if (e) return Promise.resolve({ value: e, done: false });
          if (this.ended) return Promise.resolve({ value: undefined, done: true });
          return new Promise<IteratorResult<WorkerStatus>>((r) => this.waiters.push(r));
        },
      }),
    };
  }

  /** Resolves when the worker has stopped: undefined after a drain, the error if it failed. */
  closed(): Promise<Error | undefined> {
    return this.done;
  }

  /** Finishes the shard in hand (acked), leaves the registry, stops. The connection stays the caller's. */
  async drain(): Promise<void> {
    if (!this.draining) {
      this.draining = true;
      this.emit({ type: "draining" });
      this.o.log.info("draining: finishing the current shard", { shard: this.currentShard || undefined });
    }
    await this.loop;
  }

  async [Symbol.asyncDispose](): Promise<void> {
    await this.drain();
  }

  private engineNoted = "";

  /** Logs (once per change) and exports the engine that runs this worker's frozen forward passes. */
  private noteEngine(e: EngineInfo): void {
    const key = `${e.name}/${e.threads}/${e.precision}/${e.fallback ?? ""}`;
    if (key === this.engineNoted) return;
    this.engineNoted = key;
    this.o.metrics?.setEngine(e.name);
    if (e.fallback) this.o.log.warn("inference engine: onnx not used, frozen forward passes run on tfjs", { requested: e.requested, reason: e.fallback });
    else this.o.log.info("inference engine", { engine: e.name, version: e.version, threads: e.threads, provider: e.provider, precision: e.precision });
  }

  private emit(e: WorkerStatus): void {
    const w = this.waiters.shift();
    if (w) w({ value: e, done: false });
    else {
      this.events.push(e);
      if (this.events.length > 1000) this.events.shift(); // nobody reads: keep the newest
    }
  }

  private async end(error?: Error): Promise<void> {
    for (const stop of this.training.splice(0)) stop();
    clearInterval(this.heartbeatTimer);
    this.stateNow = "stopped";
    this.ready = false;
    // A last heartbeat saying "stopped": the coordinator counts the worker as left, not lost; the TTL removes it.
    await this.heartbeat();
    if (error) this.o.log.error("worker stopped on an error", { error });
    this.emit({ type: "stopped", error });
    this.ended = true;
    for (const w of this.waiters.splice(0)) w({ value: undefined, done: true });
    this.resolveDone(error);
  }

  private async heartbeat(): Promise<void> {
    for (const ctx of this.jobs.values()) {
      const hb = encode("Heartbeat", {
        header: makeHeader(ctx.names.job, this.id), worker: this.id, state: this.stateNow, backend: this.o.backend as Backend,
        host: hostname(), pid: process.pid, imagesPerSecond: this.rate, shardId: this.currentShard, shardsDone: this.shardsDone,
      });
      try {
        await ctx.registry.put(this.id, hb);
        this.o.nc.publish(ctx.names.heartbeat, hb);
      } catch (err) {
        this.o.log.debug("heartbeat not delivered (NATS reconnecting?)", { error: err as Error });
      }
    }
  }

  /** Binds to a job's queue and stores once the coordinator has created them; undefined while it has not. */
  private async bind(job: string): Promise<JobContext | undefined> {
    const known = this.jobs.get(job);
    if (known) return known;
    const names = jobNames(job);
    let info;
    try {
      info = await this.jsm.consumers.info(names.tasksStream, names.tasksConsumer);
    } catch {
      return undefined;
    }
    const ctx: JobContext = {
      names,
      consumer: await this.js.consumers.get(names.tasksStream, names.tasksConsumer),
      state: await this.js.views.kv(names.stateBucket, { history: 1 }),
      registry: await this.js.views.kv(names.workersBucket, { history: 1, ttl: WORKER_REGISTRY_TTL_MS }),
      os: await this.js.views.os(names.featuresBucket),
      ackWaitMs: Math.round((info.config.ack_wait ?? 30e9) / 1e6),
      maxDeliver: info.config.max_deliver ?? -1,
      rounds: new Map(),
    };
    this.jobs.set(job, ctx);
    this.stateNow = "idle";
    this.o.nc.publish(names.hello, encode("WorkerHello", {
      header: makeHeader(job, this.id), worker: this.id, backend: this.o.backend as Backend, host: hostname(), pid: process.pid,
      cores: 1, softwareVersion: process.env.npm_package_version ?? "", state: "idle",
    }));
    await this.heartbeat();
    // After the first heartbeat: the registry sees the worker before anything else is set up.
    void this.watchTraining(ctx);
    this.o.log.info("joined job", { job, stream: names.tasksStream, ack_wait_ms: ctx.ackWaitMs, max_deliver: ctx.maxDeliver });
    return ctx;
  }

  /** Training role: runs each fine-tuning attempt the coordinator publishes; a newer one supersedes it. */
  private async watchTraining(ctx: JobContext): Promise<void> {
    type Session = { stop: AbortController; done: Promise<void> };
    let current: Session | undefined;
    // Sessions whose spec changed: a deleted spec (the coordinator deletes it once member 0 is done) lets them
    // finish their last report within the grace; a newer spec stops them at once.
    const ending = new Set<Session>();
    const w = await ctx.state.watch({ key: TRAINING_KEYS.spec });
    this.training.push(() => {
      for (const s of ending) s.stop.abort(new Error("worker draining"));
      current?.stop.abort(new Error("worker draining"));
      w.stop();
    });
    for await (const e of w) {
      const put = e.operation === "PUT" && e.value.length > 0;
      if (current) {
        const s = current;
        ending.add(s);
        const timer = setTimeout(() => s.stop.abort(new Error("the training attempt ended")), ATTEMPT_END_GRACE_MS);
        void s.done.finally(() => { clearTimeout(timer); ending.delete(s); });
        current = undefined;
      }
      if (put) {
        // A newer attempt supersedes whatever still runs.
        const running = [...ending];
        for (const s of running) s.stop.abort(new Error("a newer training spec"));
        await Promise.all(running.map((s) => s.done));
      }
      if (!put || this.draining) continue;
      let spec: JobSpec;
      try {
        spec = decode("JobSpec", e.value, { job: ctx.names.job, self: "worker", peer: "coordinator" });
      } catch (err) {
        this.o.metrics?.droppedMessage(err instanceof DecodeError ? err.reason : "malformed");
        this.o.log.warn("dropped a training spec that does not decode", { error: err as Error });
        continue;
      }
      const attempt = trainingAttemptOf(spec);
      if (!attempt) continue;
      const stop = new AbortController();
      this.stateNow = "training";
      const done = runTrainingWorker({ nc: this.o.nc, job: ctx.names.job, self: this.id, attempt, state: ctx.state, log: this.o.log, metrics: this.o.metrics, signal: stop.signal, cache: this.cache, threads: this.o.threads, provider: this.o.provider })
        .catch((err: unknown) => this.o.log.error("training role failed", { error: err as Error }))
        .finally(() => { if (this.stateNow === "training") this.stateNow = "idle"; });
      current = { stop, done };
    }
  }

  /** Jobs with tasks queued (for `--job any`). */
  private async discover(): Promise<string[]> {
    const jobs: string[] = [];
    for await (const s of this.jsm.streams.list()) {
      const job = jobOfTasksStream(s.config.name);
      if (job && s.state.messages > 0) jobs.push(job);
    }
    return jobs;
  }

  private async serve(): Promise<void> {
    let waitingLogged = false;
    while (!this.draining) {
      const candidates = this.o.job === "any" ? await this.discover().catch(() => []) : [this.o.job];
      let worked = false;
      for (const job of candidates) {
        if (this.draining) break;
        const ctx = await this.bind(job).catch((err: unknown) => {
          this.o.log.debug("cannot bind to the job yet", { job, error: err as Error });
          return undefined;
        });
        if (!ctx) continue;
        let msg: JsMsg | null = null;
        try {
          msg = await ctx.consumer.next({ expires: this.o.pullExpiresMs ?? 2000 });
        } catch (err) {
          this.o.log.debug("pull failed (NATS reconnecting?)", { job, error: err as Error });
          await sleep(500);
          continue;
        }
        if (!msg) continue;
        worked = true;
        await this.handle(ctx, msg);
      }
      if (!worked) {
        if (this.jobs.size === 0 && !waitingLogged) {
          waitingLogged = true;
          this.emit({ type: "waiting", job: this.o.job });
          this.o.log.info("waiting for a job's task queue", { job: this.o.job });
        }
        if (this.jobs.size === 0 || this.o.job === "any") await sleep(1000);
      }
    }
  }

  /** The settings of an extraction round, from its JobSpec in the state KV (cached per job). */
  private async roundSettings(ctx: JobContext, round: string): Promise<RoundSettings> {
    const known = ctx.rounds.get(round);
    if (known) return known;
    const e = await ctx.state.get(ROUND_KEYS.spec(round));
    if (!e || e.operation !== "PUT" || e.value.length === 0) throw new Error(`the job spec of round ${round} is not in ${ctx.names.stateBucket} (was the coordinator's state lost?)`);
    const spec: JobSpec = decode("JobSpec", e.value, { job: ctx.names.job, self: "worker", peer: "coordinator" });
    if (spec.extraction?.round !== round) throw new Error(`the job spec under ${ROUND_KEYS.spec(round)} is not extraction round ${round}`);
    const s = fromExtractionRound(spec.extraction);
    ctx.rounds.set(round, s);
    this.o.log.info("extraction round", { round, images_per_batch: s.imagesPerBatch, coordinator_backend: s.backend, backend: this.o.backend });
    return s;
  }

  /** Works on one delivered task: extracts, stores and acks it, or records why it failed. */
  private async handle(ctx: JobContext, msg: JsMsg): Promise<void> {
    const task = this.decodeTask(ctx, msg);
    if (!task) return;
    const run: TaskRun = { ctx, msg, task, wire: task.shardId, delivery: msg.info.deliveryCount, acks: new InProgressAcks(msg, ctx.ackWaitMs), t0: performance.now() };
    this.currentShard = run.wire;
    this.stateNow = "extracting";
    try {
      await this.extractTask(run);
    } catch (err) {
      await this.failTask(run, err instanceof Error ? err : new Error(String(err)));
    } finally {
      run.acks.stop();
      this.currentShard = "";
      this.stateNow = "idle";
    }
  }

  /** The task of a delivery; undefined when it does not decode (terminated: a redelivery could never help). */
  private decodeTask(ctx: JobContext, msg: JsMsg): ShardTask | undefined {
    const job = ctx.names.job;
    try {
      const task = decode("ShardTask", msg.data, { job, self: "worker", peer: "coordinator" });
      if (!parseWireShardId(task.shardId)) throw new DecodeError("ShardTask", "bad_shape", `shard id ${JSON.stringify(task.shardId)} names no extraction round`);
      return task;
    } catch (err) {
      const reason = err instanceof DecodeError ? err.reason : "malformed";
      this.o.metrics?.droppedMessage(reason);
      this.o.metrics?.decodeError();
      this.o.log.warn("dropped a task that does not decode: terminated", { reason, error: err as Error, seq: msg.seq });
      msg.term(`ctrain: ${reason}`);
      this.emit({ type: "dropped", job, reason });
      return undefined;
    }
  }

  private async extractTask(run: TaskRun): Promise<void> {
    const settings = await this.roundSettings(run.ctx, parseWireShardId(run.wire)!.round);
    this.publishProgress(run, 0);
    this.o.log.info("shard claimed", { shard: run.wire, delivery: run.delivery, samples: run.task.ids.length });
    this.emit({ type: "claimed", job: run.ctx.names.job, shard: run.wire, delivery: run.delivery, samples: run.task.ids.length });
    const { dataset, extractor } = await this.prepare(run, settings);
    checkShardMemory(run.wire, run.task.ids.length, extractor, settings.imagesPerBatch, shardMemoryBudget(process.env, memoryLimit()));
    const timing: ShardTiming = { decodeWaitSeconds: 0, forwardSeconds: 0 };
    const tExtract = performance.now();
    const data = await this.extract(run, dataset, extractor, settings.imagesPerBatch, timing);
    const seconds = (performance.now() - run.t0) / 1000;
    const tPublish = performance.now();
    await this.publishResult(run, data, extractor, seconds);
    await run.msg.ackAck();
    // Where the shard's time went (bench/extract sums these over a run): the forward pass should dominate.
    const split = { forward_s: timing.forwardSeconds, decode_wait_s: timing.decodeWaitSeconds, setup_s: (tExtract - run.t0) / 1000, publish_s: (performance.now() - tPublish) / 1000 };
    this.shardDone(run, data, seconds, split);
  }

  /** The round's data set and extractor (cached across tasks), checked to be the coordinator's. */
  private async prepare(run: TaskRun, s: RoundSettings): Promise<{ dataset: Dataset; extractor: FeatureExtractor }> {
    const dataset = await this.cache.dataset(s.data, s.open);
    run.acks.working();
    const x = s.extractor;
    const extractor = await this.cache.extractor({
      ...x, threads: s.threads || this.o.threads || defaultThreads(1), provider: this.o.provider,
      // int8 calibrates on the job's first training images, as the coordinator does: the same graph everywhere.
      ...(x.precision === "int8" ? { calibration: { dataset: dataset.fingerprint, images: calibrationImages(dataset, x.inputSize) } } : {}),
    });
    this.noteEngine(extractor.engine);
    checkSameInputs(s, extractor.fingerprint, dataset.fingerprint);
    if (!this.ready) {
      this.ready = true;
      this.emit({ type: "ready", job: run.ctx.names.job });
    }
    run.acks.working();
    return { dataset, extractor };
  }

  /** Runs the frozen base over the task's samples, reporting progress at most every 500 ms. */
  private extract(run: TaskRun, dataset: Dataset, extractor: FeatureExtractor, imagesPerBatch: number, timing: ShardTiming): Promise<FeatureShardData> {
    const { task, wire } = run;
    const samples = task.ids.map((id, i) => ({ id, label: task.labels[i], split: fromWireSplit(task.splits[i]) }));
    let done = 0;
    let lastProgress = Date.now();
    return extractShard(dataset, extractor, wire, samples, {
      batchSize: imagesPerBatch, timing,
      onBatch: (n, skipped) => {
        done += n;
        this.o.metrics?.countImages("extract", n - skipped);
        run.acks.working();
        if (Date.now() - lastProgress <= 500 && done !== samples.length) return;
        lastProgress = Date.now();
        this.publishProgress(run, done);
        this.emit({ type: "progress", job: run.ctx.names.job, shard: wire, done, total: samples.length });
      },
    });
  }

  private publishProgress(run: TaskRun, done: number): void {
    const p = { header: makeHeader(run.ctx.names.job, this.id), shardId: run.wire, done, total: run.task.ids.length, worker: this.id };
    this.o.nc.publish(run.ctx.names.progress, encode("Progress", p));
  }

  /** Stores the shard's features under its wire id, then announces them (a FeatureShard without samples). */
  private async publishResult(run: TaskRun, data: FeatureShardData, extractor: FeatureExtractor, seconds: number): Promise<void> {
    const { ctx, wire } = run;
    const header = makeHeader(ctx.names.job, this.id);
    const featureDims = extractor.featureShape.length ? extractor.featureShape : [extractor.featureDim];
    const full = encode("FeatureShard", {
      header, shardId: wire, ids: data.ids, labels: data.labels, splits: data.splits.map(toWireSplit),
      featureDims, features: float32ToBytes(data.features), skipped: data.skipped, worker: this.id, seconds,
    });
    run.acks.working();
    // Put first, ack after: a worker that dies in between leaves a stored shard the redelivery overwrites with the same content.
    await putBytes(ctx.os, wire, full);
    this.o.nc.publish(ctx.names.shardDone, encode("FeatureShard", {
      header, shardId: wire, ids: [], labels: [], splits: [], featureDims, features: new Uint8Array(0), skipped: [], worker: this.id, seconds,
    }));
  }

  private shardDone(run: TaskRun, data: FeatureShardData, seconds: number, split: Record<string, number>): void {
    this.shardsDone++;
    this.rate = run.task.ids.length / seconds;
    this.o.metrics?.setExtractionRate(this.rate);
    this.o.log.info("shard done", {
      shard: run.wire, samples: data.ids.length, skipped: data.skipped.length, seconds: Number(seconds.toFixed(3)), images_per_second: Number(this.rate.toFixed(1)),
      ...Object.fromEntries(Object.entries(split).map(([k, v]) => [k, Number(v.toFixed(3))])),
    });
    this.emit({ type: "shard_done", job: run.ctx.names.job, shard: run.wire, samples: data.ids.length, skipped: data.skipped.length, seconds });
  }

  /** Records the error (the coordinator reads it); the last delivery also records the shard as failed and terminates it, others are retried. */
  private async failTask(run: TaskRun, error: Error): Promise<void> {
    const { ctx, msg, wire, delivery } = run;
    const terminal = isLastDelivery(error, delivery, ctx.maxDeliver);
    const rec: ShardErrorRecord = { shard: wire, worker: this.id, attempt: delivery, error: error.message, at: Date.now() };
    const bytes = encodeShardError(ctx.names.job, rec);
    await ctx.state.put(ROUND_KEYS.error(wire), bytes).catch(() => undefined);
    if (terminal) {
      await ctx.state.put(ROUND_KEYS.failed(wire), bytes).catch(() => undefined);
      msg.term(`ctrain: ${error.message}`.slice(0, 200));
    } else msg.nak(1000);
    this.o.log.error(terminal ? "shard failed for good" : "shard failed: it will be retried", { shard: wire, delivery, max_deliver: ctx.maxDeliver, error });
    this.emit({ type: "shard_failed", job: ctx.names.job, shard: wire, delivery, terminal, error: error.message });
  }
}

function sleep(ms: number): Promise<void> {
  return new Promise((r) => setTimeout(r, ms));
}

/**
 * The one metrics module every ctrain process uses (coordinator, worker, `ctrain run`).
 *
 * Every process registers the same metric families into a `Registry` it is given (never the global
 * one, so tests and in-process workers stay isolated) and fills only the series it owns: workers count
 * images and step times, the coordinator sets shards, workers, loss and progress. A family nobody fills
 * still shows its `# HELP`/`# TYPE` lines, so the dashboard and alert rules can be checked against the
 * names this module exports (test/prometheus_files.test.ts).
 *
 * Naming follows Prometheus conventions: prefix `ctrain_`, base units (seconds, bytes), `_total` on
 * counters, `_info` metrics valued 1. The `job` label is the ctrain job id; the scrape config uses
 * `honor_labels: true` so it is not renamed to `exported_job` (see deploy/prometheus/prometheus.yml).
 */
import { SKIP_REASONS } from "../datasets/types.js";
import { ConfigError } from "./errors.js";
import { MEMORY_KINDS, memoryHeld } from "./memory_accounting.js";
import { createServer, type IncomingMessage, type ServerResponse } from "node:http";
import { rename, writeFile } from "node:fs/promises";
import type { AddressInfo } from "node:net";
import { performance } from "node:perf_hooks";
import { Counter, Gauge, Histogram, collectDefaultMetrics, type Registry } from "prom-client";

/** Training phases, used as the `phase` label. `extract`: feature extraction; `head`: classifier training (cached or augmented); `fine_tune`: data-parallel fine-tuning. */
export const PHASES = ["extract", "head", "fine_tune"] as const;
export type Phase = (typeof PHASES)[number];

/** Data splits, used as the `split` label of loss and accuracy. */
export const SPLITS = ["train", "val", "test"] as const;
export type Split = (typeof SPLITS)[number];

/** States of an extraction shard, used as the `state` label of `ctrain_shards`. */
export const SHARD_STATES = ["pending", "running", "done", "failed"] as const;
export type ShardState = (typeof SHARD_STATES)[number];

/** States of a worker as the coordinator sees it, used as the `state` label of `ctrain_workers`. */
export const WORKER_STATES = ["joining", "alive", "lost", "left"] as const;
export type WorkerState = (typeof WORKER_STATES)[number];

/** Directions of all-reduce traffic, the `direction` label of `ctrain_allreduce_bytes_total`. */
export const DIRECTIONS = ["sent", "received"] as const;
export type Direction = (typeof DIRECTIONS)[number];

/**
 * Every `reason` of `ctrain_dropped_messages_total`: the codec's DecodeError reasons, the coordinator's
 * ShardRejected reasons, gradient averaging's drops, and `decode_error`. Each starts at 0 in every
 * process, so a `rate()` alert fires on the first drop and the dashboard panel is never "no data";
 * test/metrics.test.ts checks that every reason in the source is listed here.
 */
export const DROP_REASONS = [
  "malformed", "wrong_job", "stale_epoch", "wrong_step", "bad_shape", "non_finite", "decode_error",
  "buffer_full", "duplicate", "not_in_plan", "unknown_sender",
  "shard_ids", "shard_count", "shard_labels", "shard_splits", "shard_dim",
] as const;

/** Value of the `worker` label in a process that is not a worker (the coordinator). */
export const COORDINATOR_WORKER_LABEL = "coordinator";

/** Buckets for step-like durations: 1 ms .. 60 s, roughly 1-2.5-5 per decade. */
export const DURATION_BUCKETS_SECONDS: readonly number[] = [
  0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60,
];

type JobWorker = "job" | "worker";

/**
 * The metric families of a ctrain process plus helpers that fill in `job` and `worker`.
 * The fields are the prom-client objects (typed label names) for callers that need more than the
 * helpers; prefer the helpers, which keep label values consistent.
 */
export interface CtrainMetrics {
  /** The registry everything is registered in. */
  readonly registry: Registry;
  /** Value of the `job` label. */
  readonly job: string;
  /** Value of the `worker` label (`coordinator` when none was given). */
  readonly worker: string;

  /** `ctrain_up{job,worker}`: 1 while the process runs. */
  readonly up: Gauge<JobWorker>;
  /** `ctrain_images_processed_total{job,worker,phase}`: images run through the model (extraction, training, fine-tuning). */
  readonly imagesProcessed: Counter<JobWorker | "phase">;
  /** `ctrain_shards{job,state}`: extraction shards per state (set by the coordinator). */
  readonly shards: Gauge<"job" | "state">;
  /** `ctrain_extraction_images_per_second{job,worker}`: a worker's current extraction throughput. */
  readonly extractionImagesPerSecond: Gauge<JobWorker>;
  /** `ctrain_step_duration_seconds{job,worker,phase}`: wall time of one training step (forward, backward, averaging, update). */
  readonly stepDuration: Histogram<JobWorker | "phase">;
  /** `ctrain_allreduce_duration_seconds{job,worker}`: wall time of one gradient averaging. */
  readonly allreduceDuration: Histogram<JobWorker>;
  /** `ctrain_allreduce_bytes_total{job,worker,direction}`: gradient payload bytes sent and received. */
  readonly allreduceBytes: Counter<JobWorker | "direction">;
  /** `ctrain_loss{job,phase,split}`: latest loss (NaN when training diverged; see the CtrainLossNaN alert). */
  readonly loss: Gauge<"job" | "phase" | "split">;
  /** `ctrain_accuracy{job,phase,split}`: latest accuracy, 0..1. */
  readonly accuracy: Gauge<"job" | "phase" | "split">;
  /** `ctrain_workers{job,state}`: workers per state (set by the coordinator). */
  readonly workers: Gauge<"job" | "state">;
  /** `ctrain_epoch{job,phase}`: current epoch, counted from 1. */
  readonly epoch: Gauge<"job" | "phase">;
  /** `ctrain_step{job,phase}`: current step (batch) within the phase, counted from 1. */
  readonly step: Gauge<"job" | "phase">;
  /** `ctrain_progress_ratio{job,phase}`: fraction of the phase done, 0..1 (computed at scrape time from {@link CtrainMetrics.progress}). */
  readonly progressRatio: Gauge<"job" | "phase">;
  /** `ctrain_eta_seconds{job,phase}`: estimated seconds left in the phase (computed at scrape time). */
  readonly etaSeconds: Gauge<"job" | "phase">;
  /** `ctrain_last_progress_timestamp_seconds{job}`: Unix time of the last progress this process saw (for the CtrainNoProgress alert). */
  readonly lastProgressTimestamp: Gauge<"job">;
  /** `ctrain_skipped_inputs_total{job,reason}`: bad samples skipped, by reason (`corrupt`, `empty`, `too_many_pixels`, ...). */
  readonly skippedInputs: Counter<"job" | "reason">;
  /** `ctrain_decode_errors_total{job,worker}`: images or messages that failed to decode. */
  readonly decodeErrors: Counter<JobWorker>;
  /** `ctrain_dropped_messages_total{job,worker,reason}`: NATS messages dropped unapplied (`decode_error`, `wrong_job`, `stale_epoch`, `wrong_step`, ...). */
  readonly droppedMessages: Counter<JobWorker | "reason">;
  /** `ctrain_backend_info{job,worker,backend,engine}`: 1 for the compute backend and inference engine in use (engine `none` until a frozen graph is built). */
  readonly backendInfo: Gauge<JobWorker | "backend" | "engine">;
  /** `ctrain_step_compute_seconds{job,worker}`: a fine-tuning replica's recent compute time per step (set by the coordinator from the replicas' reports). */
  readonly stepComputeSeconds: Gauge<JobWorker>;
  /** `ctrain_step_wait_seconds{job,worker}`: a replica's recent time per step in gradient averaging, mostly waiting for peers (coordinator). */
  readonly stepWaitSeconds: Gauge<JobWorker>;

  /** Count `n` (default 1) images processed in `phase`; also marks progress. */
  countImages(phase: Phase, n?: number): void;
  /** Set shard counts; states left out are set to 0. */
  setShards(counts: Partial<Record<ShardState, number>>): void;
  /** Set this worker's extraction throughput in images per second. */
  setExtractionRate(imagesPerSecond: number): void;
  /** Record one training step of `seconds`; also marks progress. */
  observeStep(phase: Phase, seconds: number): void;
  /** Start timing a step; the returned function records it and returns the seconds. */
  startStep(phase: Phase): () => number;
  /** Record one gradient averaging: its duration and the payload bytes this process sent and received. */
  observeAllreduce(seconds: number, bytesSent: number, bytesReceived: number): void;
  /** Set the latest loss and/or accuracy of `phase` on `split`. NaN is kept as NaN. */
  setEvaluation(phase: Phase, split: Split, values: { loss?: number; accuracy?: number }): void;
  /** Set worker counts; states left out are set to 0. */
  setWorkers(counts: Partial<Record<WorkerState, number>>): void;
  /** Set the current epoch and (optionally) step of `phase`; marks progress. */
  setEpoch(phase: Phase, epoch: number, step?: number): void;
  /** Set the current step of `phase`; marks progress. */
  setStep(phase: Phase, step: number): void;
  /**
   * Report `done` of `total` units (samples, steps) of `phase`. The first call of a phase starts its
   * clock; ratio and ETA are computed at scrape time from the average rate since then.
   */
  progress(phase: Phase, done: number, total: number): void;
  /** Count `n` (default 1) skipped inputs with `reason`. */
  skippedInput(reason: string, n?: number): void;
  /** Count `n` (default 1) decode errors. */
  decodeError(n?: number): void;
  /** Count `n` (default 1) dropped messages with `reason`. */
  droppedMessage(reason: string, n?: number): void;
  /** Set the compute backend in use (`wasm`, `tensorflow`, ...); replaces an earlier one. */
  setBackend(backend: string): void;
  /** Set the inference engine of frozen forward passes (`onnx`, `tfjs`), kept with the backend in ctrain_backend_info. */
  setEngine(engine: string): void;
  /** Mark progress now (refreshes `ctrain_last_progress_timestamp_seconds`). */
  markProgress(): void;
  /**
   * Set replica `worker`'s recent compute and wait seconds per step (the coordinator, from reports;
   * call with zeros when a replica first reports so its series exist from then on).
   */
  setStepTiming(worker: string, computeSeconds: number, waitSeconds: number): void;
  /** Remove replica `worker`'s step-timing series (it left the membership). */
  removeStepTiming(worker: string): void;
}

interface PhaseProgress {
  /** performance.now() at the first report, in ms. */
  startMs: number;
  done: number;
  total: number;
}

function checkCount(what: string, n: number): void {
  if (!Number.isFinite(n) || n < 0) throw new RangeError(`${what} must be a finite number >= 0, got ${n}`);
}

/**
 * Register ctrain's metric families and the default process metrics (`process_*`, `nodejs_*`, no
 * prefix) into `registry`. Call once per registry: prom-client refuses a second registration of a name.
 */
export function createMetrics(registry: Registry, labels: { job: string; worker?: string }): CtrainMetrics {
  if (!labels.job) throw new RangeError("metrics: the job label must not be empty");
  const job = labels.job;
  const worker = labels.worker || COORDINATOR_WORKER_LABEL;
  const registers = [registry];
  collectDefaultMetrics({ register: registry });

  const progressByPhase = new Map<Phase, PhaseProgress>();

  const up = new Gauge({ name: "ctrain_up", help: "1 while the ctrain process runs.", labelNames: ["job", "worker"] as const, registers });
  const imagesProcessed = new Counter({
    name: "ctrain_images_processed_total",
    help: "Images run through the model, by phase.",
    labelNames: ["job", "worker", "phase"] as const,
    registers,
  });
  const shards = new Gauge({ name: "ctrain_shards", help: "Extraction shards by state.", labelNames: ["job", "state"] as const, registers });
  const extractionImagesPerSecond = new Gauge({
    name: "ctrain_extraction_images_per_second",
    help: "Current feature-extraction throughput of a worker in images per second.",
    labelNames: ["job", "worker"] as const,
    registers,
  });
  const stepDuration = new Histogram({
    name: "ctrain_step_duration_seconds",
    help: "Wall time of one training step in seconds.",
    labelNames: ["job", "worker", "phase"] as const,
    buckets: [...DURATION_BUCKETS_SECONDS],
    registers,
  });
  const allreduceDuration = new Histogram({
    name: "ctrain_allreduce_duration_seconds",
    help: "Wall time of one gradient averaging (all-reduce) in seconds.",
    labelNames: ["job", "worker"] as const,
    buckets: [...DURATION_BUCKETS_SECONDS],
    registers,
  });
  const allreduceBytes = new Counter({
    name: "ctrain_allreduce_bytes_total",
    help: "Gradient payload bytes sent and received by gradient averaging.",
    labelNames: ["job", "worker", "direction"] as const,
    registers,
  });
  const loss = new Gauge({ name: "ctrain_loss", help: "Latest loss by phase and split.", labelNames: ["job", "phase", "split"] as const, registers });
  const accuracy = new Gauge({
    name: "ctrain_accuracy",
    help: "Latest accuracy (0..1) by phase and split.",
    labelNames: ["job", "phase", "split"] as const,
    registers,
  });
  const workers = new Gauge({ name: "ctrain_workers", help: "Workers by state.", labelNames: ["job", "state"] as const, registers });
  const epoch = new Gauge({ name: "ctrain_epoch", help: "Current epoch of a phase, from 1.", labelNames: ["job", "phase"] as const, registers });
  const step = new Gauge({ name: "ctrain_step", help: "Current step of a phase, from 1.", labelNames: ["job", "phase"] as const, registers });
  // Ratio and ETA are derived from the latest progress report when scraped, so the ETA keeps moving
  // between reports and nobody has to remember to refresh it.
  const progressRatio = new Gauge({
    name: "ctrain_progress_ratio",
    help: "Fraction of a phase done, 0..1.",
    labelNames: ["job", "phase"] as const,
    registers,
    collect() {
      for (const [phase, p] of progressByPhase) this.set({ job, phase }, p.total > 0 ? Math.min(1, p.done / p.total) : 0);
    },
  });
  const etaSeconds = new Gauge({
    name: "ctrain_eta_seconds",
    help: "Estimated seconds left in a phase, from the average rate since the phase began.",
    labelNames: ["job", "phase"] as const,
    registers,
    collect() {
      const now = performance.now();
      for (const [phase, p] of progressByPhase) {
        if (p.done >= p.total) this.set({ job, phase }, 0);
        else if (p.done > 0) this.set({ job, phase }, (((now - p.startMs) / 1000) * (p.total - p.done)) / p.done);
        else this.remove({ job, phase }); // no rate yet: no estimate rather than a made-up one
      }
    },
  });
  const lastProgressTimestamp = new Gauge({
    name: "ctrain_last_progress_timestamp_seconds",
    help: "Unix time in seconds of the last progress (image, step, epoch) this process saw.",
    labelNames: ["job"] as const,
    registers,
  });
  const skippedInputs = new Counter({
    name: "ctrain_skipped_inputs_total",
    help: "Bad input samples skipped, by reason.",
    labelNames: ["job", "reason"] as const,
    registers,
  });
  const decodeErrors = new Counter({
    name: "ctrain_decode_errors_total",
    help: "Images or messages that failed to decode.",
    labelNames: ["job", "worker"] as const,
    registers,
  });
  const droppedMessages = new Counter({
    name: "ctrain_dropped_messages_total",
    help: "Messages dropped without being applied, by reason.",
    labelNames: ["job", "worker", "reason"] as const,
    registers,
  });
  const backendInfo = new Gauge({
    name: "ctrain_backend_info",
    help: "Compute backend (training) and inference engine (frozen forward passes) in use (value 1).",
    labelNames: ["job", "worker", "backend", "engine"] as const,
    registers,
  });
  // Read at scrape time: the process RSS and what core/runtime/memory_accounting.ts counts as held for data.
  new Gauge({
    name: "ctrain_memory_bytes",
    help: "Memory of this process in bytes: kind=rss (resident set), features (feature rows held: cache blocks, splits in memory), images (decoded images held).",
    labelNames: ["job", "worker", "kind"] as const,
    registers,
    collect() {
      this.set({ job, worker, kind: "rss" }, process.memoryUsage.rss());
      const held = memoryHeld();
      for (const kind of MEMORY_KINDS) this.set({ job, worker, kind }, held[kind]);
    },
  });

  const stepComputeSeconds = new Gauge({
    name: "ctrain_step_compute_seconds",
    help: "Recent compute time per fine-tuning step of a replica (median of its last steps; forward, backward, update), seconds. Set by the coordinator from the replicas' reports.",
    labelNames: ["job", "worker"] as const,
    registers,
  });
  const stepWaitSeconds = new Gauge({
    name: "ctrain_step_wait_seconds",
    help: "Recent time per fine-tuning step a replica spent in gradient averaging, mostly waiting for its peers (median of its last steps), seconds. Set by the coordinator.",
    labelNames: ["job", "worker"] as const,
    registers,
  });

  const info = { backend: "none", engine: "none" };
  const markProgress = (): void => lastProgressTimestamp.set({ job }, Date.now() / 1000);
  up.set({ job, worker }, 1);
  // Counters the dashboard and alerts query exist at 0 from the start (see DROP_REASONS).
  decodeErrors.inc({ job, worker }, 0);
  for (const reason of DROP_REASONS) droppedMessages.inc({ job, worker, reason }, 0);
  for (const reason of Object.values(SKIP_REASONS)) skippedInputs.inc({ job, reason }, 0);
  // Start the no-progress clock at process start, so a job stuck before its first image still alerts.
  markProgress();

  return {
    registry,
    job,
    worker,
    up,
    imagesProcessed,
    shards,
    extractionImagesPerSecond,
    stepDuration,
    allreduceDuration,
    allreduceBytes,
    loss,
    accuracy,
    workers,
    epoch,
    step,
    progressRatio,
    etaSeconds,
    lastProgressTimestamp,
    skippedInputs,
    decodeErrors,
    droppedMessages,
    backendInfo,
    stepComputeSeconds,
    stepWaitSeconds,

    countImages(phase, n = 1) {
      checkCount("images", n);
      imagesProcessed.inc({ job, worker, phase }, n);
      markProgress();
    },
    setShards(counts) {
      for (const state of SHARD_STATES) shards.set({ job, state }, counts[state] ?? 0);
    },
    setExtractionRate(imagesPerSecond) {
      checkCount("images per second", imagesPerSecond);
      extractionImagesPerSecond.set({ job, worker }, imagesPerSecond);
    },
    observeStep(phase, seconds) {
      checkCount("step seconds", seconds);
      stepDuration.observe({ job, worker, phase }, seconds);
      markProgress();
    },
    startStep(phase) {
      const t0 = performance.now();
      return () => {
        const seconds = (performance.now() - t0) / 1000;
        stepDuration.observe({ job, worker, phase }, seconds);
        markProgress();
        return seconds;
      };
    },
    observeAllreduce(seconds, bytesSent, bytesReceived) {
      checkCount("all-reduce seconds", seconds);
      checkCount("bytes sent", bytesSent);
      checkCount("bytes received", bytesReceived);
      allreduceDuration.observe({ job, worker }, seconds);
      allreduceBytes.inc({ job, worker, direction: "sent" }, bytesSent);
      allreduceBytes.inc({ job, worker, direction: "received" }, bytesReceived);
    },
    setEvaluation(phase, split, values) {
      if (values.loss !== undefined) loss.set({ job, phase, split }, values.loss);
      if (values.accuracy !== undefined) accuracy.set({ job, phase, split }, values.accuracy);
    },
    setWorkers(counts) {
      for (const state of WORKER_STATES) workers.set({ job, state }, counts[state] ?? 0);
    },
    setEpoch(phase, e, s) {
      epoch.set({ job, phase }, e);
      if (s !== undefined) step.set({ job, phase }, s);
      markProgress();
    },
    setStep(phase, s) {
      step.set({ job, phase }, s);
      markProgress();
    },
    progress(phase, done, total) {
      checkCount("done", done);
      checkCount("total", total);
      const p = progressByPhase.get(phase);
      if (p) {
        p.done = done;
        p.total = total;
      } else {
        progressByPhase.set(phase, { startMs: performance.now(), done, total });
      }
      markProgress();
    },
    skippedInput(reason, n = 1) {
      checkCount("skipped inputs", n);
      skippedInputs.inc({ job, reason }, n);
    },
    decodeError(n = 1) {
      checkCount("decode errors", n);
      decodeErrors.inc({ job, worker }, n);
    },
    droppedMessage(reason, n = 1) {
      checkCount("dropped messages", n);
      droppedMessages.inc({ job, worker, reason }, n);
    },
    setBackend(backend) {
      info.backend = backend;
      backendInfo.reset();
      backendInfo.set({ job, worker, ...info }, 1);
    },
    setEngine(engine) {
      info.engine = engine;
      backendInfo.reset();
      backendInfo.set({ job, worker, ...info }, 1);
    },
    markProgress,
    setStepTiming(w, computeSeconds, waitSeconds) {
      checkCount("compute seconds", computeSeconds);
      checkCount("wait seconds", waitSeconds);
      stepComputeSeconds.set({ job, worker: w }, computeSeconds);
      stepWaitSeconds.set({ job, worker: w }, waitSeconds);
    },
    removeStepTiming(w) {
      stepComputeSeconds.remove({ job, worker: w });
      stepWaitSeconds.remove({ job, worker: w });
    },
  };
}

/** A running /metrics endpoint. */
export interface MetricsServer {
  /** The port actually bound (the free one picked when 0 was asked for). */
  readonly port: number;
  /** The address and port actually bound, `0.0.0.0:9400` or `127.0.0.1:41234` (what to log: who can reach it). */
  readonly listen: string;
  /** `http://<host>:<port>/metrics`. */
  readonly url: string;
  /** Stop listening and drop open connections. */
  close(): Promise<void>;
}

/**
 * Serve `registry` over HTTP:
 * - `GET /metrics`: the Prometheus text format (`registry.contentType`);
 * - `GET /healthz`: 200 `ok` while the process lives (liveness);
 * - `GET /readyz`: 200 when `health.ready()` is true (or no `health` given), else 503 (readiness).
 *
 * @param port TCP port; 0 picks a free one (read it from the result).
 * @param host Address to bind. Default `0.0.0.0` (reachable by a Prometheus in another pod).
 */
export async function serveMetrics(
  registry: Registry,
  port: number,
  host = "0.0.0.0",
  health?: { ready: () => boolean },
): Promise<MetricsServer> {
  if (!Number.isInteger(port) || port < 0 || port > 65535) throw new RangeError(`metrics port must be 0..65535, got ${port}`);

  const handle = async (req: IncomingMessage, res: ServerResponse): Promise<void> => {
    const path = (req.url ?? "/").split("?")[0];
    if (req.method !== "GET" && req.method !== "HEAD") {
      res.writeHead(405, { "content-type": "text/plain; charset=utf-8", allow: "GET, HEAD" }).end("method not allowed\n");
      return;
    }
    switch (path) {
      case "/metrics": {
        const body = await registry.metrics();
        res.writeHead(200, { "content-type": registry.contentType }).end(req.method === "HEAD" ? undefined : body);
        return;
      }
      case "/healthz":
        res.writeHead(200, { "content-type": "text/plain; charset=utf-8" }).end("ok\n");
        return;
      case "/readyz": {
        let ready = true;
        try {
          ready = health ? health.ready() : true;
        } catch {
          ready = false;
        }
        res.writeHead(ready ? 200 : 503, { "content-type": "text/plain; charset=utf-8" }).end(ready ? "ready\n" : "not ready\n");
        return;
      }
      default:
        res.writeHead(404, { "content-type": "text/plain; charset=utf-8" }).end("not found: try /metrics, /healthz or /readyz\n");
    }
  };

  const server = createServer((req, res) => {
    handle(req, res).catch((err: unknown) => {
      if (!res.headersSent) res.writeHead(500, { "content-type": "text/plain; charset=utf-8" });
      res.end(`metrics collection failed: ${err instanceof Error ? err.message : String(err)}\n`);
    });
  });
  await new Promise<void>((resolve, reject) => {
    server.once("error", (err: NodeJS.ErrnoException) => {
      // A port in use or an address this host does not have is the user's to fix: one line, naming the flags.
      const why: Record<string, string> = { EADDRINUSE: "the port is in use", EACCES: "permission denied", EADDRNOTAVAIL: "this host has no such address" };
      reject(err.code && why[err.code]
        ? new ConfigError(`cannot serve /metrics on ${host}:${port}: ${why[err.code]} (${err.code}); choose another --metrics-port (0 = a free one, -1 = off) or --metrics-host.`, { cause: err })
        : err);
    });
    server.listen(port, host, () => resolve());
  });
  const address = server.address() as AddressInfo;
  const bound = address.port;
  const urlHost = host === "0.0.0.0" || host === "::" ? "127.0.0.1" : host.includes(":") ? `[${host}]` : host;
  return {
    port: bound,
    listen: `${address.family === "IPv6" ? `[${address.address}]` : address.address}:${bound}`,
    url: `http://${urlHost}:${bound}/metrics`,
    close: () =>
      new Promise<void>((resolve, reject) => {
        server.close((err) => (err ? reject(err) : resolve()));
        server.closeAllConnections();
      }),
  };
}

/** One scrape target of a Prometheus `file_sd_configs` file. */
export interface ScrapeTarget {
  /** `host:port` of the /metrics endpoint. */
  address: string;
  /** ctrain job id; becomes the target's `job` label (so `up{job=...}` matches the metrics' `job`). */
  job: string;
  /** Worker name, or `coordinator`. */
  worker: string;
}

/**
 * Write `targets` as a Prometheus file_sd JSON file (the shipped prometheus.yml watches
 * runs/ctrain-targets/*.json, where `ctrain run` writes them). Written to a temporary file and renamed, so Prometheus never
 * reads half a file.
 */
export async function writeScrapeTargets(file: string, targets: readonly ScrapeTarget[]): Promise<void> {
  const groups = targets.map((t) => ({ targets: [t.address], labels: { job: t.job, worker: t.worker } }));
  const tmp = `${file}.${process.pid}.tmp`;
  await writeFile(tmp, JSON.stringify(groups, null, 2) + "\n");
  await rename(tmp, file);
}

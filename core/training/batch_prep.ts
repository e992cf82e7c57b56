/**
 * The synchronous part of preparing an image batch -- augmentation and pixel scaling, tfjs ops that
 * end in a dataSync -- and a thread that runs it off the main thread.
 *
 * Why a thread: fit() prepares batch b + 1 while step b trains, but tfjs ops on the wasm/cpu backends
 * run synchronously on the calling thread, so on the main thread the "prefetch" overlapped nothing:
 * it ran in a microtask at the step's first await (in data-parallel training, the gradient
 * averaging's, which then waited behind it). In a node:worker_threads thread it overlaps the step.
 *
 * The thread runs the same function ({@link prepPixels}) on the same tfjs backend as the main thread
 * (the active one, core/models/backend.ts), so a batch is bit-identical whichever thread prepared it.
 * Pixels go to the thread and rows come back as transferred ArrayBuffers (no copies). When the
 * thread cannot start (no backend, no worker_threads), batches are prepared on the main thread as
 * before, after one process warning. An idle thread is unref'd: it never keeps a process alive.
 */
import { Worker } from "node:worker_threads";
import * as tf from "@tensorflow/tfjs";
import { type AugmentOptions, augmentBatch } from "../datasets/augment.js";
import { activeBackend } from "../models/backend.js";
import type { Preprocessing } from "../models/model_zoo.js";
import { preprocess } from "../models/preprocess.js";
import type { BackendName } from "../runtime/config.js";

/** One batch's decoded pixels and what to do with them. */
export interface PixelJob {
  /** n * size * size * 3 bytes, HWC, row i = sample `keys.index[i]`. Given to the preparing thread (detached after). */
  rgb: Uint8Array;
  /** Image height and width. */
  size: number;
  preprocessing: Preprocessing;
  /** null = no augmentation. */
  augment: AugmentOptions | null;
  /** The (seed, epoch, global sample index) of each row: keys its augmentation (core/runtime/sample_keys.ts). */
  keys: { seed: number; epoch: number; index: Int32Array };
  /** true: raw [0, 255] floats (for a frozen stage); false: preprocessed for a model that starts at the image. */
  raw: boolean;
}

/** The job's pixels augmented and converted, as float rows (the same on any thread of one backend). */
export function prepPixels(job: PixelJob): Float32Array {
  const n = job.keys.index.length, s = job.size;
  if (n === 0) return new Float32Array(0);
  const x = tf.tidy(() => {
    const pixels = tf.tensor4d(job.rgb, [n, s, s, 3], "int32");
    const img = job.augment ? augmentBatch(pixels, job.augment, job.keys) : pixels;
    return job.raw ? img.toFloat() : preprocess(img, job.preprocessing);
  });
  const data = x.dataSync() as Float32Array;
  x.dispose();
  return data;
}

/** `a`, or a copy of it when it is a view into a larger (or shared) buffer: an array whose buffer can be transferred whole. */
export function transferable<T extends Uint8Array | Float32Array>(a: T): T {
  const whole = a.byteOffset === 0 && a.byteLength === a.buffer.byteLength && a.buffer instanceof ArrayBuffer;
  return whole ? a : (a.slice() as T);
}

/** Messages of the thread (core/training/batch_prep_worker.ts). */
export type FromThread = { ready: true } | { failed: string } | { id: number; x: Float32Array } | { id: number; error: string };
export type ToThread = { id: number; job: PixelJob } | { close: true };

/** How long a thread may take to load its backend before batches are prepared on the main thread. */
const START_TIMEOUT_MS = 60_000;
/** Why threads are not used in this process (set on the first failure: warned once, not retried). */
let unavailable: string | undefined;
let live = 0;

/** Preparation threads started and not yet exited in this process (tests, diagnostics). */
export function liveBatchPrepThreads(): number {
  return live;
}

interface Pending {
  resolve(x: Float32Array): void;
  reject(err: Error): void;
}

/**
 * One batch-preparation thread, started on the first job and ended by {@link close} (a later job
 * starts a new one). Jobs are done in order; the thread is ref'd only while one is in flight.
 */
export class BatchPrepThread {
  private thread: Promise<PrepWorker | undefined> | undefined;

  /** {@link prepPixels} of `job`, on the thread (on the main thread when none can start). */
  async prepare(job: PixelJob): Promise<Float32Array> {
    if (job.keys.index.length === 0) return prepPixels(job);
    let worker = await (this.thread ??= PrepWorker.start());
    if (worker?.failed) worker = await (this.thread = PrepWorker.start());
    return worker ? worker.post(job) : prepPixels(job);
  }

  /** Lets the thread finish the jobs it was given, then ends it (resolves once it has exited). Never rejects. */
  async close(): Promise<void> {
    const thread = this.thread;
    this.thread = undefined;
    await (await thread)?.close();
  }
}

/** A started thread and its jobs in flight. */
class PrepWorker {
  private readonly pending = new Map<number, Pending>();
  private nextId = 0;
  /** The thread died (its jobs failed): the next job needs a new one. */
  failed = false;
  /** Told to end: stays ref'd until it has exited. */
  private closing = false;

  private constructor(private readonly worker: Worker) {
    worker.on("message", (m: FromThread) => this.settle(m));
    worker.on("error", (err) => this.failAll(new Error(`batch preparation thread failed: ${err.message}`, { cause: err })));
    worker.on("exit", (code) => this.failAll(new Error(`batch preparation thread exited (code ${code}) before returning its batch`)));
    worker.unref();
  }

  /** A thread with its backend loaded; undefined (after one process warning) when none can start in this process. */
  static async start(): Promise<PrepWorker | undefined> {
    if (unavailable !== undefined) return undefined;
    let worker: Worker | undefined;
    try {
      worker = new Worker(new URL("./batch_prep_worker.js", import.meta.url), { workerData: { backend: threadBackend() } });
      live++;
      worker.once("exit", () => live--);
      await started(worker);
      return new PrepWorker(worker);
    } catch (err) {
      unavailable = err instanceof Error ? err.message : String(err);
      await worker?.terminate();
      process.emitWarning(`image batches are prepared on the main thread (no overlap with training steps): the preparation thread did not start: ${unavailable}`, { code: "CTRAIN_BATCH_PREP_THREAD" });
      return undefined;
    }
  }

  post(job: PixelJob): Promise<Float32Array> {
    const id = this.nextId++;
    const rgb = transferable(job.rgb);
    const done = new Promise<Float32Array>((resolve, reject) => this.pending.set(id, { resolve, reject }));
    // A prefetched batch that nobody awaits any more (fit stopped by an error) must not fail the process when it fails.
    done.catch(() => {});
    if (this.pending.size === 1) this.worker.ref();
    this.worker.postMessage({ id, job: { ...job, rgb } } satisfies ToThread, [rgb.buffer as ArrayBuffer]);
    return done;
  }

  /** Lets the thread finish its jobs (they are done in order), then waits for it to exit. */
  async close(): Promise<void> {
    if (this.failed) return;
    this.closing = true;
    const exited = new Promise((resolve) => this.worker.once("exit", resolve));
    this.worker.ref();
    this.worker.postMessage({ close: true } satisfies ToThread);
    await exited;
  }

  private settle(m: FromThread): void {
    if (!("id" in m)) return;
    const p = this.pending.get(m.id);
    this.pending.delete(m.id);
    if ("x" in m) p?.resolve(m.x);
    else p?.reject(new Error(`batch preparation thread: ${m.error}`));
    if (this.pending.size === 0 && !this.closing) this.worker.unref();
  }

  private failAll(err: Error): void {
    this.failed = true;
    for (const p of this.pending.values()) p.reject(err);
    this.pending.clear();
  }
}

/** Resolves when the thread has loaded its backend; rejects when it fails, exits or takes longer than {@link START_TIMEOUT_MS}. */
function started(worker: Worker): Promise<void> {
  return new Promise<void>((resolve, reject) => {
    const onMessage = (m: FromThread): void => settle("failed" in m ? new Error(m.failed) : undefined);
    const onError = (err: Error): void => settle(err);
    const onExit = (code: number): void => settle(new Error(`it exited with code ${code}`));
    const timer = setTimeout(() => settle(new Error(`no answer within ${START_TIMEOUT_MS / 1000} s`)), START_TIMEOUT_MS);
    function settle(err?: Error): void {
      clearTimeout(timer);
      worker.off("message", onMessage).off("error", onError).off("exit", onExit);
      if (err) reject(err);
      else resolve();
    }
    worker.on("message", onMessage).on("error", onError).on("exit", onExit);
  });
}

/** The backend the main thread runs on, for the thread to load (the same kernels give the same pixels). */
function threadBackend(): BackendName {
  return activeBackend()?.name ?? (tf.getBackend() as BackendName);
}

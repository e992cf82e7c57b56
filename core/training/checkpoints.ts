/**
 * Checkpoints of data-parallel fine-tuning: the whole state a replica needs to go on from a step --
 * every weight of the fine-tune model (trainable and frozen, model.getWeights() order), the
 * optimizer's state (Adam: iterations, first and second moments, in trainable-weight order) and the
 * data cursor (training epoch, next batch, global step), and where the training controls stand (best
 * figure and epoch, patience and plateau counts, the scheduled rate, the best epoch's weights:
 * train_loop's ControlsState). The same blob seeds the replicas at the start (the head phase's
 * weights, a fresh optimizer, cursor 0), carries a resumed job's state and a joiner's, and is the
 * phase's final result.
 *
 * Format (one object in the job's checkpoints bucket, or one file under `<out>/checkpoints/`): a u32
 * little-endian length, a JSON header (meta + tensor shapes), zero padding to 4 bytes, then the
 * float32 data of every tensor in order (weights, optimizer, then the controls' best weights; the
 * header's `controls` holds the figures and how many best weights follow). A blob without `controls`
 * (an older ctrain's) starts the controls from scratch. Optimizer moments are restored by position, not by name:
 * tfjs names variables per process, while the trainable-weight order is the same on every replica.
 *
 * Trade-off of the period M: a checkpoint costs one object-store put of the model (a few MB for the
 * top block) on member 0 and stalls its step for that time; a restart redoes at most M-1 steps.
 */
import { mkdir, rename, writeFile } from "node:fs/promises";
import { join } from "node:path";
import type { ObjectStore } from "nats";
import * as tf from "@tensorflow/tfjs";
import type { ControlsState } from "./train_loop.js";

/** Where training stands: the next step to run. */
export interface DataCursor {
  /** Training epoch (pass over the data) of the next step, from 0. */
  epoch: number;
  /** Batch index of the next step within `epoch`. */
  batch: number;
  /** Global step number of the next step (steps done so far). */
  step: number;
}

export interface StoredArray {
  shape: number[];
  data: Float32Array;
}

export interface TrainingState {
  cursor: DataCursor;
  weights: StoredArray[];
  optimizer: StoredArray[];
  /** Free-form metadata (attempt, members, history so far). */
  meta: Record<string, unknown>;
  /**
   * Adam's running beta1^t and beta2^t. tfjs' setWeights recomputes them as pow(beta, t + 1), which
   * differs in the last bits from the product the optimizer accumulated step by step; a replica
   * restored that way would drift from the others (and a resumed run from the uninterrupted one).
   */
  adamAccBeta?: [number, number];
  /** Where fit()'s training controls stood (as of the last epoch end before `cursor`); absent: from scratch. */
  controls?: ControlsState;
}

/** tfjs' AdamOptimizer keeps beta^t in these (not in getWeights()). */
interface AdamInternals {
  accBeta1?: tf.Variable;
  accBeta2?: tf.Variable;
}

/** Serializes a JSON header and float32 arrays into one blob. */
export function packArrays(header: Record<string, unknown>, arrays: readonly StoredArray[]): Uint8Array {
  const head = new TextEncoder().encode(JSON.stringify({ ...header, shapes: arrays.map((a) => a.shape) }));
  const pad = (4 - ((4 + head.length) % 4)) % 4;
  const total = arrays.reduce((n, a) => n + a.data.length, 0);
  const out = new Uint8Array(4 + head.length + pad + total * 4);
  new DataView(out.buffer).setUint32(0, head.length, true);
  out.set(head, 4);
  const floats = new Float32Array(out.buffer, 4 + head.length + pad, total);
  let at = 0;
  for (const a of arrays) {
    floats.set(a.data, at);
    at += a.data.length;
  }
  return out;
}

/** Inverse of {@link packArrays}. Throws a clear error on a truncated or foreign blob. */
export function unpackArrays(bytes: Uint8Array): { header: Record<string, unknown>; arrays: StoredArray[] } {
  if (bytes.length < 4) throw new Error("checkpoint blob is truncated (no header)");
  const len = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength).getUint32(0, true);
  if (4 + len > bytes.length) throw new Error("checkpoint blob is truncated (header)");
  const header = JSON.parse(new TextDecoder().decode(bytes.subarray(4, 4 + len))) as Record<string, unknown> & { shapes: number[][] };
  const start = 4 + len + ((4 - ((4 + len) % 4)) % 4);
  // A copy into a buffer of its own, aligned for Float32Array. Not bytes.slice(): on a Node Buffer (what an
  // object store or a file read may hand back) slice is a view into a larger, shared buffer.
  const body = new Uint8Array(bytes.length - start);
  body.set(bytes.subarray(start));
  const floats = new Float32Array(body.buffer, 0, body.length >> 2);
  const arrays: StoredArray[] = [];
  let at = 0;
  for (const shape of header.shapes) {
    const n = shape.reduce((a, b) => a * b, 1);
    if (at + n > floats.length) throw new Error("checkpoint blob is truncated (data)");
    arrays.push({ shape, data: floats.slice(at, at + n) });
    at += n;
  }
  return { header, arrays };
}

const toArray = (t: tf.Tensor): StoredArray => ({ shape: t.shape.slice(), data: Float32Array.from(t.dataSync() as Float32Array) });

/** Captures model weights and optimizer state (copies; the caller keeps training). */
export async function captureState(model: tf.LayersModel, optimizer: tf.Optimizer, cursor: DataCursor, meta: Record<string, unknown> = {}): Promise<TrainingState> {
  const weights = model.getWeights().map(toArray);
  const opt = (await optimizer.getWeights()).map((n) => toArray(n.tensor));
  const adam = optimizer as unknown as AdamInternals;
  const adamAccBeta: [number, number] | undefined = adam.accBeta1 instanceof tf.Variable && adam.accBeta2 instanceof tf.Variable
    ? [adam.accBeta1.dataSync()[0]!, adam.accBeta2.dataSync()[0]!] : undefined;
  return { cursor: { ...cursor }, weights, optimizer: opt, meta, ...(adamAccBeta ? { adamAccBeta } : {}) };
}

/** Puts a captured state back: weights into the model, moments and iterations into the optimizer. */
export async function restoreState(model: tf.LayersModel, optimizer: tf.Optimizer, s: TrainingState): Promise<void> {
  const current = model.getWeights();
  if (current.length !== s.weights.length) throw new Error(`checkpoint holds ${s.weights.length} weight tensors, the model has ${current.length}: another model or --fine-tune-layers?`);
  const ts = s.weights.map((a, i) => {
    if (a.shape.join("x") !== current[i]!.shape.join("x")) throw new Error(`checkpoint weight ${i} has shape [${a.shape}], the model's is [${current[i]!.shape}]`);
    return tf.tensor(a.data, a.shape, "float32");
  });
  model.setWeights(ts);
  tf.dispose(ts);
  if (s.optimizer.length > 0) {
    // setWeights turns these tensors into the optimizer's variables: do not dispose them here.
    await optimizer.setWeights(s.optimizer.map((a, i) => ({ name: i === 0 ? "iter" : `ctrain_opt_${i}`, tensor: tf.tensor(a.data, a.shape, "float32") })));
    const adam = optimizer as unknown as AdamInternals;
    if (s.adamAccBeta && adam.accBeta1 instanceof tf.Variable && adam.accBeta2 instanceof tf.Variable) {
      // Exactly the values the saving optimizer had (float32 survives the JSON header unchanged).
      const [b1, b2] = s.adamAccBeta;
      tf.tidy(() => {
        adam.accBeta1!.assign(tf.scalar(b1, "float32"));
        adam.accBeta2!.assign(tf.scalar(b2, "float32"));
      });
    }
  }
}

export function encodeState(s: TrainingState): Uint8Array {
  const best = s.controls?.bestWeights ?? [];
  return packArrays({
    kind: "ctrain-training-state", cursor: s.cursor, weightCount: s.weights.length, meta: s.meta, ...(s.adamAccBeta ? { adamAccBeta: s.adamAccBeta } : {}),
    ...(s.controls ? { controls: controlsHeader(s.controls) } : {}),
  }, [...s.weights, ...s.optimizer, ...best]);
}

/** The controls' figures in the JSON header (Infinity, the best before any, as null) and how many best weights follow the optimizer's arrays. */
function controlsHeader(c: ControlsState): Record<string, unknown> {
  return { best: Number.isFinite(c.best) ? c.best : null, bestEpoch: c.bestEpoch, wait: c.wait, lrWait: c.lrWait, ...(c.lr !== undefined ? { lr: c.lr } : {}), bestWeightCount: c.bestWeights?.length ?? 0 };
}

/** The controls of a header (undefined when it has none) with their best weights: the last `bestWeightCount` of `arrays` (those after the weights). */
function controlsFromHeader(h: unknown, arrays: StoredArray[]): ControlsState | undefined {
  if (h === undefined || h === null) return undefined;
  const c = h as Record<string, unknown>;
  const count = c["bestWeightCount"];
  const ints = [c["bestEpoch"], c["wait"], c["lrWait"], count];
  const ok = ints.every((v) => Number.isInteger(v) && (v as number) >= 0) && (count as number) <= arrays.length
    && (c["best"] === null || typeof c["best"] === "number") && (c["lr"] === undefined || typeof c["lr"] === "number");
  if (!ok) throw new Error(`checkpoint blob has malformed training controls: ${JSON.stringify({ ...c })}`);
  const n = count as number;
  return {
    best: c["best"] === null ? Infinity : (c["best"] as number), bestEpoch: c["bestEpoch"] as number, wait: c["wait"] as number, lrWait: c["lrWait"] as number,
    ...(c["lr"] !== undefined ? { lr: c["lr"] as number } : {}), ...(n > 0 ? { bestWeights: arrays.slice(arrays.length - n) } : {}),
  };
}

export function decodeState(bytes: Uint8Array): TrainingState {
  const { header, arrays } = unpackArrays(bytes);
  if (header["kind"] !== "ctrain-training-state") throw new Error("not a ctrain training state");
  const n = header["weightCount"] as number;
  const acc = header["adamAccBeta"];
  const adamAccBeta = Array.isArray(acc) && acc.length === 2 && acc.every((v) => typeof v === "number" && Number.isFinite(v)) ? [acc[0], acc[1]] as [number, number] : undefined;
  const controls = controlsFromHeader(header["controls"], arrays.slice(n));
  const optimizerEnd = arrays.length - (controls?.bestWeights?.length ?? 0);
  return {
    cursor: header["cursor"] as DataCursor, weights: arrays.slice(0, n), optimizer: arrays.slice(n, optimizerEnd), meta: (header["meta"] ?? {}) as Record<string, unknown>,
    ...(adamAccBeta ? { adamAccBeta } : {}), ...(controls ? { controls } : {}),
  };
}

/** Bytes handed to the object store per read: it chunks and publishes them as they come, not the whole object at once. */
const PUT_PIECE_BYTES = 4 * 2 ** 20;
/** Slowest store rate an object upload allows for before its acknowledgements count as lost (a busy server's disk). */
const PUT_MIN_BYTES_PER_SECOND = 8 * 2 ** 20;
/** Least time each chunk's acknowledgement may take (nats.js' default is 5 s: too short for one of thousands). */
const PUT_MIN_TIMEOUT_MS = 30_000;

/** How long an upload of `size` bytes may wait for each chunk's acknowledgement: its chunks are all published before the first is stored. */
export function putTimeoutMs(size: number): number {
  return Math.ceil(PUT_MIN_TIMEOUT_MS + (size / PUT_MIN_BYTES_PER_SECOND) * 1000);
}

/**
 * Stores `bytes` as object `name`, replacing an older one. nats.js publishes every chunk of an object
 * before it awaits their acknowledgements, each within one timeout: with its 5 s default a large object
 * (fine-tuning's activations: hundreds of MB) failed with a bare "TIMEOUT" while the server was still
 * storing it. The timeout here grows with the size; an upload that fails on a timeout is tried once more
 * (nats.js purges the partial chunks), and a second failure says which object, how big, and what to check.
 */
export async function putBytes(os: ObjectStore, name: string, bytes: Uint8Array): Promise<void> {
  const timeout = putTimeoutMs(bytes.length);
  for (let attempt = 1; ; attempt++) {
    try {
      await os.put({ name }, piecesOf(bytes), { timeout });
      return;
    } catch (err) {
      const timedOut = /timeout/i.test((err as Error)?.message ?? "") || (err as { code?: string })?.code === "TIMEOUT";
      if (timedOut && attempt < 2) continue;
      throw new Error(
        `storing object ${JSON.stringify(name)} (${(bytes.length / 2 ** 20).toFixed(1)} MiB) in the NATS object store failed: ${(err as Error)?.message ?? String(err)}` +
          (timedOut ? ` (no acknowledgement within ${timeout / 1000} s, twice). The nats-server is too slow storing it: check its JetStream store (disk space and speed, max_file_store) and its memory.` : ""),
        { cause: err },
      );
    }
  }
}

/** `bytes` as a stream of {@link PUT_PIECE_BYTES} views, read one at a time. */
function piecesOf(bytes: Uint8Array): ReadableStream<Uint8Array> {
  let at = 0;
  return new ReadableStream<Uint8Array>({
    pull(controller) {
      if (at >= bytes.length) return controller.close();
      const end = Math.min(bytes.length, at + PUT_PIECE_BYTES);
      controller.enqueue(bytes.subarray(at, end));
      at = end;
    },
  });
}

export async function getBytes(os: ObjectStore, name: string): Promise<Uint8Array | null> {
  return os.getBlob(name);
}

/**
 * getBytes bounded by `ms`: undefined when the read did not end in time. An object rewritten while it
 * is read (`latest`, by a replica still training) can leave the read waiting for purged chunks forever.
 */
export async function getBytesWithin(os: ObjectStore, name: string, ms: number): Promise<Uint8Array | null | undefined> {
  let timer: NodeJS.Timeout | undefined;
  const timeout = new Promise<undefined>((r) => (timer = setTimeout(() => r(undefined), ms)));
  try {
    return await Promise.race([getBytes(os, name), timeout]);
  } finally {
    clearTimeout(timer);
  }
}

/** Writes a state under `<dir>/checkpoints/<name>.ckpt` atomically (temp file + rename). */
export async function writeStateFile(dir: string, name: string, s: TrainingState): Promise<string> {
  const folder = join(dir, "checkpoints");
  await mkdir(folder, { recursive: true });
  const file = join(folder, `${name}.ckpt`);
  await writeFile(`${file}.tmp`, encodeState(s));
  await rename(`${file}.tmp`, file);
  return file;
}

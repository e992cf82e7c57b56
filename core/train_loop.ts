/**
 * The one training-step implementation that head training, fine-tuning and data-parallel workers
 * share: gradients of the mean loss over a batch, an optional hook that may replace them (the
 * data-parallel path averages them across workers there), then the optimizer update. Epochs walk a
 * seeded permutation so every process that knows the seed knows every batch.
 *
 * Tensor lifetimes are explicit: each step runs in tf.tidy and the loop's tests check that
 * tf.memory().numTensors does not grow across steps.
 */
import * as tf from "@tensorflow/tfjs";
import { Rng } from "./rng.js";

/** Rows of inputs (any per-sample shape) and integer labels held in memory. */
export interface ArrayData {
  x: Float32Array;
  /** Shape of one sample (e.g. [1280] for features, [h, w, c] for activations). */
  sampleShape: number[];
  y: Int32Array;
}

export function sampleSize(d: ArrayData): number {
  return d.sampleShape.reduce((a, b) => a * b, 1);
}

export function numSamples(d: ArrayData): number {
  return d.y.length;
}

/** Gathers rows `idx` into a new ArrayData. */
export function takeRows(d: ArrayData, idx: ArrayLike<number>): ArrayData {
  const s = sampleSize(d);
  const x = new Float32Array(idx.length * s);
  const y = new Int32Array(idx.length);
  for (let i = 0; i < idx.length; i++) {
    const r = idx[i];
    x.set(d.x.subarray(r * s, (r + 1) * s), i * s);
    y[i] = d.y[r];
  }
  return { x, sampleShape: d.sampleShape, y };
}

export interface EpochStats {
  epoch: number;
  loss: number;
  accuracy: number;
  val_loss?: number;
  val_accuracy?: number;
  seconds: number;
  samples_per_second: number;
}

export interface Evaluation {
  loss: number;
  accuracy: number;
  /** Predicted class per sample. */
  predictions: Int32Array;
}

/** Mean sparse categorical cross-entropy of softmax outputs. */
export function sparseCrossEntropy(probs: tf.Tensor, labels: tf.Tensor1D, numClasses: number): tf.Scalar {
  // Keras' categorical cross-entropy on probabilities: clip, log, pick the true class, mean.
  return tf.tidy(() => tf.oneHot(labels, numClasses).mul(tf.log(probs.clipByValue(1e-7, 1))).sum(-1).neg().mean() as tf.Scalar);
}

/**
 * Gradients of the mean loss of `model` on one batch, for its trainable weights. Returns the loss,
 * the number of correct predictions and the gradients (owned by the caller).
 */
export function computeGradients(model: tf.LayersModel, batch: ArrayData, numClasses: number): { loss: number; correct: number; grads: tf.NamedTensorMap } {
  const n = numSamples(batch);
  // A data-parallel member's empty share of a short batch contributes nothing: zero gradients without a
  // forward pass, as wasm's conv kernels trap ("divide by zero") on a batch of 0.
  if (n === 0) return { loss: NaN, correct: 0, grads: Object.fromEntries(model.trainableWeights.map((w) => [(w.read() as tf.Variable).name, tf.zerosLike(w.read())])) };
  let correct = 0;
  let lossValue = 0;
  const grads = tf.tidy(() => {
    const x = tf.tensor(batch.x, [n, ...batch.sampleShape]);
    const y = tf.tensor1d(batch.y, "int32");
    const vars = model.trainableWeights.map((w) => w.read() as tf.Variable);
    const { value, grads } = tf.variableGrads(() => {
      const probs = model.apply(x, { training: true }) as tf.Tensor;
      correct = probs.argMax(-1).equal(y).sum().dataSync()[0];
      return sparseCrossEntropy(probs, y, numClasses);
    }, vars);
    lossValue = value.dataSync()[0];
    return grads;
  });
  return { loss: lossValue, correct, grads };
}

/** Hook that may replace a step's gradients (data-parallel averaging). Must return tensors it owns. */
export type GradientHook = (grads: tf.NamedTensorMap, batchSamples: number) => Promise<tf.NamedTensorMap>;

export interface FitOptions {
  epochs: number;
  batchSize: number;
  seed: number;
  numClasses: number;
  optimizer: tf.Optimizer;
  validation?: ArrayData;
  /** Epoch to start from (resume). Default 0. */
  initialEpoch?: number;
  /** Batch of `initialEpoch` to start from (resume from a mid-epoch checkpoint's data cursor). Default 0. */
  initialBatch?: number;
  gradientHook?: GradientHook;
  /**
   * Data-parallel: picks this worker's part of each global batch (sample indices of the batch, in
   * order; `batch` is the batch's index in the epoch). The loss is the mean over that part and the
   * gradient hook receives its size. Default: the whole batch.
   */
  sliceOf?: (indices: Int32Array, batch: number) => Int32Array;
  onBatchEnd?: (info: { epoch: number; batch: number; batches: number; samples: number; loss: number }) => void;
  onEpochEnd?: (stats: EpochStats) => void | Promise<void>;
  /** Set to stop after the current batch. */
  signal?: AbortSignal;
}

/** Predictions, loss and accuracy on a data set, in batches. */
export function evaluate(model: tf.LayersModel, data: ArrayData, numClasses: number, batchSize = 256): Evaluation {
  const n = numSamples(data);
  const s = sampleSize(data);
  const predictions = new Int32Array(n);
  let lossSum = 0;
  let correct = 0;
  for (let start = 0; start < n; start += batchSize) {
    const m = Math.min(batchSize, n - start);
    tf.tidy(() => {
      const x = tf.tensor(data.x.subarray(start * s, (start + m) * s), [m, ...data.sampleShape]);
      const y = tf.tensor1d(data.y.subarray(start, start + m), "int32");
      const probs = model.predict(x) as tf.Tensor;
      lossSum += sparseCrossEntropy(probs, y, numClasses).dataSync()[0] * m;
      const pred = probs.argMax(-1).dataSync();
      for (let i = 0; i < m; i++) {
        predictions[start + i] = pred[i];
        if (pred[i] === data.y[start + i]) correct++;
      }
    });
  }
  return { loss: n ? lossSum / n : NaN, accuracy: n ? correct / n : NaN, predictions };
}

/** Batches of one epoch: a seeded permutation cut into `batchSize` pieces (the last may be short). */
export function epochBatches(n: number, batchSize: number, seed: number, epoch: number): Int32Array[] {
  const perm = new Rng(seed * 1000003 + epoch).permutation(n);
  const out: Int32Array[] = [];
  for (let i = 0; i < n; i += batchSize) out.push(perm.subarray(i, Math.min(n, i + batchSize)));
  return out;
}

let running = false;

/** Trains `model`'s trainable weights on `train`. One fit at a time per process. */
export async function fit(model: tf.LayersModel, train: ArrayData, opts: FitOptions): Promise<EpochStats[]> {
  if (!(opts.epochs >= 1)) throw new RangeError(`fit: epochs must be >= 1, got ${opts.epochs}`);
  if (!(opts.batchSize >= 1)) throw new RangeError(`fit: batchSize must be >= 1, got ${opts.batchSize}`);
  if (numSamples(train) === 0) throw new RangeError("fit: no training samples");
  if (running) throw new Error("fit: another fit is running in this process");
  running = true;
  const history: EpochStats[] = [];
  try {
    for (let epoch = opts.initialEpoch ?? 0; epoch < opts.epochs; epoch++) {
      const t0 = performance.now();
      const batches = epochBatches(numSamples(train), opts.batchSize, opts.seed, epoch);
      let lossSum = 0;
      let correct = 0;
      let seen = 0;
      const firstBatch = epoch === (opts.initialEpoch ?? 0) ? opts.initialBatch ?? 0 : 0;
      for (let b = firstBatch; b < batches.length; b++) {
        if (opts.signal?.aborted) throw opts.signal.reason ?? new Error("training stopped");
        const batch = takeRows(train, opts.sliceOf ? opts.sliceOf(batches[b], b) : batches[b]);
        const m = numSamples(batch);
        const step = computeGradients(model, batch, opts.numClasses);
        let grads = step.grads;
        if (opts.gradientHook) {
          const replaced = await opts.gradientHook(grads, m);
          if (replaced !== grads) tf.dispose(grads);
          grads = replaced;
        }
        opts.optimizer.applyGradients(grads);
        tf.dispose(grads);
        // A data-parallel worker may get no sample of a short last batch: its NaN mean loss is not a sample.
        if (m > 0) lossSum += step.loss * m;
        correct += step.correct;
        seen += m;
        opts.onBatchEnd?.({ epoch, batch: b, batches: batches.length, samples: m, loss: step.loss });
        // Let timers and I/O (progress output, heartbeats, /metrics) run between steps.
        if (b % 8 === 7) await new Promise((r) => setImmediate(r));
      }
      const seconds = (performance.now() - t0) / 1000;
      const stats: EpochStats = { epoch: epoch + 1, loss: seen ? lossSum / seen : NaN, accuracy: seen ? correct / seen : NaN, seconds, samples_per_second: seen / seconds };
      if (opts.validation && numSamples(opts.validation) > 0) {
        const ev = evaluate(model, opts.validation, opts.numClasses);
        stats.val_loss = ev.loss;
        stats.val_accuracy = ev.accuracy;
      }
      history.push(stats);
      await opts.onEpochEnd?.(stats);
    }
    return history;
  } finally {
    running = false;
  }
}

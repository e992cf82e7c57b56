/**
 * The one training-step implementation that head training, fine-tuning and data-parallel workers
 * share: gradients of the mean loss over a batch, an optional hook that may replace them (the
 * data-parallel path averages them across workers there), then the optimizer update. Epochs walk a
 * seeded permutation so every process that knows the seed knows every batch. The one epoch loop
 * ({@link fit}, over any {@link BatchSource}: rows in memory, augmented images, activations, a streamed feature cache)
 * carries Keras' training controls: early stopping, best weights restored, a learning-rate
 * schedule, class weights and label smoothing ({@link TrainingControls}).
 *
 * Every random draw of a step is a function of (seed, epoch, global sample index) only
 * (core/runtime/sample_keys.ts): batches carry the global index of each row ({@link ArrayData.index})
 * and the step runs the model under {@link withSampleKeys}, so the head's dropout masks (and the
 * augmentation, drawn per image by image_batches.ts) do not depend on which process computes which
 * part of a batch. A batch computed whole and its parts computed apart give the same gradients.
 *
 * Tensor lifetimes are explicit: each step runs in tf.tidy and the loop's tests check that
 * tf.memory().numTensors does not grow across steps.
 */
import * as tf from "@tensorflow/tfjs";
import { withSampleKeys } from "../models/sample_dropout.js";
import type { LrSchedule, Monitor } from "../runtime/config.js";
import { Rng } from "../runtime/rng.js";
import type { StoredArray } from "./checkpoints.js";

/** Rows of inputs (any per-sample shape) and integer labels held in memory. */
export interface ArrayData {
  x: Float32Array;
  /** Shape of one sample (e.g. [1280] for features, [h, w, c] for activations). */
  sampleShape: number[];
  y: Int32Array;
  /**
   * Global sample index of each row (its row in the training split), which keys the step's per-sample
   * random draws. Absent: the rows are samples 0..n-1 ({@link takeRows} fills it in).
   */
  index?: Int32Array;
}

export function sampleSize(d: ArrayData): number {
  return d.sampleShape.reduce((a, b) => a * b, 1);
}

export function numSamples(d: ArrayData): number {
  return d.y.length;
}

/** Gathers rows `idx` into a new ArrayData; each keeps its global sample index (`d.index[r]`, or `r` when `d` has none). */
export function takeRows(d: ArrayData, idx: ArrayLike<number>): ArrayData {
  const s = sampleSize(d);
  const x = new Float32Array(idx.length * s);
  const y = new Int32Array(idx.length);
  const index = new Int32Array(idx.length);
  for (let i = 0; i < idx.length; i++) {
    const r = idx[i];
    x.set(d.x.subarray(r * s, (r + 1) * s), i * s);
    y[i] = d.y[r];
    index[i] = d.index ? d.index[r] : r;
  }
  return { x, sampleShape: d.sampleShape, y, index };
}

export interface EpochStats {
  epoch: number;
  loss: number;
  accuracy: number;
  val_loss?: number;
  val_accuracy?: number;
  /** Learning rate of the epoch's steps (when the optimizer has a numeric one, as Adam and SGD do). */
  lr?: number;
  /** The epoch whose weights the phase ended with (restore-best-weights): the saved model is this epoch's. */
  best?: true;
  seconds: number;
  samples_per_second: number;
}

export interface Evaluation {
  loss: number;
  accuracy: number;
  /** Predicted class per sample. */
  predictions: Int32Array;
}

/** How a training step weighs its samples and targets (validation and test always use the plain loss). */
export interface LossOptions {
  /** Weight of each class's samples (Keras `class_weight`), length = classes. Default: all 1. */
  classWeights?: Float32Array;
  /** Keras `label_smoothing`: targets become (1 - s) * one-hot + s / classes. Default 0. */
  labelSmoothing?: number;
}

/**
 * Mean sparse categorical cross-entropy of softmax outputs; with {@link LossOptions} the training
 * loss Keras computes for `class_weight` and `label_smoothing` (per-sample weights, mean over the batch).
 */
export function sparseCrossEntropy(probs: tf.Tensor, labels: tf.Tensor1D, numClasses: number, o: LossOptions = {}): tf.Scalar {
  // Keras' categorical cross-entropy on probabilities: clip, log, pick the true class, mean.
  return tf.tidy(() => {
    let target = tf.oneHot(labels, numClasses).toFloat();
    const s = o.labelSmoothing ?? 0;
    if (s > 0) target = target.mul(1 - s).add(s / numClasses);
    const perSample = target.mul(tf.log(probs.clipByValue(1e-7, 1))).sum(-1).neg();
    const weighted = o.classWeights ? perSample.mul(tf.gather(tf.tensor1d(o.classWeights), labels)) : perSample;
    return weighted.mean() as tf.Scalar;
  });
}

/** Which training step a batch belongs to, for its per-sample random draws (dropout masks). */
export interface StepKeys {
  /** The run seed (fit's `seed`). */
  seed: number;
  /** Training epoch, from 0. */
  epoch: number;
}

/**
 * Gradients of the mean loss of `model` on one batch, for its trainable weights. Returns the loss,
 * the number of correct predictions and the gradients (owned by the caller).
 *
 * With `keys`, dropout masks are those of (keys.seed, keys.epoch, batch.index) -- rows 0..n-1 when the
 * batch has no index -- so any split of a batch into parts gives the same summed gradients. Without
 * `keys`, dropout draws fresh random masks as tf.layers.dropout does.
 */
export function computeGradients(model: tf.LayersModel, batch: ArrayData, numClasses: number, lossOptions: LossOptions = {}, keys?: StepKeys): { loss: number; correct: number; grads: tf.NamedTensorMap } {
  const n = numSamples(batch);
  // A data-parallel member's empty share of a short batch contributes nothing: zero gradients without a
  // forward pass, as wasm's conv kernels trap ("divide by zero") on a batch of 0.
  if (n === 0) return { loss: NaN, correct: 0, grads: Object.fromEntries(model.trainableWeights.map((w) => [(w.read() as tf.Variable).name, tf.zerosLike(w.read())])) };
  let correct = 0;
  let lossValue = 0;
  const forward = (): tf.NamedTensorMap => tf.tidy(() => {
    const x = tf.tensor(batch.x, [n, ...batch.sampleShape]);
    const y = tf.tensor1d(batch.y, "int32");
    const vars = model.trainableWeights.map((w) => w.read() as tf.Variable);
    const { value, grads } = tf.variableGrads(() => {
      const probs = model.apply(x, { training: true }) as tf.Tensor;
      correct = probs.argMax(-1).equal(y).sum().dataSync()[0];
      return sparseCrossEntropy(probs, y, numClasses, lossOptions);
    }, vars);
    lossValue = value.dataSync()[0];
    return grads;
  });
  const grads = keys ? withSampleKeys({ ...keys, index: batch.index ?? Int32Array.from({ length: n }, (_, i) => i) }, forward) : forward();
  return { loss: lossValue, correct, grads };
}

/** Hook that may replace a step's gradients (data-parallel averaging). Must return tensors it owns. */
export type GradientHook = (grads: tf.NamedTensorMap, batchSamples: number) => Promise<tf.NamedTensorMap>;

/**
 * Keras' training controls, applied by the one epoch loop. Every field is optional; the defaults
 * train plainly (what a data-parallel attempt without controls does; with them, every replica applies them).
 */
export interface TrainingControls {
  /** Stop when the monitored figure has not improved for this many epochs (Keras EarlyStopping). 0 = off (default). Needs validation. */
  earlyStoppingPatience?: number;
  /** End with the weights of the epoch with the best monitored figure (Keras `restore_best_weights`). Default false. Needs validation. */
  restoreBestWeights?: boolean;
  /** What early stopping, best weights and the plateau schedule watch. Default `val_loss`. */
  monitor?: Monitor;
  /** `constant` (default), `cosine` (per epoch from the initial rate down to 0), `plateau` (Keras ReduceLROnPlateau). */
  lrSchedule?: LrSchedule;
  /** plateau: epochs without improvement before the rate is multiplied by {@link lrFactor}. Default 2. */
  lrPatience?: number;
  /** plateau: factor of each reduction. Default 0.2 (Keras' ReduceLROnPlateau example). */
  lrFactor?: number;
  /** Weighted and smoothed training loss. */
  loss?: LossOptions;
}

/**
 * Where the training controls stand after an epoch: what a fit that goes on from that epoch (a resumed
 * checkpoint, a data-parallel joiner) needs to take the decisions the uninterrupted fit would take.
 * Plain data, so it travels in a checkpoint (core/training/checkpoints.ts).
 */
export interface ControlsState {
  /** Best monitored figure so far (val_loss, or -val_accuracy); Infinity before any. */
  best: number;
  /** Epoch (as {@link EpochStats.epoch}, from 1) of the best figure; 0 before any. */
  bestEpoch: number;
  /** Early stopping: epochs since the best one. */
  wait: number;
  /** Plateau schedule: epochs since the last improvement or reduction. */
  lrWait: number;
  /** Rate the schedule holds (a plateau's reduced rate); absent when the optimizer has no numeric rate. */
  lr?: number;
  /** restoreBestWeights: the best epoch's trainable weights (model.trainableWeights order); absent before any. */
  bestWeights?: StoredArray[];
}

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
  controls?: TrainingControls;
  /**
   * The controls' state to go on from, as {@link onControls}' reader gave it at the end of epoch
   * `initialEpoch` (resume, join). Default: from scratch (no best yet, no patience spent, the optimizer's rate).
   */
  initialControls?: ControlsState;
  /**
   * Called once as the loop starts with a reader of the controls' state as of the last epoch end (or
   * `initialControls`): what a checkpoint or a joiner's start state taken between two epoch ends carries.
   * It copies the best weights; once fit has returned it gives the state without them (put back into the model).
   */
  onControls?: (read: () => ControlsState) => void;
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
  return cutBatches(new Rng(seed * 1000003 + epoch).permutation(n), batchSize);
}

/** `order` cut into `batchSize` pieces (the last may be short). */
export function cutBatches(order: Int32Array, batchSize: number): Int32Array[] {
  const out: Int32Array[] = [];
  for (let i = 0; i < order.length; i += batchSize) out.push(order.subarray(i, Math.min(order.length, i + batchSize)));
  return out;
}

let running = false;

/** The epoch whose weights a phase ended with: the best one when best weights were restored, else the last. */
export function resultEpoch(history: readonly EpochStats[]): EpochStats | undefined {
  return history.find((h) => h.best) ?? history.at(-1);
}

/**
 * Trains `model`'s trainable weights: the one training loop of ctrain. `data` is rows in memory
 * ({@link ArrayData}, with `opts.validation` and `opts.sliceOf`) or any {@link BatchSource}: augmented
 * images (core/training/image_batches.ts), activations, or a feature cache streamed from disk
 * (core/training/feature_batches.ts). One fit at a time per process.
 */
export async function fit(model: tf.LayersModel, data: ArrayData | BatchSource, opts: FitOptions): Promise<EpochStats[]> {
  if (!isArrayData(data)) {
    if (opts.validation || opts.sliceOf) throw new RangeError("fit: validation and sliceOf belong to rows in memory; a BatchSource validates and slices itself");
    return fitBatches(model, data, opts);
  }
  const { validation, sliceOf, ...rest } = opts;
  return fitBatches(model, arrayBatches(data, opts.numClasses, { validation, sliceOf }), rest);
}

function isArrayData(d: ArrayData | BatchSource): d is ArrayData {
  return (d as ArrayData).x instanceof Float32Array && Array.isArray((d as ArrayData).sampleShape);
}

/** Rows in memory as a {@link BatchSource}: seeded batches gathered by row, validation on `validation` when it has rows. */
export function arrayBatches(train: ArrayData, numClasses: number, o: { validation?: ArrayData; sliceOf?: FitOptions["sliceOf"] } = {}): BatchSource {
  const { validation, sliceOf } = o;
  return {
    samples: numSamples(train),
    batch: (indices, b) => takeRows(train, sliceOf ? sliceOf(indices, b) : indices),
    validate: validation !== undefined && numSamples(validation) > 0 ? async (m) => evaluate(m, validation, numClasses) : undefined,
  };
}

/**
 * Loss, accuracy and predictions over batches that arrive one after another (a split streamed from
 * a feature cache, images decoded per batch): only one batch is held at a time.
 */
export async function evaluateBatches(model: tf.LayersModel, batches: AsyncIterable<ArrayData>, numClasses: number, samples: number): Promise<Evaluation> {
  const predictions = new Int32Array(samples);
  let lossSum = 0, correct = 0, at = 0;
  for await (const b of batches) {
    const m = numSamples(b);
    if (m === 0) continue;
    const ev = evaluate(model, b, numClasses, 256);
    lossSum += ev.loss * m;
    for (let i = 0; i < m; i++) if (ev.predictions[i] === b.y[i]) correct++;
    predictions.set(ev.predictions, at);
    at += m;
  }
  if (at !== samples) throw new RangeError(`evaluateBatches: ${at} samples arrived, ${samples} expected`);
  return { loss: at ? lossSum / at : NaN, accuracy: at ? correct / at : NaN, predictions };
}

/** Where {@link fit} gets its data. */
export interface BatchSource {
  /** Training samples; batches are a seeded permutation of 0..samples-1 unless {@link order} says otherwise. */
  samples: number;
  /**
   * The training rows of global batch `b` (sample indices in order). Rows without
   * {@link ArrayData.index} are taken to be `indices` in order; a source that returns only a part of
   * the batch (data-parallel slicing) sets the index of its rows.
   */
  batch(indices: Int32Array, b: number, epoch: number): ArrayData | Promise<ArrayData>;
  /**
   * The epoch's sample order (a permutation of 0..samples-1, cut into batches by the loop). Default:
   * a seeded uniform permutation ({@link epochBatches}). A source streamed from disk gives an order
   * that stays local (shuffled blocks, rows shuffled within a window of blocks) so reads stay sequential.
   */
  order?(epoch: number): Int32Array;
  /**
   * Prepare batch b + 1 while batch b trains (decoding images, reading the cache). Default false: `batch` is then
   * called right before its step, which data-parallel `sliceOf` callers rely on (they note the current batch).
   */
  prefetch?: boolean;
  /** Validation loss and accuracy of `model` as it is now (undefined: no validation). */
  validate?: (model: tf.LayersModel) => Promise<{ loss: number; accuracy: number }>;
  /**
   * Releases what preparing batches holds (a preparation thread): fit calls it when it ends, however it
   * ends. A later `batch` may start it again. Must not reject.
   */
  close?: () => void | Promise<void>;
}

/**
 * The epoch loop behind {@link fit}: seeded batches, the shared step, the training controls.
 * Argument checks come first; the learning rate the optimizer started with is put back at the end.
 */
async function fitBatches(model: tf.LayersModel, data: BatchSource, opts: Omit<FitOptions, "validation" | "sliceOf">): Promise<EpochStats[]> {
  if (!(opts.epochs >= 1)) throw new RangeError(`fit: epochs must be >= 1, got ${opts.epochs}`);
  if (!(opts.batchSize >= 1)) throw new RangeError(`fit: batchSize must be >= 1, got ${opts.batchSize}`);
  if (data.samples === 0) throw new RangeError("fit: no training samples");
  const c = opts.controls ?? {};
  // Best weights are on by default and simply have nothing to pick without validation; the others would silently do nothing.
  if (((c.earlyStoppingPatience ?? 0) > 0 || c.lrSchedule === "plateau") && !data.validate)
    throw new RangeError("fit: early stopping and the plateau schedule need validation data");
  checkControlsState(model, opts.initialControls);
  if (running) throw new Error("fit: another fit is running in this process");
  running = true;
  const schedule = new LearningRate(opts.optimizer, c, opts.epochs, opts.initialControls);
  const watch = new Watch(c, opts.initialControls);
  const history: EpochStats[] = [];
  try {
    opts.onControls?.(() => ({ ...watch.state(), ...schedule.state() }));
    for (let epoch = opts.initialEpoch ?? 0; epoch < opts.epochs; epoch++) {
      const lr = schedule.epochStart(epoch);
      const stats = await trainEpoch(model, data, opts, epoch);
      if (lr !== undefined) stats.lr = lr;
      if (data.validate) {
        const v = await data.validate(model);
        stats.val_loss = v.loss;
        stats.val_accuracy = v.accuracy;
      }
      history.push(stats);
      const improved = watch.epochEnd(model, stats);
      schedule.epochEnd(improved);
      await opts.onEpochEnd?.(stats);
      if (watch.shouldStop()) break;
    }
    watch.finish(model, history);
    return history;
  } finally {
    schedule.reset();
    watch.dispose();
    await data.close?.();
    running = false;
  }
}

/** A state to go on from must hold a best weight per trainable weight of the model, of its shape. */
function checkControlsState(model: tf.LayersModel, s: ControlsState | undefined): void {
  const w = s?.bestWeights;
  if (!w) return;
  const shapes = model.trainableWeights.map((t) => t.shape.join("x"));
  if (w.length !== shapes.length || w.some((a, i) => a.shape.join("x") !== shapes[i]))
    throw new RangeError(`fit: initialControls holds best weights of shapes [${w.map((a) => a.shape.join("x")).join(", ")}], the model's trainable weights are [${shapes.join(", ")}]`);
}

/** One pass over the epoch's batches (with `prefetch`, the next batch is prepared while the current one trains). */
async function trainEpoch(model: tf.LayersModel, data: BatchSource, opts: Omit<FitOptions, "validation" | "sliceOf">, epoch: number): Promise<EpochStats> {
  const t0 = performance.now();
  const order = data.order?.(epoch);
  if (order && order.length !== data.samples) throw new RangeError(`fit: the batch source's epoch order has ${order.length} samples, it says ${data.samples}`);
  const batches = order ? cutBatches(order, opts.batchSize) : epochBatches(data.samples, opts.batchSize, opts.seed, epoch);
  let lossSum = 0;
  let correct = 0;
  let seen = 0;
  const firstBatch = epoch === (opts.initialEpoch ?? 0) ? opts.initialBatch ?? 0 : 0;
  const prepare = (b: number): Promise<ArrayData> => Promise.resolve(data.batch(batches[b], b, epoch));
  let next = data.prefetch && firstBatch < batches.length ? prepare(firstBatch) : undefined;
  for (let b = firstBatch; b < batches.length; b++) {
    if (opts.signal?.aborted) throw opts.signal.reason ?? new Error("training stopped");
    const batch = withIndex(await (next ?? prepare(b)), batches[b]);
    next = data.prefetch && b + 1 < batches.length ? prepare(b + 1) : undefined;
    const m = numSamples(batch);
    const step = computeGradients(model, batch, opts.numClasses, opts.controls?.loss, { seed: opts.seed, epoch });
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
  return { epoch: epoch + 1, loss: seen ? lossSum / seen : NaN, accuracy: seen ? correct / seen : NaN, seconds, samples_per_second: seen / seconds };
}

/**
 * `batch` with its rows' global sample indices: a source that returns the whole global batch
 * `indices` without an index holds those samples in order; one that returns only a part must say which.
 */
function withIndex(batch: ArrayData, indices: Int32Array): ArrayData {
  if (batch.index) {
    if (batch.index.length !== numSamples(batch)) throw new RangeError(`fit: the batch source gave ${numSamples(batch)} rows with ${batch.index.length} sample indices`);
    return batch;
  }
  if (numSamples(batch) !== indices.length) throw new RangeError(`fit: the batch source gave ${numSamples(batch)} rows for a batch of ${indices.length} samples without saying which (set ArrayData.index)`);
  return { ...batch, index: indices };
}

/** The optimizer's learning rate under a schedule (Adam reads its `learningRate` field every step; SGD has a setter). */
class LearningRate {
  private readonly initial: number | undefined;
  private current: number | undefined;
  private wait = 0;

  /** `from`: the state to go on from (its rate and plateau count); the optimizer's own rate stays the initial one (cosine, reset). */
  constructor(private readonly optimizer: tf.Optimizer, private readonly c: TrainingControls, private readonly epochs: number, from?: ControlsState) {
    const lr = (optimizer as unknown as { learningRate?: unknown }).learningRate;
    const scheduled = (c.lrSchedule ?? "constant") !== "constant";
    if (scheduled && typeof lr !== "number") throw new RangeError(`fit: the ${c.lrSchedule} schedule needs an optimizer with a numeric learningRate`);
    this.initial = typeof lr === "number" ? lr : undefined;
    this.current = this.initial;
    if (!from) return;
    this.wait = from.lrWait;
    if (from.lr !== undefined && this.initial !== undefined && from.lr !== this.initial) this.set(from.lr);
  }

  state(): Pick<ControlsState, "lrWait" | "lr"> {
    return { lrWait: this.wait, ...(this.current !== undefined ? { lr: this.current } : {}) };
  }

  /** The rate of epoch `epoch`'s steps (set on the optimizer). */
  epochStart(epoch: number): number | undefined {
    if (this.c.lrSchedule === "cosine" && this.initial !== undefined) this.set(this.initial * 0.5 * (1 + Math.cos((Math.PI * epoch) / this.epochs)));
    return this.current;
  }

  /** Plateau: after `lrPatience` epochs without improvement, multiply by `lrFactor` (Keras ReduceLROnPlateau, no cooldown). */
  epochEnd(improved: boolean): void {
    if (this.c.lrSchedule !== "plateau" || this.current === undefined) return;
    this.wait = improved ? 0 : this.wait + 1;
    if (this.wait >= (this.c.lrPatience ?? 2)) {
      this.set(this.current * (this.c.lrFactor ?? 0.2));
      this.wait = 0;
    }
  }

  reset(): void {
    if (this.initial !== undefined && this.current !== this.initial) this.set(this.initial);
  }

  private set(lr: number): void {
    this.current = lr;
    const o = this.optimizer as unknown as { setLearningRate?: (lr: number) => void; learningRate: number };
    if (typeof o.setLearningRate === "function") o.setLearningRate(lr);
    else o.learningRate = lr;
  }
}

/** The monitored validation figure: improvement, patience, and a copy of the best epoch's trainable weights. */
class Watch {
  private best = Infinity;
  private bestEpoch = 0;
  private wait = 0;
  private snapshot: tf.Tensor[] | undefined;

  constructor(private readonly c: TrainingControls, from?: ControlsState) {
    if (!from) return;
    this.best = from.best;
    this.bestEpoch = from.bestEpoch;
    this.wait = from.wait;
    if (this.c.restoreBestWeights && from.bestWeights) this.snapshot = from.bestWeights.map((a) => tf.keep(tf.tensor(a.data, a.shape, "float32")));
  }

  /** Copies of the figures and (while fit runs) the best weights. */
  state(): Omit<ControlsState, "lrWait" | "lr"> {
    const bestWeights = this.snapshot?.map((t) => ({ shape: t.shape.slice(), data: Float32Array.from(t.dataSync() as Float32Array) }));
    return { best: this.best, bestEpoch: this.bestEpoch, wait: this.wait, ...(bestWeights ? { bestWeights } : {}) };
  }

  /** Records the epoch; true when the monitored figure improved. */
  epochEnd(model: tf.LayersModel, stats: EpochStats): boolean {
    const value = (this.c.monitor ?? "val_loss") === "val_loss" ? stats.val_loss : stats.val_accuracy === undefined ? undefined : -stats.val_accuracy;
    if (value === undefined || !Number.isFinite(value) || !(value < this.best)) {
      this.wait++;
      return false;
    }
    this.best = value;
    this.bestEpoch = stats.epoch;
    this.wait = 0;
    if (this.c.restoreBestWeights) {
      tf.dispose(this.snapshot);
      this.snapshot = model.trainableWeights.map((w) => tf.keep(w.read().clone()));
    }
    return true;
  }

  shouldStop(): boolean {
    const patience = this.c.earlyStoppingPatience ?? 0;
    return patience > 0 && this.wait >= patience;
  }

  /** Puts the best epoch's weights back (when restoring and the last epoch was not the best) and marks that epoch. */
  finish(model: tf.LayersModel, history: EpochStats[]): void {
    if (!this.c.restoreBestWeights || !this.snapshot) return;
    if (this.bestEpoch !== history.at(-1)?.epoch) model.trainableWeights.forEach((w, i) => w.write(this.snapshot![i]));
    const best = history.find((h) => h.epoch === this.bestEpoch);
    if (best) best.best = true;
  }

  dispose(): void {
    tf.dispose(this.snapshot);
    this.snapshot = undefined;
  }
}

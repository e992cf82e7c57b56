/**
 * Raw-pixel baselines: what a model gets with no pretrained features at all, on the same seeded
 * splits `ctrain run` uses (the one openDataset), trained by the same loop (train_loop.ts fit) with
 * the same controls. A transfer-learning result is only worth its cost where it beats these.
 *
 *   logistic   multinomial logistic regression: one Dense softmax layer on the pixels
 *   mlp        ctrain's own head (core/models/head.ts: Dense relu, Dropout, Dense softmax) on the pixels,
 *              so the gap to a `ctrain run` with the same --head-units/--dropout is what the features bring
 *
 * Pixels are the images resized to `pixelSize` (28 = Fashion-MNIST's own size, no resampling), scaled
 * to [0, 1], one channel when every image of the data set is gray (IDX sets), else three.
 */
import * as tf from "@tensorflow/tfjs";
import type { SampleList } from "../datasets/sample_list.js";
import type { Dataset, Split } from "../datasets/types.js";
import { BadInputError } from "../runtime/errors.js";
import { buildHead } from "../models/head.js";
import { type ArrayData, type EpochStats, evaluate, fit, resultEpoch, type TrainingControls } from "./train_loop.js";

export const BASELINE_KINDS = ["logistic", "mlp"] as const;
export type BaselineKind = (typeof BASELINE_KINDS)[number];

/** The pixels of a data set's splits, in memory. */
export interface PixelData {
  train: ArrayData;
  val: ArrayData;
  test: ArrayData;
  /** 1 when every image was gray (R = G = B everywhere), else 3. */
  channels: number;
  /** Inputs that could not be decoded, with the reason (they are left out, as `ctrain run` leaves them out). */
  skipped: { id: string; reason: string; message: string }[];
}

/** Images decoded at once; bounded so a folder of large JPEGs does not hold thousands of buffers. */
const DECODE_CONCURRENCY = 16;

/**
 * Decodes every sample of `dataset` at `pixelSize` x `pixelSize` into [0, 1] floats, per split. An
 * undecodable image is skipped and listed; any other error is thrown.
 */
export async function readPixels(dataset: Dataset, pixelSize: number): Promise<PixelData> {
  const n = dataset.samples.length;
  const plane = pixelSize * pixelSize;
  const rgb = new Uint8Array(n * plane * 3);
  const ok = new Uint8Array(n);
  const skipped: PixelData["skipped"] = [];
  let next = 0;
  const decodeNext = async (): Promise<void> => {
    for (let i = next++; i < n; i = next++) {
      try {
        rgb.set(await dataset.readRgb(dataset.samples.get(i), pixelSize), i * plane * 3);
        ok[i] = 1;
      } catch (err) {
        if (!(err instanceof BadInputError)) throw err;
        skipped.push({ id: dataset.samples.id(i), reason: err.reason, message: err.message });
      }
    }
  };
  await Promise.all(Array.from({ length: Math.min(DECODE_CONCURRENCY, n) }, decodeNext));
  const channels = isGray(rgb, ok, plane) ? 1 : 3;
  const part = (split: Split): ArrayData => splitPixels(rgb, ok, dataset.samples, split, plane, channels);
  return { train: part("train"), val: part("val"), test: part("test"), channels, skipped };
}

/** True when every decoded image has R = G = B at every pixel. */
function isGray(rgb: Uint8Array, ok: Uint8Array, plane: number): boolean {
  for (let i = 0; i < ok.length; i++) {
    if (!ok[i]) continue;
    for (let p = i * plane * 3, end = p + plane * 3; p < end; p += 3) if (rgb[p] !== rgb[p + 1] || rgb[p] !== rgb[p + 2]) return false;
  }
  return true;
}

function splitPixels(rgb: Uint8Array, ok: Uint8Array, samples: SampleList, split: Split, plane: number, channels: number): ArrayData {
  const rows: number[] = [];
  for (let i = 0; i < samples.length; i++) if (ok[i] && samples.split(i) === split) rows.push(i);
  const dim = plane * channels;
  const x = new Float32Array(rows.length * dim);
  const y = new Int32Array(rows.length);
  rows.forEach((r, k) => {
    const src = r * plane * 3;
    const dst = k * dim;
    if (channels === 1) for (let p = 0; p < plane; p++) x[dst + p] = rgb[src + p * 3] / 255;
    else for (let j = 0; j < dim; j++) x[dst + j] = rgb[src + j] / 255;
    y[k] = samples.label(r);
  });
  return { x, sampleShape: [dim], y };
}

/** Multinomial logistic regression: one Dense softmax layer (layer name fixed, as the head's are). */
function buildLogistic(inputDim: number, numClasses: number, seed: number): tf.LayersModel {
  const input = tf.input({ shape: [inputDim], name: "baseline_input" });
  const out = tf.layers.dense({ units: numClasses, activation: "softmax", name: "baseline_out", kernelInitializer: tf.initializers.glorotUniform({ seed }) }).apply(input) as tf.SymbolicTensor;
  return tf.model({ inputs: input, outputs: out, name: "ctrain_logistic" });
}

export interface BaselineOptions {
  kind: BaselineKind;
  epochs: number;
  batchSize: number;
  /** Adam's learning rate. */
  learningRate: number;
  /** mlp: hidden units (the head's --head-units). */
  units: number;
  /** mlp: dropout rate (the head's --dropout). */
  dropout: number;
  seed: number;
  numClasses: number;
  /** Early stopping, best weights, schedule: the same controls as the head phase. */
  controls?: TrainingControls;
  onEpochEnd?: (stats: EpochStats) => void;
}

export interface BaselineResult {
  kind: BaselineKind;
  /** Trainable parameters of the model. */
  params: number;
  history: EpochStats[];
  /** Validation accuracy of the epoch the model ended with (the best one when best weights were restored). */
  val_accuracy: number;
  test: { loss: number; accuracy: number; samples: number };
  seconds: number;
}

/** Trains one baseline on `data.train` (validated on `data.val`) and tests it once on `data.test`. */
export async function trainBaseline(data: PixelData, o: BaselineOptions): Promise<BaselineResult> {
  const t0 = performance.now();
  const dim = data.train.sampleShape[0];
  const model = o.kind === "logistic"
    ? buildLogistic(dim, o.numClasses, o.seed)
    : buildHead({ featureDim: dim, numClasses: o.numClasses, units: o.units, dropout: o.dropout, seed: o.seed });
  const optimizer = tf.train.adam(o.learningRate);
  try {
    const history = await fit(model, data.train, {
      epochs: o.epochs, batchSize: o.batchSize, seed: o.seed, numClasses: o.numClasses, optimizer,
      validation: data.val.y.length > 0 ? data.val : undefined, controls: o.controls, onEpochEnd: o.onEpochEnd,
    });
    const ev = evaluate(model, data.test, o.numClasses);
    const ended = resultEpoch(history);
    return {
      kind: o.kind, params: model.countParams(), history, val_accuracy: ended?.val_accuracy ?? NaN,
      test: { loss: ev.loss, accuracy: ev.accuracy, samples: data.test.y.length }, seconds: (performance.now() - t0) / 1000,
    };
  } finally {
    optimizer.dispose();
    model.dispose();
  }
}

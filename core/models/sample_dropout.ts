/**
 * Dropout whose training-time mask is a function of (run seed, epoch, global sample index, layer,
 * unit) -- see core/runtime/sample_keys.ts -- instead of a fresh random draw per call as
 * tf.layers.dropout makes. A data-parallel worker computing its part of a global batch then drops
 * exactly the units one process drops for those samples, so N workers reach the one-process weights
 * with dropout on.
 *
 * The training step says which samples a batch holds with {@link withSampleKeys} (train_loop's
 * computeGradients does); the layer reads that in call(). Keras' inverted dropout: kept units are
 * scaled by 1 / (1 - rate) in training, and the layer is the identity at inference.
 *
 * Outside such a scope (someone calls model.fit, or apply with training=true, directly) the layer
 * behaves as tf.layers.dropout does: a fresh random mask on every call.
 *
 * Saved models stay standard: the class is registered under Keras' own class name "Dropout" with
 * Dropout's config (rate, noiseShape, seed), so model.json says Dropout and plain TF.js / Keras load
 * it as their dropout, and the ONNX export converts it as one (identity). Importing this module
 * makes every layers model loaded in this process (tf.loadLayersModel: the head sent to workers, a
 * saved classifier) build its Dropout layers as this class.
 */
import * as tf from "@tensorflow/tfjs";
import { nameStream, type SampleKeys, sampleSeed, uniformAt } from "../runtime/sample_keys.js";

let current: SampleKeys | undefined;

/**
 * Runs `fn` (synchronous: a training step's forward pass) with `keys` naming the batch's samples, so
 * every {@link SampleDropout} called with training=true inside draws the masks of those samples.
 */
export function withSampleKeys<T>(keys: SampleKeys, fn: () => T): T {
  const outer = current;
  current = keys;
  try {
    return fn();
  } finally {
    current = outer;
  }
}

/** Dropout's arguments (tf.layers.dropout's). */
export type SampleDropoutArgs = Parameters<typeof tf.layers.dropout>[0];

/** The {@link SampleDropout} mask of rows `keys.index` (rows x units), 0 or 1 / (1 - rate). */
export function sampleMask(keys: SampleKeys, units: number, rate: number, stream: number): Float32Array {
  const rows = keys.index.length;
  const out = new Float32Array(rows * units);
  const scale = 1 / (1 - rate);
  for (let i = 0; i < rows; i++) {
    const key = sampleSeed(keys.seed, keys.epoch, keys.index[i], stream);
    for (let j = 0; j < units; j++) if (uniformAt(key, j) >= rate) out[i * units + j] = scale;
  }
  return out;
}

/** Inverted dropout with per-sample deterministic masks (file comment); serialized as Keras' Dropout. */
export class SampleDropout extends tf.layers.Layer {
  static className = "Dropout";
  readonly rate: number;
  readonly noiseShape: number[] | undefined;
  readonly seed: number | undefined;

  constructor(args: SampleDropoutArgs) {
    super(args);
    this.rate = Math.max(Math.min(args.rate, 1), 0);
    this.noiseShape = args.noiseShape;
    this.seed = args.seed;
    this.supportsMasking = true;
  }

  /** The stream of this layer's masks: its name (fixed in ctrain's models, kept by save and load) and seed. */
  get stream(): number {
    return (nameStream(this.name) ^ (this.seed ?? 0)) >>> 0;
  }

  override call(inputs: tf.Tensor | tf.Tensor[], kwargs: Record<string, unknown>): tf.Tensor {
    return tf.tidy(() => {
      this.invokeCallHook(inputs, kwargs);
      const x = Array.isArray(inputs) ? inputs[0] : inputs;
      if (!(this.rate > 0 && this.rate < 1) || kwargs["training"] !== true) return x;
      return x.mul(this.mask(x.shape));
    });
  }

  /** The mask, shaped as the noise shape (the input's by default) so that it broadcasts over `shape`. */
  private mask(shape: number[]): tf.Tensor {
    const maskShape = this.noiseShape ? this.noiseShape.map((d, i) => d ?? shape[i]) : shape;
    const keys = current;
    // A mask shared by the whole batch (noise shape [1, ...]) belongs to no sample: random, as tf.layers.dropout.
    if (!keys || maskShape[0] !== shape[0]) return tf.randomUniform(maskShape).greaterEqual(this.rate).toFloat().div(1 - this.rate);
    if (keys.index.length !== shape[0]) throw new RangeError(`dropout ${this.name}: the sample keys name ${keys.index.length} samples, the batch has ${shape[0]}`);
    const units = maskShape.slice(1).reduce((a, b) => a * b, 1);
    return tf.tensor(sampleMask(keys, units, this.rate, this.stream), maskShape);
  }

  override getConfig(): tf.serialization.ConfigDict {
    const config: tf.serialization.ConfigDict = { rate: this.rate, noiseShape: this.noiseShape ?? null, seed: this.seed ?? null };
    Object.assign(config, super.getConfig());
    return config;
  }
}

tf.serialization.registerClass(SampleDropout);

/** A {@link SampleDropout} layer (the drop-in for tf.layers.dropout). */
export function sampleDropout(args: SampleDropoutArgs): SampleDropout {
  return new SampleDropout(args);
}

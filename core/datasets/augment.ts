/**
 * Data augmentation for method 2 (frozen base + head trained end to end) and for fine-tuning with
 * augmentation: random horizontal flip, rotation, zoom and translation, the Keras preprocessing
 * layers' recipe (RandomFlip("horizontal"), RandomRotation, RandomZoom, RandomTranslation).
 *
 * All four are folded into one projective transform per image and applied with a single
 * tf.image.transform (the `Transform` kernel, which the wasm backend has), so a batch costs one
 * pass over its pixels. Each image's parameters come from an Rng seeded by (seed, epoch, global
 * sample index) alone (core/runtime/sample_keys.ts): a sample gets the same augmentation whichever
 * batch, process or data-parallel worker's part of a batch it is in, and a resumed run repeats it.
 */
import * as tf from "@tensorflow/tfjs";
import { FILL_MODES, type FillMode, type JobOptions } from "../runtime/config.js";
import { ConfigError } from "../runtime/errors.js";
import { Rng } from "../runtime/rng.js";
import { type SampleKeys, sampleSeed } from "../runtime/sample_keys.js";

export { FILL_MODES, type FillMode };

/** What augmentation does to each training image. Every range is symmetric around "no change". */
export interface AugmentOptions {
  /** Mirror left-right with probability 1/2. Default true. */
  flip: boolean;
  /** Maximum rotation as a fraction of a full turn (Keras RandomRotation `factor`): 0.1 = up to +-36 degrees. Default 0.05. */
  rotation: number;
  /** Maximum zoom as a fraction: the image is scaled by a factor in [1 - zoom, 1 + zoom]. Default 0.1. */
  zoom: number;
  /** Maximum shift as a fraction of the width/height, per axis. Default 0.1. */
  translation: number;
  /** How pixels from outside the image are filled. Default `reflect` (Keras' default). */
  fillMode: FillMode;
  /** Value of `constant` fill, in input pixel units (0..255). Default 0. */
  fillValue: number;
}

export const DEFAULT_AUGMENT: Readonly<AugmentOptions> = Object.freeze({ flip: true, rotation: 0.05, zoom: 0.1, translation: 0.1, fillMode: "reflect", fillValue: 0 });

/** Defaults filled in and ranges checked (ConfigError naming the field). */
export function resolveAugment(partial: Partial<AugmentOptions> = {}): AugmentOptions {
  const o: AugmentOptions = { ...DEFAULT_AUGMENT, ...partial };
  const inRange = (k: "rotation" | "zoom" | "translation", max: number): void => {
    if (!(o[k] >= 0 && o[k] <= max)) throw new ConfigError(`augmentation ${k} must be between 0 and ${max}, got ${o[k]}.`);
  };
  inRange("rotation", 0.5);
  inRange("zoom", 0.9);
  inRange("translation", 0.5);
  if (!(FILL_MODES as readonly string[]).includes(o.fillMode)) throw new ConfigError(`augmentation fillMode must be one of ${FILL_MODES.join(", ")}, got ${JSON.stringify(o.fillMode)}.`);
  return o;
}

/** The augmentation a job's options ask for (`--augment-*`). */
export function augmentOf(o: Pick<JobOptions, "augmentFlip" | "augmentRotation" | "augmentZoom" | "augmentTranslation" | "augmentFillMode">): AugmentOptions {
  return resolveAugment({ flip: o.augmentFlip === "horizontal", rotation: o.augmentRotation, zoom: o.augmentZoom, translation: o.augmentTranslation, fillMode: o.augmentFillMode });
}

/** True when the options change nothing. */
export function isIdentity(o: AugmentOptions): boolean {
  return !o.flip && o.rotation === 0 && o.zoom === 0 && o.translation === 0;
}

/**
 * tf.image.transform rows [a0 a1 a2 b0 b1 b2 c0 c1] for the images of samples `keys.index` (of
 * `height` x `width`), mapping each output pixel to the input pixel it samples: the inverse of
 * "flip, rotate, zoom, shift" about the image centre. Row i's parameters are drawn from
 * Rng(sampleSeed(keys.seed, keys.epoch, keys.index[i])).
 */
export function transformMatrices(keys: SampleKeys, height: number, width: number, o: AugmentOptions): Float32Array {
  const n = keys.index.length;
  const out = new Float32Array(n * 8);
  const cx = (width - 1) / 2, cy = (height - 1) / 2;
  for (let i = 0; i < n; i++) {
    const rng = new Rng(sampleSeed(keys.seed, keys.epoch, keys.index[i]));
    const f = o.flip && rng.next() < 0.5 ? -1 : 1;
    const theta = (rng.next() * 2 - 1) * o.rotation * 2 * Math.PI;
    const z = 1 + (rng.next() * 2 - 1) * o.zoom;
    const tx = (rng.next() * 2 - 1) * o.translation * width;
    const ty = (rng.next() * 2 - 1) * o.translation * height;
    const c = Math.cos(theta) / z, s = Math.sin(theta) / z;
    // input = F(R(-theta) (p - centre - t) / z) + centre, F = mirror in x when flipped.
    const ox = cx + tx, oy = cy + ty;
    out.set([f * c, f * s, cx - f * (c * ox + s * oy), -s, c, cy - (-s * ox + c * oy), 0, 0], i * 8);
  }
  return out;
}

/**
 * A randomly augmented copy of a batch of images ([n, h, w, c], any dtype, pixel units kept), as
 * float32; image i is sample `keys.index[i]`. The caller owns the result; nothing else is left allocated.
 */
export function augmentBatch(images: tf.Tensor4D, o: AugmentOptions, keys: SampleKeys): tf.Tensor4D {
  const [n, h, w] = images.shape;
  if (keys.index.length !== n) throw new RangeError(`augmentBatch: ${n} images but ${keys.index.length} sample indices`);
  return tf.tidy(() => {
    const x = images.dtype === "float32" ? images.clone() : images.toFloat();
    if (isIdentity(o)) return x;
    const m = tf.tensor2d(transformMatrices(keys, h, w, o), [n, 8]);
    return tf.image.transform(x, m, "bilinear", o.fillMode, o.fillValue);
  });
}

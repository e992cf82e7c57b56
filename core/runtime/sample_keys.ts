/**
 * Keys of per-sample randomness. Every random draw of a training step (an image's augmentation, a
 * dropout mask) is a function of (run seed, epoch, global sample index) only -- never of the
 * process, of the batch a sample landed in, or of its row in a worker's part of the batch. So N
 * data-parallel workers, each drawing for its own part of a global batch, draw exactly what one
 * process draws for the whole batch, and a resumed run draws what the uninterrupted run drew.
 */

/** Which samples a batch holds, for the per-sample random draws of one training step. */
export interface SampleKeys {
  /** The run seed (the job's `--seed`). */
  seed: number;
  /** Training epoch, from 0. */
  epoch: number;
  /** Global sample index of each row of the batch: the row's index in the training split. */
  index: ArrayLike<number>;
}

/** murmur3's 32-bit finalizer: a bijection of uint32 with full avalanche. */
export function fmix32(h: number): number {
  h ^= h >>> 16;
  h = Math.imul(h, 0x85ebca6b);
  h ^= h >>> 13;
  h = Math.imul(h, 0xc2b2ae35);
  h ^= h >>> 16;
  return h >>> 0;
}

/**
 * The 32-bit seed of one sample's draws: a function of (seed, epoch, sample) and `stream`, which
 * keeps independent uses apart (augmentation is stream 0; each dropout layer has its own).
 */
export function sampleSeed(seed: number, epoch: number, sample: number, stream = 0): number {
  let h = fmix32((seed | 0) ^ 0x9e3779b9);
  h = fmix32(h ^ Math.imul(epoch + 1, 0x85ebca6b));
  h = fmix32(h ^ Math.imul(sample + 1, 0xc2b2ae35));
  return fmix32(h ^ Math.imul(stream + 1, 0x27d4eb2f));
}

/** Uniform in [0, 1): draw number `j` under a sample's seed (random access, unlike an Rng's sequence). */
export function uniformAt(key: number, j: number): number {
  return fmix32(key ^ fmix32(Math.imul(j + 1, 0x9e3779b1))) / 4294967296;
}

/** FNV-1a of a string: a stable 32-bit stream number for a name (a layer's). */
export function nameStream(name: string): number {
  let h = 0x811c9dc5;
  for (let i = 0; i < name.length; i++) h = Math.imul(h ^ name.charCodeAt(i), 0x01000193);
  return h >>> 0;
}

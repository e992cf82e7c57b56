/**
 * What every data set looks like to the rest of ctrain: a list of labelled sample ids split into
 * train/val/test, the inputs refused while listing, a fingerprint for the feature cache, and a
 * decoder that turns one sample into size x size x 3 RGB bytes. Folder and IDX data sets implement it.
 */

import type { SampleList } from "./sample_list.js";

export const SPLITS = ["train", "val", "test"] as const;
export type Split = (typeof SPLITS)[number];

/** One usable sample. `id` is stable across processes and runs: a path relative to the root, or set/index. */
export interface SampleRef {
  id: string;
  /** Index into {@link Dataset.classes}. */
  label: number;
  split: Split;
}

/** Why an input was refused; `reason` is a metric label. */
export const SKIP_REASONS = {
  /** Zero-byte file. */
  empty: "empty",
  /** Decoder error in the middle of the data, bad checksum, bad header. */
  corrupt: "corrupt",
  /** The data stops before the image is complete. */
  truncated: "truncated",
  /** Not an image format we decode (or an extension we do not list). */
  notAnImage: "not_an_image",
  /** width x height above `maxPixels` (a decompression bomb, or simply too big). */
  tooManyPixels: "too_many_pixels",
  /** Smaller than 2 x 2 pixels. */
  tooSmall: "too_small",
  /** The file could not be read (gone, permissions). */
  unreadable: "unreadable",
  /** The id does not name a sample of this data set (a stale or foreign message). */
  unknownSample: "unknown_sample",
  /** The same file reached a second time (through a link), or through a link into another class's folder. */
  duplicate: "duplicate",
} as const;
export type SkipReason = (typeof SKIP_REASONS)[keyof typeof SKIP_REASONS];

/** An input refused while listing (before any decoding). Refusals at decode time are BadInputErrors. */
export interface SkippedInput {
  id: string;
  reason: string;
  message: string;
}

export interface Dataset {
  /** e.g. "fashion-mnist" or the folder path */
  name: string;
  classes: string[];
  /** every usable sample after splitting and --limit, in a stable order (train, then val, then test; listing order within each) */
  samples: SampleList;
  /** inputs refused while listing (empty files, unreadable IDX items...) */
  skipped: SkippedInput[];
  /** what the listing left out beyond single inputs, for the log (a class folder without images, a link loop not followed) */
  warnings?: string[];
  /** hex sha256 over what identifies the inputs (paths + sizes + mtimes for folders, file contents hash for IDX), the split parameters, seed and limit: the feature-cache key uses it */
  fingerprint: string;
  /**
   * Decode one sample and return size x size x 3 RGB uint8 (HWC, row-major). Grayscale becomes 3 equal
   * channels; alpha is flattened onto black; CMYK/16-bit converted. Throws BadInputError(id, reason,
   * message) for corrupt/truncated/empty/not-an-image/too-many-pixels/too-small input (see
   * {@link SKIP_REASONS}). Safe to call concurrently.
   */
  readRgb(sample: SampleRef, size: number): Promise<Uint8Array>;
}

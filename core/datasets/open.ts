/**
 * `--data` spec -> Dataset. The one entry point the coordinator, workers and `predict` use.
 *
 *   fashion-mnist       Debian's dataset-fashion-mnist (/usr/share/datasets/fashion-mnist, or
 *                       $CTRAIN_FASHION_MNIST_DIR)
 *   mnist:<dir>         the four MNIST IDX files in <dir> (gz or not), classes "0".."9"
 *   idx:<dir>           the same, for any IDX set; class names from <dir>/classes.txt (one a line)
 *                       when present, else "0".."9"
 *   synthetic:N[:classes]  N procedural images made from (seed, index) on the fly (default 10 classes):
 *                       for scale benches and tests, no files (core/datasets/synthetic.ts)
 *   <folder>            one sub-folder per class (a folder literally named "fashion-mnist" is ./fashion-mnist)
 */
import { readFile } from "node:fs/promises";
import { existsSync } from "node:fs";
import { join } from "node:path";
import { ConfigError } from "../runtime/errors.js";
import { envString } from "../runtime/config.js";
import { openFolderDataset } from "./folder.js";
import { DIGIT_CLASSES, FASHION_MNIST_CLASSES, openIdxDataset } from "./idx.js";
import { openSyntheticDataset, parseSyntheticSpec, SYNTHETIC_PREFIX } from "./synthetic.js";
import type { Dataset } from "./types.js";

export type { Dataset, SampleRef, SkippedInput, Split } from "./types.js";

export interface OpenOptions {
  /** Seed of the splits and of `limit`'s subsets (same seed, same samples, in any process). */
  seed: number;
  /** Fraction of each class's training data held out for validation, in [0, 1). */
  valSplit: number;
  /** Fraction of each class held out for test, in [0, 1); ignored by IDX sets, whose t10k files are the test split. */
  testSplit: number;
  /** At most this many training samples, val and test in proportion to train (stratified; splits.ts limitsFor); 0 = all. */
  limit: number;
  /** Refuse images whose header claims more than this many pixels (width x height). */
  maxPixels: number;
}

/** Where Debian's dataset-fashion-mnist puts the files. */
export const FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist";

function checkOptions(o: OpenOptions): void {
  const bad = (what: string, v: unknown): never => {
    throw new ConfigError(`openDataset: ${what}, got ${JSON.stringify(v)}.`);
  };
  if (!Number.isInteger(o.seed) || o.seed < 0 || o.seed > 2 ** 32 - 1) bad("seed must be a whole number in 0..2^32-1", o.seed);
  if (!(o.valSplit >= 0 && o.valSplit < 1)) bad("valSplit must be in [0, 1)", o.valSplit);
  if (!(o.testSplit >= 0 && o.testSplit < 1)) bad("testSplit must be in [0, 1)", o.testSplit);
  if (o.valSplit + o.testSplit >= 1) bad("valSplit + testSplit must be below 1", o.valSplit + o.testSplit);
  if (!Number.isInteger(o.limit) || o.limit < 0) bad("limit must be a whole number >= 0", o.limit);
  if (!(o.maxPixels >= 1)) bad("maxPixels must be >= 1", o.maxPixels);
}

async function idxClasses(dir: string): Promise<string[]> {
  const file = join(dir, "classes.txt");
  if (!existsSync(file)) return [...DIGIT_CLASSES];
  const names = (await readFile(file, "utf8")).split(/\r?\n/).map((l) => l.trim()).filter((l) => l !== "");
  if (names.length < 2) throw new ConfigError(`${file} must list at least 2 class names, one a line.`);
  return names;
}

/** Opens the data set named by `spec` (the `--data` value). Throws ConfigError for anything fatal. */
export async function openDataset(spec: string, opts: OpenOptions): Promise<Dataset> {
  // A bad synthetic spec is refused before the options are even looked at: it is the first thing to fix.
  if (spec.startsWith(SYNTHETIC_PREFIX)) parseSyntheticSpec(spec);
  checkOptions(opts);
  if (spec.startsWith(SYNTHETIC_PREFIX)) return openSyntheticDataset({ spec, seed: opts.seed, valSplit: opts.valSplit, testSplit: opts.testSplit, limit: opts.limit });
  const common = { seed: opts.seed, valSplit: opts.valSplit, limit: opts.limit };
  if (spec === "fashion-mnist") {
    const dir = envString("CTRAIN_FASHION_MNIST_DIR") ?? FASHION_MNIST_DIR;
    if (!existsSync(dir))
      throw new ConfigError(
        `--data fashion-mnist: ${dir} does not exist. Install it with \`apt-get install dataset-fashion-mnist\`, or point CTRAIN_FASHION_MNIST_DIR at a folder with the four IDX files.`,
      );
    return openIdxDataset({ name: "fashion-mnist", idPrefix: "fashion-mnist", dir, classes: FASHION_MNIST_CLASSES, ...common });
  }
  const m = /^(mnist|idx):(.+)$/.exec(spec);
  if (m) {
    const [, kind, dir] = m;
    if (!existsSync(dir)) throw new ConfigError(`--data ${spec}: folder ${dir} does not exist.`);
    const classes = kind === "mnist" ? [...DIGIT_CLASSES] : await idxClasses(dir);
    return openIdxDataset({ name: spec, idPrefix: kind, dir, classes, ...common });
  }
  if (spec.trim() === "") throw new ConfigError(`--data is empty: give fashion-mnist, mnist:<dir>, idx:<dir> or a folder with one sub-folder per class.`);
  return openFolderDataset({ root: spec, testSplit: opts.testSplit, maxPixels: opts.maxPixels, ...common });
}

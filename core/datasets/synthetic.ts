/**
 * `--data synthetic:N[:classes]`: a procedural data set for scale benches and tests. Image i is made
 * from (seed, i) alone, on the fly, in any process: the coordinator and every worker generate the
 * same pixels from the spec, and no file is read or written. It measures speed and memory, not
 * model quality: the class signal (an oriented grating and a colour tint per class, under noise) is
 * easy on purpose, so a head learns it in an epoch and a broken pipeline shows as chance accuracy.
 *
 * Labels are `i mod classes` (balanced). Splits are stratified by construction: within a class,
 * sample q (= floor(i / classes)) goes to test or val by a seeded hash of q, so fractions hold to
 * within sampling error and no list of N keys is sorted. `--limit` keeps the first samples of each split.
 */
import { createHash } from "node:crypto";
import { ConfigError } from "../runtime/errors.js";
import { BadInputError } from "../runtime/errors.js";
import { Rng } from "../runtime/rng.js";
import { SampleColumns, SampleList } from "./sample_list.js";
import { hash53, limitsFor } from "./splits.js";
import { SKIP_REASONS, SPLITS, type Dataset, type SampleRef, type Split } from "./types.js";

/** What `synthetic:N[:classes]` asks for. */
export interface SyntheticSpec {
  /** Images in the whole set (all splits), >= 1. */
  count: number;
  /** Classes, >= 2. Default 10. */
  classes: number;
}

export const SYNTHETIC_PREFIX = "synthetic:";
/** Bumped when the generator changes, so a feature cache of older pixels is not reused. */
const GENERATOR_VERSION = 1;

/** Parses `synthetic:N[:classes]`; refuses N <= 0, classes < 2 or anything not a whole number, naming --data. */
export function parseSyntheticSpec(spec: string): SyntheticSpec {
  const parts = spec.slice(SYNTHETIC_PREFIX.length).split(":");
  const whole = (s: string | undefined): number => (s !== undefined && /^\d+$/.test(s) ? Number(s) : NaN);
  const count = whole(parts[0]);
  const classes = parts.length > 1 ? whole(parts[1]) : 10;
  if (parts.length > 2 || !Number.isSafeInteger(count) || !Number.isSafeInteger(classes))
    throw new ConfigError(`--data ${spec}: expected synthetic:N or synthetic:N:classes with whole numbers, e.g. synthetic:100000 or synthetic:100000:10.`);
  if (count <= 0) throw new ConfigError(`--data ${spec}: N must be at least 1 image, got ${count}.`);
  if (classes < 2) throw new ConfigError(`--data ${spec}: a classifier needs at least 2 classes, got ${classes}.`);
  if (count < classes) throw new ConfigError(`--data ${spec}: ${count} images cannot cover ${classes} classes; use N >= classes.`);
  return { count, classes };
}

export interface SyntheticOptions {
  spec: string;
  seed: number;
  valSplit: number;
  testSplit: number;
  limit: number;
}

function splitOf(q: number, seed: number, valSplit: number, testSplit: number): Split {
  const u = hash53(`q${q}`, seed >>> 0) / 2 ** 53;
  return u < testSplit ? "test" : u < testSplit + valSplit ? "val" : "train";
}

/** The data set named by a `synthetic:` spec (see the file comment). */
export function openSyntheticDataset(o: SyntheticOptions): Dataset {
  const { count, classes } = parseSyntheticSpec(o.spec);
  const bySplit: Record<Split, number[]> = { train: [], val: [], test: [] };
  for (let i = 0; i < count; i++) bySplit[splitOf(Math.floor(i / classes), o.seed, o.valSplit, o.testSplit)].push(i);
  const keep = o.limit > 0 ? limitsFor(o.limit, { train: bySplit.train.length, val: bySplit.val.length, test: bySplit.test.length }) : undefined;
  // Columns, not an object a sample: 10^6 samples take ~20 MB, not ~150.
  const columns = new SampleColumns();
  const codes: number[] = [];
  for (const [code, split] of SPLITS.entries())
    for (const i of keep ? bySplit[split].slice(0, keep[split]) : bySplit[split]) {
      columns.push(`synthetic/${i}`, i % classes);
      codes.push(code);
    }
  const samples = new SampleList(columns, Uint8Array.from(codes));
  const names = Array.from({ length: classes }, (_, c) => `class_${String(c).padStart(String(classes - 1).length, "0")}`);
  const fingerprint = createHash("sha256")
    .update(JSON.stringify({ kind: "synthetic", v: GENERATOR_VERSION, count, classes, seed: o.seed, valSplit: o.valSplit, testSplit: o.testSplit, limit: o.limit }))
    .digest("hex");
  return {
    name: o.spec,
    classes: names,
    samples,
    skipped: [],
    fingerprint,
    async readRgb(sample: SampleRef, size: number): Promise<Uint8Array> {
      const m = /^synthetic\/(\d+)$/.exec(sample.id);
      const index = m ? Number(m[1]) : -1;
      if (!m || index >= count) throw new BadInputError(sample.id, SKIP_REASONS.unknownSample, `${sample.id} is not a sample of ${o.spec}.`);
      return syntheticImage(o.seed, index, index % classes, classes, size);
    },
  };
}

/**
 * Image `index` of class `label`: a grating at angle pi * label / classes with a random phase and
 * frequency jitter, tinted by class, plus uniform noise; size x size x 3 RGB bytes.
 */
export function syntheticImage(seed: number, index: number, label: number, classes: number, size: number): Uint8Array {
  const rng = new Rng(hash53(`img${index}`, seed >>> 0) % 2 ** 32);
  const angle = (Math.PI * label) / classes + (rng.next() - 0.5) * (Math.PI / classes / 3);
  const freq = ((2 + (label % 3)) * 2 * Math.PI * (0.9 + 0.2 * rng.next())) / size;
  const phase = rng.next() * 2 * Math.PI;
  const cx = Math.cos(angle) * freq, cy = Math.sin(angle) * freq;
  const hue = (2 * Math.PI * label) / classes;
  const tint = [Math.cos(hue), Math.cos(hue - (2 * Math.PI) / 3), Math.cos(hue + (2 * Math.PI) / 3)].map((t) => 128 + 40 * t);
  const out = new Uint8Array(size * size * 3);
  for (let y = 0, p = 0; y < size; y++) {
    for (let x = 0; x < size; x++) {
      const g = 70 * Math.sin(cx * x + cy * y + phase);
      for (let c = 0; c < 3; c++, p++) out[p] = Math.max(0, Math.min(255, Math.round(tint[c] + g + (rng.next() - 0.5) * 60)));
    }
  }
  return out;
}

/**
 * `ctrain baseline`: logistic regression and a small MLP on raw pixels, on the same seeded splits as
 * `ctrain run` with the same --data/--limit/--val-split/--test-split/--seed, trained by ctrain's own
 * loop (core/training/baseline.ts). Writes <out>/summary.json and <out>/history.json and prints one
 * line per model. No model, no workers, no NATS: it answers "what do the pretrained features buy?".
 */
import { mkdir, writeFile } from "node:fs/promises";
import { createRequire } from "node:module";
import { join } from "node:path";
import { version as tfjsVersion } from "@tensorflow/tfjs";
import { selectBackend } from "../core/models/backend.js";
import { openDataset } from "../core/datasets/open.js";
import { flagName, loadOptions, type JobOptions, optionsHelp, parseArgs } from "../core/runtime/config.js";
import { ConfigError, storageError } from "../core/runtime/errors.js";
import { createLogger } from "../core/runtime/log.js";
import { BASELINE_KINDS, type BaselineKind, type BaselineResult, readPixels, trainBaseline } from "../core/training/baseline.js";
import { controlsOf } from "../core/training/training_controls.js";

const HELP = `usage: ctrain baseline [--models logistic,mlp] [--pixel-size 28] [options]

Trains raw-pixel baselines on the splits \`ctrain run\` uses for the same --data, --limit, --val-split,
--test-split and --seed: logistic regression, and an MLP that is ctrain's head (--head-units,
--dropout) on pixels instead of features. Writes summary.json and history.json into --out
(default runs/baseline-<data>-<time>).

options:
  --models LIST                baselines to train, comma-separated (${BASELINE_KINDS.join("|")}) [default "logistic,mlp"]
  --pixel-size N               images are resized to N x N pixels (28 = Fashion-MNIST's own size) [default 28]
${optionsHelp("baseline")}`;

const VERSION = (createRequire(import.meta.url)("../../package.json") as { version: string }).version;
const round = (x: number, d = 4): number => (Number.isFinite(x) ? Number(x.toFixed(d)) : x);

/** `--models`: a non-empty list of known baselines, each once. */
export function parseModels(raw: string | true | undefined): BaselineKind[] {
  if (raw === undefined) return [...BASELINE_KINDS];
  const names = typeof raw === "string" ? raw.split(",").map((s) => s.trim()).filter((s) => s !== "") : [];
  const bad = names.find((n) => !(BASELINE_KINDS as readonly string[]).includes(n));
  if (names.length === 0 || bad !== undefined)
    throw new ConfigError(`--models must list baselines among ${BASELINE_KINDS.join(", ")} (comma-separated); got ${JSON.stringify(bad ?? raw)}.`);
  return [...new Set(names)] as BaselineKind[];
}

/** `--pixel-size`: a whole number of pixels in 8..256. */
export function parsePixelSize(raw: string | true | undefined): number {
  if (raw === undefined) return 28;
  const n = Number(raw);
  if (typeof raw !== "string" || !Number.isInteger(n) || n < 8 || n > 256)
    throw new ConfigError(`--pixel-size must be a whole number of pixels between 8 and 256, got ${JSON.stringify(raw)}.`);
  return n;
}

/** One baseline's figures in summary.json (the shape of `ctrain run`'s phases, plus its size). */
function phaseOf(r: BaselineResult, asked: number): Record<string, unknown> {
  const best = r.history.find((h) => h.best);
  return {
    epochs: r.history.length, epochs_asked: asked, ...(best && best !== r.history.at(-1) ? { best_epoch: best.epoch } : {}),
    val_accuracy: round(r.val_accuracy), test_accuracy: round(r.test.accuracy), test_loss: round(r.test.loss), params: r.params, seconds: round(r.seconds, 3),
  };
}

/** The options that shaped the result, by flag name (as `ctrain run`'s summary.options). */
function shapingOptions(opts: JobOptions, models: BaselineKind[], pixelSize: number): Record<string, unknown> {
  const keys = ["data", "limit", "valSplit", "testSplit", "seed", "epochs", "batchSize", "learningRate", "headUnits", "dropout", "earlyStoppingPatience", "restoreBestWeights", "monitor", "lrSchedule", "lrPatience"] as const;
  return { models: models.join(","), "pixel-size": pixelSize, ...Object.fromEntries(keys.map((k) => [flagName(k), opts[k]])) };
}

/** summary.json and history.json into `out`; a full or read-only disk becomes a StorageError naming the file. */
async function writeOut(out: string, summary: object, history: object): Promise<void> {
  for (const [file, value] of [["summary.json", summary], ["history.json", history]] as const) {
    const text = JSON.stringify(value, null, 2);
    const path = join(out, file);
    await writeFile(path, text).catch((err: unknown) => Promise.reject(storageError(err, path, Buffer.byteLength(text))));
  }
}

export async function main(argv: string[]): Promise<number> {
  const parsed = parseArgs(argv, ["models", "pixel-size"], ["help"], "baseline");
  if (parsed.extra["help"]) {
    console.log(HELP);
    return 0;
  }
  if (parsed.positionals.length) throw new ConfigError(`ctrain baseline takes no positional arguments (got ${JSON.stringify(parsed.positionals[0])}); options start with --.`);
  const models = parseModels(parsed.extra["models"]);
  const pixelSize = parsePixelSize(parsed.extra["pixel-size"]);
  const opts = loadOptions(parsed);
  if (parsed.options.out === undefined) opts.out = join("runs", opts.job.replace(/^ctrain-/, "baseline-"));
  const log = createLogger({ job: opts.job, format: opts.logFormat });
  const t0 = performance.now();

  const dataset = await openDataset(opts.data, { seed: opts.seed, valSplit: opts.valSplit, testSplit: opts.testSplit, limit: opts.limit, maxPixels: opts.maxPixels });
  if (!dataset.samples.some((s) => s.split === "train")) throw new ConfigError(`--data ${opts.data}: no training samples after splitting; add images or lower --val-split/--test-split.`);
  const backend = await selectBackend(opts.backend);
  const pixels = await readPixels(dataset, pixelSize);
  const samples = { train: pixels.train.y.length, val: pixels.val.y.length, test: pixels.test.y.length };
  log.info("baseline data", { data: dataset.name, classes: dataset.classes.length, ...samples, pixel_size: pixelSize, channels: pixels.channels, skipped: pixels.skipped.length, backend: backend.name });
  if (samples.val === 0 && (opts.earlyStoppingPatience > 0 || opts.lrSchedule === "plateau"))
    throw new ConfigError(`--data ${opts.data} has no validation samples after splitting, but --early-stopping-patience or --lr-schedule plateau watches them: raise --val-split or drop them.`);

  const results: Record<string, Record<string, unknown>> = {};
  const history: Record<string, unknown> = {};
  const summary = {
    kind: "baseline", job: opts.job, backend: backend.name, data: dataset.name, classes: dataset.classes,
    // The same fingerprint `ctrain run` keys its feature cache with: equal fingerprints, equal splits.
    data_fingerprint: dataset.fingerprint, samples, pixel_size: pixelSize, channels: pixels.channels,
    baselines: results, skipped_inputs: [...dataset.skipped, ...pixels.skipped],
    options: shapingOptions(opts, models, pixelSize),
    versions: { ctrain: VERSION, node: process.versions.node, tfjs: tfjsVersion.tfjs },
    seconds: 0, finished_at: "",
  };
  await mkdir(opts.out, { recursive: true }).catch((err: unknown) => Promise.reject(storageError(err, opts.out)));
  for (const kind of models) {
    const r = await trainBaseline(pixels, {
      kind, epochs: opts.epochs, batchSize: opts.batchSize, learningRate: opts.learningRate, units: opts.headUnits, dropout: opts.dropout,
      seed: opts.seed, numClasses: dataset.classes.length, controls: controlsOf(opts, undefined),
      onEpochEnd: (s) => log.info("epoch", { baseline: kind, epoch: s.epoch, loss: round(s.loss), accuracy: round(s.accuracy), val_loss: round(s.val_loss ?? NaN), val_accuracy: round(s.val_accuracy ?? NaN), lr: s.lr }),
    });
    results[kind] = phaseOf(r, opts.epochs);
    history[kind] = r.history;
    log.info("baseline trained", { baseline: kind, test_accuracy: round(r.test.accuracy), val_accuracy: round(r.val_accuracy), seconds: round(r.seconds, 2) });
    // Written after each model: on the full data set the MLP takes many times the logistic regression's time.
    summary.seconds = round((performance.now() - t0) / 1000, 3);
    summary.finished_at = new Date().toISOString();
    await writeOut(opts.out, summary, history);
  }
  const pct = (x: unknown): string => `${(Number(x) * 100).toFixed(2)}%`;
  console.log([
    `\nbaselines on raw pixels (${pixelSize}x${pixelSize}x${pixels.channels}; ${samples.train} train, ${samples.val} val, ${samples.test} test; training on ${backend.name}):`,
    ...models.map((k) => `  ${k.padEnd(9)} test accuracy ${pct(results[k].test_accuracy)}, val ${pct(results[k].val_accuracy)} (${results[k].epochs}/${opts.epochs} epochs, ${Number(results[k].seconds).toFixed(1)} s)`),
    `summary: ${join(opts.out, "summary.json")}`,
  ].join("\n"));
  return 0;
}

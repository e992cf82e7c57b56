/**
 * Options: one table per kind of process, every setting a row, read from flags, `--config job.yaml`
 * and the environment and validated once, before any work starts. Flags win over the environment,
 * which wins over the file. YAML keys are the flag names without dashes (`input-size: 96`); camelCase
 * works too. A row with `env` also reads that variable (`CTRAIN_DP_STEP_TIMEOUT_MS`).
 *
 * - {@link OPTION_SPECS}: the job (`run`, `coordinator`, `k8s render`, and subsets for the others).
 * - {@link WORKER_OPTION_SPECS}: `ctrain worker` (its job options come from the coordinator's spec).
 * - {@link ENV_SETTINGS}: settings that are environment variables only (paths, credentials, the log
 *   level); listed in every `--help` that reads them and checked by {@link checkEnvironment} at start.
 */
import { DATA_PARALLEL_DEFAULTS, MAX_BUCKET_BYTES, MIN_BUCKET_BYTES } from "../training/data_parallel_settings.js";
import { readFileSync } from "node:fs";
import { availableParallelism } from "node:os";
import { parse as parseYaml, stringify as stringifyYaml } from "yaml";
import { ConfigError } from "./errors.js";

export const BACKENDS = ["auto", "tensorflow-gpu", "tensorflow", "wasm", "cpu"] as const;
export type BackendName = (typeof BACKENDS)[number];
/** Inference engine of frozen forward passes (core/models/inference_engine.ts). */
export const ENGINES = ["auto", "onnx", "tfjs"] as const;
export type EngineName = (typeof ENGINES)[number];
/** Where onnxruntime runs the graph: auto = cuda when its CUDA provider is installed, else cpu. */
export const ENGINE_PROVIDERS = ["auto", "cpu", "cuda"] as const;
export type EngineProvider = (typeof ENGINE_PROVIDERS)[number];
/** Arithmetic of onnxruntime's frozen forward passes: fp32, or int8 (core/models/onnx/quantize.ts; bench/results/int8.json). */
export const ENGINE_PRECISIONS = ["fp32", "int8"] as const;
export type EnginePrecision = (typeof ENGINE_PRECISIONS)[number];
export const POOLINGS = ["avg", "max", "none"] as const;
export type Pooling = (typeof POOLINGS)[number];
export const METHODS = ["cached", "augment"] as const;
export type Method = (typeof METHODS)[number];
export const WIRE_DTYPES = ["fp32", "fp16"] as const;
export type WireDtype = (typeof WIRE_DTYPES)[number];
export const LAUNCHERS = ["local", "kubernetes"] as const;
export type Launcher = (typeof LAUNCHERS)[number];
/** How augmentation fills pixels that come from outside the image (tf.image.transform's modes). */
export const FILL_MODES = ["reflect", "nearest", "constant", "wrap"] as const;
export type FillMode = (typeof FILL_MODES)[number];
export const AUGMENT_FLIPS = ["horizontal", "none"] as const;
export type AugmentFlip = (typeof AUGMENT_FLIPS)[number];
/** `--preprocessing`: `auto` = the model's own (see core/models/model_zoo.ts PREPROCESSINGS, which this list repeats so options load without TensorFlow.js). */
export const PREPROCESSING_CHOICES = ["auto", "unit", "tf", "caffe", "torch", "none"] as const;
export type PreprocessingChoice = (typeof PREPROCESSING_CHOICES)[number];
/** Learning-rate schedules of the training loop (core/training/train_loop.ts). */
export const LR_SCHEDULES = ["constant", "cosine", "plateau"] as const;
export type LrSchedule = (typeof LR_SCHEDULES)[number];
/** The validation figure early stopping, best weights and the plateau schedule watch. */
export const MONITORS = ["val_loss", "val_accuracy"] as const;
export type Monitor = (typeof MONITORS)[number];
/** `--data-parallel`: whether fine-tuning runs data-parallel on the workers. */
export const DATA_PARALLEL_MODES = ["auto", "on", "off"] as const;
export type DataParallelMode = (typeof DATA_PARALLEL_MODES)[number];
/** The default of `--batch-size` and `--extract-batch-size`, in samples: the one place the number is written. */
export const DEFAULT_BATCH_SIZE = 32;
/** Options that only mean something with `--method augment`. */
export const AUGMENT_KEYS = ["augmentFlip", "augmentRotation", "augmentZoom", "augmentTranslation", "augmentFillMode"] as const;

/** Every option of a job. Defaults are in {@link OPTION_SPECS}. */
export interface JobOptions {
  /** Job id; scopes NATS subjects, stores and the output folder. Default: `ctrain-<data>-<time>`. */
  job: string;
  /** Data set: `fashion-mnist`, `mnist:<dir>` (IDX files), or a folder with one sub-folder per class. */
  data: string;
  /** Pretrained model: `mobilenet_v2` (offline, built in), a folder with model.json, or an http(s) URL. */
  model: string;
  /** Square input size in pixels the model is rebuilt for (96..224 for MobileNetV2). Default 96. */
  inputSize: number;
  /** Name of the layer whose output is the feature vector; `auto` = the model's base output (`out_relu` for mobilenet_v2, `mixed10` for inception_v3). Default `auto`. */
  featureLayer: string;
  /** How pixels are scaled for the model: `auto` = the model's own (`unit` = [0, 1] for the built-ins), or `unit|tf|caffe|torch|none`. Default `auto`. */
  preprocessing: PreprocessingChoice;
  /** Pooling over the feature map: `avg`, `max` or `none` (flatten). Default `avg`. */
  pooling: Pooling;
  /** `cached`: train the head on cached features; `augment`: frozen base + head end to end with augmentation. */
  method: Method;
  /** Augmentation (`--method augment`): random left-right mirror (`horizontal`) or none. Default `horizontal`. */
  augmentFlip: AugmentFlip;
  /** Augmentation: maximum rotation as a fraction of a full turn (0.05 = up to +-18 degrees). Default 0.05. */
  augmentRotation: number;
  /** Augmentation: maximum zoom as a fraction (images scaled by 1 +- zoom). Default 0.1. */
  augmentZoom: number;
  /** Augmentation: maximum shift as a fraction of width/height, per axis. Default 0.1. */
  augmentTranslation: number;
  /** Augmentation: how pixels from outside the image are filled. Default `reflect`. */
  augmentFillMode: FillMode;
  /** Epochs of head training. Default 10. */
  epochs: number;
  /** Units of the head's hidden Dense layer. Default 256. */
  headUnits: number;
  /** Dropout rate of the head. Default 0.5. */
  dropout: number;
  /** MiB of feature rows the head's stream holds (two shuffle windows; rows are shuffled within a window). Default 64. */
  shuffleBufferMib: number;
  /** Top layers of the base to unfreeze for fine-tuning (a count, or a layer name to unfreeze from); 0 = no fine-tuning. */
  fineTuneLayers: string;
  /** Epochs of fine-tuning. Default 0. */
  fineTuneEpochs: number;
  /** Learning rate of fine-tuning. Default 1e-5. */
  fineTuneLearningRate: number;
  /** Stop a phase when `monitor` has not improved for this many epochs; 0 = off. Default 0. */
  earlyStoppingPatience: number;
  /** End each phase with the weights of its best epoch by `monitor` (the saved model is that epoch's). Default true. */
  restoreBestWeights: boolean;
  /** What early stopping, best weights and the plateau schedule watch. Default `val_loss`. */
  monitor: Monitor;
  /** Learning-rate schedule of each phase: `constant`, `cosine` (to 0 over the phase) or `plateau` (x0.2 after `lrPatience` epochs without improvement). Default `constant`. */
  lrSchedule: LrSchedule;
  /** `--lr-schedule plateau`: epochs without improvement before the rate drops. Default 2. */
  lrPatience: number;
  /** Class weights of the training loss: `none`, `auto` (balanced: n / (classes * n_class)) or `<class>=<weight>,...` (others 1). Default `none`. */
  classWeight: string;
  /** Label smoothing of the training loss, in [0, 0.5). Default 0. */
  labelSmoothing: number;
  /** Global batch size (samples per step across all workers). Default {@link DEFAULT_BATCH_SIZE}. */
  batchSize: number;
  /** Images per frozen forward pass of feature extraction, on every worker (carried in the round's ExtractionRound) and in this process. Default {@link DEFAULT_BATCH_SIZE}. */
  extractBatchSize: number;
  /** Learning rate of head training (Adam). Default 1e-3. */
  learningRate: number;
  /** Number of workers. Default: one per core for `run`. */
  workers: number;
  /** NATS server URL(s), comma-separated. Empty for `run` = start an embedded nats-server. */
  nats: string;
  /** Output folder of the run. Default `runs/<job>`. */
  out: string;
  /** Compute backend. Default `auto` (tensorflow-gpu, tensorflow, wasm, cpu: the first that loads). */
  backend: BackendName;
  /** Inference engine of every frozen forward pass: `auto` (onnx when it loads and the model converts), `onnx`, `tfjs`. Default `auto`. */
  engine: EngineName;
  /**
   * `int8`: the onnx engine runs the graph quantized to int8 (calibrated on the first 64 training
   * images). bench/results/int8*.json, on a VNNI CPU: 1.8-2.9x the fp32 forward rate; head test
   * accuracy on Fashion-MNIST 0.03 point below fp32 with block_12_add features, 0.39 below with
   * out_relu. Default `fp32`.
   */
  enginePrecision: EnginePrecision;
  /** onnxruntime intra-op threads per worker process; 0 = the cores divided by the local worker processes. Default 0. */
  threads: number;
  /** onnxruntime execution provider: `auto` (cuda when its CUDA provider is installed, else cpu), `cpu`, `cuda`. Default `auto`. */
  engineProvider: EngineProvider;
  /** Use at most N samples of the training set (validation and test in the proportion their splits hold to train); 0 = all. */
  limit: number;
  /** Seed of splits, shuffling, initialisation and augmentation. Default 42. */
  seed: number;
  /** Fraction of the training data held out for validation. Default 0.1. */
  valSplit: number;
  /** Fraction held out for test when the data set has no test set of its own (folders). Default 0.1. */
  testSplit: number;
  /** Folder of the on-disk feature cache. Default `.ctrain-cache`. */
  cacheDir: string;
  /** Samples per extraction shard. Default 256. */
  shardSize: number;
  /** Images larger than this many pixels are refused before decoding. Default 40,000,000. */
  maxPixels: number;
  /** Port of the /metrics endpoint; 0 = pick a free one, -1 = none. Default 0. */
  metricsPort: number;
  /** Bytes per element of gradients on the wire. Default fp32. */
  wireDtype: WireDtype;
  /** Fine-tune data-parallel on the workers: `auto` = when `workers` > 1 (see {@link fineTunesDataParallel}), `on`, `off`. Default `auto`. */
  dataParallel: DataParallelMode;
  /** Data-parallel fine-tuning: steps between replica weight-checksum comparisons; 0 = never. Default 10 (env CTRAIN_DP_CHECKSUM_EVERY). */
  checksumEvery: number;
  /** Data-parallel fine-tuning: steps between checkpoints; 0 = only the final state. Default 20 (env CTRAIN_DP_CHECKPOINT_EVERY). */
  checkpointEvery: number;
  /** Data-parallel fine-tuning: a step's deadline before missing peers count as lost, in ms. Default 30000 (env CTRAIN_DP_STEP_TIMEOUT_MS). */
  stepTimeoutMs: number;
  /** Data-parallel fine-tuning: data bytes of one gradient chunk (one NATS message), 4096..1047552. Default 524288 (env CTRAIN_DP_BUCKET_BYTES). */
  bucketBytes: number;
  /** How workers are started by the coordinator. Default `local`. */
  launcher: Launcher;
  /** Log format: `auto` (human on a terminal, JSON otherwise), `json` or `human`. */
  logFormat: "auto" | "json" | "human";
}

type Kind = "string" | "int" | "number" | "bool";
/** One row of an option table: flag `--<kebab key>`, YAML key, and the environment variable `env` when given. */
export interface OptionRow {
  key: string;
  kind: Kind;
  help: string;
  default: () => unknown;
  choices?: readonly string[];
  min?: number;
  max?: number;
  /** Environment variable that sets this option (below a flag, above the config file). */
  env?: string;
}
interface OptionSpec<K extends keyof JobOptions> extends OptionRow {
  key: K;
  default: () => JobOptions[K];
}

function spec<K extends keyof JobOptions>(s: OptionSpec<K>): OptionSpec<K> {
  return s;
}

/** The schema: flag name = key in kebab-case. Order is the order of `--help`. */
export const OPTION_SPECS = [
  spec({ key: "data", kind: "string", help: "fashion-mnist | mnist:<dir of IDX files> | synthetic:N[:classes] (procedural images, for scale benches) | <folder with one sub-folder per class>", default: () => "fashion-mnist" }),
  spec({ key: "model", kind: "string", help: "mobilenet_v2 | <folder with model.json> | <http(s) URL of model.json>", default: () => "mobilenet_v2" }),
  spec({ key: "inputSize", kind: "int", help: "input size in pixels (square)", default: () => 96, min: 32, max: 1024 }),
  spec({ key: "featureLayer", kind: "string", help: "layer whose output is the feature (auto = the model's base output)", default: () => "auto" }),
  spec({ key: "preprocessing", kind: "string", help: "pixel scaling (auto = the model's own; unit = [0, 1], tf = [-1, 1])", default: () => "auto" as PreprocessingChoice, choices: PREPROCESSING_CHOICES }),
  spec({ key: "pooling", kind: "string", help: "pooling of the feature map", default: () => "avg" as Pooling, choices: POOLINGS }),
  spec({ key: "method", kind: "string", help: "cached features, or frozen base + head with augmentation", default: () => "cached" as Method, choices: METHODS }),
  spec({ key: "augmentFlip", kind: "string", help: "augmentation: random left-right mirror", default: () => "horizontal" as AugmentFlip, choices: AUGMENT_FLIPS }),
  spec({ key: "augmentRotation", kind: "number", help: "augmentation: max rotation, fraction of a full turn", default: () => 0.05, min: 0, max: 0.5 }),
  spec({ key: "augmentZoom", kind: "number", help: "augmentation: max zoom, fraction", default: () => 0.1, min: 0, max: 0.9 }),
  spec({ key: "augmentTranslation", kind: "number", help: "augmentation: max shift, fraction of the size", default: () => 0.1, min: 0, max: 0.5 }),
  spec({ key: "augmentFillMode", kind: "string", help: "augmentation: fill of pixels from outside the image", default: () => "reflect" as FillMode, choices: FILL_MODES }),
  spec({ key: "epochs", kind: "int", help: "epochs of head training", default: () => 10, min: 1, max: 100000 }),
  spec({ key: "headUnits", kind: "int", help: "units of the head's hidden layer", default: () => 256, min: 1, max: 65536 }),
  spec({ key: "dropout", kind: "number", help: "dropout rate of the head", default: () => 0.5, min: 0, max: 0.95 }),
  spec({ key: "shuffleBufferMib", kind: "number", help: "MiB of cached feature rows the head holds while it streams them (two shuffle windows: rows mix within a window); more mixes more", default: () => 64, min: 0.01, max: 65536 }),
  spec({ key: "fineTuneLayers", kind: "string", help: "top layers of the base to unfreeze (count or layer name); 0 = none", default: () => "0" }),
  spec({ key: "fineTuneEpochs", kind: "int", help: "epochs of fine-tuning", default: () => 0, min: 0, max: 100000 }),
  spec({ key: "fineTuneLearningRate", kind: "number", help: "learning rate of fine-tuning", default: () => 1e-5, min: 1e-12, max: 10 }),
  spec({ key: "earlyStoppingPatience", kind: "int", help: "stop a phase after N epochs without improvement of --monitor (0 = off)", default: () => 0, min: 0, max: 100000 }),
  spec({ key: "restoreBestWeights", kind: "bool", help: "end each phase with its best epoch's weights (by --monitor)", default: () => true }),
  spec({ key: "monitor", kind: "string", help: "validation figure watched by early stopping, best weights, plateau", default: () => "val_loss" as Monitor, choices: MONITORS }),
  spec({ key: "lrSchedule", kind: "string", help: "learning-rate schedule of each phase", default: () => "constant" as LrSchedule, choices: LR_SCHEDULES }),
  spec({ key: "lrPatience", kind: "int", help: "plateau schedule: epochs without improvement before the rate is x0.2", default: () => 2, min: 1, max: 100000 }),
  spec({ key: "classWeight", kind: "string", help: "class weights of the loss: none | auto (balanced) | <class>=<weight>,...", default: () => "none" }),
  spec({ key: "labelSmoothing", kind: "number", help: "label smoothing of the training loss", default: () => 0, min: 0, max: 0.49 }),
  spec({ key: "batchSize", kind: "int", help: "global batch size (samples per training step across all workers)", default: () => DEFAULT_BATCH_SIZE, min: 1, max: 65536 }),
  spec({ key: "extractBatchSize", kind: "int", help: "images per forward pass of feature extraction (each worker, or this process)", default: () => DEFAULT_BATCH_SIZE, min: 1, max: 4096 }),
  spec({ key: "learningRate", kind: "number", help: "learning rate of head training", default: () => 1e-3, min: 1e-12, max: 10 }),
  spec({ key: "workers", kind: "int", help: "number of workers", default: () => Math.max(1, availableParallelism()), min: 1, max: 4096 }),
  spec({ key: "nats", kind: "string", help: "NATS URL(s), comma-separated; empty = embedded nats-server", default: () => "" }),
  spec({ key: "out", kind: "string", help: "output folder (default runs/<job>)", default: () => "" }),
  spec({ key: "backend", kind: "string", help: "compute backend", default: () => "auto" as BackendName, choices: BACKENDS }),
  spec({ key: "engine", kind: "string", help: "inference engine of frozen forward passes (auto = onnx when the model converts)", default: () => "auto" as EngineName, choices: ENGINES }),
  spec({ key: "engineProvider", kind: "string", help: "onnxruntime execution provider (auto = cuda when installed)", default: () => "auto" as EngineProvider, choices: ENGINE_PROVIDERS }),
  spec({ key: "enginePrecision", kind: "string", help: "arithmetic of the onnx engine (int8: quantized, calibrated on training images)", default: () => "fp32" as EnginePrecision, choices: ENGINE_PRECISIONS }),
  spec({ key: "threads", kind: "int", help: "onnxruntime threads per worker process (0 = cores / workers)", default: () => 0, min: 0, max: 1024 }),
  spec({ key: "limit", kind: "int", help: "at most N training samples (0 = all)", default: () => 0, min: 0, max: Number.MAX_SAFE_INTEGER }),
  spec({ key: "seed", kind: "int", help: "random seed", default: () => 42, min: 0, max: 2 ** 31 - 1 }),
  spec({ key: "valSplit", kind: "number", help: "validation fraction of the training data (0 = no validation)", default: () => 0.1, min: 0, max: 0.5 }),
  spec({ key: "testSplit", kind: "number", help: "test fraction when the data set has no test set", default: () => 0.1, min: 0.01, max: 0.5 }),
  spec({ key: "cacheDir", kind: "string", help: "feature cache folder", default: () => ".ctrain-cache" }),
  spec({ key: "shardSize", kind: "int", help: "samples per extraction shard", default: () => 256, min: 1, max: 1_000_000 }),
  spec({ key: "maxPixels", kind: "int", help: "refuse images with more pixels than this", default: () => 40_000_000, min: 1, max: 2 ** 32 }),
  spec({ key: "metricsPort", kind: "int", help: "port of /metrics (0 = free port, -1 = off)", default: () => 0, min: -1, max: 65535 }),
  spec({ key: "wireDtype", kind: "string", help: "gradient dtype on the wire", default: () => "fp32" as WireDtype, choices: WIRE_DTYPES }),
  spec({ key: "dataParallel", kind: "string", help: "train data-parallel on the workers: fine-tuning, and the head of --method augment (auto = when --workers > 1)", default: () => "auto" as DataParallelMode, choices: DATA_PARALLEL_MODES }),
  spec({ key: "checksumEvery", kind: "int", help: "data-parallel: steps between replica weight checksums (0 = never)", default: () => DATA_PARALLEL_DEFAULTS.checksumEvery, min: 0, max: 1_000_000, env: "CTRAIN_DP_CHECKSUM_EVERY" }),
  spec({ key: "checkpointEvery", kind: "int", help: "data-parallel: steps between checkpoints (0 = only the final state)", default: () => DATA_PARALLEL_DEFAULTS.checkpointEvery, min: 0, max: 1_000_000, env: "CTRAIN_DP_CHECKPOINT_EVERY" }),
  spec({ key: "stepTimeoutMs", kind: "int", help: "data-parallel: ms a step waits for its peers before they count as lost", default: () => DATA_PARALLEL_DEFAULTS.stepTimeoutMs, min: 100, max: 3_600_000, env: "CTRAIN_DP_STEP_TIMEOUT_MS" }),
  spec({ key: "bucketBytes", kind: "int", help: "data-parallel: data bytes of one gradient chunk on the wire (one NATS message; at most 1 MiB - 1 KiB, NATS's max_payload less a header)", default: () => DATA_PARALLEL_DEFAULTS.bucketBytes, min: MIN_BUCKET_BYTES, max: MAX_BUCKET_BYTES, env: "CTRAIN_DP_BUCKET_BYTES" }),
  spec({ key: "launcher", kind: "string", help: "how workers are started", default: () => "local" as Launcher, choices: LAUNCHERS }),
  spec({ key: "logFormat", kind: "string", help: "log format", default: () => "auto" as JobOptions["logFormat"], choices: ["auto", "json", "human"] }),
  spec({ key: "job", kind: "string", help: "job id", default: () => "" }),
] as const;

export function flagName(key: string): string {
  return key.replace(/[A-Z]/g, (c) => `-${c.toLowerCase()}`);
}

function keyOf(name: string): string {
  return name.replace(/^-+/, "").replace(/[-_]([a-z])/g, (_, c: string) => c.toUpperCase());
}

const SPEC_BY_KEY = new Map<string, OptionSpec<keyof JobOptions>>(
  OPTION_SPECS.map((s) => [s.key, s as unknown as OptionSpec<keyof JobOptions>]),
);

/**
 * The job options a sub-command reads, for its flags, suggestions and `--help`; a command not listed
 * reads every option and `--config`. A subset of the one table, so a flag another command reads is
 * refused here instead of being accepted and ignored.
 */
export const COMMAND_OPTIONS: Readonly<Record<string, readonly (keyof JobOptions)[]>> = {
  predict: ["model", "backend", "engine", "engineProvider", "threads"],
  "model-info": ["model", "inputSize", "featureLayer", "preprocessing", "backend"],
  "export-onnx": ["model", "out", "inputSize", "featureLayer", "pooling", "preprocessing", "backend"],
  baseline: ["data", "limit", "valSplit", "testSplit", "seed", "maxPixels", "epochs", "batchSize", "learningRate", "headUnits", "dropout",
    "earlyStoppingPatience", "restoreBestWeights", "monitor", "lrSchedule", "lrPatience", "backend", "out", "job", "logFormat"],
};

/**
 * The nearest of `candidates` (flag names) to a mistyped flag, within 3 edits; else one that ends with
 * it (`--batch-size` -> `--extract-batch-size` on a command that has only the narrower one).
 */
function closest(name: string, candidates: Iterable<string> = [...SPEC_BY_KEY.keys()].map(flagName)): string | undefined {
  let best: string | undefined;
  let bestD = 4;
  const typed = flagName(keyOf(name));
  const list = [...candidates];
  for (const c of list) {
    const d = editDistance(c, typed);
    if (d < bestD) { bestD = d; best = c; }
  }
  return best ?? (typed.length >= 4 ? list.find((c) => c.endsWith(`-${typed}`)) : undefined);
}

function editDistance(a: string, b: string): number {
  const dp = Array.from({ length: a.length + 1 }, (_, i) => [i, ...new Array<number>(b.length).fill(0)]);
  for (let j = 1; j <= b.length; j++) dp[0][j] = j;
  for (let i = 1; i <= a.length; i++)
    for (let j = 1; j <= b.length; j++)
      dp[i][j] = Math.min(dp[i - 1][j] + 1, dp[i][j - 1] + 1, dp[i - 1][j - 1] + (a[i - 1] === b[j - 1] ? 0 : 1));
  return dp[a.length][b.length];
}

/** A value quoted in an error message: JSON, one line, at most 80 characters; never throws (YAML aliases can make cycles). */
function show(raw: unknown): string {
  let text: string | undefined;
  try {
    text = JSON.stringify(raw);
  } catch {
    text = Array.isArray(raw) ? "a list" : "a mapping";
  }
  text ??= String(raw);
  return text.length > 80 ? `${text.slice(0, 77)}...` : text;
}

/** A user-typed name in a one-line message: control characters escaped, at most 80 characters. */
function oneLine(name: string): string {
  const t = name.replace(/[\u0000-\u001f\u007f]/g, (c) => JSON.stringify(c).slice(1, -1));
  return t.length > 80 ? `${t.slice(0, 77)}...` : t;
}

function coerce(s: OptionRow, raw: unknown, where: string): unknown {
  const flag = `--${flagName(s.key)}`;
  if (s.kind === "bool") {
    if (typeof raw === "boolean") return raw;
    const t = typeof raw === "string" ? raw.trim().toLowerCase() : undefined;
    if (t === "true" || t === "yes" || t === "on" || t === "1") return true;
    if (t === "false" || t === "no" || t === "off" || t === "0") return false;
    throw new ConfigError(`${flag} (${where}) must be true or false, got ${show(raw)}.`);
  }
  if (s.kind === "string") {
    if (typeof raw === "number") raw = String(raw);
    if (typeof raw !== "string") throw new ConfigError(`${flag} (${where}) must be a string, got ${show(raw)}.`);
    if (s.choices && !s.choices.includes(raw))
      throw new ConfigError(`${flag} (${where}) must be one of ${s.choices.join(", ")}; got ${show(raw)}.`);
    return raw;
  }
  const n = typeof raw === "number" ? raw : typeof raw === "string" && raw.trim() !== "" ? Number(raw) : NaN;
  if (!Number.isFinite(n)) throw new ConfigError(`${flag} (${where}) must be a number, got ${show(raw)}.`);
  if (s.kind === "int" && !Number.isInteger(n)) throw new ConfigError(`${flag} (${where}) must be a whole number, got ${show(raw)}.`);
  if ((s.min !== undefined && n < s.min) || (s.max !== undefined && n > s.max))
    throw new ConfigError(`${flag} (${where}) must be between ${s.min} and ${s.max}, got ${n}.`);
  return n;
}

/** Parsed command line: known job options, other flags (sub-command specific) and positionals. */
export interface ParsedArgs {
  options: Partial<JobOptions>;
  extra: Record<string, string | true>;
  positionals: string[];
  configFile?: string;
}

/** What {@link parseFlags} accepts besides the table's rows. */
interface FlagGrammar {
  /** Rows by key. */
  rows: ReadonlyMap<string, OptionRow>;
  /** Keys of `rows` this command reads; others are refused with "<command> does not read". */
  only?: readonly string[];
  /** Other flags that take a value (without dashes), returned in `extra`. */
  extraFlags: readonly string[];
  /** Flags without a value; `-h` is `--help` when `help` is one of them. */
  booleanFlags: readonly string[];
  /** Whether `--config FILE` is read. */
  config: boolean;
  command?: string;
}

/** Splits argv by a table: its rows' values (validated), other flags, positionals and `--config`. */
function parseFlags(argv: readonly string[], g: FlagGrammar): { values: Record<string, unknown>; extra: Record<string, string | true>; positionals: string[]; configFile?: string } {
  const out = { values: {} as Record<string, unknown>, extra: {} as Record<string, string | true>, positionals: [] as string[], configFile: undefined as string | undefined };
  const accepted = (): string[] => [...(g.only ?? [...g.rows.keys()]).map(flagName), ...g.extraFlags, ...g.booleanFlags, ...(g.config ? ["config"] : [])];
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    if (a === "-h" && g.booleanFlags.includes("help")) { out.extra["help"] = true; continue; }
    if (!a.startsWith("--")) { out.positionals.push(a); continue; }
    let name = a.slice(2);
    let value: string | undefined;
    const eq = name.indexOf("=");
    if (eq >= 0) { value = name.slice(eq + 1); name = name.slice(0, eq); }
    if (g.booleanFlags.includes(name)) { out.extra[name] = value ?? true; continue; }
    const takeValue = (): string => {
      if (value !== undefined) return value;
      const next = argv[i + 1];
      if (next === undefined || (next.startsWith("--") && next.length > 2)) throw new ConfigError(`--${oneLine(name)} needs a value.`);
      i++;
      return next;
    };
    if (name === "config" && g.config) { out.configFile = takeValue(); continue; }
    if (g.extraFlags.includes(name)) { out.extra[name] = takeValue(); continue; }
    const s = g.rows.get(keyOf(name));
    if (!s || (g.only && !g.only.includes(s.key))) {
      const hint = closest(name, accepted());
      const what = (s || name === "config") && g.command ? `${g.command} does not read --${oneLine(name)}` : `Unknown option --${oneLine(name)}`;
      throw new ConfigError(`${what}.${hint ? ` Did you mean --${hint}?` : ""} Run with --help to list the options.`);
    }
    out.values[s.key] = coerce(s, takeValue(), "flag");
  }
  return out;
}

/**
 * Splits argv into job options, other flags and positionals. `extraFlags` lists the sub-command's
 * own flags (without dashes); `command` names it in {@link COMMAND_OPTIONS} to accept only the job
 * options it reads. Any other flag is an error with a suggestion among the flags it accepts. `-h`
 * is `--help` where `help` is one of `booleanFlags`.
 */
export function parseArgs(argv: readonly string[], extraFlags: readonly string[] = [], booleanFlags: readonly string[] = [], command?: string): ParsedArgs {
  const only = command !== undefined ? COMMAND_OPTIONS[command] : undefined;
  const p = parseFlags(argv, { rows: SPEC_BY_KEY, only, extraFlags, booleanFlags, config: !only, command });
  return { options: p.values as Partial<JobOptions>, extra: p.extra, positionals: p.positionals, ...(p.configFile !== undefined ? { configFile: p.configFile } : {}) };
}

/** Values of a table's rows set in the environment (`env` of a row), validated; `only` limits the rows. */
function fromEnvironment(rows: Iterable<OptionRow>, env: NodeJS.ProcessEnv, only?: readonly string[]): Record<string, unknown> {
  const out: Record<string, unknown> = {};
  for (const s of rows) {
    if (!s.env || (only && !only.includes(s.key))) continue;
    const v = env[s.env];
    if (v !== undefined && v !== "") out[s.key] = coerce(s, v, `environment ${s.env}`);
  }
  return out;
}

/** Job options set in the environment (rows with `env`), validated: a bad value is a ConfigError naming the variable. */
export function envOptions(env: NodeJS.ProcessEnv = process.env, command?: string): Partial<JobOptions> {
  return fromEnvironment(OPTION_SPECS, env, command !== undefined ? COMMAND_OPTIONS[command] : undefined) as Partial<JobOptions>;
}

/** Reads a YAML/JSON job file into options, refusing unknown keys and wrong types. */
export function readConfigFile(file: string): Partial<JobOptions> {
  let text: string;
  try {
    text = readFileSync(file, "utf8");
  } catch (cause) {
    throw new ConfigError(`Cannot read config file ${file}: ${(cause as Error).message}`, { cause });
  }
  let doc: unknown;
  try {
    doc = parseYaml(text);
  } catch (cause) {
    // The yaml message goes on with a code frame over several lines; its first line says what and where.
    const what = String((cause as Error).message).split("\n")[0].replace(/:$/, "");
    throw new ConfigError(`Config file ${file} is not valid YAML: ${what}.`, { cause });
  }
  if (doc === null || doc === undefined) return {};
  if (typeof doc !== "object" || Array.isArray(doc)) throw new ConfigError(`Config file ${file} must be a mapping of option: value.`);
  const out: Record<string, unknown> = {};
  for (const [k, v] of Object.entries(doc as Record<string, unknown>)) {
    const s = SPEC_BY_KEY.get(keyOf(k));
    if (!s) {
      const hint = closest(k);
      throw new ConfigError(`Unknown key ${show(k)} in ${file}.${hint ? ` Did you mean "${hint}"?` : ""}`);
    }
    out[s.key] = coerce(s, v, file);
  }
  return out as Partial<JobOptions>;
}

/** Fills defaults and checks the cross-field rules. Throws ConfigError naming the option. */
export function resolveOptions(partial: Partial<JobOptions>, now: Date = new Date()): JobOptions {
  const o = {} as Record<string, unknown>;
  for (const s of OPTION_SPECS) o[s.key] = (partial as Record<string, unknown>)[s.key] ?? s.default();
  const opts = o as unknown as JobOptions;
  for (const key of ["data", "model", "featureLayer"] as const)
    if (opts[key].trim() === "") throw new ConfigError(`--${flagName(key)} must not be empty.`);
  if (!opts.job) {
    // The id must stay a valid --job (at most 63 characters) whatever the data path: keep 40 of its name.
    const base = opts.data.replace(/[/:]+$/, "").replace(/^.*[/:]/, "").replace(/[^a-zA-Z0-9-]/g, "-").toLowerCase().slice(0, 40) || "data";
    const stamp = now.toISOString().replace(/[-:]/g, "").replace(/\..*$/, "").replace("T", "-").toLowerCase();
    opts.job = `ctrain-${base}-${stamp}`;
  }
  if (!/^[a-zA-Z0-9][a-zA-Z0-9_-]{0,62}$/.test(opts.job))
    throw new ConfigError(`--job ${show(opts.job)} must be 1-63 letters, digits, '-' or '_' (it names NATS subjects and streams).`);
  if (!opts.out) opts.out = `runs/${opts.job}`;
  // A setting that changes augmentation is refused without --method augment. Values equal to the default
  // are not: they change nothing, and resolving already-resolved options must give the same options.
  const augmentGiven = AUGMENT_KEYS.filter((k) => {
    const v = (partial as Record<string, unknown>)[k];
    return v !== undefined && v !== OPTION_SPECS.find((s) => s.key === k)?.default();
  });
  if (augmentGiven.length > 0 && opts.method !== "augment")
    throw new ConfigError(`--${flagName(augmentGiven[0])} applies only to --method augment (the cached method trains on features, no images are augmented): add --method augment or drop it.`);
  checkControls(opts, partial);
  if (opts.enginePrecision === "int8" && opts.engine === "tfjs")
    throw new ConfigError(`--engine-precision int8 runs on onnxruntime, but --engine is tfjs: use --engine auto or onnx, or --engine-precision fp32.`);
  if (opts.valSplit + opts.testSplit >= 0.9) throw new ConfigError(`--val-split + --test-split must leave data to train on (got ${opts.valSplit} + ${opts.testSplit}).`);
  const ft = opts.fineTuneLayers.trim();
  if (ft === "" ) throw new ConfigError(`--fine-tune-layers must be a layer count or a layer name.`);
  if (/^\d+$/.test(ft) && Number(ft) > 0 && opts.fineTuneEpochs === 0) opts.fineTuneEpochs = Math.max(1, Math.ceil(opts.epochs / 2));
  if (opts.nats) {
    for (const u of opts.nats.split(",")) {
      if (!/^(nats|tls|wss?):\/\/[^\s/]+/.test(u.trim()) && !/^[^\s/:]+:\d+$/.test(u.trim()))
        throw new ConfigError(`--nats ${show(u)} is not a NATS URL (expected nats://host:port).`);
    }
  }
  return opts;
}

/**
 * The training controls' cross-field rules: what needs a validation split, and `--lr-patience`
 * only with the plateau schedule. Best weights given by default are dropped without validation.
 */
function checkControls(opts: JobOptions, partial: Partial<JobOptions>): void {
  if (opts.valSplit === 0) {
    const needs = opts.earlyStoppingPatience > 0 ? "earlyStoppingPatience" : opts.lrSchedule === "plateau" ? "lrSchedule" : partial.restoreBestWeights === true ? "restoreBestWeights" : undefined;
    if (needs)
      throw new ConfigError(`--${flagName(needs)} ${show(opts[needs])} watches the validation set, but --val-split is 0 (no validation): give --val-split (e.g. 0.1) or drop --${flagName(needs)}.`);
    opts.restoreBestWeights = false;
  }
  if (partial.lrPatience !== undefined && partial.lrPatience !== SPEC_BY_KEY.get("lrPatience")?.default() && opts.lrSchedule !== "plateau")
    throw new ConfigError(`--lr-patience applies only to --lr-schedule plateau (got --lr-schedule ${opts.lrSchedule}): add --lr-schedule plateau or drop it.`);
}

/** Flags + environment + optional config file -> validated options (flags win, then the environment). */
export function loadOptions(parsed: ParsedArgs, env: NodeJS.ProcessEnv = process.env): JobOptions {
  const fromFile = parsed.configFile ? readConfigFile(parsed.configFile) : {};
  return resolveOptions({ ...fromFile, ...envOptions(env), ...parsed.options });
}

/**
 * Whether fine-tuning runs data-parallel on the workers: `--data-parallel auto` means when there are
 * several workers. The one place that rule is written.
 */
export function fineTunesDataParallel(opts: Pick<JobOptions, "workers" | "dataParallel">): boolean {
  return opts.dataParallel === "auto" ? opts.workers > 1 : opts.dataParallel === "on";
}

/** Options that say where and how a job runs, not what it computes: left out of a run's job.yaml. */
export const PLACEMENT_KEYS = ["job", "out", "nats", "cacheDir", "metricsPort", "launcher", "logFormat", "extractBatchSize", "dataParallel", "checksumEvery", "checkpointEvery", "stepTimeoutMs", "bucketBytes"] as const;

/**
 * The options that shape a job's result, keyed by flag name in option-table order: summary.json's
 * `options` and the run's job.yaml. Give it the options runJob resolved (`auto` feature layer and
 * preprocessing replaced by what they became), so a later default cannot change a rerun.
 */
export function reproducibleOptions(opts: JobOptions): Record<string, string | number | boolean> {
  const out: Record<string, string | number | boolean> = {};
  for (const s of OPTION_SPECS) if (!(PLACEMENT_KEYS as readonly string[]).includes(s.key)) out[flagName(s.key)] = opts[s.key];
  return out;
}

/** `<out>/job.yaml`: a config file that `ctrain run --config <out>/job.yaml` reruns the job from. */
export function jobFileText(opts: JobOptions): string {
  return `# ctrain job ${opts.job}: rerun with  ctrain run --config <this file> [--out DIR]
${stringifyYaml(reproducibleOptions(opts))}`;
}

/**
 * A command's own table (flags that are not job options: `ctrain coordinator --ack-wait`): the values
 * of `rows` from flags parsed as `extraFlags` (`given`, by flag name) or the rows' environment
 * variables, validated like job options, defaults filled in.
 */
export function readRows(rows: readonly OptionRow[], given: Record<string, string | true>, env: NodeJS.ProcessEnv = process.env): Record<string, unknown> {
  const fromEnv = fromEnvironment(rows, env);
  const out: Record<string, unknown> = {};
  for (const s of rows) {
    const v = given[flagName(s.key)];
    out[s.key] = v !== undefined ? coerce(s, v, "flag") : fromEnv[s.key] ?? s.default();
  }
  return out;
}

/** `--help` lines of a table's rows: flag, help, choices, default and environment variable. */
export function rowsHelp(rows: readonly OptionRow[], shownDefault: (s: OptionRow) => string = (s) => JSON.stringify(s.default())): string {
  return rows.map((s) => `  --${flagName(s.key).padEnd(26)} ${s.help}${s.choices ? ` (${s.choices.join("|")})` : ""} [default ${shownDefault(s)}${s.env ? `; env ${s.env}` : ""}]`).join("\n");
}

/** Help text for the job options; `command` keeps those it reads ({@link COMMAND_OPTIONS}). */
export function optionsHelp(command?: string): string {
  const only = command !== undefined ? COMMAND_OPTIONS[command] : undefined;
  return rowsHelp(OPTION_SPECS.filter((s) => !only || only.includes(s.key)), (s) => (s.key === "workers" ? "cores" : JSON.stringify(s.default())));
}

// ---------------------------------------------------------------- `ctrain worker`

/** Settings of `ctrain worker`. The job's own options reach a worker in the coordinator's spec, not here. */
export interface WorkerOptions {
  /** NATS server URL(s), comma-separated. Required (flag or CTRAIN_NATS_URL). */
  nats: string;
  /** Job to serve; `any` = whichever job has tasks queued. Default `any`. */
  job: string;
  /** Name in the registry, logs and metrics; empty = `<host>-<pid>`. Default empty. */
  workerId: string;
  /** Compute backend. Default `auto`. */
  backend: BackendName;
  /** onnxruntime threads when the job leaves it to the worker; 0 = cores. Default 0. */
  threads: number;
  /** onnxruntime execution provider. Default `auto`. */
  engineProvider: EngineProvider;
  /** Port of /metrics, /healthz, /readyz; 0 = a free port, -1 = none. Default 0. */
  metricsPort: number;
  /** Address /metrics binds to; 0.0.0.0 to be scraped from other hosts. Default 127.0.0.1. */
  metricsHost: string;
  /** Log format. Default `auto`. */
  logFormat: JobOptions["logFormat"];
}

function workerSpec<K extends keyof WorkerOptions>(s: OptionRow & { key: K; default: () => WorkerOptions[K] }): OptionRow {
  return s;
}

/** The table of `ctrain worker`, in `--help` order. */
export const WORKER_OPTION_SPECS: readonly OptionRow[] = [
  workerSpec({ key: "nats", kind: "string", help: "NATS server(s), comma-separated (required)", default: () => "", env: "CTRAIN_NATS_URL" }),
  workerSpec({ key: "job", kind: "string", help: "job to serve; any = whichever job has tasks queued", default: () => "any" }),
  workerSpec({ key: "workerId", kind: "string", help: "name in the registry, logs and metrics (empty = <host>-<pid>)", default: () => "" }),
  workerSpec({ key: "backend", kind: "string", help: "compute backend", default: () => "auto" as BackendName, choices: BACKENDS }),
  workerSpec({ key: "threads", kind: "int", help: "onnxruntime threads when the job leaves it to the worker (0 = cores)", default: () => 0, min: 0, max: 1024 }),
  workerSpec({ key: "engineProvider", kind: "string", help: "onnxruntime execution provider (auto = cuda when installed)", default: () => "auto" as EngineProvider, choices: ENGINE_PROVIDERS }),
  workerSpec({ key: "metricsPort", kind: "int", help: "port of /metrics, /healthz, /readyz (0 = free port, -1 = off)", default: () => 0, min: -1, max: 65535 }),
  workerSpec({ key: "metricsHost", kind: "string", help: "address to bind; 0.0.0.0 to be scraped from other hosts", default: () => "127.0.0.1" }),
  workerSpec({ key: "logFormat", kind: "string", help: "log format", default: () => "auto" as JobOptions["logFormat"], choices: ["auto", "json", "human"] }),
];

const WORKER_SPEC_BY_KEY = new Map(WORKER_OPTION_SPECS.map((s) => [s.key, s]));

/**
 * `ctrain worker`'s argv and environment -> validated options, other flags (`extraFlags`, e.g. NATS
 * credentials) in `extra`, and whether `--help` was asked. Unknown flags get a "did you mean".
 */
export function parseWorkerArgs(argv: readonly string[], extraFlags: readonly string[] = [], env: NodeJS.ProcessEnv = process.env): { options: WorkerOptions; extra: Record<string, string | true>; help: boolean } {
  const retired = argv.find((a) => /^--(extract-)?batch-size(=|$)/.test(a));
  if (retired)
    throw new ConfigError(`ctrain worker has no ${retired.replace(/=.*$/, "")}: images per forward pass are the job's --extract-batch-size (given to the coordinator), the same on every worker.`);
  const p = parseFlags(argv, { rows: WORKER_SPEC_BY_KEY, extraFlags, booleanFlags: ["help"], config: false, command: "worker" });
  if (p.positionals.length > 0) throw new ConfigError(`ctrain worker: unexpected argument ${show(p.positionals[0])}; options start with --.`);
  const given = { ...fromEnvironment(WORKER_OPTION_SPECS, env), ...p.values };
  const options = Object.fromEntries(WORKER_OPTION_SPECS.map((s) => [s.key, given[s.key] ?? s.default()])) as unknown as WorkerOptions;
  return { options, extra: p.extra, help: p.extra["help"] !== undefined };
}

/** Help text of `ctrain worker`'s own options. */
export function workerOptionsHelp(): string {
  return rowsHelp(WORKER_OPTION_SPECS);
}

// ---------------------------------------------------------------- environment-only settings

/** A setting that is an environment variable only (no flag): where a file lives, a credential, the log level. */
export interface EnvSetting {
  name: string;
  kind: "string" | "int";
  help: string;
  /** The value when unset, as shown in `--help`; absent = none. */
  default?: string;
  choices?: readonly string[];
  min?: number;
  max?: number;
  /** Sub-commands that read it. */
  commands: readonly string[];
}

/** GOMEMLIMIT of the embedded nats-server when the environment sets none (why: coordinator/embedded_nats.ts). */
export const EMBEDDED_NATS_GOMEMLIMIT = "256MiB";

const NATS_COMMANDS = ["run", "coordinator", "worker"] as const;
const DATA_COMMANDS = ["run", "coordinator", "worker"] as const;

/** Every environment-only setting ctrain reads, in `--help` order. A test checks the source reads no other. */
export const ENV_SETTINGS: readonly EnvSetting[] = [
  { name: "CTRAIN_LOG_LEVEL", kind: "string", help: "lowest log level written", default: "info", choices: ["debug", "info", "warn", "error"], commands: ["run", "coordinator", "worker", "predict", "model-info", "export-onnx", "k8s"] },
  { name: "NO_COLOR", kind: "string", help: "any value: no colours in human log lines", commands: ["run", "coordinator", "worker", "predict", "model-info", "export-onnx", "k8s"] },
  { name: "CTRAIN_FASHION_MNIST_DIR", kind: "string", help: "folder of the four Fashion-MNIST IDX files (--data fashion-mnist)", default: "/usr/share/datasets/fashion-mnist", commands: DATA_COMMANDS },
  { name: "NATS_SERVER_BIN", kind: "string", help: "nats-server binary of the embedded server (else /usr/sbin/nats-server, then PATH)", commands: ["run"] },
  { name: "GOMEMLIMIT", kind: "string", help: "Go's soft memory limit for the embedded nats-server (it inherits the environment), e.g. 512MiB", default: EMBEDDED_NATS_GOMEMLIMIT, commands: ["run"] },
  { name: "CTRAIN_NATS_USER", kind: "string", help: "NATS user (with CTRAIN_NATS_PASS); same as --nats-user", commands: NATS_COMMANDS },
  { name: "CTRAIN_NATS_PASS", kind: "string", help: "NATS password; prefer it to --nats-pass (flags show in ps)", commands: NATS_COMMANDS },
  { name: "CTRAIN_NATS_TOKEN", kind: "string", help: "NATS token; same as --nats-token", commands: NATS_COMMANDS },
  { name: "CTRAIN_NATS_CREDS", kind: "string", help: "NATS .creds file; same as --nats-creds", commands: NATS_COMMANDS },
  { name: "CTRAIN_NATS_NKEY", kind: "string", help: "file holding an nkey seed; same as --nats-nkey", commands: NATS_COMMANDS },
  { name: "CTRAIN_NATS_TLS_CA", kind: "string", help: "CA bundle to verify the NATS server (turns TLS on); same as --nats-tls-ca", commands: NATS_COMMANDS },
  { name: "CTRAIN_NATS_TLS_CERT", kind: "string", help: "client certificate (with CTRAIN_NATS_TLS_KEY); same as --nats-tls-cert", commands: NATS_COMMANDS },
  { name: "CTRAIN_NATS_TLS_KEY", kind: "string", help: "client key; same as --nats-tls-key", commands: NATS_COMMANDS },
  { name: "CTRAIN_WORKER_MEMORY_BYTES", kind: "int", help: "memory a worker may spend on one shard, bytes (default: half the container's or machine's)", min: 1, max: Number.MAX_SAFE_INTEGER, commands: ["worker"] },
  { name: "CTRAIN_IMAGE", kind: "string", help: "--launcher kubernetes: container image of the worker StatefulSet it creates", commands: ["coordinator"] },
  { name: "CTRAIN_GPUS_PER_WORKER", kind: "int", help: "--launcher kubernetes: GPUs each worker pod asks for", default: "0", min: 0, max: 1024, commands: ["coordinator"] },
  { name: "CTRAIN_DATA_CLAIM", kind: "string", help: "--launcher kubernetes: PersistentVolumeClaim of the data set", commands: ["coordinator"] },
  { name: "POD_NAMESPACE", kind: "string", help: "--launcher kubernetes: namespace of the workers (default: the pod's, or the kubeconfig's)", commands: ["coordinator"] },
  { name: "KUBECONFIG", kind: "string", help: "--launcher kubernetes outside a cluster: kubeconfig file (default ~/.kube/config)", commands: ["coordinator"] },
];

const ENV_BY_NAME = new Map(ENV_SETTINGS.map((e) => [e.name, e]));

function envValue(e: EnvSetting, raw: string): string | number {
  const what = `environment ${e.name}`;
  if (e.kind === "int") {
    const n = raw.trim() !== "" ? Number(raw) : NaN;
    if (!Number.isInteger(n) || (e.min !== undefined && n < e.min) || (e.max !== undefined && n > e.max))
      throw new ConfigError(`${what} must be a whole number between ${e.min} and ${e.max}, got ${show(raw)}.`);
    return n;
  }
  if (e.choices && !e.choices.includes(raw.trim().toLowerCase())) throw new ConfigError(`${what} must be one of ${e.choices.join(", ")}; got ${show(raw)}.`);
  return raw;
}

/**
 * The value of an environment-only setting of {@link ENV_SETTINGS}, validated; undefined when unset
 * or empty. Throws ConfigError naming the variable for a bad value.
 */
export function envSetting(name: string, env: NodeJS.ProcessEnv = process.env): string | number | undefined {
  const e = ENV_BY_NAME.get(name);
  if (!e) throw new RangeError(`envSetting: ${name} is not in ENV_SETTINGS (add a row there so --help lists it)`);
  const raw = env[name];
  return raw === undefined || raw === "" ? undefined : envValue(e, raw);
}

/** A text setting of {@link ENV_SETTINGS} (a path, a name), validated; undefined when unset or empty. */
export function envString(name: string, env: NodeJS.ProcessEnv = process.env): string | undefined {
  const v = envSetting(name, env);
  return v === undefined ? undefined : String(v);
}

/**
 * Checks, before any work, every environment setting `command` reads: its job options with `env`
 * (or the worker table's) and its environment-only settings. A bad value is a ConfigError naming it.
 */
export function checkEnvironment(command: string, env: NodeJS.ProcessEnv = process.env): void {
  if (command === "worker") fromEnvironment(WORKER_OPTION_SPECS, env);
  else envOptions(env, command);
  for (const e of ENV_SETTINGS) if (e.commands.includes(command)) envSetting(e.name, env);
}

/** `--help` lines of the environment-only settings `command` reads. */
export function envHelp(command: string): string {
  return ENV_SETTINGS.filter((e) => e.commands.includes(command))
    .map((e) => `  ${e.name.padEnd(28)} ${e.help}${e.choices ? ` (${e.choices.join("|")})` : ""}${e.default !== undefined ? ` [default ${e.default}]` : ""}`)
    .join("\n");
}

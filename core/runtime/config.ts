/**
 * Job options: one schema shared by every sub-command (`run`, `coordinator`, `worker`, `k8s render`),
 * read from flags and/or `--config job.yaml` and validated once, before any work starts. Flags win
 * over the file. YAML keys are the flag names without dashes (`input-size: 96`); camelCase works too.
 */
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
  /** Global batch size (samples per step across all workers). Default 32. */
  batchSize: number;
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
  /** How workers are started by the coordinator. Default `local`. */
  launcher: Launcher;
  /** Log format: `auto` (human on a terminal, JSON otherwise), `json` or `human`. */
  logFormat: "auto" | "json" | "human";
}

type Kind = "string" | "int" | "number" | "bool";
interface OptionSpec<K extends keyof JobOptions> {
  key: K;
  kind: Kind;
  help: string;
  default: () => JobOptions[K];
  choices?: readonly string[];
  min?: number;
  max?: number;
}

function spec<K extends keyof JobOptions>(s: OptionSpec<K>): OptionSpec<K> {
  return s;
}

/** The schema: flag name = key in kebab-case. Order is the order of `--help`. */
export const OPTION_SPECS = [
  spec({ key: "data", kind: "string", help: "fashion-mnist | mnist:<dir of IDX files> | <folder with one sub-folder per class>", default: () => "fashion-mnist" }),
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
  spec({ key: "batchSize", kind: "int", help: "global batch size", default: () => 32, min: 1, max: 65536 }),
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

/** The nearest of `candidates` (flag names) to a mistyped flag, within 3 edits. */
function closest(name: string, candidates: Iterable<string> = [...SPEC_BY_KEY.keys()].map(flagName)): string | undefined {
  let best: string | undefined;
  let bestD = 4;
  for (const c of candidates) {
    const d = editDistance(c, flagName(keyOf(name)));
    if (d < bestD) { bestD = d; best = c; }
  }
  return best;
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

function coerce(s: OptionSpec<keyof JobOptions>, raw: unknown, where: string): unknown {
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

/**
 * Splits argv into job options, other flags and positionals. `extraFlags` lists the sub-command's
 * own flags (without dashes); `command` names it in {@link COMMAND_OPTIONS} to accept only the job
 * options it reads. Any other flag is an error with a suggestion among the flags it accepts. `-h`
 * is `--help` where `help` is one of `booleanFlags`.
 */
export function parseArgs(argv: readonly string[], extraFlags: readonly string[] = [], booleanFlags: readonly string[] = [], command?: string): ParsedArgs {
  const out: ParsedArgs = { options: {}, extra: {}, positionals: [] };
  const only = command !== undefined ? COMMAND_OPTIONS[command] : undefined;
  const accepted = (): string[] => [...(only ?? [...SPEC_BY_KEY.keys()]).map(flagName), ...extraFlags, ...booleanFlags, ...(only ? [] : ["config"])];
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    if (a === "-h" && booleanFlags.includes("help")) { out.extra["help"] = true; continue; }
    if (!a.startsWith("--")) { out.positionals.push(a); continue; }
    let name = a.slice(2);
    let value: string | undefined;
    const eq = name.indexOf("=");
    if (eq >= 0) { value = name.slice(eq + 1); name = name.slice(0, eq); }
    if (booleanFlags.includes(name)) { out.extra[name] = value ?? true; continue; }
    const takeValue = (): string => {
      if (value !== undefined) return value;
      const next = argv[i + 1];
      if (next === undefined || (next.startsWith("--") && next.length > 2)) throw new ConfigError(`--${oneLine(name)} needs a value.`);
      i++;
      return next;
    };
    if (name === "config" && !only) { out.configFile = takeValue(); continue; }
    if (extraFlags.includes(name)) { out.extra[name] = takeValue(); continue; }
    const s = SPEC_BY_KEY.get(keyOf(name));
    if (!s || (only && !only.includes(s.key))) {
      const hint = closest(name, accepted());
      const what = s || name === "config" ? `${command} does not read --${oneLine(name)}` : `Unknown option --${oneLine(name)}`;
      throw new ConfigError(`${what}.${hint ? ` Did you mean --${hint}?` : ""} Run with --help to list the options.`);
    }
    (out.options as Record<string, unknown>)[s.key] = coerce(s, takeValue(), "flag");
  }
  return out;
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

/** Flags + optional config file -> validated options. */
export function loadOptions(parsed: ParsedArgs): JobOptions {
  const fromFile = parsed.configFile ? readConfigFile(parsed.configFile) : {};
  return resolveOptions({ ...fromFile, ...parsed.options });
}

/** Options that say where and how a job runs, not what it computes: left out of a run's job.yaml. */
export const PLACEMENT_KEYS = ["job", "out", "nats", "cacheDir", "metricsPort", "launcher", "logFormat"] as const;

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

/** Help text for the job options; `command` keeps those it reads ({@link COMMAND_OPTIONS}). */
export function optionsHelp(command?: string): string {
  const only = command !== undefined ? COMMAND_OPTIONS[command] : undefined;
  return OPTION_SPECS.filter((s) => !only || only.includes(s.key)).map((s) => {
    const d = s.default();
    const dv = s.key === "workers" ? "cores" : JSON.stringify(d);
    return `  --${flagName(s.key).padEnd(26)} ${s.help}${s.choices ? ` (${s.choices.join("|")})` : ""} [default ${dv}]`;
  }).join("\n");
}

/**
 * Where pretrained models come from: the built-in offline `mobilenet_v2` and `inception_v3` (the
 * Keras MobileNetV2 and InceptionV3 that the npm package `nsfwjs` ships as TF.js layers models with
 * base64, uint8-quantized weights), a folder with model.json + weight files, or an http(s) URL. Every source yields plain
 * `tf.io.ModelArtifacts` so topology surgery (input size, cut point) works on JSON before any
 * layer is built.
 */
import { createHash } from "node:crypto";
import { readFile, stat } from "node:fs/promises";
import { createRequire } from "node:module";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import * as tf from "@tensorflow/tfjs";
import { ConfigError } from "../runtime/errors.js";
import { inboundNames, type LayerJson } from "./feature_model.js";

/** How pixels in [0, 255] become the model's input (the models' own modes; see {@link preprocess}). */
export const PREPROCESSINGS = ["unit", "tf", "caffe", "torch", "none"] as const;
export type Preprocessing = (typeof PREPROCESSINGS)[number];

/** Where a source's preprocessing came from: what ctrain knows of a built-in, the model's metadata, or a guess from its name. */
export type PreprocessingOrigin = "builtin" | "metadata" | "name";

export interface PretrainedSource {
  /** The name a user gave (`mobilenet_v2`, a path or URL). */
  name: string;
  artifacts: tf.io.ModelArtifacts;
  /**
   * The model's own preprocessing: `unit` = [0, 1] (the nsfwjs models), `tf` = [-1, 1] (Keras
   * MobileNet, Inception, EfficientNet-lite), `caffe` = BGR minus ImageNet means (VGG, ResNet50),
   * `torch` = ImageNet mean/std (DenseNet).
   */
  preprocessing: Preprocessing;
  /** Whether {@link preprocessing} is known (built-in, metadata) or guessed from the name. Default `name`. */
  preprocessingOrigin?: PreprocessingOrigin;
  /** The feature layer `--feature-layer auto` picks (built-ins; others: found in the topology). */
  defaultFeatureLayer?: string;
  /** The smallest input size the architecture accepts, pixels (built-ins). */
  minInputSize?: number;
  /** sha256 of topology and weights: part of every cache key. */
  fingerprint: string;
}

const require = createRequire(import.meta.url);

/** What ctrain knows about a model nsfwjs ships as a layers model. */
interface BuiltinSpec {
  /** Folder under nsfwjs' dist/models/. */
  dir: string;
  /** Keras `include_top=False` output: the last block before nsfwjs' pooling and classifier. */
  featureLayer: string;
  /** Keras' own limit (InceptionV3: 75; its stride-2 stem and reductions leave nothing below). */
  minInputSize: number;
}

/**
 * Built-in models that need no network. nsfwjs' third model, `mobilenet_v2_mid`, is a TF.js graph
 * model (no Keras topology to rebuild for another input size or cut), so it is not one of them.
 */
export const BUILTIN_MODELS = ["mobilenet_v2", "inception_v3"] as const;
export type BuiltinModel = (typeof BUILTIN_MODELS)[number];
const BUILTINS: Record<BuiltinModel, BuiltinSpec> = {
  mobilenet_v2: { dir: "mobilenet_v2", featureLayer: "out_relu", minInputSize: 32 },
  inception_v3: { dir: "inception_v3", featureLayer: "mixed10", minInputSize: 75 },
};

async function loadBuiltin(name: BuiltinModel): Promise<PretrainedSource> {
  const spec = BUILTINS[name];
  let pkgDir: string;
  try {
    pkgDir = dirname(dirname(require.resolve("nsfwjs")));
  } catch (cause) {
    throw new ConfigError(`the built-in ${name} needs the npm package nsfwjs: run 'npm ci'.`, { cause });
  }
  // dist/cjs/index.js -> dist/ ; the model bundles are CommonJS modules exporting JSON and base64 strings, one per weight shard.
  const modelDir = join(pkgDir, "models", spec.dir);
  const json = require(join(modelDir, "model.min.js")) as { modelTopology: object; weightsManifest: tf.io.WeightsManifestConfig };
  const shards = json.weightsManifest.flatMap((g) => g.paths).map((p) => Buffer.from(require(join(modelDir, `${p}.min.js`)) as string, "base64"));
  const artifacts: tf.io.ModelArtifacts = {
    modelTopology: json.modelTopology,
    weightSpecs: json.weightsManifest.flatMap((g) => g.weights),
    weightData: toArrayBuffer(Buffer.concat(shards as unknown as Uint8Array[])),
    format: "layers-model",
  };
  // nsfwjs' authors trained both networks on pixels / 255 (NSFWJS.infer divides by its normalizationOffset, 255).
  return {
    name, artifacts, preprocessing: "unit", preprocessingOrigin: "builtin",
    defaultFeatureLayer: spec.featureLayer, minInputSize: spec.minInputSize, fingerprint: fingerprintOf(artifacts),
  };
}

/** A standalone ArrayBuffer copy (Node's Buffers may share a pooled or Shared ArrayBuffer). */
function toArrayBuffer(buf: Uint8Array): ArrayBuffer {
  const out = new ArrayBuffer(buf.byteLength);
  new Uint8Array(out).set(buf);
  return out;
}

function fingerprintOf(a: tf.io.ModelArtifacts): string {
  const h = createHash("sha256");
  h.update(JSON.stringify(a.modelTopology));
  h.update(JSON.stringify(a.weightSpecs));
  const wd = a.weightData;
  for (const buf of Array.isArray(wd) ? wd : wd ? [wd] : []) h.update(new Uint8Array(buf));
  return h.digest("hex");
}

function preprocessingOf(modelJson: { userDefinedMetadata?: Record<string, unknown> }, name: string): Pick<PretrainedSource, "preprocessing" | "preprocessingOrigin"> {
  const declared = modelJson.userDefinedMetadata?.["ctrain_preprocessing"];
  if (declared !== undefined) {
    if (typeof declared !== "string" || !(PREPROCESSINGS as readonly string[]).includes(declared))
      throw new ConfigError(`model ${name}: userDefinedMetadata.ctrain_preprocessing must be one of ${PREPROCESSINGS.join(", ")}, got ${JSON.stringify(declared)}.`);
    return { preprocessing: declared as Preprocessing, preprocessingOrigin: "metadata" };
  }
  const lower = name.toLowerCase();
  if (/vgg|resnet(?!.*v2)/.test(lower)) return { preprocessing: "caffe", preprocessingOrigin: "name" };
  if (/densenet/.test(lower)) return { preprocessing: "torch", preprocessingOrigin: "name" };
  return { preprocessing: "tf", preprocessingOrigin: "name" };
}

async function loadFromFolder(spec: string): Promise<PretrainedSource> {
  const path = spec.startsWith("file://") ? fileURLToPath(spec) : resolve(spec);
  const jsonPath = (await stat(path).catch(() => undefined))?.isDirectory() ? join(path, "model.json") : path;
  let modelJson: tf.io.ModelJSON;
  try {
    modelJson = JSON.parse(await readFile(jsonPath, "utf8")) as tf.io.ModelJSON;
  } catch (cause) {
    throw new ConfigError(`--model ${spec}: cannot read ${jsonPath} as a TF.js layers model.json (${(cause as Error).message}).`, { cause });
  }
  if (!modelJson.modelTopology || !modelJson.weightsManifest)
    throw new ConfigError(`--model ${spec}: ${jsonPath} has no modelTopology/weightsManifest; convert the Keras model with tensorflowjs_converter --input_format keras.`);
  const dir = dirname(jsonPath);
  const buffers: Buffer[] = [];
  for (const group of modelJson.weightsManifest)
    for (const p of group.paths) {
      try {
        buffers.push(await readFile(join(dir, p)));
      } catch (cause) {
        throw new ConfigError(`--model ${spec}: weight file ${p} listed in model.json is missing.`, { cause });
      }
    }
  const all = Buffer.concat(buffers as unknown as Uint8Array[]);
  const artifacts: tf.io.ModelArtifacts = {
    modelTopology: modelJson.modelTopology,
    weightSpecs: modelJson.weightsManifest.flatMap((g) => g.weights),
    weightData: toArrayBuffer(all),
    format: modelJson.format,
    userDefinedMetadata: modelJson.userDefinedMetadata,
  };
  return { name: spec, artifacts, ...preprocessingOf(modelJson, spec), fingerprint: fingerprintOf(artifacts) };
}

async function loadFromUrl(spec: string): Promise<PretrainedSource> {
  const handler = tf.io.http(spec);
  let artifacts: tf.io.ModelArtifacts;
  try {
    artifacts = await handler.load!();
  } catch (cause) {
    throw new ConfigError(`--model ${spec}: cannot load model.json from the URL (${(cause as Error).message}).`, { cause });
  }
  return { name: spec, artifacts, ...preprocessingOf(artifacts, spec), fingerprint: fingerprintOf(artifacts) };
}

/** Resolves a `--model` value to artifacts. Throws ConfigError with a fix for anything unusable. */
export async function loadPretrained(spec: string): Promise<PretrainedSource> {
  if ((BUILTIN_MODELS as readonly string[]).includes(spec)) return loadBuiltin(spec as BuiltinModel);
  if (/^https?:\/\//.test(spec)) return loadFromUrl(spec);
  if (spec.startsWith("file://") || spec.includes("/") || spec.endsWith(".json")) return loadFromFolder(spec);
  throw new ConfigError(`--model ${JSON.stringify(spec)} is not a built-in model (${BUILTIN_MODELS.join(", ")}), a folder with model.json, or an http(s) URL.`);
}

/** What `--feature-layer auto` and `--preprocessing auto` became for one model, and the input size checked. */
export interface ModelChoices {
  featureLayer: string;
  preprocessing: Preprocessing;
  /** Set when the user replaced a preprocessing the model declares (built-in or metadata): worth a warning. */
  overridden?: { declared: Preprocessing; chosen: Preprocessing; origin: PreprocessingOrigin };
}

/**
 * Resolves the model-dependent choices of a job: `auto` feature layer (the built-in's, else the input
 * of the first pooling/flatten layer, i.e. Keras' `include_top=False` output), `auto` preprocessing
 * (the model's own), and the input size against the architecture's minimum. Throws ConfigError.
 */
export function resolveModelChoices(source: PretrainedSource, o: { featureLayer: string; preprocessing: Preprocessing | "auto"; inputSize: number }): ModelChoices {
  if (source.minInputSize !== undefined && o.inputSize < source.minInputSize)
    throw new ConfigError(`--input-size ${o.inputSize} is too small for ${source.name}: its architecture needs at least ${source.minInputSize} pixels (its strided stem and reductions leave no feature map below that).`);
  const featureLayer = o.featureLayer === "auto" ? source.defaultFeatureLayer ?? topFeatureLayer(source) : o.featureLayer;
  const preprocessing = o.preprocessing === "auto" ? source.preprocessing : o.preprocessing;
  const origin = source.preprocessingOrigin ?? "name";
  const overridden = preprocessing !== source.preprocessing && origin !== "name" ? { declared: source.preprocessing, chosen: preprocessing, origin } : undefined;
  return { featureLayer, preprocessing, ...(overridden ? { overridden } : {}) };
}

/** A copy of `source` that feeds its pixels through `preprocessing` (the chosen one, which may not be the model's own). */
export function withPreprocessing(source: PretrainedSource, preprocessing: Preprocessing): PretrainedSource {
  return preprocessing === source.preprocessing ? source : { ...source, preprocessing };
}

const TOP_POOLING = new Set(["GlobalAveragePooling2D", "GlobalMaxPooling2D", "Flatten"]);

/** The last layer of the convolutional base: what feeds the classifier's global pooling or flatten (through a plain pooling layer if there is one). */
function topFeatureLayer(source: PretrainedSource): string {
  const topology = source.artifacts.modelTopology as Record<string, unknown> | undefined;
  const mc = (topology?.["model_config"] ?? topology) as { config?: { layers?: LayerJson[] } | LayerJson[] } | undefined;
  const layers = (Array.isArray(mc?.config) ? mc.config : mc?.config?.layers) ?? [];
  if (layers.length === 0) throw new ConfigError(`--feature-layer auto: model ${source.name} has no Keras layers; name the layer with --feature-layer.`);
  const nameOf = (l: LayerJson): string => l.name ?? l.config.name!;
  const byName = new Map(layers.map((l) => [nameOf(l), l]));
  // Functional models name their inputs; in a Sequential one the input is the layer before.
  const below = (l: LayerJson): LayerJson | undefined => {
    const inbound = inboundNames(l)[0];
    return inbound !== undefined ? byName.get(inbound) : layers[layers.indexOf(l) - 1];
  };
  const top = layers.find((l) => TOP_POOLING.has(l.class_name));
  if (!top) return nameOf(layers.at(-1)!);
  let base = below(top);
  if (base && /^(Average|Max)Pooling2D$/.test(base.class_name)) base = below(base);
  if (!base) throw new ConfigError(`--feature-layer auto: cannot tell where the base of model ${source.name} ends; name the layer with --feature-layer.`);
  return nameOf(base);
}

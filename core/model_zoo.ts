/**
 * Where pretrained models come from: the built-in offline `mobilenet_v2` (the Keras MobileNetV2
 * that the npm package `nsfwjs` ships as a TF.js layers model with base64, uint8-quantized weights),
 * a folder with model.json + weight files, or an http(s) URL. Every source yields plain
 * `tf.io.ModelArtifacts` so topology surgery (input size, cut point) works on JSON before any
 * layer is built.
 */
import { createHash } from "node:crypto";
import { readFile, stat } from "node:fs/promises";
import { createRequire } from "node:module";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import * as tf from "@tensorflow/tfjs";
import { ConfigError } from "./errors.js";

/** How pixels in [0, 255] become the model's input. */
export const PREPROCESSINGS = ["tf", "caffe", "torch", "none"] as const;
export type Preprocessing = (typeof PREPROCESSINGS)[number];

export interface PretrainedSource {
  /** The name a user gave (`mobilenet_v2`, a path or URL). */
  name: string;
  artifacts: tf.io.ModelArtifacts;
  /** The model's own preprocessing: `tf` = [-1, 1] (MobileNet, Inception, EfficientNet-lite), `caffe` = BGR minus ImageNet means (VGG, ResNet50), `torch` = ImageNet mean/std (DenseNet). */
  preprocessing: Preprocessing;
  /** sha256 of topology and weights: part of every cache key. */
  fingerprint: string;
}

const require = createRequire(import.meta.url);

/** Built-in models that need no network. */
export const BUILTIN_MODELS = ["mobilenet_v2"] as const;

async function loadBuiltinMobileNetV2(): Promise<PretrainedSource> {
  let pkgDir: string;
  try {
    pkgDir = dirname(dirname(require.resolve("nsfwjs")));
  } catch (cause) {
    throw new ConfigError("the built-in mobilenet_v2 needs the npm package nsfwjs: run 'npm ci'.", { cause });
  }
  // dist/cjs/index.js -> dist/ ; the model bundles are CommonJS modules exporting JSON and a base64 string.
  const modelDir = join(pkgDir, "models", "mobilenet_v2");
  const json = require(join(modelDir, "model.min.js")) as { modelTopology: object; weightsManifest: tf.io.WeightsManifestConfig };
  const weightsB64 = require(join(modelDir, "group1-shard1of1.min.js")) as string;
  const weightData = Buffer.from(weightsB64, "base64");
  const weightSpecs = json.weightsManifest.flatMap((g) => g.weights);
  const artifacts: tf.io.ModelArtifacts = {
    modelTopology: json.modelTopology,
    weightSpecs,
    weightData: toArrayBuffer(weightData),
    format: "layers-model",
  };
  return { name: "mobilenet_v2", artifacts, preprocessing: "tf", fingerprint: fingerprintOf(artifacts) };
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

function preprocessingOf(modelJson: { userDefinedMetadata?: Record<string, unknown> }, name: string): Preprocessing {
  const declared = modelJson.userDefinedMetadata?.["ctrain_preprocessing"];
  if (declared !== undefined) {
    if (typeof declared !== "string" || !(PREPROCESSINGS as readonly string[]).includes(declared))
      throw new ConfigError(`model ${name}: userDefinedMetadata.ctrain_preprocessing must be one of ${PREPROCESSINGS.join(", ")}, got ${JSON.stringify(declared)}.`);
    return declared as Preprocessing;
  }
  const lower = name.toLowerCase();
  if (/vgg|resnet(?!.*v2)/.test(lower)) return "caffe";
  if (/densenet/.test(lower)) return "torch";
  return "tf";
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
  return { name: spec, artifacts, preprocessing: preprocessingOf(modelJson, spec), fingerprint: fingerprintOf(artifacts) };
}

async function loadFromUrl(spec: string): Promise<PretrainedSource> {
  const handler = tf.io.http(spec);
  let artifacts: tf.io.ModelArtifacts;
  try {
    artifacts = await handler.load!();
  } catch (cause) {
    throw new ConfigError(`--model ${spec}: cannot load model.json from the URL (${(cause as Error).message}).`, { cause });
  }
  return { name: spec, artifacts, preprocessing: preprocessingOf(artifacts, spec), fingerprint: fingerprintOf(artifacts) };
}

/** Resolves a `--model` value to artifacts. Throws ConfigError with a fix for anything unusable. */
export async function loadPretrained(spec: string): Promise<PretrainedSource> {
  if (spec === "mobilenet_v2") return loadBuiltinMobileNetV2();
  if (/^https?:\/\//.test(spec)) return loadFromUrl(spec);
  if (spec.startsWith("file://") || spec.includes("/") || spec.endsWith(".json")) return loadFromFolder(spec);
  throw new ConfigError(`--model ${JSON.stringify(spec)} is not a built-in model (${BUILTIN_MODELS.join(", ")}), a folder with model.json, or an http(s) URL.`);
}

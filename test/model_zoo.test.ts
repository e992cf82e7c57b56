/**
 * The built-in models get the preprocessing their weights were trained with: nsfwjs' own classifier,
 * fed through ctrain's preprocessing, gives what nsfwjs' own `classify` gives on the same pixels.
 * Also: `inception_v3` is built in (offline, any input size from 75), `--feature-layer auto` and
 * `--preprocessing auto` resolve per model, and an override of a declared preprocessing is flagged.
 */
import assert from "node:assert/strict";
import { mkdtemp, rm } from "node:fs/promises";
import { createRequire } from "node:module";
import { tmpdir } from "node:os";
import { dirname, join } from "node:path";
import { after, before, describe, test } from "node:test";
import * as tf from "@tensorflow/tfjs";
import { selectBackend } from "../core/models/backend.js";
import { parseArgs, PREPROCESSING_CHOICES } from "../core/runtime/config.js";
import { buildFeatureExtractor } from "../core/models/feature_model.js";
import { saveModel } from "../core/models/model_io.js";
import { loadPretrained, PREPROCESSINGS, type Preprocessing, type PretrainedSource, resolveModelChoices, withPreprocessing } from "../core/models/model_zoo.js";

const require = createRequire(import.meta.url);
interface Nsfw { classify(img: tf.Tensor3D, topk?: number): Promise<{ className: string; probability: number }[]>; dispose?(): void }
interface NsfwDefinition { name: string; numOfWeightBundles: number; options?: { size?: number }; modelJson: () => Promise<{ default: unknown }>; weightBundles: (() => Promise<{ default: string }>)[] }
// nsfwjs/core's `load` is the package's: its main `load` calls it with the built-in definitions.
const nsfwjs = require("nsfwjs/core") as { load(name: string, o?: { size: number; modelDefinitions?: NsfwDefinition[] }): Promise<Nsfw> };
/** nsfwjs' folder (and package subpath `nsfwjs/models/<folder>`) of each bundled model used here. */
const NSFW_FOLDERS: Record<string, string> = { MobileNetV2: "mobilenet_v2", InceptionV3: "inception_v3" };

/**
 * nsfwjs' own definition of a bundled model, the same model and weight files, read with a plain
 * `require`. Its CommonJS build wraps each weight file (a base64 string) in `__importStar`, which
 * copies the string's millions of indices into an object one by one: 30-40 s per load for
 * InceptionV3 on a 2-core machine. Only how the files are read changes, not what nsfwjs computes.
 */
function nsfwDefinition(name: string): NsfwDefinition {
  const folder = NSFW_FOLDERS[name]!;
  const def = (require(`nsfwjs/models/${folder}`) as Record<string, NsfwDefinition>)[`${name}Model`]!;
  const files = join(dirname(require.resolve("nsfwjs")), "..", "models", folder);
  const weightBundles = Array.from({ length: def.numOfWeightBundles }, (_, i) => async () => ({ default: require(join(files, `group1-shard${i + 1}of${def.numOfWeightBundles}.min.js`)) as string }));
  return { ...def, modelJson: async () => ({ default: require(join(files, "model.min.js")) as unknown }), weightBundles };
}
const NSFW_CLASSES = ["Drawing", "Hentai", "Neutral", "Porn", "Sexy"];

let tmp: string;
before(async () => {
  await selectBackend("wasm");
  tmp = await mkdtemp(join(tmpdir(), "ctrain-zoo-"));
});
after(async () => {
  await rm(tmp, { recursive: true, force: true });
});

/** Images with structure (gradients, stripes, a disc, noise): n*size*size*3 bytes. */
function madeImages(n: number, size: number): Uint8Array {
  const out = new Uint8Array(n * size * size * 3);
  let s = 7;
  for (let k = 0; k < n; k++)
    for (let y = 0; y < size; y++)
      for (let x = 0; x < size; x++)
        for (let c = 0; c < 3; c++) {
          s = (s * 1103515245 + 12345) >>> 0;
          const noise = (s >>> 16) & 0xff;
          const u = x / size;
          const v = y / size;
          const value = [
            255 * u * (c === 0 ? 1 : 0.3) + 60 * v,
            (Math.floor(x / 8) + Math.floor(y / 8)) % 2 ? 230 - 40 * c : 20 + 30 * c,
            (u - 0.5) ** 2 + (v - 0.5) ** 2 < 0.1 ? [220, 170, 140][c] : 30 + 20 * c,
            noise,
          ][k % 4];
          out[((k * size + y) * size + x) * 3 + c] = Math.max(0, Math.min(255, Math.round(value)));
        }
  return out;
}

/** nsfwjs' five class probabilities per image, in NSFW_CLASSES order, from its own classify(). */
async function nsfwProbabilities(name: string, size: number, rgb: Uint8Array, n: number): Promise<number[][]> {
  const model = await nsfwjs.load(name, { size, modelDefinitions: [nsfwDefinition(name)] });
  const out: number[][] = [];
  for (let i = 0; i < n; i++) {
    const img = tf.tensor3d(rgb.subarray(i * size * size * 3, (i + 1) * size * size * 3), [size, size, 3], "int32");
    const ranked = await model.classify(img, 5);
    img.dispose();
    out.push(NSFW_CLASSES.map((c) => ranked.find((r) => r.className === c)!.probability));
  }
  model.dispose?.();
  return out;
}

/** The same probabilities from the whole nsfwjs network (its classifier kept) fed through ctrain's preprocessing. */
async function ctrainProbabilities(source: PretrainedSource, mode: Preprocessing, size: number, rgb: Uint8Array, n: number): Promise<number[][]> {
  const fx = await buildFeatureExtractor(withPreprocessing(source, mode), { inputSize: size, featureLayer: "dense_3", pooling: "none" });
  const p = await fx.extract(rgb, n);
  fx.dispose();
  return Array.from({ length: n }, (_, i) => Array.from(p.subarray(i * 5, (i + 1) * 5)));
}

const argmax = (p: number[]): number => p.indexOf(Math.max(...p));
const maxDiff = (a: number[][], b: number[][]): number => Math.max(...a.flatMap((r, i) => r.map((v, j) => Math.abs(v - b[i][j]))));

async function checkParity(model: "mobilenet_v2" | "inception_v3", nsfwName: string, size: number, n: number, checkTf: boolean): Promise<void> {
  const source = await loadPretrained(model);
  assert.equal(source.preprocessing, "unit");
  assert.equal(source.preprocessingOrigin, "builtin");
  const rgb = madeImages(n, size);
  const theirs = await nsfwProbabilities(nsfwName, size, rgb, n);
  const ours = await ctrainProbabilities(source, "unit", size, rgb, n);
  for (let i = 0; i < n; i++) assert.equal(argmax(ours[i]), argmax(theirs[i]), `image ${i}: ctrain ${ours[i]} vs nsfwjs ${theirs[i]}`);
  assert.ok(maxDiff(ours, theirs) < 1e-3, `probabilities differ by ${maxDiff(ours, theirs)}`);
  if (!checkTf) return;
  // The check can tell preprocessings apart: [-1, 1] input moves the probabilities.
  const tfMode = await ctrainProbabilities(source, "tf", size, rgb, n);
  assert.ok(maxDiff(tfMode, theirs) > 1e-2, `tf preprocessing should not match nsfwjs (max difference ${maxDiff(tfMode, theirs)})`);
}

describe("model zoo - preprocessing matches the weights", () => {
  test("model zoo - the option's choices are auto plus every preprocessing; an unknown one is refused naming the option", () => {
    assert.deepEqual([...PREPROCESSING_CHOICES], ["auto", ...PREPROCESSINGS]);
    assert.equal(parseArgs(["--preprocessing", "unit"]).options.preprocessing, "unit");
    assert.throws(() => parseArgs(["--preprocessing", "zero-one"]), (e: Error) => e.name === "ConfigError" && /--preprocessing/.test(e.message) && /unit/.test(e.message));
  });

  test("model zoo - mobilenet_v2 through ctrain's unit preprocessing classifies as nsfwjs does", async () => {
    await checkParity("mobilenet_v2", "MobileNetV2", 224, 4, true);
  });

  test("model zoo - inception_v3 through ctrain's unit preprocessing classifies as nsfwjs does", async () => {
    await checkParity("inception_v3", "InceptionV3", 299, 2, false);
  });
});

describe("model zoo - inception_v3 and per-model choices", () => {
  test("model zoo - inception_v3 loads offline from its 6 shards and extracts finite mixed10 features at 96 px", async () => {
    const source = await loadPretrained("inception_v3");
    assert.ok(source.artifacts.weightSpecs!.length > 300);
    const choices = resolveModelChoices(source, { featureLayer: "auto", preprocessing: "auto", inputSize: 96 });
    assert.deepEqual(choices, { featureLayer: "mixed10", preprocessing: "unit" });
    const fx = await buildFeatureExtractor(source, { inputSize: 96, featureLayer: choices.featureLayer, pooling: "avg" });
    assert.deepEqual(fx.model.inputs[0].shape, [null, 96, 96, 3]);
    assert.equal(fx.featureDim, 2048);
    const f = await fx.extract(madeImages(3, 96), 3);
    assert.equal(f.length, 3 * 2048);
    assert.ok(f.every(Number.isFinite));
    assert.ok(f.some((v) => v > 0), "features are not all zero");
    fx.dispose();
  });

  test("model zoo - an input size below the architecture's minimum is a ConfigError naming --input-size", async () => {
    const inception = await loadPretrained("inception_v3");
    assert.throws(() => resolveModelChoices(inception, { featureLayer: "auto", preprocessing: "auto", inputSize: 64 }),
      (e: Error) => e.name === "ConfigError" && /--input-size 64/.test(e.message) && /75/.test(e.message));
    const mobilenet = await loadPretrained("mobilenet_v2");
    assert.equal(resolveModelChoices(mobilenet, { featureLayer: "auto", preprocessing: "auto", inputSize: 64 }).featureLayer, "out_relu");
  });

  test("model zoo - overriding a built-in's preprocessing is flagged; the same choice is not", async () => {
    const source = await loadPretrained("mobilenet_v2");
    const r = resolveModelChoices(source, { featureLayer: "block_12_add", preprocessing: "tf", inputSize: 96 });
    assert.deepEqual(r, { featureLayer: "block_12_add", preprocessing: "tf", overridden: { declared: "unit", chosen: "tf", origin: "builtin" } });
    assert.equal(resolveModelChoices(source, { featureLayer: "auto", preprocessing: "unit", inputSize: 96 }).overridden, undefined);
  });

  test("model zoo - a folder model: auto feature layer is the input of its pooling; metadata preprocessing is declared", async () => {
    const input = tf.input({ shape: [32, 32, 3] });
    const conv = tf.layers.conv2d({ filters: 4, kernelSize: 3, activation: "relu", name: "last_conv" }).apply(input) as tf.SymbolicTensor;
    const pooled = tf.layers.globalAveragePooling2d({ name: "gap" }).apply(conv) as tf.SymbolicTensor;
    const out = tf.layers.dense({ units: 2, activation: "softmax", name: "logits" }).apply(pooled) as tf.SymbolicTensor;
    const model = tf.model({ inputs: input, outputs: out });
    model.setUserDefinedMetadata({ ctrain_preprocessing: "caffe" });
    const dir = join(tmp, "tiny");
    await saveModel(model, dir);
    const source = await loadPretrained(dir);
    assert.equal(source.preprocessing, "caffe");
    const r = resolveModelChoices(source, { featureLayer: "auto", preprocessing: "torch", inputSize: 48 });
    assert.equal(r.featureLayer, "last_conv");
    assert.deepEqual(r.overridden, { declared: "caffe", chosen: "torch", origin: "metadata" });
    // A preprocessing guessed from the name is no declaration: replacing it is not flagged.
    const guessed = { ...source, preprocessingOrigin: "name" as const };
    assert.equal(resolveModelChoices(guessed, { featureLayer: "auto", preprocessing: "torch", inputSize: 48 }).overridden, undefined);
    model.dispose();
  });

  test("model zoo - the chosen preprocessing is part of the extractor fingerprint (the feature-cache key)", async () => {
    const source = await loadPretrained("mobilenet_v2");
    const a = await buildFeatureExtractor(source, { inputSize: 64, featureLayer: "block_6_expand_relu", pooling: "avg" });
    const b = await buildFeatureExtractor(withPreprocessing(source, "tf"), { inputSize: 64, featureLayer: "block_6_expand_relu", pooling: "avg" });
    assert.equal(a.preprocessing, "unit");
    assert.equal(b.preprocessing, "tf");
    assert.notEqual(a.fingerprint, b.fingerprint);
    a.dispose();
    b.dispose();
  });
});

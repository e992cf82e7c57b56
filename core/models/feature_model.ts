/**
 * Turns pretrained artifacts into the frozen feature extractor of a job: the topology is rebuilt
 * for the requested input size, cut at the feature layer, and given Keras-style pooling
 * (`pooling=avg|max|None`). Surgery happens on the topology JSON, so the weights load once, by
 * layer name, into the new graph (weights of dropped layers, such as nsfwjs' classifier, are
 * ignored) -- the same result as building the model again and copying the weights layer by layer.
 */
import { createHash } from "node:crypto";
import * as tf from "@tensorflow/tfjs";
import type { Pooling } from "../runtime/config.js";
import type { Dataset } from "../datasets/types.js";
import { BadInputError, ConfigError } from "../runtime/errors.js";
import { type EngineInfo, type EngineOptions, type FrozenForward, frozenForward } from "./inference_engine.js";
import { loadPretrained, type ModelChoices, type Preprocessing, type PretrainedSource, resolveModelChoices, withPreprocessing } from "./model_zoo.js";
import { loadOnnxRuntime, onnxGraphForward } from "./inference_engine.js";
import { cutOnnxModel, defaultOnnxFeatureTensor, isOnnxModelSpec, loadOnnxSource, onnxInputSize, onnxTensorShapes, type OnnxSource } from "./onnx/user_model.js";

/** One layer of a Keras topology JSON. */
export interface LayerJson {
  name: string;
  class_name: string;
  config: Record<string, unknown> & { name?: string; batch_input_shape?: (number | null)[] };
  inbound_nodes?: unknown[];
}
interface ModelConfigJson {
  class_name: string;
  config: { name?: string; layers: LayerJson[]; input_layers?: unknown[]; output_layers?: unknown[] } | LayerJson[];
}

/** The topology's model config, whatever Keras version wrote it. */
function modelConfigOf(topology: Record<string, unknown>): ModelConfigJson {
  const mc = (topology["model_config"] ?? topology) as ModelConfigJson;
  if (!mc || !mc.class_name || !mc.config) throw new ConfigError("model.json: modelTopology has no model_config; is this a TF.js layers model (not a graph model)?");
  return mc;
}

function layersOf(mc: ModelConfigJson): LayerJson[] {
  return Array.isArray(mc.config) ? mc.config : mc.config.layers;
}

/** Names of the layers a node list refers to (Keras 2.x `[[name, node, tensor, kwargs]]` or Keras 3 dicts). */
export function inboundNames(layer: LayerJson): string[] {
  const names: string[] = [];
  const visit = (x: unknown): void => {
    if (Array.isArray(x)) {
      if (typeof x[0] === "string" && typeof x[1] === "number") names.push(x[0]);
      else x.forEach(visit);
    } else if (x && typeof x === "object") {
      const o = x as Record<string, unknown>;
      if (Array.isArray(o["keras_history"]) && typeof (o["keras_history"] as unknown[])[0] === "string") names.push((o["keras_history"] as string[])[0]);
      else Object.values(o).forEach(visit);
    }
  };
  visit(layer.inbound_nodes ?? []);
  return names;
}

export interface CutOptions {
  /** Square input size in pixels. */
  inputSize: number;
  /** Layer whose output becomes the model's output. */
  outputLayer: string;
}

/**
 * A copy of the topology with a new input size and everything after `outputLayer` (and every
 * layer it does not depend on) removed.
 */
export function cutTopology(topology: object, opts: CutOptions): { topology: object; layerNames: string[] } {
  const copy = structuredClone(topology) as Record<string, unknown>;
  delete copy["training_config"];
  const mc = modelConfigOf(copy);
  const layers = layersOf(mc);
  const byName = new Map(layers.map((l) => [l.name ?? l.config.name!, l]));
  if (!byName.has(opts.outputLayer)) {
    const candidates = layers.filter((l) => /relu|conv|add|act|pool|block|out/i.test(l.name)).slice(-8).map((l) => l.name);
    throw new ConfigError(`--feature-layer ${JSON.stringify(opts.outputLayer)} is not a layer of this model. Layers near the top: ${candidates.join(", ")}.`);
  }
  if (Array.isArray(mc.config)) {
    // Sequential: keep the prefix up to the output layer.
    const idx = layers.findIndex((l) => (l.name ?? l.config.name) === opts.outputLayer);
    const kept = layers.slice(0, idx + 1);
    const first = kept[0];
    const shape = first.config.batch_input_shape;
    if (!shape || shape.length !== 4) throw new ConfigError("the model's first layer has no 4-d batch_input_shape; cannot set the input size.");
    first.config.batch_input_shape = [null, opts.inputSize, opts.inputSize, shape[3]];
    mc.config = kept;
    return { topology: copy, layerNames: kept.map((l) => l.name ?? l.config.name!) };
  }
  const needed = new Set<string>();
  const stack = [opts.outputLayer];
  while (stack.length) {
    const n = stack.pop()!;
    if (needed.has(n)) continue;
    needed.add(n);
    const l = byName.get(n);
    if (!l) throw new ConfigError(`model.json: layer ${n} is referenced but not defined.`);
    stack.push(...inboundNames(l));
  }
  const kept = layers.filter((l) => needed.has(l.name));
  let inputs = 0;
  for (const l of kept) {
    if (l.class_name !== "InputLayer") continue;
    const shape = l.config.batch_input_shape ?? (l.config["batch_shape"] as (number | null)[] | undefined);
    if (!shape || shape.length !== 4) throw new ConfigError(`input layer ${l.name} is not an image input (shape ${JSON.stringify(shape)}).`);
    const newShape = [null, opts.inputSize, opts.inputSize, shape[3]];
    if (l.config.batch_input_shape) l.config.batch_input_shape = newShape;
    else l.config["batch_shape"] = newShape;
    inputs++;
  }
  if (inputs !== 1) throw new ConfigError(`the model must have exactly one image input; found ${inputs}.`);
  mc.config.layers = kept;
  mc.config.input_layers = [[kept.find((l) => l.class_name === "InputLayer")!.name, 0, 0]];
  mc.config.output_layers = [[opts.outputLayer, 0, 0]];
  return { topology: copy, layerNames: kept.map((l) => l.name) };
}

/** Loads the weights of `source` into a topology produced by {@link cutTopology}. */
export async function loadCut(source: PretrainedSource, topology: object): Promise<tf.LayersModel> {
  const { weightSpecs, weightData } = source.artifacts;
  // strict: false -- the weights of layers that were cut away (the classifier) are present but unused.
  const model = await tf.loadLayersModel(tf.io.fromMemory({ modelTopology: topology, weightSpecs, weightData }), { strict: false });
  return model;
}

// Pixel scaling lives in its own small module so the batch-preparation thread can load it without the engines.
export { preprocess } from "./preprocess.js";

export interface FeatureExtractorOptions extends EngineOptions {
  inputSize: number;
  featureLayer: string;
  pooling: Pooling;
}

/** A frozen convolutional base that maps uint8 RGB images to feature vectors. */
export interface FeatureExtractor {
  /** The frozen base as a tfjs model (composed with the head for export); absent for an ONNX model (`--model x.onnx`). */
  model?: tf.LayersModel;
  /** The layer (or, for an ONNX model, the graph tensor) whose output is the feature. */
  featureLayer: string;
  pooling: Pooling;
  inputSize: number;
  /** Length of one feature vector. */
  featureDim: number;
  /** Shape of one feature before flattening ([h, w, c] for pooling none, [c] otherwise). */
  featureShape: number[];
  preprocessing: Preprocessing;
  /**
   * sha256 over the model, input size, feature layer, pooling and preprocessing. Not the engine:
   * onnx and tfjs compute the same features (parity-tested, probed at build), so a cache filled by
   * one serves the other. int8 precision is in it: its features differ from fp32's.
   */
  fingerprint: string;
  /** The engine that runs the frozen forward pass (`--engine`). */
  engine: EngineInfo;
  /** For an ONNX model: the cut graph (uint8 NHWC pixels in, features out) that a saved classifier keeps as base.onnx. */
  onnxGraph?: Uint8Array;
  /** Features of `n` images given as n*size*size*3 values in [0, 255] (HWC): uint8 as decoded, float32 after augmentation. */
  extract(pixels: Uint8Array | Float32Array, n: number): Promise<Float32Array>;
  dispose(): void;
}

/** ctrain's pooling over a 4-d feature map (`none`: flatten), named `ctrain_pool` wherever it is used. */
export function poolingLayer(pooling: Pooling): tf.layers.Layer {
  if (pooling === "avg") return tf.layers.globalAveragePooling2d({ name: "ctrain_pool" });
  if (pooling === "max") return tf.layers.globalMaxPooling2d({ name: "ctrain_pool" });
  return tf.layers.flatten({ name: "ctrain_pool" });
}

/** A feature extractor built from a TF.js layers model: its tfjs form is always there. */
export type LayersFeatureExtractor = FeatureExtractor & { model: tf.LayersModel };

/** Builds the frozen feature extractor of a job. */
export async function buildFeatureExtractor(source: PretrainedSource, opts: FeatureExtractorOptions): Promise<LayersFeatureExtractor>;
export async function buildFeatureExtractor(source: ModelSource, opts: FeatureExtractorOptions): Promise<FeatureExtractor>;
export async function buildFeatureExtractor(source: ModelSource, opts: FeatureExtractorOptions): Promise<FeatureExtractor> {
  if (isOnnxSource(source)) return buildOnnxFeatureExtractor(source, opts);
  const { topology } = cutTopology(source.artifacts.modelTopology as object, { inputSize: opts.inputSize, outputLayer: opts.featureLayer });
  const base = await loadCut(source, topology);
  base.trainable = false;
  const out = base.outputs[0];
  let pooled: tf.SymbolicTensor;
  if (out.shape.length !== 4) {
    if (opts.pooling !== "none") throw new ConfigError(`--pooling ${opts.pooling} needs a 4-d feature map, but layer ${opts.featureLayer} outputs shape ${JSON.stringify(out.shape)}; use --pooling none.`);
    pooled = out;
  } else pooled = poolingLayer(opts.pooling).apply(out) as tf.SymbolicTensor;
  const model = tf.model({ inputs: base.inputs, outputs: pooled, name: "ctrain_feature_extractor" });
  const featureDim = pooled.shape[1] as number;
  const featureShape = (opts.pooling === "none" ? out.shape.slice(1) : pooled.shape.slice(1)) as number[];
  const size = opts.inputSize;
  let forward: FrozenForward;
  try {
    forward = await frozenForward(model, source.preprocessing, opts);
  } catch (err) {
    model.dispose();
    throw err;
  }
  const fingerprint = extractorFingerprint({ model: source.fingerprint, inputSize: opts.inputSize, featureLayer: opts.featureLayer, pooling: opts.pooling, preprocessing: source.preprocessing }, forward.info);
  return {
    model,
    featureLayer: opts.featureLayer,
    pooling: opts.pooling,
    inputSize: size,
    featureDim,
    featureShape,
    preprocessing: source.preprocessing,
    fingerprint,
    engine: forward.info,
    extract(pixels: Uint8Array | Float32Array, n: number): Promise<Float32Array> {
      if (pixels.length !== n * size * size * 3) throw new Error(`extract: expected ${n * size * size * 3} values for ${n} images of ${size}x${size}x3, got ${pixels.length}`);
      return forward.run(pixels, n);
    },
    dispose(): void {
      forward.dispose();
      model.dispose();
    },
  };
}

/**
 * The extractor fingerprint: `what` (model, input size, layer, pooling, preprocessing), plus the precision when not fp32
 * (fp32 fingerprints stay as they were), and for int8 with 7-bit weights (a CPU without VNNI) the bits: its features differ.
 */
function extractorFingerprint(what: Record<string, unknown>, engine: EngineInfo): string {
  const int8 = engine.precision === "int8" ? { precision: "int8", ...(engine.weightBits === 7 ? { weight_bits: 7 } : {}) } : {};
  return createHash("sha256").update(JSON.stringify({ ...what, ...int8 })).digest("hex");
}

/**
 * int8 calibration images for a job: the first `count` training samples of `dataset` (the same in
 * every process, so every worker quantizes to the same graph), decoded at `size`, in batches of 16.
 * Samples that do not decode are passed over.
 */
export function calibrationImages(dataset: Dataset, size: number, count = 64): () => Promise<Uint8Array[]> {
  return async () => {
    const per = size * size * 3;
    const images: Uint8Array[] = [];
    for (const s of dataset.samples.firstOf("train", count)) {
      try {
        images.push(await dataset.readRgb(s, size));
      } catch (err) {
        if (!(err instanceof BadInputError)) throw err;
      }
    }
    const batches: Uint8Array[] = [];
    for (let i = 0; i < images.length; i += 16) {
      const b = new Uint8Array(Math.min(16, images.length - i) * per);
      images.slice(i, i + 16).forEach((img, j) => b.set(img, j * per));
      batches.push(b);
    }
    return batches;
  };
}

/** A TF.js layers model (built-in, folder, URL) or an ONNX graph (`--model x.onnx`, inference only). */
export type ModelSource = PretrainedSource | OnnxSource;

export function isOnnxSource(s: ModelSource): s is OnnxSource {
  return (s as OnnxSource).kind === "onnx";
}

/** `--model`: an ONNX file, or what loadPretrained knows (built-ins, a folder with model.json, a URL). */
export function loadModelSource(spec: string): Promise<ModelSource> {
  return isOnnxModelSpec(spec) ? loadOnnxSource(spec) : loadPretrained(spec);
}

/**
 * The feature extractor of an ONNX model: its tensors are probed once for their shapes, the graph is
 * cut at `featureLayer` (`auto`: the last 4-d feature map) behind ctrain's preprocessing and in front
 * of the pooling, and runs on onnxruntime (there is no tfjs form of it to fall back to).
 */
async function buildOnnxFeatureExtractor(src: OnnxSource, opts: FeatureExtractorOptions): Promise<FeatureExtractor> {
  if (opts.engine === "tfjs") throw new ConfigError(`--engine tfjs cannot run the ONNX model ${src.name}: use --engine auto or onnx (onnxruntime), or convert the model to a TF.js layers model.`);
  const preprocessing = src.preprocessing;
  if (!preprocessing)
    throw new ConfigError(`--model ${src.name}: an ONNX model does not say how its training pixels were scaled: give --preprocessing (torch for torchvision models, tf for Keras MobileNet/Inception/EfficientNet exports, caffe for Keras VGG/ResNet, unit for [0, 1]).`);
  const ort = await loadOnnxRuntime();
  const size = onnxInputSize(src, opts.inputSize);
  const tensors = await onnxTensorShapes(ort, src, size);
  const featureLayer = opts.featureLayer === "auto" ? defaultOnnxFeatureTensor(tensors) : opts.featureLayer;
  const tensor = tensors.find((t) => t.name === featureLayer);
  if (!tensor) {
    const maps = tensors.filter((t) => t.shape.length === 3).slice(-6).map((t) => t.name);
    throw new ConfigError(`--feature-layer ${JSON.stringify(featureLayer)} is not a tensor of ${src.name}. Feature maps near the top: ${maps.join(", ")} (ctrain model-info --model ${src.name} lists all).`);
  }
  const cut = (dtype: "uint8" | "float32") => cutOnnxModel(src, { featureTensor: featureLayer, featureShape: tensor.shape, pooling: opts.pooling, preprocessing, size, inputDtype: dtype });
  const first = cut("uint8");
  const forward = await onnxGraphForward((dtype) => (dtype === "uint8" ? first : cut(dtype)), opts.engine ?? "auto", opts);
  const featureDim = first.featureShape.reduce((a, b) => a * b, 1);
  const fingerprint = extractorFingerprint({ model: src.fingerprint, inputSize: size, featureLayer, pooling: opts.pooling, preprocessing }, forward.info);
  return {
    featureLayer, pooling: opts.pooling, inputSize: size, featureDim, featureShape: first.featureShape, preprocessing, fingerprint, engine: forward.info,
    onnxGraph: first.bytes,
    extract(pixels, n) {
      return forward.run(pixels, n);
    },
    dispose() {
      forward.dispose();
    },
  };
}

/** What `--feature-layer auto` and `--preprocessing auto` became for a model of either kind (ONNX: the layer is resolved when the graph is probed). */
export function resolveSourceChoices(source: ModelSource, o: { featureLayer: string; preprocessing: Preprocessing | "auto"; inputSize: number }): ModelChoices & { source: ModelSource } {
  if (!isOnnxSource(source)) {
    const c = resolveModelChoices(source, o);
    return { ...c, source: withPreprocessing(source, c.preprocessing) };
  }
  const preprocessing = o.preprocessing === "auto" ? source.preprocessing : o.preprocessing;
  const overridden = source.preprocessing && preprocessing && preprocessing !== source.preprocessing ? { declared: source.preprocessing, chosen: preprocessing, origin: "metadata" as const } : undefined;
  // An undefined preprocessing is refused, with what to give, when the extractor is built.
  return { featureLayer: o.featureLayer, preprocessing: preprocessing as Preprocessing, ...(overridden ? { overridden } : {}), source: { ...source, preprocessing } };
}

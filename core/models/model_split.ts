/**
 * Splitting the (already cut) base for fine-tuning into a frozen bottom and a trainable top.
 *
 * Which layers train: `--fine-tune-layers K` unfreezes the top K layers of the base counted the
 * way Keras counts `base_model.layers` (every layer, with or without weights -- BatchNormalization,
 * ReLU, ZeroPadding and Add included; the InputLayer and ctrain's pooling are not counted), so a
 * Keras recipe's `fine_tune_at` carries over. A layer name unfreezes from that layer to the top.
 * BatchNormalization layers never train, whatever the count: they stay frozen AND run in inference
 * mode (see {@link freezeBatchNorm}).
 *
 * Where the graph is cut: the top must take one tensor so that its input can be cached like a
 * feature. The cut is the latest layer at or before the first unfrozen one whose output is the only
 * tensor that the layers above it read (an articulation point: in MobileNetV2 a block's `_add` or
 * `_project_BN` output, never the middle of a residual block). Layers between the cut and the first
 * unfrozen layer belong to the top but stay frozen.
 *
 * The top is its own tf.LayersModel built from the topology JSON ("top from layer X"): the cut layer
 * is replaced by an InputLayer of the same name, so inbound references stay valid and weights load
 * by layer name -- the complement of cutTopology in feature_model.ts.
 */
import * as tf from "@tensorflow/tfjs";
import { ConfigError } from "../runtime/errors.js";
import type { Pooling } from "../runtime/config.js";
import { cutTopology, inboundNames, type LayerJson, loadCut, poolingLayer } from "./feature_model.js";
import type { PretrainedSource } from "./model_zoo.js";

function layersOf(topology: object): { layers: LayerJson[]; config: Record<string, unknown> } {
  const t = topology as Record<string, unknown>;
  const mc = (t["model_config"] ?? t) as { class_name: string; config: unknown };
  if (Array.isArray(mc.config)) throw new ConfigError("fine-tuning needs a functional model topology (Keras Model), not a Sequential one.");
  const config = mc.config as Record<string, unknown> & { layers: LayerJson[] };
  return { layers: config.layers, config };
}


/**
 * Per layer (topology order): whether it is a cut point -- every layer after it reads only layers at
 * or after it, so its output is the one tensor the rest of the graph depends on.
 */
function cutPointIndices(layers: LayerJson[]): boolean[] {
  const index = new Map(layers.map((l, i) => [l.name, i]));
  // earliest[j] = the earliest layer that layer j or any later layer reads.
  const earliest = new Array<number>(layers.length + 1).fill(Infinity);
  for (let j = layers.length - 1; j >= 0; j--) {
    let m = earliest[j + 1];
    for (const n of inboundNames(layers[j])) m = Math.min(m, index.get(n) ?? -1);
    earliest[j] = m;
  }
  return layers.map((_, p) => earliest[p + 1] >= p);
}

/**
 * Names of the layers of a (cut) functional topology where the graph can be cut in one tensor: the
 * places a feature layer or a fine-tuning cut can go without leaving a branch behind.
 */
export function cutPoints(cutTopologyJson: object): string[] {
  const { layers } = layersOf(cutTopologyJson);
  const points = cutPointIndices(layers);
  return layers.filter((l, i) => points[i] && l.class_name !== "InputLayer").map((l) => l.name);
}

/** Which layers of a base train, and where the base is cut for fine-tuning. */
export interface SplitPlan {
  /** Layer whose output is the top's input (the cached activation). */
  cutLayer: string;
  /** First unfrozen layer. */
  firstUnfrozen: string;
  /** Layers of the top (after the cut, in topology order). */
  topLayers: string[];
  /** Top layers whose weights train (BatchNormalization excluded). */
  trainableLayers: string[];
  /** Base layers counted by `--fine-tune-layers` (everything but the InputLayer). */
  baseLayerCount: number;
}

/**
 * Resolves `--fine-tune-layers` (a count or a layer name) against a topology cut at the feature
 * layer. Throws ConfigError for 0, a count above the number of layers, or an unknown name.
 */
export function planSplit(cutTopologyJson: object, spec: string): SplitPlan {
  const { layers } = layersOf(cutTopologyJson);
  const counted = layers.filter((l) => l.class_name !== "InputLayer");
  const index = new Map(layers.map((l, i) => [l.name, i]));
  const s = spec.trim();
  let first: number;
  if (/^\d+$/.test(s)) {
    const k = Number(s);
    if (k < 1) throw new ConfigError("--fine-tune-layers 0 means no fine-tuning; give a positive count or a layer name.");
    if (k > counted.length) throw new ConfigError(`--fine-tune-layers ${k}: the base (cut at its feature layer) has only ${counted.length} layers.`);
    first = index.get(counted[counted.length - k].name)!;
  } else {
    const i = index.get(s);
    if (i === undefined || layers[i].class_name === "InputLayer") {
      const near = counted.slice(-12).map((l) => l.name).join(", ");
      throw new ConfigError(`--fine-tune-layers ${JSON.stringify(s)} is neither a count nor a layer of the base (cut at the feature layer). Layers near the top: ${near}.`);
    }
    first = i;
  }
  // The latest cut point before the first unfrozen layer.
  const points = cutPointIndices(layers);
  let cut = -1;
  for (let p = first - 1; p >= 0 && cut < 0; p--) if (points[p]) cut = p;
  if (cut < 0) throw new ConfigError(`cannot cut the base before layer ${layers[first].name}: no single tensor feeds the layers above it.`);
  const topLayers = layers.slice(cut + 1).map((l) => l.name);
  const trainableLayers = layers.slice(first).filter((l) => l.class_name !== "BatchNormalization").map((l) => l.name);
  return { cutLayer: layers[cut].name, firstUnfrozen: layers[first].name, topLayers, trainableLayers, baseLayerCount: counted.length };
}

/**
 * A copy of `cutTopologyJson` holding only the layers after `cutLayer`, which becomes an InputLayer
 * of the same name and shape `[h, w, c]`.
 */
export function topTopology(cutTopologyJson: object, cutLayer: string, cutShape: number[]): object {
  const copy = structuredClone(cutTopologyJson) as Record<string, unknown>;
  const { layers, config } = layersOf(copy);
  const at = layers.findIndex((l) => l.name === cutLayer);
  if (at < 0) throw new ConfigError(`topTopology: no layer ${cutLayer}.`);
  const input: LayerJson = {
    name: cutLayer,
    class_name: "InputLayer",
    config: { batch_input_shape: [null, ...cutShape], dtype: "float32", sparse: false, name: cutLayer },
    inbound_nodes: [],
  };
  config["layers"] = [input, ...layers.slice(at + 1)];
  config["input_layers"] = [[cutLayer, 0, 0]];
  return copy;
}

/** A MobileNetV2-style base split for fine-tuning. Dispose with {@link disposeSplit}. */
export interface SplitBase {
  plan: SplitPlan;
  /** image (preprocessed) -> activation at the cut; every weight frozen. */
  bottom: tf.LayersModel;
  /** activation at the cut -> feature layer output (4-d); the plan's trainable layers train. */
  top: tf.LayersModel;
  /** [h, w, c] of the cut activation. */
  cutShape: number[];
}

export interface SplitOptions {
  inputSize: number;
  featureLayer: string;
  /** `--fine-tune-layers`: a count or a layer name. */
  unfreeze: string;
}

/** Builds bottom and top from the pretrained weights, frozen as the plan says. */
export async function buildSplit(source: PretrainedSource, o: SplitOptions): Promise<SplitBase> {
  const { topology } = cutTopology(source.artifacts.modelTopology as object, { inputSize: o.inputSize, outputLayer: o.featureLayer });
  const plan = planSplit(topology, o.unfreeze);
  const { topology: bottomTopo } = cutTopology(source.artifacts.modelTopology as object, { inputSize: o.inputSize, outputLayer: plan.cutLayer });
  const bottom = await loadCut(source, bottomTopo);
  freezeAll(bottom);
  freezeBatchNorm(bottom);
  const cutShape = bottom.outputs[0].shape.slice(1) as number[];
  const top = await loadCut(source, topTopology(topology, plan.cutLayer, cutShape));
  applyPlan(top, plan);
  return { plan, bottom, top, cutShape };
}

/**
 * Freezes every layer of `model` one by one. `model.trainable = false` alone is not enough: a
 * model built from this one's tensors (tf.model({inputs: m.inputs, ...})) reuses its layers, whose
 * own `trainable` flags are still true.
 */
export function freezeAll(model: tf.LayersModel): void {
  model.trainable = false;
  for (const l of model.layers) l.trainable = false;
  freezeBatchNorm(model);
}

/** Sets `trainable` on every layer of `model` from the plan and freezes BatchNorm. */
export function applyPlan(model: tf.LayersModel, plan: SplitPlan): void {
  const train = new Set(plan.trainableLayers);
  for (const l of model.layers) l.trainable = train.has(l.name);
  freezeBatchNorm(model);
}

const patched = new WeakSet<object>();

/**
 * Makes every BatchNormalization layer in `model` (nested models included) frozen and always run in
 * inference mode. tfjs-layers' BatchNormalization, called with training=true, normalizes with batch
 * statistics and overwrites its moving mean/variance even when `trainable` is false (Keras >= 2.1.3
 * does not, which is what fine-tuning recipes rely on), and the shared training step calls models
 * with training=true for the head's Dropout. So the layer's `call` is wrapped to force
 * training=false; the saved model.json is unaffected. Returns the number of BatchNorm layers.
 */
export function freezeBatchNorm(model: tf.LayersModel): number {
  let n = 0;
  const visit = (layers: tf.layers.Layer[]): void => {
    for (const l of layers) {
      if (l instanceof tf.LayersModel) { visit(l.layers); continue; }
      if (l.getClassName() !== "BatchNormalization") continue;
      n++;
      l.trainable = false;
      if (patched.has(l)) continue;
      const holder = l as unknown as { call: (inputs: tf.Tensor | tf.Tensor[], kwargs: Record<string, unknown>) => tf.Tensor | tf.Tensor[] };
      const original = holder.call.bind(l);
      holder.call = (inputs, kwargs) => original(inputs, { ...kwargs, training: false });
      patched.add(l);
    }
  };
  visit(model.layers);
  return n;
}

/**
 * Copies the weights of every layer of `from` that has a same-named layer in `into` (the trained
 * top back into the full base the classifier is exported from).
 */
export function copyWeightsByName(from: tf.LayersModel, into: tf.LayersModel): number {
  let n = 0;
  const target = new Map<string, tf.layers.Layer>();
  const collect = (layers: tf.layers.Layer[]): void => {
    for (const l of layers) (l instanceof tf.LayersModel ? collect(l.layers) : target.set(l.name, l));
  };
  collect(into.layers);
  for (const l of from.layers) {
    const t = target.get(l.name);
    if (!t || l.weights.length === 0) continue;
    const w = l.getWeights();
    t.setWeights(w);
    n++;
  }
  return n;
}

/** top (+ bottom for images) + pooling + the trained head, as one trainable model. */
export function fineTuneModel(split: SplitBase, head: tf.LayersModel, pooling: Pooling, fromImages: boolean): tf.LayersModel {
  const pool = poolingLayer(pooling);
  if (!fromImages) {
    const out = head.apply(pool.apply(split.top.outputs[0])) as tf.SymbolicTensor;
    return tf.model({ inputs: split.top.inputs, outputs: out, name: "ctrain_fine_tune" });
  }
  const features = pool.apply(split.top.apply(split.bottom.outputs[0]) as tf.SymbolicTensor) as tf.SymbolicTensor;
  return tf.model({ inputs: split.bottom.inputs, outputs: head.apply(features) as tf.SymbolicTensor, name: "ctrain_fine_tune" });
}

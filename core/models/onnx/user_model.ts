/**
 * A user's ONNX model as the frozen base (`--model path/to/model.onnx`, exported from
 * PyTorch/torchvision or tf2onnx): read and checked once, its tensors listed with their shapes (one
 * probe run on onnxruntime, since a graph rarely declares intermediate shapes), and cut at the
 * feature tensor with ctrain's preprocessing in front and pooling behind, as a new graph that takes
 * the same NHWC [0, 255] pixels as every other frozen graph here.
 *
 * Inference only: an ONNX graph carries no training semantics that tfjs could differentiate, so
 * fine-tuning such a model is refused before any work (coordinator/preflight.ts).
 */
import { createHash } from "node:crypto";
import { readFile } from "node:fs/promises";
import { ConfigError } from "../../runtime/errors.js";
import type { Pooling } from "../../runtime/config.js";
import { PREPROCESSINGS, type Preprocessing } from "../model_zoo.js";
import { preprocessGraph } from "./export.js";
import { GraphBuilder } from "./graph_builder.js";
import { DataType, decodeModel, encodeModel, type ModelProto, type NodeProto, type ValueInfoProto } from "./schema.js";

/** `--model` names an ONNX file. */
export function isOnnxModelSpec(spec: string): boolean {
  return /\.onnx$/i.test(spec.trim());
}

/** A checked ONNX model file. */
export interface OnnxSource {
  kind: "onnx";
  /** The path the user gave. */
  name: string;
  model: ModelProto;
  /** sha256 of the file: part of every cache key. */
  fingerprint: string;
  /** Where the channel axis is: NCHW (PyTorch) or NHWC (tf2onnx from Keras). */
  layout: "NCHW" | "NHWC";
  /** The graph's image input. */
  inputName: string;
  channels: number;
  /** The input side when the graph fixes it; null when it takes any size (dynamic height/width). */
  fixedSize: number | null;
  /** Preprocessing the model declares in its metadata (`ctrain_preprocessing`), if any. */
  preprocessing?: Preprocessing;
  /** Float weights in the graph's initializers. */
  parameters: number;
}

/** One tensor of the graph: a node's output, with its shape at a given input size (model layout). */
export interface OnnxTensorInfo {
  name: string;
  opType: string;
  shape: number[];
}

/** Reads and checks `path`: one float image input of rank 4, a channel axis that can be told apart. */
export async function loadOnnxSource(path: string): Promise<OnnxSource> {
  let bytes: Uint8Array;
  try {
    bytes = new Uint8Array(await readFile(path));
  } catch (cause) {
    throw new ConfigError(`--model ${path}: cannot read the ONNX file (${(cause as Error).message}).`, { cause });
  }
  const model = decodeModel(bytes, `--model ${path}`);
  const g = model.graph;
  const initialized = new Set((g.initializer ?? []).map((t) => t.name));
  const inputs = g.input.filter((i) => !initialized.has(i.name));
  if (inputs.length !== 1) throw new ConfigError(`--model ${path}: the graph has ${inputs.length} inputs (${inputs.map((i) => i.name).join(", ")}); ctrain feeds exactly one image input.`);
  const input = inputs[0];
  const tt = input.type?.tensorType;
  if (tt?.elemType !== DataType.FLOAT) throw new ConfigError(`--model ${path}: input ${input.name} is not float32 (ONNX type ${tt?.elemType ?? "unknown"}); export the model with a float image input.`);
  const dims = (tt.shape?.dim ?? []).map((d) => (d.dimValue && d.dimValue > 0 ? d.dimValue : null));
  if (dims.length !== 4) throw new ConfigError(`--model ${path}: input ${input.name} has rank ${dims.length}; an image input is [batch, channels, height, width] or [batch, height, width, channels].`);
  const isCh = (d: number | null): boolean => d === 1 || d === 3;
  let layout: OnnxSource["layout"];
  if (isCh(dims[1]) && !isCh(dims[3])) layout = "NCHW";
  else if (isCh(dims[3]) && !isCh(dims[1])) layout = "NHWC";
  else throw new ConfigError(`--model ${path}: cannot tell the channel axis of input ${input.name} ${JSON.stringify(dims)} (1 or 3 channels expected first or last after the batch).`);
  const [h, w] = layout === "NCHW" ? [dims[2], dims[3]] : [dims[1], dims[2]];
  if (h !== null && w !== null && h !== w) throw new ConfigError(`--model ${path}: input ${input.name} is ${h}x${w}; ctrain feeds square images.`);
  if ((h === null) !== (w === null)) throw new ConfigError(`--model ${path}: input ${input.name} fixes one side only (${JSON.stringify(dims)}); export it with both sides fixed or both dynamic.`);
  const declared = model.metadataProps?.find((p) => p.key === "ctrain_preprocessing")?.value;
  if (declared !== undefined && !(PREPROCESSINGS as readonly string[]).includes(declared))
    throw new ConfigError(`--model ${path}: metadata ctrain_preprocessing must be one of ${PREPROCESSINGS.join(", ")}, got ${JSON.stringify(declared)}.`);
  let parameters = 0;
  for (const t of g.initializer ?? []) if (t.dataType === DataType.FLOAT) parameters += (t.dims ?? []).reduce((a, b) => a * b, 1);
  return {
    kind: "onnx", name: path, model, fingerprint: createHash("sha256").update(bytes).digest("hex"), layout, inputName: input.name,
    channels: (layout === "NCHW" ? dims[1] : dims[3])!, fixedSize: h, preprocessing: declared as Preprocessing | undefined, parameters,
  };
}

/** The input side to feed: the graph's fixed one (a different `--input-size` is refused), else `inputSize`. */
export function onnxInputSize(src: OnnxSource, inputSize: number): number {
  if (src.fixedSize !== null && src.fixedSize !== inputSize)
    throw new ConfigError(`--model ${src.name} takes ${src.fixedSize}x${src.fixedSize} images only: use --input-size ${src.fixedSize} (or export the model with dynamic height and width).`);
  return inputSize;
}

/** Input dims of the model's own input at side `size`, batch `n`. */
function inputDims(src: OnnxSource, n: number, size: number): number[] {
  return src.layout === "NCHW" ? [n, src.channels, size, size] : [n, size, size, src.channels];
}

type Ort = typeof import("onnxruntime-node");

/**
 * Every node output of the graph with its shape at input side `size` (batch 1), in graph order: the
 * graph is run once on zeros with all of them declared outputs.
 */
export async function onnxTensorShapes(ort: Ort, src: OnnxSource, size: number): Promise<OnnxTensorInfo[]> {
  const g = src.model.graph;
  const names: { name: string; opType: string }[] = [];
  const seen = new Set<string>();
  for (const n of g.node) for (const o of n.output) if (o && !seen.has(o)) { seen.add(o); names.push({ name: o, opType: n.opType }); }
  const probe: ModelProto = { ...src.model, graph: { ...g, output: names.map((n): ValueInfoProto => ({ name: n.name })) } };
  let session: import("onnxruntime-node").InferenceSession;
  try {
    session = await ort.InferenceSession.create(encodeModel(probe), { intraOpNumThreads: 1, graphOptimizationLevel: "disabled" });
  } catch (cause) {
    throw new ConfigError(`--model ${src.name}: onnxruntime cannot load the graph (${String((cause as Error).message).split("\n")[0]}).`, { cause });
  }
  try {
    const dims = inputDims(src, 1, size);
    const x = new ort.Tensor("float32", new Float32Array(dims.reduce((a, b) => a * b, 1)), dims);
    let out: Record<string, import("onnxruntime-node").Tensor>;
    try {
      out = await session.run({ [src.inputName]: x });
    } catch (cause) {
      throw new ConfigError(`--model ${src.name}: the graph does not run on a ${size}x${size} input (${String((cause as Error).message).split("\n")[0]}); check --input-size.`, { cause });
    }
    return names.filter((n) => out[n.name]).map((n) => ({ ...n, shape: out[n.name].dims.slice(1).map(Number) }));
  } finally {
    await session.release();
  }
}

/**
 * The tensor `--feature-layer auto` picks: the last 4-d feature map with a spatial extent (Keras'
 * include_top=False output; `--pooling` then pools it), else the last 4-d tensor (a global pool).
 */
export function defaultOnnxFeatureTensor(tensors: OnnxTensorInfo[]): string {
  const maps = tensors.filter((t) => t.shape.length === 3);
  if (maps.length === 0) throw new ConfigError("the ONNX graph has no 4-d feature map; name the tensor with --feature-layer (ctrain model-info --model ... lists them).");
  const spatial = maps.filter((t) => t.shape.filter((d) => d > 1).length >= 2);
  return (spatial.at(-1) ?? maps.at(-1)!).name;
}

export interface OnnxCutOptions {
  /** Graph tensor whose value is the feature. */
  featureTensor: string;
  /** Its shape (model layout, batch dropped), from {@link onnxTensorShapes}. */
  featureShape: number[];
  pooling: Pooling;
  preprocessing: Preprocessing;
  /** Input side fed to the graph. */
  size: number;
  inputDtype: "uint8" | "float32";
}

/** The cut graph: NHWC [0, 255] pixels in, [N, D] features out (NHWC order for feature maps, as tfjs gives them). */
export interface OnnxCut {
  bytes: Uint8Array;
  inputName: string;
  outputName: string;
  inputShape: number[];
  /** Per-sample feature shape in channels-last order, before flattening. */
  featureShape: number[];
}

/** Preprocessing in front, the nodes the feature tensor needs, pooling behind. */
export function cutOnnxModel(src: OnnxSource, o: OnnxCutOptions): OnnxCut {
  const g0 = src.model.graph;
  const needed = nodesFor(g0.node, o.featureTensor, src.name);
  const b = new GraphBuilder();
  b.reserve([...g0.node.flatMap((n) => [...n.output, n.name ?? ""]), ...(g0.initializer ?? []).map((t) => t.name ?? ""), ...g0.input.map((i) => i.name)]);
  const c = src.channels;
  // ctrain's images are RGB; a one-channel model gets their mean (the decoder turns gray into equal R, G, B).
  const pixels = b.input("ctrain_pixels", o.inputDtype === "uint8" ? DataType.UINT8 : DataType.FLOAT, ["N", o.size, o.size, 3]);
  const asFloat = o.inputDtype === "uint8" ? b.node("Cast", [pixels], "ctrain_pixels_f32", { to: DataType.FLOAT }) : pixels;
  const matched = c === 1 ? b.node("MatMul", [asFloat, b.constFloat("ctrain_gray", [3, 1], [1 / 3, 1 / 3, 1 / 3])], "ctrain_gray") : asFloat;
  const scaled = preprocessGraph(b, matched, o.preprocessing, "float32", c);
  const fed = src.layout === "NCHW" ? b.node("Transpose", [scaled], "ctrain_to_nchw", { perm: [0, 3, 1, 2] }) : scaled;
  const feed: NodeProto = { opType: "Identity", input: [fed], output: [src.inputName], name: b.unique("ctrain_feed") };
  const front = b.nodes.length;
  const { value, shape } = poolGraph(b, o, src);
  b.output(value, DataType.FLOAT, ["N", shape.reduce((a, x) => a * x, 1)]);
  const inputsNeeded = new Set(needed.flatMap((n) => n.input));
  const model: ModelProto = {
    ...src.model,
    irVersion: Math.max(src.model.irVersion, 7),
    producerName: "ctrain",
    graph: {
      name: `${g0.name ?? "graph"}_ctrain_cut`,
      node: [...b.nodes.slice(0, front), feed, ...needed, ...b.nodes.slice(front)],
      initializer: [...(g0.initializer ?? []).filter((t) => inputsNeeded.has(t.name ?? "")), ...b.initializers()],
      input: b.signature().inputs,
      output: b.signature().outputs,
    },
    metadataProps: [...(src.model.metadataProps ?? []), { key: "ctrain_cut", value: `${o.featureTensor}/${o.pooling}/${o.preprocessing}` }],
  };
  return { bytes: encodeModel(model), inputName: pixels, outputName: value, inputShape: [o.size, o.size, 3], featureShape: shape };
}

/** Nodes the value depends on, in graph order. */
function nodesFor(nodes: NodeProto[], value: string, path: string): NodeProto[] {
  const producer = new Map<string, number>();
  nodes.forEach((n, i) => n.output.forEach((o) => producer.set(o, i)));
  if (!producer.has(value)) throw new ConfigError(`--feature-layer ${JSON.stringify(value)} is not a tensor of ${path}; list them with: ctrain model-info --model ${path}`);
  const keep = new Set<number>();
  const stack = [value];
  while (stack.length) {
    const i = producer.get(stack.pop()!);
    if (i === undefined || keep.has(i)) continue;
    keep.add(i);
    stack.push(...nodes[i].input.filter((x) => x));
  }
  return nodes.filter((_, i) => keep.has(i));
}

/**
 * Where a 4-d tensor's channel axis is. Inside a graph it need not match the input's (tf2onnx keeps
 * NHWC inputs but runs convolutions NCHW), so it is read from the shape: the two equal sides of a
 * square image are the spatial ones. A cube ([8, 8, 8]) keeps the input's layout.
 */
export function tensorLayout(shape: number[], inputLayout: OnnxSource["layout"]): OnnxSource["layout"] {
  const [a, b, c] = shape;
  if (b === c && a !== b) return "NCHW";
  if (a === b && c !== a) return "NHWC";
  return inputLayout;
}

/** A 4-d tensor's per-sample shape as [h, w, c]. */
export function channelsLast(shape: number[], inputLayout: OnnxSource["layout"]): number[] {
  return shape.length === 3 && tensorLayout(shape, inputLayout) === "NCHW" ? [shape[1], shape[2], shape[0]] : shape;
}

/** Pooling (or flattening in channels-last order) of the feature tensor; returns the output value and per-sample feature shape. */
function poolGraph(b: GraphBuilder, o: OnnxCutOptions, src: OnnxSource): { value: string; shape: number[] } {
  const s = o.featureShape;
  if (s.length !== 3) {
    if (o.pooling !== "none") throw new ConfigError(`--pooling ${o.pooling} needs a 4-d feature map, but tensor ${o.featureTensor} has shape ${JSON.stringify([null, ...s])}; use --pooling none.`);
    return { value: b.node("Flatten", [o.featureTensor], "ctrain_features", { axis: 1 }), shape: s };
  }
  const nchw = tensorLayout(s, src.layout) === "NCHW";
  const [ch, h, w] = nchw ? s : [s[2], s[0], s[1]];
  if (o.pooling === "none") {
    const nhwc = nchw ? b.node("Transpose", [o.featureTensor], "ctrain_to_nhwc", { perm: [0, 2, 3, 1] }) : o.featureTensor;
    return { value: b.node("Flatten", [nhwc], "ctrain_features", { axis: 1 }), shape: [h, w, ch] };
  }
  const x = nchw ? o.featureTensor : b.node("Transpose", [o.featureTensor], "ctrain_pool_nchw", { perm: [0, 3, 1, 2] });
  const pooled = b.node(o.pooling === "avg" ? "GlobalAveragePool" : "GlobalMaxPool", [x], "ctrain_pool");
  return { value: b.node("Flatten", [pooled], "ctrain_features", { axis: 1 }), shape: [ch] };
}

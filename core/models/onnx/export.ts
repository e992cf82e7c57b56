/**
 * TF.js layers model -> ONNX graph, in memory, so a frozen forward pass can run on onnxruntime.
 *
 * The converter walks the built model object (its nodes by depth, each layer's config and its
 * dequantized fp32 weights), not the JSON, so whatever tfjs computes is what gets converted. Layout:
 * Keras is channels-last, ONNX's Conv and pools are NCHW; every 4-d tensor lives in the graph as NCHW
 * (one Transpose after preprocessing, one at the end), every other tensor in Keras order. Where
 * Keras semantics depend on the channel order (Flatten, Reshape, Permute, the output), the tensor is
 * transposed back to NHWC first, so features come out in exactly the order tfjs gives them.
 *
 * Preprocessing is folded into the graph: the input is [N, H, W, C] pixels in [0, 255] (uint8 or
 * float32). A BatchNormalization that follows a linear conv whose output nothing else reads is folded
 * into that conv's weights. Any layer or setting not handled here throws UnsupportedLayerError; the
 * caller runs the model on tfjs instead.
 */
import * as tf from "@tensorflow/tfjs";
import { ConfigError, UnsupportedLayerError } from "../../runtime/errors.js";
import { GraphBuilder } from "./graph_builder.js";
import { DataType } from "./schema.js";
import { LAYER_CONVERTERS, type FoldTarget, type LayerCall, type Value } from "./layers.js";

export interface OnnxExportOptions {
  /** How [0,255] pixels are scaled, folded into the graph: "tf" ([-1,1]), "caffe" (RGB->BGR minus
   *  ImageNet means), "torch" (ImageNet mean/std on [0,1]), "unit" ([0,1]: x/255), "none". */
  preprocessing: string;
  /** Element type of the graph input. Default "uint8". "float32" carries the same [0,255] scale. */
  inputDtype?: "uint8" | "float32";
}

export interface OnnxExport {
  /** Serialized ModelProto (opset {@link OPSET}, IR version 8). */
  bytes: Uint8Array;
  /** NHWC [batch (dynamic, dim_param "N"), H, W, C] pixels in [0, 255]. */
  inputName: string;
  /** [N, D] float32: equals tfjs model.predict(preprocess(x)).reshape([N, -1]). */
  outputName: string;
  /** [H, W, C]. */
  inputShape: number[];
  /** Per-sample output shape in Keras (channels-last) order, before flattening. */
  outputShape: number[];
}

/** The ONNX operator set the graphs use (Clip/Pad/Reshape take their parameters as inputs; single-axis Softmax). */
export const OPSET = 13;

/** The internals of a tfjs Container (functional model) that the walk reads. */
interface TfNode {
  outboundLayer: tf.layers.Layer;
  inputTensors: tf.SymbolicTensor[];
  outputTensors: tf.SymbolicTensor[];
}
interface TfContainer {
  name: string;
  inputs: tf.SymbolicTensor[];
  outputs: tf.SymbolicTensor[];
  nodesByDepth: Record<string, TfNode[]>;
}

/** Converts a built tfjs layers model (functional or Sequential, one image input, one output) to ONNX. */
export function layersModelToOnnx(model: tf.LayersModel, opts: OnnxExportOptions): OnnxExport {
  const inputDtype = opts.inputDtype ?? "uint8";
  if (inputDtype !== "uint8" && inputDtype !== "float32") throw new ConfigError(`ONNX export: inputDtype must be uint8 or float32, got ${JSON.stringify(inputDtype)}.`);
  if (model.inputs.length !== 1 || model.outputs.length !== 1)
    throw new UnsupportedLayerError(model.name, model.getClassName(), `the model has ${model.inputs.length} inputs and ${model.outputs.length} outputs; only one image input and one output are converted`);
  const inShape = model.inputs[0].shape.slice(1);
  const inputLayer = model.inputs[0].sourceLayer;
  if (inShape.length !== 3 || inShape.some((d) => d === null || !(d > 0)))
    throw new UnsupportedLayerError(inputLayer.name, inputLayer.getClassName(), `the input shape ${JSON.stringify(model.inputs[0].shape)} is not a fixed [batch, height, width, channels] image; rebuild the model with a fixed input size`);
  const [h, w, c] = inShape as number[];

  const cv = new Converter();
  const pixels = cv.g.input("pixels", inputDtype === "uint8" ? DataType.UINT8 : DataType.FLOAT, ["N", h, w, c]);
  const scaled = preprocessGraph(cv.g, pixels, opts.preprocessing, inputDtype, c);
  const nchw = cv.g.node("Transpose", [scaled], "input_nchw", { perm: [0, 3, 1, 2] });
  const [out] = cv.convertContainer(functionalView(model), [{ name: nchw, shape: [h, w, c] }]);

  const nhwc = out.shape.length === 3 ? cv.g.node("Transpose", [out.name], "output_nhwc", { perm: [0, 2, 3, 1] }) : out.name;
  const features = cv.g.node("Flatten", [nhwc], "features", { axis: 1 });
  const dim = out.shape.reduce((a, b) => a * b, 1);
  cv.g.output(features, DataType.FLOAT, ["N", dim]);
  const bytes = cv.g.toBytes({
    graphName: model.name,
    opset: OPSET,
    producerVersion: "1",
    docString: `TF.js layers model ${model.name}, preprocessing ${opts.preprocessing}, converted by ctrain`,
    metadata: { ctrain_preprocessing: opts.preprocessing, ctrain_layout: "NHWC" },
  });
  return { bytes, inputName: pixels, outputName: features, inputShape: [h, w, c], outputShape: out.shape };
}

/**
 * The pixel scaling of `preprocess()` in feature_model.ts, as graph nodes on NHWC float input
 * (same operations in the same order, so the numbers match to the last bit or two).
 */
export function preprocessGraph(g: GraphBuilder, pixels: string, mode: string, dtype: string, channels: number): string {
  const x = dtype === "uint8" ? g.node("Cast", [pixels], "pixels_f32", { to: DataType.FLOAT }) : pixels;
  const scalar = (hint: string, v: number): string => g.constFloat(hint, [], [v]);
  const perChannel = (hint: string, v: number[]): string => {
    if (channels !== 3) throw new ConfigError(`--preprocessing ${mode} needs 3-channel (RGB) input, but the model takes ${channels} channels; use --preprocessing tf, unit or none.`);
    return g.constFloat(hint, [3], v);
  };
  switch (mode) {
    case "tf":
      return g.node("Sub", [g.node("Div", [x, scalar("c127_5", 127.5)], "pre_div"), scalar("one", 1)], "pre_tf");
    case "caffe": {
      const bgr = g.node("Gather", [x, g.constInt64("bgr_index", [2, 1, 0])], "pre_bgr", { axis: 3 });
      return g.node("Sub", [bgr, perChannel("caffe_mean", [103.939, 116.779, 123.68])], "pre_caffe");
    }
    case "torch": {
      const unit = g.node("Div", [x, scalar("c255", 255)], "pre_unit");
      const centered = g.node("Sub", [unit, perChannel("torch_mean", [0.485, 0.456, 0.406])], "pre_center");
      return g.node("Div", [centered, perChannel("torch_std", [0.229, 0.224, 0.225])], "pre_torch");
    }
    case "unit":
      return g.node("Div", [x, scalar("c255", 255)], "pre_unit");
    case "none":
      return x;
    default:
      throw new ConfigError(`ONNX export: unknown preprocessing ${JSON.stringify(mode)}; expected tf, caffe, torch, unit or none.`);
  }
}

/** A functional view of any layers model (a Sequential's own node graph is not built until predict). */
function functionalView(model: tf.LayersModel | tf.layers.Layer): TfContainer {
  if (model instanceof tf.Sequential) return tf.model({ inputs: model.inputs, outputs: model.outputs }) as unknown as TfContainer;
  return model as unknown as TfContainer;
}

/**
 * The per-sample output shape of a layer call. tfjs leaves a Reshape's -1 (and everything after it)
 * unknown even when the input size is fixed; asking the layer again with the sizes known resolves it.
 */
function resolvedShape(layer: tf.layers.Layer, n: TfNode, ins: Value[]): (number | null)[] {
  const symbolic = n.outputTensors[0].shape.slice(1);
  if (!symbolic.some((d) => d === null)) return symbolic;
  if (layer.getClassName() === "Reshape" && ins.length === 1) {
    // tfjs keeps a -1 as null in targetShape and never resolves it.
    const target = (layer.getConfig()["targetShape"] as (number | null)[]).map((d) => (d === null || d < 0 ? null : d));
    const known = target.reduce<number>((a, d) => a * (d ?? 1), 1);
    const size = ins[0].shape.reduce((a, b) => a * b, 1);
    if (target.filter((d) => d === null).length === 1 && size % known === 0) return target.map((d) => d ?? size / known);
    return symbolic;
  }
  const shapes = ins.map((v) => [null, ...v.shape]);
  try {
    const out = layer.computeOutputShape(shapes.length === 1 ? shapes[0] : shapes) as (number | null)[];
    return Array.isArray(out[0]) ? symbolic : out.slice(1);
  } catch {
    return symbolic; // refused by the caller as "not fixed", naming the layer
  }
}

function isContainer(layer: tf.layers.Layer): boolean {
  return layer instanceof tf.LayersModel;
}

/** Walks a model's nodes in dependency order and emits ONNX nodes for each layer call. */
export class Converter {
  readonly g = new GraphBuilder();
  /** Symbolic tensor id -> the graph value that holds it. */
  private readonly values = new Map<number, Value>();
  /** Symbolic tensor id -> how many layer calls (and model outputs) read it. */
  readonly consumers = new Map<number, number>();
  /**
   * Symbolic tensor id -> the conv whose output it is, unchanged (no activation, or only folded
   * BatchNormalizations since): a BatchNormalization reading it may fold into the conv.
   */
  readonly foldable = new Map<number, FoldTarget>();

  /** Converts the layer calls of `c` with its inputs bound to `inputs`; returns its output values. */
  convertContainer(c: TfContainer, inputs: Value[]): Value[] {
    c.inputs.forEach((t, i) => this.values.set(t.id, inputs[i]));
    const depths = Object.keys(c.nodesByDepth).map(Number).sort((a, b) => b - a);
    for (const d of depths)
      for (const n of c.nodesByDepth[d]) for (const t of n.inputTensors) this.consumers.set(t.id, (this.consumers.get(t.id) ?? 0) + 1);
    for (const t of c.outputs) this.consumers.set(t.id, (this.consumers.get(t.id) ?? 0) + 1);
    for (const d of depths)
      for (const n of c.nodesByDepth[d]) {
        if (n.outboundLayer.getClassName() === "InputLayer") continue;
        const ins = n.inputTensors.map((t) => {
          const v = this.values.get(t.id);
          if (!v) throw new Error(`ONNX export: tensor ${t.name} read by ${n.outboundLayer.name} was not converted yet (depth order broken)`);
          return v;
        });
        const outs = this.convertCall(n, ins);
        n.outputTensors.forEach((t, i) => this.values.set(t.id, outs[i]));
      }
    return c.outputs.map((t) => this.values.get(t.id)!);
  }

  private convertCall(n: TfNode, ins: Value[]): Value[] {
    const layer = n.outboundLayer;
    const className = layer.getClassName();
    if (isContainer(layer)) return this.convertContainer(functionalView(layer), ins);
    const convert = LAYER_CONVERTERS[className];
    if (!convert) throw new UnsupportedLayerError(layer.name, className, "this layer type has no ONNX conversion");
    if (n.outputTensors.length !== 1) throw new UnsupportedLayerError(layer.name, className, `${n.outputTensors.length} outputs`);
    const outShape = resolvedShape(layer, n, ins);
    if (outShape.some((d) => d === null)) throw new UnsupportedLayerError(layer.name, className, `its output shape ${JSON.stringify(n.outputTensors[0].shape)} is not fixed`);
    const call: LayerCall = {
      cv: this,
      layer,
      className,
      config: layer.getConfig() as Record<string, unknown>,
      inputs: ins,
      inputIds: n.inputTensors.map((t) => t.id),
      outputId: n.outputTensors[0].id,
      outShape: outShape as number[],
    };
    return [convert(call)];
  }
}

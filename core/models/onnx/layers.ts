/**
 * How each Keras layer type becomes ONNX nodes (the table {@link LAYER_CONVERTERS}). Every rule
 * checks the settings it relies on and throws UnsupportedLayerError for any other: a layer either
 * converts exactly or not at all.
 *
 * Layout contract (see export.ts): a value whose per-sample Keras shape has 3 dims ([H, W, C]) is
 * NCHW in the graph; any other value is in Keras order.
 */
import type * as tf from "@tensorflow/tfjs";
import { UnsupportedLayerError } from "../../runtime/errors.js";
import type { FloatInit } from "./graph_builder.js";
import type { Converter } from "./export.js";

/** A graph value and its per-sample Keras shape (channels-last, no batch dimension). */
export interface Value {
  name: string;
  shape: number[];
}

/** One call of a layer in the model, with everything a rule needs. */
export interface LayerCall {
  cv: Converter;
  layer: tf.layers.Layer;
  className: string;
  config: Record<string, unknown>;
  inputs: Value[];
  /** Symbolic tensor ids of the inputs and of the output (for consumer counts and BN folding). */
  inputIds: number[];
  outputId: number;
  /** Per-sample Keras shape of the output, as tfjs computed it. */
  outShape: number[];
}

/** A linear conv or dense node whose weights a following BatchNormalization may scale. */
export interface FoldTarget {
  node: { input: string[] };
  w: FloatInit;
  b: FloatInit | undefined;
  /** Axis of `w` that indexes output channels: 0 for Conv ([Cout, Cin, kh, kw]), 1 for Gemm ([in, out]). */
  outAxis: 0 | 1;
}

type Rule = (call: LayerCall) => Value;

function unsupported(call: LayerCall, reason: string): never {
  throw new UnsupportedLayerError(call.layer.name, call.className, reason);
}

function one(call: LayerCall): Value {
  if (call.inputs.length !== 1) unsupported(call, `expected one input, got ${call.inputs.length}`);
  return call.inputs[0];
}

function isImage(v: Value): boolean {
  return v.shape.length === 3;
}

function image(call: LayerCall): Value {
  const x = one(call);
  if (!isImage(x)) unsupported(call, `expected a 4-d [batch, height, width, channels] input, got per-sample shape ${JSON.stringify(x.shape)}`);
  const fmt = call.config["dataFormat"];
  if (fmt !== undefined && fmt !== "channelsLast") unsupported(call, `data format ${String(fmt)} (only channels_last is converted)`);
  return x;
}

function pair(v: unknown, what: string, call: LayerCall): [number, number] {
  const p = typeof v === "number" ? [v, v] : Array.isArray(v) && v.length === 2 ? v : Array.isArray(v) && v.length === 1 ? [v[0], v[0]] : undefined;
  if (!p || !p.every((x) => Number.isInteger(x) && x > 0)) unsupported(call, `${what} ${JSON.stringify(v)}`);
  return p as [number, number];
}

/** The layer's weights by their short name (`kernel`, `bias`, `gamma`, `moving_mean`...), as fp32 copies. */
function weights(call: LayerCall): Map<string, { shape: number[]; data: Float32Array }> {
  const vars = call.layer.weights;
  const vals = call.layer.getWeights();
  const out = new Map<string, { shape: number[]; data: Float32Array }>();
  vars.forEach((v, i) => {
    const short = v.originalName.split("/").pop()!.replace(/_\d+$/, "");
    if (vals[i].dtype !== "float32") unsupported(call, `weight ${v.originalName} is ${vals[i].dtype}, not float32`);
    // A copy: on the cpu backend dataSync() hands out the tensor's own storage, and folding writes to it.
    out.set(short, { shape: vals[i].shape, data: Float32Array.from(vals[i].dataSync() as Float32Array) });
  });
  return out;
}

function weight(call: LayerCall, ws: ReturnType<typeof weights>, name: string): { shape: number[]; data: Float32Array } {
  const w = ws.get(name);
  if (!w) unsupported(call, `no weight named ${name} (has ${[...ws.keys()].join(", ")})`);
  return w;
}

/** `data` (row-major, `dims`) with its axes reordered: result axis i is input axis perm[i]. */
export function permute(data: Float32Array, dims: number[], perm: number[]): Float32Array {
  const outDims = perm.map((p) => dims[p]);
  const inStrides = dims.map((_, i) => dims.slice(i + 1).reduce((a, b) => a * b, 1));
  const stride = perm.map((p) => inStrides[p]);
  const out = new Float32Array(data.length);
  const idx = new Array<number>(dims.length).fill(0);
  for (let o = 0; o < out.length; o++) {
    let src = 0;
    for (let k = 0; k < idx.length; k++) src += idx[k] * stride[k];
    out[o] = data[src];
    for (let k = idx.length - 1; k >= 0; k--) {
      if (++idx[k] < outDims[k]) break;
      idx[k] = 0;
    }
  }
  return out;
}

/** TF's padding for one spatial axis: `same` puts the odd pixel at the end. */
function padsOf(call: LayerCall, padding: unknown, size: number, k: number, s: number, d: number): [number, number] {
  if (padding === "valid") return [0, 0];
  if (padding !== "same") unsupported(call, `padding ${JSON.stringify(padding)} (same and valid are converted)`);
  const eff = (k - 1) * d + 1;
  const total = Math.max((Math.ceil(size / s) - 1) * s + eff - size, 0);
  return [Math.floor(total / 2), total - Math.floor(total / 2)];
}

interface ConvSpec {
  w: Float32Array;
  wDims: number[];
  bias: Float32Array | undefined;
  group: number;
  strides: [number, number];
  dilations: [number, number];
  padding: unknown;
}

function emitConv(call: LayerCall, x: Value, spec: ConvSpec, hint: string): { out: string; target: FoldTarget } {
  const g = call.cv.g;
  const [kh, kw] = spec.wDims.slice(2);
  const [ph0, ph1] = padsOf(call, spec.padding, x.shape[0], kh, spec.strides[0], spec.dilations[0]);
  const [pw0, pw1] = padsOf(call, spec.padding, x.shape[1], kw, spec.strides[1], spec.dilations[1]);
  const w = g.floatInit(`${hint}/W`, spec.wDims, spec.w);
  const b = spec.bias ? g.floatInit(`${hint}/B`, [spec.bias.length], spec.bias) : undefined;
  const out = g.node("Conv", b ? [x.name, w.name, b.name] : [x.name, w.name], hint, {
    kernel_shape: [kh, kw],
    strides: spec.strides,
    dilations: spec.dilations,
    pads: [ph0, pw0, ph1, pw1],
    group: spec.group,
  });
  return { out, target: { node: g.nodes[g.nodes.length - 1], w, b, outAxis: 0 } };
}

/** Output of a conv/dense layer: its activation applied, or (linear) a BatchNorm fold target. */
function finishLinear(call: LayerCall, out: string, target: FoldTarget): Value {
  const v = { name: out, shape: call.outShape };
  const act = activationName(call);
  if (act === "linear") {
    call.cv.foldable.set(call.outputId, target);
    return v;
  }
  return applyActivation(call, v, act);
}

function convOptions(call: LayerCall): Pick<ConvSpec, "strides" | "dilations" | "padding"> {
  const c = call.config;
  const groups = c["groups"];
  if (groups !== undefined && groups !== 1) unsupported(call, `groups ${JSON.stringify(groups)}`);
  return { strides: pair(c["strides"] ?? 1, "strides", call), dilations: pair(c["dilationRate"] ?? 1, "dilation rate", call), padding: c["padding"] };
}

function conv2d(call: LayerCall): Value {
  const x = image(call);
  const ws = weights(call);
  const k = weight(call, ws, "kernel");
  const [kh, kw, cin, cout] = k.shape;
  const bias = call.config["useBias"] === false ? undefined : weight(call, ws, "bias").data;
  const spec = { w: permute(k.data, k.shape, [3, 2, 0, 1]), wDims: [cout, cin, kh, kw], bias, group: 1, ...convOptions(call) };
  const { out, target } = emitConv(call, x, spec, call.layer.name);
  return finishLinear(call, out, target);
}

/** Keras depthwise kernel [kh, kw, C, M] -> ONNX grouped conv weight [C*M, 1, kh, kw] (output channel c*M+m, as TF orders them). */
function depthwiseWeight(k: { shape: number[]; data: Float32Array }): { w: Float32Array; wDims: number[]; group: number } {
  const [kh, kw, c, m] = k.shape;
  return { w: permute(k.data, k.shape, [2, 3, 0, 1]), wDims: [c * m, 1, kh, kw], group: c };
}

function depthwiseConv2d(call: LayerCall): Value {
  const x = image(call);
  const ws = weights(call);
  const dw = depthwiseWeight(weight(call, ws, "depthwise_kernel"));
  const bias = call.config["useBias"] === false ? undefined : weight(call, ws, "bias").data;
  const { out, target } = emitConv(call, x, { ...dw, bias, ...convOptions(call) }, call.layer.name);
  return finishLinear(call, out, target);
}

function separableConv2d(call: LayerCall): Value {
  const x = image(call);
  const ws = weights(call);
  const dw = depthwiseWeight(weight(call, ws, "depthwise_kernel"));
  const depthwise = emitConv(call, x, { ...dw, bias: undefined, ...convOptions(call) }, `${call.layer.name}/depthwise`);
  const pk = weight(call, ws, "pointwise_kernel");
  const [, , cin, cout] = pk.shape;
  const bias = call.config["useBias"] === false ? undefined : weight(call, ws, "bias").data;
  const mid = { name: depthwise.out, shape: [0, 0, cin] };
  const pointwise = { w: permute(pk.data, pk.shape, [3, 2, 0, 1]), wDims: [cout, cin, 1, 1], bias, group: 1, strides: [1, 1] as [number, number], dilations: [1, 1] as [number, number], padding: "valid" };
  const { out, target } = emitConv(call, mid, pointwise, call.layer.name);
  return finishLinear(call, out, target);
}

function dense(call: LayerCall): Value {
  const x = one(call);
  if (x.shape.length !== 1) unsupported(call, `Dense on a per-sample shape ${JSON.stringify(x.shape)} (only on [batch, features]; flatten or pool first)`);
  const ws = weights(call);
  const k = weight(call, ws, "kernel");
  const g = call.cv.g;
  const w = g.floatInit(`${call.layer.name}/W`, k.shape, k.data);
  const b = call.config["useBias"] === false ? undefined : g.floatInit(`${call.layer.name}/B`, [k.shape[1]], weight(call, ws, "bias").data);
  const out = g.node("Gemm", b ? [x.name, w.name, b.name] : [x.name, w.name], call.layer.name);
  return finishLinear(call, out, { node: g.nodes[g.nodes.length - 1], w, b, outAxis: 1 });
}

/** Channel axis of the value in the graph: 1 for NCHW images, the last one otherwise. */
function channelAxisOf(v: Value): number {
  return isImage(v) ? 1 : v.shape.length;
}

/** A [C] per-channel vector shaped to broadcast over `v` in its graph layout. */
function perChannelDims(v: Value, c: number): number[] {
  return isImage(v) ? [c, 1, 1] : [c];
}

function batchNormalization(call: LayerCall): Value {
  const x = one(call);
  const rank = x.shape.length + 1;
  const axis = Number(call.config["axis"] ?? -1);
  const ax = axis < 0 ? axis + rank : axis;
  if (ax !== rank - 1) unsupported(call, `axis ${axis} (only the channels-last axis is converted)`);
  const ws = weights(call);
  const mean = weight(call, ws, "moving_mean").data;
  const variance = weight(call, ws, "moving_variance").data;
  const gamma = call.config["scale"] === false ? undefined : weight(call, ws, "gamma").data;
  const beta = call.config["center"] === false ? undefined : weight(call, ws, "beta").data;
  const eps = Number(call.config["epsilon"] ?? 1e-3);
  const c = mean.length;
  const scale = new Float32Array(c);
  const shift = new Float32Array(c);
  for (let i = 0; i < c; i++) {
    scale[i] = (gamma ? gamma[i] : 1) / Math.sqrt(variance[i] + eps);
    shift[i] = (beta ? beta[i] : 0) - mean[i] * scale[i];
  }
  const target = call.cv.foldable.get(call.inputIds[0]);
  if (target && call.cv.consumers.get(call.inputIds[0]) === 1) {
    foldInto(call, target, scale, shift);
    call.cv.foldable.set(call.outputId, target);
    return { name: x.name, shape: call.outShape };
  }
  const g = call.cv.g;
  const dims = perChannelDims(x, c);
  const mul = g.node("Mul", [x.name, g.constFloat(`${call.layer.name}/scale`, dims, scale)], `${call.layer.name}/mul`);
  return { name: g.node("Add", [mul, g.constFloat(`${call.layer.name}/shift`, dims, shift)], call.layer.name), shape: call.outShape };
}

/** y = scale * (W x + b) + shift, folded: W'[o] = scale[o] W[o], b'[o] = scale[o] b[o] + shift[o]. */
function foldInto(call: LayerCall, t: FoldTarget, scale: Float32Array, shift: Float32Array): void {
  const w = t.w.data;
  const cout = t.w.dims[t.outAxis];
  if (cout !== scale.length) unsupported(call, `${scale.length} channels after a layer with ${cout}`);
  if (t.outAxis === 0) {
    const per = w.length / cout;
    for (let o = 0; o < cout; o++) for (let j = 0; j < per; j++) w[o * per + j] *= scale[o];
  } else {
    for (let i = 0; i < w.length; i++) w[i] *= scale[i % cout];
  }
  if (!t.b) {
    t.b = call.cv.g.floatInit(`${call.layer.name}/B`, [cout], new Float32Array(cout));
    t.node.input.push(t.b.name);
  }
  for (let o = 0; o < cout; o++) t.b.data[o] = t.b.data[o] * scale[o] + shift[o];
}

// ---------------------------------------------------------------------------------------------
// Activations

/** The layer's `activation` setting, normalized (`hardSigmoid` -> `hardsigmoid`, `gelu_new` -> `gelunew`). */
function activationName(call: LayerCall): string {
  const a = call.config["activation"];
  if (a === undefined || a === null) return "linear";
  if (typeof a !== "string") unsupported(call, `activation ${JSON.stringify(a)}`);
  return a.toLowerCase().replace(/_/g, "");
}

/** `act` applied to `v` (layout-aware for softmax); the output keeps `v`'s shape. */
function applyActivation(call: LayerCall, v: Value, act: string): Value {
  const g = call.cv.g;
  const hint = `${call.layer.name}/${act}`;
  const x = v.name;
  const f = (v2: number): string => g.constFloat(`${hint}/c`, [], [v2]);
  let out: string;
  switch (act) {
    case "linear": return v;
    case "relu": out = g.node("Relu", [x], hint); break;
    case "relu6": out = g.node("Clip", [x, f(0), f(6)], hint); break;
    case "sigmoid": out = g.node("Sigmoid", [x], hint); break;
    case "tanh": out = g.node("Tanh", [x], hint); break;
    case "softmax": out = g.node("Softmax", [x], hint, { axis: channelAxisOf(v) }); break;
    case "logsoftmax": out = g.node("LogSoftmax", [x], hint, { axis: channelAxisOf(v) }); break;
    case "swish": case "silu": out = g.node("Mul", [x, g.node("Sigmoid", [x], `${hint}/sigmoid`)], hint); break;
    case "elu": out = g.node("Elu", [x], hint, { alpha: { float: 1 } }); break;
    case "selu": out = g.node("Selu", [x], hint, { alpha: { float: 1.6732632423543772 }, gamma: { float: 1.0507009873554805 } }); break;
    // tfjs' hard sigmoid is Keras 2's: clip(0.2 x + 0.5, 0, 1).
    case "hardsigmoid": out = g.node("HardSigmoid", [x], hint, { alpha: { float: 0.2 }, beta: { float: 0.5 } }); break;
    case "softplus": out = g.node("Softplus", [x], hint); break;
    case "softsign": out = g.node("Softsign", [x], hint); break;
    case "mish": out = g.node("Mul", [x, g.node("Tanh", [g.node("Softplus", [x], `${hint}/softplus`)], `${hint}/tanh`)], hint); break;
    case "gelu": {
      const erf = g.node("Erf", [g.node("Div", [x, f(Math.SQRT2)], `${hint}/scaled`)], `${hint}/erf`);
      const cdf = g.node("Mul", [g.node("Add", [erf, f(1)], `${hint}/add`), f(0.5)], `${hint}/cdf`);
      out = g.node("Mul", [x, cdf], hint);
      break;
    }
    case "gelunew": {
      const cube = g.node("Mul", [g.node("Pow", [x, f(3)], `${hint}/cube`), f(0.044715)], `${hint}/cube_s`);
      const inner = g.node("Mul", [g.node("Add", [x, cube], `${hint}/inner`), f(Math.sqrt(2 / Math.PI))], `${hint}/inner_s`);
      const t = g.node("Add", [g.node("Tanh", [inner], `${hint}/tanh`), f(1)], `${hint}/one_plus`);
      out = g.node("Mul", [g.node("Mul", [x, t], `${hint}/xt`), f(0.5)], hint);
      break;
    }
    default:
      unsupported(call, `activation ${JSON.stringify(call.config["activation"])}`);
  }
  return { name: out, shape: v.shape };
}

function activationLayer(call: LayerCall): Value {
  return applyActivation(call, one(call), activationName(call));
}

function reluLayer(call: LayerCall): Value {
  const x = one(call);
  const c = call.config;
  if (Number(c["negativeSlope"] ?? 0) !== 0 || Number(c["threshold"] ?? 0) !== 0) unsupported(call, "ReLU with negative_slope or threshold");
  const max = c["maxValue"];
  const g = call.cv.g;
  if (max === undefined || max === null) return { name: g.node("Relu", [x.name], call.layer.name), shape: x.shape };
  const lo = g.constFloat(`${call.layer.name}/min`, [], [0]);
  const hi = g.constFloat(`${call.layer.name}/max`, [], [Number(max)]);
  return { name: g.node("Clip", [x.name, lo, hi], call.layer.name), shape: x.shape };
}

function simpleActivationLayer(op: string, attr: (c: Record<string, unknown>) => Record<string, { float: number }>): Rule {
  return (call) => {
    const x = one(call);
    return { name: call.cv.g.node(op, [x.name], call.layer.name, attr(call.config)), shape: x.shape };
  };
}

function softmaxLayer(call: LayerCall): Value {
  const x = one(call);
  const axis = call.config["axis"] ?? -1;
  if (typeof axis !== "number") unsupported(call, `softmax over axes ${JSON.stringify(axis)}`);
  return { name: call.cv.g.node("Softmax", [x.name], call.layer.name, { axis: graphAxis(call, axis, x.shape.length + 1) }), shape: x.shape };
}

function preluLayer(call: LayerCall): Value {
  const x = one(call);
  const a = weight(call, weights(call), "alpha");
  const slope = isImage(x) ? permute(a.data, a.shape, [2, 0, 1]) : a.data;
  const dims = isImage(x) ? [a.shape[2], a.shape[0], a.shape[1]] : a.shape;
  const g = call.cv.g;
  return { name: g.node("PRelu", [x.name, g.constFloat(`${call.layer.name}/slope`, dims, slope)], call.layer.name), shape: x.shape };
}

// ---------------------------------------------------------------------------------------------
// Layout-aware shape layers

/** Keras axis (counting the batch; may be negative) -> axis of the value in the graph. */
function graphAxis(call: LayerCall, axis: number, rank: number): number {
  const a = axis < 0 ? axis + rank : axis;
  if (a <= 0 || a >= rank) unsupported(call, `axis ${axis} of a rank-${rank} tensor`);
  return rank === 4 ? [0, 2, 3, 1][a] : a;
}

/** `v` in Keras (channels-last) order. */
function toKeras(call: LayerCall, v: Value): string {
  return isImage(v) ? call.cv.g.node("Transpose", [v.name], `${call.layer.name}/nhwc`, { perm: [0, 2, 3, 1] }) : v.name;
}

/** A Keras-ordered value of per-sample shape `shape`, in graph layout. */
function fromKeras(call: LayerCall, name: string, shape: number[]): Value {
  if (shape.length !== 3) return { name, shape };
  return { name: call.cv.g.node("Transpose", [name], `${call.layer.name}/nchw`, { perm: [0, 3, 1, 2] }), shape };
}

function flattenLayer(call: LayerCall): Value {
  const x = one(call);
  return { name: call.cv.g.node("Flatten", [toKeras(call, x)], call.layer.name, { axis: 1 }), shape: call.outShape };
}

function reshapeLayer(call: LayerCall): Value {
  const x = one(call);
  const g = call.cv.g;
  // 0 keeps the (dynamic) batch dimension; the per-sample shape is the one tfjs resolved.
  const shape = g.constInt64(`${call.layer.name}/shape`, [0, ...call.outShape]);
  return fromKeras(call, g.node("Reshape", [toKeras(call, x), shape], `${call.layer.name}/reshape`), call.outShape);
}

function permuteLayer(call: LayerCall): Value {
  const x = one(call);
  const dims = call.config["dims"];
  if (!Array.isArray(dims) || dims.length !== x.shape.length) unsupported(call, `dims ${JSON.stringify(dims)}`);
  const t = call.cv.g.node("Transpose", [toKeras(call, x)], `${call.layer.name}/permute`, { perm: [0, ...(dims as number[])] });
  return fromKeras(call, t, call.outShape);
}

function zeroPadding2d(call: LayerCall): Value {
  const x = image(call);
  const p = call.config["padding"] as number[][];
  if (!Array.isArray(p) || p.length !== 2 || !p.every((q) => Array.isArray(q) && q.length === 2)) unsupported(call, `padding ${JSON.stringify(p)}`);
  const [[t, b], [l, r]] = p;
  const g = call.cv.g;
  const pads = g.constInt64(`${call.layer.name}/pads`, [0, 0, t, l, 0, 0, b, r]);
  return { name: g.node("Pad", [x.name, pads], call.layer.name), shape: call.outShape };
}

function cropping2d(call: LayerCall): Value {
  const x = image(call);
  const crop = call.config["cropping"] as number[][];
  if (!Array.isArray(crop) || crop.length !== 2 || !crop.every((q) => Array.isArray(q) && q.length === 2)) unsupported(call, `cropping ${JSON.stringify(crop)}`);
  const [[t, b], [l, r]] = crop;
  const g = call.cv.g;
  const [h, w] = x.shape;
  const inputs = [x.name, g.constInt64(`${call.layer.name}/starts`, [t, l]), g.constInt64(`${call.layer.name}/ends`, [h - b, w - r]), g.constInt64(`${call.layer.name}/axes`, [2, 3])];
  return { name: g.node("Slice", inputs, call.layer.name), shape: call.outShape };
}

function pooling2d(op: "MaxPool" | "AveragePool"): Rule {
  return (call) => {
    const x = image(call);
    const k = pair(call.config["poolSize"], "pool size", call);
    const s = pair(call.config["strides"] ?? k, "strides", call);
    const [ph0, ph1] = padsOf(call, call.config["padding"], x.shape[0], k[0], s[0], 1);
    const [pw0, pw1] = padsOf(call, call.config["padding"], x.shape[1], k[1], s[1], 1);
    // AveragePool's default count_include_pad=0 is Keras' 'same' average: padding is not counted.
    const out = call.cv.g.node(op, [x.name], call.layer.name, { kernel_shape: k, strides: s, pads: [ph0, pw0, ph1, pw1] });
    return { name: out, shape: call.outShape };
  };
}

function globalPooling2d(op: "GlobalAveragePool" | "GlobalMaxPool"): Rule {
  return (call) => {
    const x = image(call);
    if (call.config["keepDims"] === true || call.config["keepdims"] === true) unsupported(call, "keepdims");
    const g = call.cv.g;
    const pooled = g.node(op, [x.name], `${call.layer.name}/pool`);
    return { name: g.node("Flatten", [pooled], call.layer.name, { axis: 1 }), shape: call.outShape };
  };
}

function merge(op: "Add" | "Mul" | "Max" | "Min" | "Mean"): Rule {
  return (call) => {
    const ins = call.inputs;
    if (ins.length < 2) unsupported(call, `${ins.length} inputs`);
    if (ins.some((v) => v.shape.length !== ins[0].shape.length))
      unsupported(call, `inputs of different ranks (${ins.map((v) => JSON.stringify(v.shape)).join(", ")})`);
    const g = call.cv.g;
    if (op === "Add" || op === "Mul") {
      // Pairwise, left to right, as tfjs adds them.
      let acc = ins[0].name;
      for (let i = 1; i < ins.length; i++) acc = g.node(op, [acc, ins[i].name], i === ins.length - 1 ? call.layer.name : `${call.layer.name}/${i}`);
      return { name: acc, shape: call.outShape };
    }
    return { name: g.node(op, ins.map((v) => v.name), call.layer.name), shape: call.outShape };
  };
}

function concatenate(call: LayerCall): Value {
  const ins = call.inputs;
  const rank = ins[0].shape.length + 1;
  if (ins.some((v) => v.shape.length + 1 !== rank)) unsupported(call, "inputs of different ranks");
  const axis = Number(call.config["axis"] ?? -1);
  return { name: call.cv.g.node("Concat", ins.map((v) => v.name), call.layer.name, { axis: graphAxis(call, axis, rank) }), shape: call.outShape };
}

function rescaling(call: LayerCall): Value {
  const x = one(call);
  const g = call.cv.g;
  const scale = call.config["scale"];
  const offset = call.config["offset"] ?? 0;
  if (typeof scale !== "number" || typeof offset !== "number") unsupported(call, `per-channel scale/offset ${JSON.stringify([scale, offset])}`);
  const mul = g.node("Mul", [x.name, g.constFloat(`${call.layer.name}/scale`, [], [scale])], `${call.layer.name}/mul`);
  return { name: g.node("Add", [mul, g.constFloat(`${call.layer.name}/offset`, [], [offset])], call.layer.name), shape: x.shape };
}

/** Layers that compute nothing at inference time. */
function identity(call: LayerCall): Value {
  const x = one(call);
  return { name: x.name, shape: x.shape };
}

/** Keras class name -> conversion rule. Anything missing throws UnsupportedLayerError. */
export const LAYER_CONVERTERS: Record<string, Rule> = {
  Conv2D: conv2d,
  DepthwiseConv2D: depthwiseConv2d,
  SeparableConv2D: separableConv2d,
  Dense: dense,
  BatchNormalization: batchNormalization,
  Activation: activationLayer,
  ReLU: reluLayer,
  LeakyReLU: simpleActivationLayer("LeakyRelu", (c) => ({ alpha: { float: Number(c["alpha"] ?? 0.3) } })),
  ELU: simpleActivationLayer("Elu", (c) => ({ alpha: { float: Number(c["alpha"] ?? 1) } })),
  ThresholdedReLU: simpleActivationLayer("ThresholdedRelu", (c) => ({ alpha: { float: Number(c["theta"] ?? 1) } })),
  Softmax: softmaxLayer,
  PReLU: preluLayer,
  ZeroPadding2D: zeroPadding2d,
  Cropping2D: cropping2d,
  MaxPooling2D: pooling2d("MaxPool"),
  AveragePooling2D: pooling2d("AveragePool"),
  GlobalAveragePooling2D: globalPooling2d("GlobalAveragePool"),
  GlobalMaxPooling2D: globalPooling2d("GlobalMaxPool"),
  Add: merge("Add"),
  Multiply: merge("Mul"),
  Average: merge("Mean"),
  Maximum: merge("Max"),
  Minimum: merge("Min"),
  Concatenate: concatenate,
  Flatten: flattenLayer,
  Reshape: reshapeLayer,
  Permute: permuteLayer,
  Rescaling: rescaling,
  Dropout: identity,
  SpatialDropout1D: identity,
  SpatialDropout2D: identity,
  GaussianNoise: identity,
  GaussianDropout: identity,
  AlphaDropout: identity,
};

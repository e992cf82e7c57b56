/**
 * Static int8 quantization of a float32 ONNX graph, in QDQ form: the form onnxruntime's graph
 * optimizer fuses into integer kernels (QLinearConv, QLinearAdd, QGemm/QLinearMatMul), which use
 * VNNI where the CPU has it.
 *
 * - Weights of Conv (per output channel) and of Gemm / MatMul with a constant weight (per tensor)
 *   become symmetric int8 initializers behind a DequantizeLinear; a bias becomes int32 at scale
 *   input scale x weight scale, as the integer kernels take it.
 * - Activations -- every float input and output of those nodes, and of an Add of two activations (a
 *   residual) -- get one uint8 QuantizeLinear -> DequantizeLinear pair after their producer; every
 *   reader takes the dequantized value. Scales and zero points come from calibration: the float
 *   graph runs on real images with those tensors as extra outputs, and each range is min..max over
 *   all calibration images (widened to include 0, so that 0 -- padding, ReLU -- is exact).
 * - Bias correction: each conv's bias absorbs the mean shift its weight rounding causes, from the
 *   per-channel input means of calibration (MobileNetV2 out_relu at 96 px: smallest row cosine with
 *   fp32 0.878 without, 0.980 with).
 * - A Relu, or a Clip from 0 (ReLU6), whose input only a quantized node reads is dropped: the output
 *   is quantized with the activation's own range, whose zero point is 0 and whose top is at most the
 *   clip's maximum, so QuantizeLinear's saturation applies the clip exactly.
 * - A zero Pad in front of a conv becomes the conv's padding; any other zero pad of a quantized
 *   tensor runs on the uint8 values. Float pads between a dequantize and a quantize cost as much as
 *   all the integer convs together (MobileNetV2 at 224, profiled).
 *
 * Everything else (preprocessing, transposes, pooling) stays float32. uint8 activations with int8
 * weights (u8s8) is onnxruntime's fast x86 path. x86 CPUs without VNNI (AVX2 only) add pairs of
 * u8 x s8 products in int16 there, which saturates with 8-bit weights (2 x 255 x 127 > 32767):
 * on such a CPU the weights are quantized to 7 bits (+-63; onnxruntime's `reduce_range` advice),
 * which cannot saturate. Measured on an AVX2-only EPYC, MobileNetV2 at 96: block_12_add's smallest
 * row cosine to fp32 0.940 with 8-bit weights, above 0.98 with 7-bit. {@link defaultWeightBits}
 * picks by the CPU; the extractor's fingerprint names the choice, so features quantized either way
 * never mix in one cache.
 */
import { readFileSync } from "node:fs";
import { ConfigError } from "../../runtime/errors.js";
import { DataType, decodeModel, encodeModel, tensorValues, type GraphProto, type ModelProto, type NodeProto, type TensorProto } from "./schema.js";

export interface QuantizeOptions {
  /** onnxruntime intra-op threads for the calibration runs. Default 1. */
  threads?: number;
  /**
   * How an activation's range is taken from the calibration runs. `minmax` (default): the smallest and largest
   * value seen. `percentile`: per batch, the values at {@link percentile} % from either
   * end, averaged over batches -- a few outliers then cost a little clipping instead of the
   * resolution of every other value (worse on MobileNetV2: row cosine 0.943 at 99.99 % vs 0.952 minmax, out_relu@224, before bias correction).
   */
  method?: "minmax" | "percentile";
  /** Percentile of `method: "percentile"`, in (50, 100]. Default 99.99. */
  percentile?: number;
  /** Bits of the int8 weights: 8 (+-127) or 7 (+-63, for CPUs whose u8s8 kernels saturate). Default {@link defaultWeightBits}. */
  weightBits?: WeightBits;
}

export type WeightBits = 7 | 8;

/**
 * 8 where onnxruntime's u8s8 kernels cannot saturate (VNNI, AVX512-VNNI or AMX on x86; any other
 * architecture), 7 on an x86 CPU with neither (read from /proc/cpuinfo; 8 when it cannot be read).
 */
export function defaultWeightBits(cpuinfo: string | null = readCpuinfo()): WeightBits {
  if (process.arch !== "x64" && process.arch !== "ia32") return 8;
  const flags = cpuinfo === null ? undefined : /^flags\s*:(.*)$/m.exec(cpuinfo)?.[1]?.trim().split(/\s+/);
  if (!flags) return 8;
  return flags.some((f) => f === "avx512_vnni" || f === "avx_vnni" || f === "amx_int8") ? 8 : 7;
}

function readCpuinfo(): string | null {
  try {
    return readFileSync("/proc/cpuinfo", "utf8");
  } catch {
    return null;
  }
}

/** What a quantization changed, for logs and tests. */
export interface QuantizedGraph {
  /** The serialized QDQ model; same inputs and outputs as the float graph. */
  bytes: Uint8Array;
  /** Quantized nodes by op type (`Conv`, `Gemm`, `MatMul`, `Add`). */
  nodes: Record<string, number>;
  /** Activation tensors given a QuantizeLinear/DequantizeLinear pair. */
  activations: number;
  /** Images the ranges were measured on. */
  calibrationImages: number;
  /** Bits of the weights (see {@link QuantizeOptions.weightBits}). */
  weightBits: WeightBits;
}

/** What calibration measured of a tensor: its range, and for a 4-d (NCHW) one the sums per channel. */
interface Range {
  min: number;
  max: number;
  channelSums?: Float64Array;
  /** Values per channel summed. */
  count?: number;
}

/** A uint8 range: value = scale * (q - zeroPoint). */
interface QParams {
  scale: number;
  zeroPoint: number;
}

const WEIGHT_OPS = new Set(["Conv", "Gemm", "MatMul"]);

/**
 * Quantizes `bytes` (a float32 graph with one image input, NHWC or NCHW, uint8 or float32) to int8
 * QDQ form. `calibration`: batches of pixels in the graph's input layout and value range (for
 * ctrain's graphs NHWC [0, 255]), each a whole number of images; a few hundred real images from the
 * training data are enough. Throws ConfigError when the graph cannot be quantized.
 */
export async function quantizeGraph(bytes: Uint8Array, calibration: (Uint8Array | Float32Array)[], opts: QuantizeOptions = {}): Promise<QuantizedGraph> {
  const model = decodeModel(bytes, "the graph to quantize");
  const opset = model.opsetImport.find((o) => !o.domain || o.domain === "ai.onnx")?.version ?? 0;
  if (opset < 13) throw new ConfigError(`int8 quantization needs ONNX opset >= 13 (per-channel DequantizeLinear), the graph has opset ${opset}; export the model again with opset 13 or later, or use fp32.`);
  if (calibration.length === 0) throw new ConfigError("int8 quantization needs calibration images: give at least one batch of real training images.");
  const g = model.graph;
  foldPadsIntoConvs(g);
  const plan = planQuantization(g);
  const method = opts.method ?? "minmax";
  const percentile = opts.percentile ?? 99.99;
  if (!(percentile > 50 && percentile <= 100)) throw new ConfigError(`int8 quantization: percentile must be in (50, 100], got ${percentile}.`);
  const ranges = await calibrate(model, [...plan.tensors], calibration, { threads: opts.threads ?? 1, tail: method === "minmax" ? 0 : 1 - percentile / 100 });
  const images = calibration.reduce((a, b) => a + b.length, 0) / inputSize(g);
  const weightBits = opts.weightBits ?? defaultWeightBits();
  if (weightBits !== 7 && weightBits !== 8) throw new ConfigError(`int8 quantization: weightBits must be 7 or 8, got ${String(weightBits)}.`);
  const stats = rewrite(g, plan, ranges, weightBits);
  return { bytes: encodeModel(model), nodes: stats.nodes, activations: stats.activations, calibrationImages: images, weightBits };
}

interface Plan {
  /** Nodes to quantize. */
  nodes: NodeProto[];
  /** Float activation tensors to quantize (inputs and outputs of `nodes`). */
  tensors: Set<string>;
  /** Relu/Clip nodes that fold into the node before them: the activation node -> that node. */
  folds: Map<NodeProto, NodeProto>;
  /** Zero pads whose output is quantized: they run on uint8, so their input is quantized too. */
  pads: Set<NodeProto>;
}

function indexGraph(g: GraphProto): { inits: Map<string, TensorProto>; consumers: Map<string, NodeProto[]>; outputs: Set<string> } {
  const inits = new Map((g.initializer ?? []).map((t) => [t.name ?? "", t]));
  const consumers = new Map<string, NodeProto[]>();
  for (const n of g.node) for (const i of n.input) if (i) consumers.set(i, [...(consumers.get(i) ?? []), n]);
  return { inits, consumers, outputs: new Set(g.output.map((o) => o.name)) };
}

function attr(n: NodeProto, name: string): number | undefined {
  const a = n.attribute?.find((x) => x.name === name);
  return a === undefined ? undefined : a.type === 1 ? a.f : a.i;
}

/** Which nodes and tensors to quantize; float32 weights only (checked here), float activations (checked at calibration). */
function planQuantization(g: GraphProto): Plan {
  const { inits, consumers, outputs } = indexGraph(g);
  const isFloatInit = (name: string | undefined): boolean => !!name && inits.get(name)?.dataType === DataType.FLOAT;
  const nodes: NodeProto[] = [];
  for (const n of g.node) {
    if (n.domain) continue;
    if (n.opType === "Conv" && !inits.has(n.input[0]) && isFloatInit(n.input[1]) && (!n.input[2] || isFloatInit(n.input[2]))) nodes.push(n);
    else if (n.opType === "Gemm" && !inits.has(n.input[0]) && isFloatInit(n.input[1]) && (!n.input[2] || isFloatInit(n.input[2])) && (attr(n, "alpha") ?? 1) === 1 && (attr(n, "beta") ?? 1) === 1 && !attr(n, "transA")) nodes.push(n);
    else if (n.opType === "MatMul" && !inits.has(n.input[0]) && isFloatInit(n.input[1])) nodes.push(n);
    else if (n.opType === "Add" && n.input.length === 2 && n.input.every((i) => !inits.has(i) && !constantNode(g, i))) nodes.push(n);
  }
  const folds = new Map<NodeProto, NodeProto>();
  const tensors = new Set<string>();
  for (const n of nodes) {
    tensors.add(n.input[0]);
    if (n.opType === "Add") tensors.add(n.input[1]);
    const next = consumers.get(n.output[0]) ?? [];
    const act = next.length === 1 && !outputs.has(n.output[0]) ? next[0] : undefined;
    if (act && isZeroClip(act, inits) && !outputs.has(act.output[0])) {
      folds.set(act, n);
      tensors.add(act.output[0]);
    } else tensors.add(n.output[0]);
  }
  const pads = new Set<NodeProto>();
  for (const n of g.node) {
    if (!isZeroPad(n) || !tensors.has(n.output[0]) || outputs.has(n.output[0]) || inits.has(n.input[0])) continue;
    pads.add(n);
    tensors.add(n.input[0]);
  }
  return { nodes, tensors, folds, pads };
}

/**
 * A zero Pad of the spatial axes whose only reader is a Conv becomes that Conv's `pads` (Keras'
 * ZeroPadding2D before each strided conv): the integer conv pads with the zero point for free,
 * where a separate uint8 Pad costs a tenth of the int8 time.
 */
function foldPadsIntoConvs(g: GraphProto): void {
  const { inits, consumers, outputs } = indexGraph(g);
  const dropped = new Set<NodeProto>();
  for (const pad of g.node) {
    const readers = consumers.get(pad.output[0]) ?? [];
    const conv = readers[0];
    const amounts = pad.input[1] ? inits.get(pad.input[1]) : undefined;
    if (!isZeroPad(pad) || readers.length !== 1 || conv.opType !== "Conv" || conv.domain || outputs.has(pad.output[0]) || amounts?.dataType !== DataType.INT64) continue;
    const p = Array.from(tensorValues(amounts) as BigInt64Array, Number);
    const autoPad = conv.attribute?.find((a) => a.name === "auto_pad");
    if (p.length !== 8 || p[0] || p[1] || p[4] || p[5] || (autoPad && new TextDecoder().decode(autoPad.s) !== "NOTSET")) continue;
    const attrs = conv.attribute ?? [];
    const old = attrs.find((a) => a.name === "pads")?.ints ?? [0, 0, 0, 0];
    const pads = [old[0] + p[2], old[1] + p[3], old[2] + p[6], old[3] + p[7]];
    conv.attribute = [...attrs.filter((a) => a.name !== "pads"), { name: "pads", type: 7, ints: pads }];
    conv.input[0] = pad.input[0];
    dropped.add(pad);
  }
  g.node = g.node.filter((n) => !dropped.has(n));
}

/** A constant-mode Pad with the default pad value 0 (ZeroPadding2D). */
function isZeroPad(n: NodeProto): boolean {
  if (n.domain || n.opType !== "Pad" || n.input[2] || n.input.length > 3) return false;
  const mode = n.attribute?.find((a) => a.name === "mode");
  return !mode || new TextDecoder().decode(mode.s) === "constant";
}

function constantNode(g: GraphProto, value: string): boolean {
  return g.node.some((n) => n.opType === "Constant" && n.output[0] === value);
}

/** Relu, or Clip whose minimum is a constant 0 (ReLU6 and ReLU(max_value)). */
function isZeroClip(n: NodeProto, inits: Map<string, TensorProto>): boolean {
  if (n.domain) return false;
  if (n.opType === "Relu") return true;
  if (n.opType !== "Clip" || !n.input[1]) return false;
  const lo = inits.get(n.input[1]);
  return lo?.dataType === DataType.FLOAT && (tensorValues(lo) as Float32Array)[0] === 0;
}

function inputSize(g: GraphProto): number {
  const dims = g.input.find((i) => !(g.initializer ?? []).some((t) => t.name === i.name))?.type?.tensorType?.shape?.dim ?? [];
  return dims.slice(1).reduce((a, d) => a * (d.dimValue || 1), 1);
}

/** min..max of each tensor over all calibration batches, from runs of the float graph with the tensors as extra outputs. */
async function calibrate(model: ModelProto, tensors: string[], batches: (Uint8Array | Float32Array)[], o: { threads: number; tail: number }): Promise<Map<string, Range>> {
  const { loadOnnxRuntime } = await import("../inference_engine.js");
  const ort = await loadOnnxRuntime();
  const g = model.graph;
  const inits = new Set((g.initializer ?? []).map((t) => t.name));
  const input = g.input.find((i) => !inits.has(i.name));
  if (!input) throw new ConfigError("int8 quantization: the graph has no input.");
  const dims = (input.type?.tensorType?.shape?.dim ?? []).slice(1).map((d) => d.dimValue ?? 0);
  if (dims.length === 0 || dims.some((d) => !(d > 0))) throw new ConfigError(`int8 quantization: the graph input ${input.name} has no fixed per-image shape (${JSON.stringify(dims)}); cut the graph at a fixed size first.`);
  const per = dims.reduce((a, b) => a * b, 1);
  const float = input.type?.tensorType?.elemType === DataType.FLOAT;
  const outputs = tensors.filter((t) => t !== input.name);
  // Untyped extra outputs: onnxruntime takes the type its inference gives the value.
  const probe: ModelProto = { ...model, graph: { ...g, output: [...g.output, ...outputs.filter((t) => !g.output.some((o) => o.name === t)).map((name) => ({ name }))] } };
  const session = await ort.InferenceSession.create(encodeModel(probe), { intraOpNumThreads: o.threads, interOpNumThreads: 1, graphOptimizationLevel: "basic" });
  const ranges = new Map<string, Range>();
  const widen = (name: string, data: ArrayLike<number>, shape?: readonly number[]): void => {
    const r = ranges.get(name) ?? { min: 0, max: 0 };
    const [lo, hi] = o.tail > 0 ? tails(data, o.tail) : extremes(data);
    // minmax: the running extremes; percentile: a running sum, divided by the batch count below.
    const next: Range = o.tail > 0 ? { min: r.min + lo, max: r.max + hi } : { min: Math.min(r.min, lo), max: Math.max(r.max, hi) };
    if (shape?.length === 4) {
      const [, c, h, w] = shape;
      next.channelSums = r.channelSums ?? new Float64Array(c);
      next.count = (r.count ?? 0) + data.length / c;
      for (let i = 0; i < data.length; i++) next.channelSums[Math.floor(i / (h * w)) % c] += data[i];
    }
    ranges.set(name, next);
  };
  try {
    for (const px of batches) {
      if (px.length === 0 || px.length % per !== 0) throw new ConfigError(`int8 calibration: a batch of ${px.length} values is not a whole number of ${JSON.stringify(dims)} images.`);
      const data = float ? (px instanceof Float32Array ? px : Float32Array.from(px)) : px instanceof Uint8Array ? px : Uint8Array.from(px);
      const result = await session.run({ [input.name]: new ort.Tensor(float ? "float32" : "uint8", data, [px.length / per, ...dims]) }, outputs);
      if (tensors.includes(input.name)) widen(input.name, data);
      for (const name of outputs) {
        const t = result[name];
        // A tensor that is not float (an integer shape computation) is left alone.
        if (t.type === "float32") widen(name, t.data as Float32Array, t.dims);
        else ranges.delete(name);
        t.dispose();
      }
    }
  } finally {
    await session.release();
  }
  if (o.tail > 0) for (const r of ranges.values()) [r.min, r.max] = [r.min / batches.length, r.max / batches.length];
  return ranges;
}

function extremes(data: ArrayLike<number>): [number, number] {
  let lo = Infinity, hi = -Infinity;
  for (let i = 0; i < data.length; i++) {
    const v = data[i];
    if (v < lo) lo = v;
    if (v > hi) hi = v;
  }
  return [lo, hi];
}

/** The values `tail` (a fraction) from either end, on an even sample of at most 2^18 values. */
function tails(data: ArrayLike<number>, tail: number): [number, number] {
  const step = Math.max(1, Math.floor(data.length / 2 ** 18));
  const sample = new Float32Array(Math.ceil(data.length / step));
  for (let i = 0, k = 0; i < data.length; i += step, k++) sample[k] = data[i];
  sample.sort();
  const at = (q: number): number => sample[Math.min(sample.length - 1, Math.max(0, Math.round(q * (sample.length - 1))))];
  return [at(tail), at(1 - tail)];
}

/** uint8 parameters of a range that contains 0 (so that 0 is exactly representable). */
export function activationParams(min: number, max: number): QParams {
  const lo = Math.min(0, min), hi = Math.max(0, max);
  if (!(hi > lo)) return { scale: 1, zeroPoint: 0 };
  const scale = Math.fround((hi - lo) / 255);
  return { scale, zeroPoint: Math.min(255, Math.max(0, Math.round(-lo / scale))) };
}

/**
 * Symmetric int8 weights: one scale per slice along `axis` (or one for all with axis -1), at least
 * `minScales` (one per slice).
 */
export function quantizeWeights(w: Float32Array, dims: number[], axis: number, minScales?: Float32Array, bits: WeightBits = 8): { q: Int8Array; scales: Float32Array } {
  const top = bits === 7 ? 63 : 127;
  const channels = axis < 0 ? 1 : dims[axis];
  const inner = axis < 0 ? 1 : dims.slice(axis + 1).reduce((a, b) => a * b, 1);
  const channelOf = (i: number): number => (axis < 0 ? 0 : Math.floor(i / inner) % channels);
  const absMax = new Float32Array(channels);
  for (let i = 0; i < w.length; i++) absMax[channelOf(i)] = Math.max(absMax[channelOf(i)], Math.abs(w[i]));
  const scales = absMax.map((m, c) => Math.max(m > 0 ? m / top : 1, minScales?.[c] ?? 0));
  const q = new Int8Array(w.length);
  for (let i = 0; i < w.length; i++) q[i] = Math.max(-top, Math.min(top, Math.round(w[i] / scales[channelOf(i)])));
  return { q, scales };
}

/** Ops that only move or drop values (with a zero pad): their output can keep their input's range. */
const MOVE_OPS = new Set(["Pad", "MaxPool", "Transpose", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Slice"]);

/**
 * A quantized tensor made by a move op from another quantized tensor takes that tensor's parameters:
 * DequantizeLinear -> op -> QuantizeLinear with one scale and zero point is what onnxruntime runs
 * on uint8 directly (ZeroPadding2D before a strided conv, for one). A zero pad stays exact: every
 * range contains 0.
 */
function shareThroughMoves(g: GraphProto, params: Map<string, QParams>): void {
  for (const n of g.node) {
    const src = params.get(n.input[0]);
    if (!src || n.domain || !MOVE_OPS.has(n.opType) || !params.has(n.output[0])) continue;
    if (n.opType === "Pad" && !isZeroPad(n)) continue;
    params.set(n.output[0], src);
  }
}

function bytesOf(a: Float32Array | Int8Array | Int32Array | Uint8Array): Uint8Array {
  return new Uint8Array(a.buffer.slice(a.byteOffset, a.byteOffset + a.byteLength));
}

/** Fresh names and new initializers for one rewrite. */
class Additions {
  readonly initializers: TensorProto[] = [];
  private readonly taken: Set<string>;
  constructor(g: GraphProto) {
    this.taken = new Set([...g.node.flatMap((n) => [...n.input, ...n.output, n.name ?? ""]), ...(g.initializer ?? []).map((t) => t.name ?? "")]);
  }
  fresh(base: string): string {
    let name = base;
    for (let k = 1; this.taken.has(name); k++) name = `${base}_${k}`;
    this.taken.add(name);
    return name;
  }
  init(hint: string, dataType: number, dims: number[], data: Float32Array | Int8Array | Int32Array | Uint8Array): string {
    const name = this.fresh(hint);
    this.initializers.push({ name, dims, dataType, rawData: bytesOf(data) });
    return name;
  }
}

/** Builds the QDQ graph in place from the float graph, the plan and the measured ranges. */
function rewrite(g: GraphProto, plan: Plan, ranges: Map<string, Range>, bits: WeightBits): { nodes: Record<string, number>; activations: number } {
  const add = new Additions(g);
  const foldOf = new Map([...plan.folds].map(([act, n]) => [n, act]));
  const outOf = (n: NodeProto): string => foldOf.get(n)?.output[0] ?? n.output[0];
  const actInputs = (n: NodeProto): string[] => (n.opType === "Add" ? n.input.slice(0, 2) : [n.input[0]]);
  const kept = plan.nodes.filter((n) => [...actInputs(n), outOf(n)].every((t) => ranges.has(t)));
  const tensors = new Set(kept.flatMap((n) => [...actInputs(n), outOf(n)]));
  const pads = [...plan.pads].filter((n) => tensors.has(n.output[0]) && ranges.has(n.input[0]));
  for (const n of pads) tensors.add(n.input[0]);
  const params = new Map([...tensors].map((t) => [t, activationParams(ranges.get(t)!.min, ranges.get(t)!.max)]));
  shareThroughMoves(g, params);
  const counts: Record<string, number> = {};
  const front: NodeProto[] = [];
  const replaced = new Set<string>();
  for (const n of kept) {
    counts[n.opType] = (counts[n.opType] ?? 0) + 1;
    const act = foldOf.get(n);
    if (act) n.output[0] = act.output[0];
    if (WEIGHT_OPS.has(n.opType)) front.push(...quantizeWeightInputs(n, g, params.get(n.input[0])!.scale, ranges.get(n.input[0])!, add, replaced, bits));
  }
  const folded = new Set([...plan.folds].filter(([, n]) => kept.includes(n)).map(([act]) => act));
  g.node = insertQdq(g, { tensors, params, pads: new Set(pads), folded, front }, add);
  const used = new Set(g.node.flatMap((n) => n.input));
  g.initializer = [...(g.initializer ?? []).filter((t) => !replaced.has(t.name ?? "") || used.has(t.name ?? "")), ...add.initializers];
  g.input = g.input.filter((i) => !replaced.has(i.name) || used.has(i.name));
  return { nodes: counts, activations: tensors.size };
}

/**
 * Replaces the float weight (and bias) of a Conv/Gemm/MatMul by int8 (int32) initializers behind
 * DequantizeLinear nodes, which are returned; `sx` is the scale of the node's quantized input.
 */
function quantizeWeightInputs(n: NodeProto, g: GraphProto, sx: number, input: Range, add: Additions, replaced: Set<string>, bits: WeightBits): NodeProto[] {
  const inits = new Map((g.initializer ?? []).map((t) => [t.name ?? "", t]));
  const nodes: NodeProto[] = [];
  const dq = (input: string[], hint: string, axis: number): string => {
    const out = add.fresh(`${hint}/dequantized`);
    nodes.push({ opType: "DequantizeLinear", input, output: [out], name: out, attribute: axis < 0 ? [] : [{ name: "axis", type: 2, i: axis }] });
    return out;
  };
  // Per output channel for Conv; per tensor for Gemm/MatMul, which every integer kernel takes.
  const axis = n.opType === "Conv" ? 0 : -1;
  const w = inits.get(n.input[1])!;
  const bias = n.input[2] ? (tensorValues(inits.get(n.input[2])!) as Float32Array) : undefined;
  // A channel whose weights are nearly 0 but whose bias is not (a dead channel after BatchNorm
  // folding: MobileNetV2 has them) would need a bias beyond int32 at input scale x weight scale; its
  // weight scale is raised instead, to keep the bias within 2^30 (headroom for the accumulation).
  const minScales = bias && Float32Array.from(axis < 0 ? [bias.reduce((a, v) => Math.max(a, Math.abs(v)), 0)] : bias, (v) => Math.abs(v) / (sx * 2 ** 30));
  const { q, scales } = quantizeWeights(tensorValues(w) as Float32Array, w.dims ?? [], axis, minScales, bits);
  const sdims = axis < 0 ? [] : [scales.length];
  const wScale = add.init(`${w.name}/scale`, DataType.FLOAT, sdims, scales);
  const wZero = add.init(`${w.name}/zero_point`, DataType.INT8, sdims, new Int8Array(scales.length));
  replaced.add(n.input[1]);
  n.input[1] = dq([add.init(`${w.name}/int8`, DataType.INT8, w.dims ?? [], q), wScale, wZero], w.name ?? "W", axis);
  if (n.input[2]) {
    const b = inits.get(n.input[2])!;
    const bScales = scales.map((s) => Math.fround(sx * s));
    const corrected = axis === 0 && input.channelSums ? correctBias(bias!, tensorValues(w) as Float32Array, q, scales, w.dims ?? [], input) : bias!;
    const bq = Int32Array.from(corrected, (v, i) => Math.round(v / bScales[axis < 0 ? 0 : i]));
    const bScale = add.init(`${b.name}/scale`, DataType.FLOAT, sdims, bScales);
    replaced.add(n.input[2]);
    n.input[2] = dq([add.init(`${b.name}/int32`, DataType.INT32, b.dims ?? [], bq), bScale], b.name ?? "B", axis);
  }
  return nodes;
}

/**
 * Bias correction (Nagel et al. 2019, "Data-free quantization"): the rounding of a channel's
 * weights shifts its output by (Wq - W) . E[x] on average; that shift, with E[x] per input channel
 * from calibration, is taken off the bias. It matters where a few large weights cancel (MobileNetV2's
 * first depthwise conv).
 */
function correctBias(bias: Float32Array, w: Float32Array, q: Int8Array, scales: Float32Array, dims: number[], input: Range): Float32Array {
  const [m, cg] = dims;
  const k = dims.slice(2).reduce((a, b) => a * b, 1);
  const c = input.channelSums!.length;
  const groups = c / cg;
  if (!Number.isInteger(groups) || m % groups !== 0) return bias;
  const out = Float32Array.from(bias);
  for (let o = 0; o < m; o++) {
    const first = Math.floor(o / (m / groups)) * cg;
    let shift = 0;
    for (let ci = 0; ci < cg; ci++) {
      const mean = input.channelSums![first + ci] / input.count!;
      for (let j = 0; j < k; j++) {
        const i = (o * cg + ci) * k + j;
        shift += (q[i] * scales[o] - w[i]) * mean;
      }
    }
    out[o] -= shift;
  }
  return out;
}

interface QdqPlan {
  tensors: Set<string>;
  params: Map<string, QParams>;
  /** Zero pads run on the uint8 values (a float pad between a dequantize and a quantize costs as much as the conv after it). */
  pads: Set<NodeProto>;
  /** Activation nodes folded into the node before them (dropped). */
  folded: Set<NodeProto>;
  /** Weight dequantizers, first in the node list. */
  front: NodeProto[];
}

/** The node list with one QuantizeLinear -> DequantizeLinear pair per tensor, right after its producer; readers take the dequantized value. */
function insertQdq(g: GraphProto, p: QdqPlan, add: Additions): NodeProto[] {
  const renamed = new Map<string, string>();
  const quantized = new Map<string, { q: string; scale: string; zero: string }>();
  const keep = new Set<NodeProto>();
  const pairFor = (t: string): NodeProto[] => {
    const { scale: s, zeroPoint } = p.params.get(t)!;
    const scale = add.init(`${t}/scale`, DataType.FLOAT, [], Float32Array.of(s));
    const zero = add.init(`${t}/zero_point`, DataType.UINT8, [], Uint8Array.of(zeroPoint));
    const q = add.fresh(`${t}/quantized`), d = add.fresh(`${t}/dequantized`);
    renamed.set(t, d);
    quantized.set(t, { q, scale, zero });
    const quantizer: NodeProto = { opType: "QuantizeLinear", input: [t, scale, zero], output: [q], name: q, attribute: [] };
    keep.add(quantizer);
    return [quantizer, { opType: "DequantizeLinear", input: [q, scale, zero], output: [d], name: d, attribute: [] }];
  };
  const nodes: NodeProto[] = [...p.front];
  for (const input of g.input) if (p.tensors.has(input.name)) nodes.push(...pairFor(input.name));
  for (const n of g.node) {
    if (p.folded.has(n)) continue;
    if (p.pads.has(n)) {
      // uint8 in, uint8 out, padded with the zero point (the code of 0.0); both sides share one range.
      const src = quantized.get(n.input[0])!;
      const out = n.output[0];
      const q = add.fresh(`${out}/quantized`), d = add.fresh(`${out}/dequantized`);
      n.input = [src.q, n.input[1], src.zero];
      n.output = [q];
      keep.add(n);
      renamed.set(out, d);
      nodes.push(n, { opType: "DequantizeLinear", input: [q, src.scale, src.zero], output: [d], name: d, attribute: [] });
      continue;
    }
    nodes.push(n);
    for (const o of n.output) if (p.tensors.has(o)) nodes.push(...pairFor(o));
  }
  // Graph outputs keep the float value (they are not node inputs, so nothing renames them).
  for (const n of nodes) if (!keep.has(n)) n.input = n.input.map((i) => renamed.get(i) ?? i);
  // A dequantized value nobody reads (a pad's input): onnxruntime would still compute it.
  const read = new Set([...nodes.flatMap((n) => n.input), ...g.output.map((o) => o.name)]);
  const dequantized = new Set(renamed.values());
  return nodes.filter((n) => !(n.opType === "DequantizeLinear" && dequantized.has(n.output[0]) && !read.has(n.output[0])));
}

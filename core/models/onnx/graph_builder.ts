/**
 * A small ONNX graph builder: nodes with unique names, initializers kept as typed arrays until the
 * model is serialized (so a later pass -- BatchNorm folding -- can still change a conv's weights),
 * and typed graph inputs and outputs.
 */
import { AttributeType, DataType, encodeModel, type AttributeProto, type ModelProto, type NodeProto, type TensorProto, type ValueInfoProto } from "./schema.js";

/**
 * An attribute value: a number is INT and a number[] INTS (both must be whole); `{ float }` is FLOAT
 * and `{ floats }` FLOATS -- spelled out, because ONNX refuses an INT where a FLOAT is declared
 * (`alpha: 1` would be one).
 */
export type AttrValue = number | string | number[] | { floats: number[] } | { float: number };

/** A float32 initializer whose data may still change before {@link GraphBuilder.toBytes}. */
export interface FloatInit {
  name: string;
  dims: number[];
  data: Float32Array;
}

/** Dimension of a graph input or output: a fixed size, or a name for a dynamic one. */
export type Dim = number | string;

export class GraphBuilder {
  readonly nodes: NodeProto[] = [];
  private readonly floats = new Map<string, FloatInit>();
  private readonly int64s = new Map<string, { dims: number[]; data: BigInt64Array }>();
  private readonly used = new Set<string>();
  private readonly inputs: ValueInfoProto[] = [];
  private readonly outputs: ValueInfoProto[] = [];

  /** `base`, or `base_1`, `base_2`... : a name no other value or node of this graph has. */
  unique(base: string): string {
    const clean = base.replace(/[^A-Za-z0-9_./:-]/g, "_") || "v";
    let name = clean;
    for (let k = 1; this.used.has(name); k++) name = `${clean}_${k}`;
    this.used.add(name);
    return name;
  }

  /** Adds a float32 initializer; the returned object's data may be changed until serialization. */
  floatInit(nameHint: string, dims: number[], data: Float32Array): FloatInit {
    const count = dims.reduce((a, b) => a * b, 1);
    if (data.length !== count) throw new Error(`initializer ${nameHint}: ${data.length} values for dims ${JSON.stringify(dims)}`);
    const init = { name: this.unique(nameHint), dims, data };
    this.floats.set(init.name, init);
    return init;
  }

  /** A float32 constant; returns its value name. */
  constFloat(nameHint: string, dims: number[], values: ArrayLike<number>): string {
    return this.floatInit(nameHint, dims, Float32Array.from(values)).name;
  }

  /** A 1-D int64 constant (shapes, pads, axes); returns its value name. */
  constInt64(nameHint: string, values: number[]): string {
    const name = this.unique(nameHint);
    this.int64s.set(name, { dims: [values.length], data: BigInt64Array.from(values.map((v) => BigInt(v))) });
    return name;
  }

  /** The float initializer named `name`, if there is one. */
  floatInitNamed(name: string): FloatInit | undefined {
    return this.floats.get(name);
  }

  /** Adds a node with one output and returns the output's name (`nameHint`, made unique). */
  node(opType: string, inputs: string[], nameHint: string, attrs: Record<string, AttrValue> = {}): string {
    const out = this.unique(nameHint);
    this.nodes.push({ opType, input: inputs, output: [out], name: out, attribute: toAttributes(attrs) });
    return out;
  }

  /** The node that produces `value`, if any. */
  producerOf(value: string): NodeProto | undefined {
    for (let i = this.nodes.length - 1; i >= 0; i--) if (this.nodes[i].output.includes(value)) return this.nodes[i];
    return undefined;
  }

  /** Declares a graph input; returns its name. */
  input(name: string, elemType: number, shape: Dim[]): string {
    const n = this.unique(name);
    this.inputs.push(valueInfo(n, elemType, shape));
    return n;
  }

  /** Declares `value` a graph output. */
  output(value: string, elemType: number, shape: Dim[]): void {
    this.outputs.push(valueInfo(value, elemType, shape));
  }

  /** Initializers as they will be serialized. */
  initializers(): TensorProto[] {
    const initializer: TensorProto[] = [];
    for (const f of this.floats.values()) initializer.push({ name: f.name, dims: f.dims, dataType: DataType.FLOAT, rawData: bytesOf(f.data) });
    for (const [name, t] of this.int64s) initializer.push({ name, dims: t.dims, dataType: DataType.INT64, rawData: bytesOf(t.data) });
    return initializer;
  }

  /** Marks names of another graph as taken, so nodes added here can be spliced into it (core/models/onnx/user_model.ts). */
  reserve(names: Iterable<string>): void {
    for (const n of names) this.used.add(n);
  }

  /** Declared graph inputs and outputs. */
  signature(): { inputs: ValueInfoProto[]; outputs: ValueInfoProto[] } {
    return { inputs: this.inputs, outputs: this.outputs };
  }

  /** The whole model, serialized. */
  toBytes(meta: { graphName: string; opset: number; producerVersion: string; docString?: string; metadata?: Record<string, string> }): Uint8Array {
    const initializer = this.initializers();
    const model: ModelProto = {
      irVersion: 8,
      opsetImport: [{ domain: "", version: meta.opset }],
      producerName: "ctrain",
      producerVersion: meta.producerVersion,
      docString: meta.docString ?? "",
      graph: { name: meta.graphName, node: this.nodes, initializer, input: this.inputs, output: this.outputs },
      metadataProps: Object.entries(meta.metadata ?? {}).map(([key, value]) => ({ key, value })),
    };
    return encodeModel(model);
  }
}

function bytesOf(a: Float32Array | BigInt64Array): Uint8Array {
  // ONNX raw_data is little-endian, as are the hosts Node runs on (x64, arm64).
  return new Uint8Array(a.buffer, a.byteOffset, a.byteLength);
}

function valueInfo(name: string, elemType: number, shape: Dim[]): ValueInfoProto {
  const dim = shape.map((d) => (typeof d === "number" ? { dimValue: d } : { dimParam: d }));
  return { name, type: { tensorType: { elemType, shape: { dim } } } };
}

function toAttributes(attrs: Record<string, AttrValue>): AttributeProto[] {
  return Object.entries(attrs).map(([name, v]): AttributeProto => {
    if (typeof v === "string") return { name, type: AttributeType.STRING, s: new TextEncoder().encode(v) };
    if (typeof v === "number" || Array.isArray(v)) {
      if (![v].flat().every(Number.isInteger)) throw new Error(`attribute ${name}: ${JSON.stringify(v)} is not whole; pass { float } / { floats }`);
      return typeof v === "number" ? { name, type: AttributeType.INT, i: v } : { name, type: AttributeType.INTS, ints: v };
    }
    if ("floats" in v) return { name, type: AttributeType.FLOATS, floats: v.floats };
    return { name, type: AttributeType.FLOAT, f: v.float };
  });
}

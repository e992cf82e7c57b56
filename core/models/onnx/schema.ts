/**
 * The ONNX model format as plain objects: encoding of the graphs ctrain writes and decoding of any
 * .onnx file (a user's model, or our own for a check).
 *
 * proto/onnx.proto is a subset of ONNX's schema with the official field numbers, loaded at run time
 * with protobufjs like trainer.proto (no generated code). Objects use camelCase field names; int64
 * fields are JS numbers (every dimension and attribute we meet is far below 2^53); bytes are
 * Uint8Array. Fields outside the subset are skipped on decode.
 */
import { existsSync } from "node:fs";
import { fileURLToPath } from "node:url";
import protobuf from "protobufjs";
import { ConfigError } from "../../runtime/errors.js";

/** TensorProto.DataType values. */
export const DataType = {
  UNDEFINED: 0,
  FLOAT: 1,
  UINT8: 2,
  INT8: 3,
  UINT16: 4,
  INT16: 5,
  INT32: 6,
  INT64: 7,
  STRING: 8,
  BOOL: 9,
  FLOAT16: 10,
  DOUBLE: 11,
  UINT32: 12,
  UINT64: 13,
  BFLOAT16: 16,
} as const;
export type DataTypeValue = (typeof DataType)[keyof typeof DataType];

/** AttributeProto.AttributeType values. */
export const AttributeType = {
  UNDEFINED: 0,
  FLOAT: 1,
  INT: 2,
  STRING: 3,
  TENSOR: 4,
  GRAPH: 5,
  FLOATS: 6,
  INTS: 7,
  STRINGS: 8,
  TENSORS: 9,
  GRAPHS: 10,
} as const;

export interface TensorProto {
  name?: string;
  dims?: number[];
  /** A {@link DataType} value. */
  dataType?: number;
  /** Little-endian element bytes (what ctrain writes). */
  rawData?: Uint8Array;
  floatData?: number[];
  int32Data?: number[];
  int64Data?: number[];
  doubleData?: number[];
  /** 1 = EXTERNAL: the data lives in a file beside the model (`externalData` says where). */
  dataLocation?: number;
  externalData?: { key?: string; value?: string }[];
  docString?: string;
}

export interface AttributeProto {
  name: string;
  /** An {@link AttributeType} value: which of the value fields is meant. */
  type: number;
  f?: number;
  i?: number;
  s?: Uint8Array;
  t?: TensorProto;
  g?: GraphProto;
  floats?: number[];
  ints?: number[];
  strings?: Uint8Array[];
  docString?: string;
}

export interface NodeProto {
  input: string[];
  output: string[];
  name?: string;
  opType: string;
  domain?: string;
  attribute?: AttributeProto[];
  docString?: string;
}

export interface DimensionProto {
  dimValue?: number;
  dimParam?: string;
}

export interface ValueInfoProto {
  name: string;
  type?: { tensorType?: { elemType?: number; shape?: { dim?: DimensionProto[] } } };
  docString?: string;
}

export interface GraphProto {
  name?: string;
  node: NodeProto[];
  initializer?: TensorProto[];
  input: ValueInfoProto[];
  output: ValueInfoProto[];
  valueInfo?: ValueInfoProto[];
  docString?: string;
}

export interface ModelProto {
  irVersion: number;
  opsetImport: { domain?: string; version: number }[];
  producerName?: string;
  producerVersion?: string;
  domain?: string;
  modelVersion?: number;
  docString?: string;
  graph: GraphProto;
  metadataProps?: { key: string; value: string }[];
}

/** onnx.proto beside this module's build output, or in the source tree (a plain `tsc` build). */
function schemaPath(): string {
  for (const rel of ["../../../proto/onnx.proto", "../../../../proto/onnx.proto"]) {
    const p = fileURLToPath(new URL(rel, import.meta.url));
    if (existsSync(p)) return p;
  }
  throw new Error("onnx.proto not found: the build must copy proto/*.proto into dist/proto/");
}

let modelType: protobuf.Type | undefined;
function model(): protobuf.Type {
  if (!modelType) {
    const root = protobuf.loadSync(schemaPath());
    root.resolveAll();
    modelType = root.lookupType("onnx.ModelProto");
  }
  return modelType;
}

/** Serializes a model. Throws if a field has the wrong type (a bug in the writer, not user input). */
export function encodeModel(m: ModelProto): Uint8Array {
  const t = model();
  const problem = t.verify(m);
  if (problem) throw new Error(`encodeModel: invalid ModelProto: ${problem}`);
  return t.encode(t.fromObject(m)).finish();
}

/** Parses a serialized model. Throws ConfigError when the bytes are not an ONNX model. */
export function decodeModel(bytes: Uint8Array, source = "model"): ModelProto {
  const t = model();
  let obj: ModelProto;
  try {
    obj = t.toObject(t.decode(bytes), { longs: Number, defaults: true, arrays: true }) as ModelProto;
  } catch (cause) {
    throw new ConfigError(`${source} is not a valid ONNX model (${(cause as Error).message}); export it again or check the file is complete.`, { cause });
  }
  if (!obj.graph || obj.irVersion <= 0)
    throw new ConfigError(`${source} is not an ONNX model: it has no graph or no IR version; export it again with torch.onnx.export or tf2onnx.`);
  return obj;
}

/** The elements of an initializer or constant, whichever field holds them. Float and int64 types only. */
export function tensorValues(t: TensorProto): Float32Array | BigInt64Array {
  const count = (t.dims ?? []).reduce((a, b) => a * b, 1);
  const raw = t.rawData && t.rawData.length > 0 ? t.rawData : undefined;
  if (t.dataLocation === 1) throw new ConfigError(`tensor ${t.name}: its data is stored outside the .onnx file; save the model with the weights inside (onnx.save(..., save_as_external_data=False)).`);
  if (t.dataType === DataType.FLOAT) {
    if (!raw) return Float32Array.from(t.floatData ?? []);
    return new Float32Array(raw.buffer.slice(raw.byteOffset, raw.byteOffset + count * 4));
  }
  if (t.dataType === DataType.INT64) {
    if (!raw) return BigInt64Array.from((t.int64Data ?? []).map((v) => BigInt(v)));
    return new BigInt64Array(raw.buffer.slice(raw.byteOffset, raw.byteOffset + count * 8));
  }
  throw new ConfigError(`tensor ${t.name}: data type ${t.dataType} is not read here (float32 and int64 only).`);
}

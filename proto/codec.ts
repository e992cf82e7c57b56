/**
 * Encoding and checked decoding of the messages in trainer.proto.
 *
 * The schema is loaded at run time with protobufjs (no generated code to keep in step). Messages are
 * plain objects with camelCase fields (the interfaces below); enums are short lowercase strings
 * (`"fp16"`, `"train"`) mapped to and from the proto enum values here, once.
 *
 * `decode` is the trust boundary: it never throws anything but {@link DecodeError}, whose `reason` is a
 * metric label. A receiver drops and counts what fails; nothing that fails is ever applied. Checks, in
 * order: the bytes parse (malformed), the header is there and speaks our protocol version
 * (bad_version), belongs to the expected job (wrong_job), membership epoch (stale_epoch) and step
 * (wrong_step), required fields are set (malformed), array lengths agree (bad_shape), and tensor data
 * holds no NaN or infinity (non_finite).
 */
import { existsSync } from "node:fs";
import { fileURLToPath } from "node:url";
import protobuf from "protobufjs";
import { crc32 } from "./checksum.js";
import { bytesPerElement, hasNonFinite } from "./tensor_codec.js";
import { FrameError, allocFrame, frameDtype, parseFrame } from "./chunk_frame.js";

/**
 * Version of the wire contract. Peers with different versions refuse each other's messages.
 * 3: GradientChunk/AveragedChunk travel as chunk frames (proto/chunk_frame.ts) instead of protobuf.
 *    JobSpec is a oneof of an ExtractionRound and a TrainingAttempt (typed fields, no string map).
 */
export const PROTOCOL_VERSION = 3;

// ---------------------------------------------------------------------------------------------
// Enums: TS string unions <-> proto enum value names.

const ENUM_NAMES = {
  Pooling: { avg: "POOLING_AVG", max: "POOLING_MAX", none: "POOLING_NONE" },
  Backend: {
    auto: "BACKEND_AUTO",
    "tensorflow-gpu": "BACKEND_TENSORFLOW_GPU",
    tensorflow: "BACKEND_TENSORFLOW",
    wasm: "BACKEND_WASM",
    cpu: "BACKEND_CPU",
  },
  Method: { cached: "METHOD_CACHED", augment: "METHOD_AUGMENT" },
  Split: { train: "SPLIT_TRAIN", validation: "SPLIT_VALIDATION", test: "SPLIT_TEST" },
  Dtype: { fp32: "DTYPE_FP32", fp16: "DTYPE_FP16" },
  WorkerState: {
    starting: "WORKER_STATE_STARTING",
    idle: "WORKER_STATE_IDLE",
    extracting: "WORKER_STATE_EXTRACTING",
    training: "WORKER_STATE_TRAINING",
    draining: "WORKER_STATE_DRAINING",
    stopped: "WORKER_STATE_STOPPED",
  },
  ReplicaState: {
    loading: "REPLICA_STATE_LOADING",
    ready: "REPLICA_STATE_READY",
    waiting: "REPLICA_STATE_WAITING",
    training: "REPLICA_STATE_TRAINING",
    checkpoint: "REPLICA_STATE_CHECKPOINT",
    peers_lost: "REPLICA_STATE_PEERS_LOST",
    done: "REPLICA_STATE_DONE",
    failed: "REPLICA_STATE_FAILED",
    evicted: "REPLICA_STATE_EVICTED",
  },
  Engine: { auto: "ENGINE_AUTO", onnx: "ENGINE_ONNX", tfjs: "ENGINE_TFJS" },
  Precision: { fp32: "PRECISION_FP32", int8: "PRECISION_INT8" },
  Preprocessing: { unit: "PREPROCESSING_UNIT", tf: "PREPROCESSING_TF", caffe: "PREPROCESSING_CAFFE", torch: "PREPROCESSING_TORCH", none: "PREPROCESSING_NONE" },
  ControlKind: { drain: "CONTROL_KIND_DRAIN", stop: "CONTROL_KIND_STOP", abort_step: "CONTROL_KIND_ABORT_STEP", phase: "CONTROL_KIND_PHASE", epoch_boundary: "CONTROL_KIND_EPOCH_BOUNDARY" },
} as const;

export type Pooling = keyof (typeof ENUM_NAMES)["Pooling"];
export type Backend = keyof (typeof ENUM_NAMES)["Backend"];
export type Method = keyof (typeof ENUM_NAMES)["Method"];
export type Split = keyof (typeof ENUM_NAMES)["Split"];
export type Dtype = keyof (typeof ENUM_NAMES)["Dtype"];
export type WorkerState = keyof (typeof ENUM_NAMES)["WorkerState"];
export type ControlKind = keyof (typeof ENUM_NAMES)["ControlKind"];
export type ReplicaState = keyof (typeof ENUM_NAMES)["ReplicaState"];
export type Engine = keyof (typeof ENUM_NAMES)["Engine"];
export type Precision = keyof (typeof ENUM_NAMES)["Precision"];
export type Preprocessing = keyof (typeof ENUM_NAMES)["Preprocessing"];

/** The values of each enum, for option validation and tests. */
export const ENUM_VALUES = {
  Pooling: Object.keys(ENUM_NAMES.Pooling) as Pooling[],
  Backend: Object.keys(ENUM_NAMES.Backend) as Backend[],
  Method: Object.keys(ENUM_NAMES.Method) as Method[],
  Split: Object.keys(ENUM_NAMES.Split) as Split[],
  Dtype: Object.keys(ENUM_NAMES.Dtype) as Dtype[],
  WorkerState: Object.keys(ENUM_NAMES.WorkerState) as WorkerState[],
  ControlKind: Object.keys(ENUM_NAMES.ControlKind) as ControlKind[],
  ReplicaState: Object.keys(ENUM_NAMES.ReplicaState) as ReplicaState[],
  Engine: Object.keys(ENUM_NAMES.Engine) as Engine[],
  Precision: Object.keys(ENUM_NAMES.Precision) as Precision[],
  Preprocessing: Object.keys(ENUM_NAMES.Preprocessing) as Preprocessing[],
} as const;

// ---------------------------------------------------------------------------------------------
// Messages. Field docs are in trainer.proto; uint64 fields are numbers (exact up to 2^53).

export interface Header {
  protocolVersion: number;
  job: string;
  /** Membership epoch. */
  epoch: number;
  step: number;
  sender: string;
}

/** One extraction round (JobSpec `kind`); field docs in trainer.proto. Built by proto/extraction_wire.ts. */
export interface ExtractionRound {
  round: string;
  data: string;
  seed: number;
  valSplit: number;
  testSplit: number;
  /** 0 = all. */
  limit: number;
  maxPixels: number;
  model: string;
  inputSize: number;
  featureLayer: string;
  pooling: Pooling;
  preprocessing: Preprocessing;
  engine: Engine;
  precision: Precision;
  /** 0 = the worker decides. */
  threads: number;
  backend: Backend;
  imagesPerBatch: number;
  extractorFingerprint: string;
  datasetFingerprint: string;
}

/** What a worker is asked to run: one `kind`, an extraction round or a training attempt. */
export interface JobSpec {
  header: Header;
  /** Set when the spec is an extraction round. */
  extraction?: ExtractionRound;
  /** Set when the spec is a data-parallel training attempt. */
  training?: TrainingAttempt;
}

/** A JobSpec of kind `extraction`, as the coordinator sends it: only the header and the round. */
export interface ExtractionJobSpec {
  header: Header;
  extraction: ExtractionRound;
}

/** A JobSpec of kind `training`, as the coordinator sends it: only the header and the attempt. */
export interface TrainingJobSpec {
  header: Header;
  training: TrainingAttempt;
}

/** JobSpec.training: one data-parallel fine-tuning attempt (field docs in trainer.proto; conversion in training_wire.ts). */
export interface TrainingAttempt {
  attempt: string;
  model: string;
  inputSize: number;
  featureLayer: string;
  pooling: Pooling;
  fineTuneLayers: string;
  learningRate: number;
  seed: number;
  globalBatch: number;
  epochs: number;
  numClasses: number;
  wireDtype: Dtype;
  bucketBytes: number;
  checksumEvery: number;
  checkpointEvery: number;
  stepTimeoutMs: number;
  fingerprint: string;
  /** `head` or `fine_tune`; empty (an older coordinator) = `fine_tune`. */
  phase: string;
  /** Set for an image-fed attempt (--method augment); null or absent: cached activations. */
  images?: ImageInput | null;
  /** Keras' training controls the replicas apply; null or absent (an older coordinator): none. */
  controls?: TrainingControlsMessage | null;
  /** Set for an attempt on cached rows streamed from block objects (the head on features, fine-tuning on activations); null or absent: see `images`. */
  features?: FeatureInput | null;
}

/** TrainingAttempt.features: the feature cache entry's train and val rows as block objects (proto/trainer.proto FeatureInput). */
export interface FeatureInput {
  entry: string;
  trainRows: number;
  valRows: number;
  blockRows: number;
  windowBlocks: number;
  sampleShape: number[];
}

/** TrainingAttempt.controls: core/training/train_loop.ts TrainingControls on the wire (conversion in training_wire.ts). */
export interface TrainingControlsMessage {
  earlyStoppingPatience: number;
  restoreBestWeights: boolean;
  /** `val_loss` | `val_accuracy`. */
  monitor: string;
  /** `constant` | `cosine` | `plateau`. */
  lrSchedule: string;
  lrPatience: number;
  lrFactor: number;
  /** One weight per class; empty = none. */
  classWeights: number[];
  labelSmoothing: number;
}

/** TrainingAttempt.images: the data set and frozen stage (as an extraction round names them) and the augmentation. */
export interface ImageInput {
  frozen: ExtractionRound;
  /** null or absent = no augmentation. */
  augment?: Augmentation | null;
}

/** core/datasets/augment.ts AugmentOptions on the wire. */
export interface Augmentation {
  flip: boolean;
  rotation: number;
  zoom: number;
  translation: number;
  fillMode: string;
  fillValue: number;
}

export interface ShardTask {
  header: Header;
  shardId: string;
  ids: string[];
  labels: number[];
  splits: Split[];
  attempt: number;
}

export interface SkippedInput {
  id: string;
  reason: string;
  message: string;
}

export interface FeatureShard {
  header: Header;
  shardId: string;
  ids: string[];
  labels: number[];
  splits: Split[];
  featureDims: number[];
  /** ids.length * prod(featureDims) float32, little-endian (see core/tensor_codec float32ToBytes). */
  features: Uint8Array;
  skipped: SkippedInput[];
  worker: string;
  seconds: number;
}

export interface WorkerHello {
  header: Header;
  worker: string;
  backend: Backend;
  host: string;
  pid: number;
  cores: number;
  softwareVersion: string;
  state: WorkerState;
}

export interface Heartbeat {
  header: Header;
  worker: string;
  state: WorkerState;
  backend: Backend;
  host: string;
  pid: number;
  imagesPerSecond: number;
  shardId: string;
  shardsDone: number;
}

export interface Progress {
  header: Header;
  shardId: string;
  done: number;
  total: number;
  worker: string;
}

export interface MemberPlan {
  worker: string;
  sampleOffset: number;
  sampleCount: number;
  sliceOffset: number;
  sliceLength: number;
}

export interface StepPlan {
  header: Header;
  trainEpoch: number;
  members: MemberPlan[];
  globalBatch: number;
  learningRate: number;
  totalLength: number;
  dtype: Dtype;
  batchIndex: number;
  /** Members that come in at the next training-epoch boundary; empty when the plan takes effect at once. */
  joining: string[];
}

/** GradientChunk and AveragedChunk share this layout. */
export interface TensorChunk {
  header: Header;
  bucketId: number;
  chunkIndex: number;
  chunkCount: number;
  /** Element offset in the flat vector. */
  offset: number;
  /** Elements in data. */
  length: number;
  dtype: Dtype;
  data: Uint8Array;
  sampleCount: number;
  /** CRC-32 of data (proto/checksum.ts). */
  checksum: number;
  /** AveragedChunk only: a completed step's whole averaged vector resent to a member redoing it. */
  replay?: boolean;
}
export type GradientChunk = TensorChunk;
export type AveragedChunk = TensorChunk;

export interface WeightsChecksum {
  header: Header;
  worker: string;
  checksum: number;
  parameterCount: number;
  sum: number;
}

export interface CheckpointMeta {
  header: Header;
  phase: string;
  trainEpoch: number;
  batchIndex: number;
  weightsObject: string;
  weightsChecksum: number;
  parameterCount: number;
  learningRate: number;
  createdUnixMs: number;
  members: string[];
  optimizer: string;
}

export interface Control {
  header: Header;
  kind: ControlKind;
  reason: string;
  phase: string;
}

export interface EpochStatsMessage {
  epoch: number;
  loss: number;
  accuracy: number;
  hasValidation: boolean;
  valLoss: number;
  valAccuracy: number;
  seconds: number;
  samplesPerSecond: number;
  /** 0 = not recorded (absent from an older replica). */
  lr?: number;
  best?: boolean;
}

export interface DataCursor {
  trainEpoch: number;
  batchIndex: number;
  step: number;
}

export interface TrainingReport {
  header: Header;
  attempt: string;
  worker: string;
  state: ReplicaState;
  atUnixMs: number;
  lost: string[];
  /** null when not set. */
  cursor: DataCursor | null;
  history: EpochStatsMessage[];
  error: string;
  members: string[];
  allreduceSeconds: number;
  allreduceBytes: number;
  /** Steps since the replica's previous report (trainer.proto StepTiming). */
  stepTimings: StepTimingMessage[];
}

export interface StepTimingMessage {
  step: number;
  computeSeconds: number;
  waitSeconds: number;
}

export interface ShardError {
  header: Header;
  shardId: string;
  worker: string;
  attempt: number;
  error: string;
  atUnixMs: number;
}

/** Message type name -> TS shape. */
export interface MessageMap {
  JobSpec: JobSpec;
  ShardTask: ShardTask;
  FeatureShard: FeatureShard;
  WorkerHello: WorkerHello;
  Heartbeat: Heartbeat;
  Progress: Progress;
  StepPlan: StepPlan;
  GradientChunk: GradientChunk;
  AveragedChunk: AveragedChunk;
  WeightsChecksum: WeightsChecksum;
  CheckpointMeta: CheckpointMeta;
  Control: Control;
  TrainingReport: TrainingReport;
  ShardError: ShardError;
}
export type MessageType = keyof MessageMap;

/** Every top-level message type (each carries a Header). */
export const MESSAGE_TYPES: readonly MessageType[] = [
  "JobSpec",
  "ShardTask",
  "FeatureShard",
  "WorkerHello",
  "Heartbeat",
  "Progress",
  "StepPlan",
  "GradientChunk",
  "AveragedChunk",
  "WeightsChecksum",
  "CheckpointMeta",
  "Control",
  "TrainingReport",
  "ShardError",
];

// ---------------------------------------------------------------------------------------------
// Errors

export const DECODE_REASONS = ["malformed", "wrong_job", "stale_epoch", "wrong_step", "bad_version", "bad_shape", "non_finite"] as const;
/** Why a message was dropped; used as the `reason` label of the dropped-messages metric. */
export type DecodeReason = (typeof DECODE_REASONS)[number];

/** A received message is unusable: drop it, count it by `reason`, never apply it. */
export class DecodeError extends Error {
  override name = "DecodeError";
  readonly reason: DecodeReason;
  /** The message type the bytes were decoded as. */
  readonly type: MessageType;
  /** The header, when it could be read (e.g. to notice a newer epoch behind a stale_epoch). */
  readonly header: Header | undefined;
  constructor(type: MessageType, reason: DecodeReason, message: string, options?: { cause?: unknown; header?: Header }) {
    super(`${type}: ${message}`, options?.cause === undefined ? undefined : { cause: options.cause });
    this.type = type;
    this.reason = reason;
    this.header = options?.header;
  }
}

/** A message could not be encoded (a programming error on the sending side: wrong enum value, wrong type). */
export class EncodeError extends Error {
  override name = "EncodeError";
  readonly type: MessageType;
  constructor(type: MessageType, message: string, options?: { cause?: unknown }) {
    super(`${type}: ${message}`, options);
    this.type = type;
  }
}

// ---------------------------------------------------------------------------------------------
// Schema loading and enum conversion

/**
 * The schema next to this module (the build copies proto/*.proto into dist/proto/); when the copy is
 * missing (a plain `tsc` build), the source tree's copy two levels up.
 */
function schemaPath(): string {
  const beside = fileURLToPath(new URL("./trainer.proto", import.meta.url));
  if (existsSync(beside)) return beside;
  const source = fileURLToPath(new URL("../../proto/trainer.proto", import.meta.url));
  if (existsSync(source)) return source;
  throw new Error(`trainer.proto not found at ${beside}: the build must copy proto/*.proto into dist/proto/`);
}
const root = protobuf.loadSync(schemaPath());
root.resolveAll();

interface EnumTables {
  toWire: Map<string, number>;
  fromWire: Map<number, string>;
}
const enumTables = new Map<protobuf.Enum, EnumTables>();
for (const [enumName, names] of Object.entries(ENUM_NAMES)) {
  const e = root.lookupEnum(`ctrain.v1.${enumName}`);
  const t: EnumTables = { toWire: new Map(), fromWire: new Map() };
  for (const [ts, protoName] of Object.entries(names)) {
    const n = e.values[protoName];
    // A mismatch between this file and trainer.proto is a build error, not a runtime surprise.
    if (n === undefined) throw new Error(`trainer.proto enum ${enumName} has no value ${protoName}`);
    t.toWire.set(ts, n);
    t.fromWire.set(n, ts);
  }
  enumTables.set(e, t);
}

const types = new Map<MessageType, protobuf.Type>();
for (const name of MESSAGE_TYPES) types.set(name, root.lookupType(`ctrain.v1.${name}`));

class ShapeError extends Error {}

/** Converts enum fields (recursively) between TS strings and wire numbers. Copies when encoding. */
function convert(type: protobuf.Type, src: unknown, dir: "toWire" | "fromWire", path: string): Record<string, unknown> {
  if (src === null || typeof src !== "object" || Array.isArray(src)) throw new ShapeError(`${path} is not a message`);
  const obj = src as Record<string, unknown>;
  const out: Record<string, unknown> = dir === "toWire" ? { ...obj } : obj;
  for (const field of type.fieldsArray) {
    const rt = field.resolvedType;
    if (!rt) continue;
    const v = obj[field.name];
    if (v === undefined || v === null) continue;
    const conv =
      rt instanceof protobuf.Enum
        ? (x: unknown, p: string): unknown => convertEnum(rt, x, dir, p)
        : (x: unknown, p: string): unknown => convert(rt as protobuf.Type, x, dir, p);
    const p = `${path}.${field.name}`;
    if (field.map) {
      if (typeof v !== "object") throw new ShapeError(`${p} is not a map`);
      const m: Record<string, unknown> = {};
      for (const [k, x] of Object.entries(v as Record<string, unknown>)) m[k] = conv(x, `${p}[${k}]`);
      out[field.name] = m;
    } else if (field.repeated) {
      if (!Array.isArray(v)) throw new ShapeError(`${p} is not an array`);
      out[field.name] = v.map((x, i) => conv(x, `${p}[${i}]`));
    } else out[field.name] = conv(v, p);
  }
  return out;
}

function convertEnum(e: protobuf.Enum, v: unknown, dir: "toWire" | "fromWire", path: string): unknown {
  const t = enumTables.get(e)!;
  if (dir === "toWire") {
    const n = typeof v === "string" ? t.toWire.get(v) : undefined;
    if (n === undefined) throw new ShapeError(`${path}: ${JSON.stringify(v)} is not one of ${[...t.toWire.keys()].join(", ")}`);
    return n;
  }
  const s = typeof v === "number" ? t.fromWire.get(v) : undefined;
  if (s === undefined) throw new ShapeError(`${path}: ${e.name} value ${String(v)} is unknown or unset`);
  return s;
}

// ---------------------------------------------------------------------------------------------
// Public API

/** A header for a message of `job` from `sender`, at our protocol version. */
export function makeHeader(job: string, sender: string, epoch = 0, step = 0): Header {
  return { protocolVersion: PROTOCOL_VERSION, job, epoch, step, sender };
}

/** Encodes a message. Throws {@link EncodeError} for an unknown enum value or a value of the wrong type. */
export function encode(type: "JobSpec", msg: JobSpec | ExtractionJobSpec | TrainingJobSpec): Uint8Array;
export function encode<K extends MessageType>(type: K, msg: MessageMap[K]): Uint8Array;
export function encode<K extends MessageType>(type: K, msg: MessageMap[K] | ExtractionJobSpec | TrainingJobSpec): Uint8Array {
  if (type === "GradientChunk" || type === "AveragedChunk") return encodeChunk(type, msg as TensorChunk);
  const t = types.get(type);
  if (!t) throw new EncodeError(type, "unknown message type");
  try {
    const wire = convert(t, msg, "toWire", type);
    const err = t.verify(wire);
    if (err) throw new ShapeError(err);
    return t.encode(wire).finish();
  } catch (cause) {
    throw new EncodeError(type, cause instanceof Error ? cause.message : String(cause), { cause });
  }
}

/** What the receiver expects of a message's header. */
export interface DecodeExpectation {
  /** Job id; anything else is `wrong_job`. */
  job: string;
  /** Membership epoch; a message of another epoch is `stale_epoch`. Default: not checked. */
  epoch?: number;
  /** Lowest acceptable membership epoch (for messages that announce a newer one). Default: not checked. */
  minEpoch?: number;
  /** Training step; anything else is `wrong_step`. Default: not checked. */
  step?: number;
  /** Role of this process, for the bad_version message. Default `coordinator`. */
  self?: string;
  /** Role of the sender, for the bad_version message. Default `worker`. */
  peer?: string;
}

const DECODE_OPTIONS: protobuf.IConversionOptions = { longs: Number, defaults: true, arrays: true, objects: true };

/**
 * Decodes and checks a message. Throws only {@link DecodeError}: the receiver drops the message and
 * counts `err.reason`.
 */
export function decode<K extends MessageType>(type: K, bytes: Uint8Array, expect: DecodeExpectation): MessageMap[K] {
  if (type === "GradientChunk" || type === "AveragedChunk") return decodeChunk(type, bytes, expect) as MessageMap[K];
  const t = types.get(type);
  if (!t) throw new DecodeError(type, "malformed", "unknown message type");
  let obj: Record<string, unknown>;
  try {
    if (!(bytes instanceof Uint8Array)) throw new TypeError("payload is not bytes");
    obj = t.toObject(t.decode(bytes), DECODE_OPTIONS);
  } catch (cause) {
    throw new DecodeError(type, "malformed", `cannot parse ${bytes?.length ?? 0} bytes: ${cause instanceof Error ? cause.message : String(cause)}`, { cause });
  }
  const h = obj.header as Header | null;
  if (!h) throw new DecodeError(type, "malformed", "no header");
  // `defaults: true` fills both kinds of the oneof with null: keep the one on the wire.
  if (type === "JobSpec") obj = { header: h, ...(obj.extraction ? { extraction: obj.extraction } : {}), ...(obj.training ? { training: obj.training } : {}) };
  // The header first: a peer of another version may use enum values we do not know.
  checkHeader(type, h, expect);
  try {
    convert(t, obj, "fromWire", type);
    validate(type, obj);
  } catch (err) {
    if (err instanceof DecodeError) throw err;
    throw new DecodeError(type, "malformed", err instanceof Error ? err.message : String(err), { cause: err, header: h });
  }
  return obj as unknown as MessageMap[K];
}

// GradientChunk / AveragedChunk travel as chunk frames (chunk_frame.ts), not protobuf: same fields, same checks.

function encodeChunk(type: MessageType, m: TensorChunk): Uint8Array {
  try {
    if (!(m.data instanceof Uint8Array)) throw new Error("data is not bytes");
    const { frame, data } = allocFrame(m, m.data.length);
    data.set(m.data);
    return frame;
  } catch (cause) {
    throw new EncodeError(type, cause instanceof Error ? cause.message : String(cause), { cause });
  }
}

function decodeChunk(type: MessageType, bytes: Uint8Array, expect: DecodeExpectation): TensorChunk {
  let f: ReturnType<typeof parseFrame>;
  try {
    f = parseFrame(bytes, PROTOCOL_VERSION);
  } catch (err) {
    const e = err instanceof FrameError ? err : new FrameError("malformed", String(err));
    throw new DecodeError(type, e.reason, e.message, { cause: err, ...(e.header ? { header: e.header } : {}) });
  }
  checkHeader(type, f.header, expect);
  const dtype = frameDtype(f.dtypeCode);
  if (!dtype) throw new DecodeError(type, "malformed", `dtype code ${f.dtypeCode} is unknown`, { header: f.header });
  const { dtypeCode: _, replay, ...rest } = f;
  // Only AveragedChunk has `replay` (as the protobuf messages had).
  const m: TensorChunk = { ...rest, dtype, ...(type === "AveragedChunk" ? { replay: replay ?? false } : {}) };
  try {
    validate(type, m as unknown as Record<string, unknown>);
  } catch (err) {
    if (err instanceof DecodeError) throw err;
    throw new DecodeError(type, "malformed", err instanceof Error ? err.message : String(err), { cause: err, header: f.header });
  }
  return m;
}

function checkHeader(type: MessageType, h: Header, expect: DecodeExpectation): void {
  if (h.protocolVersion !== PROTOCOL_VERSION) {
    const self = expect.self ?? "coordinator";
    const peer = expect.peer ?? "worker";
    const older = h.protocolVersion < PROTOCOL_VERSION;
    throw new DecodeError(
      type,
      "bad_version",
      `${peer} speaks protocol v${h.protocolVersion}, ${self} v${PROTOCOL_VERSION}: upgrade the ${older ? `${peer} image` : self}` +
        (h.sender ? ` (sender ${JSON.stringify(h.sender)})` : ""),
      { header: h },
    );
  }
  if (h.job !== expect.job)
    throw new DecodeError(type, "wrong_job", `message of job ${JSON.stringify(h.job)}, expected ${JSON.stringify(expect.job)}`, { header: h });
  if (expect.epoch !== undefined && h.epoch !== expect.epoch)
    throw new DecodeError(type, "stale_epoch", `message of membership epoch ${h.epoch}, expected ${expect.epoch}`, { header: h });
  if (expect.minEpoch !== undefined && h.epoch < expect.minEpoch)
    throw new DecodeError(type, "stale_epoch", `message of membership epoch ${h.epoch}, expected at least ${expect.minEpoch}`, { header: h });
  if (expect.step !== undefined && h.step !== expect.step)
    throw new DecodeError(type, "wrong_step", `message of step ${h.step}, expected ${expect.step}`, { header: h });
}

// Per-type checks after the header. Throw DecodeError for bad_shape / non_finite, anything else is malformed.

function required(cond: boolean, what: string): void {
  if (!cond) throw new Error(`${what} is missing`);
}

function shape(type: MessageType, h: Header, cond: boolean, what: string): void {
  if (!cond) throw new DecodeError(type, "bad_shape", what, { header: h });
}

function validate(type: MessageType, o: Record<string, unknown>): void {
  (VALIDATORS[type] as (type: MessageType, h: Header, m: unknown) => void)(type, o.header as Header, o);
}

/** One validator per message type: what the header cannot say about the body. */
const VALIDATORS: { [K in MessageType]: (type: K, h: Header, m: MessageMap[K]) => void } = {
  JobSpec: validateJobSpec,
  ShardTask: validateShardTask,
  FeatureShard: validateFeatureShard,
  WorkerHello: validateWorkerHello,
  Heartbeat: validateHeartbeat,
  Progress: validateProgress,
  StepPlan: validateStepPlan,
  GradientChunk: validateTensorChunk,
  AveragedChunk: validateTensorChunk,
  WeightsChecksum: validateWeightsChecksum,
  CheckpointMeta: validateCheckpointMeta,
  Control: () => undefined, // kind is checked by the enum conversion
  TrainingReport: validateTrainingReport,
  ShardError: validateShardError,
};

function validateJobSpec(type: MessageType, h: Header, m: JobSpec): void {
  if (m.extraction) return validateExtractionRound(type, h, m.extraction);
  if (m.training) return validateTrainingAttempt(h, m.training);
  throw new DecodeError(type, "malformed", "the spec has no kind (extraction or training): a coordinator of protocol v2 or older sent it", { header: h });
}

/** Enums (pooling, preprocessing, engine, precision, backend) are checked by the conversion: unset is malformed. */
function validateExtractionRound(type: MessageType, h: Header, r: ExtractionRound): void {
  required(r.round !== "", "extraction.round");
  required(r.data !== "", "extraction.data");
  required(r.model !== "", "extraction.model");
  required(r.featureLayer !== "", "extraction.feature_layer");
  required(r.inputSize > 0, "extraction.input_size");
  required(r.imagesPerBatch > 0, "extraction.images_per_batch");
  required(r.maxPixels > 0, "extraction.max_pixels");
  required(r.extractorFingerprint !== "" && r.datasetFingerprint !== "", "extraction fingerprints");
  for (const [name, v] of [["val_split", r.valSplit], ["test_split", r.testSplit]] as const) {
    if (!Number.isFinite(v)) throw new DecodeError(type, "non_finite", `extraction.${name} ${v}`, { header: h });
    if (v < 0 || v >= 1) throw new Error(`extraction.${name} ${v} is outside [0, 1)`);
  }
}

function validateShardTask(type: MessageType, h: Header, m: ShardTask): void {
  required(m.shardId !== "", "shard_id");
  shape(type, h, m.ids.length > 0, "shard has no samples");
  shape(type, h, m.labels.length === m.ids.length && m.splits.length === m.ids.length,
    `${m.ids.length} ids, ${m.labels.length} labels, ${m.splits.length} splits`);
}

function validateFeatureShard(type: MessageType, h: Header, m: FeatureShard): void {
  required(m.shardId !== "", "shard_id");
  required(m.worker !== "", "worker");
  for (const s of m.skipped) required(s.id !== "" && s.reason !== "", "skipped input id or reason");
  shape(type, h, m.labels.length === m.ids.length && m.splits.length === m.ids.length,
    `${m.ids.length} ids, ${m.labels.length} labels, ${m.splits.length} splits`);
  let dim = 1;
  for (const d of m.featureDims) dim *= d;
  shape(type, h, m.featureDims.length > 0 && dim > 0 && dim <= 2 ** 31, `feature dims [${m.featureDims.join(", ")}]`);
  shape(type, h, m.features.length === m.ids.length * dim * 4,
    `features hold ${m.features.length} bytes, ${m.ids.length} samples x ${dim} float32 need ${m.ids.length * dim * 4}`);
  if (!Number.isFinite(m.seconds) || m.seconds < 0) throw new DecodeError(type, "non_finite", `seconds ${m.seconds}`, { header: h });
  if (hasNonFinite(m.features, "fp32")) throw new DecodeError(type, "non_finite", "features hold NaN or infinity", { header: h });
}

function validateWorkerHello(_type: MessageType, _h: Header, m: WorkerHello): void {
  required(m.worker !== "", "worker");
}

function validateHeartbeat(type: MessageType, h: Header, m: Heartbeat): void {
  required(m.worker !== "", "worker");
  if (!Number.isFinite(m.imagesPerSecond) || m.imagesPerSecond < 0)
    throw new DecodeError(type, "non_finite", `images_per_second ${m.imagesPerSecond}`, { header: h });
}

function validateProgress(type: MessageType, h: Header, m: Progress): void {
  required(m.shardId !== "", "shard_id");
  shape(type, h, m.done <= m.total, `done ${m.done} > total ${m.total}`);
}

function validateStepPlan(type: MessageType, h: Header, m: StepPlan): void {
  shape(type, h, m.members.length > 0, "no members");
  const names = new Set<string>();
  let samples = 0;
  for (const mb of m.members) {
    required(mb.worker !== "", "member worker");
    shape(type, h, !names.has(mb.worker), `member ${JSON.stringify(mb.worker)} listed twice`);
    names.add(mb.worker);
    samples += mb.sampleCount;
    shape(type, h, mb.sampleOffset + mb.sampleCount <= m.globalBatch, `member ${mb.worker} samples outside the global batch`);
  }
  shape(type, h, samples === m.globalBatch, `members' samples sum to ${samples}, global batch is ${m.globalBatch}`);
  const joining = new Set(m.joining);
  shape(type, h, joining.size === m.joining.length, "a joiner listed twice");
  for (const w of joining) shape(type, h, names.has(w), `joiner ${JSON.stringify(w)} is not a member`);
  shape(type, h, joining.size < m.members.length, "every member is a joiner");
  const slices = m.members.map((mb) => [mb.sliceOffset, mb.sliceLength] as const).sort((a, b) => a[0] - b[0] || a[1] - b[1]);
  let at = 0;
  for (const [off, len] of slices) {
    shape(type, h, off === at, `slices do not tile the gradient vector (gap or overlap at ${at})`);
    at += len;
  }
  shape(type, h, at === m.totalLength, `slices cover ${at} elements, the gradient vector has ${m.totalLength}`);
  if (!Number.isFinite(m.learningRate)) throw new DecodeError(type, "non_finite", `learning_rate ${m.learningRate}`, { header: h });
}

function validateTensorChunk(type: MessageType, h: Header, m: TensorChunk): void {
  shape(type, h, m.chunkCount > 0 && m.chunkIndex < m.chunkCount, `chunk ${m.chunkIndex} of ${m.chunkCount}`);
  const need = m.length * bytesPerElement(m.dtype);
  shape(type, h, m.data.length === need, `data holds ${m.data.length} bytes, ${m.length} ${m.dtype} elements need ${need}`);
  if (crc32(m.data) !== m.checksum) throw new Error(`checksum mismatch (data corrupted)`);
  if (hasNonFinite(m.data, m.dtype)) throw new DecodeError(type, "non_finite", "data holds NaN or infinity", { header: h });
}

function validateWeightsChecksum(_type: MessageType, _h: Header, m: WeightsChecksum): void {
  required(m.worker !== "", "worker");
}

function validateCheckpointMeta(_type: MessageType, _h: Header, m: CheckpointMeta): void {
  required(m.phase !== "", "phase");
  required(m.weightsObject !== "", "weights_object");
}

function validateTrainingReport(_type: MessageType, _h: Header, m: TrainingReport): void {
  required(m.attempt !== "", "attempt");
  required(m.worker !== "", "worker");
  // Loss and accuracy figures may be NaN (a diverged run): they are reported, never applied.
}

function validateShardError(_type: MessageType, _h: Header, m: ShardError): void {
  required(m.shardId !== "", "shard_id");
  required(m.worker !== "", "worker");
  required(m.error !== "", "error");
}

/** JobSpec.training: what a replica cannot start without; a zero step timeout would count every peer lost. */
function validateTrainingAttempt(h: Header, t: TrainingAttempt): void {
  required(t.attempt !== "", "training.attempt");
  required(t.model !== "", "training.model");
  required(t.inputSize > 0, "training.input_size");
  required(t.globalBatch > 0, "training.global_batch");
  required(t.epochs > 0, "training.epochs");
  required(t.numClasses > 1, "training.num_classes");
  required(t.stepTimeoutMs > 0, "training.step_timeout_ms");
  if (!Number.isFinite(t.learningRate)) throw new DecodeError("JobSpec", "non_finite", `training.learning_rate ${t.learningRate}`, { header: h });
  required(t.learningRate > 0, "training.learning_rate");
  required(["", "head", "fine_tune"].includes(t.phase), `training.phase ${JSON.stringify(t.phase)} (head or fine_tune)`);
  if (t.images) {
    required(t.images.frozen !== null && t.images.frozen !== undefined, "training.images.frozen");
    validateExtractionRound("JobSpec", h, t.images.frozen);
  }
  if (t.controls) validateControls(h, t.controls, t.numClasses);
  if (t.features) validateFeatureInput(h, t.features, !!t.images);
}

/** TrainingAttempt.features: the attempt's rows, named by a plain entry key, in whole blocks of a known shape. */
function validateFeatureInput(h: Header, f: FeatureInput, images: boolean): void {
  const check = (cond: boolean, what: string): void => shape("JobSpec", h, cond, what);
  check(!images, "training.features and training.images both set: an attempt has one input");
  check(/^[0-9a-z]{1,64}$/.test(f.entry), `training.features.entry ${JSON.stringify(f.entry)} is not a cache key (1-64 of [0-9a-z])`);
  check(f.trainRows > 0 && f.blockRows > 0 && f.windowBlocks > 0, `training.features: train_rows ${f.trainRows}, block_rows ${f.blockRows}, window_blocks ${f.windowBlocks} must be > 0`);
  check(f.sampleShape.length > 0 && f.sampleShape.every((d) => d > 0), `training.features.sample_shape [${f.sampleShape.join(", ")}] must be dimensions > 0`);
}

/** TrainingAttempt.controls: known choices, one finite positive weight per class, smoothing in [0, 0.5). */
function validateControls(h: Header, c: TrainingControlsMessage, numClasses: number): void {
  required(["", "val_loss", "val_accuracy"].includes(c.monitor), `training.controls.monitor ${JSON.stringify(c.monitor)} (val_loss or val_accuracy)`);
  required(["", "constant", "cosine", "plateau"].includes(c.lrSchedule), `training.controls.lr_schedule ${JSON.stringify(c.lrSchedule)} (constant, cosine or plateau)`);
  if (c.classWeights.length && c.classWeights.length !== numClasses) throw new DecodeError("JobSpec", "bad_shape", `training.controls.class_weights has ${c.classWeights.length} weights for ${numClasses} classes`, { header: h });
  const numbers = [c.lrFactor, c.labelSmoothing, ...c.classWeights];
  if (numbers.some((x) => !Number.isFinite(x))) throw new DecodeError("JobSpec", "non_finite", "training.controls holds a NaN or infinity", { header: h });
  required(c.classWeights.every((w) => w > 0), "training.controls.class_weights (> 0)");
  required(c.labelSmoothing >= 0 && c.labelSmoothing < 0.5, `training.controls.label_smoothing ${c.labelSmoothing} (in [0, 0.5))`);
}

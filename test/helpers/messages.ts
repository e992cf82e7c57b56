/**
 * One valid sample of every wire message (for round-trip, rejection and fuzz tests). The job is
 * `job-1`, membership epoch 3, step 7.
 */
import { makeHeader, type ExtractionJobSpec, type MessageMap, type MessageType } from "../../proto/codec.js";
import { encodeChunk, float32ToBytes, planChunks } from "../../proto/tensor_codec.js";

export const JOB = "job-1";
export const EPOCH = 3;
export const STEP = 7;

/** A fresh valid sample of each message type. */
export function sampleMessages(): { [K in MessageType]: MessageMap[K] } {
  const header = () => makeHeader(JOB, "worker-0", EPOCH, STEP);
  const grad = new Float32Array([0.5, -1.25, 3, 1e-3, -6e4, 0]);
  const chunk = encodeChunk(grad, planChunks([grad.length], { dtype: "fp16" })[0]!, "fp16");
  const chunk32 = encodeChunk(grad, planChunks([grad.length])[0]!, "fp32");
  return {
    JobSpec: sampleExtractionSpec(),
    ShardTask: { header: header(), shardId: "shard-00001", ids: ["train/0", "train/1", "test/5"], labels: [3, 0, 9], splits: ["train", "validation", "test"], attempt: 1 },
    FeatureShard: {
      header: header(), shardId: "shard-00001", ids: ["a", "b"], labels: [1, 2], splits: ["train", "train"], featureDims: [3],
      features: float32ToBytes(new Float32Array([1, 2, 3, -4, 0.5, 6])),
      skipped: [{ id: "c", reason: "corrupt", message: "not a JPEG" }], worker: "worker-0", seconds: 1.5,
    },
    WorkerHello: { header: header(), worker: "worker-0", backend: "tensorflow-gpu", host: "node-a", pid: 1234, cores: 16, softwareVersion: "0.1.0", state: "starting" },
    Heartbeat: { header: header(), worker: "worker-0", state: "extracting", backend: "wasm", host: "node-a", pid: 1234, imagesPerSecond: 87.5, shardId: "shard-00001", shardsDone: 4 },
    Progress: { header: header(), shardId: "shard-00001", done: 100, total: 256, worker: "worker-0" },
    StepPlan: {
      header: header(), trainEpoch: 2, globalBatch: 32, learningRate: 1e-5, totalLength: 1001, dtype: "fp32", batchIndex: 17, joining: ["worker-1"],
      members: [
        { worker: "worker-0", sampleOffset: 0, sampleCount: 16, sliceOffset: 0, sliceLength: 501 },
        { worker: "worker-1", sampleOffset: 16, sampleCount: 16, sliceOffset: 501, sliceLength: 500 },
      ],
    },
    GradientChunk: {
      header: header(), bucketId: chunk.bucketId, chunkIndex: chunk.chunkIndex, chunkCount: chunk.chunkCount, offset: chunk.offset,
      length: chunk.length, dtype: chunk.dtype, data: chunk.data, sampleCount: 16, checksum: chunk.checksum,
    },
    AveragedChunk: {
      header: header(), bucketId: chunk32.bucketId, chunkIndex: chunk32.chunkIndex, chunkCount: chunk32.chunkCount, offset: chunk32.offset,
      length: chunk32.length, dtype: chunk32.dtype, data: chunk32.data, sampleCount: 32, checksum: chunk32.checksum, replay: false,
    },
    WeightsChecksum: { header: header(), worker: "worker-0", checksum: 0xdeadbeef, parameterCount: 2_257_984, sum: -12.5 },
    CheckpointMeta: {
      header: header(), phase: "fine_tune", trainEpoch: 1, batchIndex: 40, weightsObject: "ckpt-000123", weightsChecksum: 123456,
      parameterCount: 2_257_984, learningRate: 1e-5, createdUnixMs: 1_700_000_000_000, members: ["worker-0", "worker-1"], optimizer: "sgd",
    },
    Control: { header: header(), kind: "abort_step", reason: "worker-2 lost", phase: "fine_tune" },
    TrainingReport: {
      header: header(), attempt: "a1", worker: "worker-0", state: "done", atUnixMs: 1_700_000_000_123, lost: ["worker-2"],
      cursor: { trainEpoch: 2, batchIndex: 0, step: 42 },
      history: [
        { epoch: 0, loss: 1.25, accuracy: 0.5, hasValidation: true, valLoss: 1.5, valAccuracy: 0.25, seconds: 3.5, samplesPerSecond: 91.5, lr: 0.001, best: true },
        { epoch: 1, loss: 0.75, accuracy: 0.75, hasValidation: false, valLoss: 0, valAccuracy: 0, seconds: 3.25, samplesPerSecond: 98, lr: 0, best: false },
      ],
      error: "", members: ["worker-0", "worker-1"], allreduceSeconds: 0.5, allreduceBytes: 123_456, stepTimings: [{ step: 41, computeSeconds: 0.25, waitSeconds: 0.0625 }],
    },
    ShardError: { header: header(), shardId: "r1.shard-00001", worker: "worker-0", attempt: 2, error: "ENOENT: no such file", atUnixMs: 1_700_000_000_000 },
  };
}

/** A valid JobSpec of kind extraction (every field of ExtractionRound set). */
export function sampleExtractionSpec(): ExtractionJobSpec {
  return {
    header: makeHeader(JOB, "coordinator", EPOCH, STEP),
    extraction: {
      round: "r0123456789abcdef", data: "fashion-mnist", seed: 42, valSplit: 0.1, testSplit: 0.1, limit: 1000, maxPixels: 40_000_000,
      model: "mobilenet_v2", inputSize: 96, featureLayer: "block_12_add", pooling: "avg", preprocessing: "unit", engine: "onnx",
      precision: "int8", threads: 2, backend: "wasm", imagesPerBatch: 48, extractorFingerprint: "a".repeat(64), datasetFingerprint: "b".repeat(64),
    },
  };
}

/** Deep copy with every Uint8Array (Buffers included) as a plain Uint8Array, for deepStrictEqual. */
export function normalize<T>(v: T): T {
  if (v instanceof Uint8Array) return new Uint8Array(v) as T;
  if (Array.isArray(v)) return v.map(normalize) as T;
  if (v && typeof v === "object") {
    const out: Record<string, unknown> = {};
    for (const [k, x] of Object.entries(v)) out[k] = normalize(x);
    return out as T;
  }
  return v;
}

/**
 * The training wire contract (proto/training_wire.ts): the typed TrainingAttempt in JobSpec.training
 * with one set of defaults, its validator, image attempts (--method augment: the data set and frozen
 * stage as an extraction round, augmentation, the sample list), membership plans and boundary
 * decisions, the training controls every replica applies, reports' epoch history, without NATS.
 */
import assert from "node:assert/strict";
import { describe, test } from "node:test";
import { DecodeError, decode, encode, makeHeader, type JobSpec } from "../proto/codec.js";
import { DATA_PARALLEL_DEFAULTS } from "../core/training/data_parallel_settings.js";
import {
  attemptPhase, cannotJoin, completeAttempt, controlsOf, coordinatorSender, decodeBoundaryDecision, decodeDataObject, decodeMembershipPlan, decodeReport, decodeSampleList, encodeBoundaryDecision,
  encodeDataObject, encodeMembershipPlan, encodeReport, encodeSampleList, encodeTrainingSpec, fromAugmentation, toAugmentation, trainingAttemptOf, type TrainingAttempt, type TrainingAttemptInput,
} from "../proto/training_wire.js";
import { DEFAULT_AUGMENT } from "../core/datasets/augment.js";
import { packArrays } from "../core/training/checkpoints.js";
import { sampleExtractionSpec, sampleMessages } from "./helpers/messages.js";

const JOB = "job-1";
const input: TrainingAttemptInput = {
  attempt: "a1", model: "mobilenet_v2", inputSize: 64, featureLayer: "out_relu", pooling: "avg", fineTuneLayers: "3", learningRate: 1e-5,
  seed: 42, globalBatch: 32, epochs: 3, numClasses: 10, fingerprint: "[fp]",
};

function rejects(fn: () => unknown, reason: DecodeError["reason"], message: RegExp): void {
  assert.throws(fn, (err: unknown) => err instanceof DecodeError && err.reason === reason && message.test(err.message));
}

describe("training wire", () => {
  test("training wire - the settings left out take DATA_PARALLEL_DEFAULTS, the ones given are kept", () => {
    const a = completeAttempt(input);
    assert.equal(a.checksumEvery, DATA_PARALLEL_DEFAULTS.checksumEvery);
    assert.equal(a.checkpointEvery, DATA_PARALLEL_DEFAULTS.checkpointEvery);
    assert.equal(a.stepTimeoutMs, DATA_PARALLEL_DEFAULTS.stepTimeoutMs);
    assert.equal(a.bucketBytes, DATA_PARALLEL_DEFAULTS.bucketBytes);
    assert.equal(a.wireDtype, "fp32");
    const b = completeAttempt({ ...input, checkpointEvery: 0, checksumEvery: 5, stepTimeoutMs: 4000, wireDtype: "fp16" });
    assert.deepEqual([b.checkpointEvery, b.checksumEvery, b.stepTimeoutMs, b.wireDtype], [0, 5, 4000, "fp16"], "0 (only the final state) is a value, not 'unset'");
  });

  test("training wire - a training spec round-trips typed, from the attempt's coordinator, without the flat extraction fields", () => {
    const a = completeAttempt({ ...input, checkpointEvery: 5, wireDtype: "fp16", bucketBytes: 65536 });
    const spec = decode("JobSpec", encodeTrainingSpec(JOB, a), { job: JOB, self: "worker", peer: "coordinator" });
    assert.deepEqual(trainingAttemptOf(spec), a);
    assert.equal(spec.header.sender, coordinatorSender("a1"));
    assert.deepEqual(Object.keys(spec).sort(), ["header", "training"], "no flat field, nothing as strings in `extra`");
    const extraction = decode("JobSpec", encode("JobSpec", sampleMessages().JobSpec), { job: "job-1" });
    assert.equal(trainingAttemptOf(extraction), undefined, "an extraction spec is not a training spec");
  });

  test("training wire - a training spec a replica cannot run is malformed, with the field named", () => {
    const bad = (patch: Partial<TrainingAttempt>): Uint8Array => encodeTrainingSpec(JOB, { ...completeAttempt(input), ...patch });
    const dec = (b: Uint8Array): JobSpec => decode("JobSpec", b, { job: JOB });
    rejects(() => dec(bad({ epochs: 0 })), "malformed", /training\.epochs is missing/);
    rejects(() => dec(bad({ stepTimeoutMs: 0 })), "malformed", /training\.step_timeout_ms/);
    rejects(() => dec(bad({ attempt: "" })), "malformed", /training\.attempt/);
    rejects(() => dec(bad({ globalBatch: 0 })), "malformed", /training\.global_batch/);
    rejects(() => dec(bad({ learningRate: Number.NaN })), "non_finite", /training\.learning_rate NaN/);
    rejects(() => dec(bad({ learningRate: 0 })), "malformed", /training\.learning_rate/);
  });

  test("training wire - an attempt on cached rows round-trips; rows next to images, a bad entry or empty blocks are refused", () => {
    const features = { entry: "0123abcd", trainRows: 1000, valRows: 100, blockRows: 37, windowBlocks: 64, sampleShape: [3456] };
    const a = completeAttempt({ ...input, fineTuneLayers: "0", phase: "head", features });
    const back = trainingAttemptOf(decode("JobSpec", encodeTrainingSpec(JOB, a), { job: JOB }))!;
    assert.deepEqual(back.features, features);
    assert.equal(trainingAttemptOf(decode("JobSpec", encodeTrainingSpec(JOB, completeAttempt(input)), { job: JOB }))!.features, null);
    const bad = (patch: Partial<TrainingAttempt>): Uint8Array => encodeTrainingSpec(JOB, { ...a, ...patch });
    const dec = (b: Uint8Array): JobSpec => decode("JobSpec", b, { job: JOB });
    const frozen = sampleExtractionSpec().extraction;
    rejects(() => dec(bad({ images: { frozen, augment: null } })), "bad_shape", /training\.features and training\.images both set/);
    rejects(() => dec(bad({ features: { ...features, entry: "../x" } })), "bad_shape", /training\.features\.entry "\.\.\/x" is not a cache key/);
    rejects(() => dec(bad({ features: { ...features, blockRows: 0 } })), "bad_shape", /block_rows 0/);
    rejects(() => dec(bad({ features: { ...features, sampleShape: [] } })), "bad_shape", /sample_shape/);
  });

  test("training wire - an extraction spec without its enums is still malformed", () => {
    const s = sampleExtractionSpec();
    const { pooling: _p, ...rest } = s.extraction;
    rejects(() => decode("JobSpec", encode("JobSpec", { ...s, extraction: rest } as JobSpec), { job: JOB }), "malformed", /pooling.*unknown or unset/);
  });

  test("training wire - membership plans cut the global batch by member and are taken only from the attempt's coordinator", () => {
    const a = completeAttempt(input);
    const bytes = encodeMembershipPlan(JOB, a, { epoch: 2, members: ["w0", "w1", "w2"], joining: ["w2"] }, { epoch: 1, batch: 3, step: 8 });
    const raw = decode("StepPlan", bytes, { job: JOB });
    assert.deepEqual(raw.members.map((m) => [m.worker, m.sampleOffset, m.sampleCount]), [["w0", 0, 11], ["w1", 11, 11], ["w2", 22, 10]]);
    assert.deepEqual([raw.header.step, raw.trainEpoch, raw.batchIndex, raw.globalBatch], [8, 1, 3, 32]);
    assert.deepEqual(decodeMembershipPlan(JOB, "a1", bytes), { epoch: 2, members: ["w0", "w1", "w2"], joining: ["w2"] });
    assert.equal(decodeMembershipPlan(JOB, "a0", bytes), undefined, "another attempt's plan");
  });

  test("training wire - boundary decisions are filtered by attempt", () => {
    const b = encodeBoundaryDecision(JOB, "w0", "a1", { step: 10, epoch: 3 });
    assert.deepEqual(decodeBoundaryDecision(JOB, "a1", b, "worker"), { step: 10, epoch: 3 });
    assert.equal(decodeBoundaryDecision(JOB, "a2", b, "coordinator"), undefined);
    const other = encode("Control", { header: makeHeader(JOB, "w0", 3, 10), kind: "drain", reason: "a1", phase: "" });
    assert.equal(decodeBoundaryDecision(JOB, "a1", other, "worker"), undefined, "another kind of control");
  });

  test("training wire - an image attempt (head phase, --method augment) round-trips with its data set, frozen stage and augmentation", () => {
    const frozen = sampleExtractionSpec().extraction;
    const a = completeAttempt({ ...input, fineTuneLayers: "0", phase: "head", images: { frozen, augment: toAugmentation({ ...DEFAULT_AUGMENT, fillMode: "nearest" }) } });
    const back = trainingAttemptOf(decode("JobSpec", encodeTrainingSpec(JOB, a), { job: JOB, self: "worker", peer: "coordinator" }))!;
    assert.deepEqual(back, a);
    assert.equal(attemptPhase(back), "head");
    assert.deepEqual(fromAugmentation(back.images!.augment), { ...DEFAULT_AUGMENT, fillMode: "nearest" });
    const none = completeAttempt({ ...input, phase: "fine_tune", images: { frozen, augment: toAugmentation(null) } });
    const noAug = trainingAttemptOf(decode("JobSpec", encodeTrainingSpec(JOB, none), { job: JOB }))!;
    assert.equal(fromAugmentation(noAug.images!.augment), null, "no augmentation stays none");
  });

  test("training wire - an attempt of an older coordinator (no phase, no images) is fine-tuning on cached activations", () => {
    const { phase: _p, images: _i, ...old } = completeAttempt(input);
    const spec = decode("JobSpec", encode("JobSpec", { header: makeHeader(JOB, coordinatorSender("a1")), training: old as TrainingAttempt }), { job: JOB });
    const a = trainingAttemptOf(spec)!;
    assert.equal(a.phase, "");
    assert.equal(attemptPhase(a), "fine_tune");
    assert.equal(a.images, null);
    assert.equal(a.controls, null);
    assert.deepEqual(controlsOf(a), {}, "no controls: plain training, as before");
  });

  test("training wire - the training controls round-trip with their defaults applied once; the replica gets fit()'s controls back", () => {
    const classWeights = Float32Array.from([1, 2, 0.5, 1, 1, 1, 1, 1, 1, 4]);
    const a = completeAttempt({ ...input, controls: { earlyStoppingPatience: 1, restoreBestWeights: true, lrSchedule: "cosine", loss: { classWeights, labelSmoothing: 0.1 } } });
    assert.deepEqual(a.controls, {
      earlyStoppingPatience: 1, restoreBestWeights: true, monitor: "val_loss", lrSchedule: "cosine", lrPatience: 2, lrFactor: 0.2,
      classWeights: Array.from(classWeights), labelSmoothing: 0.1,
    });
    const back = trainingAttemptOf(decode("JobSpec", encodeTrainingSpec(JOB, a), { job: JOB, self: "worker", peer: "coordinator" }))!;
    assert.deepEqual(back, a);
    assert.deepEqual(controlsOf(back), {
      earlyStoppingPatience: 1, restoreBestWeights: true, monitor: "val_loss", lrSchedule: "cosine", lrPatience: 2, lrFactor: 0.2, loss: { classWeights, labelSmoothing: 0.1 },
    });
    const plain = trainingAttemptOf(decode("JobSpec", encodeTrainingSpec(JOB, completeAttempt({ ...input, controls: { monitor: "val_accuracy", lrSchedule: "plateau", lrPatience: 3 } })), { job: JOB }))!;
    assert.deepEqual(controlsOf(plain), {
      earlyStoppingPatience: 0, restoreBestWeights: false, monitor: "val_accuracy", lrSchedule: "plateau", lrPatience: 3, lrFactor: 0.2, loss: { labelSmoothing: 0 },
    }, "no class weights stays none");
  });

  test("training wire - controls a replica cannot apply are refused, with the field named", () => {
    const ok = completeAttempt({ ...input, controls: { restoreBestWeights: true } }).controls!;
    const dec = (patch: Partial<typeof ok>): JobSpec => decode("JobSpec", encodeTrainingSpec(JOB, { ...completeAttempt(input), controls: { ...ok, ...patch } }), { job: JOB });
    rejects(() => dec({ classWeights: [1, 2, 3] }), "bad_shape", /class_weights has 3 weights for 10 classes/);
    rejects(() => dec({ classWeights: [1, 1, 1, 1, 1, 1, 1, 1, 1, -1] }), "malformed", /class_weights/);
    rejects(() => dec({ monitor: "loss" }), "malformed", /controls\.monitor "loss"/);
    rejects(() => dec({ lrSchedule: "step" }), "malformed", /controls\.lr_schedule "step"/);
    rejects(() => dec({ lrFactor: Number.NaN }), "non_finite", /controls/);
    rejects(() => dec({ labelSmoothing: 0.7 }), "malformed", /label_smoothing 0\.7/);
  });

  test("training wire - a report's epochs keep their learning rate and the best epoch's mark", () => {
    const history = [
      { epoch: 1, loss: 1.2, accuracy: 0.5, val_loss: 1.1, val_accuracy: 0.6, lr: 0.001, best: true as const, seconds: 2, samples_per_second: 50 },
      { epoch: 2, loss: 1.0, accuracy: 0.6, val_loss: 1.3, val_accuracy: 0.55, lr: 0.0005, seconds: 2, samples_per_second: 50 },
    ];
    const r = decodeReport(JOB, encodeReport(JOB, { attempt: "a1", worker: "w0", at: 1, state: "done", step: 8, epoch: 1, history }));
    assert.deepEqual(r.history, history);
    const plain = decodeReport(JOB, encodeReport(JOB, { attempt: "a1", worker: "w0", at: 1, state: "done", history: [{ epoch: 1, loss: 1, accuracy: 0.5, seconds: 1, samples_per_second: 1 }] }));
    assert.deepEqual(plain.history, [{ epoch: 1, loss: 1, accuracy: 0.5, seconds: 1, samples_per_second: 1 }], "no rate, no mark: none added");
  });

  test("training wire - an image attempt a replica cannot open is malformed, with the field named", () => {
    const frozen = sampleExtractionSpec().extraction;
    const dec = (patch: Partial<TrainingAttempt>): JobSpec => decode("JobSpec", encodeTrainingSpec(JOB, { ...completeAttempt(input), ...patch }), { job: JOB });
    rejects(() => dec({ images: { frozen: { ...frozen, data: "" }, augment: null } }), "malformed", /extraction\.data is missing/);
    rejects(() => dec({ images: { frozen: { ...frozen, datasetFingerprint: "" }, augment: null } }), "malformed", /extraction fingerprints/);
    rejects(() => dec({ phase: "predict" }), "malformed", /training\.phase "predict"/);
  });

  test("training wire - the sample list of an image attempt keeps ids and labels in order; a broken one is refused", () => {
    const list = { ids: ["fashion-mnist:train:7", "fashion-mnist:train:3", "fashion-mnist:train:11"], labels: Int32Array.from([4, 0, 9]) };
    assert.deepEqual(decodeSampleList(encodeSampleList(list)), list);
    assert.throws(() => decodeSampleList(packArrays({ ids: ["a", "b"], labels: [1] }, [])), /ids and labels differ in length/);
  });

  test("training wire - only a replica that could not open the data set is one that cannot join", () => {
    assert.equal(cannotJoin({ state: "failed", error: "DataUnavailableError: worker w1 cannot open the data set \"/data/x\"" }), true);
    assert.equal(cannotJoin({ state: "failed", error: "Error: no such model" }), false);
    assert.equal(cannotJoin({ state: "evicted", error: "DataUnavailableError: x" }), false);
  });
});

test("data objects - decode the same rows from a view into a larger buffer and from a Node Buffer (whose slice is a view)", () => {
  const x = Float32Array.from({ length: 23 * 320 }, (_, i) => Math.sin(i) * 3);
  const blob = encodeDataObject({ x, sampleShape: [1, 1, 320], y: Int32Array.from({ length: 23 }, (_, i) => i % 10) });
  // What an object store read may hand back: the blob at an offset inside a larger buffer holding other bytes.
  for (const offset of [1, 2, 3, 4, 4096 + 5]) {
    const big = new Uint8Array(offset + blob.length + 64).fill(0x7f);
    big.set(blob, offset);
    for (const bytes of [big.subarray(offset, offset + blob.length), Buffer.from(big.buffer, offset, blob.length)]) {
      const d = decodeDataObject(bytes);
      assert.deepEqual(d.sampleShape, [1, 1, 320]);
      assert.equal(d.y.length, 23);
      assert.deepEqual(d.x, x, `offset ${offset}, ${bytes.constructor.name}`);
    }
  }
});

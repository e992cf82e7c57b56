/** The wire contract: every message round-trips; decode refuses what is not for this receiver. */
import { test } from "node:test";
import assert from "node:assert/strict";
import { DecodeError, EncodeError, MESSAGE_TYPES, PROTOCOL_VERSION, decode, encode } from "../proto/codec.js";
import { jobNames, validateJobId, validateWorkerId } from "../proto/subjects.js";
import { ConfigError } from "../core/runtime/errors.js";
import { float32ToBytes } from "../proto/tensor_codec.js";
import { crc32 } from "../proto/checksum.js";
import { EPOCH, JOB, STEP, normalize, sampleMessages } from "./helpers/messages.js";

const expect = { job: JOB, epoch: EPOCH, step: STEP };

function rejects(fn: () => unknown, reason: DecodeError["reason"], message?: RegExp): void {
  assert.throws(fn, (err: unknown) => {
    assert.ok(err instanceof DecodeError, `expected DecodeError, got ${String(err)}`);
    assert.equal(err.name, "DecodeError");
    assert.equal(err.reason, reason, err.message);
    if (message) assert.match(err.message, message);
    return true;
  });
}

test("proto - every message type round-trips", () => {
  const samples = sampleMessages();
  assert.deepEqual(Object.keys(samples).sort(), [...MESSAGE_TYPES].sort());
  for (const type of MESSAGE_TYPES) {
    const msg = samples[type];
    const bytes = encode(type, msg as never);
    assert.ok(bytes.length > 0 && bytes.length < 1024, `${type} encodes to ${bytes.length} bytes`);
    const back = decode(type, bytes, expect);
    assert.deepStrictEqual(normalize(back), normalize(msg), type);
  }
});

test("proto - decode rejects a message of another job", () => {
  const bytes = encode("ShardTask", sampleMessages().ShardTask);
  rejects(() => decode("ShardTask", bytes, { job: "job-2" }), "wrong_job", /job-1.*job-2/);
});

test("proto - decode rejects a stale membership epoch and a wrong step", () => {
  const bytes = encode("GradientChunk", sampleMessages().GradientChunk);
  rejects(() => decode("GradientChunk", bytes, { job: JOB, epoch: EPOCH + 1 }), "stale_epoch");
  rejects(() => decode("GradientChunk", bytes, { job: JOB, minEpoch: EPOCH + 1 }), "stale_epoch");
  assert.equal(decode("GradientChunk", bytes, { job: JOB, minEpoch: EPOCH }).header.epoch, EPOCH);
  rejects(() => decode("GradientChunk", bytes, { job: JOB, epoch: EPOCH, step: STEP + 1 }), "wrong_step");
  try {
    decode("GradientChunk", bytes, { job: JOB, epoch: EPOCH + 1 });
  } catch (err) {
    assert.ok(err instanceof DecodeError);
    assert.equal(err.header?.epoch, EPOCH, "the header of a refused message is kept");
  }
});

test("proto - decode refuses an old worker with a message saying what to upgrade", () => {
  const hello = sampleMessages().WorkerHello;
  const v0 = encode("WorkerHello", { ...hello, header: { ...hello.header, protocolVersion: 0 } });
  rejects(() => decode("WorkerHello", v0, { job: JOB }), "bad_version", new RegExp(`worker speaks protocol v0, coordinator v${PROTOCOL_VERSION}: upgrade the worker image`));
  const v2 = encode("WorkerHello", { ...hello, header: { ...hello.header, protocolVersion: PROTOCOL_VERSION + 1 } });
  rejects(() => decode("WorkerHello", v2, { job: JOB }), "bad_version", /upgrade the coordinator/);
});

test("proto - decode rejects inconsistent array lengths as bad_shape", () => {
  const s = sampleMessages();
  rejects(() => decode("ShardTask", encode("ShardTask", { ...s.ShardTask, labels: [1] }), expect), "bad_shape");
  rejects(() => decode("FeatureShard", encode("FeatureShard", { ...s.FeatureShard, featureDims: [4] }), expect), "bad_shape", /features hold 24 bytes/);
  const g = s.GradientChunk;
  rejects(() => decode("GradientChunk", encode("GradientChunk", { ...g, length: g.length + 1 }), expect), "bad_shape");
  rejects(() => decode("GradientChunk", encode("GradientChunk", { ...g, dtype: "fp32" }), expect), "bad_shape");
  rejects(() => decode("GradientChunk", encode("GradientChunk", { ...g, chunkIndex: 5, chunkCount: 5 }), expect), "bad_shape");
  const p = s.StepPlan;
  rejects(() => decode("StepPlan", encode("StepPlan", { ...p, globalBatch: 33 }), expect), "bad_shape");
  rejects(() => decode("StepPlan", encode("StepPlan", { ...p, totalLength: 1002 }), expect), "bad_shape");
  rejects(() => decode("StepPlan", encode("StepPlan", { ...p, members: [p.members[0]!, p.members[0]!] }), expect), "bad_shape");
});

test("proto - decode rejects NaN and infinity in tensor data as non_finite", () => {
  const s = sampleMessages();
  for (const bad of [NaN, Infinity, -Infinity]) {
    const data = float32ToBytes(new Float32Array([1, bad, 2]));
    const chunk = { ...s.AveragedChunk, length: 3, data, checksum: 0 };
    // The checksum is checked first; give the right one so the NaN check is what fails.
    const good = { ...chunk, checksum: checksumOf(data) };
    rejects(() => decode("AveragedChunk", encode("AveragedChunk", good), expect), "non_finite");
  }
  const fp16Inf = new Uint8Array([0x00, 0x7c, 0x00, 0x3c]); // +Inf, 1.0
  rejects(() => decode("GradientChunk", encode("GradientChunk", { ...s.GradientChunk, length: 2, data: fp16Inf, checksum: checksumOf(fp16Inf) }), expect), "non_finite");
  const feats = float32ToBytes(new Float32Array([1, 2, 3, 4, NaN, 6]));
  rejects(() => decode("FeatureShard", encode("FeatureShard", { ...s.FeatureShard, features: feats }), expect), "non_finite");
});

test("proto - decode rejects a corrupted chunk by its checksum and missing required fields as malformed", () => {
  const s = sampleMessages();
  rejects(() => decode("GradientChunk", encode("GradientChunk", { ...s.GradientChunk, checksum: s.GradientChunk.checksum ^ 1 }), expect), "malformed", /checksum/);
  rejects(() => decode("ShardTask", encode("ShardTask", { ...s.ShardTask, shardId: "" }), expect), "malformed", /shard_id/);
  rejects(() => decode("ShardTask", new Uint8Array([0xff, 0xff, 0xff]), expect), "malformed");
  rejects(() => decode("Control", new Uint8Array(0), expect), "malformed", /no header/);
  rejects(() => decode("ShardTask", "not bytes" as unknown as Uint8Array, expect), "malformed");
});

test("proto - encode refuses an unknown enum value with EncodeError", () => {
  const s = sampleMessages();
  assert.throws(() => encode("GradientChunk", { ...s.GradientChunk, dtype: "bf16" as never }), (err: unknown) => err instanceof EncodeError && /bf16/.test(err.message));
  assert.throws(() => encode("ShardTask", { ...s.ShardTask, labels: [1.5] as never }), EncodeError);
});

test("subjects - names are job-scoped and job ids are validated", () => {
  const n = jobNames("job-1");
  assert.equal(n.tasks, "ctrain.job-1.tasks");
  assert.equal(n.tasksStream, "CTRAIN_job-1_TASKS");
  assert.equal(n.gradients("worker-3"), "ctrain.job-1.grad.worker-3");
  assert.equal(n.averagedAll, "ctrain.job-1.avg.*");
  assert.match(n.featuresBucket, /^[a-zA-Z0-9_-]+$/);
  assert.match(n.workersBucket, /^[a-zA-Z0-9_-]+$/);
  const subjects = [n.tasks, n.hello, n.heartbeat, n.progress, n.shardDone, n.stepPlan, n.weights, n.control, n.gradientsAll, n.averagedAll];
  assert.equal(new Set(subjects).size, subjects.length, "subjects are distinct");
  for (const bad of ["", "a.b", "a*", "a>", "a b", "-a", "x".repeat(64), "ä"]) assert.throws(() => validateJobId(bad), ConfigError, bad);
  assert.throws(() => n.gradients("w.1"), ConfigError);
  assert.equal(validateWorkerId("w_1"), "w_1");
});


function checksumOf(data: Uint8Array): number {
  return crc32(data);
}

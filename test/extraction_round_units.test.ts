/**
 * The parts of an extraction round that run without NATS: the plan check of a worker's result, the
 * round's ledger (progress, completion, failure), the give-up rule, the wire conversion of a round's
 * settings, and the worker's own checks. The NATS paths are test/distributed_extraction.test.ts.
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import { readdirSync, readFileSync } from "node:fs";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import type { Shard } from "../core/datasets/shards.js";
import { ShardFailedError } from "../core/runtime/errors.js";
import { checkAgainstPlan, ShardRejected } from "../coordinator/extraction_plan_check.js";
import { ExtractionLedger, nextAttempt, shardFailed } from "../coordinator/extraction_ledger.js";
import { decode, DecodeError, encode, makeHeader, type FeatureShard } from "../proto/codec.js";
import {
  decodeAttempts, encodeAttempts, extractionJobSpec, fromExtractionRound, parseMaxDeliveriesAdvisory, ROUND_KEYS, taskMessageId, toExtractionRound, wireShardId, type RoundSource,
} from "../proto/extraction_wire.js";
import { fromWireSplit, toWireSplit } from "../proto/splits.js";
import { jobNames, jobOfTasksStream } from "../proto/subjects.js";
import { float32ToBytes } from "../proto/tensor_codec.js";
import { checkSameInputs, checkShardMemory, isLastDelivery, TerminalShardError } from "../worker/shard_checks.js";
import { JOB, sampleExtractionSpec } from "./helpers/messages.js";

const ROUND = "r0123456789abcdef";
const SHARD: Shard = {
  id: "shard-00000",
  samples: [
    { id: "cat/1.png", label: 0, split: "train" },
    { id: "dog/2.png", label: 1, split: "val" },
    { id: "dog/3.png", label: 1, split: "test" },
  ],
};
const WIRE = wireShardId(ROUND, SHARD.id);

/** A worker's honest result for SHARD: dim-2 features, the last sample skipped. */
function result(over: Partial<FeatureShard> = {}): FeatureShard {
  return {
    header: makeHeader(JOB, "w0"), shardId: WIRE, ids: ["cat/1.png", "dog/2.png"], labels: [0, 1], splits: ["train", "validation"], featureDims: [2],
    features: float32ToBytes(new Float32Array([1, 2, 3, 4])), skipped: [{ id: "dog/3.png", reason: "corrupt", message: "not a PNG" }], worker: "w0", seconds: 0.5,
    ...over,
  };
}

function rejected(fs: FeatureShard, reason: ShardRejected["reason"], dim = 2): void {
  assert.throws(() => checkAgainstPlan(fs, WIRE, SHARD, dim), (e: unknown) => e instanceof ShardRejected && e.reason === reason, reason);
}

test("extraction plan check - an honest result is kept with the plan's labels and splits", () => {
  const d = checkAgainstPlan(result(), WIRE, SHARD, 2);
  assert.equal(d.shardId, SHARD.id);
  assert.deepEqual(d.ids, ["cat/1.png", "dog/2.png"]);
  assert.deepEqual(d.splits, ["train", "val"]);
  assert.deepEqual([...d.features], [1, 2, 3, 4]);
  assert.deepEqual(d.skipped, [{ id: "dog/3.png", reason: "corrupt", message: "not a PNG" }]);
});

test("extraction plan check - each way a result can disagree with the plan is rejected with its reason", () => {
  rejected(result({ shardId: wireShardId(ROUND, "shard-00001") }), "shard_ids");
  rejected(result({ ids: ["cat/1.png", "bird/9.png"] }), "shard_ids");
  rejected(result({ ids: ["cat/1.png", "cat/1.png"] }), "shard_ids");
  rejected(result({ skipped: [] }), "shard_count");
  rejected(result(), "shard_dim", 3);
  rejected(result({ labels: [0, 0] }), "shard_labels");
  rejected(result({ splits: ["train", "train"] }), "shard_splits");
});

test("extraction ledger - progress claims a shard once and counts each image once, never beyond the shard", () => {
  const l = new ExtractionLedger(ROUND, [SHARD]);
  assert.deepEqual(l.counts(), { pending: 1, running: 0, done: 0, failed: 0 });
  assert.deepEqual(l.progress(WIRE, 0), { claimed: true, images: 0 });
  assert.deepEqual(l.counts(), { pending: 0, running: 1, done: 0, failed: 0 });
  assert.deepEqual(l.progress(WIRE, 2), { claimed: false, images: 2 });
  assert.deepEqual(l.progress(WIRE, 1), { claimed: false, images: 0 }, "an older progress message adds nothing");
  assert.deepEqual(l.progress(WIRE, 99), { claimed: false, images: 1 }, "capped at the shard's 3 samples");
  assert.equal(l.progress(wireShardId(ROUND, "shard-00009"), 1), undefined, "not a shard of the round");
});

test("extraction ledger - a stored shard adds the images progress did not report, once; the round finishes", () => {
  const other: Shard = { id: "shard-00001", samples: [{ id: "x", label: 0, split: "train" }] };
  const l = new ExtractionLedger(ROUND, [SHARD, other]);
  l.progress(WIRE, 2);
  assert.deepEqual(l.complete(WIRE), { images: 1 });
  assert.equal(l.complete(WIRE), undefined, "stored twice counts once");
  assert.equal(l.shard(WIRE), undefined);
  assert.equal(l.finished, false);
  assert.deepEqual(l.complete(wireShardId(ROUND, other.id)), { images: 1 });
  assert.equal(l.finished, true);
  assert.deepEqual(l.counts(), { pending: 0, running: 0, done: 2, failed: 0 });
});

test("extraction ledger - one fetch per shard at a time, none after the round failed; the first failure wins", () => {
  const l = new ExtractionLedger(ROUND, [SHARD]);
  assert.equal(l.beginFetch(WIRE), true);
  assert.equal(l.beginFetch(WIRE), false, "already being fetched");
  l.endFetch(WIRE);
  assert.equal(l.beginFetch("r0000000000000000.shard-00000"), false, "another round's shard");
  const first = new Error("first");
  assert.equal(l.fail(first), true);
  assert.equal(l.fail(new Error("second")), false);
  assert.equal(l.failed, first);
  assert.equal(l.beginFetch(WIRE), false);
  assert.equal(l.counts().failed, 1);
});

test("extraction retry - a rejected result is extracted again until max deliver, then the shard fails naming the last error", () => {
  assert.deepEqual(nextAttempt(1, 3), { attempt: 2, giveUp: false });
  assert.deepEqual(nextAttempt(2, 3), { attempt: 3, giveUp: false });
  assert.deepEqual(nextAttempt(3, 3), { attempt: 4, giveUp: true });
  assert.deepEqual(nextAttempt(0, 3), { attempt: 2, giveUp: false }, "an unreadable count starts from the first attempt");
  const e = shardFailed(WIRE, 3, { shard: WIRE, worker: "w1", attempt: 3, error: "ENOENT", at: 0 });
  assert.ok(e instanceof ShardFailedError);
  assert.equal(e.shard, SHARD.id);
  assert.match(e.message, /shard shard-00000 failed after 3 deliveries; last error: ENOENT \(worker w1, delivery 3\)\. Fix the cause/);
  assert.match(shardFailed(WIRE, 5, undefined).message, /no error was reported: the workers holding it died or timed out/);
});

test("extraction wire - a round's settings travel typed: options and extractor -> ExtractionRound -> bytes -> what the worker uses", () => {
  const src: RoundSource = {
    opts: { data: "fashion-mnist", model: "mobilenet_v2", seed: 7, valSplit: 0.2, testSplit: 0.1, limit: 500, maxPixels: 1_000_000, engine: "onnx", threads: 3, backend: "wasm", extractBatchSize: 16 },
    extractor: { inputSize: 96, featureLayer: "block_12_add", pooling: "max", preprocessing: "tf", fingerprint: "f".repeat(64), engine: { precision: "int8" } },
    datasetFingerprint: "d".repeat(64), round: ROUND,
  };
  const bytes = encode("JobSpec", extractionJobSpec(JOB, src));
  const spec = decode("JobSpec", bytes, { job: JOB, self: "worker", peer: "coordinator" });
  assert.deepEqual(spec.extraction, toExtractionRound(src));
  const s = fromExtractionRound(spec.extraction!);
  assert.deepEqual(s.open, { seed: 7, valSplit: 0.2, testSplit: 0.1, limit: 500, maxPixels: 1_000_000 });
  assert.deepEqual(s.extractor, { model: "mobilenet_v2", inputSize: 96, featureLayer: "block_12_add", pooling: "max", preprocessing: "tf", engine: "onnx", precision: "int8" });
  assert.equal(s.imagesPerBatch, 16, "--extract-batch-size reaches the worker");
  assert.equal(s.threads, 3);
  assert.equal(s.data, "fashion-mnist");
  assert.equal(s.extractorFingerprint, "f".repeat(64));
  assert.equal(s.datasetFingerprint, "d".repeat(64));
});

test("extraction wire - decode refuses an extraction round without a required setting", () => {
  const good = sampleExtractionSpec();
  const refuses = (change: Record<string, unknown>, reason: DecodeError["reason"], what: RegExp): void => {
    const bytes = encode("JobSpec", { ...good, extraction: { ...good.extraction, ...change } });
    assert.throws(() => decode("JobSpec", bytes, { job: JOB }), (e: unknown) => e instanceof DecodeError && e.reason === reason && what.test(e.message), JSON.stringify(change));
  };
  refuses({ imagesPerBatch: 0 }, "malformed", /images_per_batch/);
  refuses({ data: "" }, "malformed", /extraction\.data/);
  refuses({ featureLayer: "" }, "malformed", /feature_layer/);
  refuses({ datasetFingerprint: "" }, "malformed", /fingerprints/);
  refuses({ valSplit: NaN }, "non_finite", /val_split/);
  refuses({ testSplit: 1 }, "malformed", /test_split/);
  // An unset enum is what an older coordinator sends: refused, never read as a default.
  const noPooling = encode("JobSpec", { ...good, extraction: { ...good.extraction, pooling: undefined as never } });
  assert.throws(() => decode("JobSpec", noPooling, { job: JOB }), (e: unknown) => e instanceof DecodeError && e.reason === "malformed" && /pooling/.test(e.message));
});

test("extraction wire - splits map one way each, state keys and task ids are proto's", () => {
  for (const s of ["train", "val", "test"] as const) assert.equal(fromWireSplit(toWireSplit(s)), s);
  assert.equal(toWireSplit("val"), "validation");
  assert.equal(ROUND_KEYS.spec(ROUND), `spec.${ROUND}`);
  assert.equal(ROUND_KEYS.shardOfFailed(ROUND_KEYS.failed(WIRE)), WIRE);
  assert.equal(ROUND_KEYS.shardOfFailed(ROUND_KEYS.error(WIRE)), undefined);
  assert.equal(ROUND_KEYS.shardOfFailed("failed.nonsense"), undefined);
  assert.equal(decodeAttempts(encodeAttempts(4)), 4);
  assert.equal(decodeAttempts(new TextEncoder().encode("x")), 1);
  assert.equal(decodeAttempts(undefined), 1);
  assert.equal(taskMessageId(WIRE, 1), WIRE);
  assert.equal(taskMessageId(WIRE, 3), `${WIRE}@3`);
  assert.deepEqual(parseMaxDeliveriesAdvisory(new TextEncoder().encode('{"stream_seq":12,"deliveries":5}')), { streamSeq: 12, deliveries: 5 });
  assert.equal(parseMaxDeliveriesAdvisory(new TextEncoder().encode("{}")), undefined);
  assert.equal(parseMaxDeliveriesAdvisory(new TextEncoder().encode("not json")), undefined);
  const n = jobNames("job-1");
  assert.equal(n.tasksMaxDeliveries, `$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.${n.tasksStream}.${n.tasksConsumer}`);
  assert.equal(jobOfTasksStream(n.tasksStream), "job-1");
  assert.equal(jobOfTasksStream("KV_ctrain-job-1-state"), undefined);
});

test("extraction worker checks - another model or data set, a shard too big, and the last delivery are final", () => {
  const s = { data: "fashion-mnist", extractorFingerprint: "a".repeat(64), datasetFingerprint: "b".repeat(64) };
  checkSameInputs(s, "a".repeat(64), "b".repeat(64));
  assert.throws(() => checkSameInputs(s, "c".repeat(64), "b".repeat(64)), (e: unknown) => e instanceof TerminalShardError && /run the same --model on both$/.test(e.message));
  // int8: the CPUs' VNNI decides the weight bits, so it is named too.
  const int8 = { ...s, extractor: { precision: "int8" } };
  assert.throws(() => checkSameInputs(int8, "c".repeat(64), "b".repeat(64)), (e: unknown) => e instanceof TerminalShardError && /run the same --model on both; with --engine-precision int8 .* agree on VNNI/.test(e.message));
  assert.throws(() => checkSameInputs(s, "a".repeat(64), "c".repeat(64)), (e: unknown) => e instanceof TerminalShardError && /data set fashion-mnist differs.*share the same files/.test(e.message));
  const x = { featureDim: 1280, featureShape: [3, 3, 1280], inputSize: 96 };
  checkShardMemory(WIRE, 10, x, 32, 2 ** 30);
  assert.throws(() => checkShardMemory(WIRE, 100_000, x, 32, 2 ** 20), (e: unknown) => e instanceof TerminalShardError && /lower --shard-size or use --pooling avg/.test(e.message));
  assert.equal(isLastDelivery(new TerminalShardError("x"), 1, 5), true);
  assert.equal(isLastDelivery(new Error("x"), 4, 5), false);
  assert.equal(isLastDelivery(new Error("x"), 5, 5), true);
  assert.equal(isLastDelivery(new Error("x"), 50, -1), false, "unbounded deliveries");
});

test("extraction wire - coordinator and worker extraction code builds no subject, stream or KV key by hand", () => {
  const root = fileURLToPath(new URL("../../", import.meta.url));
  const files = [
    ...readdirSync(join(root, "coordinator")).filter((f) => /^(extraction.*|nats_executor|worker_registry)\.ts$/.test(f)).map((f) => join("coordinator", f)),
    ...readdirSync(join(root, "worker")).filter((f) => /^(nats_worker|extraction_executor|extractor_cache|shard_checks|in_progress_acks)\.ts$/.test(f)).map((f) => join("worker", f)),
  ];
  assert.ok(files.length >= 8, files.join(", "));
  // A string or template literal that starts like a subject, a KV key of a round, or a stream name.
  const inline = /[`"'](\$JS\.|\$KV\.|ctrain\.|CTRAIN_|spec\.|error\.|failed\.|retry\.)/;
  for (const f of files) {
    const lines = readFileSync(join(root, f), "utf8").split("\n");
    lines.forEach((line, i) => assert.doesNotMatch(line.replace(/^\s*(\*|\/\/).*$/, ""), inline, `${f}:${i + 1} builds a NATS name by hand`));
  }
});

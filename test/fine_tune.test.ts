/**
 * Fine-tuning on real MobileNetV2 weights (nsfwjs) and a few hundred real Fashion-MNIST images at
 * input 64, on the wasm backend with ctrain's training kernels: which layers train, that frozen
 * weights and BatchNorm statistics never move, that validation loss goes down from where the head
 * phase left it, that the activation cache spares the frozen part on a second run, and the export.
 */
import assert from "node:assert/strict";
import { existsSync } from "node:fs";
import { mkdtemp, readFile, readdir, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, describe, test } from "node:test";
import * as tf from "@tensorflow/tfjs";
import { selectBackend } from "../core/models/backend.js";
import { type JobOptions, resolveOptions } from "../core/runtime/config.js";
import { FASHION_MNIST_DIR } from "../core/datasets/open.js";
import { cutTopology, preprocess } from "../core/models/feature_model.js";
import { createLogger } from "../core/runtime/log.js";
import { loadModel } from "../core/models/model_io.js";
import { buildSplit, fineTuneModel, planSplit } from "../core/models/model_split.js";
import { loadPretrained, type PretrainedSource } from "../core/models/model_zoo.js";
import { buildHead } from "../core/models/head.js";
import { registerWasmTrainingKernels } from "../core/models/wasm_kernels.js";
import { fineTune } from "../coordinator/fine_tuning.js";
import { runJob, type JobSummary } from "../coordinator/job.js";
import { inProcessCluster } from "../cli/cluster.js";
import { computeGradients } from "../core/training/train_loop.js";
import { ConfigError } from "../core/runtime/errors.js";

const skip = existsSync(FASHION_MNIST_DIR) ? false : `${FASHION_MNIST_DIR} missing (apt-get install dataset-fashion-mnist)`;
const quiet = createLogger({ job: "test", format: "json", stream: { write: () => true }, level: "error" });

let dir: string;
let source: PretrainedSource;
before(async () => {
  dir = await mkdtemp(join(tmpdir(), "ctrain-ft-"));
  await selectBackend("wasm");
  registerWasmTrainingKernels();
  source = await loadPretrained("mobilenet_v2");
});
after(async () => {
  await rm(dir, { recursive: true, force: true });
});

/** Every weight of a model (nested models included) by layer/weight name, as bytes. */
function snapshot(model: tf.LayersModel): Map<string, Uint8Array> {
  const out = new Map<string, Uint8Array>();
  for (const w of model.weights) {
    const v = w.read().dataSync() as Float32Array;
    out.set(w.originalName ?? w.name, new Uint8Array(v.slice().buffer));
  }
  return out;
}

function sameBytes(a: Uint8Array, b: Uint8Array): boolean {
  return a.length === b.length && Buffer.compare(Buffer.from(a), Buffer.from(b)) === 0;
}

test("fine-tuning - counts layers like Keras and cuts at a single tensor", () => {
  const { topology } = cutTopology(source.artifacts.modelTopology as object, { inputSize: 64, outputLayer: "block_12_add" });
  const p = planSplit(topology, "9");
  assert.equal(p.firstUnfrozen, "block_12_expand", "the top 9 layers are block 12 (expand .. add)");
  assert.equal(p.cutLayer, "block_11_add", "the residual block is cut at its input");
  assert.deepEqual(p.trainableLayers, ["block_12_expand", "block_12_expand_relu", "block_12_depthwise", "block_12_depthwise_relu", "block_12_project", "block_12_add"]);
  const byName = planSplit(topology, "block_12_depthwise");
  assert.equal(byName.cutLayer, "block_11_add", "inside a residual block the cut moves down to the block's input");
  assert.equal(byName.trainableLayers[0], "block_12_depthwise");
  const { topology: full } = cutTopology(source.artifacts.modelTopology as object, { inputSize: 64, outputLayer: "out_relu" });
  assert.equal(planSplit(full, "3").cutLayer, "block_16_project_BN", "no residual above block 16: cut just below Conv_1");
  assert.throws(() => planSplit(topology, "0"), ConfigError);
  assert.throws(() => planSplit(topology, "100000"), ConfigError);
  assert.throws(() => planSplit(topology, "no_such_layer"), /neither a count nor a layer/);
});

test("fine-tuning - frozen layers and all BatchNorm statistics are bit-identical, trainable ones move", async () => {
  const split = await buildSplit(source, { inputSize: 64, featureLayer: "block_12_add", unfreeze: "9" });
  const head = buildHead({ featureDim: 96, numClasses: 4, seed: 3 });
  const n = 24;
  const rng = tf.randomUniform([n, 64, 64, 3], 0, 255, "float32", 7);
  const acts = tf.tidy(() => split.bottom.predict(preprocess(rng as tf.Tensor4D, "tf")) as tf.Tensor);
  const data = { x: acts.dataSync() as Float32Array, sampleShape: split.cutShape, y: Int32Array.from({ length: n }, (_, i) => i % 4) };
  tf.dispose([rng, acts]);
  const trainable = new Set(split.top.trainableWeights.map((w) => w.originalName ?? w.name));
  assert.equal(trainable.size, 3, "block 12's expand, depthwise and project kernels (MobileNetV2 convs have no bias)");
  for (const name of trainable) assert.ok(!/_BN\//.test(name), `${name} is not a BatchNorm weight`);
  const before = new Map([...snapshot(split.bottom), ...snapshot(split.top)]);
  const bnCount = [...before.keys()].filter((k) => /moving_(mean|variance)/.test(k)).length;
  assert.ok(bnCount > 40, `BatchNorm statistics are in the snapshot (${bnCount})`);
  await fineTune(split, head, { kind: "activations", train: data, val: data, test: data }, {
    epochs: 2, batchSize: 8, learningRate: 1e-3, seed: 1, numClasses: 4, pooling: "avg", preprocessing: "tf", augment: null,
  });
  const after_ = new Map([...snapshot(split.bottom), ...snapshot(split.top)]);
  let moved = 0;
  for (const [name, bytes] of before) {
    if (trainable.has(name)) { if (!sameBytes(bytes, after_.get(name)!)) moved++; continue; }
    assert.ok(sameBytes(bytes, after_.get(name)!), `frozen weight ${name} changed`);
  }
  assert.equal(moved, trainable.size, "every unfrozen kernel trained");
});

test("fine-tuning - tf.memory().numTensors does not grow across steps", async () => {
  const split = await buildSplit(source, { inputSize: 64, featureLayer: "block_12_add", unfreeze: "9" });
  const head = buildHead({ featureDim: 96, numClasses: 3, seed: 1 });
  const model = fineTuneModel(split, head, "avg", false);
  const size = split.cutShape.reduce((a, b) => a * b, 1);
  const batch = { x: new Float32Array(6 * size).map((_, i) => Math.sin(i)), sampleShape: split.cutShape, y: Int32Array.from([0, 1, 2, 0, 1, 2]) };
  const opt = tf.train.adam(1e-4);
  const counts: number[] = [];
  for (let i = 0; i < 5; i++) {
    const s = computeGradients(model, batch, 3);
    opt.applyGradients(s.grads as never);
    tf.dispose(s.grads);
    counts.push(tf.memory().numTensors);
  }
  opt.dispose();
  assert.equal(counts[4], counts[1], `numTensors per step: ${counts.join(", ")}`);
});

describe("fine-tuning - a whole job with the activation cache", { skip }, () => {
  let first: JobSummary;
  let second: JobSummary;
  let out1: string;
  const cacheDir = () => join(dir, "cache");
  const opts = (out: string) => resolveOptions({
    data: "fashion-mnist", limit: 300, inputSize: 64, featureLayer: "block_12_add", epochs: 8, dropout: 0.2,
    fineTuneLayers: "9", fineTuneEpochs: 3, backend: "wasm", workers: 1, cacheDir: cacheDir(), out, metricsPort: -1, job: "ft-test",
  });

  before(async () => {
    out1 = join(dir, "run1");
    const inProcess = (o: JobOptions) => ({ log: quiet, cluster: inProcessCluster(o) });
    first = await runJob(opts(out1), inProcess(opts(out1)));
    second = await runJob(opts(join(dir, "run2")), inProcess(opts(join(dir, "run2"))));
  });

  test("fine-tuning - lowers validation loss relative to the end of the head phase", async () => {
    const history = JSON.parse(await readFile(join(out1, "history.json"), "utf8")) as Record<string, { val_loss: number }[]>;
    const headEnd = history["head"].at(-1)!.val_loss;
    const ftEnd = history["fine_tune"].at(-1)!.val_loss;
    assert.equal(history["fine_tune"].length, 3);
    assert.ok(ftEnd < headEnd, `fine-tune val_loss ${ftEnd} < head val_loss ${headEnd}`);
    assert.ok(first.phases.fine_tune, "summary.json has phases.fine_tune");
    for (const k of ["epochs", "val_accuracy", "test_accuracy", "seconds"] as const) assert.equal(typeof first.phases.fine_tune![k], "number");
    const report = await readFile(join(out1, "report.html"), "utf8");
    assert.match(report, /Phase: head/);
    assert.match(report, /Phase: fine_tune/);
  });

  test("fine-tuning - the second run reads the cached activations instead of running the frozen part", async () => {
    assert.equal(first.fine_tune?.activation_cache?.cache_hit, false);
    assert.ok((first.fine_tune?.activation_cache?.images ?? 0) > 0);
    assert.equal(second.fine_tune?.activation_cache?.cache_hit, true);
    assert.equal(second.fine_tune?.activation_cache?.images, 0, "no image went through the frozen part again");
    const entries = (await readdir(cacheDir())).filter((n) => !n.includes("."));
    assert.equal(entries.length, 2, `one entry for the pooled features, one for the activations: ${entries.join(", ")}`);
    const meta = JSON.parse(await readFile(join(cacheDir(), second.fine_tune!.activation_cache!.key, "meta.json"), "utf8")) as { featureShape: number[]; pooling: string; featureLayer: string };
    assert.deepEqual(meta.featureShape, [4, 4, 96]);
    assert.equal(meta.pooling, "none");
    assert.equal(meta.featureLayer, "block_11_add");
    assert.equal(second.phases.fine_tune!.test_accuracy, first.phases.fine_tune!.test_accuracy, "same seed, same result from the cache");
  });

  test("fine-tuning - model/ is the fine-tuned classifier, model-head/ the head-only one", async () => {
    const ft = await loadModel(join(out1, "model"));
    const headOnly = await loadModel(join(out1, "model-head"));
    const x = tf.randomUniform([4, 64, 64, 3], -1, 1, "float32", 5);
    const a = (ft.predict(x) as tf.Tensor).dataSync();
    const b = (headOnly.predict(x) as tf.Tensor).dataSync();
    let diff = 0;
    for (let i = 0; i < a.length; i++) diff = Math.max(diff, Math.abs(a[i] - b[i]));
    assert.ok(diff > 1e-6, "the two exports differ");
    assert.equal(ft.inputs[0].shape[1], 64);
    tf.dispose([x]);
    ft.dispose();
    headOnly.dispose();
  });
});

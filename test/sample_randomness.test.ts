/**
 * Training randomness drawn from (seed, epoch, global sample index) only: a batch's gradient computed
 * whole equals the sample-weighted sum of its parts' gradients computed apart, with dropout 0.5 and
 * augmentation on (the data-parallel equivalence, on real Fashion-MNIST images through a conv layer
 * and ctrain's head); the per-sample dropout masks keep 1 - rate of the units, differ across epochs,
 * samples and layers; and a head saved through the user-facing model files still says Dropout,
 * loads in plain TF.js (a child process that never imports ctrain) and converts to ONNX.
 */
import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import { existsSync } from "node:fs";
import { mkdtemp, readFile, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { promisify } from "node:util";
import { before, describe, test } from "node:test";
import * as tf from "@tensorflow/tfjs";
import ort from "onnxruntime-node";
import { resolveAugment } from "../core/datasets/augment.js";
import { FASHION_MNIST_DIR, openDataset } from "../core/datasets/open.js";
import { activeBackend, selectBackend } from "../core/models/backend.js";
import { buildHead } from "../core/models/head.js";
import { loadModel, saveModel } from "../core/models/model_io.js";
import { layersModelToOnnx } from "../core/models/onnx/export.js";
import { SampleDropout, withSampleKeys } from "../core/models/sample_dropout.js";
import { registerWasmTrainingKernels } from "../core/models/wasm_kernels.js";
import { Rng } from "../core/runtime/rng.js";
import { type SampleKeys } from "../core/runtime/sample_keys.js";
import { imageBatch, imageBatches, type ImageSource, openImages } from "../core/training/image_batches.js";
import { type ArrayData, computeGradients, epochBatches } from "../core/training/train_loop.js";

const skip = existsSync(FASHION_MNIST_DIR) ? false : `${FASHION_MNIST_DIR} missing (apt-get install dataset-fashion-mnist)`;
const ROOT = fileURLToPath(new URL("../../", import.meta.url));

before(async () => {
  await selectBackend("wasm");
  if (activeBackend()?.tfBackend === "wasm") registerWasmTrainingKernels();
});

/** Images [32, 32, 3] -> conv (stride 2) -> ctrain's head (pool, dense 16, dropout, softmax over 10). */
function imageModel(dropout: number): tf.LayersModel {
  const input = tf.input({ shape: [32, 32, 3] });
  const conv = tf.layers.conv2d({ filters: 4, kernelSize: 3, strides: 2, activation: "relu", kernelInitializer: tf.initializers.glorotUniform({ seed: 11 }), name: "conv" });
  const head = buildHead({ featureDim: 0, inputShape: [15, 15, 4], numClasses: 10, units: 16, dropout, seed: 3 });
  return tf.model({ inputs: input, outputs: head.apply(conv.apply(input)) as tf.SymbolicTensor });
}

type Grads = Map<string, Float32Array>;

function gradsOf(model: tf.LayersModel, batch: ArrayData, keys: { seed: number; epoch: number }): Grads {
  const g = computeGradients(model, batch, 10, {}, keys).grads;
  const out = new Map(Object.entries(g).map(([k, t]) => [k, t.dataSync() as Float32Array]));
  tf.dispose(g);
  return out;
}

/** max |a - b| / max |a| over all gradients. */
function relDiff(a: Grads, b: Grads): number {
  let diff = 0, scale = 0;
  for (const [k, va] of a) {
    const vb = b.get(k)!;
    for (let i = 0; i < va.length; i++) {
      diff = Math.max(diff, Math.abs(va[i] - vb[i]));
      scale = Math.max(scale, Math.abs(va[i]));
    }
  }
  return diff / scale;
}

/** (na * a + nb * b) / (na + nb): the mean-loss gradient of the batch two parts make up. */
function weighted(a: Grads, na: number, b: Grads, nb: number): Grads {
  return new Map([...a].map(([k, va]) => [k, va.map((v, i) => (na * v + nb * b.get(k)![i]) / (na + nb))]));
}

describe("sample randomness - data-parallel equivalence", () => {
  let train: ImageSource;
  before(async () => {
    if (skip) return;
    const dataset = await openDataset("fashion-mnist", { seed: 3, valSplit: 0.1, testSplit: 0.1, limit: 80, maxPixels: 40_000_000 });
    train = await openImages(dataset, dataset.samples.filter((s) => s.split === "train"), 32);
  });

  test("sample randomness - a batch's gradient equals the weighted sum of its parts', with dropout 0.5 and augmentation", { skip }, async (t) => {
    const model = imageModel(0.5);
    const augment = resolveAugment();
    const seed = 42, epoch = 2;
    const indices = epochBatches(train.size, 16, seed, epoch)[1];
    // The whole batch as fit gets it (batch 1 of the epoch), and two parts of 10 and 6 samples as two workers make them.
    const whole = await imageBatches(train, { seed, preprocessing: "tf", augment }).batch(indices, 1, epoch);
    const first = await imageBatch(train, indices.subarray(0, 10), "tf", augment, { seed, epoch });
    const second = await imageBatch(train, indices.subarray(10), "tf", augment, { seed, epoch });
    assert.deepEqual(Array.from(whole.index!), Array.from(indices), "rows carry their sample indices");
    const g = gradsOf(model, whole, { seed, epoch });
    const parts = weighted(gradsOf(model, first, { seed, epoch }), 10, gradsOf(model, second, { seed, epoch }), 6);
    const d = relDiff(g, parts);
    t.diagnostic(`whole vs parts: relative max diff ${d.toExponential(2)}`);
    assert.ok(d < 1e-5, `whole vs parts: relative max diff ${d}`);
    // The check has teeth: another epoch's masks, or a part keyed by its rows instead of its samples, change the gradient.
    assert.ok(relDiff(g, gradsOf(model, whole, { seed, epoch: epoch + 1 })) > 1e-3, "another epoch drops other units");
    const unkeyed = weighted(gradsOf(model, first, { seed, epoch }), 10, gradsOf(model, { ...second, index: undefined }, { seed, epoch }), 6);
    assert.ok(relDiff(g, unkeyed) > 1e-3, "a part keyed by its row numbers is not the same computation");
    model.dispose();
  });

  test("sample randomness - augmentation of a sample does not depend on the batch it is in", { skip }, async () => {
    const augment = resolveAugment();
    const a = await imageBatch(train, [5, 6, 7], "none", augment, { seed: 1, epoch: 0 });
    const b = await imageBatch(train, [7, 9, 5], "none", augment, { seed: 1, epoch: 0 });
    const c = await imageBatch(train, [5], "none", augment, { seed: 1, epoch: 1 });
    const px = 32 * 32 * 3;
    assert.deepEqual(a.x.subarray(0, px), b.x.subarray(2 * px, 3 * px), "sample 5");
    assert.deepEqual(a.x.subarray(2 * px), b.x.subarray(0, px), "sample 7");
    assert.notDeepEqual(a.x.subarray(0, px), c.x, "sample 5 in another epoch");
  });
});

/** The mask a SampleDropout layer applies to `rows` rows of `units` ones (0 or 1 / (1 - rate)). */
function maskOf(layer: SampleDropout, keys: SampleKeys | undefined, units: number, training = true): Float32Array {
  const rows = keys?.index.length ?? 4;
  const run = (): Float32Array => tf.tidy(() => (layer.apply(tf.ones([rows, units]), { training }) as tf.Tensor).dataSync() as Float32Array);
  return keys ? withSampleKeys(keys, run) : run();
}

/** Fraction of positions where two masks agree (kept or dropped). */
function agreement(a: Float32Array, b: Float32Array): number {
  let same = 0;
  for (let i = 0; i < a.length; i++) if ((a[i] > 0) === (b[i] > 0)) same++;
  return same / a.length;
}

const iota = (from: number, n: number): Int32Array => Int32Array.from({ length: n }, (_, i) => from + i);

/** Agreement of two independent rate-0.5 masks is 1/2: within `tol` (over 7 sigma for the sizes compared here). */
const nearHalf = (x: number, tol = 0.03): boolean => Math.abs(x - 0.5) < tol;

describe("sample randomness - dropout masks", () => {
  test("sample randomness - masks keep 1 - rate of the units, scaled by 1 / (1 - rate)", () => {
    for (const rate of [0.2, 0.5, 0.8]) {
      const m = maskOf(new SampleDropout({ rate, name: "d" }), { seed: 7, epoch: 0, index: iota(0, 64) }, 1024);
      const kept = m.filter((v) => v > 0);
      assert.ok(kept.every((v) => Math.abs(v - 1 / (1 - rate)) < 1e-6), "kept units are scaled");
      assert.ok(m.every((v) => v === 0 || v > 0));
      const frac = kept.length / m.length;
      assert.ok(Math.abs(frac - (1 - rate)) < 0.01, `rate ${rate}: kept ${frac}`);
      // Every unit is kept about as often (no unit always dropped).
      for (let j = 0; j < 1024; j += 97) {
        let k = 0;
        for (let i = 0; i < 64; i++) if (m[i * 1024 + j] > 0) k++;
        assert.ok(k > 0 && k < 64, `unit ${j} kept ${k} of 64 times`);
      }
    }
  });

  test("sample randomness - masks differ across epochs, samples, seeds and layers, and not across batches", () => {
    const layer = new SampleDropout({ rate: 0.5, name: "d" });
    const keys = { seed: 7, epoch: 0, index: iota(100, 32) };
    const m = maskOf(layer, keys, 512);
    assert.ok(nearHalf(agreement(m, maskOf(layer, { ...keys, epoch: 1 }, 512))), "another epoch: independent masks");
    assert.ok(nearHalf(agreement(m, maskOf(layer, { ...keys, seed: 8 }, 512))), "another seed: independent masks");
    assert.ok(nearHalf(agreement(m, maskOf(layer, { ...keys, index: iota(101, 32) }, 512))), "the next sample: an independent mask");
    assert.ok(nearHalf(agreement(m, maskOf(new SampleDropout({ rate: 0.5, name: "d2" }), keys, 512))), "another layer: independent masks");
    // Sample 110 as row 10 of one batch and row 0 of another.
    const other = maskOf(layer, { ...keys, index: Int32Array.from([110, 3, 4]) }, 512);
    assert.deepEqual(other.subarray(0, 512), m.subarray(10 * 512, 11 * 512));
    assert.deepEqual(maskOf(layer, keys, 512), m, "the same keys give the same masks");
  });

  test("sample randomness - identity at inference; random without sample keys; a wrong index is refused", () => {
    const layer = new SampleDropout({ rate: 0.5, name: "d" });
    assert.ok(maskOf(layer, { seed: 1, epoch: 0, index: iota(0, 4) }, 64, false).every((v) => v === 1), "inference: identity");
    const a = maskOf(layer, undefined, 1024), b = maskOf(layer, undefined, 1024);
    assert.ok(nearHalf(agreement(a, b), 0.06), "without keys each call draws a fresh mask, as tf.layers.dropout");
    assert.throws(() => withSampleKeys({ seed: 1, epoch: 0, index: iota(0, 3) }, () => tf.tidy(() => layer.apply(tf.ones([4, 8]), { training: true }) as tf.Tensor)), /3 samples, the batch has 4/);
    const before = tf.memory().numTensors;
    maskOf(layer, { seed: 1, epoch: 0, index: iota(0, 4) }, 64);
    assert.equal(tf.memory().numTensors, before, "no tensor leaks");
  });
});

const execFileP = promisify(execFile);

/** Loads `dir` in a Node process that imports only @tensorflow/tfjs and predicts `x` ([n, 8]). */
async function plainTfjs(dir: string, x: Float32Array, n: number): Promise<{ className: string; ctor: string; rate: number; y: number[] }> {
  const script = `
    import * as tf from "@tensorflow/tfjs";
    import { readFileSync } from "node:fs";
    const dir = process.env.MODEL_DIR;
    const j = JSON.parse(readFileSync(dir + "/model.json", "utf8"));
    const w = readFileSync(dir + "/weights.bin");
    const m = await tf.loadLayersModel(tf.io.fromMemory({ modelTopology: j.modelTopology, weightSpecs: j.weightsManifest[0].weights, weightData: w.buffer.slice(w.byteOffset, w.byteOffset + w.byteLength) }));
    const d = m.getLayer("head_dropout");
    const y = m.predict(tf.tensor2d(JSON.parse(process.env.X), [${n}, 8]));
    console.log("RESULT " + JSON.stringify({ className: d.getClassName(), ctor: d.constructor.name, rate: d.rate, y: Array.from(y.dataSync()) }));`;
  const { stdout } = await execFileP(process.execPath, ["--input-type=module", "-e", script], { cwd: ROOT, env: { ...process.env, MODEL_DIR: dir, X: JSON.stringify(Array.from(x)) } });
  const line = stdout.split("\n").find((l) => l.startsWith("RESULT "));
  assert.ok(line, `plain TF.js printed a result: ${stdout}`);
  return JSON.parse(line.slice(7));
}

describe("sample randomness - saved models", () => {
  test("sample randomness - a saved head says Dropout, loads in plain TF.js and in ctrain with the same predictions", async () => {
    const dir = await mkdtemp(join(tmpdir(), "ctrain-dropout-"));
    try {
      const head = buildHead({ featureDim: 8, numClasses: 3, units: 16, dropout: 0.5, seed: 3 });
      await saveModel(head, dir);
      const json = JSON.parse(await readFile(join(dir, "model.json"), "utf8")) as { modelTopology: { config: { layers: { class_name: string; config: Record<string, unknown> }[] } } };
      const layer = json.modelTopology.config.layers.find((l) => l.config["name"] === "head_dropout")!;
      assert.equal(layer.class_name, "Dropout");
      assert.equal(layer.config["rate"], 0.5);
      const rng = new Rng(1);
      const x = Float32Array.from({ length: 5 * 8 }, () => rng.next() * 2 - 1);
      const want = Array.from(tf.tidy(() => (head.predict(tf.tensor2d(x, [5, 8])) as tf.Tensor).dataSync()));
      const plain = await plainTfjs(dir, x, 5);
      assert.equal(plain.className, "Dropout");
      assert.equal(plain.ctor, "Dropout", "plain TF.js builds its own Dropout");
      assert.equal(plain.rate, 0.5);
      plain.y.forEach((v, i) => assert.ok(Math.abs(v - want[i]) < 1e-5, `plain TF.js prediction ${i}: ${v} vs ${want[i]}`));
      const loaded = await loadModel(dir);
      assert.ok(loaded.getLayer("head_dropout") instanceof SampleDropout, "ctrain loads it as its per-sample dropout");
      const got = Array.from(tf.tidy(() => (loaded.predict(tf.tensor2d(x, [5, 8])) as tf.Tensor).dataSync()));
      got.forEach((v, i) => assert.ok(Math.abs(v - want[i]) < 1e-6));
      head.dispose();
      loaded.dispose();
    } finally {
      await rm(dir, { recursive: true, force: true });
    }
  });

  test("sample randomness - a model with the head's dropout converts to ONNX (as the identity)", async () => {
    const model = imageModel(0.5);
    const ex = layersModelToOnnx(model, { preprocessing: "unit", inputDtype: "float32" });
    const rng = new Rng(4);
    const px = Float32Array.from({ length: 2 * 32 * 32 * 3 }, () => rng.int(256));
    const want = tf.tidy(() => (model.predict(tf.tensor4d(px, [2, 32, 32, 3]).div(255)) as tf.Tensor).dataSync() as Float32Array);
    const session = await ort.InferenceSession.create(ex.bytes);
    const out = await session.run({ [ex.inputName]: new ort.Tensor("float32", px, [2, 32, 32, 3]) });
    await session.release();
    const got = out[ex.outputName].data as Float32Array;
    want.forEach((v, i) => assert.ok(Math.abs(v - got[i]) < 1e-4, `output ${i}: onnx ${got[i]} vs tfjs ${v}`));
    model.dispose();
  });
});

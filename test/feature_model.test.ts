/**
 * The pretrained base: nsfwjs' Keras MobileNetV2 loads offline with dequantized weights, topology
 * surgery (input size, cut point, pooling) keeps the pretrained weights and computes exactly what the
 * original model computes at the cut.
 */
import assert from "node:assert/strict";
import { before, describe, test } from "node:test";
import * as tf from "@tensorflow/tfjs";
import { selectBackend } from "../core/models/backend.js";
import { buildFeatureExtractor, cutTopology, preprocess } from "../core/models/feature_model.js";
import { loadPretrained, type PretrainedSource } from "../core/models/model_zoo.js";

let source: PretrainedSource;
before(async () => {
  await selectBackend("wasm");
  source = await loadPretrained("mobilenet_v2");
});

function pseudoImages(n: number, size: number, seed: number): Uint8Array {
  const out = new Uint8Array(n * size * size * 3);
  let s = seed;
  for (let i = 0; i < out.length; i++) {
    s = (s * 1103515245 + 12345) >>> 0;
    out[i] = (s >>> 16) & 0xff;
  }
  return out;
}

describe("model - built-in mobilenet_v2", () => {
  test("model - loads offline from nsfwjs with uint8-quantized weights dequantized", () => {
    const specs = source.artifacts.weightSpecs!;
    assert.ok(specs.length > 200);
    assert.ok(specs.some((s) => s.quantization?.dtype === "uint8"), "weights manifest carries quantization");
    assert.equal(source.preprocessing, "unit");
    assert.match(source.fingerprint, /^[0-9a-f]{64}$/);
  });

  test("model - surgery at 224 computes what the whole original model computes at out_relu", async () => {
    // The original model, whole, with its own classifier: read out_relu through a second output.
    const whole = await tf.loadLayersModel(tf.io.fromMemory(source.artifacts));
    const probe = tf.model({ inputs: whole.inputs, outputs: whole.getLayer("out_relu").output as tf.SymbolicTensor });
    const fx = await buildFeatureExtractor(source, { inputSize: 224, featureLayer: "out_relu", pooling: "none" });
    const imgs = pseudoImages(2, 224, 3);
    const expected = tf.tidy(() => (probe.predict(preprocess(tf.tensor4d(imgs, [2, 224, 224, 3], "int32"), source.preprocessing)) as tf.Tensor).dataSync());
    const got = await fx.extract(imgs, 2);
    assert.equal(got.length, expected.length);
    assert.deepEqual(fx.featureShape, [7, 7, 1280]);
    let maxDiff = 0;
    for (let i = 0; i < got.length; i++) maxDiff = Math.max(maxDiff, Math.abs(got[i] - expected[i]));
    assert.ok(maxDiff < 1e-4, `max difference ${maxDiff}`);
    fx.dispose();
    whole.dispose();
  });

  test("model - a new input size reuses the same pretrained weights", async () => {
    const a = await buildFeatureExtractor(source, { inputSize: 96, featureLayer: "out_relu", pooling: "avg" });
    const b = await buildFeatureExtractor(source, { inputSize: 160, featureLayer: "out_relu", pooling: "avg" });
    assert.deepEqual(a.model.inputs[0].shape, [null, 96, 96, 3]);
    assert.deepEqual(b.model.inputs[0].shape, [null, 160, 160, 3]);
    for (const name of ["Conv1", "block_16_project", "Conv_1"]) {
      const wa = a.model.getLayer(name).getWeights()[0].dataSync();
      const wb = b.model.getLayer(name).getWeights()[0].dataSync();
      assert.deepEqual(Array.from(wa.slice(0, 64)), Array.from(wb.slice(0, 64)), `${name} weights`);
    }
    // Dequantized weights are real numbers, not the raw uint8 codes.
    const w = a.model.getLayer("Conv1").getWeights()[0].dataSync();
    assert.ok(Array.from(w).some((v) => !Number.isInteger(v)));
    assert.ok(Math.min(...w) < 0);
    assert.equal(a.featureDim, 1280);
    assert.notEqual(a.fingerprint, b.fingerprint);
    a.dispose();
    b.dispose();
  });

  test("model - feature layer and pooling choose the feature shape", async () => {
    const cases: [string, "avg" | "max" | "none", number, number[]][] = [
      ["out_relu", "max", 1280, [1280]],
      ["out_relu", "none", 3 * 3 * 1280, [3, 3, 1280]],
      ["block_12_add", "avg", 96, [96]],
      ["block_6_expand_relu", "avg", 192, [192]],
    ];
    for (const [layer, pooling, dim, shape] of cases) {
      const fx = await buildFeatureExtractor(source, { inputSize: 96, featureLayer: layer, pooling });
      assert.equal(fx.featureDim, dim, `${layer}/${pooling}`);
      assert.deepEqual(fx.featureShape, shape);
      assert.ok(!fx.model.layers.some((l) => /^dense/.test(l.name)), "nsfwjs' classifier head is dropped");
      const f = await fx.extract(pseudoImages(3, 96, 9), 3);
      assert.equal(f.length, 3 * dim);
      assert.ok(f.every(Number.isFinite));
      fx.dispose();
    }
  });

  test("model - an unknown feature layer names layers that exist", () => {
    assert.throws(() => cutTopology(source.artifacts.modelTopology as object, { inputSize: 96, outputLayer: "block_99_add" }),
      (e: Error) => e.name === "ConfigError" && /block_99_add/.test(e.message) && /out_relu/.test(e.message));
  });

  test("model - preprocessing: unit maps [0,255] to [0,1], tf to [-1,1], caffe is BGR minus means", () => {
    const x = tf.tensor4d([0, 127.5, 255], [1, 1, 1, 3]);
    assert.deepEqual(Array.from(preprocess(x, "unit").dataSync()), [0, 0.5, 1]);
    assert.deepEqual(Array.from(preprocess(x, "tf").dataSync()), [-1, 0, 1]);
    const c = preprocess(x, "caffe").dataSync();
    assert.ok(Math.abs(c[0] - (255 - 103.939)) < 1e-4 && Math.abs(c[2] - (0 - 123.68)) < 1e-4);
  });

  test("model - an unknown --model value is a ConfigError that lists the choices", async () => {
    await assert.rejects(loadPretrained("resnet9000"), (e: Error) => e.name === "ConfigError" && /mobilenet_v2/.test(e.message));
    await assert.rejects(loadPretrained("/nonexistent/model"), (e: Error) => e.name === "ConfigError" && /model\.json/.test(e.message));
  });
});

/**
 * TF.js layers model -> ONNX: onnxruntime computes what tfjs (wasm) computes, to
 * max |diff| <= 1e-4 x max |tfjs output|, for small synthetic models that use every converted layer
 * type, activation, preprocessing mode and input type, and for the built-in MobileNetV2 at two input
 * sizes and several cut layers on real Fashion-MNIST images. Layers that do not convert are refused
 * by name; the serialized model reads back through our decoder.
 */
import assert from "node:assert/strict";
import { existsSync } from "node:fs";
import { before, describe, test } from "node:test";
import * as tf from "@tensorflow/tfjs";
import ort from "onnxruntime-node";
import { selectBackend } from "../core/models/backend.js";
import { openDataset, FASHION_MNIST_DIR } from "../core/datasets/open.js";
import { ConfigError, UnsupportedLayerError } from "../core/runtime/errors.js";
import { buildFeatureExtractor, preprocess } from "../core/models/feature_model.js";
import { loadPretrained, type Preprocessing } from "../core/models/model_zoo.js";
import { layersModelToOnnx, type OnnxExport } from "../core/models/onnx/export.js";
import { DataType, decodeModel, encodeModel, tensorValues } from "../core/models/onnx/schema.js";
import { Rng } from "../core/runtime/rng.js";

import { randomizeWeights } from "./helpers/random_weights.js";

const L = tf.layers;

before(async () => {
  await selectBackend("wasm");
});

function pixels(n: number, shape: number[], seed: number, fractional = false): Float32Array {
  const rng = new Rng(seed);
  const size = n * shape.reduce((a, b) => a * b, 1);
  return Float32Array.from({ length: size }, () => (fractional ? rng.next() * 255 : rng.int(256)));
}

/** What ctrain feeds tfjs: `preprocess()` of feature_model.ts ("unit" is x / 255). */
function tfjsForward(model: tf.LayersModel, px: Float32Array, n: number, shape: number[], mode: string): Float32Array {
  return tf.tidy(() => {
    const x = tf.tensor4d(px, [n, ...shape] as [number, number, number, number], "float32");
    const pre = mode === "unit" ? x.div(255) : preprocess(x as tf.Tensor4D, mode as Preprocessing);
    return (model.predict(pre) as tf.Tensor).reshape([n, -1]).dataSync() as Float32Array;
  });
}

async function onnxForward(ex: OnnxExport, px: Float32Array, n: number, dtype: "uint8" | "float32"): Promise<Float32Array> {
  const session = await ort.InferenceSession.create(ex.bytes, { intraOpNumThreads: 1, graphOptimizationLevel: "all" });
  const data = dtype === "uint8" ? Uint8Array.from(px) : px;
  const out = await session.run({ [ex.inputName]: new ort.Tensor(dtype, data, [n, ...ex.inputShape]) });
  await session.release();
  return out[ex.outputName].data as Float32Array;
}

function assertClose(got: Float32Array, want: Float32Array, label: string): { maxDiff: number; scale: number } {
  assert.equal(got.length, want.length, `${label}: output length`);
  let maxDiff = 0;
  let scale = 0;
  for (let i = 0; i < want.length; i++) {
    maxDiff = Math.max(maxDiff, Math.abs(got[i] - want[i]));
    scale = Math.max(scale, Math.abs(want[i]));
  }
  assert.ok(scale > 0, `${label}: tfjs output is all zeros, the comparison would prove nothing`);
  assert.ok(Number.isFinite(maxDiff) && maxDiff <= 1e-4 * scale, `${label}: max |onnx - tfjs| = ${maxDiff}, tfjs scale ${scale}`);
  return { maxDiff, scale };
}

/** Converts, runs both engines on `n` seeded images and compares. */
async function parity(model: tf.LayersModel, label: string, opts: { preprocessing?: string; inputDtype?: "uint8" | "float32"; n?: number; seed?: number } = {}): Promise<OnnxExport> {
  const mode = opts.preprocessing ?? "tf";
  const dtype = opts.inputDtype ?? "uint8";
  const n = opts.n ?? 3;
  const shape = model.inputs[0].shape.slice(1) as number[];
  const ex = layersModelToOnnx(model, { preprocessing: mode, inputDtype: dtype });
  const px = pixels(n, shape, opts.seed ?? 7, dtype === "float32");
  assertClose(await onnxForward(ex, px, n, dtype), tfjsForward(model, px, n, shape, mode), `${label} (${mode}, ${dtype})`);
  return ex;
}

/** Conv family, BatchNorm (folded and not), padding, pools, merges and a Dense head on a 17x17 input. */
function convNet(): tf.LayersModel {
  const inp = tf.input({ shape: [17, 17, 3] });
  const ap = (l: tf.layers.Layer, x: tf.SymbolicTensor | tf.SymbolicTensor[]): tf.SymbolicTensor => l.apply(x) as tf.SymbolicTensor;
  const x = ap(L.conv2d({ filters: 8, kernelSize: 3, strides: 2, padding: "same", activation: "relu", name: "conv_s2_same" }), inp); // 9x9
  const c1 = ap(L.batchNormalization({ name: "bn_folded" }), ap(L.conv2d({ filters: 8, kernelSize: 1, useBias: false, name: "conv_1x1" }), x));
  let d = ap(L.depthwiseConv2d({ kernelSize: 3, strides: 2, padding: "same", depthMultiplier: 2, name: "dw_s2" }), c1); // 5x5x16
  d = ap(L.reLU({ maxValue: 6, name: "relu6" }), ap(L.batchNormalization({ epsilon: 1e-5, name: "bn_dw" }), d));
  const s = ap(L.separableConv2d({ filters: 16, kernelSize: 3, dilationRate: 2, padding: "same", depthMultiplier: 2, activation: "swish", name: "sep_dil" }), d);
  // Read twice (by the BatchNorm and by the Add): the BatchNorm must stay a separate op.
  const shared = ap(L.conv2d({ filters: 16, kernelSize: 3, padding: "same", name: "conv_shared" }), s);
  const bnShared = ap(L.batchNormalization({ center: false, scale: false, name: "bn_unfolded" }), shared);
  const sum = ap(L.add({ name: "add3" }), [shared, bnShared, d]);
  // Squeeze-and-excitation (EfficientNet): a [1, 1, C] gate broadcast over the feature map.
  const squeezed = ap(L.reshape({ targetShape: [1, 1, 16], name: "se_reshape" }), ap(L.globalAveragePooling2d({ name: "se_pool" }), s));
  const excite = ap(L.conv2d({ filters: 16, kernelSize: 1, activation: "sigmoid", name: "se_expand" }), ap(L.conv2d({ filters: 4, kernelSize: 1, activation: "swish", name: "se_reduce" }), squeezed));
  const prod = ap(L.multiply({ name: "mul" }), [sum, ap(L.multiply({ name: "se_excite" }), [s, excite])]);
  const mean = ap(L.average({ name: "average" }), [prod, d]);
  const mn = ap(L.minimum({ name: "min" }), [ap(L.maximum({ name: "max" }), [mean, s]), d]);
  const padded = ap(L.zeroPadding2d({ padding: [[1, 2], [0, 1]], name: "zpad" }), mn); // 8x6
  const mp = ap(L.maxPooling2d({ poolSize: 3, strides: 2, padding: "same", name: "maxpool_same" }), padded); // 4x3
  const avg = ap(L.averagePooling2d({ poolSize: 3, strides: 2, padding: "same", name: "avgpool_same" }), padded);
  const cat = ap(L.concatenate({ name: "concat" }), [mp, avg]); // 4x3x32
  const dil = ap(L.conv2d({ filters: 8, kernelSize: 2, dilationRate: [2, 1], activation: "elu", name: "conv_dil_valid" }), cat); // 2x2x8
  const avgValid = ap(L.averagePooling2d({ poolSize: 2, strides: 1, name: "avgpool_valid" }), padded);
  const mpValid = ap(L.maxPooling2d({ poolSize: [3, 2], strides: [2, 1], name: "maxpool_valid" }), padded);
  const pooled = [
    ap(L.globalAveragePooling2d({ name: "gap" }), cat),
    ap(L.globalMaxPooling2d({ name: "gmp" }), dil),
    ap(L.globalAveragePooling2d({ name: "gap_valid" }), avgValid),
    ap(L.globalMaxPooling2d({ name: "gmp_valid" }), mpValid),
  ];
  let h = ap(L.dense({ units: 12, activation: "relu", name: "dense_relu" }), ap(L.concatenate({ name: "concat_2d" }), pooled));
  h = ap(L.batchNormalization({ name: "bn_after_dense" }), ap(L.dense({ units: 12, useBias: false, name: "dense_linear" }), h));
  h = ap(L.dropout({ rate: 0.5, name: "dropout" }), h);
  return tf.model({ inputs: inp, outputs: ap(L.dense({ units: 5, name: "logits" }), h), name: "conv_net" });
}

// logSoftmax is registered in tfjs but missing from its ActivationIdentifier type.
type ActivationName = Parameters<typeof L.activation>[0]["activation"];
const ACTIVATIONS = ["linear", "relu", "relu6", "sigmoid", "tanh", "softmax", "swish", "elu", "selu", "hardSigmoid", "softplus", "softsign", "mish", "gelu", "gelu_new", "logSoftmax"] as const;

/** Every activation (as a layer and as a conv's setting) and the activation layers, on a 4-d output. */
function activationNet(): tf.LayersModel {
  const inp = tf.input({ shape: [20, 20, 3] });
  const ap = (l: tf.layers.Layer, x: tf.SymbolicTensor | tf.SymbolicTensor[]): tf.SymbolicTensor => l.apply(x) as tf.SymbolicTensor;
  const x = ap(L.conv2d({ filters: 6, kernelSize: 3, strides: 2, padding: "same", name: "stem" }), inp); // 10x10x6
  const branches = ACTIVATIONS.map((a) => ap(L.activation({ activation: a as ActivationName, name: `act_${a}` }), x));
  branches.push(
    ap(L.conv2d({ filters: 3, kernelSize: 1, activation: "softmax", name: "conv_softmax" }), x),
    ap(L.depthwiseConv2d({ kernelSize: 3, padding: "same", activation: "tanh", name: "dw_tanh" }), x),
    ap(L.leakyReLU({ alpha: 0.1, name: "leaky" }), x),
    ap(L.elu({ name: "elu_layer" }), x),
    ap(L.thresholdedReLU({ theta: 0.3, name: "thresholded" }), x),
    ap(L.prelu({ sharedAxes: [1, 2], name: "prelu_shared" }), x),
    ap(L.prelu({ name: "prelu_full" }), x),
    ap(L.softmax({ axis: -1, name: "softmax_channels" }), x),
    ap(L.reLU({ name: "relu_layer" }), x),
  );
  return tf.model({ inputs: inp, outputs: ap(L.concatenate({ name: "all" }), branches), name: "activation_net" });
}

/** Layers whose meaning depends on the channel order; a 4-d output made by a Reshape. */
function shapeNet(): tf.LayersModel {
  const inp = tf.input({ shape: [20, 19, 3] });
  const ap = (l: tf.layers.Layer, x: tf.SymbolicTensor | tf.SymbolicTensor[]): tf.SymbolicTensor => l.apply(x) as tf.SymbolicTensor;
  let x = ap(L.conv2d({ filters: 4, kernelSize: 3, activation: "relu", name: "conv" }), inp); // 18x17x4
  x = ap(L.cropping2D({ cropping: [[1, 2], [3, 0]], name: "crop" }), x); // 15x14x4
  x = ap(L.permute({ dims: [2, 1, 3], name: "swap_hw" }), x); // 14x15x4
  x = ap(L.rescaling({ scale: 0.5, offset: -0.25, name: "rescale" }), x);
  let seq = ap(L.reshape({ targetShape: [-1, 4], name: "to_sequence" }), x); // 210x4
  seq = ap(L.spatialDropout1d({ rate: 0.3, name: "sdrop" }), seq);
  seq = ap(L.softmax({ axis: -1, name: "softmax_3d" }), seq);
  x = ap(L.reshape({ targetShape: [14, 5, 12], name: "to_image" }), seq); // channels interleave rows
  x = ap(L.gaussianNoise({ stddev: 0.5, name: "noise" }), x);
  x = ap(L.gaussianDropout({ rate: 0.2, name: "gdrop" }), x);
  x = ap(L.alphaDropout({ rate: 0.2, name: "adrop" }), x);
  x = ap(L.conv2d({ filters: 6, kernelSize: 2, strides: [2, 1], padding: "same", name: "conv2" }), x); // 7x5x6
  const flat = ap(L.flatten({ name: "flatten" }), x);
  const y = ap(L.dense({ units: 24, activation: "tanh", name: "dense" }), flat);
  return tf.model({ inputs: inp, outputs: ap(L.reshape({ targetShape: [2, 3, 4], name: "to_output" }), y), name: "shape_net" });
}

describe("onnx export - synthetic models", () => {
  test("onnx export - convs, BatchNorm, padding, pools, merges and Dense match tfjs", async () => {
    const model = convNet();
    randomizeWeights(model, 1);
    const ex = await parity(model, "conv_net");
    assert.deepEqual(ex.inputShape, [17, 17, 3]);
    assert.deepEqual(ex.outputShape, [5]);
  });

  test("onnx export - BatchNorm folds only into a linear conv or dense whose output nothing else reads", () => {
    const model = convNet();
    randomizeWeights(model, 2);
    const graph = decodeModel(layersModelToOnnx(model, { preprocessing: "none" }).bytes).graph;
    const names = graph.node.map((n) => n.name ?? "");
    for (const folded of ["bn_folded", "bn_dw", "bn_after_dense"]) assert.ok(!names.some((n) => n.startsWith(folded)), `${folded} is folded away`);
    assert.ok(names.includes("bn_unfolded"), "a BatchNorm after a conv that two layers read stays an op");
    // The folded conv without a bias gained one.
    const conv = graph.node.find((n) => n.name === "conv_1x1")!;
    assert.equal(conv.input.length, 3);
  });

  test("onnx export - every activation, activation layer and softmax axis matches tfjs", async () => {
    const model = activationNet();
    randomizeWeights(model, 3);
    const ex = await parity(model, "activation_net");
    assert.deepEqual(ex.outputShape, [10, 10, 6 * ACTIVATIONS.length + 3 + 6 * 8]);
  });

  test("onnx export - Flatten, Reshape, Permute, Cropping and a 4-d output keep Keras' channels-last order", async () => {
    const model = shapeNet();
    randomizeWeights(model, 4);
    const ex = await parity(model, "shape_net", { n: 2 });
    assert.deepEqual(ex.outputShape, [2, 3, 4]);
  });

  test("onnx export - every preprocessing mode, with uint8 and float32 input", async () => {
    const model = convNet();
    randomizeWeights(model, 5);
    for (const preprocessing of ["tf", "caffe", "torch", "unit", "none"])
      for (const inputDtype of ["uint8", "float32"] as const) await parity(model, "conv_net", { preprocessing, inputDtype, n: 2, seed: 11 });
    assert.throws(() => layersModelToOnnx(model, { preprocessing: "imagenet" }), (e: unknown) => e instanceof ConfigError && /imagenet/.test(e.message));
  });

  test("onnx export - Sequential models and models nested as layers (base + head) match tfjs", async () => {
    const seq = tf.sequential({
      layers: [
        L.conv2d({ inputShape: [13, 13, 3], filters: 4, kernelSize: 3, strides: 2, padding: "same", useBias: false }),
        L.batchNormalization(),
        L.activation({ activation: "relu6" }),
        L.maxPooling2d({ poolSize: 2 }),
        L.flatten(),
        L.dense({ units: 6, activation: "sigmoid" }),
      ],
    });
    randomizeWeights(seq, 6);
    await parity(seq, "sequential");

    const baseIn = tf.input({ shape: [15, 15, 3] });
    const base = tf.model({ inputs: baseIn, outputs: L.conv2d({ filters: 5, kernelSize: 3, activation: "relu" }).apply(baseIn) as tf.SymbolicTensor, name: "base" });
    const head = tf.sequential({ layers: [L.globalAveragePooling2d({ inputShape: [13, 13, 5] }), L.dense({ units: 4, activation: "softmax" })], name: "head" });
    const inp = tf.input({ shape: [15, 15, 3] });
    const full = tf.model({ inputs: inp, outputs: head.apply(base.apply(inp)) as tf.SymbolicTensor, name: "base_head" });
    randomizeWeights(base, 7);
    randomizeWeights(head, 8);
    assert.equal(full.layers.filter((l) => l instanceof tf.LayersModel).length, 2, "base and head are nested models");
    await parity(full, "base_head", { preprocessing: "unit" });
  });
});

describe("onnx export - refusals and the file format", () => {
  function modelWith(layer: tf.layers.Layer, inputShape = [8, 8, 3]): tf.LayersModel {
    const inp = tf.input({ shape: inputShape });
    const x = L.conv2d({ filters: 2, kernelSize: 1, name: "ok_conv" }).apply(inp) as tf.SymbolicTensor;
    return tf.model({ inputs: inp, outputs: layer.apply(x) as tf.SymbolicTensor });
  }
  const refuses = (model: tf.LayersModel, layer: string, className: string): void => {
    assert.throws(
      () => layersModelToOnnx(model, { preprocessing: "tf" }),
      (e: unknown) => e instanceof UnsupportedLayerError && e instanceof ConfigError && e.layer === layer && e.className === className && e.message.includes(layer) && e.message.includes("--engine tfjs"),
    );
  };

  test("onnx export - an unsupported layer or setting throws UnsupportedLayerError naming it", () => {
    refuses(modelWith(L.upSampling2d({ size: [2, 2], name: "upsample" })), "upsample", "UpSampling2D");
    refuses(modelWith(L.conv2dTranspose({ filters: 2, kernelSize: 3, name: "deconv" })), "deconv", "Conv2DTranspose");
    refuses(modelWith(L.conv2d({ filters: 2, kernelSize: 3, dataFormat: "channelsFirst", name: "nchw_conv" })), "nchw_conv", "Conv2D");
    refuses(modelWith(L.dense({ units: 3, name: "dense_on_image" })), "dense_on_image", "Dense");
    refuses(modelWith(L.conv2d({ filters: 2, kernelSize: 3, padding: "causal" as "same", name: "causal" })), "causal", "Conv2D");
  });

  test("onnx export - the model reads back through decodeModel and runs again after re-encoding", async () => {
    const model = convNet();
    randomizeWeights(model, 9);
    const ex = layersModelToOnnx(model, { preprocessing: "tf" });
    const m = decodeModel(ex.bytes);
    assert.equal(m.irVersion, 8);
    assert.deepEqual(m.opsetImport.map((o) => [o.domain, o.version]), [["", 13]]);
    assert.equal(m.producerName, "ctrain");
    assert.deepEqual(m.graph.input.map((i) => i.name), [ex.inputName]);
    const dims = m.graph.input[0].type!.tensorType!.shape!.dim!;
    assert.deepEqual([dims[0].dimParam, ...dims.slice(1).map((d) => d.dimValue)], ["N", 17, 17, 3]);
    assert.equal(m.graph.input[0].type!.tensorType!.elemType, DataType.UINT8);
    assert.deepEqual(m.graph.output.map((o) => o.name), [ex.outputName]);
    // Weights survive bit for bit: the logits kernel is stored as Keras has it ([in, out] for Gemm).
    const kernel = m.graph.initializer!.find((t) => t.name === "logits/W")!;
    assert.deepEqual(kernel.dims, [12, 5]);
    assert.deepEqual(Array.from(tensorValues(kernel) as Float32Array), Array.from(model.getLayer("logits").getWeights()[0].dataSync()));
    const relu6 = m.graph.node.find((n) => n.name === "relu6")!;
    assert.equal(relu6.opType, "Clip");
    const again = { ...ex, bytes: encodeModel(m) };
    const px = pixels(2, [17, 17, 3], 3);
    assert.deepEqual(await onnxForward(again, px, 2, "uint8"), await onnxForward(ex, px, 2, "uint8"));
    assert.throws(() => decodeModel(new Uint8Array([0x0a, 0xff, 0xff, 0x01, 0x02]), "broken.onnx"), (e: unknown) => e instanceof ConfigError && /broken\.onnx/.test(e.message));
  });
});

const fmnistSkip = existsSync(FASHION_MNIST_DIR) ? false : `${FASHION_MNIST_DIR} missing (apt-get install dataset-fashion-mnist)`;

describe("onnx export - built-in mobilenet_v2 on Fashion-MNIST images", { skip: fmnistSkip }, () => {
  const CASES = [
    { size: 96, layer: "block_3_expand_relu", pooling: "none" },
    { size: 96, layer: "block_12_add", pooling: "avg" },
    { size: 96, layer: "out_relu", pooling: "avg" },
    { size: 128, layer: "block_3_expand_relu", pooling: "avg" },
    { size: 128, layer: "block_12_add", pooling: "none" },
    { size: 128, layer: "out_relu", pooling: "none" },
  ] as const;

  test("onnx export - mobilenet_v2 features equal tfjs at 96 and 128 for several cut layers, avg and none pooling", async () => {
    const source = await loadPretrained("mobilenet_v2");
    const data = await openDataset("fashion-mnist", { seed: 3, valSplit: 0.1, testSplit: 0, limit: 40, maxPixels: 1e7 });
    const samples = data.samples.filter((_, i) => i % 9 === 0).slice(0, 4);
    for (const c of CASES) {
      // The reference runs on tfjs (auto would take onnxruntime and compare it with itself).
      const fx = await buildFeatureExtractor(source, { inputSize: c.size, featureLayer: c.layer, pooling: c.pooling, engine: "tfjs" });
      const imgs = await Promise.all(samples.map((s) => data.readRgb(s, c.size)));
      const rgb = new Uint8Array(imgs.length * c.size * c.size * 3);
      imgs.forEach((img, i) => rgb.set(img, i * img.length));
      const ex = layersModelToOnnx(fx.model, { preprocessing: fx.preprocessing });
      assert.deepEqual(ex.outputShape, fx.model.outputs[0].shape.slice(1));
      const got = await onnxForward(ex, Float32Array.from(rgb), imgs.length, "uint8");
      assertClose(got, await fx.extract(rgb, imgs.length), `mobilenet_v2 ${c.size} ${c.layer} ${c.pooling}`);
      fx.dispose();
    }
  });
});

/**
 * The training kernels ctrain adds to the wasm backend give the cpu backend's gradients, for the
 * convolution shapes MobileNetV2 uses (1x1 pointwise, 3x3 stride 1 and 2, SAME and VALID) and a few
 * it does not (depthwise multiplier 2, odd sizes, explicit padding).
 */
import assert from "node:assert/strict";
import { test } from "node:test";
import * as tf from "@tensorflow/tfjs";
import "@tensorflow/tfjs-backend-wasm";
import { registerWasmTrainingKernels, WASM_TRAINING_KERNELS } from "../core/models/wasm_kernels.js";
import { Rng } from "../core/runtime/rng.js";

interface Case {
  name: string;
  kind: "conv" | "depthwise";
  x: [number, number, number, number];
  w: [number, number, number, number];
  strides: number;
  pad: "same" | "valid" | number;
  dilations?: number;
}

const CASES: Case[] = [
  { name: "conv 1x1", kind: "conv", x: [3, 6, 6, 8], w: [1, 1, 8, 5], strides: 1, pad: "same" },
  { name: "conv 3x3 same", kind: "conv", x: [2, 7, 5, 3], w: [3, 3, 3, 4], strides: 1, pad: "same" },
  { name: "conv 3x3 stride 2 same", kind: "conv", x: [2, 9, 8, 3], w: [3, 3, 3, 4], strides: 2, pad: "same" },
  { name: "conv 3x3 stride 2 valid", kind: "conv", x: [2, 9, 8, 3], w: [3, 3, 3, 4], strides: 2, pad: "valid" },
  { name: "conv 2x3 explicit pad", kind: "conv", x: [1, 6, 6, 2], w: [2, 3, 2, 3], strides: 1, pad: 1 },
  { name: "depthwise 3x3 same", kind: "depthwise", x: [2, 6, 6, 5], w: [3, 3, 5, 1], strides: 1, pad: "same" },
  { name: "depthwise 3x3 stride 2 same", kind: "depthwise", x: [2, 7, 8, 4], w: [3, 3, 4, 1], strides: 2, pad: "same" },
  { name: "depthwise 3x3 stride 2 valid", kind: "depthwise", x: [2, 9, 9, 4], w: [3, 3, 4, 1], strides: 2, pad: "valid" },
  { name: "depthwise multiplier 2", kind: "depthwise", x: [2, 5, 6, 3], w: [3, 3, 3, 2], strides: 1, pad: "same" },
];

function rand(shape: number[], seed: number): Float32Array {
  const r = new Rng(seed);
  const n = shape.reduce((a, b) => a * b, 1);
  return Float32Array.from({ length: n }, () => r.next() * 2 - 1);
}

/** Gradients of sum(conv(x, w) * r) with respect to x and w, on the active backend. */
function grads(c: Case): { dx: Float32Array; dw: Float32Array } {
  return tf.tidy(() => {
    const x = tf.tensor4d(rand(c.x, 1), c.x);
    const w = tf.tensor4d(rand(c.w, 2), c.w);
    const f = (xx: tf.Tensor4D, ww: tf.Tensor4D): tf.Tensor4D =>
      c.kind === "conv"
        ? tf.conv2d(xx, ww, c.strides, c.pad as "same")
        : tf.depthwiseConv2d(xx, ww, c.strides, c.pad as "same", "NHWC", c.dilations ?? 1);
    const outShape = f(x, w).shape;
    const r = tf.tensor(rand(outShape, 3), outShape);
    const g = tf.grads((xx: tf.Tensor, ww: tf.Tensor) => f(xx as tf.Tensor4D, ww as tf.Tensor4D).mul(r).sum());
    const [dx, dw] = g([x, w]);
    return { dx: dx.dataSync() as Float32Array, dw: dw.dataSync() as Float32Array };
  });
}

function maxAbsDiff(a: Float32Array, b: Float32Array): number {
  assert.equal(a.length, b.length);
  let m = 0;
  for (let i = 0; i < a.length; i++) m = Math.max(m, Math.abs(a[i] - b[i]));
  return m;
}

test("wasm kernels - registration adds exactly the missing kernels and is idempotent", async () => {
  await tf.setBackend("wasm");
  await tf.ready();
  registerWasmTrainingKernels();
  for (const name of Object.keys(WASM_TRAINING_KERNELS)) assert.ok(tf.getKernel(name, "wasm"), `${name} registered`);
  assert.deepEqual(registerWasmTrainingKernels(), [], "second registration adds nothing");
});

for (const c of CASES) {
  test(`wasm kernels - ${c.name} gradients match the cpu backend`, async () => {
    await tf.setBackend("cpu");
    const ref = grads(c);
    await tf.setBackend("wasm");
    registerWasmTrainingKernels();
    const before = tf.memory().numTensors;
    const got = grads(c);
    assert.equal(tf.memory().numTensors, before, "no tensors leak from the kernels");
    const scale = Math.max(1, ...Array.from(ref.dw, Math.abs), ...Array.from(ref.dx, Math.abs));
    assert.ok(maxAbsDiff(got.dw, ref.dw) <= 1e-5 * scale, `dW differs by ${maxAbsDiff(got.dw, ref.dw)}`);
    assert.ok(maxAbsDiff(got.dx, ref.dx) <= 1e-5 * scale, `dX differs by ${maxAbsDiff(got.dx, ref.dx)}`);
  });
}

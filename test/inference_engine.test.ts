/**
 * The inference-engine seam (core/models/inference_engine.ts): `auto` takes onnxruntime for the
 * built-in model and gives tfjs' features, falls back to tfjs (saying why) for a layer the converter
 * does not know or when onnxruntime cannot load, and `--engine onnx` refuses both with what to do.
 * The no-onnxruntime case runs the real CLI with the package hidden from module resolution.
 */
import assert from "node:assert/strict";
import { mkdtemp, readFile, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { after, before, test } from "node:test";
import * as tf from "@tensorflow/tfjs";
import { selectBackend } from "../core/models/backend.js";
import { openDataset } from "../core/datasets/open.js";
import { ConfigError, EngineUnavailableError } from "../core/runtime/errors.js";
import { buildFeatureExtractor } from "../core/models/feature_model.js";
import { cudaProviderPath, frozenForward } from "../core/models/inference_engine.js";
import { loadPretrained } from "../core/models/model_zoo.js";
import { runCli } from "./helpers/cli.js";

let dir: string;
before(async () => {
  await selectBackend("wasm");
  dir = await mkdtemp(join(tmpdir(), "ctrain-engine-"));
});
after(async () => {
  await rm(dir, { recursive: true, force: true });
});

async function realImages(n: number, size: number): Promise<Uint8Array> {
  const ds = await openDataset("fashion-mnist", { seed: 3, valSplit: 0.1, testSplit: 0.1, limit: 200, maxPixels: 1e7 });
  const px = size * size * 3;
  const out = new Uint8Array(n * px);
  for (let i = 0; i < n; i++) out.set(await ds.readRgb(ds.samples.get(i * 7), size), i * px);
  return out;
}

function maxAbs(a: Float32Array): number {
  let m = 0;
  for (const v of a) m = Math.max(m, Math.abs(v));
  return m;
}

test("engine - auto runs the built-in MobileNetV2 on onnxruntime with tfjs' features", async () => {
  const source = await loadPretrained("mobilenet_v2");
  const imgs = await realImages(6, 96);
  for (const [layer, pooling] of [["block_12_add", "avg"], ["block_6_expand_relu", "none"]] as const) {
    const onnx = await buildFeatureExtractor(source, { inputSize: 96, featureLayer: layer, pooling, engine: "auto", threads: 1 });
    const ref = await buildFeatureExtractor(source, { inputSize: 96, featureLayer: layer, pooling, engine: "tfjs" });
    try {
      assert.equal(onnx.engine.name, "onnx", `auto should take onnx (fallback: ${onnx.engine.fallback})`);
      assert.equal(ref.engine.name, "tfjs");
      assert.equal(onnx.fingerprint, ref.fingerprint, "the engine is not part of the feature-cache key");
      const a = await onnx.extract(imgs, 6), b = await ref.extract(imgs, 6);
      assert.equal(a.length, 6 * ref.featureDim);
      let diff = 0;
      for (let i = 0; i < a.length; i++) diff = Math.max(diff, Math.abs(a[i] - b[i]));
      assert.ok(diff <= 1e-4 * maxAbs(b), `${layer}/${pooling}: max abs diff ${diff} vs scale ${maxAbs(b)}`);
    } finally {
      onnx.dispose();
      ref.dispose();
    }
  }
});

test("engine - a layer the converter does not know: auto falls back to tfjs naming it, onnx refuses", async () => {
  const input = tf.input({ shape: [8, 8, 3] });
  const conv = tf.layers.conv2d({ filters: 4, kernelSize: 3, padding: "same", name: "conv_a" }).apply(input) as tf.SymbolicTensor;
  const up = tf.layers.upSampling2d({ size: [2, 2], name: "odd_upsample" }).apply(conv) as tf.SymbolicTensor;
  const model = tf.model({ inputs: input, outputs: tf.layers.globalAveragePooling2d({}).apply(up) as tf.SymbolicTensor });
  const auto = await frozenForward(model, "tf", { engine: "auto" });
  assert.equal(auto.info.name, "tfjs");
  assert.match(auto.info.fallback ?? "", /odd_upsample/);
  const px = new Uint8Array(2 * 8 * 8 * 3).map((_, i) => (i * 37) % 256);
  assert.equal((await auto.run(px, 2)).length, 2 * 4, "the fallback computes the features");
  await assert.rejects(frozenForward(model, "tf", { engine: "onnx" }), (err: unknown) => err instanceof ConfigError && /odd_upsample/.test(err.message) && /--engine (auto|tfjs)/.test(err.message));
  model.dispose();
});

test("engine - the CUDA provider: auto takes the CPU where it is not installed, --engine-provider cuda says how to install it", { skip: cudaProviderPath() ? "the CUDA provider is installed here" : false }, async () => {
  const input = tf.input({ shape: [8, 8, 3] });
  const model = tf.model({ inputs: input, outputs: tf.layers.globalAveragePooling2d({}).apply(tf.layers.conv2d({ filters: 2, kernelSize: 3 }).apply(input)) as tf.SymbolicTensor });
  const auto = await frozenForward(model, "unit", { engine: "onnx", provider: "auto" });
  assert.equal(auto.info.provider, "cpu");
  auto.dispose();
  for (const engine of ["onnx", "auto"] as const)
    await assert.rejects(frozenForward(model, "unit", { engine, provider: "cuda" }), (err: unknown) => err instanceof EngineUnavailableError && /CUDA provider is not installed.*ONNXRUNTIME_NODE_INSTALL=cuda12.*--engine-provider cpu/.test(err.message));
  model.dispose();
});

const HIDE_ORT = fileURLToPath(new URL("./helpers/hide_onnxruntime.js", import.meta.url));
const TINY_JOB = ["--data", "fashion-mnist", "--limit", "60", "--input-size", "48", "--feature-layer", "block_3_expand_relu", "--epochs", "1", "--workers", "1", "--metrics-port", "-1", "--log-format", "json"];

test("engine - without onnxruntime: auto warns once and runs on tfjs, --engine onnx says how to install it", async () => {
  const env = { NODE_OPTIONS: `--import ${HIDE_ORT}` };
  const refused = await runCli(["run", ...TINY_JOB, "--engine", "onnx", "--out", join(dir, "refused"), "--cache-dir", join(dir, "cache-refused")], { env, timeoutMs: 120_000 });
  assert.equal(refused.code, 2, refused.stderr.slice(-2000));
  assert.match(refused.stderr, /onnxruntime-node cannot be loaded here.*npm ci.*--engine tfjs/);

  const out = join(dir, "auto");
  const r = await runCli(["run", ...TINY_JOB, "--out", out, "--cache-dir", join(dir, "cache-auto")], { env, timeoutMs: 180_000 });
  assert.equal(r.code, 0, r.stderr.slice(-3000));
  const warnings = (r.stdout + r.stderr).split("\n").filter((l) => /onnx not used/.test(l));
  assert.equal(warnings.length, 1, `one warning, got:\n${warnings.join("\n")}`);
  assert.match(warnings[0], /onnxruntime-node/);
  const summary = JSON.parse(await readFile(join(out, "summary.json"), "utf8")) as { engine: { name: string; requested: string; fallback: string } };
  assert.equal(summary.engine.name, "tfjs");
  assert.equal(summary.engine.requested, "auto");
});

test("engine - ctrain run records the engine it used in summary.json", async () => {
  const out = join(dir, "onnx");
  const r = await runCli(["run", ...TINY_JOB, "--engine", "onnx", "--threads", "1", "--out", out, "--cache-dir", join(dir, "cache-onnx")], { timeoutMs: 180_000 });
  assert.equal(r.code, 0, r.stderr.slice(-3000));
  const summary = JSON.parse(await readFile(join(out, "summary.json"), "utf8")) as { engine: { name: string; threads: number; version: string }; extraction: { images: number } };
  assert.equal(summary.engine.name, "onnx");
  assert.equal(summary.engine.threads, 1);
  assert.match(summary.engine.version, /^\d+\.\d+/);
  assert.ok(summary.extraction.images >= 60);
});

test("engine - ctrain export-onnx writes the base onnxruntime runs: pixels in, the tfjs features out", async () => {
  const file = join(dir, "base.onnx");
  const r = await runCli(["export-onnx", "--model", "mobilenet_v2", "--input-size", "64", "--feature-layer", "block_6_expand_relu", "--pooling", "max", "--out", file]);
  assert.equal(r.code, 0, r.stderr);
  assert.match(r.stdout, /wrote .*base\.onnx: base mobilenet_v2 cut at block_6_expand_relu \(max pooling, 192 features, input 64, preprocessing unit\)/);
  const { loadOnnxRuntime } = await import("../core/models/inference_engine.js");
  const ort = await loadOnnxRuntime();
  const session = await ort.InferenceSession.create(await readFile(file));
  const imgs = await realImages(3, 64);
  const out = await session.run({ [session.inputNames[0]]: new ort.Tensor("uint8", imgs, [3, 64, 64, 3]) });
  const got = out[session.outputNames[0]].data as Float32Array;
  const ref = await buildFeatureExtractor(await loadPretrained("mobilenet_v2"), { inputSize: 64, featureLayer: "block_6_expand_relu", pooling: "max", engine: "tfjs" });
  const want = await ref.extract(imgs, 3);
  ref.dispose();
  await session.release();
  assert.equal(got.length, want.length);
  let diff = 0;
  for (let i = 0; i < got.length; i++) diff = Math.max(diff, Math.abs(got[i] - want[i]));
  assert.ok(diff <= 1e-4 * maxAbs(want), `max abs diff ${diff}`);
});

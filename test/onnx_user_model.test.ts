/**
 * `--model path/to/model.onnx`: ONNX models as the frozen base, written by the test itself with
 * ctrain's own ONNX schema (no downloaded model): an NCHW "torchvision-like" net with dynamic height
 * and width and an NHWC one-channel net with a fixed 28 px input (as tf2onnx leaves Keras models).
 * Features are checked against the graph's own tensor, preprocessed and pooled by hand; the CLI runs
 * a whole job on it across 2 workers, `model-info` lists its tensors, `predict` uses the saved
 * classifier, and bad models/options are refused before any work.
 */
import assert from "node:assert/strict";
import { existsSync } from "node:fs";
import { mkdtemp, readFile, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, test } from "node:test";
import sharp from "sharp";
import { selectBackend } from "../core/models/backend.js";
import { openDataset } from "../core/datasets/open.js";
import { buildFeatureExtractor } from "../core/models/feature_model.js";
import { loadOnnxRuntime } from "../core/models/inference_engine.js";
import { GraphBuilder } from "../core/models/onnx/graph_builder.js";
import { DataType, decodeModel, encodeModel } from "../core/models/onnx/schema.js";
import { loadOnnxSource } from "../core/models/onnx/user_model.js";
import { runCli } from "./helpers/cli.js";

let dir: string;
let nchwPath: string;
let nhwcPath: string;
before(async () => {
  await selectBackend("wasm");
  dir = await mkdtemp(join(tmpdir(), "ctrain-onnx-user-"));
  nchwPath = join(dir, "convnet_nchw.onnx");
  nhwcPath = join(dir, "convnet_nhwc_gray28.onnx");
  await writeFile(nchwPath, convNet({ layout: "NCHW", channels: 3, size: null, seed: 1 }));
  await writeFile(nhwcPath, convNet({ layout: "NHWC", channels: 1, size: 28, seed: 2 }));
});
after(async () => {
  await rm(dir, { recursive: true, force: true });
});

/** Seeded weights in [-0.5, 0.5) / sqrt(fan-in). */
function weights(n: number, fanIn: number, seed: number): Float32Array {
  let s = seed >>> 0 || 1;
  return Float32Array.from({ length: n }, () => {
    s = (Math.imul(s, 1664525) + 1013904223) >>> 0;
    return (s / 2 ** 32 - 0.5) / Math.sqrt(fanIn);
  });
}

/** input -> conv 3x3 (8) -> relu1 -> conv 3x3 stride 2 (16) -> feat -> global avg pool -> 5 logits. */
function convNet(o: { layout: "NCHW" | "NHWC"; channels: number; size: number | null; seed: number }): Uint8Array {
  const g = new GraphBuilder();
  const h = o.size ?? "H", w = o.size ?? "W";
  const input = g.input("input", DataType.FLOAT, o.layout === "NCHW" ? ["N", o.channels, h, w] : ["N", h, w, o.channels]);
  const x = o.layout === "NCHW" ? input : g.node("Transpose", [input], "to_nchw", { perm: [0, 3, 1, 2] });
  const conv = (inp: string, cin: number, cout: number, stride: number, hint: string, seed: number): string =>
    g.node("Conv", [inp, g.floatInit(`${hint}.weight`, [cout, cin, 3, 3], weights(cout * cin * 9, cin * 9, seed)).name, g.floatInit(`${hint}.bias`, [cout], weights(cout, 1, seed + 7)).name], hint,
      { kernel_shape: [3, 3], pads: [1, 1, 1, 1], strides: [stride, stride] });
  const relu1 = g.node("Relu", [conv(x, o.channels, 8, 1, "conv1", o.seed)], "relu1");
  const feat = g.node("Relu", [conv(relu1, 8, 16, 2, "conv2", o.seed + 1)], "feat");
  const flat = g.node("Flatten", [g.node("GlobalAveragePool", [feat], "gap")], "flat", { axis: 1 });
  const logits = g.node("Gemm", [flat, g.floatInit("fc.weight", [5, 16], weights(80, 16, o.seed + 2)).name, g.floatInit("fc.bias", [5], weights(5, 1, o.seed + 3)).name], "logits", { transB: 1 });
  g.output(logits, DataType.FLOAT, ["N", 5]);
  return g.toBytes({ graphName: "convnet", opset: 13, producerVersion: "test" });
}

async function images(n: number, size: number): Promise<Uint8Array> {
  const ds = await openDataset("fashion-mnist", { seed: 5, valSplit: 0.1, testSplit: 0.1, limit: 100, maxPixels: 1e7 });
  const px = size * size * 3;
  const out = new Uint8Array(n * px);
  for (let i = 0; i < n; i++) out.set(await ds.readRgb(ds.samples.get(i * 3), size), i * px);
  return out;
}

/** The original graph's `feat` (NCHW) on inputs preprocessed by hand. */
async function referenceFeat(path: string, input: Float32Array, dims: number[]): Promise<{ data: Float32Array; dims: number[] }> {
  const ort = await loadOnnxRuntime();
  const m = decodeModel(new Uint8Array(await readFile(path)));
  m.graph.output = [{ name: "feat" }];
  const session = await ort.InferenceSession.create(encodeModel(m));
  const out = (await session.run({ input: new ort.Tensor("float32", input, dims) })).feat;
  await session.release();
  return { data: out.data as Float32Array, dims: out.dims.map(Number) };
}

function maxDiff(a: Float32Array, b: Float32Array): { diff: number; scale: number } {
  let diff = 0, scale = 0;
  for (let i = 0; i < a.length; i++) {
    diff = Math.max(diff, Math.abs(a[i] - b[i]));
    scale = Math.max(scale, Math.abs(b[i]));
  }
  return { diff, scale };
}

test("onnx model - NCHW torchvision-like graph: features equal its own tensor, torch-preprocessed, avg-pooled and flattened channels-last", async () => {
  const n = 4, size = 32;
  const rgb = await images(n, size);
  const mean = [0.485, 0.456, 0.406], std = [0.229, 0.224, 0.225];
  const x = new Float32Array(n * 3 * size * size);
  for (let i = 0; i < n; i++)
    for (let y = 0; y < size; y++)
      for (let xx = 0; xx < size; xx++)
        for (let c = 0; c < 3; c++) x[((i * 3 + c) * size + y) * size + xx] = (rgb[((i * size + y) * size + xx) * 3 + c] / 255 - mean[c]) / std[c];
  const ref = await referenceFeat(nchwPath, x, [n, 3, size, size]);
  assert.deepEqual(ref.dims, [n, 16, 16, 16]);
  const src = { ...(await loadOnnxSource(nchwPath)), preprocessing: "torch" as const };
  assert.equal(src.layout, "NCHW");
  assert.equal(src.fixedSize, null);

  const avg = await buildFeatureExtractor(src, { inputSize: size, featureLayer: "feat", pooling: "avg" });
  assert.equal(avg.engine.name, "onnx");
  assert.equal(avg.featureDim, 16);
  const want = new Float32Array(n * 16);
  for (let i = 0; i < n; i++) for (let c = 0; c < 16; c++) {
    let sum = 0;
    for (let k = 0; k < 256; k++) sum += ref.data[(i * 16 + c) * 256 + k];
    want[i * 16 + c] = sum / 256;
  }
  const got = await avg.extract(rgb, n);
  const a = maxDiff(got, want);
  assert.ok(a.diff <= 1e-4 * a.scale, `avg: max abs diff ${a.diff} vs scale ${a.scale}`);

  const none = await buildFeatureExtractor(src, { inputSize: size, featureLayer: "feat", pooling: "none" });
  assert.deepEqual(none.featureShape, [16, 16, 16]);
  const flat = new Float32Array(n * 4096);
  for (let i = 0; i < n; i++) for (let c = 0; c < 16; c++) for (let k = 0; k < 256; k++) flat[i * 4096 + k * 16 + c] = ref.data[(i * 16 + c) * 256 + k];
  const b = maxDiff(await none.extract(rgb, n), flat);
  assert.ok(b.diff <= 1e-4 * b.scale, `none: max abs diff ${b.diff} vs scale ${b.scale}`);
  assert.notEqual(avg.fingerprint, none.fingerprint);
  avg.dispose();
  none.dispose();
});

test("onnx model - NHWC one-channel graph with a fixed input: gray from RGB, unit scaling, augmented float pixels too", async () => {
  const n = 3, size = 28;
  const rgb = await images(n, size);
  const x = new Float32Array(n * size * size);
  for (let p = 0; p < n * size * size; p++) x[p] = (rgb[p * 3] + rgb[p * 3 + 1] + rgb[p * 3 + 2]) / 3 / 255;
  const ref = await referenceFeat(nhwcPath, x, [n, size, size, 1]);
  const src = { ...(await loadOnnxSource(nhwcPath)), preprocessing: "unit" as const };
  assert.equal(src.layout, "NHWC");
  assert.equal(src.fixedSize, 28);
  const fx = await buildFeatureExtractor(src, { inputSize: 28, featureLayer: "feat", pooling: "max" });
  const want = new Float32Array(n * 16);
  for (let i = 0; i < n; i++) for (let c = 0; c < 16; c++) {
    let m = -Infinity;
    for (let k = 0; k < 196; k++) m = Math.max(m, ref.data[(i * 16 + c) * 196 + k]);
    want[i * 16 + c] = m;
  }
  for (const pixels of [rgb, Float32Array.from(rgb)]) {
    const d = maxDiff(await fx.extract(pixels, n), want);
    assert.ok(d.diff <= 1e-4 * d.scale, `${pixels.constructor.name}: max abs diff ${d.diff} vs scale ${d.scale}`);
  }
  fx.dispose();
});

const JOB = ["--data", "fashion-mnist", "--limit", "120", "--input-size", "32", "--epochs", "3", "--metrics-port", "-1", "--log-format", "json"];

test("onnx model - ctrain model-info, a whole ctrain run on 2 workers, and ctrain predict with the saved classifier", async () => {
  const info = await runCli(["model-info", "--model", nchwPath, "--input-size", "32", "--json"]);
  assert.equal(info.code, 0, info.stderr);
  const mi = JSON.parse(info.stdout) as { layout: string; input_size: number; parameters: number; default_feature_layer: string; layers: { name: string; output_shape: number[] }[] };
  assert.equal(mi.layout, "NCHW");
  assert.equal(mi.parameters, 8 * 27 + 8 + 16 * 72 + 16 + 80 + 5);
  assert.equal(mi.default_feature_layer, "feat");
  assert.deepEqual(mi.layers.find((l) => l.name === "relu1")?.output_shape, [32, 32, 8]);

  const out = join(dir, "run");
  const r = await runCli(["run", ...JOB, "--model", nchwPath, "--preprocessing", "torch", "--workers", "2", "--shard-size", "24", "--out", out, "--cache-dir", join(dir, "cache")], { timeoutMs: 240_000 });
  assert.equal(r.code, 0, r.stderr.slice(-3000));
  const s = JSON.parse(await readFile(join(out, "summary.json"), "utf8")) as { engine: { name: string }; feature_layer: string; workers: number; extraction: { images: number }; phases: { head: { test_accuracy: number } } };
  assert.equal(s.engine.name, "onnx");
  assert.equal(s.feature_layer, "feat", "--feature-layer auto is the last spatial feature map");
  assert.equal(s.workers, 2);
  assert.ok(s.extraction.images >= 120);
  assert.ok(existsSync(join(out, "model", "base.onnx")));
  const workerEngines = (r.stdout + r.stderr).split("\n").filter((l) => /"msg":"inference engine"/.test(l) && /-w\d/.test(l));
  assert.ok(workerEngines.length >= 1 && workerEngines.every((l) => /"engine":"onnx"/.test(l)), `the workers extracted on onnx:\n${workerEngines.join("\n")}`);

  const png = join(dir, "shirt.png");
  const rgb = await images(1, 32);
  await sharp(Buffer.from(rgb), { raw: { width: 32, height: 32, channels: 3 } }).png().toFile(png);
  const p = await runCli(["predict", "--model", join(out, "model"), "--json", "--top", "3", png]);
  assert.equal(p.code, 0, p.stderr);
  const pred = JSON.parse(p.stdout) as { predictions: { class: string; probability: number }[] };
  assert.equal(pred.predictions.length, 3);
  assert.ok(pred.predictions[0].probability >= pred.predictions[1].probability);
});

test("onnx model - refused before any work: corrupt file, unknown tensor, fine-tuning, no preprocessing, wrong fixed size, --engine tfjs", async () => {
  const corrupt = join(dir, "corrupt.onnx");
  await writeFile(corrupt, Buffer.from("this is not a protobuf \u0000\u00ff\u0013 at all"));
  const cases: [string[], RegExp][] = [
    [["--model", corrupt, "--preprocessing", "torch"], /corrupt\.onnx.*(not a valid ONNX model|not an ONNX model)/],
    [["--model", nchwPath, "--preprocessing", "torch", "--feature-layer", "nope"], /--feature-layer "nope" is not a tensor.*feat/],
    [["--model", nchwPath, "--preprocessing", "torch", "--fine-tune-layers", "2"], /--fine-tune-layers.*ONNX graph.*inference only/],
    [["--model", nchwPath], /does not say how its training pixels were scaled: give --preprocessing/],
    [["--model", nhwcPath, "--preprocessing", "unit"], /takes 28x28 images only: use --input-size 28/],
    [["--model", nchwPath, "--preprocessing", "torch", "--engine", "tfjs"], /--engine tfjs cannot run the ONNX model/],
  ];
  for (const [args, message] of cases) {
    const out = join(dir, "refused");
    const r = await runCli(["run", ...JOB, "--workers", "1", ...args, "--out", out, "--cache-dir", join(dir, "cache-refused")]);
    assert.equal(r.code, 2, `${args.join(" ")}: exit ${r.code}\n${r.stderr.slice(-1500)}`);
    assert.match(r.stderr, message, args.join(" "));
    assert.ok(!existsSync(out), `${args.join(" ")}: nothing is written`);
  }
});

/**
 * bench/finetune: why the trainable part of fine-tuning runs on wasm with ctrain's training kernels
 * (core/models/wasm_kernels.ts) rather than on the cpu backend, and what fine-tuning buys.
 *
 * 1. Throughput of one training step (forward + backward + Adam update) of "top + head" on cached
 *    activations, batch 32, input 96, for each backend available here: wasm + ctrain kernels, cpu.
 * 2. Fashion-MNIST at input 96 through `ctrain run` with fine-tuning: head-only vs head + fine-tune
 *    test accuracy, from summary.json. Full set = --limit 0 (60k/10k); default --limit 10000 because
 *    the 2 shared cores here would need well over an hour for two full extractions.
 *
 * Writes bench/results/finetune.json.
 *
 *   node dist/bench/finetune.js [--limit 10000] [--epochs 10] [--fine-tune-epochs 3] [--fine-tune-layers 9] [--skip-job]
 */
import { spawn } from "node:child_process";
import { mkdir, readFile, writeFile } from "node:fs/promises";
import { cpus } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import * as tf from "@tensorflow/tfjs";
import "@tensorflow/tfjs-backend-wasm";
import { buildHead } from "../core/models/head.js";
import { buildSplit, fineTuneModel } from "../core/models/model_split.js";
import { loadPretrained, type PretrainedSource } from "../core/models/model_zoo.js";
import { computeGradients } from "../core/training/train_loop.js";
import { registerWasmTrainingKernels } from "../core/models/wasm_kernels.js";

function arg(name: string, def: string): string {
  const i = process.argv.indexOf(`--${name}`);
  return i >= 0 ? process.argv[i + 1] : def;
}

interface Throughput {
  backend: string;
  feature_layer: string;
  fine_tune_layers: string;
  cut_shape: number[];
  trainable_weights: number;
  batch: number;
  steps: number;
  images_per_second: number;
  ms_per_step: number;
}

async function throughput(source: PretrainedSource, backend: string, featureLayer: string, unfreeze: string, steps: number): Promise<Throughput> {
  await tf.setBackend(backend);
  await tf.ready();
  const split = await buildSplit(source, { inputSize: 96, featureLayer, unfreeze });
  const head = buildHead({ featureDim: split.top.outputs[0].shape[3] as number, numClasses: 10, seed: 1 });
  const model = fineTuneModel(split, head, "avg", false);
  const batch = 32;
  const size = split.cutShape.reduce((a, b) => a * b, 1);
  const data = { x: new Float32Array(batch * size).map((_, i) => Math.abs(Math.sin(i))), sampleShape: split.cutShape, y: Int32Array.from({ length: batch }, (_, i) => i % 10) };
  const optimizer = tf.train.adam(1e-5);
  const step = (): void => {
    const s = computeGradients(model, data, 10);
    optimizer.applyGradients(s.grads as never);
    tf.dispose(s.grads);
  };
  step();
  step();
  const t0 = performance.now();
  for (let i = 0; i < steps; i++) step();
  const ms = (performance.now() - t0) / steps;
  optimizer.dispose();
  const result = { backend, feature_layer: featureLayer, fine_tune_layers: unfreeze, cut_shape: split.cutShape, trainable_weights: model.trainableWeights.length, batch, steps, images_per_second: Number(((batch * 1000) / ms).toFixed(2)), ms_per_step: Number(ms.toFixed(1)) };
  model.dispose();
  split.bottom.dispose();
  console.error(JSON.stringify(result));
  return result;
}

async function runCtrain(args: string[]): Promise<number> {
  const bin = fileURLToPath(new URL("../cli/main.js", import.meta.url));
  const child = spawn(process.execPath, [bin, "run", ...args], { stdio: ["ignore", "ignore", "inherit"] });
  return new Promise((resolve) => child.on("close", (code) => resolve(code ?? 1)));
}

async function main(): Promise<void> {
  const limit = arg("limit", "10000");
  const epochs = arg("epochs", "10");
  const ftEpochs = arg("fine-tune-epochs", "3");
  const ftLayers = arg("fine-tune-layers", "9");
  const featureLayer = arg("feature-layer", "block_12_add");
  const source = await loadPretrained("mobilenet_v2");
  await tf.setBackend("wasm");
  await tf.ready();
  const added = registerWasmTrainingKernels();
  const configs: [string, string][] = [[featureLayer, ftLayers], ["out_relu", "20"]];
  const rows: Throughput[] = [];
  for (const [layer, k] of configs) for (const b of ["wasm", "cpu"]) rows.push(await throughput(source, b, layer, k, b === "cpu" ? 3 : 8));

  let job: Record<string, unknown> | undefined;
  if (!process.argv.includes("--skip-job")) {
    const out = join("runs", "bench-finetune");
    const t0 = performance.now();
    const code = await runCtrain(["--data", "fashion-mnist", "--input-size", "96", "--feature-layer", featureLayer, "--epochs", epochs, "--limit", limit,
      "--fine-tune-layers", ftLayers, "--fine-tune-epochs", ftEpochs, "--backend", "wasm", "--workers", "1", "--cache-dir", arg("cache-dir", ".ctrain-cache"),
      "--metrics-port", "-1", "--log-format", "json", "--out", out, "--job", "bench-finetune"]);
    if (code !== 0) throw new Error(`ctrain run exited ${code}`);
    const s = JSON.parse(await readFile(join(out, "summary.json"), "utf8")) as { samples: unknown; phases: { head: { test_accuracy: number; val_accuracy: number; seconds: number }; fine_tune: { test_accuracy: number; val_accuracy: number; seconds: number } }; fine_tune: unknown; extraction: unknown };
    job = {
      limit: Number(limit), input_size: 96, feature_layer: featureLayer, epochs: Number(epochs), fine_tune_epochs: Number(ftEpochs), fine_tune_layers: ftLayers,
      samples: s.samples, head_only_test_accuracy: s.phases.head.test_accuracy, fine_tuned_test_accuracy: s.phases.fine_tune.test_accuracy,
      head_val_accuracy: s.phases.head.val_accuracy, fine_tune_val_accuracy: s.phases.fine_tune.val_accuracy,
      head_seconds: s.phases.head.seconds, fine_tune_seconds: s.phases.fine_tune.seconds, extraction: s.extraction, fine_tune: s.fine_tune,
      wall_seconds: Number(((performance.now() - t0) / 1000).toFixed(1)),
    };
  }
  const result = {
    bench: "finetune", date: new Date().toISOString(), node: process.version, cpus: cpus().length, cpu_model: cpus()[0]?.model,
    wasm_kernels_registered: added,
    note: "throughput: one training step of top + head on cached activations (batch 32, input 96); cpu backend = the alternative design of running the trainable part off wasm",
    throughput: rows, job,
  };
  await mkdir("bench/results", { recursive: true });
  await writeFile("bench/results/finetune.json", JSON.stringify(result, null, 2) + "\n");
  console.log(JSON.stringify(result, null, 2));
}

main().catch((err) => {
  console.error(err);
  process.exit(1);
});

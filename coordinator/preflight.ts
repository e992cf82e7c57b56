/**
 * Checks a job against what it names before any work starts (before a nats-server, workers or an
 * output folder exist): the data set opens and has samples (validation ones when a training control
 * watches them), the classes --class-weight names exist, the model loads, the input size suits it,
 * the feature layer and the fine-tune spec exist in it, every folder the job writes can be written
 * and has room for what goes there, the features fit in memory, and the local workers fit the
 * machine. Everything it refuses is a ConfigError with the fix; runJob would refuse the same things
 * later, after resources were spent (or fail after an hour, when the disk fills or the model is saved).
 */
import { mkdtemp, rm, stat, statfs } from "node:fs/promises";
import { availableParallelism, totalmem } from "node:os";
import { dirname, resolve } from "node:path";
import * as tf from "@tensorflow/tfjs";
import { selectBackend } from "../core/models/backend.js";
import type { JobOptions } from "../core/runtime/config.js";
import { openDataset, type Dataset } from "../core/datasets/open.js";
import { ConfigError } from "../core/runtime/errors.js";
import { buildFeatureExtractor, cutTopology, resolveSourceChoices } from "../core/models/feature_model.js";
import { isOnnxModelSpec, loadOnnxSource } from "../core/models/onnx/user_model.js";
import { planSplit } from "../core/models/model_split.js";
import { loadPretrained, resolveModelChoices } from "../core/models/model_zoo.js";
import { checkMemoryBudget } from "./memory_budget.js";
import { classWeightsFor, trainCounts } from "../core/training/training_controls.js";

export interface PreflightResult {
  classes: number;
  samples: number;
  /** Floats per sample in the feature cache. */
  featureDim: number;
  /** Bytes the feature cache (and the fine-tuning activation cache) needs on --cache-dir, estimated. */
  cacheBytes: number;
  /** The data set as listed here: the job uses it (a folder of millions of files is listed once, not twice). */
  dataset: Dataset;
}

export interface PreflightOptions {
  /** Worker processes the job starts on this machine (`ctrain run`). Default 0 (workers elsewhere). */
  localWorkers?: number;
  /** Workers that will fine-tune data-parallel (0 = fine-tuning, if any, runs in one process); see fineTunesDataParallel. */
  dataParallelWorkers?: number;
}

/** Memory a local worker process takes with the model loaded (measured: 300-400 MB with MobileNetV2 on wasm). */
export const WORKER_PROCESS_BYTES = 512 * 2 ** 20;
/** Local workers per core beyond which more only queue for CPU. */
export const WORKERS_PER_CORE = 4;
/** tfjs-wasm keeps tensors in a 32-bit heap: the head, its optimizer state and a batch must stay well under 4 GiB. */
const WASM_HEAP_BUDGET = 2 * 2 ** 30;

const mib = (b: number): string => `${(b / 2 ** 20).toFixed(b < 2 ** 20 ? 2 : 0)} MiB`;

export async function preflight(opts: JobOptions, o: PreflightOptions = {}): Promise<PreflightResult> {
  if (o.localWorkers) checkLocalWorkers(o.localWorkers);
  const dataset = await openDataset(opts.data, { seed: opts.seed, valSplit: opts.valSplit, testSplit: opts.testSplit, limit: opts.limit, maxPixels: opts.maxPixels });
  if (!dataset.samples.some((s) => s.split === "train")) throw new ConfigError(`--data ${opts.data}: no training samples after splitting; add images or lower --val-split/--test-split.`);
  classWeightsFor(opts.classWeight, dataset.classes, trainCounts(dataset.samples, dataset.classes.length));
  if (!dataset.samples.some((s) => s.split === "val")) {
    const needs = opts.earlyStoppingPatience > 0 ? "--early-stopping-patience" : opts.lrSchedule === "plateau" ? "--lr-schedule plateau" : undefined;
    if (needs) throw new ConfigError(`${needs} watches the validation set, but --data ${opts.data} has no validation samples after splitting: raise --val-split or add images.`);
  }
  if (isOnnxModelSpec(opts.model)) {
    const { featureDim, graphBytes } = await preflightOnnx(opts);
    const n = dataset.samples.length;
    const cacheBytes = 2 * n * featureDim * 4;
    checkMemory(opts, n, featureDim, (await selectBackend(opts.backend)).tfBackend);
    await checkWritable(opts.cacheDir, "--cache-dir", cacheBytes, `the feature cache (${n} samples x ${featureDim} floats)`);
    await checkWritable(opts.out, "--out", graphBytes + 4 * 2 ** 20, "the head, the ONNX base, history, summary and report");
    return { classes: dataset.classes.length, samples: n, featureDim, cacheBytes, dataset };
  }
  const source = await loadPretrained(opts.model);
  const { featureLayer } = resolveModelChoices(source, opts);
  const { topology } = cutTopology(source.artifacts.modelTopology as object, { inputSize: opts.inputSize, outputLayer: featureLayer });
  const backend = await selectBackend(opts.backend); // also what a shape is computed on below (no stray cpu backend)
  const shape = await outputShape(topology);
  const featureDim = opts.pooling === "none" ? shape.reduce((a, b) => a * b, 1) : shape[shape.length - 1]!;
  const n = dataset.samples.length;
  let cacheBytes = 2 * n * featureDim * 4; // shards while extracting, then the joined entry
  if (opts.fineTuneLayers.trim() !== "0") {
    const plan = planSplit(topology, opts.fineTuneLayers);
    const cut = cutTopology(source.artifacts.modelTopology as object, { inputSize: opts.inputSize, outputLayer: plan.cutLayer }).topology;
    cacheBytes += 2 * n * (await outputShape(cut)).reduce((a, b) => a * b, 1) * 4;
  }
  checkMemory(opts, n, featureDim, backend.tfBackend);
  await checkWritable(opts.cacheDir, "--cache-dir", cacheBytes, `the feature cache (${n} samples x ${featureDim} floats${opts.fineTuneLayers.trim() !== "0" ? ", plus the fine-tuning activations" : ""})`);
  const weights = source.artifacts.weightData;
  const modelBytes = (Array.isArray(weights) ? weights.reduce((a, b) => a + b.byteLength, 0) : weights?.byteLength ?? 0) + 4 * 2 ** 20;
  await checkWritable(opts.out, "--out", modelBytes, "the model, history, summary and report");
  return { classes: dataset.classes.length, samples: n, featureDim, cacheBytes, dataset };
}

/** Output shape (without the batch) of a topology, built with throwaway weights. */
async function outputShape(topology: object): Promise<number[]> {
  const model = await tf.models.modelFromJSON({ modelTopology: topology as tf.io.ModelJSON["modelTopology"] });
  try {
    return (model.outputs[0]!.shape.slice(1) as number[]);
  } finally {
    model.dispose();
  }
}

function checkLocalWorkers(workers: number): void {
  const cores = availableParallelism();
  const memory = totalmem();
  const byCores = cores * WORKERS_PER_CORE;
  const byMemory = Math.max(1, Math.floor(memory / WORKER_PROCESS_BYTES));
  if (workers > Math.min(byCores, byMemory))
    throw new ConfigError(`--workers ${workers}: this machine has ${cores} cores and ${mib(memory)} of memory; a local worker needs about ${mib(WORKER_PROCESS_BYTES)}, so at most ${byMemory} fit in memory, and past ${byCores} (${WORKERS_PER_CORE} per core) they only queue for CPU. Use --workers ${Math.min(byCores, byMemory)} or fewer (one per core is fastest), or run workers on other machines with ctrain coordinator.`);
}

function checkMemory(opts: JobOptions, samples: number, featureDim: number, tfBackend: string): void {
  const what = `--pooling ${opts.pooling} at --feature-layer ${opts.featureLayer} gives ${featureDim} floats (${mib(featureDim * 4)}) per sample`;
  checkMemoryBudget(opts, samples, featureDim); // features stream from the cache: the bounded working set, not N x featureDim, must fit
  // Head kernel, its gradient and two Adam moments, plus a batch in and out of the heap.
  const heap = 4 * featureDim * opts.headUnits * 4 + 3 * opts.batchSize * featureDim * 4;
  if (tfBackend === "wasm" && heap > WASM_HEAP_BUDGET)
    throw new ConfigError(`${what}; with --head-units ${opts.headUnits} and --batch-size ${opts.batchSize} the head's training needs about ${mib(heap)} of wasm memory (budget ${mib(WASM_HEAP_BUDGET)} of its 4 GiB heap). Use --pooling avg or max, fewer --head-units, a smaller --batch-size, or a native backend.`);
}

/**
 * `path` (or the folder that will hold it) can be written and has `need` bytes free. Creates nothing
 * that stays: a probe folder is made and removed in the nearest folder that exists.
 */
export async function checkWritable(path: string, flag: string, need: number, what: string): Promise<void> {
  let dir = resolve(path);
  for (;;) {
    const s = await stat(dir).catch((e: NodeJS.ErrnoException) => (e.code === "ENOENT" || e.code === "ENOTDIR" ? undefined : Promise.reject(e)));
    if (s) {
      if (!s.isDirectory()) throw new ConfigError(`${flag} ${path}: ${dir} is a file, not a folder.`);
      break;
    }
    if (dirname(dir) === dir) break;
    dir = dirname(dir);
  }
  try {
    await rm(await mkdtemp(resolve(dir, ".ctrain-probe-")), { recursive: true, force: true });
  } catch (err) {
    const e = err as NodeJS.ErrnoException;
    const why = e.code === "EROFS" ? "is on a read-only file system" : e.code === "EACCES" || e.code === "EPERM" ? "is not writable by this user" : e.code === "ENOSPC" ? "has no space left" : `cannot be written (${e.code ?? e.message})`;
    throw new ConfigError(`${flag} ${path}: ${dir} ${why}; it is to hold ${what}. Choose another ${flag}.`, { cause: err });
  }
  const fs = await statfs(dir);
  const free = fs.bavail * fs.bsize;
  if (free < need)
    throw new ConfigError(`${flag} ${path}: ${mib(free)} free on ${dir}, about ${mib(need)} needed for ${what}. Free space there or choose another ${flag}.`);
}

/**
 * An ONNX base: fine-tuning is refused (the graph is inference only), and the cut graph is built
 * once -- which checks the file, onnxruntime, the input size, the preprocessing and the feature tensor.
 */
async function preflightOnnx(opts: JobOptions): Promise<{ featureDim: number; graphBytes: number }> {
  if (opts.fineTuneLayers.trim() !== "0")
    throw new ConfigError(`--fine-tune-layers: ${opts.model} is an ONNX graph, which ctrain runs for inference only (it has no trainable layers tfjs can differentiate). Train the head on its features (drop --fine-tune-layers), or convert the model to a TF.js layers model (tensorflowjs_converter) to fine-tune it.`);
  const choices = resolveSourceChoices(await loadOnnxSource(opts.model), opts);
  const fx = await buildFeatureExtractor(choices.source, { inputSize: opts.inputSize, featureLayer: choices.featureLayer, pooling: opts.pooling, engine: opts.engine, threads: 1 });
  fx.dispose();
  return { featureDim: fx.featureDim, graphBytes: fx.onnxGraph?.byteLength ?? 0 };
}

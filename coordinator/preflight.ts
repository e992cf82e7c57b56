/**
 * Checks a job against what it names before any work starts (before a nats-server, workers or an
 * output folder exist): the data set opens and has samples (validation ones when a training control
 * watches them), the classes --class-weight names exist, the model loads, the input size suits it,
 * the feature layer and the fine-tune spec exist in it. Everything it refuses is a ConfigError with the fix; runJob would
 * refuse the same things later, after resources were spent.
 */
import type { JobOptions } from "../core/config.js";
import { openDataset } from "../core/datasets/open.js";
import { ConfigError } from "../core/errors.js";
import { buildFeatureExtractor, cutTopology, resolveSourceChoices } from "../core/feature_model.js";
import { isOnnxModelSpec, loadOnnxSource } from "../core/models/onnx/user_model.js";
import { planSplit } from "../core/model_split.js";
import { loadPretrained, resolveModelChoices } from "../core/model_zoo.js";
import { classWeightsFor, trainCounts } from "../core/training_controls.js";

export interface PreflightResult {
  classes: number;
  samples: number;
}

export async function preflight(opts: JobOptions): Promise<PreflightResult> {
  const dataset = await openDataset(opts.data, { seed: opts.seed, valSplit: opts.valSplit, testSplit: opts.testSplit, limit: opts.limit, maxPixels: opts.maxPixels });
  if (!dataset.samples.some((s) => s.split === "train")) throw new ConfigError(`--data ${opts.data}: no training samples after splitting; add images or lower --val-split/--test-split.`);
  classWeightsFor(opts.classWeight, dataset.classes, trainCounts(dataset.samples, dataset.classes.length));
  if (!dataset.samples.some((s) => s.split === "val")) {
    const needs = opts.earlyStoppingPatience > 0 ? "--early-stopping-patience" : opts.lrSchedule === "plateau" ? "--lr-schedule plateau" : undefined;
    if (needs) throw new ConfigError(`${needs} watches the validation set, but --data ${opts.data} has no validation samples after splitting: raise --val-split or add images.`);
  }
  if (isOnnxModelSpec(opts.model)) {
    await preflightOnnx(opts);
    return { classes: dataset.classes.length, samples: dataset.samples.length };
  }
  const source = await loadPretrained(opts.model);
  const { featureLayer } = resolveModelChoices(source, opts);
  const { topology } = cutTopology(source.artifacts.modelTopology as object, { inputSize: opts.inputSize, outputLayer: featureLayer });
  if (opts.fineTuneLayers.trim() !== "0") planSplit(topology, opts.fineTuneLayers);
  return { classes: dataset.classes.length, samples: dataset.samples.length };
}

/**
 * An ONNX base: fine-tuning is refused (the graph is inference only), and the cut graph is built
 * once -- which checks the file, onnxruntime, the input size, the preprocessing and the feature tensor.
 */
async function preflightOnnx(opts: JobOptions): Promise<void> {
  if (opts.fineTuneLayers.trim() !== "0")
    throw new ConfigError(`--fine-tune-layers: ${opts.model} is an ONNX graph, which ctrain runs for inference only (it has no trainable layers tfjs can differentiate). Train the head on its features (drop --fine-tune-layers), or convert the model to a TF.js layers model (tensorflowjs_converter) to fine-tune it.`);
  const choices = resolveSourceChoices(await loadOnnxSource(opts.model), opts);
  const fx = await buildFeatureExtractor(choices.source, { inputSize: opts.inputSize, featureLayer: choices.featureLayer, pooling: opts.pooling, engine: opts.engine, threads: 1 });
  fx.dispose();
}

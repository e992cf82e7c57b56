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
import { cutTopology } from "../core/feature_model.js";
import { planSplit } from "../core/model_split.js";
import { loadPretrained, resolveModelChoices } from "../core/model_zoo.js";
import { checkControlsForDataParallel, classWeightsFor, trainCounts } from "../core/training_controls.js";

export interface PreflightResult {
  classes: number;
  samples: number;
}

/** `dataParallelWorkers`: workers that will fine-tune data-parallel (0 = fine-tuning, if any, runs in one process). */
export async function preflight(opts: JobOptions, o: { dataParallelWorkers?: number } = {}): Promise<PreflightResult> {
  if ((o.dataParallelWorkers ?? 0) > 1 && opts.fineTuneLayers.trim() !== "0" && opts.method !== "augment") checkControlsForDataParallel(opts, o.dataParallelWorkers!);
  const dataset = await openDataset(opts.data, { seed: opts.seed, valSplit: opts.valSplit, testSplit: opts.testSplit, limit: opts.limit, maxPixels: opts.maxPixels });
  if (!dataset.samples.some((s) => s.split === "train")) throw new ConfigError(`--data ${opts.data}: no training samples after splitting; add images or lower --val-split/--test-split.`);
  classWeightsFor(opts.classWeight, dataset.classes, trainCounts(dataset.samples, dataset.classes.length));
  if (!dataset.samples.some((s) => s.split === "val")) {
    const needs = opts.earlyStoppingPatience > 0 ? "--early-stopping-patience" : opts.lrSchedule === "plateau" ? "--lr-schedule plateau" : undefined;
    if (needs) throw new ConfigError(`${needs} watches the validation set, but --data ${opts.data} has no validation samples after splitting: raise --val-split or add images.`);
  }
  const source = await loadPretrained(opts.model);
  const { featureLayer } = resolveModelChoices(source, opts);
  const { topology } = cutTopology(source.artifacts.modelTopology as object, { inputSize: opts.inputSize, outputLayer: featureLayer });
  if (opts.fineTuneLayers.trim() !== "0") planSplit(topology, opts.fineTuneLayers);
  return { classes: dataset.classes.length, samples: dataset.samples.length };
}

/**
 * The export phase: the trained classifier (frozen base + head, one graph) into the run folder,
 * loadable with tf.loadLayersModel (or as ONNX for an ONNX base). With fine-tuning, model-head/
 * keeps the head-only classifier -- saved before fine-tuning, which trains the head in place -- and
 * model/ is the fine-tuned one.
 */
import { mkdir } from "node:fs/promises";
import { join } from "node:path";
import type * as tf from "@tensorflow/tfjs";
import { type ClassifierMetadata, composeClassifier } from "../../core/models/head.js";
import { copyWeightsByName } from "../../core/models/model_split.js";
import { saveModel, saveOnnxClassifier } from "../../core/models/model_io.js";
import { storageError } from "../../core/runtime/errors.js";
import type { JobContext } from "./setup.js";

/** Saves the head-only classifier; returns it (the graph fine-tuning's weights go into), absent for an ONNX base. */
export async function exportHead(ctx: JobContext, head: tf.LayersModel, fineTuning: boolean): Promise<tf.LayersModel | undefined> {
  const { opts, extractor, source } = ctx;
  const meta: ClassifierMetadata = {
    classes: ctx.dataset.classes, inputSize: opts.inputSize, preprocessing: extractor.preprocessing, baseModel: source.name,
    featureLayer: opts.featureLayer, pooling: opts.pooling, job: opts.job,
  };
  const classifier = extractor.model ? composeClassifier(extractor.model, head, meta) : undefined;
  await mkdir(opts.out, { recursive: true }).catch((err: unknown) => Promise.reject(storageError(err, opts.out)));
  const dir = join(opts.out, fineTuning ? "model-head" : "model");
  if (classifier) await saveModel(classifier, dir);
  else await saveOnnxClassifier(extractor.onnxGraph!, head, meta, dir);
  return classifier;
}

/** The trained top goes back into the full base (same layer names), so model/ has the same graph as model-head/. */
export async function exportFineTuned(ctx: JobContext, classifier: tf.LayersModel, top: tf.LayersModel): Promise<void> {
  copyWeightsByName(top, ctx.extractor.model!);
  await saveModel(classifier, join(ctx.opts.out, "model"));
}

/**
 * Saving and loading TF.js layers models in a folder (model.json + weights.bin) without
 * @tensorflow/tfjs-node, whose `file://` handler is not available on the wasm and cpu backends.
 * The files are the standard format: tf.loadLayersModel('file://...') under tfjs-node reads them too.
 * The head's per-sample dropout is written as Keras' `Dropout` (it has no weights and is the identity
 * at inference); importing sample_dropout.ts makes ctrain's own loads build it back as that class.
 */
import { mkdir, readFile, rename, rm, writeFile } from "node:fs/promises";
import { dirname, join } from "node:path";
import * as tf from "@tensorflow/tfjs";
import { storageError } from "../runtime/errors.js";
import "./sample_dropout.js";

function concatWeightData(d: tf.io.WeightData | undefined): Uint8Array {
  if (!d) return new Uint8Array(0);
  if (!Array.isArray(d)) return new Uint8Array(d);
  return new Uint8Array(tf.io.concatenateArrayBuffers(d));
}

/** An IOHandler that writes model.json and weights.bin into `dir`. */
export function folderSaveHandler(dir: string): tf.io.IOHandler {
  return tf.io.withSaveHandler(async (artifacts) => {
    await mkdir(dir, { recursive: true }).catch((err: unknown) => Promise.reject(storageError(err, dir)));
    const weights = concatWeightData(artifacts.weightData);
    const modelJson = {
      modelTopology: artifacts.modelTopology,
      format: artifacts.format ?? "layers-model",
      generatedBy: artifacts.generatedBy,
      convertedBy: "ctrain",
      weightsManifest: [{ paths: ["weights.bin"], weights: artifacts.weightSpecs ?? [] }],
      userDefinedMetadata: artifacts.userDefinedMetadata,
    };
    // Each file goes to a temporary name and is renamed into place once complete, weights first: a
    // full disk leaves the previous files (or none), never a truncated weights.bin next to a model.json.
    const files: [string, Uint8Array | string][] = [["weights.bin", weights], ["model.json", JSON.stringify(modelJson)]];
    const tmp = (name: string): string => join(dir, `.${name}.${process.pid}.tmp`);
    try {
      for (const [name, data] of files) await writeFile(tmp(name), data);
      for (const [name] of files) await rename(tmp(name), join(dir, name));
    } catch (err) {
      await Promise.all(files.map(([name]) => rm(tmp(name), { force: true })));
      throw storageError(err, dir, weights.byteLength);
    }
    return { modelArtifactsInfo: { dateSaved: new Date(), modelTopologyType: "JSON", weightDataBytes: weights.byteLength } };
  });
}

/** An IOHandler that reads a folder (or a model.json path) written in the TF.js layers format. */
export function folderLoadHandler(path: string): tf.io.IOHandler {
  const jsonPath = path.endsWith(".json") ? path : join(path, "model.json");
  return {
    async load(): Promise<tf.io.ModelArtifacts> {
      const modelJson = JSON.parse(await readFile(jsonPath, "utf8")) as tf.io.ModelJSON;
      const bufs: Uint8Array[] = [];
      for (const g of modelJson.weightsManifest) for (const p of g.paths) bufs.push(new Uint8Array(await readFile(join(dirname(jsonPath), p))));
      const total = bufs.reduce((a, b) => a + b.byteLength, 0);
      const all = new Uint8Array(total);
      let o = 0;
      for (const b of bufs) { all.set(b, o); o += b.byteLength; }
      return {
        modelTopology: modelJson.modelTopology,
        weightSpecs: modelJson.weightsManifest.flatMap((g) => g.weights),
        weightData: all.buffer,
        format: modelJson.format,
        userDefinedMetadata: modelJson.userDefinedMetadata,
      };
    },
  };
}

export async function saveModel(model: tf.LayersModel, dir: string): Promise<void> {
  await model.save(folderSaveHandler(dir));
}

export async function loadModel(dir: string): Promise<tf.LayersModel> {
  return tf.loadLayersModel(folderLoadHandler(dir));
}

/** File name of the frozen ONNX base next to a head-only classifier (`--model x.onnx` runs). */
export const ONNX_BASE_FILE = "base.onnx";

/**
 * A classifier whose frozen base is an ONNX graph: the cut base (uint8 NHWC pixels in, features out,
 * preprocessing and pooling inside) as base.onnx, and the head as the TF.js layers model, whose
 * metadata names the base file. `ctrain predict` runs one after the other.
 */
export async function saveOnnxClassifier(base: Uint8Array, head: tf.LayersModel, meta: object, dir: string): Promise<void> {
  head.setUserDefinedMetadata({ ctrain: { ...meta, baseOnnx: ONNX_BASE_FILE } } as unknown as {});
  await saveModel(head, dir);
  await writeFile(join(dir, ONNX_BASE_FILE), base).catch((err: unknown) => Promise.reject(storageError(err, join(dir, ONNX_BASE_FILE), base.byteLength)));
}

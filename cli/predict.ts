/**
 * `ctrain predict --model DIR IMAGE...`: class and probability per image, with the preprocessing
 * and class names stored in the model's metadata. An unreadable image is reported and skipped.
 */
import * as tf from "@tensorflow/tfjs";
import { selectBackend } from "../core/models/backend.js";
import { optionsHelp, parseArgs, checkEnvironment, envHelp } from "../core/runtime/config.js";
import { readFile } from "node:fs/promises";
import { decodeImage } from "../core/datasets/image_decode.js";
import { BadInputError, ConfigError } from "../core/runtime/errors.js";
import { type EngineOptions, type FrozenForward, frozenForward, onnxGraphForward, threadsFor } from "../core/models/inference_engine.js";
import { decodeModel } from "../core/models/onnx/schema.js";
import { join } from "node:path";
import type { ClassifierMetadata } from "../core/models/head.js";
import { loadModel } from "../core/models/model_io.js";
import type { Preprocessing } from "../core/models/model_zoo.js";

const HELP = `usage: ctrain predict --model DIR [--top K] [--engine auto|onnx|tfjs] [--threads N] [--backend auto|wasm|cpu|...] [--json] IMAGE...

Prints the top classes and probabilities of each image (JPEG, PNG or WebP).

options:
  --top K                      classes printed per image [default 1]
  --json                       one JSON object per image
${optionsHelp("predict")}

environment:
${envHelp("predict")}`;

/** A classifier saved from an ONNX base: base.onnx on onnxruntime (pixels -> features), then the tfjs head. */
async function onnxBaseThenHead(basePath: string, head: tf.LayersModel, size: number, o: EngineOptions): Promise<FrozenForward> {
  if (o.engine === "tfjs") throw new ConfigError(`--engine tfjs cannot run ${basePath} (an ONNX base): use --engine auto or onnx.`);
  let bytes: Uint8Array;
  try {
    bytes = new Uint8Array(await readFile(basePath));
  } catch (cause) {
    throw new ConfigError(`cannot read the model's ONNX base ${basePath} (${(cause as Error).message}): copy the whole model/ folder.`, { cause });
  }
  const g = decodeModel(bytes, basePath).graph;
  const graph = { bytes, inputName: g.input[0].name, outputName: g.output[0].name, inputShape: [size, size, 3] };
  const base = await onnxGraphForward((dtype) => {
    if (dtype !== "uint8") throw new Error("predict feeds decoded uint8 pixels only");
    return graph;
  }, o.engine ?? "auto", o);
  return {
    info: base.info,
    async run(pixels, n) {
      const features = await base.run(pixels, n);
      const y = tf.tidy(() => head.predict(tf.tensor2d(features, [n, features.length / n])) as tf.Tensor);
      try {
        return (await y.data()) as Float32Array;
      } finally {
        y.dispose();
      }
    },
    dispose: () => base.dispose(),
  };
}

export async function main(argv: string[]): Promise<number> {
  const parsed = parseArgs(argv, ["top"], ["help", "json"], "predict");
  if (parsed.extra["help"]) {
    console.log(HELP);
    return 0;
  }
  checkEnvironment("predict");
  const dir = parsed.options.model;
  if (!dir) throw new ConfigError("ctrain predict needs --model DIR (the model/ folder of a run).");
  if (parsed.positionals.length === 0) throw new ConfigError("ctrain predict needs at least one image path.");
  const top = parsed.extra["top"] === undefined ? 1 : Number(parsed.extra["top"]);
  if (!Number.isInteger(top) || top < 1) throw new ConfigError(`--top must be a whole number >= 1, got ${JSON.stringify(parsed.extra["top"])}.`);
  await selectBackend(parsed.options.backend ?? "auto");
  let model: tf.LayersModel;
  try {
    model = await loadModel(dir);
  } catch (cause) {
    throw new ConfigError(`--model ${dir}: cannot load a ctrain model (${(cause as Error).message}).`, { cause });
  }
  const meta = (model.getUserDefinedMetadata() as { ctrain?: ClassifierMetadata & { baseOnnx?: string } } | undefined)?.ctrain;
  if (!meta) throw new ConfigError(`--model ${dir}: model.json has no ctrain metadata (classes, input size); was it written by ctrain run?`);
  const engine = { engine: parsed.options.engine ?? "auto", threads: threadsFor(parsed.options.threads ?? 0, 1), provider: parsed.options.engineProvider };
  const forward = meta.baseOnnx
    ? await onnxBaseThenHead(join(dir, meta.baseOnnx), model, meta.inputSize, engine)
    // The whole classifier (base + head) is a frozen graph here: onnxruntime when it converts.
    : await frozenForward(model, meta.preprocessing as Preprocessing, engine);
  if (forward.info.fallback) console.error(`ctrain predict: running on tfjs (${forward.info.fallback})`);
  let failed = 0;
  for (const file of parsed.positionals) {
    try {
      let bytes: Uint8Array;
      try {
        bytes = new Uint8Array(await readFile(file));
      } catch (cause) {
        throw new BadInputError(file, "unreadable", `cannot read ${file}: ${(cause as Error).message}`, { cause });
      }
      const rgb = await decodeImage(file, bytes, { size: meta.inputSize, maxPixels: 40_000_000 });
      const probs = await forward.run(rgb, 1);
      const ranked = [...probs].map((p, i) => ({ cls: meta.classes[i], p })).sort((a, b) => b.p - a.p).slice(0, top);
      if (parsed.extra["json"]) console.log(JSON.stringify({ image: file, predictions: ranked.map((r) => ({ class: r.cls, probability: Number(r.p.toFixed(6)) })) }));
      else console.log(`${file}\t${ranked.map((r) => `${r.cls}\t${r.p.toFixed(4)}`).join("\t")}`);
    } catch (err) {
      if (!(err instanceof BadInputError)) throw err;
      failed++;
      console.error(`${file}: skipped (${err.reason}): ${err.message}`);
    }
  }
  return failed > 0 ? 1 : 0;
}

/**
 * `ctrain export-onnx --model X --out FILE.onnx`: the frozen base a job would run, as the ONNX graph
 * onnxruntime runs (input size rebuilt, cut at --feature-layer, --pooling, the preprocessing folded
 * in): NHWC uint8 pixels [N, H, W, 3] in, [N, D] float32 features out. Given a run's model/ folder
 * (a ctrain classifier), the whole classifier: pixels in, class probabilities out.
 */
import { writeFile } from "node:fs/promises";
import { join } from "node:path";
import { selectBackend } from "../core/models/backend.js";
import { optionsHelp, parseArgs, resolveOptions, checkEnvironment, envHelp } from "../core/runtime/config.js";
import { ConfigError } from "../core/runtime/errors.js";
import { buildFeatureExtractor, loadModelSource, resolveSourceChoices } from "../core/models/feature_model.js";
import type { ClassifierMetadata } from "../core/models/head.js";
import { loadModel } from "../core/models/model_io.js";
import { layersModelToOnnx } from "../core/models/onnx/export.js";
import { existsSync } from "node:fs";

const HELP = `usage: ctrain export-onnx --model mobilenet_v2|inception_v3|DIR|URL|FILE.onnx|RUN/model --out FILE.onnx
                          [--input-size N] [--feature-layer L] [--pooling avg|max|none] [--preprocessing P]

Writes the frozen base as an ONNX graph (uint8 NHWC pixels in, features out, preprocessing folded in),
or, for a ctrain run's model/ folder, the whole classifier (pixels in, class probabilities out).

${optionsHelp("export-onnx")}

environment:
${envHelp("export-onnx")}`;

export async function main(argv: string[]): Promise<number> {
  const parsed = parseArgs(argv, [], ["help"], "export-onnx");
  if (parsed.extra["help"]) {
    console.log(HELP);
    return 0;
  }
  checkEnvironment("export-onnx");
  if (parsed.positionals.length > 0) throw new ConfigError(`ctrain export-onnx: unexpected argument ${JSON.stringify(parsed.positionals[0])}; options start with --.`);
  const out = parsed.options.out;
  if (!out || !out.toLowerCase().endsWith(".onnx")) throw new ConfigError("ctrain export-onnx needs --out FILE.onnx.");
  const opts = resolveOptions(parsed.options);
  await selectBackend(opts.backend);
  let bytes: Uint8Array;
  let what: string;
  if (existsSync(join(opts.model, "model.json")) && (await isClassifier(opts.model))) {
    const model = await loadModel(opts.model);
    const meta = (model.getUserDefinedMetadata() as { ctrain: ClassifierMetadata }).ctrain;
    bytes = layersModelToOnnx(model, { preprocessing: meta.preprocessing }).bytes;
    what = `classifier ${opts.model} (${meta.classes.length} classes, input ${meta.inputSize})`;
  } else {
    const choices = resolveSourceChoices(await loadModelSource(opts.model), opts);
    const fx = await buildFeatureExtractor(choices.source, { inputSize: opts.inputSize, featureLayer: choices.featureLayer, pooling: opts.pooling, engine: "onnx" });
    bytes = fx.onnxGraph ?? layersModelToOnnx(fx.model!, { preprocessing: fx.preprocessing }).bytes;
    what = `base ${opts.model} cut at ${fx.featureLayer} (${opts.pooling} pooling, ${fx.featureDim} features, input ${fx.inputSize}, preprocessing ${fx.preprocessing})`;
    fx.dispose();
  }
  await writeFile(out, bytes);
  console.log(`wrote ${out}: ${what}, ${(bytes.length / 2 ** 20).toFixed(1)} MiB`);
  return 0;
}

/** A folder written by ctrain run (its model.json has ctrain metadata), as opposed to a pretrained base. */
async function isClassifier(dir: string): Promise<boolean> {
  const { readFile } = await import("node:fs/promises");
  const json = JSON.parse(await readFile(join(dir, "model.json"), "utf8")) as { userDefinedMetadata?: { ctrain?: { classes?: unknown } } };
  return Array.isArray(json.userDefinedMetadata?.ctrain?.classes) && !("baseOnnx" in (json.userDefinedMetadata?.ctrain ?? {}));
}

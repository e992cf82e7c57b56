/**
 * `ctrain model-info --model X [--input-size N] [--json]`: what a pretrained base looks like at an
 * input size, to choose `--feature-layer` and `--fine-tune-layers`: its preprocessing, parameters,
 * and the layers worth cutting at -- activation, add, concatenate and pooling outputs that the whole
 * graph passes through (core/models/model_split.ts cutPoints), each with its output shape.
 */
import { selectBackend } from "../core/models/backend.js";
import { optionsHelp, parseArgs, resolveOptions, checkEnvironment, envHelp } from "../core/runtime/config.js";
import { cutTopology, loadCut } from "../core/models/feature_model.js";
import { ConfigError } from "../core/runtime/errors.js";
import { cutPoints } from "../core/models/model_split.js";
import { loadPretrained, resolveModelChoices } from "../core/models/model_zoo.js";
import { loadOnnxRuntime } from "../core/models/inference_engine.js";
import { channelsLast, defaultOnnxFeatureTensor, isOnnxModelSpec, loadOnnxSource, onnxTensorShapes } from "../core/models/onnx/user_model.js";

const HELP = `usage: ctrain model-info [--model mobilenet_v2|inception_v3|DIR|URL|FILE.onnx] [--input-size N] [--json]

Prints the model's input size, preprocessing, parameter count of its convolutional base, and the
layers worth cutting at (activation / add / concatenate / pooling outputs through which the whole
graph passes) with their output shapes at that input size. The default feature layer is marked '*'.

options:
  --json                       the description as JSON
${optionsHelp("model-info")}

environment:
${envHelp("model-info")}`;

/** Layer classes whose outputs make useful features. */
const CUTTABLE = /^(Activation|ReLU|LeakyReLU|ELU|PReLU|Softmax|Add|Concatenate|(Global)?(Average|Max)Pooling2D)$/;

/** One layer worth cutting at. */
export interface CutLayerInfo {
  name: string;
  class_name: string;
  /** [h, w, c] at the requested input size. */
  output_shape: number[];
}

/** `ctrain model-info --json` output. */
export interface ModelInfo {
  model: string;
  input_size: number;
  min_input_size: number | null;
  preprocessing: string;
  /** `builtin`, `metadata` (declared by the model) or `name` (guessed from its name). */
  preprocessing_origin: string;
  /** Where the model's channel axis is (TF.js layers models are channels-last; ONNX exports from PyTorch are NCHW). */
  layout: "NHWC" | "NCHW";
  default_feature_layer: string;
  /** Weights of the base, input to the default feature layer. */
  parameters: number;
  layers: CutLayerInfo[];
}

/** ONNX ops whose outputs make useful features (activations, residual adds, concatenations, pools). */
const ONNX_CUTTABLE = /^(Relu|Clip|LeakyRelu|Elu|Sigmoid|HardSwish|Add|Sum|Concat|MaxPool|AveragePool|GlobalAveragePool|GlobalMaxPool|Mul)$/;

/** model-info of an ONNX file: its tensors are probed on onnxruntime at the input size. */
async function describeOnnxModel(spec: string, inputSize: number, o: { featureLayer: string; preprocessing: string }): Promise<ModelInfo> {
  const src = await loadOnnxSource(spec);
  const size = src.fixedSize ?? inputSize;
  const tensors = await onnxTensorShapes(await loadOnnxRuntime(), src, size);
  const featureLayer = o.featureLayer === "auto" ? defaultOnnxFeatureTensor(tensors) : o.featureLayer;
  const hwc = (s: number[]): number[] => channelsLast(s, src.layout);
  const layers = tensors
    .filter((t) => (t.shape.length === 3 && ONNX_CUTTABLE.test(t.opType)) || t.name === featureLayer)
    .map((t) => ({ name: t.name, class_name: t.opType, output_shape: hwc(t.shape) }));
  const preprocessing = o.preprocessing === "auto" ? src.preprocessing ?? "unknown (give --preprocessing)" : o.preprocessing;
  return {
    model: spec, input_size: size, min_input_size: null, layout: src.layout, preprocessing, preprocessing_origin: src.preprocessing ? "metadata" : "none",
    default_feature_layer: featureLayer, parameters: src.parameters, layers,
  };
}

export async function describeModel(spec: string, inputSize: number, o: { featureLayer: string; preprocessing: Parameters<typeof resolveModelChoices>[1]["preprocessing"] }): Promise<ModelInfo> {
  if (isOnnxModelSpec(spec)) return describeOnnxModel(spec, inputSize, o);
  const source = await loadPretrained(spec);
  const choices = resolveModelChoices(source, { ...o, inputSize });
  const { topology } = cutTopology(source.artifacts.modelTopology as object, { inputSize, outputLayer: choices.featureLayer });
  const base = await loadCut(source, topology);
  try {
    const points = new Set(cutPoints(topology));
    const layers = base.layers
      .filter((l) => points.has(l.name) && (CUTTABLE.test(l.getClassName()) || l.name === choices.featureLayer))
      .map((l) => ({ name: l.name, class_name: l.getClassName(), output_shape: (l.outputShape as (number | null)[]).slice(1) as number[] }));
    return {
      model: source.name, input_size: inputSize, min_input_size: source.minInputSize ?? null, layout: "NHWC",
      preprocessing: choices.preprocessing, preprocessing_origin: source.preprocessingOrigin ?? "name",
      default_feature_layer: choices.featureLayer, parameters: base.countParams(), layers,
    };
  } finally {
    base.dispose();
  }
}

export async function main(argv: string[]): Promise<number> {
  const parsed = parseArgs(argv, [], ["help", "json"], "model-info");
  if (parsed.extra["help"]) {
    console.log(HELP);
    return 0;
  }
  checkEnvironment("model-info");
  if (parsed.positionals.length > 0) throw new ConfigError(`ctrain model-info: unexpected argument ${JSON.stringify(parsed.positionals[0])}; options start with --.`);
  const opts = resolveOptions(parsed.options);
  await selectBackend(opts.backend);
  const info = await describeModel(opts.model, opts.inputSize, { featureLayer: opts.featureLayer, preprocessing: opts.preprocessing });
  if (parsed.extra["json"]) {
    console.log(JSON.stringify(info, null, 2));
    return 0;
  }
  const origin = { builtin: "the model's training recipe", metadata: "declared in the model's metadata", name: "guessed from the name", none: "not declared" }[info.preprocessing_origin] ?? info.preprocessing_origin;
  console.log(`model          ${info.model}`);
  console.log(`input size     ${info.input_size}${info.min_input_size !== null ? ` (at least ${info.min_input_size})` : ""}, layout ${info.layout}`);
  console.log(`preprocessing  ${info.preprocessing} (${origin})`);
  console.log(`parameters     ${info.parameters.toLocaleString("en-US")} (${info.model.toLowerCase().endsWith(".onnx") ? "the whole graph" : `base, input to ${info.default_feature_layer}`})`);
  console.log(`\nlayers worth cutting at (--feature-layer; * = default):`);
  const width = Math.max(...info.layers.map((l) => l.name.length));
  for (const l of info.layers)
    console.log(`${l.name === info.default_feature_layer ? "*" : " "} ${l.name.padEnd(width)}  ${l.class_name.padEnd(22)}  ${l.output_shape.join("x")}`);
  return 0;
}

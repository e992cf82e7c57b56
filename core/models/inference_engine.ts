/**
 * The inference-engine seam: every frozen forward pass (feature extraction, the frozen base under
 * `--method augment`, the lower part that builds the fine-tune activation cache, `ctrain predict`)
 * runs a {@link FrozenForward}. Training stays on the tfjs backend (core/models/backend.ts).
 *
 * `--engine auto|onnx|tfjs`:
 * - `onnx`: onnxruntime-node (its CPU library ships inside the npm package). The tfjs layers model
 *   is converted to an ONNX graph in memory (core/models/onnx/export.ts) with the preprocessing
 *   folded in, so the engine takes [0, 255] pixels as they come from the decoder.
 * - `tfjs`: the model's own predict() on the tfjs backend (wasm here).
 * - `auto`: onnx when onnxruntime loads, the model converts and the converted graph agrees with
 *   tfjs on a probe batch; otherwise tfjs, with the reason in `info.fallback` for the log.
 *
 * The probe costs one tfjs forward pass of two images per built graph (under a second at 224 px
 * on wasm) and turns any converter defect into a fallback instead of wrong features.
 *
 * `--engine-precision int8`: the onnx graph is quantized (core/models/onnx/quantize.ts) after the
 * fp32 graph passed the probe, calibrated on `calibration` images when the caller gives them (the
 * job's first training images: every process then builds the same graph), else on the first batch
 * the engine is given.
 */
import * as tf from "@tensorflow/tfjs";
import { availableParallelism } from "node:os";
import { existsSync } from "node:fs";
import { createRequire } from "node:module";
import { dirname, join } from "node:path";
import type { EngineName, EnginePrecision, EngineProvider } from "../runtime/config.js";
import { ConfigError, EngineUnavailableError, UnsupportedLayerError } from "../runtime/errors.js";
import { preprocess } from "./feature_model.js";
import type { Preprocessing } from "./model_zoo.js";
import { layersModelToOnnx } from "./onnx/export.js";
import { defaultWeightBits, quantizeGraph, type WeightBits } from "./onnx/quantize.js";

export { ENGINE_PRECISIONS, ENGINES, type EngineName, type EnginePrecision } from "../runtime/config.js";

/** The engine a frozen graph actually runs on. */
export interface EngineInfo {
  /** What was asked for. */
  requested: EngineName;
  /** What runs. */
  name: "onnx" | "tfjs";
  /** Version of the engine library (onnxruntime-node's, or tfjs-core's). */
  version: string;
  /** Intra-op threads of onnxruntime (1 for tfjs, which has no threads in Node on wasm/cpu). */
  threads: number;
  /** Execution provider (`cpu`, `cuda`) for onnx; the tfjs backend name for tfjs. */
  provider: string;
  /** Why `auto` did not take onnx (absent when it did, or when tfjs was asked for). */
  fallback?: string;
  /** Arithmetic of the forward pass: `int8` only on onnx with `--engine-precision int8`. */
  precision: EnginePrecision;
  /** int8: bits of the quantized weights, by this CPU (core/models/onnx/quantize.ts defaultWeightBits). */
  weightBits?: WeightBits;
}

/** How to build the engine of a frozen graph. */
export interface EngineOptions {
  /** Default `auto`. */
  engine?: EngineName;
  /** onnxruntime intra-op threads. Default 1 (one worker process per core uses the cores). */
  threads?: number;
  /** `--engine-provider`: `auto` (default: cuda when onnxruntime-node's CUDA provider is installed, else cpu), `cpu` or `cuda`. */
  provider?: EngineProvider;
  /** `--engine-precision`. Default fp32. int8 needs the onnx engine (tfjs refuses it; auto falling back to tfjs runs fp32). */
  precision?: EnginePrecision;
  /**
   * int8 only: calibration images, batches of NHWC [0, 255] pixels at the graph's input size (a few
   * dozen to a few hundred training images). Absent: the first batch given to `run()` calibrates.
   */
  calibration?: () => Promise<Uint8Array[]>;
}

/** A frozen graph from NHWC [0, 255] pixels to one flat float32 row per image. */
export interface FrozenForward {
  readonly info: EngineInfo;
  /** Rows of `n` images: n*H*W*C pixels in [0, 255] (uint8 from the decoder, float32 after augmentation). */
  run(pixels: Uint8Array | Float32Array, n: number): Promise<Float32Array>;
  dispose(): void;
}

type Ort = typeof import("onnxruntime-node");
const require = createRequire(import.meta.url);

/** onnxruntime-node's CUDA execution provider library: not in the npm package, fetched by its install script on request. */
export function cudaProviderPath(): string | undefined {
  try {
    const dist = dirname(require.resolve("onnxruntime-node"));
    const lib = join(dist, "..", "bin", "napi-v6", process.platform, process.arch, "libonnxruntime_providers_cuda.so");
    return existsSync(lib) ? lib : undefined;
  } catch {
    return undefined;
  }
}

/** How to get the CUDA provider, for messages. */
export const CUDA_INSTALL_HINT =
  "on a Linux x64 machine with CUDA 12, cuDNN 9 and internet, run ONNXRUNTIME_NODE_INSTALL=cuda12 node node_modules/onnxruntime-node/script/install.js (the project's .npmrc skips that download by default)";

/** The execution provider to ask onnxruntime for. */
export function resolveProvider(p: EngineProvider | undefined): "cpu" | "cuda" {
  if (p === "cpu") return "cpu";
  const cuda = cudaProviderPath() !== undefined;
  if (p === "cuda" && !cuda) throw new EngineUnavailableError(`--engine-provider cuda: onnxruntime-node's CUDA provider is not installed here; ${CUDA_INSTALL_HINT}, or use --engine-provider cpu.`);
  return cuda ? "cuda" : "cpu";
}
let ortPromise: Promise<Ort> | undefined;

/** onnxruntime-node, imported once; rejects with EngineUnavailableError saying how to install it. */
export function loadOnnxRuntime(): Promise<Ort> {
  ortPromise ??= import("onnxruntime-node").then(
    (m) => ((m as { default?: Ort }).default ?? m) as Ort,
    (cause: unknown) => {
      ortPromise = undefined;
      throw new EngineUnavailableError(
        `onnxruntime-node cannot be loaded here (${firstLine(cause)}): run 'npm ci' (its CPU library ships in the npm package for linux/darwin/win32 x64 and arm64), or use --engine tfjs.`,
        { cause },
      );
    },
  );
  return ortPromise;
}

function firstLine(err: unknown): string {
  return String((err as Error)?.message ?? err).split("\n")[0];
}

/** Threads for onnxruntime when the user gave none: the process's share of the cores, at least 1. */
export function defaultThreads(processesPerMachine: number): number {
  return Math.max(1, Math.floor(availableParallelism() / Math.max(1, processesPerMachine)));
}

/** `--threads` as given (> 0), else this process's share of the cores among `processes` on the machine. */
export function threadsFor(threads: number, processes: number): number {
  return threads > 0 ? threads : defaultThreads(processes);
}

/**
 * The frozen forward pass of `model` (image -> features or probabilities) on the requested engine.
 * `model` takes preprocessed NHWC images; `preprocessing` says how [0, 255] pixels become its input.
 */
export async function frozenForward(model: tf.LayersModel, preprocessing: Preprocessing, o: EngineOptions = {}): Promise<FrozenForward> {
  const requested = o.engine ?? "auto";
  if (requested === "tfjs") {
    if (o.precision === "int8") throw new ConfigError("--engine-precision int8 runs on onnxruntime, but --engine is tfjs: use --engine auto or onnx, or --engine-precision fp32.");
    return tfjsForward(model, preprocessing, { requested });
  }
  // An explicit --engine-provider cuda that cannot be had is an error under auto too, not a silent fallback.
  if (o.provider === "cuda") resolveProvider("cuda");
  try {
    // The probe holds the converted graph to fp32 accuracy; int8 is built from a graph that passed it.
    const onnx = await onnxForward(model, preprocessing, requested, { ...o, precision: "fp32" });
    await checkAgainstTfjs(onnx, model, preprocessing);
    if (o.precision !== "int8") return onnx;
    onnx.dispose();
    return await onnxForward(model, preprocessing, requested, o);
  } catch (err) {
    if (requested === "onnx") {
      if (err instanceof UnsupportedLayerError) throw new ConfigError(`--engine onnx: ${err.message} Use --engine auto (falls back to tfjs) or --engine tfjs.`, { cause: err });
      throw err;
    }
    return tfjsForward(model, preprocessing, { requested, fallback: firstLine(err) });
  }
}

/** The tfjs engine: predict() on the current backend. */
export function tfjsForward(model: tf.LayersModel, preprocessing: Preprocessing, info: Pick<EngineInfo, "requested" | "fallback">): FrozenForward {
  const shape = model.inputs[0].shape;
  const [h, w, c] = [shape[1] as number, shape[2] as number, shape[3] as number];
  return {
    info: { ...info, name: "tfjs", version: tf.version.tfjs, threads: 1, provider: tf.getBackend(), precision: "fp32" },
    async run(pixels, n) {
      checkPixels(pixels, n, h * w * c);
      const y = tf.tidy(() => {
        const x = tf.tensor4d(pixels, [n, h, w, c], pixels instanceof Uint8Array ? "int32" : "float32");
        const out = model.predict(preprocess(x, preprocessing)) as tf.Tensor;
        return out.reshape([n, -1]);
      });
      try {
        return (await y.data()) as Float32Array;
      } finally {
        y.dispose();
      }
    },
    dispose() {},
  };
}

function checkPixels(pixels: Uint8Array | Float32Array, n: number, perImage: number): void {
  if (pixels.length !== n * perImage) throw new RangeError(`frozen forward: expected ${n * perImage} pixel values for ${n} images, got ${pixels.length}`);
}

type Session = import("onnxruntime-node").InferenceSession;

/** An ONNX graph from NHWC [0, 255] pixels (uint8 or float32) to [N, D] rows. */
export interface OnnxGraph {
  bytes: Uint8Array;
  inputName: string;
  outputName: string;
  /** [H, W, C]. */
  inputShape: number[];
}

/** The onnx engine for a graph made from a tfjs layers model by the converter. */
function onnxForward(model: tf.LayersModel, preprocessing: Preprocessing, requested: EngineName, o: EngineOptions): Promise<FrozenForward> {
  return onnxGraphForward((dtype) => layersModelToOnnx(model, { preprocessing, inputDtype: dtype }), requested, o);
}

/**
 * The onnx engine: one session per input dtype (uint8 from the decoder, float32 after augmentation),
 * each graph made by `graphFor` on first use; the uint8 one is built here, so a graph that does not
 * convert or load fails before any work.
 */
export async function onnxGraphForward(graphFor: (dtype: "uint8" | "float32") => OnnxGraph, requested: EngineName, o: EngineOptions): Promise<FrozenForward> {
  const ort = await loadOnnxRuntime();
  const threads = o.threads ?? 1;
  const provider = resolveProvider(o.provider);
  const precision = o.precision ?? "fp32";
  const weightBits = precision === "int8" ? defaultWeightBits() : undefined;
  let calibration: Promise<(Uint8Array | Float32Array)[]> | undefined;
  const sessions = new Map<"uint8" | "float32", Promise<{ session: Session; input: string; output: string; perImage: number; dims: number[] }>>();
  const open = (dtype: "uint8" | "float32", first?: Uint8Array | Float32Array) => {
    let s = sessions.get(dtype);
    if (!s) {
      s = (async () => {
        const g = graphFor(dtype);
        const perImage = g.inputShape.reduce((a, b) => a * b, 1);
        let bytes = g.bytes;
        if (precision === "int8") {
          calibration ??= o.calibration ? o.calibration() : Promise.resolve(first ? batchesOf(first, perImage, 16) : []);
          bytes = (await quantizeGraph(g.bytes, await calibration, { threads, weightBits })).bytes;
        }
        const session = await ort.InferenceSession.create(bytes, {
          // CUDA runs the graph; ops it lacks fall back to the CPU provider inside the same session.
          executionProviders: provider === "cuda" ? ["cuda", "cpu"] : ["cpu"],
          intraOpNumThreads: threads,
          interOpNumThreads: 1,
          executionMode: "sequential",
          graphOptimizationLevel: "all",
        });
        return { session, input: g.inputName, output: g.outputName, perImage, dims: g.inputShape };
      })();
      sessions.set(dtype, s);
      s.catch(() => sessions.delete(dtype));
    }
    return s;
  };
  // Built now, so a graph that does not convert or load fails before any work (int8 without
  // calibration images waits for its first batch).
  if (precision === "fp32" || o.calibration) await open("uint8");
  else graphFor("uint8");
  return {
    info: { requested, name: "onnx", version: ort.env.versions?.node ?? "unknown", threads, provider, precision, ...(weightBits ? { weightBits } : {}) },
    async run(pixels, n) {
      const s = await open(pixels instanceof Uint8Array ? "uint8" : "float32", pixels);
      checkPixels(pixels, n, s.perImage);
      const input = new ort.Tensor(pixels instanceof Uint8Array ? "uint8" : "float32", pixels, [n, ...s.dims]);
      const result = await s.session.run({ [s.input]: input });
      return result[s.output].data as Float32Array;
    },
    dispose() {
      for (const s of sessions.values()) void s.then((x) => x.session.release(), () => undefined);
      sessions.clear();
    },
  };
}

/** `pixels` cut into batches of at most `size` images (copies: calibration outlives the caller's buffer). */
function batchesOf(pixels: Uint8Array | Float32Array, perImage: number, size: number): (Uint8Array | Float32Array)[] {
  const out: (Uint8Array | Float32Array)[] = [];
  const n = Math.floor(pixels.length / perImage);
  for (let i = 0; i < n; i += size) out.push(pixels.slice(i * perImage, Math.min(n, i + size) * perImage));
  return out;
}

/**
 * Two deterministic probe images through both engines; the ONNX graph is taken only if every value
 * agrees within 1e-3 of the output's scale (the parity tests hold 1e-4 on real images).
 */
async function checkAgainstTfjs(onnx: FrozenForward, model: tf.LayersModel, preprocessing: Preprocessing): Promise<void> {
  const shape = model.inputs[0].shape;
  const per = (shape[1] as number) * (shape[2] as number) * (shape[3] as number);
  const probe = new Uint8Array(2 * per);
  for (let i = 0; i < probe.length; i++) probe[i] = (i * 2654435761) >>> 24;
  const want = await tfjsForward(model, preprocessing, { requested: "tfjs" }).run(probe, 2);
  const got = await onnx.run(probe, 2);
  let scale = 0, diff = 0;
  for (let i = 0; i < want.length; i++) {
    scale = Math.max(scale, Math.abs(want[i]));
    diff = Math.max(diff, Math.abs(want[i] - got[i]));
  }
  if (got.length !== want.length || !(diff <= 1e-3 * Math.max(scale, 1e-6))) {
    onnx.dispose();
    throw new EngineUnavailableError(`the ONNX graph disagrees with tfjs on a probe batch (max abs diff ${diff.toExponential(2)}, output scale ${scale.toExponential(2)}, ${got.length} vs ${want.length} values)`);
  }
}

/**
 * From job options to the training loop's controls (core/training/train_loop.ts TrainingControls): early
 * stopping, best weights, learning-rate schedule, class weights, label smoothing. `--class-weight`
 * is checked against the data set's classes by preflight, before any work.
 */
import type { JobOptions } from "../runtime/config.js";
import { ConfigError } from "../runtime/errors.js";
import type { TrainingControls } from "./train_loop.js";

/** A parsed `--class-weight`. */
export type ClassWeightSpec = { kind: "none" } | { kind: "auto" } | { kind: "map"; weights: Map<string, number> };

/** Parses `none`, `auto` or `<class>=<weight>,...` (weights > 0). Throws ConfigError naming --class-weight. */
export function parseClassWeightSpec(spec: string): ClassWeightSpec {
  const t = spec.trim();
  if (t === "none" || t === "") return { kind: "none" };
  if (t === "auto") return { kind: "auto" };
  const weights = new Map<string, number>();
  for (const part of t.split(",")) {
    // A class name may itself hold '=': the weight is after the last one.
    const eq = part.lastIndexOf("=");
    const name = eq > 0 ? part.slice(0, eq).trim() : "";
    const w = eq > 0 ? Number(part.slice(eq + 1)) : NaN;
    if (!name || !(w > 0) || !Number.isFinite(w))
      throw new ConfigError(`--class-weight ${JSON.stringify(spec)}: expected none, auto or <class>=<weight>,... with weights > 0; ${JSON.stringify(part)} is not one.`);
    if (weights.has(name)) throw new ConfigError(`--class-weight names class ${JSON.stringify(name)} twice.`);
    weights.set(name, w);
  }
  return { kind: "map", weights };
}

/**
 * Per-class loss weights for `classes` (undefined for `none`). `auto` is Keras' / scikit-learn's
 * "balanced": n / (classes * n_class) over the training samples. A named class that is not in the
 * data set is a ConfigError that lists the classes.
 */
export function classWeightsFor(spec: string, classes: readonly string[], trainCounts: ArrayLike<number>): Float32Array | undefined {
  const parsed = parseClassWeightSpec(spec);
  if (parsed.kind === "none") return undefined;
  const out = new Float32Array(classes.length).fill(1);
  if (parsed.kind === "auto") {
    let n = 0;
    for (let c = 0; c < classes.length; c++) n += trainCounts[c];
    for (let c = 0; c < classes.length; c++) out[c] = trainCounts[c] > 0 ? n / (classes.length * trainCounts[c]) : 1;
    return out;
  }
  for (const [name, w] of parsed.weights) {
    const c = classes.indexOf(name);
    if (c < 0) {
      const shown = classes.length > 20 ? `${classes.slice(0, 20).join(", ")}, ...` : classes.join(", ");
      throw new ConfigError(`--class-weight names class ${JSON.stringify(name)}, which is not in the data set (classes: ${shown}).`);
    }
    out[c] = w;
  }
  return out;
}

/** The controls of a training phase (in this process, or on every replica of a data-parallel attempt: proto/training_wire.ts). */
export function controlsOf(opts: JobOptions, classWeights: Float32Array | undefined): TrainingControls {
  return {
    earlyStoppingPatience: opts.earlyStoppingPatience,
    restoreBestWeights: opts.restoreBestWeights,
    monitor: opts.monitor,
    lrSchedule: opts.lrSchedule,
    lrPatience: opts.lrPatience,
    loss: { ...(classWeights ? { classWeights } : {}), labelSmoothing: opts.labelSmoothing },
  };
}

/** Training samples per class. */
export function trainCounts(samples: Iterable<{ label: number; split: string }>, classes: number): number[] {
  const counts = new Array<number>(classes).fill(0);
  for (const s of samples) if (s.split === "train") counts[s.label]++;
  return counts;
}

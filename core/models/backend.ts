/**
 * Compute backend selection. `auto` takes the first that loads: @tensorflow/tfjs-node-gpu (CUDA),
 * @tensorflow/tfjs-node, @tensorflow/tfjs-backend-wasm, plain cpu. The native ones are optional
 * dependencies (their install downloads libtensorflow), so they are imported lazily and a missing
 * one is not an error under `auto`.
 *
 * Everything else imports `@tensorflow/tfjs`; the native packages register their `tensorflow`
 * backend into that same (deduplicated) tfjs-core engine.
 */
import * as tf from "@tensorflow/tfjs";
import type { BackendName } from "../runtime/config.js";
import { BackendUnavailableError } from "../runtime/errors.js";

/** The backend a process actually runs on. */
export interface BackendInfo {
  /** What was asked for. */
  requested: BackendName;
  /** What runs: `tensorflow-gpu`, `tensorflow`, `wasm` or `cpu`. */
  name: Exclude<BackendName, "auto">;
  /** tfjs's own backend name (`tensorflow`, `wasm`, `cpu`). */
  tfBackend: string;
  /** Why earlier candidates were passed over (for the log). */
  fallbacks: { name: string; reason: string }[];
}

type Concrete = Exclude<BackendName, "auto">;
const ORDER: Concrete[] = ["tensorflow-gpu", "tensorflow", "wasm", "cpu"];

async function tryLoad(name: Concrete): Promise<string> {
  switch (name) {
    case "tensorflow-gpu":
      // A variable specifier keeps TypeScript from requiring the optional package at build time.
      await import(/* optional */ ["@tensorflow", "tfjs-node-gpu"].join("/"));
      return "tensorflow";
    case "tensorflow":
      await import(["@tensorflow", "tfjs-node"].join("/"));
      return "tensorflow";
    case "wasm":
      await import("@tensorflow/tfjs-backend-wasm");
      return "wasm";
    case "cpu":
      return "cpu";
  }
}

let current: BackendInfo | undefined;

/**
 * Loads and activates a backend. Idempotent per process: a second call with the same request
 * returns the active one; a different request after activation is refused (tfjs has one engine).
 */
export async function selectBackend(requested: BackendName): Promise<BackendInfo> {
  if (current) {
    if (requested === current.requested || requested === current.name) return current;
    throw new BackendUnavailableError(`backend ${current.name} is already active in this process; cannot switch to ${requested}.`);
  }
  const candidates = requested === "auto" ? ORDER : [requested];
  const fallbacks: BackendInfo["fallbacks"] = [];
  for (const name of candidates) {
    try {
      const tfBackend = await tryLoad(name);
      const ok = await tf.setBackend(tfBackend);
      if (!ok) throw new Error(`tf.setBackend('${tfBackend}') returned false`);
      await tf.ready();
      current = { requested, name, tfBackend, fallbacks };
      return current;
    } catch (err) {
      fallbacks.push({ name, reason: String((err as Error).message ?? err).split("\n")[0] });
    }
  }
  const why = fallbacks.map((f) => `${f.name}: ${f.reason}`).join("; ");
  const hint = requested === "tensorflow-gpu" || requested === "tensorflow"
    ? ` Install it with 'npm install @tensorflow/${requested === "tensorflow-gpu" ? "tfjs-node-gpu" : "tfjs-node"}' (needs internet to fetch libtensorflow), or use --backend auto.`
    : "";
  throw new BackendUnavailableError(`cannot load backend ${requested} (${why}).${hint}`);
}

/** The active backend, if one was selected. */
export function activeBackend(): BackendInfo | undefined {
  return current;
}

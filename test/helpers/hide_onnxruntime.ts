/**
 * `node --import <this file>`: makes `onnxruntime-node` unresolvable in the process, as on a platform
 * its npm package has no binary for. Tests use it to check the engine fallback of a real CLI run.
 */
import { register } from "node:module";
import { isMainThread } from "node:worker_threads";

type Next = (specifier: string, context: unknown) => Promise<unknown>;

/** Module resolve hook (runs on the loader thread). */
export async function resolve(specifier: string, context: unknown, next: Next): Promise<unknown> {
  if (specifier === "onnxruntime-node" || specifier.startsWith("onnxruntime-node/"))
    throw Object.assign(new Error(`Cannot find package '${specifier}' (hidden by test/helpers/hide_onnxruntime)`), { code: "ERR_MODULE_NOT_FOUND" });
  return next(specifier, context);
}

// Imported with --import on the main thread: register this same file as the resolve hook (which
// loads it again on the loader thread, where it must not register itself once more).
if (isMainThread) register(import.meta.url);

/**
 * Entry of the batch-preparation thread (core/training/batch_prep.ts): loads the backend the main
 * thread runs on, answers `ready` (or `failed`), then prepares each job in order and sends its rows
 * back as a transferred buffer; `close` ends the thread after the jobs before it.
 */
import { parentPort, workerData } from "node:worker_threads";
import { selectBackend } from "../models/backend.js";
import type { BackendName } from "../runtime/config.js";
import { type FromThread, prepPixels, type ToThread, transferable } from "./batch_prep.js";

const port = parentPort!;
const send = (m: FromThread, transfer: ArrayBuffer[] = []): void => port.postMessage(m, transfer);

try {
  await selectBackend((workerData as { backend: BackendName }).backend);
  send({ ready: true });
  port.on("message", (m: ToThread) => {
    if ("close" in m) return port.close();
    try {
      const x = transferable(prepPixels(m.job));
      send({ id: m.id, x }, [x.buffer as ArrayBuffer]);
    } catch (err) {
      send({ id: m.id, error: err instanceof Error ? err.message : String(err) });
    }
  });
} catch (err) {
  send({ failed: `backend ${JSON.stringify(workerData?.backend)}: ${err instanceof Error ? err.message : String(err)}` });
  port.close();
}

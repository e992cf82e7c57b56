/**
 * A child process for test/batch_prep_thread.test.ts: prepares two augmented batches through
 * imageBatches (its preparation thread) and the same through imageBatch (the main thread), leaves the
 * source open on purpose, prints `{"same": bool, "live": threads}` and must then exit by itself. Its
 * images are pixels in memory (no sharp: it also runs under the permission model, where native addons
 * and threads are refused).
 */
import { DEFAULT_AUGMENT } from "../../core/datasets/augment.js";
import { selectBackend } from "../../core/models/backend.js";
import { Rng } from "../../core/runtime/rng.js";
import { liveBatchPrepThreads } from "../../core/training/batch_prep.js";
import { imageBatch, imageBatches, type ImageSource } from "../../core/training/image_batches.js";

/** `n` random images of `size` x `size` in memory. */
function pixelSource(n: number, size: number): ImageSource {
  const per = size * size * 3;
  const rng = new Rng(11);
  const all = Uint8Array.from({ length: n * per }, () => Math.floor(rng.next() * 256));
  return {
    size, inMemory: true, labels: Int32Array.from({ length: n }, (_, i) => i % 3),
    async batch(rows) {
      const out = new Uint8Array(rows.length * per);
      for (let i = 0; i < rows.length; i++) out.set(all.subarray(rows[i]! * per, (rows[i]! + 1) * per), i * per);
      return out;
    },
  };
}

await selectBackend("wasm");
const src = pixelSource(12, 12);
const source = imageBatches(src, { seed: 3, preprocessing: "tf", augment: DEFAULT_AUGMENT });
let same = true;
for (const rows of [Int32Array.from([3, 1, 4]), Int32Array.from([1, 5, 9, 2])]) {
  const threaded = await source.batch(rows, 0, 1);
  const main = await imageBatch(src, rows, "tf", DEFAULT_AUGMENT, { seed: 3, epoch: 1 });
  same &&= threaded.x.length === main.x.length && threaded.x.every((v, i) => Object.is(v, main.x[i]));
}
console.log(JSON.stringify({ same, live: liveBatchPrepThreads() }));

/**
 * Batch preparation on a thread (core/training/batch_prep.ts): the batches imageBatches prepares on its
 * thread are bit-identical to imageBatch's on the main thread (augmented or not, with or without a
 * frozen stage), the pixels are handed over rather than copied, the thread ends with the source's
 * close and with fit however fit ends, a process that leaves a source open still exits, and where
 * threads are refused (Node's permission model) batches are prepared on the main thread after one
 * warning. Real images (a synthetic data set decoded through the same path as files), wasm backend.
 */
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { fileURLToPath } from "node:url";
import { before, describe, test } from "node:test";
import * as tf from "@tensorflow/tfjs";
import { DEFAULT_AUGMENT } from "../core/datasets/augment.js";
import { openDataset } from "../core/datasets/open.js";
import { selectBackend } from "../core/models/backend.js";
import { BatchPrepThread, liveBatchPrepThreads, type PixelJob, prepPixels } from "../core/training/batch_prep.js";
import { type FrozenStage, imageBatch, imageBatches, type ImageSource, openImages } from "../core/training/image_batches.js";
import { fit } from "../core/training/train_loop.js";

async function source(): Promise<ImageSource> {
  const dataset = await openDataset("synthetic:40:4", { seed: 9, valSplit: 0, testSplit: 0, limit: 0, maxPixels: 1e8 });
  return openImages(dataset, dataset.samples.filter((s) => s.split === "train"), 16);
}

/** A frozen stage: the first 6 values of each image (so the rows show exactly what the stage was given). */
const firstValues: FrozenStage = {
  featureShape: [6],
  async extract(pixels, n) {
    const per = pixels.length / n;
    return Float32Array.from({ length: n * 6 }, (_, k) => pixels[Math.floor(k / 6) * per + (k % 6)]!);
  },
};

/** Runs a child (test/helpers/batch_prep_child.ts) to its own exit: its output line, stderr and exit code. */
function child(nodeArgs: string[]): Promise<{ out: { same: boolean; live: number }; stderr: string; code: number | null }> {
  const script = fileURLToPath(new URL("./helpers/batch_prep_child.js", import.meta.url));
  const p = spawn(process.execPath, [...nodeArgs, script], { stdio: ["ignore", "pipe", "pipe"] });
  let stdout = "", stderr = "";
  p.stdout.on("data", (d) => (stdout += d));
  p.stderr.on("data", (d) => (stderr += d));
  const timer = setTimeout(() => p.kill("SIGKILL"), 120_000);
  return new Promise((resolve) => p.on("exit", (code) => {
    clearTimeout(timer);
    resolve({ out: JSON.parse(stdout.trim().split("\n").at(-1) || "{}"), stderr, code });
  }));
}

describe("batch prep thread", () => {
  before(async () => {
    await selectBackend("wasm");
  });

  for (const augment of [DEFAULT_AUGMENT, null])
    for (const frozen of [undefined, firstValues])
      test(`batch prep thread - the thread's batches equal the main thread's (augment ${augment ? "on" : "off"}, ${frozen ? "frozen stage" : "no frozen stage"}); close ends the thread`, async () => {
        const src = await source();
        const batches = imageBatches(src, { seed: 7, preprocessing: "tf", augment, frozen });
        const rows = [Int32Array.from([4, 9, 1, 7, 12]), Int32Array.from([0, 3, 22])];
        // Two in flight at once, as fit's prefetch may have them: each comes back as its own batch.
        const got = await Promise.all(rows.map((r, b) => batches.batch(r, b, 2)));
        for (const [i, r] of rows.entries()) {
          const want = await imageBatch(src, r, "tf", augment, { seed: 7, epoch: 2 }, frozen);
          assert.deepEqual(got[i]!.x, want.x);
          assert.deepEqual(got[i]!.index, want.index);
          assert.deepEqual(got[i]!.y, want.y);
        }
        // A frozen stage without augmentation takes the decoded bytes as they are: no thread is needed.
        assert.equal(liveBatchPrepThreads(), frozen && !augment ? 0 : 1);
        await batches.close!();
        assert.equal(liveBatchPrepThreads(), 0);
      });

  test("batch prep thread - pixels are handed over (transferred, not copied); a job after close starts a new thread", async () => {
    const src = await source();
    const rows = Int32Array.from([2, 5, 8]);
    const job = async (): Promise<PixelJob> => ({ rgb: await src.batch(rows), size: 16, preprocessing: "torch", augment: DEFAULT_AUGMENT, keys: { seed: 1, epoch: 0, index: rows }, raw: false });
    const want = prepPixels(await job());
    const thread = new BatchPrepThread();
    const handed = await job();
    assert.deepEqual(await thread.prepare(handed), want);
    assert.equal(handed.rgb.byteLength, 0, "the pixels' buffer went to the thread");
    await thread.close();
    assert.equal(liveBatchPrepThreads(), 0);
    assert.deepEqual(await thread.prepare(await job()), want);
    assert.equal(liveBatchPrepThreads(), 1);
    await thread.close();
    assert.equal(liveBatchPrepThreads(), 0);
  });

  test("batch prep thread - fit ends the source's thread, also when it stops with an error", async () => {
    const src = await source();
    const model = tf.sequential({ layers: [tf.layers.dense({ inputShape: [6], units: 4, activation: "softmax" })] });
    const opts = { epochs: 1, batchSize: 8, seed: 1, numClasses: 4, optimizer: tf.train.sgd(1e-4) };
    const history = await fit(model, imageBatches(src, { seed: 1, preprocessing: "unit", augment: DEFAULT_AUGMENT, frozen: firstValues }), opts);
    assert.equal(history.length, 1);
    assert.equal(liveBatchPrepThreads(), 0);
    const stop = new AbortController();
    const stopped = fit(model, imageBatches(src, { seed: 1, preprocessing: "unit", augment: DEFAULT_AUGMENT, frozen: firstValues }), { ...opts, signal: stop.signal, onBatchEnd: () => stop.abort(new Error("stopped on purpose")) });
    await assert.rejects(stopped, /stopped on purpose/);
    assert.equal(liveBatchPrepThreads(), 0);
    model.dispose();
  });

  test("batch prep thread - a process that leaves a source open exits by itself", async () => {
    const r = await child([]);
    assert.equal(r.code, 0, r.stderr);
    assert.deepEqual(r.out, { same: true, live: 1 });
  });

  test("batch prep thread - where threads are refused, batches are prepared on the main thread after one warning", async () => {
    const r = await child(["--experimental-permission", "--allow-fs-read=*"]);
    assert.equal(r.code, 0, r.stderr);
    assert.deepEqual(r.out, { same: true, live: 0 });
    assert.equal(r.stderr.match(/CTRAIN_BATCH_PREP_THREAD/g)?.length, 1, r.stderr);
  });
});

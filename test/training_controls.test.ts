/**
 * Keras' training controls in the one shared loop, on small real tensors: early stopping with
 * patience, best weights restored (and marked in the history), cosine and plateau schedules (the
 * rate recorded per epoch), class weights and label smoothing in the loss; and the option rules
 * that refuse them before any work.
 */
import assert from "node:assert/strict";
import { existsSync } from "node:fs";
import { before, describe, test } from "node:test";
import * as tf from "@tensorflow/tfjs";
import { selectBackend } from "../core/models/backend.js";
import { type JobOptions, parseArgs, resolveOptions } from "../core/runtime/config.js";
import { buildHead } from "../core/models/head.js";
import { Rng } from "../core/runtime/rng.js";
import { type ArrayData, evaluate, fit, type FitOptions, sparseCrossEntropy } from "../core/training/train_loop.js";
import { classWeightsFor, controlsOf } from "../core/training/training_controls.js";
import { runCli } from "./helpers/cli.js";

before(async () => {
  await selectBackend("wasm");
});

/** Gaussian blobs in 8 dimensions; `separation` 0 = labels unrelated to the inputs (pure noise to overfit). */
function blobs(n: number, classes: number, seed: number, separation = 2, labelOf = (i: number) => i % classes): ArrayData {
  const rng = new Rng(seed);
  const dim = 8;
  const x = new Float32Array(n * dim);
  const y = new Int32Array(n);
  for (let i = 0; i < n; i++) {
    y[i] = labelOf(i);
    for (let d = 0; d < dim; d++) x[i * dim + d] = (d % classes === y[i] ? separation : 0) + 2 * (rng.next() - 0.5);
  }
  return { x, sampleShape: [dim], y };
}

async function train(data: ArrayData, o: Partial<FitOptions> & { lr?: number; units?: number }) {
  const head = buildHead({ featureDim: 8, numClasses: 3, units: o.units ?? 64, dropout: 0, seed: 3 });
  const optimizer = tf.train.adam(o.lr ?? 0.01);
  const history = await fit(head, data, { epochs: 12, batchSize: 8, seed: 1, numClasses: 3, optimizer, ...o });
  return { head, optimizer, history };
}

describe("training controls - early stopping and best weights", () => {
  test("training controls - early stopping ends the phase patience epochs after the best val_loss", async () => {
    // Labels unrelated to inputs: the head memorises the training set and val_loss climbs after the first epochs.
    const { head, optimizer, history } = await train(blobs(64, 3, 1, 0), { lr: 0.03, epochs: 30, validation: blobs(60, 3, 2, 0), controls: { earlyStoppingPatience: 3 } });
    const losses = history.map((h) => h.val_loss!);
    const bestAt = losses.indexOf(Math.min(...losses));
    assert.ok(history.length < 30, `stopped early (ran ${history.length} of 30)`);
    assert.equal(history.length, bestAt + 1 + 3, `best epoch ${bestAt + 1}, then 3 without improvement`);
    head.dispose();
    optimizer.dispose();
  });

  test("training controls - restore best weights leaves the best epoch's model and marks it in the history", async () => {
    const val = blobs(60, 3, 2, 0);
    const { head, optimizer, history } = await train(blobs(64, 3, 1, 0), { lr: 0.03, epochs: 10, validation: val, controls: { restoreBestWeights: true } });
    const losses = history.map((h) => h.val_loss!);
    const best = Math.min(...losses);
    assert.ok(losses.at(-1)! > best + 1e-3, "the last epoch is worse than the best (else the test shows nothing)");
    const marked = history.filter((h) => h.best);
    assert.equal(marked.length, 1);
    assert.equal(marked[0].val_loss, best);
    assert.ok(Math.abs(evaluate(head, val, 3).loss - best) < 1e-5, `model's val loss ${evaluate(head, val, 3).loss} is the best epoch's ${best}`);
    head.dispose();
    optimizer.dispose();
  });

  test("training controls - monitor val_accuracy picks the epoch with the best accuracy; no tensor is leaked", async () => {
    const val = blobs(60, 3, 2, 0.6);
    const data = blobs(90, 3, 1, 0.6);
    const tensorsBefore = tf.memory().numTensors;
    const { head, optimizer, history } = await train(data, { lr: 0.03, epochs: 8, validation: val, controls: { restoreBestWeights: true, monitor: "val_accuracy", earlyStoppingPatience: 4 } });
    const accs = history.map((h) => h.val_accuracy!);
    const best = history.find((h) => h.best)!;
    assert.equal(best.val_accuracy, Math.max(...accs));
    assert.equal(best.epoch, accs.indexOf(Math.max(...accs)) + 1, "the first epoch with the best accuracy");
    assert.equal(evaluate(head, val, 3).accuracy, best.val_accuracy);
    const weights = head.getWeights().length;
    head.dispose();
    optimizer.dispose();
    assert.ok(tf.memory().numTensors <= tensorsBefore + 2, `tensors ${tensorsBefore} -> ${tf.memory().numTensors} (${weights} weights)`);
  });
});

describe("training controls - learning-rate schedules", () => {
  test("training controls - cosine: the recorded rate follows half a cosine from the initial rate; the optimizer gets its rate back", async () => {
    const { head, optimizer, history } = await train(blobs(48, 3, 1), { lr: 0.01, epochs: 4 });
    assert.deepEqual(history.map((h) => h.lr), [0.01, 0.01, 0.01, 0.01], "constant by default, recorded");
    head.dispose();
    const r = await train(blobs(48, 3, 1), { lr: 0.01, epochs: 4, controls: { lrSchedule: "cosine" } });
    const expected = [0, 1, 2, 3].map((e) => 0.01 * 0.5 * (1 + Math.cos((Math.PI * e) / 4)));
    r.history.forEach((h, i) => assert.ok(Math.abs(h.lr! - expected[i]) < 1e-12, `epoch ${i + 1}: ${h.lr} vs ${expected[i]}`));
    assert.equal((r.optimizer as unknown as { learningRate: number }).learningRate, 0.01);
    r.head.dispose();
    optimizer.dispose();
    r.optimizer.dispose();
  });

  test("training controls - plateau: the rate drops x0.2 after lr-patience epochs without a better val_loss", async () => {
    const { head, optimizer, history } = await train(blobs(64, 3, 1, 0), { lr: 0.03, epochs: 10, validation: blobs(60, 3, 2, 0), controls: { lrSchedule: "plateau", lrPatience: 2 } });
    let best = Infinity;
    let wait = 0;
    let lr = 0.03;
    let drops = 0;
    for (const h of history) {
      assert.ok(Math.abs(h.lr! - lr) < 1e-12, `epoch ${h.epoch}: rate ${h.lr}, expected ${lr}`);
      if (h.val_loss! < best) { best = h.val_loss!; wait = 0; } else if (++wait >= 2) { lr *= 0.2; wait = 0; drops++; }
    }
    assert.ok(drops >= 1, "the rate dropped at least once");
    head.dispose();
    optimizer.dispose();
  });
});

describe("training controls - class weights and label smoothing", () => {
  test("training controls - the training loss is Keras' weighted, smoothed cross-entropy", () => {
    const probs = tf.tensor2d([[0.7, 0.2, 0.1], [0.1, 0.6, 0.3]]);
    const labels = tf.tensor1d([0, 2], "int32");
    const ce = (p: number[], t: number[]) => -t.reduce((a, ti, k) => a + ti * Math.log(p[k]), 0);
    const plain = (ce([0.7, 0.2, 0.1], [1, 0, 0]) + ce([0.1, 0.6, 0.3], [0, 0, 1])) / 2;
    assert.ok(Math.abs(sparseCrossEntropy(probs, labels, 3).dataSync()[0] - plain) < 1e-6);
    const weighted = (2 * ce([0.7, 0.2, 0.1], [1, 0, 0]) + 0.5 * ce([0.1, 0.6, 0.3], [0, 0, 1])) / 2;
    assert.ok(Math.abs(sparseCrossEntropy(probs, labels, 3, { classWeights: new Float32Array([2, 1, 0.5]) }).dataSync()[0] - weighted) < 1e-6);
    const s = 0.3;
    const smooth = (t: number[]) => t.map((v) => v * (1 - s) + s / 3);
    const smoothed = (ce([0.7, 0.2, 0.1], smooth([1, 0, 0])) + ce([0.1, 0.6, 0.3], smooth([0, 0, 1]))) / 2;
    assert.ok(Math.abs(sparseCrossEntropy(probs, labels, 3, { labelSmoothing: s }).dataSync()[0] - smoothed) < 1e-6);
  });

  test("training controls - class weights auto raise the recall of a rare class", async () => {
    // 90 % class 0, 5 % each of 1 and 2, overlapping: unweighted training mostly answers 0.
    const label = (i: number) => (i % 20 === 0 ? 1 : i % 20 === 1 ? 2 : 0);
    const data = blobs(400, 3, 1, 0.8, label);
    const test = blobs(400, 3, 7, 0.8, label);
    const recall = (head: tf.LayersModel) => {
      const p = evaluate(head, test, 3).predictions;
      let hit = 0, n = 0;
      test.y.forEach((y, i) => { if (y !== 0) { n++; if (p[i] === y) hit++; } });
      return hit / n;
    };
    const counts = [0, 0, 0];
    data.y.forEach((y) => counts[y]++);
    const weights = classWeightsFor("auto", ["a", "b", "c"], counts)!;
    assert.ok(Math.abs(weights[1] - 400 / (3 * counts[1])) < 1e-4, "balanced: n / (classes * n_class)");
    const plain = await train(data, { epochs: 6, units: 16 });
    const balanced = await train(data, { epochs: 6, units: 16, controls: { loss: { classWeights: weights } } });
    const [r0, r1] = [recall(plain.head), recall(balanced.head)];
    assert.ok(r1 > r0 + 0.1, `rare-class recall ${r0} unweighted, ${r1} balanced`);
    for (const r of [plain, balanced]) { r.head.dispose(); r.optimizer.dispose(); }
  });

  test("training controls - label smoothing keeps the head from full confidence", async () => {
    const data = blobs(120, 3, 1, 3);
    const top = (head: tf.LayersModel) => tf.tidy(() => (head.predict(tf.tensor(data.x, [120, 8])) as tf.Tensor).max(-1).mean().dataSync()[0]);
    const plain = await train(data, { epochs: 15, lr: 0.02 });
    const smoothed = await train(data, { epochs: 15, lr: 0.02, controls: { loss: { labelSmoothing: 0.3 } } });
    // The optimum of the smoothed loss puts 1 - 0.3 + 0.1 = 0.8 on the true class.
    assert.ok(top(plain.head) > 0.95, `plain confidence ${top(plain.head)}`);
    assert.ok(top(smoothed.head) < 0.86, `smoothed confidence ${top(smoothed.head)}`);
    for (const r of [plain, smoothed]) { r.head.dispose(); r.optimizer.dispose(); }
  });
});

describe("training controls - options are checked before any work", () => {
  const opts = (...argv: string[]): JobOptions => resolveOptions(parseArgs(argv).options);

  test("training controls - early stopping or plateau without a validation split are refused naming the option", () => {
    assert.throws(() => opts("--val-split", "0", "--early-stopping-patience", "3"), (e: Error) => e.name === "ConfigError" && /--early-stopping-patience 3 watches the validation set, but --val-split is 0/.test(e.message));
    assert.throws(() => opts("--val-split", "0", "--lr-schedule", "plateau"), (e: Error) => e.name === "ConfigError" && /--lr-schedule "plateau"/.test(e.message));
    assert.throws(() => opts("--val-split", "0", "--restore-best-weights", "true"), (e: Error) => e.name === "ConfigError" && /--restore-best-weights/.test(e.message));
    assert.equal(opts("--val-split", "0").restoreBestWeights, false, "the default is dropped without validation");
    assert.equal(opts().restoreBestWeights, true);
    assert.throws(() => opts("--lr-patience", "4"), (e: Error) => e.name === "ConfigError" && /--lr-patience applies only to --lr-schedule plateau/.test(e.message));
    assert.throws(() => opts("--lr-schedule", "step"), (e: Error) => e.name === "ConfigError" && /--lr-schedule .* one of constant, cosine, plateau/.test(e.message));
    assert.throws(() => opts("--restore-best-weights", "maybe"), (e: Error) => e.name === "ConfigError" && /--restore-best-weights .* true or false/.test(e.message));
  });

  test("training controls - a class weight for a class not in the data, or a malformed one, is refused naming --class-weight", () => {
    const classes = ["cat", "dog"];
    assert.throws(() => classWeightsFor("cat=2,bird=3", classes, [5, 5]), (e: Error) => e.name === "ConfigError" && /--class-weight names class "bird", which is not in the data set \(classes: cat, dog\)/.test(e.message));
    assert.throws(() => classWeightsFor("cat=-1", classes, [5, 5]), (e: Error) => e.name === "ConfigError" && /--class-weight/.test(e.message));
    assert.throws(() => classWeightsFor("cat", classes, [5, 5]), (e: Error) => e.name === "ConfigError" && /--class-weight/.test(e.message));
    assert.deepEqual(Array.from(classWeightsFor("dog=2.5", classes, [5, 5])!), [1, 2.5]);
    assert.equal(classWeightsFor("none", classes, [5, 5]), undefined);
  });

  test("training controls - the options give the loop's controls", () => {
    const o = opts("--early-stopping-patience", "2", "--label-smoothing", "0.1");
    assert.deepEqual(controlsOf(o, undefined), { earlyStoppingPatience: 2, restoreBestWeights: true, monitor: "val_loss", lrSchedule: "constant", lrPatience: 2, loss: { labelSmoothing: 0.1 } });
  });

  test("training controls - through the CLI: refused before any work, naming the option (no output folder)", async () => {
    const out = `/tmp/ctrain-controls-refused-${process.pid}`;
    const cw = await runCli(["run", "--workers", "1", "--class-weight", "Trouser=2,Socks=3", "--limit", "50", "--out", out], { timeoutMs: 60_000 });
    assert.equal(cw.code, 2);
    assert.match(cw.stderr, /ConfigError: --class-weight names class "Socks", which is not in the data set \(classes: T-shirt\/top, Trouser/);
    const es = await runCli(["run", "--val-split", "0", "--early-stopping-patience", "2", "--out", out], { timeoutMs: 60_000 });
    assert.equal(es.code, 2);
    assert.match(es.stderr, /--early-stopping-patience 2 watches the validation set, but --val-split is 0/);
    assert.ok(!existsSync(out), "nothing was written");
  });
});

/**
 * The single-machine recipe end to end, through the CLI a user runs: real MobileNetV2 weights (from
 * nsfwjs), real Fashion-MNIST images, the run folder, the feature cache, a folder data set with bad
 * files, `ctrain predict`, and configs refused before any work.
 */
import assert from "node:assert/strict";
import { existsSync } from "node:fs";
import { mkdir, mkdtemp, readFile, readdir, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, describe, test } from "node:test";
import * as tf from "@tensorflow/tfjs";
import sharp from "sharp";
import { selectBackend } from "../core/models/backend.js";
import { openDataset } from "../core/datasets/open.js";
import { preprocess } from "../core/models/feature_model.js";
import { loadModel } from "../core/models/model_io.js";
import type { Preprocessing } from "../core/models/model_zoo.js";
import { runCli } from "./helpers/cli.js";

// A few hundred real images at a small input size: the floor below is what this setting reaches
// (68-70% on the 93 test images, measured with unit and tf preprocessing, best or last epoch's
// weights; one image is 1.1 points), far above the 10% of chance.
const SMALL_JOB = ["--data", "fashion-mnist", "--limit", "500", "--input-size", "96", "--feature-layer", "block_12_add", "--epochs", "30", "--dropout", "0.2", "--workers", "1", "--metrics-port", "-1", "--log-format", "json"];

let dir: string;
before(async () => {
  dir = await mkdtemp(join(tmpdir(), "ctrain-pipeline-"));
});
after(async () => {
  await rm(dir, { recursive: true, force: true });
});

interface Summary {
  job: string;
  backend: string;
  workers: number;
  model: string;
  input_size: number;
  classes: string[];
  samples: { train: number; val: number; test: number };
  extraction: { images: number; seconds: number; images_per_second: number; cache_hit: boolean };
  phases: { head: { epochs: number; val_accuracy: number; test_accuracy: number; seconds: number } };
  skipped_inputs: { id: string; reason: string; message: string }[];
}

describe("pipeline - Fashion-MNIST through ctrain run", () => {
  let out: string;
  let cache: string;
  let summary: Summary;

  before(async () => {
    out = join(dir, "run1");
    cache = join(dir, "cache");
    const r = await runCli(["run", ...SMALL_JOB, "--cache-dir", cache, "--out", out, "--job", "pipeline-1"]);
    assert.equal(r.code, 0, `ctrain run failed:\n${r.stderr.slice(-3000)}`);
    summary = JSON.parse(await readFile(join(out, "summary.json"), "utf8")) as Summary;
  });

  test("pipeline - leaves every file of the run folder", async () => {
    for (const f of ["model/model.json", "model/weights.bin", "history.json", "summary.json", "report.html"]) assert.ok(existsSync(join(out, f)), `${f} missing`);
    const history = JSON.parse(await readFile(join(out, "history.json"), "utf8")) as { head: { epoch: number; loss: number; accuracy: number; val_loss: number; val_accuracy: number }[] };
    assert.equal(history.head.length, 30);
    for (const h of history.head) for (const k of ["loss", "accuracy", "val_loss", "val_accuracy"] as const) assert.ok(Number.isFinite(h[k]), `history ${k} at epoch ${h.epoch}`);
    const report = await readFile(join(out, "report.html"), "utf8");
    assert.match(report, /<svg/);
    assert.match(report, /Confusion matrix/);
    assert.match(report, /Ankle boot/);
  });

  test("pipeline - summary has the fields of DESIGN.md", () => {
    assert.equal(summary.job, "pipeline-1");
    assert.equal(summary.backend, "wasm");
    assert.equal(summary.model, "mobilenet_v2");
    assert.equal(summary.input_size, 96);
    assert.equal(summary.classes.length, 10);
    // val and test in their splits' proportion to train (6,000 and 10,000 to 54,000).
    assert.deepEqual(summary.samples, { train: 500, val: 56, test: 93 });
    assert.equal(summary.extraction.images, 649);
    assert.equal(summary.extraction.cache_hit, false);
    assert.ok(summary.extraction.images_per_second > 0);
    assert.deepEqual(summary.skipped_inputs, []);
  });

  test("pipeline - the head learns: test accuracy far above chance", () => {
    const acc = summary.phases.head.test_accuracy;
    assert.ok(acc >= 0.64, `head test accuracy ${acc} < 0.64 (chance is 0.1)`);
    assert.ok(summary.phases.head.val_accuracy >= 0.65, `val accuracy ${summary.phases.head.val_accuracy}`);
  });

  test("pipeline - model/ loads with tf.loadLayersModel and classifies real images", async () => {
    await selectBackend("wasm");
    const model = await loadModel(join(out, "model"));
    const meta = (model.getUserDefinedMetadata() as { ctrain: { classes: string[]; inputSize: number; preprocessing: Preprocessing } }).ctrain;
    assert.equal(meta.preprocessing, "unit", "the built-in model's own preprocessing is stored for predict");
    assert.equal(meta.classes.length, 10);
    assert.deepEqual(model.inputs[0].shape, [null, 96, 96, 3]);
    assert.deepEqual(model.outputs[0].shape, [null, 10]);
    // The test split's first images, through the saved model, agree with their labels mostly.
    const ds = await openDataset("fashion-mnist", { seed: 42, valSplit: 0.1, testSplit: 0.1, limit: 500, maxPixels: 1e7 });
    const test = ds.samples.filter((s) => s.split === "test").slice(0, 40);
    const rgb = new Uint8Array(test.length * 96 * 96 * 3);
    for (let i = 0; i < test.length; i++) rgb.set(await ds.readRgb(test[i], 96), i * 96 * 96 * 3);
    const pred = tf.tidy(() => (model.predict(preprocess(tf.tensor4d(rgb, [test.length, 96, 96, 3], "int32"), meta.preprocessing)) as tf.Tensor).argMax(-1).dataSync());
    const correct = test.filter((s, i) => pred[i] === s.label).length;
    assert.ok(correct / test.length >= 0.6, `saved model: ${correct}/${test.length} correct`);
    model.dispose();
  });

  test("pipeline - ctrain predict prints class and probability per image", async () => {
    const ds = await openDataset("fashion-mnist", { seed: 42, valSplit: 0.1, testSplit: 0.1, limit: 500, maxPixels: 1e7 });
    const trouser = ds.samples.find((s) => s.split === "test" && ds.classes[s.label] === "Trouser")!;
    const img = join(dir, "trouser.png");
    await sharp(Buffer.from(await ds.readRgb(trouser, 28)), { raw: { width: 28, height: 28, channels: 3 } }).png().toFile(img);
    const bad = join(dir, "bad.jpg");
    await writeFile(bad, "not an image at all");
    const r = await runCli(["predict", "--model", join(out, "model"), "--top", "2", img, bad]);
    assert.equal(r.code, 1, "a skipped image makes the exit code 1");
    const line = r.stdout.trim().split("\n").find((l) => l.startsWith(img));
    assert.ok(line, r.stdout);
    const cols = line.split("\t");
    assert.equal(cols.length, 5);
    assert.ok(Number(cols[2]) > 0 && Number(cols[2]) <= 1);
    assert.equal(cols[1], "Trouser", `predicted ${cols[1]} for a trouser`);
    assert.match(r.stderr, /bad\.jpg: skipped \(not_an_image\)/);
  });

  test("pipeline - a second run with the same inputs hits the feature cache", async () => {
    const out2 = join(dir, "run2");
    const r = await runCli(["run", ...SMALL_JOB, "--cache-dir", cache, "--out", out2, "--job", "pipeline-2", "--epochs", "2"]);
    assert.equal(r.code, 0, r.stderr.slice(-3000));
    const s2 = JSON.parse(await readFile(join(out2, "summary.json"), "utf8")) as Summary;
    assert.equal(s2.extraction.cache_hit, true);
    assert.equal(s2.extraction.images, 0);
    assert.deepEqual(s2.samples, summary.samples);
  });

  test("pipeline - a changed input invalidates the cache", async () => {
    const out3 = join(dir, "run3");
    // Another limit changes the set of input samples, so their features are extracted again.
    const r = await runCli(["run", ...SMALL_JOB, "--limit", "60", "--cache-dir", cache, "--out", out3, "--job", "pipeline-3", "--epochs", "1"]);
    assert.equal(r.code, 0, r.stderr.slice(-3000));
    const s3 = JSON.parse(await readFile(join(out3, "summary.json"), "utf8")) as Summary;
    assert.equal(s3.extraction.cache_hit, false);
    // val and test in proportion to train: ceil(60 * 6,000 / 54,000) and ceil(60 * 10,000 / 54,000).
    assert.equal(s3.extraction.images, 60 + 7 + 12);
    const entries = (await readdir(cache)).filter((n) => /^[0-9a-f]{32}$/.test(n));
    assert.equal(entries.length, 2);
  });

  test("pipeline - a damaged cache entry is rebuilt, not trusted", async () => {
    const s3 = JSON.parse(await readFile(join(dir, "run3", "summary.json"), "utf8")) as Summary & { extraction: { cache_key: string } };
    const file = join(cache, s3.extraction.cache_key, "features.f32");
    const bytes = await readFile(file);
    await writeFile(file, bytes.subarray(0, bytes.length - 100));
    const r = await runCli(["run", ...SMALL_JOB, "--limit", "60", "--cache-dir", cache, "--out", join(dir, "run4"), "--job", "pipeline-4", "--epochs", "1"]);
    assert.equal(r.code, 0, r.stderr.slice(-3000));
    assert.match(r.stderr, /feature cache entry is damaged: extracting again/);
    const s4 = JSON.parse(await readFile(join(dir, "run4", "summary.json"), "utf8")) as Summary;
    assert.equal(s4.extraction.cache_hit, false);
    assert.equal(s4.extraction.images, 79);
    assert.equal((await readFile(file)).length, bytes.length, "the entry is whole again");
  });
});

describe("pipeline - folder data set with bad files", () => {
  test("pipeline - corrupt, truncated, empty and non-image files are skipped and listed, the job finishes", async () => {
    const root = join(dir, "folder-ds");
    const ds = await openDataset("fashion-mnist", { seed: 1, valSplit: 0.1, testSplit: 0.1, limit: 300, maxPixels: 1e7 });
    const wanted = ["Trouser", "Sneaker", "Bag"];
    for (const cls of wanted) await mkdir(join(root, cls), { recursive: true });
    let jpeg: Buffer | undefined;
    for (const s of ds.samples) {
      const cls = ds.classes[s.label];
      if (!wanted.includes(cls)) continue;
      const rgb = Buffer.from(await ds.readRgb(s, 28));
      const img = sharp(rgb, { raw: { width: 28, height: 28, channels: 3 } });
      const name = s.id.replace(/\//g, "_");
      if (s.label % 2 === 0) await img.png().toFile(join(root, cls, `${name}.png`));
      else {
        jpeg = await img.jpeg().toBuffer();
        await writeFile(join(root, cls, `${name}.jpg`), jpeg);
      }
    }
    await writeFile(join(root, "Bag", "corrupt.jpg"), Buffer.from(Array.from({ length: 2048 }, (_, i) => (i * 7919) % 251)));
    await writeFile(join(root, "Bag", "truncated.jpg"), jpeg!.subarray(0, Math.floor(jpeg!.length / 2)));
    await writeFile(join(root, "Sneaker", "empty.png"), Buffer.alloc(0));
    await writeFile(join(root, "Sneaker", "notes.png"), "this is a text file, not a PNG\n");
    await writeFile(join(root, "Trouser", "readme.txt"), "not an image\n");
    const out = join(dir, "folder-run");
    const r = await runCli(["run", "--data", root, "--input-size", "64", "--feature-layer", "block_12_add", "--epochs", "3", "--workers", "1",
      "--metrics-port", "-1", "--cache-dir", join(dir, "cache-folder"), "--out", out, "--job", "folder-1", "--val-split", "0.2", "--test-split", "0.2"]);
    assert.equal(r.code, 0, r.stderr.slice(-3000));
    const summary = JSON.parse(await readFile(join(out, "summary.json"), "utf8")) as Summary;
    assert.deepEqual(summary.classes, ["Bag", "Sneaker", "Trouser"]);
    const reasons = Object.fromEntries(summary.skipped_inputs.map((s) => [s.id, s.reason]));
    assert.equal(reasons["Sneaker/empty.png"], "empty");
    assert.equal(reasons["Sneaker/notes.png"], "not_an_image");
    assert.equal(reasons["Trouser/readme.txt"], "not_an_image");
    assert.ok(["corrupt", "not_an_image"].includes(reasons["Bag/corrupt.jpg"]), `corrupt.jpg: ${reasons["Bag/corrupt.jpg"]}`);
    assert.equal(reasons["Bag/truncated.jpg"], "truncated");
    for (const s of summary.skipped_inputs) assert.ok(s.message.length > 0);
    assert.ok(summary.samples.train > 0 && summary.samples.test > 0);
    assert.ok(summary.phases.head.test_accuracy > 0.5, `3 easy classes: test accuracy ${summary.phases.head.test_accuracy}`);
  });
});

describe("pipeline - method 2 (frozen base + head on augmented images) and fine-tuning through ctrain run", () => {
  test("pipeline - --method augment uses the --augment-* options, fine-tunes with augmentation, leaves both models", async () => {
    const out = join(dir, "augment-run");
    const r = await runCli(["run", "--data", "fashion-mnist", "--limit", "150", "--input-size", "64", "--feature-layer", "block_12_add", "--epochs", "4", "--dropout", "0.2",
      "--method", "augment", "--augment-flip", "none", "--augment-rotation", "0.1", "--augment-zoom", "0.05", "--augment-fill-mode", "nearest",
      "--fine-tune-layers", "9", "--fine-tune-epochs", "1", "--batch-size", "16", "--workers", "1", "--metrics-port", "-1", "--log-format", "json",
      "--cache-dir", join(dir, "cache-augment"), "--out", out, "--job", "augment-1"]);
    assert.equal(r.code, 0, r.stderr.slice(-3000));
    const summary = JSON.parse(await readFile(join(out, "summary.json"), "utf8")) as Summary & {
      method: string; augmentation: Record<string, unknown>; fine_tune: { augmentation: boolean; activation_cache?: unknown };
      phases: { fine_tune: { epochs: number; test_accuracy: number } };
    };
    assert.equal(summary.method, "augment");
    assert.deepEqual(summary.augmentation, { flip: false, rotation: 0.1, zoom: 0.05, translation: 0.1, fillMode: "nearest", fillValue: 0 });
    const logged = (r.stdout + "\n" + r.stderr).split("\n").filter((l) => l.startsWith("{")).map((l) => JSON.parse(l) as Record<string, unknown>).find((l) => l.msg === "augmentation");
    assert.ok(logged && logged.rotation === 0.1 && logged.flip === false, `augmentation log line: ${JSON.stringify(logged)}`);
    assert.equal(summary.fine_tune.augmentation, true);
    assert.equal(summary.fine_tune.activation_cache, undefined, "with augmentation the frozen part runs every step: no activation cache");
    const history = JSON.parse(await readFile(join(out, "history.json"), "utf8")) as { head: unknown[]; fine_tune: unknown[] };
    assert.equal(history.head.length, 4);
    assert.equal(history.fine_tune.length, 1);
    for (const f of ["model/model.json", "model-head/model.json", "report.html"]) assert.ok(existsSync(join(out, f)), `${f} missing`);
    // 150 images, 4 epochs: learning, not a benchmark. Chance is 10%.
    assert.ok(summary.phases.head.test_accuracy > 0.3, `head test accuracy ${summary.phases.head.test_accuracy}`);
  });
});

describe("pipeline - bad configuration is refused before any work", () => {
  const cases: [string, string[], RegExp][] = [
    ["unknown flag", ["--epoch", "3"], /Unknown option --epoch\. Did you mean --epochs\?/],
    ["wrong type", ["--epochs", "three"], /--epochs \(flag\) must be a number/],
    ["impossible value", ["--input-size", "8"], /--input-size \(flag\) must be between 32 and 1024/],
    ["bad choice", ["--pooling", "mean"], /--pooling \(flag\) must be one of avg, max, none/],
    ["missing data", ["--data", "/nonexistent/images"], /nonexistent/],
    ["unknown feature layer", ["--feature-layer", "no_such_layer", "--limit", "10"], /--feature-layer "no_such_layer" is not a layer of this model/],
    ["augmentation without --method augment", ["--augment-zoom", "0.2"], /--augment-zoom applies only to --method augment/],
    ["augmentation out of range", ["--method", "augment", "--augment-rotation", "0.9"], /--augment-rotation \(flag\) must be between 0 and 0.5/],
    ["bad fill mode", ["--method", "augment", "--augment-fill-mode", "mirror"], /--augment-fill-mode \(flag\) must be one of reflect, nearest, constant, wrap/],
  ];
  for (const [name, args, pattern] of cases) {
    test(`pipeline - ${name} exits 2 with a message and leaves no run folder`, async () => {
      const out = join(dir, `bad-${name.replace(/\W/g, "-")}`);
      const r = await runCli(["run", ...args, "--out", out, "--metrics-port", "-1", "--cache-dir", join(dir, "cache-bad")]);
      assert.equal(r.code, 2, r.stderr);
      assert.match(r.stderr, pattern);
      assert.doesNotMatch(r.stderr, /\n\s+at /, "no stack trace for a user error");
      assert.ok(!existsSync(out), "no output written");
    });
  }

  test("pipeline - a config file with an unknown key is refused", async () => {
    const file = join(dir, "job.yaml");
    await writeFile(file, "data: fashion-mnist\nepochs: 3\ninput_size: 96\nlearnig-rate: 0.1\n");
    const r = await runCli(["run", "--config", file, "--metrics-port", "-1"]);
    assert.equal(r.code, 2);
    assert.match(r.stderr, /Unknown key "learnig-rate" in .*job\.yaml\. Did you mean "learning-rate"\?/);
  });
});

/**
 * `ctrain baseline` through the real binary, on real Fashion-MNIST images: raw-pixel logistic
 * regression and MLP on the splits `ctrain run` uses (same data set fingerprint, same counts), a
 * summary a bench can read, RGB folders kept in colour, and bad input refused before any work.
 */
import assert from "node:assert/strict";
import { existsSync } from "node:fs";
import { mkdtemp, readFile, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, describe, test } from "node:test";
import { openDataset } from "../core/datasets/open.js";
import { runCli } from "./helpers/cli.js";
import { TINTED_CLASSES, writeTintedFolder } from "./helpers/tinted_folder.js";

interface Phase { epochs: number; epochs_asked: number; val_accuracy: number; test_accuracy: number; test_loss: number; params: number; seconds: number }
interface Summary {
  kind: string;
  data_fingerprint: string;
  samples: { train: number; val: number; test: number };
  pixel_size: number;
  channels: number;
  classes: string[];
  baselines: Record<string, Phase>;
  options: Record<string, unknown>;
}

let dir: string;
before(async () => {
  dir = await mkdtemp(join(tmpdir(), "ctrain-baseline-"));
});
after(async () => {
  await rm(dir, { recursive: true, force: true });
});

const read = async <T>(file: string): Promise<T> => JSON.parse(await readFile(file, "utf8")) as T;

describe("baseline - raw-pixel models on ctrain run's splits", () => {
  test("baseline - logistic regression and the MLP learn Fashion-MNIST pixels on the splits run uses", async () => {
    const out = join(dir, "fashion");
    const r = await runCli(["baseline", "--data", "fashion-mnist", "--limit", "600", "--val-split", "0.2", "--seed", "3", "--epochs", "4", "--head-units", "64",
      "--out", out, "--log-format", "json"], { timeoutMs: 180_000 });
    assert.equal(r.code, 0, r.stderr.slice(-2000));
    const s = await read<Summary>(join(out, "summary.json"));
    // The same data set, opened as ctrain run opens it for these options: same fingerprint (the feature-cache key's half), same counts.
    const ds = await openDataset("fashion-mnist", { seed: 3, valSplit: 0.2, testSplit: 0.1, limit: 600, maxPixels: 40_000_000 });
    const counts = { train: 0, val: 0, test: 0 };
    for (const x of ds.samples) counts[x.split]++;
    assert.equal(s.data_fingerprint, ds.fingerprint);
    assert.deepEqual(s.samples, counts);
    assert.equal(s.samples.val, Math.ceil((600 * 2) / 8), "--val-split 0.2 holds with --limit");
    assert.equal(s.kind, "baseline");
    assert.equal(s.pixel_size, 28);
    assert.equal(s.channels, 1, "Fashion-MNIST is gray: one channel, 784 pixels");
    assert.deepEqual(Object.keys(s.baselines).sort(), ["logistic", "mlp"]);
    assert.equal(s.baselines.logistic.params, 784 * 10 + 10);
    assert.equal(s.baselines.mlp.params, 784 * 64 + 64 + 64 * 10 + 10, "the MLP is ctrain's head with --head-units");
    for (const [kind, p] of Object.entries(s.baselines)) {
      assert.equal(p.epochs_asked, 4);
      // Chance is 10%; 600 images of 28x28 pixels give a linear model about 70%.
      assert.ok(p.test_accuracy > 0.55, `${kind} test accuracy ${p.test_accuracy}`);
      assert.ok(p.val_accuracy > 0.55, `${kind} val accuracy ${p.val_accuracy}`);
    }
    assert.equal(s.options.limit, 600);
    assert.equal(s.options["val-split"], 0.2);
    const history = await read<Record<string, { epoch: number; loss: number }[]>>(join(out, "history.json"));
    assert.equal(history.mlp.length, s.baselines.mlp.epochs);
    assert.ok(history.logistic.at(-1)!.loss < history.logistic[0].loss, "the training loss falls");
    assert.match(r.stdout, /logistic\s+test accuracy \d+\.\d+%/);
  });

  test("baseline - a folder of tinted RGB images keeps three channels", async () => {
    const root = join(dir, "tinted");
    const n = await writeTintedFolder(root, 60);
    assert.equal(n, 60 * TINTED_CLASSES.length);
    const out = join(dir, "tinted-out");
    const r = await runCli(["baseline", "--data", root, "--models", "logistic", "--epochs", "15", "--out", out, "--log-format", "json"], { timeoutMs: 120_000 });
    assert.equal(r.code, 0, r.stderr.slice(-2000));
    const s = await read<Summary>(join(out, "summary.json"));
    assert.equal(s.channels, 3);
    assert.deepEqual([...s.classes].sort(), [...TINTED_CLASSES].sort());
    assert.deepEqual(Object.keys(s.baselines), ["logistic"]);
    assert.equal(s.baselines.logistic.params, 28 * 28 * 3 * 4 + 4);
    assert.equal(s.samples.train + s.samples.val + s.samples.test, n);
    // Four classes: chance is 25%.
    assert.ok(s.baselines.logistic.test_accuracy > 0.35, `test accuracy ${s.baselines.logistic.test_accuracy}`);
  });

  const refused: { name: string; args: string[]; pattern: RegExp }[] = [
    { name: "an unknown baseline", args: ["--models", "logistic,svm"], pattern: /--models must list baselines among logistic, mlp .*"svm"/ },
    { name: "a pixel size out of range", args: ["--pixel-size", "3"], pattern: /--pixel-size must be a whole number of pixels between 8 and 256, got "3"/ },
    { name: "a run option it does not read", args: ["--pooling", "avg"], pattern: /baseline does not read --pooling/ },
    { name: "early stopping without validation", args: ["--early-stopping-patience", "2", "--val-split", "0"], pattern: /--early-stopping-patience 2 watches the validation set, but --val-split is 0/ },
  ];
  for (const c of refused) {
    test(`baseline - ${c.name} is refused before any work, naming the option`, async () => {
      const out = join(dir, `refused-${c.name.replace(/\W+/g, "-")}`);
      const r = await runCli(["baseline", "--limit", "100", "--out", out, ...c.args]);
      assert.equal(r.code, 2, r.stderr);
      assert.match(r.stderr, c.pattern);
      assert.ok(!r.stderr.includes("    at "), "no stack trace");
      assert.ok(!existsSync(out), "no output folder");
    });
  }
});

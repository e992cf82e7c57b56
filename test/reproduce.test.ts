/**
 * A run can be reproduced from its folder: summary.json records every option that shaped the result
 * (with `auto` choices resolved) and the versions, and `ctrain run --config <out>/job.yaml` trains
 * the same model again (same splits, same epochs, same test accuracy and losses).
 */
import assert from "node:assert/strict";
import { mkdtemp, readFile, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, describe, test } from "node:test";
import { parse as parseYaml } from "yaml";
import { runCli } from "./helpers/cli.js";

interface Summary {
  samples: { train: number; val: number; test: number };
  extraction: { cache_hit: boolean };
  phases: { head: { epochs: number; epochs_asked: number; test_accuracy: number; test_loss: number } };
  options: Record<string, string | number | boolean>;
  versions: { ctrain: string; node: string; tfjs: string };
}

let dir: string;
before(async () => {
  dir = await mkdtemp(join(tmpdir(), "ctrain-reproduce-"));
});
after(async () => {
  await rm(dir, { recursive: true, force: true });
});

const read = async <T>(file: string): Promise<T> => JSON.parse(await readFile(file, "utf8")) as T;

describe("reproduce - a run folder reruns the job", () => {
  test("reproduce - job.yaml and summary.options name every result-shaping option; --config job.yaml gives the same model", async () => {
    const first = join(dir, "first");
    const cache = join(dir, "cache");
    const common = ["--metrics-port", "-1", "--log-format", "json", "--cache-dir", cache];
    const a = await runCli(["run", "--data", "fashion-mnist", "--limit", "120", "--val-split", "0.3", "--input-size", "48", "--feature-layer", "block_6_expand_relu",
      "--epochs", "3", "--workers", "1", "--lr-schedule", "cosine", "--label-smoothing", "0.1", "--seed", "7", "--out", first, ...common], { timeoutMs: 120_000 });
    assert.equal(a.code, 0, a.stderr.slice(-2000));
    const s1 = await read<Summary>(join(first, "summary.json"));
    const job = parseYaml(await readFile(join(first, "job.yaml"), "utf8")) as Record<string, unknown>;
    assert.deepEqual(job, s1.options, "job.yaml holds what summary.options records");
    for (const [k, v] of Object.entries({ model: "mobilenet_v2", preprocessing: "unit", "feature-layer": "block_6_expand_relu", pooling: "avg", "input-size": 48, "learning-rate": 0.001,
      "batch-size": 32, epochs: 3, seed: 7, limit: 120, "val-split": 0.3, "test-split": 0.1, "head-units": 256, dropout: 0.5, "lr-schedule": "cosine", "label-smoothing": 0.1, "restore-best-weights": true }))
      assert.equal(job[k], v, `job.yaml ${k}`);
    for (const k of ["out", "job", "nats", "cache-dir", "metrics-port", "log-format"]) assert.ok(!(k in job), `${k} says where the job ran, not what it computed`);
    assert.match(s1.versions.tfjs, /^\d+\.\d+\.\d+/);
    assert.match(s1.versions.ctrain, /^\d+\.\d+\.\d+/);
    assert.equal(s1.phases.head.epochs_asked, 3);
    // --val-split is honoured with --limit: 0.3 of Fashion-MNIST's training file against 0.7 in train (its test set is its own file).
    assert.equal(s1.samples.val, Math.ceil((120 * 3) / 7));

    const second = join(dir, "second");
    const b = await runCli(["run", "--config", join(first, "job.yaml"), "--out", second, ...common], { timeoutMs: 120_000 });
    assert.equal(b.code, 0, b.stderr.slice(-2000));
    const s2 = await read<Summary>(join(second, "summary.json"));
    assert.deepEqual(s2.options, s1.options);
    assert.deepEqual(s2.samples, s1.samples);
    assert.equal(s2.extraction.cache_hit, true, "the same features: the same cache key");
    assert.equal(s2.phases.head.test_accuracy, s1.phases.head.test_accuracy);
    const h1 = await read<{ head: { loss: number; lr: number }[] }>(join(first, "history.json"));
    const h2 = await read<{ head: { loss: number; lr: number }[] }>(join(second, "history.json"));
    assert.deepEqual(h2.head.map((e) => [e.loss, e.lr]), h1.head.map((e) => [e.loss, e.lr]));
  });
});

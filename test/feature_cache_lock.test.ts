/**
 * Two runs that share a cache folder: one fills an entry at a time. Before the lock, two `ctrain run`
 * extracting the same key at once crashed one of them ("samples have no features"), as the first
 * committed and removed the partial entry under the second.
 */
import assert from "node:assert/strict";
import { spawnSync } from "node:child_process";
import { mkdtemp, readFile, rm, writeFile } from "node:fs/promises";
import { hostname, tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, describe, test } from "node:test";
import { FeatureCache } from "../core/datasets/feature_store.js";
import { runCli } from "./helpers/cli.js";

let dir: string;
before(async () => {
  dir = await mkdtemp(join(tmpdir(), "ctrain-lock-"));
});
after(async () => {
  await rm(dir, { recursive: true, force: true });
});

describe("feature cache lock", () => {
  test("feature cache lock - a second taker waits, says for whom, and gets the lock once it is released", async () => {
    const cache = new FeatureCache(join(dir, "a"));
    const release = await cache.lock("k1");
    const waitedFor: string[] = [];
    let got = false;
    const second = cache.lock("k1", (holder) => waitedFor.push(holder), 20).then((r) => {
      got = true;
      return r;
    });
    await new Promise((r) => setTimeout(r, 150));
    assert.equal(got, false, "the lock is held");
    assert.deepEqual(waitedFor, [`${process.pid}@${hostname()}`]);
    await release();
    const release2 = await second;
    assert.equal(got, true);
    // Another key is independent.
    const other = await cache.lock("k2");
    await other();
    await release2();
  });

  test("feature cache lock - a lock left by a dead process is taken over", async () => {
    const cache = new FeatureCache(join(dir, "b"));
    const gone = spawnSync(process.execPath, ["-e", "process.pid"]).pid!;
    await cache.lock("k").then((r) => r()); // creates the folder
    await writeFile(join(dir, "b", "k.lock"), `${gone}@${hostname()}`);
    let waited = false;
    const release = await cache.lock("k", () => (waited = true), 20);
    assert.equal(waited, false);
    assert.equal(await readFile(join(dir, "b", "k.lock"), "utf8"), `${process.pid}@${hostname()}`);
    await release();
  });

  test("feature cache lock - two ctrain runs on one cache folder both finish, with the same features", async () => {
    const cache = join(dir, "shared");
    const args = (out: string): string[] => ["run", "--data", "fashion-mnist", "--limit", "600", "--input-size", "64", "--feature-layer", "block_6_expand_relu", "--shard-size", "50",
      "--epochs", "1", "--workers", "1", "--metrics-port", "-1", "--log-format", "json", "--cache-dir", cache, "--out", join(dir, out)];
    const [a, b] = await Promise.all([runCli(args("one"), { timeoutMs: 180_000 }), runCli(args("two"), { timeoutMs: 180_000 })]);
    assert.equal(a.code, 0, a.stderr.slice(-2000));
    assert.equal(b.code, 0, b.stderr.slice(-2000));
    const sa = JSON.parse(await readFile(join(dir, "one", "summary.json"), "utf8"));
    const sb = JSON.parse(await readFile(join(dir, "two", "summary.json"), "utf8"));
    assert.deepEqual(sa.samples, sb.samples);
    assert.equal([sa.extraction.cache_hit, sb.extraction.cache_hit].filter(Boolean).length, 1, "one extracted, the other waited and found the entry");
    assert.equal(sa.phases.head.test_accuracy, sb.phases.head.test_accuracy, "the same features and seed give the same head");
  });
});

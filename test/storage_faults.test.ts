/**
 * Disks that cannot take what a job writes, on real small tmpfs mounts (root only: skipped where
 * mount is not allowed): a read-only --out and a --cache-dir too small for the feature cache are
 * refused before any work, naming the flag, the folder and the space needed; a cache disk that fills
 * while `ctrain run --workers 2` extracts ends the job within seconds naming the folder, leaving no
 * cache entry or temporary file a later run could take as valid; a model saved onto a full disk
 * leaves no truncated weights.bin next to a model.json.
 */
import assert from "node:assert/strict";
import { execFileSync, spawn } from "node:child_process";
import { existsSync, mkdirSync, readdirSync, writeFileSync } from "node:fs";
import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, test } from "node:test";
import * as tf from "@tensorflow/tfjs";
import { StorageError } from "../core/runtime/errors.js";
import { saveModel } from "../core/models/model_io.js";
import { CTRAIN_BIN, runCli } from "./helpers/cli.js";
import { Proc } from "./helpers/cluster.js";

let dir: string;
const mounts: string[] = [];

/** A fresh tmpfs of `kib` KiB (read-only if asked), or undefined where mounting is not allowed. */
function tmpfs(name: string, kib: number, readOnly = false): string | undefined {
  const p = join(dir, name);
  mkdirSync(p, { recursive: true });
  try {
    execFileSync("mount", ["-t", "tmpfs", "-o", `${readOnly ? "ro," : ""}size=${kib}k`, "tmpfs", p], { stdio: "ignore" });
  } catch {
    return undefined;
  }
  mounts.push(p);
  return p;
}

/** Every file under `root`, relative. */
function files(root: string): string[] {
  if (!existsSync(root)) return [];
  return readdirSync(root, { recursive: true, withFileTypes: true }).filter((e) => e.isFile()).map((e) => join(e.parentPath ?? e.path, e.name).slice(root.length + 1));
}

const JOB = ["--data", "fashion-mnist", "--input-size", "64", "--epochs", "1", "--head-units", "8", "--backend", "wasm", "--log-format", "json", "--seed", "5", "--metrics-port", "-1"];

before(async () => {
  dir = await mkdtemp(join(tmpdir(), "ctrain-storage-"));
});
after(async () => {
  for (const m of mounts.reverse()) execFileSync("umount", ["-l", m], { stdio: "ignore" });
  await rm(dir, { recursive: true, force: true });
});

test("storage - a read-only --out is refused before any work, naming it", async (t) => {
  const ro = tmpfs("ro", 1024, true);
  if (!ro) return t.skip("mount not allowed here");
  const t0 = performance.now();
  const r = await runCli(["run", ...JOB, "--limit", "40", "--workers", "1", "--cache-dir", join(dir, "cache-ro"), "--out", join(ro, "out")], { timeoutMs: 60_000 });
  assert.equal(r.code, 2, r.stderr);
  assert.match(r.stderr, /--out .*read-only/);
  assert.ok(performance.now() - t0 < 30_000);
  assert.equal(existsSync(join(dir, "cache-ro")), false, "nothing extracted");
});

test("storage - a --cache-dir too small for the feature cache is refused, naming the space needed", async (t) => {
  const small = tmpfs("small", 1024);
  if (!small) return t.skip("mount not allowed here");
  const r = await runCli(["run", ...JOB, "--limit", "200", "--workers", "1", "--cache-dir", join(small, "cache"), "--out", join(dir, "out-small")], { timeoutMs: 60_000 });
  assert.equal(r.code, 2, r.stderr);
  assert.match(r.stderr, /--cache-dir .*MiB free .*about \d+(\.\d+)? MiB needed for the feature cache/);
  assert.deepEqual(files(small), []);
});

test("storage - the cache disk fills during distributed extraction: the job ends within 30 s naming the folder, nothing half-written stays", { timeout: 120_000 }, async (t) => {
  const disk = tmpfs("filling", 4096);
  if (!disk) return t.skip("mount not allowed here");
  const cache = join(disk, "cache");
  const args = [CTRAIN_BIN, "run", ...JOB, "--limit", "160", "--shard-size", "8", "--workers", "2", "--job", "fill", "--cache-dir", cache, "--out", join(dir, "out-fill")];
  const p = new Proc("run", spawn(process.execPath, args, { stdio: ["ignore", "pipe", "pipe"], env: { ...process.env, CTRAIN_LOG_LEVEL: "info" } }));
  await p.waitFor("shard tasks queued", 60_000);
  // Someone else takes the disk while the shards arrive.
  try {
    writeFileSync(join(disk, "filler"), new Uint8Array(4096 * 1024));
  } catch {
    // full: what we wanted
  }
  const filled = performance.now();
  const code = await p.exited;
  assert.notEqual(code, 0, "the job cannot succeed");
  assert.ok(performance.now() - filled < 30_000, `ended ${((performance.now() - filled) / 1000).toFixed(1)} s after the disk filled`);
  assert.match(p.stderr, new RegExp(`StorageError: cannot write ${cache.replace(/[.*+?^${}()|[\]\\]/g, "\\$&")}.*no space left`));
  const left = files(cache);
  assert.ok(!left.some((f) => f.endsWith("meta.json")), `no committed entry: ${left.join(", ")}`);
  assert.ok(!left.some((f) => f.includes(".tmp")), `no temporary file: ${left.join(", ")}`);
});

test("storage - a model saved onto a full disk leaves no truncated weights.bin next to a model.json", async (t) => {
  const disk = tmpfs("model", 256);
  if (!disk) return t.skip("mount not allowed here");
  const model = tf.sequential({ layers: [tf.layers.dense({ inputShape: [512], units: 256 })] }); // 525 KB of weights
  try {
    await assert.rejects(saveModel(model, join(disk, "model")), (e: unknown) => e instanceof StorageError && e.code === "ENOSPC");
  } finally {
    model.dispose();
  }
  assert.deepEqual(files(join(disk, "model")), []);
});

/**
 * `--data synthetic:N` through real worker processes: workers get only the spec and must make the
 * same images from (seed, index) as the coordinator's own process would, so features extracted
 * across workers equal those of a single process. Bad specs are refused before anything starts.
 */
import assert from "node:assert/strict";
import { existsSync } from "node:fs";
import { mkdtemp, readdir, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, test } from "node:test";
import { FeatureCache, type FeatureSet } from "../core/datasets/feature_store.js";
import { Cluster, stopAll, waitExit } from "./helpers/cluster.js";
import { startNatsServer, type NatsServer } from "./helpers/nats_server.js";

const JOB_ARGS = ["--data", "synthetic:150:3", "--input-size", "64", "--shard-size", "25", "--epochs", "1", "--head-units", "16", "--backend", "wasm", "--log-format", "json", "--seed", "7"];

let dir: string;
let cluster: Cluster;
let server: NatsServer;
before(async () => {
  dir = await mkdtemp(join(tmpdir(), "ctrain-synth-"));
  cluster = new Cluster({ dir, jobArgs: JOB_ARGS });
  server = await startNatsServer();
});
after(async () => {
  for (const p of cluster?.procs ?? []) if (p.proc.exitCode === null && p.proc.signalCode === null) p.proc.kill("SIGKILL");
  await server?.stop();
  await rm(dir, { recursive: true, force: true });
});

async function committed(root: string): Promise<FeatureSet> {
  const entries = (await readdir(root)).filter((n) => existsSync(join(root, n, "meta.json")));
  assert.equal(entries.length, 1, `one committed entry in ${root}: ${entries.join(", ")}`);
  return new FeatureCache(root).load(entries[0]);
}

test("synthetic - workers make the same images from the spec: distributed features equal single-process ones", { timeout: 300_000 }, async () => {
  const job = "synth-dist";
  const w = [await cluster.worker(server.url, job, "sy-w0"), await cluster.worker(server.url, job, "sy-w1")];
  const c = await cluster.coordinator(server.url, job, ["--ack-wait", "30"]);
  const local = cluster.ctrain("local", ["run", ...JOB_ARGS, "--workers", "1", "--job", "synth-local", "--cache-dir", join(dir, "synth-local", "cache"), "--out", join(dir, "synth-local", "out"), "--metrics-port", "-1"]);
  try {
    assert.equal(await waitExit(c, 240_000), 0, c.tail());
    assert.equal(await local.exited, 0, local.tail());
  } finally {
    await stopAll(w);
  }
  const dist = await committed(cluster.cacheDir(job));
  const single = await committed(join(dir, "synth-local", "cache"));
  assert.equal(dist.ids.length, 150);
  assert.deepEqual(dist.ids, single.ids);
  assert.deepEqual([...dist.labels], [...single.labels]);
  let maxDiff = 0;
  for (let i = 0; i < dist.features.length; i++) maxDiff = Math.max(maxDiff, Math.abs(dist.features[i] - single.features[i]));
  assert.ok(maxDiff <= 1e-4, `max |distributed - single| = ${maxDiff}`);
});

test("synthetic - a bad spec is refused by the CLI before anything starts, naming --data", { timeout: 60_000 }, async () => {
  for (const [spec, why] of [["synthetic:0", /N must be at least 1/], ["synthetic:100:1", /at least 2 classes/]] as const) {
    const out = join(dir, `bad-${spec.replace(/\W/g, "-")}`);
    const p = cluster.ctrain(`bad-${spec}`, ["run", "--data", spec, "--out", out, "--cache-dir", join(out, "cache"), "--metrics-port", "-1"]);
    assert.equal(await p.exited, 2, p.tail());
    assert.match(p.tail(), new RegExp(`--data ${spec}: `));
    assert.match(p.tail(), why);
    assert.equal(existsSync(out), false, "nothing created");
  }
});

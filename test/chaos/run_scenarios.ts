/**
 * Chaos rows for `ctrain run` itself (its embedded nats-server and local workers), where the other
 * rows drive `ctrain coordinator` against a server of their own. Each row either must end like the
 * clean run (same committed features, same head) or must end with a clear error within 30 s of the
 * fault, leaving no committed cache entry:
 *   run-kill-nats      the embedded nats-server SIGKILLed once the tasks are queued: restarted, job completes
 *   run-forged-worker  (ctrain run --nats) a forged worker answers 3 tasks with shifted labels and constant
 *                      features: refused, extracted again, the clean run's features, labels and head
 *   run-full-cache     the --cache-dir disk (a 4 MiB tmpfs) filled by someone else mid-extraction: StorageError
 *   run-readonly-out   --out on a read-only file system: refused before any work
 *   run-symlink-loop   a folder data set with `ln -s .. a/up`: every real image once, with its own label
 * The tmpfs rows need root and mount(8); where mounting is refused they are reported as not run.
 */
import { execFileSync, spawn } from "node:child_process";
import { existsSync, mkdirSync, symlinkSync, writeFileSync } from "node:fs";
import { readdir, readFile } from "node:fs/promises";
import { join } from "node:path";
import { connect } from "nats";
import sharp from "sharp";
import { float32ToBytes } from "../../proto/tensor_codec.js";
import { decode, encode, makeHeader } from "../../proto/codec.js";
import { jobNames } from "../../proto/subjects.js";
import { startNatsServer, type NatsServer } from "../helpers/nats_server.js";
import { FeatureCache } from "../../core/datasets/feature_store.js";
import { CTRAIN_BIN } from "../helpers/cli.js";
import { Proc } from "../helpers/cluster.js";
import { featureDiff, maxAbsDiff, type ChaosConfig, type RunArtifacts, type ScenarioResult } from "./scenarios.js";

/** A `ctrain run` row. */
export interface RunScenario {
  name: string;
  workers: number;
  expect: "complete" | "error";
  /** What the message of an expected error must say. */
  errorPattern?: RegExp;
  /** Prepares the row's folders; returns flags that replace the defaults (--data, --cache-dir, --out), or a reason it cannot run here. */
  setup?(dir: string): Promise<Record<string, string> | string>;
  /** Injects the fault once the run is under way; returns its description. */
  fault?(p: Proc, dir: string): Promise<string | undefined>;
  /** For a completed row: checks of its own on the committed features (they are not the clean run's). */
  check?(features: { ids: string[]; labels: Int32Array }, classes: string[]): string | undefined;
}

const servers: NatsServer[] = [];

/** Answers `n` tasks of `job` as a forger would: labels shifted, features constant; returns the fault's description. */
async function forge(url: string, job: string, n: number): Promise<string> {
  const names = jobNames(job);
  const nc = await connect({ servers: url });
  try {
    const js = nc.jetstream();
    const consumer = await js.consumers.get(names.tasksStream, names.tasksConsumer);
    const os = await js.views.os(names.featuresBucket);
    let forged = 0;
    for (let i = 0; i < n; i++) {
      const msg = await consumer.next({ expires: 10_000 });
      if (!msg) break;
      const t = decode("ShardTask", msg.data, { job });
      const header = makeHeader(job, "forger");
      const features = float32ToBytes(new Float32Array(t.ids.length * 1280).fill(0.25));
      await os.putBlob({ name: t.shardId }, encode("FeatureShard", { header, shardId: t.shardId, ids: t.ids, labels: t.labels.map((l) => (l + 1) % 10), splits: t.splits, featureDims: [1280], features, skipped: [], worker: "forger", seconds: 1 }));
      nc.publish(names.shardDone, encode("FeatureShard", { header, shardId: t.shardId, ids: [], labels: [], splits: [], featureDims: [1280], features: new Uint8Array(0), skipped: [], worker: "forger", seconds: 1 }));
      await msg.ackAck();
      forged++;
    }
    return `a forged worker answered ${forged} task(s) with shifted labels and constant features`;
  } finally {
    await nc.close();
  }
}

function mountTmpfs(path: string, kib: number, readOnly = false): boolean {
  mkdirSync(path, { recursive: true });
  try {
    execFileSync("mount", ["-t", "tmpfs", "-o", `${readOnly ? "ro," : ""}size=${kib}k`, "tmpfs", path], { stdio: "ignore" });
    return true;
  } catch {
    return false;
  }
}

export const RUN_SCENARIOS: RunScenario[] = [
  {
    name: "run-kill-nats",
    workers: 2,
    expect: "complete",
    async fault(p) {
      const pid = Number((await p.waitFor("embedded nats-server started", 120_000)).pid);
      await p.waitFor("shard tasks queued", 120_000);
      process.kill(pid, "SIGKILL");
      return `SIGKILL embedded nats-server (pid ${pid}) once the shard tasks were queued`;
    },
  },
  {
    name: "run-forged-worker",
    workers: 2,
    expect: "complete",
    async setup() {
      // A server of our own (ctrain run --nats): the forger is a client with the workers' access.
      const server = await startNatsServer();
      servers.push(server);
      return { nats: server.url };
    },
    async fault(p) {
      const url = servers.at(-1)!.url;
      await p.waitFor("shard tasks queued", 120_000);
      const job = String(p.logged("shard tasks queued")[0]!.job);
      return forge(url, job, 3);
    },
  },
  {
    name: "run-full-cache",
    workers: 2,
    expect: "error",
    errorPattern: /StorageError: cannot write .*no space left/,
    async setup(dir) {
      return mountTmpfs(join(dir, "disk"), 4096) ? { "cache-dir": join(dir, "disk", "cache") } : "mount not allowed";
    },
    async fault(p, dir) {
      await p.waitFor("shard tasks queued", 120_000);
      try {
        writeFileSync(join(dir, "disk", "filler"), new Uint8Array(4096 * 1024));
      } catch {
        // the disk is full: the point
      }
      return "filled the 4 MiB cache disk while shards arrive";
    },
  },
  {
    name: "run-readonly-out",
    workers: 2,
    expect: "error",
    errorPattern: /--out .*read-only file system/,
    async setup(dir) {
      return mountTmpfs(join(dir, "ro"), 1024, true) ? { out: join(dir, "ro", "out") } : "mount not allowed";
    },
    fault: async () => "--out on a read-only tmpfs",
  },
  {
    name: "run-symlink-loop",
    workers: 2,
    expect: "complete",
    async setup(dir) {
      const root = join(dir, "data");
      for (const [c, v] of [["a", 40], ["b", 200]] as const) {
        mkdirSync(join(root, c), { recursive: true });
        for (let i = 0; i < 30; i++)
          writeFileSync(join(root, c, `${i}.png`), await sharp({ create: { width: 16, height: 16, channels: 3, background: { r: v, g: (i * 7) % 255, b: 255 - v } } }).png().toBuffer());
      }
      symlinkSync("..", join(root, "a", "up"));
      return { data: root, limit: "0" };
    },
    fault: async () => "data set with a symlink loop (ln -s .. a/up)",
    check(f, classes) {
      if (f.ids.length !== 60) return `${f.ids.length} samples, 60 real images`;
      const bad = f.ids.findIndex((id, i) => classes[f.labels[i]!] !== id.split("/")[0]);
      return bad >= 0 ? `${f.ids[bad]} labelled ${classes[f.labels[bad]!]}` : undefined;
    },
  },
];

function emptyResult(sc: RunScenario, cfg: ChaosConfig, planned: number): ScenarioResult {
  return {
    scenario: sc.name, seed: cfg.seed, workers: sc.workers, faults: [], completed: false, exit: "timeout", samples_planned: planned, samples_committed: 0,
    samples_lost: 0, samples_duplicated: 0, samples_foreign: 0, shards_extracted_twice: 0, feature_max_diff: null, weights_max_diff: null, test_accuracy: null,
    test_accuracy_delta_points: null, test_samples: null, wall_s: 0, overhead: null, ok: false, notes: [],
  };
}

/** Runs one `ctrain run` row; `baseline` is the clean run (compared with for the fashion-mnist rows). */
export async function runRunScenario(sc: RunScenario, cfg: ChaosConfig, planned: string[], jobArgs: string[], baseline?: RunArtifacts): Promise<ScenarioResult> {
  const dir = join(cfg.dir, `${sc.name}-${cfg.seed}`);
  mkdirSync(dir, { recursive: true });
  const result = emptyResult(sc, cfg, planned.length);
  const flags: Record<string, string> = { "cache-dir": join(dir, "cache"), out: join(dir, "out") };
  const prepared = sc.setup ? await sc.setup(dir) : {};
  if (typeof prepared === "string") {
    result.notes.push(`not run: ${prepared}`);
    result.ok = true;
    return result;
  }
  Object.assign(flags, prepared);
  const args = [...jobArgs];
  for (const [k, v] of Object.entries(flags)) {
    const i = args.indexOf(`--${k}`);
    if (i >= 0) args[i + 1] = v;
    else args.push(`--${k}`, v);
  }
  const t0 = performance.now();
  const p = new Proc(sc.name, spawn(process.execPath, [CTRAIN_BIN, "run", ...args, "--workers", String(sc.workers), "--job", `chaos-${sc.name}`, "--metrics-port", "-1"], { stdio: ["ignore", "pipe", "pipe"], env: { ...process.env, CTRAIN_LOG_LEVEL: "info" } }));
  const timer = setTimeout(() => p.proc.kill("SIGKILL"), cfg.timeoutMs);
  let faultAt = 0;
  let injected = !sc.fault;
  try {
    const f = await sc.fault?.(p, dir).catch((e: Error) => `fault not injected: ${e.message.split("\n")[0]}`);
    faultAt = performance.now();
    if (f) result.faults.push(`t=${((faultAt - t0) / 1000).toFixed(1)}s ${f}`);
    injected = f !== undefined && !f.startsWith("fault not injected");
    const code = await p.exited;
    result.exit = code;
  } finally {
    clearTimeout(timer);
    if (p.alive) p.proc.kill("SIGKILL");
    for (const m of ["disk", "ro"]) if (existsSync(join(dir, m))) execFileSync("umount", ["-l", join(dir, m)], { stdio: "ignore" });
    for (const s of servers.splice(0)) await s.stop();
  }
  result.wall_s = Number(((performance.now() - t0) / 1000).toFixed(1));
  result.completed = result.exit === 0 && existsSync(join(flags.out!, "summary.json"));
  const cache = new FeatureCache(flags["cache-dir"]!);
  const keys = existsSync(cache.root) ? (await readdir(cache.root)).filter((k) => cache.has(k)) : [];
  if (sc.expect === "error") {
    const secs = (performance.now() - faultAt) / 1000;
    const said = sc.errorPattern?.test(p.stderr) ?? true;
    result.notes.push(`ended ${secs.toFixed(1)} s after the fault; ${said ? "the error says so" : "the error does not say what happened"}; ${keys.length} committed cache entries`);
    result.ok = injected && typeof result.exit === "number" && result.exit !== 0 && secs <= 30 && said && keys.length === 0;
    if (!said) result.error = p.stderr.split("\n").filter((l) => l.includes('"error"') || l.startsWith("ctrain:")).slice(-4).join("\n");
    return result;
  }
  if (!result.completed) {
    result.error = `ctrain run ended with ${result.exit}:\n${p.stderr.split("\n").filter((l) => l.includes('"level":"error"') || l.startsWith("ctrain:")).slice(-6).join("\n")}`;
    return result;
  }
  const set = await cache.load(keys[0]!);
  result.samples_committed = set.ids.length;
  const summary = JSON.parse(await readFile(join(flags.out!, "summary.json"), "utf8")) as { phases: { head: { test_accuracy: number } } };
  result.test_accuracy = summary.phases.head.test_accuracy;
  if (sc.check) {
    const why = sc.check(set, set.meta.classes);
    if (why) result.error = why;
    result.ok = injected && !why && keys.length === 1;
    return result;
  }
  const buf = await readFile(join(flags.out!, "model", "weights.bin"));
  if (baseline?.weights) result.weights_max_diff = maxAbsDiff(new Float32Array(buf.buffer, buf.byteOffset, buf.byteLength / 4), baseline.weights);
  const plannedSet = new Set(planned);
  const seen = new Set(set.ids);
  result.samples_lost = planned.filter((id) => !seen.has(id)).length;
  result.samples_duplicated = set.ids.length - seen.size;
  result.samples_foreign = set.ids.filter((id) => !plannedSet.has(id)).length;
  const base = baseline?.features.get(`${set.meta.featureLayer}/${set.meta.pooling}`);
  if (base) {
    result.feature_max_diff = featureDiff(set, base);
    const label = new Map(base.ids.map((id, i) => [id, base.labels[i]]));
    const relabelled = set.ids.filter((id, i) => label.has(id) && label.get(id) !== set.labels[i]).length;
    if (relabelled) result.error = `${relabelled} samples labelled otherwise than in the clean run`;
    result.samples_foreign += relabelled;
  }
  if (baseline?.testAccuracy !== undefined) result.test_accuracy_delta_points = Number(((result.test_accuracy - baseline.testAccuracy) * 100).toFixed(2));
  result.ok = injected && result.samples_lost === 0 && result.samples_duplicated === 0 && result.samples_foreign === 0 && (result.feature_max_diff ?? 0) <= 1e-5;
  return result;
}

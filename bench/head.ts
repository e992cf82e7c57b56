/**
 * bench/head: the full Fashion-MNIST job (60k train = 54k train + 6k validation, 10k test) at input
 * 96 through `ctrain run`, as a user runs it: head test accuracy and wall time per phase. A second
 * run with the same inputs reads the feature cache; its extraction time is reported as well.
 * Writes bench/results/head.json.
 *
 *   node dist/bench/head.js [--feature-layer out_relu,block_12_add] [--epochs 10] [--limit 0] [--workers N]
 *
 * `--compare-stream` instead: one run fills a fresh feature cache (--limit, first feature layer), then
 * the head is trained in this process twice per seed on that entry, same seed, same head: streamed
 * from the cache by block (block order + window shuffle, the default) and with every split copied
 * into memory (uniform shuffle, the path before streaming). Writes bench/results/head_stream.json.
 *
 *   node dist/bench/head.js --compare-stream [--limit 20000] [--epochs 10] [--seeds 1,2,3]
 */
import { spawn } from "node:child_process";
import { mkdir, readFile, writeFile } from "node:fs/promises";
import { availableParallelism, cpus } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { readdirSync } from "node:fs";
import { uptime as osUptime, loadavg } from "node:os";
import { trainHead } from "../coordinator/head_training.js";
import { FeatureCache } from "../core/datasets/feature_store.js";
import { selectBackend } from "../core/models/backend.js";

function arg(name: string, def: string): string {
  const i = process.argv.indexOf(`--${name}`);
  return i >= 0 ? process.argv[i + 1] : def;
}

async function run(args: string[]): Promise<number> {
  const bin = fileURLToPath(new URL("../cli/main.js", import.meta.url));
  const child = spawn(process.execPath, [bin, "run", ...args], { stdio: ["ignore", "inherit", "inherit"] });
  return new Promise((resolve) => child.on("close", (code) => resolve(code ?? 1)));
}

/** Streamed vs in-memory head training on one Fashion-MNIST feature cache entry, same seeds. */
async function compareStream(): Promise<void> {
  const layer = arg("feature-layer", "out_relu").split(",")[0];
  const epochs = Number(arg("epochs", "10"));
  const limit = arg("limit", "20000");
  const seeds = arg("seeds", "1,2,3").split(",").map(Number);
  const cacheDir = arg("cache-dir", join("runs", "bench-head-stream-cache"));
  const code = await run(["--data", "fashion-mnist", "--input-size", "96", "--feature-layer", layer, "--epochs", "1", "--limit", limit, "--fine-tune-layers", "0",
    "--workers", arg("workers", "1"), "--cache-dir", cacheDir, "--metrics-port", "-1", "--log-format", "json", "--out", join("runs", "bench-head-stream"), "--job", "bench-head-stream"]);
  if (code !== 0) throw new Error(`ctrain run exited ${code}`);
  const keys = readdirSync(cacheDir).filter((n) => !n.includes("."));
  if (keys.length !== 1) throw new Error(`${cacheDir} should hold one entry, holds ${keys.join(", ")}`);
  await selectBackend("auto");
  const set = await new FeatureCache(cacheDir).load(keys[0]);
  const rows: Record<string, unknown>[] = [];
  for (const seed of seeds) {
    const row: Record<string, unknown> = { seed };
    for (const stream of [true, false]) {
      const r = await trainHead(set, { epochs, batchSize: 32, learningRate: 1e-3, units: 256, dropout: 0.5, seed, stream });
      row[stream ? "stream" : "in_memory"] = { test_accuracy: r.test.accuracy, val_accuracy: r.val_accuracy, seconds: Number(r.seconds.toFixed(1)) };
      r.head.dispose();
    }
    const s = row.stream as { test_accuracy: number }, m = row.in_memory as { test_accuracy: number };
    row.test_accuracy_difference_points = Number((100 * (s.test_accuracy - m.test_accuracy)).toFixed(2));
    console.log(JSON.stringify(row));
    rows.push(row);
  }
  const mean = (k: "stream" | "in_memory"): number => rows.reduce((a, r) => a + (r[k] as { test_accuracy: number }).test_accuracy, 0) / rows.length;
  const result = {
    bench: "head_stream", data: "fashion-mnist", input_size: 96, feature_layer: layer, limit: Number(limit), epochs, samples: set.labels.length,
    mean_test_accuracy: { stream: mean("stream"), in_memory: mean("in_memory"), difference_points: Number((100 * (mean("stream") - mean("in_memory"))).toFixed(2)) },
    machine: { cores: availableParallelism(), cpu: cpus()[0]?.model, loadavg: loadavg(), uptime_seconds: osUptime() }, date: new Date().toISOString(), results: rows,
  };
  await mkdir("bench/results", { recursive: true });
  await writeFile("bench/results/head_stream.json", `${JSON.stringify(result, null, 2)}\n`);
  console.log("wrote bench/results/head_stream.json");
}

async function main(): Promise<void> {
  if (process.argv.includes("--compare-stream")) return compareStream();
  const layers = arg("feature-layer", "out_relu,block_12_add").split(",");
  const epochs = arg("epochs", "10");
  const limit = arg("limit", "0");
  const workers = arg("workers", String(availableParallelism()));
  const cacheDir = arg("cache-dir", ".ctrain-cache");
  const rows: Record<string, unknown>[] = [];
  for (const layer of layers) {
    const out = join("runs", `bench-head-${layer}`);
    const common = ["--data", "fashion-mnist", "--input-size", "96", "--feature-layer", layer, "--epochs", epochs, "--limit", limit,
      "--workers", workers, "--cache-dir", cacheDir, "--metrics-port", "-1", "--log-format", "json"];
    const t0 = performance.now();
    const code = await run([...common, "--out", out, "--job", `bench-head-${layer.replace(/_/g, "-")}`]);
    const wall = (performance.now() - t0) / 1000;
    if (code !== 0) throw new Error(`ctrain run exited ${code} for ${layer}`);
    const s = JSON.parse(await readFile(join(out, "summary.json"), "utf8")) as {
      backend: string; workers: number; samples: Record<string, number>;
      extraction: { images: number; seconds: number; images_per_second: number; cache_hit: boolean };
      phases: { head: { epochs: number; val_accuracy: number; test_accuracy: number; seconds: number } };
    };
    const t1 = performance.now();
    const code2 = await run([...common, "--epochs", "1", "--out", `${out}-cached`, "--job", `bench-head-${layer.replace(/_/g, "-")}-cached`]);
    const cachedWall = (performance.now() - t1) / 1000;
    const s2 = code2 === 0 ? JSON.parse(await readFile(join(`${out}-cached`, "summary.json"), "utf8")) as typeof s : undefined;
    const row = {
      feature_layer: layer, backend: s.backend, workers: s.workers, samples: s.samples,
      extraction: { ...s.extraction },
      head: s.phases.head,
      wall_seconds: Number(wall.toFixed(1)),
      second_run: s2 ? { cache_hit: s2.extraction.cache_hit, extraction_seconds: s2.extraction.seconds, wall_seconds: Number(cachedWall.toFixed(1)) } : null,
    };
    console.log(JSON.stringify(row));
    rows.push(row);
  }
  const result = { bench: "head", data: "fashion-mnist", input_size: 96, model: "mobilenet_v2", epochs: Number(epochs), limit: Number(limit),
    machine: { cores: availableParallelism(), cpu: cpus()[0]?.model }, date: new Date().toISOString(), results: rows };
  await mkdir("bench/results", { recursive: true });
  await writeFile("bench/results/head.json", `${JSON.stringify(result, null, 2)}\n`);
  console.log("wrote bench/results/head.json");
}

void main().catch((e: unknown) => { console.error(e); process.exit(1); });

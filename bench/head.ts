/**
 * bench/head: the full Fashion-MNIST job (60k train = 54k train + 6k validation, 10k test) at input
 * 96 through `ctrain run`, as a user runs it: head test accuracy and wall time per phase. A second
 * run with the same inputs reads the feature cache; its extraction time is reported as well.
 * Writes bench/results/head.json.
 *
 *   node dist/bench/head.js [--feature-layer out_relu,block_12_add] [--epochs 10] [--limit 0] [--workers N]
 */
import { spawn } from "node:child_process";
import { mkdir, readFile, writeFile } from "node:fs/promises";
import { availableParallelism, cpus } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";

function arg(name: string, def: string): string {
  const i = process.argv.indexOf(`--${name}`);
  return i >= 0 ? process.argv[i + 1] : def;
}

async function run(args: string[]): Promise<number> {
  const bin = fileURLToPath(new URL("../cli/main.js", import.meta.url));
  const child = spawn(process.execPath, [bin, "run", ...args], { stdio: ["ignore", "inherit", "inherit"] });
  return new Promise((resolve) => child.on("close", (code) => resolve(code ?? 1)));
}

async function main(): Promise<void> {
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

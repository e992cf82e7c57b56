/**
 * bench/extract: feature-extraction throughput of mobilenet_v2 (out_relu, avg pooling) at input
 * 96, 160 and 224, on every backend that loads here, with 1 and 2 worker processes (tfjs has no
 * threads in Node on wasm/cpu: one process per core is how cores are used).
 *
 * Each worker process loads the model, warms up, waits for a common start signal, then extracts real
 * Fashion-MNIST images (decode + resize + forward pass, as a worker does). Throughput of N processes
 * = all images / wall time from the start signal to the last finish. Ratios are computed within
 * this one run. Writes bench/results/extract.json.
 *
 *   node dist/bench/extract.js [--sizes 96,160,224] [--backends wasm,cpu] [--images 256] [--cpu-images 8]
 */
import { fork } from "node:child_process";
import { mkdir, writeFile } from "node:fs/promises";
import { availableParallelism, cpus } from "node:os";
import { fileURLToPath } from "node:url";
import { selectBackend } from "../core/backend.js";
import type { BackendName } from "../core/config.js";
import { openDataset } from "../core/datasets/open.js";
import { buildFeatureExtractor } from "../core/feature_model.js";
import { loadPretrained } from "../core/model_zoo.js";
import { extractShard } from "../worker/extraction_executor.js";

interface ChildArgs { backend: BackendName; size: number; images: number; offset: number }
interface ChildResult { backend: string; images: number; seconds: number }

async function child(a: ChildArgs): Promise<void> {
  const info = await selectBackend(a.backend);
  const ds = await openDataset("fashion-mnist", { seed: 7, valSplit: 0.1, testSplit: 0.1, limit: 0, maxPixels: 1e7 });
  const fx = await buildFeatureExtractor(await loadPretrained("mobilenet_v2"), { inputSize: a.size, featureLayer: "out_relu", pooling: "avg" });
  const samples = ds.samples.slice(a.offset, a.offset + a.images);
  await extractShard(ds, fx, "warmup", samples.slice(0, 4), { batchSize: 4 });
  process.send!({ type: "ready" });
  await new Promise<void>((resolve) => process.once("message", () => resolve()));
  const t0 = performance.now();
  await extractShard(ds, fx, "bench", samples, { batchSize: 32 });
  const r: ChildResult = { backend: info.name, images: samples.length, seconds: (performance.now() - t0) / 1000 };
  process.send!({ type: "done", result: r });
}

async function measure(backend: BackendName, size: number, processes: number, images: number): Promise<{ images_per_second: number; seconds: number; images: number; backend: string } | { error: string }> {
  const self = fileURLToPath(import.meta.url);
  const kids = Array.from({ length: processes }, (_, i) =>
    fork(self, ["--child", JSON.stringify({ backend, size, images, offset: i * images } satisfies ChildArgs)], { stdio: ["ignore", "inherit", "pipe", "ipc"] }));
  const stderr: string[] = kids.map(() => "");
  kids.forEach((k, i) => k.stderr!.on("data", (d: Buffer) => (stderr[i] += d.toString())));
  const wait = (k: (typeof kids)[number], type: string) => new Promise<{ result?: ChildResult }>((resolve, reject) => {
    k.on("message", (m: { type: string; result?: ChildResult }) => { if (m.type === type) resolve(m); });
    k.on("exit", (code) => reject(new Error(`child exited ${code}`)));
  });
  try {
    await Promise.all(kids.map((k) => wait(k, "ready")));
    const done = kids.map((k) => wait(k, "done"));
    const t0 = performance.now();
    kids.forEach((k) => k.send({ type: "go" }));
    const results = await Promise.all(done);
    const seconds = (performance.now() - t0) / 1000;
    const total = results.reduce((a, r) => a + r.result!.images, 0);
    return { images_per_second: Number((total / seconds).toFixed(2)), seconds: Number(seconds.toFixed(2)), images: total, backend: results[0].result!.backend };
  } catch (err) {
    return { error: `${(err as Error).message}: ${stderr.join("").trim().split("\n")[0]}` };
  } finally {
    for (const k of kids) if (k.exitCode === null) k.kill();
  }
}

function arg(name: string, def: string): string {
  const i = process.argv.indexOf(`--${name}`);
  return i >= 0 ? process.argv[i + 1] : def;
}

async function main(): Promise<void> {
  const sizes = arg("sizes", "96,160,224").split(",").map(Number);
  const backends = arg("backends", "tensorflow-gpu,tensorflow,wasm,cpu").split(",") as BackendName[];
  const images = Number(arg("images", "256"));
  const cpuImages = Number(arg("cpu-images", "8"));
  const rows: Record<string, unknown>[] = [];
  for (const backend of backends) {
    for (const size of sizes) {
      const n = backend === "cpu" ? cpuImages : images;
      const one = await measure(backend, size, 1, n);
      if ("error" in one) {
        console.log(`${backend} ${size}: not available here (${one.error.slice(0, 160)})`);
        rows.push({ backend, input_size: size, available: false, reason: one.error.slice(0, 300) });
        break;
      }
      const two = await measure(backend, size, 2, n);
      const r = {
        backend: one.backend, input_size: size, images_per_process: n,
        one_process_images_per_second: one.images_per_second,
        two_processes_images_per_second: "error" in two ? null : two.images_per_second,
        speedup_two_vs_one: "error" in two ? null : Number((two.images_per_second / one.images_per_second).toFixed(2)),
      };
      console.log(JSON.stringify(r));
      rows.push(r);
    }
  }
  const out = { bench: "extract", model: "mobilenet_v2", feature_layer: "out_relu", pooling: "avg", batch_size: 32, data: "fashion-mnist (decode + resize included)",
    machine: { cores: availableParallelism(), cpu: cpus()[0]?.model }, date: new Date().toISOString(), results: rows };
  await mkdir("bench/results", { recursive: true });
  await writeFile("bench/results/extract.json", `${JSON.stringify(out, null, 2)}\n`);
  console.log("wrote bench/results/extract.json");
}

if (process.argv[2] === "--child") void child(JSON.parse(process.argv[3]) as ChildArgs).then(() => process.exit(0), (e: unknown) => { console.error(`${(e as Error).name}: ${(e as Error).message}`); process.exit(1); });
else void main();

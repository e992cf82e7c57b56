/**
 * bench/extract: feature-extraction throughput of mobilenet_v2 (out_relu, avg pooling) per inference
 * engine (onnxruntime, tfjs on wasm, tfjs on cpu), input size and process/thread layout.
 *
 * Each process loads the model, warms up, waits for a common start signal, then measures on real
 * Fashion-MNIST images:
 * - forward only: the frozen pass over images decoded beforehand (batch 32);
 * - worker path: decode + resize + forward as a worker's extractShard does it (decode of the next
 *   batch overlaps the forward pass of this one), and the share of that time spent in the forward
 *   pass (forward-only seconds / worker-path seconds);
 * Throughput of N processes = all images / wall time from the start signal to the last finish.
 *
 * With `--runs` it also times whole `ctrain run` jobs (embedded nats-server, N worker processes,
 * extraction + publishing + one head epoch) per engine and reports summary.json's extraction rate
 * and the job's wall time. Ratios are computed within this one run. Writes bench/results/extract.json.
 *
 *   node dist/bench/extract.js [--sizes 96,160,224] [--layouts onnx:1x1,onnx:2x1,onnx:1x2,wasm:1x1,wasm:2x1,cpu:1x1]
 *                              [--images 512] [--tfjs-images 128] [--cpu-images 8] [--runs 3000] [--run-sizes 96,224]
 */
import { execFile, fork } from "node:child_process";
import { mkdir, mkdtemp, readFile, rm, writeFile } from "node:fs/promises";
import { availableParallelism, cpus, tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { promisify } from "node:util";
import { selectBackend } from "../core/models/backend.js";
import type { BackendName, EngineName } from "../core/runtime/config.js";
import { openDataset } from "../core/datasets/open.js";
import { buildFeatureExtractor } from "../core/models/feature_model.js";
import { loadPretrained } from "../core/models/model_zoo.js";
import { extractShard } from "../worker/extraction_executor.js";

/** MobileNetV2 multiply-adds per image at 224 px (Sandler et al.: 300M); a conv's cost scales with the pixel count. */
const MOBILENET_V2_GFLOP_224 = 0.3 * 2;

interface Layout { engine: EngineName; backend: BackendName; processes: number; threads: number; label: string }
interface ChildArgs { layout: Layout; size: number; images: number; offset: number }
interface ChildResult { engine: string; fallback?: string; images: number; forwardSeconds: number; pipelineSeconds: number; decodeSeconds: number }

function parseLayout(s: string): Layout {
  const m = /^(onnx|wasm|cpu|tensorflow|tensorflow-gpu):(\d+)x(\d+)$/.exec(s);
  if (!m) throw new Error(`--layouts: ${s} is not ENGINE:PROCESSESxTHREADS (e.g. onnx:2x1)`);
  const onnx = m[1] === "onnx";
  return { engine: onnx ? "onnx" : "tfjs", backend: (onnx ? "wasm" : m[1]) as BackendName, processes: Number(m[2]), threads: Number(m[3]), label: s };
}

async function child(a: ChildArgs): Promise<void> {
  await selectBackend(a.layout.backend);
  const ds = await openDataset("fashion-mnist", { seed: 7, valSplit: 0.1, testSplit: 0.1, limit: 0, maxPixels: 1e7 });
  const fx = await buildFeatureExtractor(await loadPretrained("mobilenet_v2"), {
    inputSize: a.size, featureLayer: "out_relu", pooling: "avg", engine: a.layout.engine, threads: a.layout.threads,
  });
  const samples = ds.samples.slice(a.offset, a.offset + a.images);
  await extractShard(ds, fx, "warmup", samples.slice(0, 32), { batchSize: 32 });
  // Decode beforehand for the forward-only figure (timed on its own: decode cost per image).
  const px = a.size * a.size * 3;
  const t0 = performance.now();
  const decoded = new Uint8Array(samples.length * px);
  for (let i = 0; i < samples.length; i += 64) {
    const part = await Promise.all(samples.slice(i, i + 64).map((s) => ds.readRgb(s, a.size)));
    part.forEach((rgb, j) => decoded.set(rgb, (i + j) * px));
  }
  const decodeSeconds = (performance.now() - t0) / 1000;
  process.send!({ type: "ready" });
  await new Promise<void>((resolve) => process.once("message", () => resolve()));
  const t1 = performance.now();
  for (let i = 0; i < samples.length; i += 32) {
    const n = Math.min(32, samples.length - i);
    await fx.extract(decoded.subarray(i * px, (i + n) * px), n);
  }
  const forwardSeconds = (performance.now() - t1) / 1000;
  process.send!({ type: "forward-done" });
  await new Promise<void>((resolve) => process.once("message", () => resolve()));
  const t2 = performance.now();
  await extractShard(ds, fx, "bench", samples, { batchSize: 32 });
  const r: ChildResult = { engine: fx.engine.name, fallback: fx.engine.fallback, images: samples.length, forwardSeconds, pipelineSeconds: (performance.now() - t2) / 1000, decodeSeconds };
  process.send!({ type: "done", result: r });
}

type Measured = { forward_images_per_second: number; worker_path_images_per_second: number; forward_share_of_worker_path: number; decode_ms_per_image: number; engine: string };

async function measure(layout: Layout, size: number, images: number): Promise<Measured | { error: string }> {
  const self = fileURLToPath(import.meta.url);
  const kids = Array.from({ length: layout.processes }, (_, i) =>
    fork(self, ["--child", JSON.stringify({ layout, size, images, offset: i * images } satisfies ChildArgs)], { stdio: ["ignore", "inherit", "pipe", "ipc"] }));
  const stderr: string[] = kids.map(() => "");
  kids.forEach((k, i) => k.stderr!.on("data", (d: Buffer) => (stderr[i] += d.toString())));
  const wait = (k: (typeof kids)[number], type: string) => new Promise<{ result?: ChildResult }>((resolve, reject) => {
    k.on("message", (m: { type: string; result?: ChildResult }) => { if (m.type === type) resolve(m); });
    k.on("exit", (code) => reject(new Error(`child exited ${code}`)));
  });
  // Every process starts each measured part together, so N processes share the cores as workers do.
  const together = async (start: string, end: string): Promise<{ seconds: number; results: { result?: ChildResult }[] }> => {
    const done = kids.map((k) => wait(k, end));
    const t0 = performance.now();
    kids.forEach((k) => k.send({ type: start }));
    const results = await Promise.all(done);
    return { seconds: (performance.now() - t0) / 1000, results };
  };
  try {
    await Promise.all(kids.map((k) => wait(k, "ready")));
    const fwd = await together("go-forward", "forward-done");
    const pipe = await together("go-pipeline", "done");
    const rs = pipe.results.map((r) => r.result!);
    if (rs[0].engine !== (layout.engine === "onnx" ? "onnx" : "tfjs")) return { error: `ran on ${rs[0].engine}: ${rs[0].fallback}` };
    const total = rs.reduce((a, r) => a + r.images, 0);
    const fwdRate = total / fwd.seconds, pipeRate = total / pipe.seconds;
    return {
      engine: rs[0].engine,
      forward_images_per_second: round(fwdRate, 1),
      worker_path_images_per_second: round(pipeRate, 1),
      forward_share_of_worker_path: round(pipeRate / fwdRate, 3),
      decode_ms_per_image: round((rs.reduce((a, r) => a + r.decodeSeconds, 0) / total) * 1000, 3),
    };
  } catch (err) {
    return { error: `${(err as Error).message}: ${stderr.join("").trim().split("\n").slice(-1)[0]}` };
  } finally {
    for (const k of kids) if (k.exitCode === null) k.kill();
  }
}

const round = (x: number, d: number): number => Number(x.toFixed(d));

function arg(name: string, def: string): string {
  const i = process.argv.indexOf(`--${name}`);
  return i >= 0 ? process.argv[i + 1] : def;
}

/** One whole `ctrain run` (embedded nats-server, 2 workers, extraction + 1 head epoch) per engine and size. */
async function wholeRun(engine: EngineName, size: number, limit: number): Promise<Record<string, unknown>> {
  const dir = await mkdtemp(join(tmpdir(), "ctrain-bench-extract-"));
  const cli = fileURLToPath(new URL("../cli/main.js", import.meta.url));
  try {
    const t0 = performance.now();
    const { stdout, stderr } = await promisify(execFile)(process.execPath, [cli, "run", "--limit", String(limit), "--input-size", String(size), "--engine", engine, "--epochs", "1",
      "--out", join(dir, "out"), "--cache-dir", join(dir, "cache"), "--log-format", "json", "--metrics-port", "-1"], { maxBuffer: 256 << 20, env: { ...process.env, CTRAIN_LOG_LEVEL: "debug" } });
    const wall = (performance.now() - t0) / 1000;
    const s = JSON.parse(await readFile(join(dir, "out", "summary.json"), "utf8")) as { workers: number; extraction: { images: number; seconds: number; images_per_second: number } };
    return {
      engine, input_size: size, workers: s.workers, images: s.extraction.images, extraction_seconds: s.extraction.seconds,
      extraction_images_per_second: s.extraction.images_per_second, job_wall_seconds: round(wall, 1), worker_time_split: timeSplit(`${stdout}\n${stderr}`),
    };
  } catch (err) {
    return { engine, input_size: size, error: String((err as Error).message).slice(0, 300) };
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
}

/** The workers' "shard done" lines summed: the share of shard time in forward, waiting for decode, setup and publishing. */
function timeSplit(log: string): Record<string, number> | null {
  const sums: Record<string, number> = { forward_s: 0, decode_wait_s: 0, setup_s: 0, publish_s: 0, seconds: 0 };
  let shards = 0;
  for (const line of log.split("\n")) {
    if (!line.includes('"shard done"')) continue;
    try {
      const o = JSON.parse(line) as Record<string, number>;
      for (const k of Object.keys(sums)) sums[k] += Number(o[k] ?? 0);
      shards++;
    } catch { /* not a JSON line */ }
  }
  if (shards === 0) return null;
  const total = sums.seconds + sums.publish_s;
  return { shards, forward_share: round(sums.forward_s / total, 3), decode_wait_share: round(sums.decode_wait_s / total, 3), setup_share: round(sums.setup_s / total, 3), publish_share: round(sums.publish_s / total, 3) };
}

async function main(): Promise<void> {
  const sizes = arg("sizes", "96,160,224").split(",").map(Number);
  const layouts = arg("layouts", "onnx:1x1,onnx:2x1,onnx:1x2,wasm:1x1,wasm:2x1,cpu:1x1").split(",").map(parseLayout);
  const images = Number(arg("images", "512"));
  const tfjsImages = Number(arg("tfjs-images", "128"));
  const cpuImages = Number(arg("cpu-images", "8"));
  const runLimit = Number(arg("runs", "0"));
  const rows: Record<string, unknown>[] = [];
  const byKey = new Map<string, Measured>();
  for (const size of sizes) {
    for (const layout of layouts) {
      const n = layout.engine === "onnx" ? images : layout.backend === "cpu" ? cpuImages : tfjsImages;
      const r = await measure(layout, size, n);
      const row = { layout: layout.label, engine: layout.engine, backend: layout.engine === "onnx" ? "onnxruntime-cpu" : layout.backend, processes: layout.processes, threads: layout.threads, input_size: size, images_per_process: n, ...r };
      if (!("error" in r)) {
        byKey.set(`${layout.label}@${size}`, r);
        const gflop = MOBILENET_V2_GFLOP_224 * (size / 224) ** 2;
        Object.assign(row, { achieved_gflops: round(r.forward_images_per_second * gflop, 1) });
      }
      console.log(JSON.stringify(row));
      rows.push(row);
    }
  }
  const ratios: Record<string, unknown>[] = [];
  for (const size of sizes) {
    const onnx2 = byKey.get(`onnx:2x1@${size}`) ?? byKey.get(`onnx:1x2@${size}`), wasm2 = byKey.get(`wasm:2x1@${size}`);
    if (onnx2 && wasm2) ratios.push({ input_size: size, worker_path_onnx_vs_wasm_2_cores: round(onnx2.worker_path_images_per_second / wasm2.worker_path_images_per_second, 2), forward_onnx_vs_wasm_2_cores: round(onnx2.forward_images_per_second / wasm2.forward_images_per_second, 2) });
  }
  const runs: Record<string, unknown>[] = [];
  if (runLimit > 0) {
    for (const size of arg("run-sizes", "96,224").split(",").map(Number)) {
      for (const engine of ["onnx", "tfjs"] as EngineName[]) {
        const r = await wholeRun(engine, size, runLimit);
        console.log(JSON.stringify(r));
        runs.push(r);
      }
    }
  }
  const out = {
    bench: "extract", model: "mobilenet_v2", feature_layer: "out_relu", pooling: "avg", batch_size: 32, data: "fashion-mnist",
    flop_basis: `${MOBILENET_V2_GFLOP_224} GFLOP per image at 224 px (0.3 G multiply-adds), scaled by pixel count`,
    machine: { cores: availableParallelism(), cpu: cpus()[0]?.model }, date: new Date().toISOString(), results: rows, ratios, whole_runs: runs,
  };
  await mkdir("bench/results", { recursive: true });
  await writeFile("bench/results/extract.json", `${JSON.stringify(out, null, 2)}\n`);
  console.log("wrote bench/results/extract.json");
}

if (process.argv[2] === "--child") void child(JSON.parse(process.argv[3]) as ChildArgs).then(() => process.exit(0), (e: unknown) => { console.error(`${(e as Error).name}: ${(e as Error).message}`); process.exit(1); });
else void main();

/**
 * bench/head_placement: where method 1's head is faster -- in the coordinator or data-parallel on the
 * workers -- by rows, feature width and global batch, measured with whole `ctrain run` jobs (embedded
 * nats-server, local `ctrain worker` processes, synthetic images, the real MobileNetV2 base). Each
 * point runs the same job twice on one shared feature cache (only the first run extracts):
 * `--data-parallel off` (the head here) and `--data-parallel on` (the head on the workers), and
 * compares the head phase's seconds from the "head trained" log (what the user waits for: on the
 * workers that includes storing the feature blocks, starting the replicas and deleting the blocks).
 * Each result also carries coordinator/head_placement.ts's estimates, so the constants there can be
 * checked against the measured times. Writes bench/results/head_placement.json.
 *
 *   node dist/bench/head_placement.js [--rows 2000,12000] [--layers out_relu:avg,block_12_add:none] [--batch 32,256] [--epochs 2] [--workers 2] [--out FILE]
 */
import { mkdtemp, rm, writeFile, mkdir } from "node:fs/promises";
import { cpus, loadavg, tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { headOnWorkers, headSeconds, PLACEMENT_CONSTANTS } from "../coordinator/head_placement.js";
import { type LogLine, runCtrain } from "./ctrain_process.js";

const arg = (name: string, def: string): string => {
  const i = process.argv.indexOf(`--${name}`);
  return i >= 0 ? process.argv[i + 1]! : def;
};
const r = (x: number, d = 3): number => Number(x.toFixed(d));

interface Point {
  rows: number;
  layer: string;
  pooling: string;
  batch: number;
}

/** One `ctrain run` of the point; the head phase's seconds and the rows and width it trained on. */
async function runJob(p: Point, o: { epochs: number; workers: number; units: number; cache: string; out: string }, dataParallel: "on" | "off"): Promise<{ seconds: number; trainRows: number; featureDim: number; testAccuracy: number }> {
  const args = [
    "run", "--data", `synthetic:${p.rows}`, "--input-size", "96", "--feature-layer", p.layer, "--pooling", p.pooling, "--epochs", String(o.epochs),
    "--batch-size", String(p.batch), "--head-units", String(o.units), "--workers", String(o.workers), "--data-parallel", dataParallel,
    "--cache-dir", o.cache, "--out", o.out, "--log-format", "json", "--metrics-port", "-1", "--seed", "7", "--val-split", "0.1", "--test-split", "0.1",
  ];
  const { code, lines } = await runCtrain(args).done;
  const find = (msg: string): LogLine | undefined => lines.find((l) => l["msg"] === msg);
  const trained = find("head trained");
  if (code !== 0 || !trained) throw new Error(`ctrain run (${dataParallel}) ended with ${code}:\n${lines.slice(-8).map((l) => JSON.stringify(l)).join("\n")}`);
  const place = find("head placement");
  const stream = lines.find((l) => l["msg"] === "head phase on the workers");
  const summary = lines.find((l) => l["msg"] === "features ready" || l["msg"] === "extraction done");
  return {
    seconds: Number(trained["seconds"]), testAccuracy: Number(trained["test_accuracy"]),
    trainRows: Number(stream?.["rows"] ?? place?.["train_rows"] ?? summary?.["train"] ?? NaN), featureDim: Number(stream?.["feature_dim"] ?? NaN),
  };
}

async function main(): Promise<void> {
  const rows = arg("rows", "2000,12000").split(",").map(Number);
  const layers = arg("layers", "out_relu:avg,block_12_add:none").split(",").map((s) => s.split(":") as [string, string]);
  const batches = arg("batch", "32,256").split(",").map(Number);
  const epochs = Number(arg("epochs", "2"));
  const workers = Number(arg("workers", "2"));
  const units = Number(arg("head-units", "256"));
  const outFile = arg("out", fileURLToPath(new URL("../../bench/results/head_placement.json", import.meta.url)));
  const dir = await mkdtemp(join(tmpdir(), "ctrain-head-placement-"));
  const results: Record<string, unknown>[] = [];
  const t0 = performance.now();
  try {
    for (const [layer, pooling] of layers)
      for (const n of rows)
        for (const batch of batches) {
          const p = { rows: n, layer, pooling, batch };
          const o = { epochs, workers, units, cache: join(dir, "cache") };
          const here = await runJob(p, { ...o, out: join(dir, `off-${layer}-${n}-${batch}`) }, "off");
          const on = await runJob(p, { ...o, out: join(dir, `on-${layer}-${n}-${batch}`) }, "on");
          const job = { trainRows: on.trainRows, featureDim: on.featureDim, units, epochs, batchSize: batch, workers };
          const est = headSeconds(job);
          const auto = headOnWorkers({ dataParallel: "auto", method: "cached" }, job);
          const row = {
            images: n, layer, pooling, train_rows: job.trainRows, feature_dim: job.featureDim, batch, epochs, units, workers,
            seconds_here: r(here.seconds), seconds_on_workers: r(on.seconds), speedup_on_workers: r(here.seconds / on.seconds),
            test_accuracy_here: here.testAccuracy, test_accuracy_on_workers: on.testAccuracy,
            estimated_here: r(est.here), estimated_on_workers: r(est.workers), auto_picks: auto.workers ? "workers" : "here",
            measured_local_macs_per_s: Number(((job.trainRows * epochs * job.featureDim * units) / here.seconds).toPrecision(3)),
          };
          results.push(row);
          console.log(JSON.stringify(row));
          await rm(join(dir, `off-${layer}-${n}-${batch}`), { recursive: true, force: true });
          await rm(join(dir, `on-${layer}-${n}-${batch}`), { recursive: true, force: true });
        }
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
  const doc = {
    bench: "head_placement",
    method: "ctrain run --data synthetic:N --input-size 96, head phase seconds with --data-parallel off (coordinator) and on (workers); one feature cache per layer",
    machine: { cores: cpus().length, cpu: cpus()[0]?.model }, load_average: loadavg().map((x) => r(x, 2)), date: new Date().toISOString(),
    constants: PLACEMENT_CONSTANTS, total_seconds: r((performance.now() - t0) / 1000, 1), results,
  };
  await mkdir(join(outFile, ".."), { recursive: true });
  await writeFile(outFile, JSON.stringify(doc, null, 2) + "\n");
  console.log(`wrote ${outFile}`);
}

await main();

/**
 * bench/extract_distributed: distributed feature extraction through NATS, with 1 and then 2 worker
 * processes (`ctrain worker`, wasm) on this machine, and the coordinator's own cost per shard (CPU time,
 * bytes in and out), so the number of GPU workers one coordinator can feed can be projected.
 *
 * This process is the coordinator: it runs the NATS shard executor of `ctrain coordinator` (tasks,
 * notices, object fetch, decode, FeatureCache.putShard) against a private nats-server. The workers are
 * warmed up first (model loaded, one small round of shards), then the timed round extracts every sample
 * of `--limit`. Speed-up is the ratio of the two timed rounds of this one run. Writes
 * bench/results/extract_distributed.json.
 *
 *   node dist/bench/extract_distributed.js [--limit 2000] [--input-size 96] [--shard-size 64] [--workers 1,2]
 */
import { spawn, type ChildProcess } from "node:child_process";
import { mkdir, mkdtemp, rm, writeFile } from "node:fs/promises";
import { availableParallelism, cpus, tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { selectBackend } from "../core/models/backend.js";
import { resolveOptions } from "../core/runtime/config.js";
import { openDataset } from "../core/datasets/open.js";
import { buildFeatureExtractor } from "../core/models/feature_model.js";
import { FeatureCache } from "../core/datasets/feature_store.js";
import { createLogger } from "../core/runtime/log.js";
import { loadPretrained } from "../core/models/model_zoo.js";
import { connectNats, natsAuthEnv } from "../core/runtime/nats_connect.js";
import { startEmbeddedNats } from "../coordinator/embedded_nats.js";
import { NatsShardExecutor } from "../coordinator/nats_executor.js";
import { planShards } from "../coordinator/shard_planner.js";

const CLI = fileURLToPath(new URL("../cli/main.js", import.meta.url));

function arg(name: string, def: string): string {
  const i = process.argv.indexOf(`--${name}`);
  return i >= 0 ? process.argv[i + 1] : def;
}

const r = (x: number, d = 3): number => Number(x.toFixed(d));

async function main(): Promise<void> {
  const limit = Number(arg("limit", "2000"));
  const inputSize = Number(arg("input-size", "96"));
  const shardSize = Number(arg("shard-size", "64"));
  const workerCounts = arg("workers", "1,2").split(",").map(Number);
  await selectBackend("wasm");
  const log = createLogger({ job: "bench", format: "json", level: "warn" });
  const source = await loadPretrained("mobilenet_v2");
  const extractor = await buildFeatureExtractor(source, { inputSize, featureLayer: "out_relu", pooling: "avg" });
  const nats = await startEmbeddedNats();
  const tmp = await mkdtemp(join(tmpdir(), "ctrain-bench-dist-"));
  const runs: Record<string, unknown>[] = [];
  try {
    for (const n of workerCounts) {
      const job = `bench-dist-${n}`;
      const opts = resolveOptions({ job, data: "fashion-mnist", limit, inputSize, shardSize, backend: "wasm", workers: n, seed: 42 });
      const nc = await connectNats(nats.url, nats.credentials.coordinator, { name: "bench-coordinator" });
      const kids: ChildProcess[] = [];
      for (let i = 0; i < n; i++)
        kids.push(spawn(process.execPath, [CLI, "worker", "--nats", nats.url, "--job", job, "--worker-id", `${job}-w${i}`, "--backend", "wasm", "--metrics-port", "-1", "--log-format", "json"], { stdio: ["ignore", "ignore", "inherit"], env: { ...process.env, ...natsAuthEnv(nats.credentials.coordinator), CTRAIN_LOG_LEVEL: "warn" } }));
      try {
        // Warm-up round (another data set fingerprint, so another round): every worker loads the model.
        const warm = await openDataset("fashion-mnist", { seed: 43, valSplit: 0.1, testSplit: 0.1, limit: 8 * n, maxPixels: opts.maxPixels });
        await new NatsShardExecutor({ nc, opts: { ...opts, limit: 8 * n, seed: 43 }, log, sweepMs: 500 }, warm, extractor).run(planShards(warm.samples, 4), async () => undefined, () => undefined);

        const ds = await openDataset("fashion-mnist", { seed: 42, valSplit: 0.1, testSplit: 0.1, limit, maxPixels: opts.maxPixels });
        const shards = planShards(ds.samples, shardSize);
        const cache = new FeatureCache(join(tmp, job));
        const ex = new NatsShardExecutor({ nc, opts, log }, ds, extractor);
        const s0 = nc.stats();
        const cpu0 = process.cpuUsage();
        const t0 = performance.now();
        let stored = 0;
        await ex.run(shards, async (d) => {
          await cache.putShard("bench", d);
          stored += d.ids.length;
        }, () => undefined);
        const seconds = (performance.now() - t0) / 1000;
        const cpu = process.cpuUsage(cpu0);
        const s1 = nc.stats();
        const cpuSeconds = (cpu.user + cpu.system) / 1e6;
        const row = {
          workers: n, images: stored, shards: shards.length, seconds: r(seconds, 2), images_per_second: r(stored / seconds, 2),
          coordinator: {
            cpu_seconds: r(cpuSeconds), cpu_ms_per_shard: r((cpuSeconds * 1000) / shards.length, 2),
            bytes_in: s1.inBytes - s0.inBytes, bytes_out: s1.outBytes - s0.outBytes,
            bytes_in_per_shard: Math.round((s1.inBytes - s0.inBytes) / shards.length), bytes_out_per_shard: Math.round((s1.outBytes - s0.outBytes) / shards.length),
            feature_bytes_per_shard: Math.round(ex.stats.featureBytesIn / shards.length), task_bytes_per_shard: Math.round(ex.stats.taskBytesOut / shards.length),
            store_listings: ex.stats.storeListings,
          },
        };
        console.log(JSON.stringify(row));
        runs.push(row);
      } finally {
        for (const k of kids) k.kill("SIGTERM");
        await Promise.all(kids.map((k) => new Promise((res) => (k.exitCode !== null ? res(null) : k.once("exit", res)))));
        await nc.drain();
      }
    }
  } finally {
    await nats.stop();
    await rm(tmp, { recursive: true, force: true });
    extractor.dispose();
  }
  const ips = (n: number): number | undefined => (runs.find((x) => x.workers === n)?.images_per_second as number | undefined);
  const one = ips(1);
  const two = ips(2);
  const last = runs.at(-1) as { coordinator: { cpu_ms_per_shard: number; bytes_in_per_shard: number } } | undefined;
  const cpuMs = last?.coordinator.cpu_ms_per_shard ?? NaN;
  const result = {
    bench: "extract_distributed",
    model: "mobilenet_v2", feature_layer: "out_relu", pooling: "avg", input_size: inputSize, shard_size: shardSize, limit,
    backend: "wasm", transport: "embedded nats-server on 127.0.0.1, JetStream file store",
    machine: { cores: availableParallelism(), cpu: cpus()[0]?.model ?? "unknown" },
    note: "coordinator, nats-server and workers share the same cores here; coordinator CPU includes decode, checks and FeatureCache.putShard",
    date: new Date().toISOString(),
    runs,
    speedup_two_vs_one: one && two ? r(two / one, 2) : null,
    projection: {
      coordinator_cpu_ms_per_shard: cpuMs,
      max_shards_per_second_one_core: Number.isFinite(cpuMs) && cpuMs > 0 ? r(1000 / cpuMs, 1) : null,
      max_images_per_second_one_core: Number.isFinite(cpuMs) && cpuMs > 0 ? Math.round((1000 / cpuMs) * shardSize) : null,
      coordinator_ingress_bytes_per_image: last ? Math.round(last.coordinator.bytes_in_per_shard / shardSize) : null,
      how: "GPU workers at W images/s each: one coordinator core keeps up while N * W < max_images_per_second_one_core; ingress bandwidth = N * W * ingress_bytes_per_image",
    },
  };
  await mkdir(fileURLToPath(new URL("../../bench/results/", import.meta.url)), { recursive: true });
  const file = fileURLToPath(new URL("../../bench/results/extract_distributed.json", import.meta.url));
  await writeFile(file, JSON.stringify(result, null, 2) + "\n");
  console.log(JSON.stringify({ speedup_two_vs_one: result.speedup_two_vs_one, projection: result.projection }, null, 2));
  console.log(`wrote ${file}`);
}

main().catch((err: unknown) => {
  console.error(err);
  process.exit(1);
});

/**
 * core/runtime/metrics.ts over real HTTP: names, types, labels, counters that only go up, derived gauges,
 * health endpoints, file_sd targets. Every test uses its own Registry.
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import { mkdtemp, readFile, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { Registry } from "prom-client";
import { readdirSync, readFileSync, statSync } from "node:fs";
import { fileURLToPath } from "node:url";
import { SKIP_REASONS } from "../core/datasets/types.js";
import { DROP_REASONS, createMetrics, serveMetrics, writeScrapeTargets, type CtrainMetrics, type MetricsServer } from "../core/runtime/metrics.js";
import { parseExposition, seriesKey, type Exposition, type Sample } from "./helpers/prom_text.js";

const EXPECTED_TYPES: Record<string, string> = {
  ctrain_up: "gauge",
  ctrain_images_processed_total: "counter",
  ctrain_shards: "gauge",
  ctrain_extraction_images_per_second: "gauge",
  ctrain_step_duration_seconds: "histogram",
  ctrain_allreduce_duration_seconds: "histogram",
  ctrain_allreduce_bytes_total: "counter",
  ctrain_loss: "gauge",
  ctrain_accuracy: "gauge",
  ctrain_workers: "gauge",
  ctrain_epoch: "gauge",
  ctrain_step: "gauge",
  ctrain_progress_ratio: "gauge",
  ctrain_eta_seconds: "gauge",
  ctrain_last_progress_timestamp_seconds: "gauge",
  ctrain_skipped_inputs_total: "counter",
  ctrain_decode_errors_total: "counter",
  ctrain_dropped_messages_total: "counter",
  ctrain_backend_info: "gauge",
  ctrain_step_compute_seconds: "gauge",
  ctrain_step_wait_seconds: "gauge",
  ctrain_memory_bytes: "gauge",
};

async function withServer(
  labels: { job: string; worker?: string },
  fn: (m: CtrainMetrics, srv: MetricsServer, scrape: () => Promise<Exposition>) => Promise<void>,
  health?: { ready: () => boolean },
): Promise<void> {
  const registry = new Registry();
  const m = createMetrics(registry, labels);
  const srv = await serveMetrics(registry, 0, "127.0.0.1", health);
  const scrape = async (): Promise<Exposition> => {
    const res = await fetch(srv.url);
    assert.equal(res.status, 200);
    assert.equal(res.headers.get("content-type"), registry.contentType);
    return parseExposition(await res.text());
  };
  try {
    await fn(m, srv, scrape);
  } finally {
    await srv.close();
  }
}

function find(exp: Exposition, name: string, labels: Record<string, string>): Sample | undefined {
  return exp.samples.find((s) => s.name === name && Object.entries(labels).every(([k, v]) => s.labels[k] === v));
}

function simulate(m: CtrainMetrics, round: number): void {
  m.setBackend("wasm");
  m.countImages("extract", 32);
  m.setExtractionRate(80 + round);
  m.setShards({ pending: 10 - round, running: 2, done: round });
  m.observeStep("fine_tune", 0.2 + round * 0.01);
  m.observeAllreduce(0.05, 1_000_000, 1_000_000);
  m.setEvaluation("head", "train", { loss: 1 / (round + 1), accuracy: 0.5 + round / 100 });
  m.setEvaluation("head", "val", { loss: 1.2 / (round + 1), accuracy: 0.45 + round / 100 });
  m.setWorkers({ alive: 2, lost: round % 2 });
  m.setEpoch("head", round + 1, 10 * round + 1);
  m.progress("extract", 32 * (round + 1), 320);
  m.skippedInput(round % 2 ? "corrupt" : "empty");
  m.decodeError();
  m.droppedMessage("stale_epoch", 2);
}

test("metrics - /metrics exposes every ctrain family with its Prometheus type", async () => {
  await withServer({ job: "j1", worker: "w0" }, async (_m, _srv, scrape) => {
    const exp = await scrape();
    for (const [name, type] of Object.entries(EXPECTED_TYPES)) assert.equal(exp.types.get(name), type, `# TYPE of ${name}`);
    for (const name of exp.types.keys()) {
      if (name.startsWith("ctrain_")) assert.ok(name in EXPECTED_TYPES, `unexpected family ${name}: add it to the test`);
    }
  });
});

test("metrics - default process metrics are registered without a prefix", async () => {
  await withServer({ job: "j1", worker: "w0" }, async (_m, _srv, scrape) => {
    const exp = await scrape();
    assert.equal(exp.types.get("process_cpu_seconds_total"), "counter");
    assert.ok(exp.types.has("process_resident_memory_bytes") || exp.types.has("nodejs_heap_size_used_bytes"));
    assert.ok(exp.types.has("nodejs_eventloop_lag_p99_seconds"));
  });
});

test("metrics - samples carry job, worker, phase and state labels", async () => {
  await withServer({ job: "j1", worker: "w0" }, async (m, _srv, scrape) => {
    simulate(m, 1);
    const exp = await scrape();
    assert.equal(find(exp, "ctrain_up", { job: "j1", worker: "w0" })?.value, 1);
    assert.equal(find(exp, "ctrain_images_processed_total", { job: "j1", worker: "w0", phase: "extract" })?.value, 32);
    assert.equal(find(exp, "ctrain_extraction_images_per_second", { job: "j1", worker: "w0" })?.value, 81);
    for (const state of ["pending", "running", "done", "failed"]) assert.ok(find(exp, "ctrain_shards", { job: "j1", state }), `shards ${state}`);
    assert.equal(find(exp, "ctrain_shards", { job: "j1", state: "failed" })?.value, 0);
    assert.equal(find(exp, "ctrain_step_duration_seconds_count", { job: "j1", worker: "w0", phase: "fine_tune" })?.value, 1);
    assert.equal(find(exp, "ctrain_step_duration_seconds_bucket", { job: "j1", worker: "w0", phase: "fine_tune", le: "0.001" })?.value, 0);
    assert.equal(find(exp, "ctrain_step_duration_seconds_bucket", { job: "j1", worker: "w0", phase: "fine_tune", le: "60" })?.value, 1);
    assert.equal(find(exp, "ctrain_allreduce_bytes_total", { job: "j1", worker: "w0", direction: "sent" })?.value, 1_000_000);
    assert.equal(find(exp, "ctrain_allreduce_bytes_total", { job: "j1", worker: "w0", direction: "received" })?.value, 1_000_000);
    assert.equal(find(exp, "ctrain_loss", { job: "j1", phase: "head", split: "val" })?.value, 0.6);
    assert.equal(find(exp, "ctrain_accuracy", { job: "j1", phase: "head", split: "train" })?.value, 0.51);
    assert.equal(find(exp, "ctrain_workers", { job: "j1", state: "lost" })?.value, 1);
    assert.equal(find(exp, "ctrain_epoch", { job: "j1", phase: "head" })?.value, 2);
    assert.equal(find(exp, "ctrain_step", { job: "j1", phase: "head" })?.value, 11);
    assert.equal(find(exp, "ctrain_skipped_inputs_total", { job: "j1", reason: "corrupt" })?.value, 1);
    assert.equal(find(exp, "ctrain_decode_errors_total", { job: "j1", worker: "w0" })?.value, 1);
    assert.equal(find(exp, "ctrain_dropped_messages_total", { job: "j1", worker: "w0", reason: "stale_epoch" })?.value, 2);
    assert.equal(find(exp, "ctrain_backend_info", { job: "j1", worker: "w0", backend: "wasm" })?.value, 1);
  });
});

test("metrics - a process without a worker name is labelled coordinator", async () => {
  await withServer({ job: "j2" }, async (m, _srv, scrape) => {
    m.setBackend("cpu");
    const exp = await scrape();
    assert.equal(find(exp, "ctrain_up", { job: "j2", worker: "coordinator" })?.value, 1);
    assert.equal(find(exp, "ctrain_backend_info", { job: "j2", worker: "coordinator", backend: "cpu" })?.value, 1);
  });
});

test("metrics - counters and histogram counts only go up across updates", async () => {
  await withServer({ job: "j1", worker: "w0" }, async (m, _srv, scrape) => {
    let previous = new Map<string, number>();
    for (let round = 0; round < 5; round++) {
      simulate(m, round);
      const exp = await scrape();
      const monotonic = exp.samples.filter((s) => {
        const family = s.name.replace(/_(bucket|sum|count)$/, "");
        const type = exp.types.get(s.name) ?? exp.types.get(family);
        return s.name.startsWith("ctrain_") && (type === "counter" || type === "histogram");
      });
      assert.ok(monotonic.length >= 10, "counter and histogram series present");
      const current = new Map(monotonic.map((s) => [seriesKey(s), s.value]));
      for (const [key, before] of previous) {
        const after = current.get(key);
        assert.ok(after !== undefined, `series ${key} vanished`);
        assert.ok(after >= before, `${key} went down: ${before} -> ${after}`);
      }
      previous = current;
    }
    assert.equal(previous.get('ctrain_images_processed_total{job="j1",phase="extract",worker="w0"}'), 160);
  });
});

test("metrics - counters refuse negative increments", () => {
  const m = createMetrics(new Registry(), { job: "j1", worker: "w0" });
  assert.throws(() => m.countImages("extract", -1), RangeError);
  assert.throws(() => m.observeAllreduce(0.1, -5, 0), RangeError);
  assert.throws(() => m.droppedMessage("x", Number.NaN), RangeError);
});

test("metrics - progress ratio and ETA are computed at scrape time", async () => {
  await withServer({ job: "j1", worker: "w0" }, async (m, _srv, scrape) => {
    m.progress("fine_tune", 0, 100);
    let exp = await scrape();
    assert.equal(find(exp, "ctrain_progress_ratio", { job: "j1", phase: "fine_tune" })?.value, 0);
    assert.equal(find(exp, "ctrain_eta_seconds", { job: "j1", phase: "fine_tune" }), undefined, "no ETA before any progress");
    await new Promise((r) => setTimeout(r, 20));
    m.progress("fine_tune", 25, 100);
    exp = await scrape();
    assert.equal(find(exp, "ctrain_progress_ratio", { job: "j1", phase: "fine_tune" })?.value, 0.25);
    const eta = find(exp, "ctrain_eta_seconds", { job: "j1", phase: "fine_tune" })?.value;
    assert.ok(eta !== undefined && eta > 0 && eta < 60, `eta ${eta}`);
    m.progress("fine_tune", 100, 100);
    exp = await scrape();
    assert.equal(find(exp, "ctrain_progress_ratio", { job: "j1", phase: "fine_tune" })?.value, 1);
    assert.equal(find(exp, "ctrain_eta_seconds", { job: "j1", phase: "fine_tune" })?.value, 0);
  });
});

test("metrics - last progress timestamp is set at start and advances with progress", async () => {
  await withServer({ job: "j1", worker: "w0" }, async (m, _srv, scrape) => {
    const t0 = find(await scrape(), "ctrain_last_progress_timestamp_seconds", { job: "j1" })?.value;
    assert.ok(t0 !== undefined && Math.abs(t0 - Date.now() / 1000) < 60, "set at start, in Unix seconds");
    await new Promise((r) => setTimeout(r, 15));
    m.countImages("extract", 1);
    const t1 = find(await scrape(), "ctrain_last_progress_timestamp_seconds", { job: "j1" })?.value;
    assert.ok(t1 !== undefined && t1 > t0, `${t1} > ${t0}`);
  });
});

test("metrics - a NaN loss is exported as NaN", async () => {
  await withServer({ job: "j1" }, async (m, _srv, scrape) => {
    m.setEvaluation("fine_tune", "train", { loss: Number.NaN });
    assert.ok(Number.isNaN(find(await scrape(), "ctrain_loss", { job: "j1", phase: "fine_tune", split: "train" })?.value));
  });
});

test("metrics - setBackend replaces the backend info series", async () => {
  await withServer({ job: "j1", worker: "w0" }, async (m, _srv, scrape) => {
    m.setBackend("tensorflow");
    m.setBackend("wasm");
    const info = (await scrape()).samples.filter((s) => s.name === "ctrain_backend_info");
    assert.deepEqual(info.map((s) => s.labels.backend), ["wasm"]);
  });
});

test("metrics - startStep times a step into the histogram", async () => {
  await withServer({ job: "j1", worker: "w0" }, async (m, _srv, scrape) => {
    const done = m.startStep("head");
    await new Promise((r) => setTimeout(r, 10));
    const seconds = done();
    assert.ok(seconds >= 0.005 && seconds < 5);
    const exp = await scrape();
    assert.equal(find(exp, "ctrain_step_duration_seconds_count", { phase: "head" })?.value, 1);
  });
});

test("metrics - registries are isolated: two processes' metrics in one test do not clash", async () => {
  const a = createMetrics(new Registry(), { job: "ja", worker: "w0" });
  const b = createMetrics(new Registry(), { job: "jb", worker: "w1" });
  a.countImages("extract", 3);
  b.countImages("extract", 5);
  const ta = parseExposition(await a.registry.metrics());
  const tb = parseExposition(await b.registry.metrics());
  assert.equal(find(ta, "ctrain_images_processed_total", { phase: "extract" })?.value, 3);
  assert.equal(find(tb, "ctrain_images_processed_total", { phase: "extract" })?.value, 5);
  assert.equal(find(ta, "ctrain_images_processed_total", { job: "jb" }), undefined);
  assert.throws(() => createMetrics(a.registry, { job: "ja" }), /already been registered/);
});

test("metrics - /healthz answers ok and /readyz follows ready()", async () => {
  let ready = false;
  await withServer(
    { job: "j1", worker: "w0" },
    async (_m, srv) => {
      const base = `http://127.0.0.1:${srv.port}`;
      const health = await fetch(`${base}/healthz`);
      assert.equal(health.status, 200);
      assert.equal((await health.text()).trim(), "ok");
      assert.equal((await fetch(`${base}/readyz`)).status, 503);
      ready = true;
      assert.equal((await fetch(`${base}/readyz`)).status, 200);
      assert.equal((await fetch(`${base}/nothing`)).status, 404);
      assert.equal((await fetch(`${base}/metrics`, { method: "POST" })).status, 405);
    },
    { ready: () => ready },
  );
});

test("metrics - /readyz is 200 without a health check, and port 0 reports the real port", async () => {
  await withServer({ job: "j1" }, async (_m, srv) => {
    assert.ok(srv.port > 0);
    assert.equal(srv.url, `http://127.0.0.1:${srv.port}/metrics`);
    assert.equal((await fetch(`http://127.0.0.1:${srv.port}/readyz`)).status, 200);
  });
});

test("metrics - close() frees the port even with a keep-alive connection open", async () => {
  const registry = new Registry();
  createMetrics(registry, { job: "j1" });
  const srv = await serveMetrics(registry, 0, "127.0.0.1");
  await (await fetch(srv.url, { headers: { connection: "keep-alive" } })).text();
  await srv.close();
  const again = await serveMetrics(registry, srv.port, "127.0.0.1");
  assert.equal(again.port, srv.port);
  await again.close();
});

test("metrics - serveMetrics rejects a port that is taken", async () => {
  const registry = new Registry();
  const first = await serveMetrics(registry, 0, "127.0.0.1");
  try {
    await assert.rejects(serveMetrics(registry, first.port, "127.0.0.1"), /EADDRINUSE/);
  } finally {
    await first.close();
  }
});

test("metrics - writeScrapeTargets writes file_sd groups with job and worker labels", async () => {
  const dir = await mkdtemp(join(tmpdir(), "ctrain-targets-"));
  try {
    const file = join(dir, "ctrain-targets.json");
    await writeScrapeTargets(file, [
      { address: "127.0.0.1:4001", job: "j1", worker: "coordinator" },
      { address: "127.0.0.1:4002", job: "j1", worker: "w0" },
    ]);
    const groups = JSON.parse(await readFile(file, "utf8")) as unknown;
    assert.deepEqual(groups, [
      { targets: ["127.0.0.1:4001"], labels: { job: "j1", worker: "coordinator" } },
      { targets: ["127.0.0.1:4002"], labels: { job: "j1", worker: "w0" } },
    ]);
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
});

test("metrics - the error counters the dashboard and alerts query exist at 0 from process start", async () => {
  await withServer({ job: "zero", worker: "w0" }, async (_m, _srv, scrape) => {
    const exp = await scrape();
    assert.equal(find(exp, "ctrain_decode_errors_total", { job: "zero", worker: "w0" })?.value, 0);
    for (const reason of DROP_REASONS) assert.equal(find(exp, "ctrain_dropped_messages_total", { job: "zero", worker: "w0", reason })?.value, 0, `dropped ${reason}`);
    for (const reason of Object.values(SKIP_REASONS)) assert.equal(find(exp, "ctrain_skipped_inputs_total", { job: "zero", reason })?.value, 0, `skipped ${reason}`);
  });
});

test("metrics - every reason a message is dropped for in the source is one DROP_REASONS starts at 0", () => {
  const root = fileURLToPath(new URL("../../", import.meta.url));
  const found = new Set<string>();
  const walk = (dir: string): void => {
    for (const name of readdirSync(dir)) {
      const p = join(dir, name);
      if (statSync(p).isDirectory()) walk(p);
      else if (name.endsWith(".ts")) {
        const text = readFileSync(p, "utf8");
        // droppedMessage("x"), drop("x"), DecodeError(type, "x", ...), ShardRejected("x", ...), and `: "x"` fallbacks of a reason.
        for (const m of text.matchAll(/(?:droppedMessage|drop|ShardRejected)\("([a-z_]+)"|DecodeError\([^,()]+, "([a-z_]+)"|err\.reason : "([a-z_]+)"/g)) found.add(m[1] ?? m[2] ?? m[3]);
      }
    }
  };
  for (const d of ["proto", "core", "coordinator", "worker"]) walk(join(root, d));
  assert.ok(found.size >= 10, `scan found only ${[...found].join(", ")}`);
  const missing = [...found].filter((r) => !(DROP_REASONS as readonly string[]).includes(r));
  assert.deepEqual(missing, [], "reasons dropped in the source but not zero-initialised in core/runtime/metrics.ts DROP_REASONS");
});

test("metrics - step compute and wait seconds are per replica, start at 0 and go when the replica leaves", async () => {
  await withServer({ job: "strag" }, async (m, _srv, scrape) => {
    m.setStepTiming("w0", 0, 0);
    m.setStepTiming("w1", 0, 0);
    let exp = await scrape();
    assert.equal(find(exp, "ctrain_step_compute_seconds", { job: "strag", worker: "w1" })?.value, 0);
    m.setStepTiming("w1", 0.75, 0.125);
    exp = await scrape();
    assert.equal(find(exp, "ctrain_step_compute_seconds", { job: "strag", worker: "w1" })?.value, 0.75);
    assert.equal(find(exp, "ctrain_step_wait_seconds", { job: "strag", worker: "w1" })?.value, 0.125);
    assert.equal(find(exp, "ctrain_step_compute_seconds", { job: "strag", worker: "coordinator" }), undefined, "labelled by replica, not by the process");
    m.removeStepTiming("w1");
    exp = await scrape();
    assert.equal(find(exp, "ctrain_step_compute_seconds", { job: "strag", worker: "w1" }), undefined);
    assert.equal(find(exp, "ctrain_step_compute_seconds", { job: "strag", worker: "w0" })?.value, 0);
    assert.throws(() => m.setStepTiming("w0", -1, 0), RangeError);
  });
});

/**
 * bench/scale: memory stays flat and time grows linearly in N. Writes bench/results/scale.json.
 * This measures speed and memory, not model quality (synthetic images: core/datasets/synthetic.ts).
 *
 * Two parts:
 * - `run`: `ctrain run --data synthetic:N --feature-layer block_12_add --pooling none --fine-tune-layers 0`
 *   as a user runs it, for each N: images/s per phase (from summary.json), the peak RSS (VmHWM,
 *   sampled from /proc every 0.5 s) of every process of the job -- the coordinator, each worker, the
 *   nats-server -- and the feature cache's size on disk.
 * - `head`: the part whose memory used to grow with N x featureDim, at sizes whose extraction would
 *   take hours on a shared 2-core machine: a feature cache of N rows of block_12_add's 3456 floats is
 *   written shard by shard (seeded rows with a class signal, as workers would store them), committed,
 *   loaded and the head trained on it, streamed, in a child process whose VmHWM is recorded.
 *
 *   node dist/bench/scale.js [--run 10000,30000] [--head 100000,300000,1000000] [--workers 2] [--epochs 1] [--append] [--note TEXT]
 *   (--append adds the points to an existing bench/results/scale.json instead of starting it afresh;
 *   --note labels the new points, e.g. with the commit they measure, so they read apart from the old ones;
 *   --out writes another file than bench/results/scale.json, e.g. for a second point measured alongside)
 *   (the points: --run 100000,300000[,1000000]; about 15-20 min per 10^6 images with onnxruntime
 *   on an idle 2-core machine)
 */
import { spawn } from "node:child_process";
import { readdirSync, readFileSync, statSync } from "node:fs";
import { mkdir, readFile, rm, writeFile } from "node:fs/promises";
import { availableParallelism, cpus, loadavg, totalmem, uptime } from "node:os";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

function arg(name: string, def: string): string {
  const i = process.argv.indexOf(`--${name}`);
  return i >= 0 ? process.argv[i + 1] : def;
}
const list = (s: string): number[] => (s.trim() === "" ? [] : s.split(",").map(Number));
const MiB = 2 ** 20;

/** Every process under `root` (its children, their children...), from /proc. */
function tree(root: number): { pid: number; name: string; cmd: string }[] {
  const children = new Map<number, number[]>();
  for (const d of readdirSync("/proc")) {
    if (!/^\d+$/.test(d)) continue;
    try {
      const stat = readFileSync(`/proc/${d}/stat`, "utf8");
      const ppid = Number(stat.slice(stat.lastIndexOf(")") + 2).split(" ")[1]);
      (children.get(ppid) ?? children.set(ppid, []).get(ppid)!).push(Number(d));
    } catch { /* gone */ }
  }
  const out: { pid: number; name: string; cmd: string }[] = [];
  const walk = (p: number): void => {
    try {
      const cmd = readFileSync(`/proc/${p}/cmdline`, "utf8").split("\0").join(" ").trim();
      out.push({ pid: p, name: readFileSync(`/proc/${p}/comm`, "utf8").trim(), cmd });
    } catch { return; }
    for (const c of children.get(p) ?? []) walk(c);
  };
  walk(root);
  return out;
}

function vmHwm(pid: number): number | undefined {
  try {
    const m = /VmHWM:\s+(\d+) kB/.exec(readFileSync(`/proc/${pid}/status`, "utf8"));
    return m ? Number(m[1]) * 1024 : undefined;
  } catch {
    return undefined;
  }
}

function role(p: { pid: number; name: string; cmd: string }, root: number): string {
  if (p.pid === root) return "coordinator";
  if (p.name.startsWith("nats-server")) return "nats-server";
  if (/\bworker\b/.test(p.cmd)) return "worker";
  return p.name;
}

/** Runs a command and samples the peak RSS of each process it starts until it exits. */
async function measured(args: string[]): Promise<{ code: number; seconds: number; peaks: Record<string, number> }> {
  const t0 = performance.now();
  const child = spawn(process.execPath, args, { stdio: ["ignore", "ignore", "inherit"] });
  const peaks = new Map<number, { role: string; bytes: number }>();
  const sample = (): void => {
    for (const p of tree(child.pid!)) {
      const b = vmHwm(p.pid);
      if (b !== undefined) peaks.set(p.pid, { role: role(p, child.pid!), bytes: Math.max(b, peaks.get(p.pid)?.bytes ?? 0) });
    }
  };
  const timer = setInterval(sample, 500);
  const code = await new Promise<number>((resolve) => child.on("exit", (c) => { sample(); resolve(c ?? 1); }));
  clearInterval(timer);
  const out: Record<string, number> = {};
  const counts = new Map<string, number>();
  for (const { role: r, bytes } of peaks.values()) {
    const i = counts.get(r) ?? 0;
    counts.set(r, i + 1);
    out[r === "worker" ? `worker_${i}` : i ? `${r}_${i}` : r] = Math.round(bytes / MiB);
  }
  return { code, seconds: (performance.now() - t0) / 1000, peaks: out };
}

function du(dir: string): number {
  let n = 0;
  for (const e of readdirSync(dir, { withFileTypes: true })) n += e.isDirectory() ? du(join(dir, e.name)) : statSync(join(dir, e.name)).size;
  return n;
}

const cli = fileURLToPath(new URL("../cli/main.js", import.meta.url));

async function runPoint(n: number, workers: string, epochs: string): Promise<Record<string, unknown>> {
  // Per bench process: two benches measuring the same N side by side must not remove each other's cache.
  const out = join("runs", `bench-scale-${n}-${process.pid}`);
  const cache = join("runs", `bench-scale-cache-${n}-${process.pid}`);
  await rm(cache, { recursive: true, force: true });
  const load = { before: loadavg()[0] };
  const r = await measured([cli, "run", "--data", `synthetic:${n}`, "--feature-layer", "block_12_add", "--pooling", "none", "--input-size", "96",
    "--fine-tune-layers", "0", "--epochs", epochs, "--workers", workers, "--cache-dir", cache, "--out", out, "--job", `bench-scale-${n}`,
    "--metrics-port", "-1", "--log-format", "json"]);
  if (r.code !== 0) throw new Error(`ctrain run exited ${r.code} at N=${n}`);
  const s = JSON.parse(await readFile(join(out, "summary.json"), "utf8")) as {
    samples: { train: number; val: number; test: number }; workers: number;
    extraction: { images: number; seconds: number; images_per_second: number };
    phases: { head: { epochs: number; seconds: number; test_accuracy: number } };
  };
  const headRows = s.samples.train * s.phases.head.epochs + (s.samples.val * s.phases.head.epochs) + s.samples.test;
  const row = {
    n, workers: s.workers, samples: s.samples,
    phases: {
      extract: { seconds: s.extraction.seconds, images_per_second: s.extraction.images_per_second },
      head: { seconds: s.phases.head.seconds, epochs: s.phases.head.epochs, rows_per_second: Math.round(headRows / s.phases.head.seconds), test_accuracy: s.phases.head.test_accuracy },
    },
    wall_seconds: Number(r.seconds.toFixed(1)),
    peak_rss_mib: r.peaks,
    feature_cache_mib: Math.round(du(cache) / MiB),
    loadavg_1m: { ...load, after: loadavg()[0] },
  };
  await rm(cache, { recursive: true, force: true });
  return row;
}

async function headPoint(n: number, epochs: string): Promise<Record<string, unknown>> {
  const dir = join("runs", `bench-scale-head-${n}-${process.pid}`);
  await rm(dir, { recursive: true, force: true });
  const load = loadavg()[0];
  const r = await measured([fileURLToPath(new URL("./scale_head_child.js", import.meta.url)), dir, String(n), epochs]);
  if (r.code !== 0) throw new Error(`head child exited ${r.code} at N=${n}`);
  const phases = JSON.parse(await readFile(join(dir, "phases.json"), "utf8")) as Record<string, unknown>;
  const row = { n, feature_dim: 3456, ...phases, peak_rss_mib: r.peaks, loadavg_1m: { before: load, after: loadavg()[0] } };
  await rm(dir, { recursive: true, force: true });
  return row;
}

async function main(): Promise<void> {
  const runs = list(arg("run", "10000,30000"));
  const heads = list(arg("head", "100000,300000"));
  const workers = arg("workers", "2");
  const epochs = arg("epochs", "1");
  const note = arg("note", "");
  const file = arg("out", "bench/results/scale.json");
  const result: Record<string, unknown> = {
    bench: "scale", note: "synthetic images: measures speed and memory, not model quality", feature_layer: "block_12_add", pooling: "none", input_size: 96,
    machine: { cores: availableParallelism(), cpu: cpus()[0]?.model, memory_mib: Math.round(totalmem() / MiB), uptime_seconds: uptime(), loadavg_at_start: loadavg() },
    date: new Date().toISOString(), run: [] as unknown[], head: [] as unknown[],
  };
  if (process.argv.includes("--append")) {
    const old = JSON.parse(await readFile(file, "utf8").catch(() => readFile("bench/results/scale.json", "utf8"))) as Record<string, unknown>;
    result.run = old.run;
    result.head = old.head;
    result.earlier = { date: old.date, machine: old.machine };
  }
  const save = async (): Promise<void> => {
    await mkdir(dirname(file), { recursive: true });
    await writeFile(file, `${JSON.stringify(result, null, 2)}\n`);
  };
  for (const n of heads) {
    const row = { ...(await headPoint(n, epochs)), ...(note ? { note } : {}) };
    console.log(JSON.stringify(row));
    (result.head as unknown[]).push(row);
    await save();
  }
  for (const n of runs) {
    const row = { ...(await runPoint(n, workers, epochs)), ...(note ? { note } : {}) };
    console.log(JSON.stringify(row));
    (result.run as unknown[]).push(row);
    await save();
  }
  result.loadavg_at_end = loadavg();
  await save();
  console.log(`wrote ${file}`);
}

void main().catch((e: unknown) => { console.error(e); process.exit(1); });

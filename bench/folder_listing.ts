/**
 * bench/folder_listing: memory and time of listing a big class-per-folder data set, as the coordinator
 * does (openDataset, then planShards into 256-sample shards) and as a worker does (openDataset and a
 * first readRgb, which builds the check of a message's ids).
 * Writes bench/results/folder_listing.json.
 *
 * For each N, <root>/<N>/class_XX/dNNNN/img_NNNNNNN.png (1000 files a sub-folder, a few bytes each: listing
 * only stats them) is created once and reused while <root>/<N>/.complete matches. Each (N, mode) is
 * measured in a child process of its own (its VmHWM, sampled every 200 ms and read by the child at the
 * end, is that point's alone); bytes/file = (peak RSS - the same mode's peak on a 1000-file folder) / N.
 * The listing runs on a warm page cache (the files were just created or listed).
 *
 *   node dist/bench/folder_listing.js [--files 100000,300000] [--classes 10] [--root /work/flbench-data]
 *     [--modes coordinator,worker] [--out bench/results/folder_listing.json] [--note TEXT] [--append]
 *   (child: node dist/bench/folder_listing.js --child <dir> --mode coordinator|worker)
 */
import { spawn } from "node:child_process";
import { existsSync, mkdirSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { availableParallelism, cpus, loadavg, totalmem, uptime } from "node:os";
import { dirname, join } from "node:path";

function arg(name: string, def: string): string {
  const i = process.argv.indexOf(`--${name}`);
  return i >= 0 ? process.argv[i + 1] : def;
}
const MiB = 2 ** 20;
const MODES = ["coordinator", "worker"] as const;
type Mode = (typeof MODES)[number];
const BASELINE_FILES = 1000;

function checkMode(m: string): Mode {
  if (!(MODES as readonly string[]).includes(m)) throw new Error(`unknown mode ${JSON.stringify(m)}: expected ${MODES.join(" or ")}`);
  return m as Mode;
}

/** Peak RSS (VmHWM) of a process, MiB; undefined once it is gone. */
function vmHwmMiB(pid: number | "self"): number | undefined {
  try {
    const m = /VmHWM:\s+(\d+) kB/.exec(readFileSync(`/proc/${pid}/status`, "utf8"));
    return m ? Number(m[1]) / 1024 : undefined;
  } catch {
    return undefined;
  }
}
const r1 = (x: number): number => Math.round(x * 10) / 10;
const s2 = (ms: number): number => Number((ms / 1000).toFixed(2));

async function child(dir: string, mode: Mode): Promise<void> {
  const { openDataset } = await import("../core/datasets/open.js");
  const { planShards } = await import("../coordinator/shard_planner.js");
  const t0 = performance.now();
  const ds = await openDataset(dir, { seed: 42, valSplit: 0.1, testSplit: 0.1, limit: 0, maxPixels: 1e8 });
  const t1 = performance.now();
  const peakAfterList = vmHwmMiB("self");
  const shards = mode === "coordinator" ? planShards(ds.samples, 256) : undefined;
  // A worker reads images: its first read builds what checks a message's ids (the bench's files are not
  // images, so the read itself is refused).
  if (mode === "worker") await ds.readRgb(ds.samples.get(0), 8).catch(() => undefined);
  const t2 = performance.now();
  const mem = process.memoryUsage();
  console.log(JSON.stringify({
    list_seconds: s2(t1 - t0), plan_seconds: shards ? s2(t2 - t1) : null,
    samples: ds.samples.length, skipped: ds.skipped.length, shards: shards?.length ?? null,
    rss_mib_after: r1(mem.rss / MiB), heap_used_mib: r1(mem.heapUsed / MiB),
    peak_rss_mib_after_list: r1(peakAfterList ?? NaN), peak_rss_mib: r1(vmHwmMiB("self") ?? NaN),
  }));
}

/** Creates <root>/<n> unless its marker says it holds this layout already; returns the seconds spent, or null if reused. */
function ensureData(dir: string, n: number, classes: number): number | null {
  const marker = join(dir, ".complete");
  const want = JSON.stringify({ files: n, classes, per_subfolder: 1000 });
  if (existsSync(marker) && readFileSync(marker, "utf8") === want) return null;
  const t0 = performance.now();
  rmSync(dir, { recursive: true, force: true });
  let index = 0;
  for (let c = 0; c < classes; c++) {
    const count = Math.floor(n / classes) + (c < n % classes ? 1 : 0);
    const classDir = join(dir, `class_${String(c).padStart(2, "0")}`);
    for (let j = 0; j < count; j++, index++) {
      const sub = join(classDir, `d${String(Math.floor(j / 1000)).padStart(4, "0")}`);
      if (j % 1000 === 0) mkdirSync(sub, { recursive: true });
      writeFileSync(join(sub, `img_${String(index).padStart(7, "0")}.png`), `png ${index}\n`);
    }
  }
  writeFileSync(marker, want);
  return r1((performance.now() - t0) / 1000);
}

/** Runs one child, sampling its VmHWM every 200 ms; returns its JSON line plus the peak seen. */
async function measure(dir: string, mode: Mode): Promise<Record<string, unknown> & { peak_rss_mib: number }> {
  const p = spawn(process.execPath, [process.argv[1], "--child", dir, "--mode", mode], { stdio: ["ignore", "pipe", "inherit"] });
  let sampled = 0, out = "";
  const timer = setInterval(() => { sampled = Math.max(sampled, vmHwmMiB(p.pid!) ?? 0); }, 200);
  p.stdout.on("data", (d: Buffer) => (out += d.toString()));
  const t0 = performance.now();
  const code = await new Promise<number | null>((res) => p.on("close", res));
  clearInterval(timer);
  if (code !== 0) throw new Error(`child ${mode} on ${dir} exited with ${code}`);
  const r = JSON.parse(out.trim().split("\n").pop()!) as Record<string, unknown> & { peak_rss_mib: number };
  return { ...r, child_seconds: r1((performance.now() - t0) / 1000), peak_rss_mib_sampled: r1(sampled), peak_rss_mib: r1(Math.max(sampled, r.peak_rss_mib)) };
}

async function main(): Promise<void> {
  const files = arg("files", "100000,300000").split(",").map(Number);
  for (const n of files) if (!(Number.isInteger(n) && n > 0)) throw new Error(`--files: ${n} is not a positive whole number`);
  const classes = Number(arg("classes", "10"));
  if (!(Number.isInteger(classes) && classes >= 2)) throw new Error(`--classes must be a whole number >= 2`);
  const root = arg("root", "/work/flbench-data");
  const modes = arg("modes", MODES.join(",")).split(",").map(checkMode);
  const out = arg("out", "bench/results/folder_listing.json");
  const note = arg("note", "");
  const old = process.argv.includes("--append") && existsSync(out) ? (JSON.parse(readFileSync(out, "utf8")) as { points: unknown[] }) : undefined;
  const result = {
    bench: "folder_listing", date: new Date().toISOString(), command: process.argv.slice(2).join(" "), node: process.version,
    machine: { cores: availableParallelism(), cpu: cpus()[0]?.model, memory_mib: Math.round(totalmem() / MiB), uptime_seconds: uptime(), loadavg_at_start: loadavg() },
    points: [...(old?.points ?? [])] as unknown[], loadavg_at_end: [] as number[],
  };
  const save = (): void => { mkdirSync(dirname(out), { recursive: true }); writeFileSync(out, JSON.stringify(result, null, 2) + "\n"); };

  const baseDir = join(root, String(BASELINE_FILES));
  ensureData(baseDir, BASELINE_FILES, classes);
  const baseline = new Map<Mode, number>();
  for (const m of modes) baseline.set(m, (await measure(baseDir, m)).peak_rss_mib);
  console.error(`baseline (${BASELINE_FILES} files) peak RSS MiB: ${JSON.stringify(Object.fromEntries(baseline))}`);
  for (const n of files) {
    const dir = join(root, String(n));
    const creation = ensureData(dir, n, classes);
    console.error(`${n} files: ${creation === null ? "reused" : `created in ${creation} s`}`);
    for (const m of modes) {
      const load = loadavg()[0];
      const r = await measure(dir, m);
      const point = {
        note, date: new Date().toISOString(), files: n, classes, mode: m, ...r,
        baseline_peak_rss_mib: baseline.get(m), bytes_per_file: Math.round(((r.peak_rss_mib - baseline.get(m)!) * MiB) / n),
        creation_seconds: creation, loadavg_1m: { before: load, after: loadavg()[0] },
      };
      console.error(JSON.stringify(point));
      result.points.push(point);
      save();
    }
  }
  result.loadavg_at_end = loadavg();
  save();
}

const childDir = arg("child", "");
void (childDir ? child(childDir, checkMode(arg("mode", ""))) : main()).catch((e: unknown) => { console.error(e); process.exit(1); });

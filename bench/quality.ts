/**
 * bench/quality: the README's results table. For each data set, model and method -- method 1 (head on
 * cached features), method 2 (frozen base + head with augmentation), fine-tuning -- one `ctrain run`,
 * next to `ctrain baseline` (raw-pixel logistic regression and MLP) at the same --limit and --seed, so
 * every row of a data set and limit is on the same splits. Everything goes through the CLI as a user
 * runs it, with the option table's defaults unless a flag below says otherwise.
 *
 * Rows are merged into bench/results/quality.json by (data, limit, model, method): the table can be
 * built in pieces (the full data set for method 1 one day, a --limit for the expensive methods another).
 * Each row keeps the exact command and the load average around it (the machine is shared).
 *
 *   node dist/bench/quality.js [--data fashion-mnist|tinted] [--methods baseline,cached,augment,fine-tune]
 *     [--models mobilenet_v2,inception_v3] [--limit 0] [--augment-limit 3000] [--fine-tune-limit 3000]
 *     [--fine-tune-layers 18] [--fine-tune-epochs 5] [--fine-tune-learning-rate 1e-4] [--per-class 1500]
 *     [--epochs 20] [--lr-schedule cosine] [--feature-layer mobilenet_v2=block_12_add,inception_v3=auto]
 *     [--baseline-models logistic,mlp] [--tag NAME (variants: method "cached NAME", "fine-tune NAME"...)] [--run-args "--pooling none ..." (more flags for every run)]
 *     [--workers 1] [--cache-dir .ctrain-cache] [--dry-run] [--table (print the table of quality.json, run nothing)]
 *
 * --epochs and --lr-schedule go to every command, baselines included, so the pixels and the features
 * are trained alike; --feature-layer goes to the runs (block_12_add, as npm start).
 */
import { spawn } from "node:child_process";
import { existsSync } from "node:fs";
import { mkdir, readFile, writeFile } from "node:fs/promises";
import { availableParallelism, cpus, loadavg } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { writeTintedFolder } from "../test/helpers/tinted_folder.js";

function arg(name: string, def: string): string {
  const i = process.argv.indexOf(`--${name}`);
  return i >= 0 ? process.argv[i + 1] : def;
}

const RESULTS = "bench/results/quality.json";
const BIN = fileURLToPath(new URL("../cli/main.js", import.meta.url));

interface Row {
  data: string;
  limit: number;
  model: string;
  method: string;
  samples: { train: number; val: number; test: number };
  test_accuracy: number;
  val_accuracy: number;
  epochs: string;
  /** Seconds of the phase that gave the row (training; extraction is in `wall_seconds`). */
  seconds: number;
  wall_seconds: number;
  /** Options that shaped the row beyond the command's defaults (feature layer, fine-tune recipe...). */
  detail: string;
  command: string;
  load_average: { before: number[]; after: number[] };
  date: string;
}

interface RunResult { code: number; wall: number; load: { before: number[]; after: number[] } }

async function ctrain(args: string[]): Promise<RunResult> {
  const before = loadavg().map((x) => Number(x.toFixed(2)));
  const t0 = performance.now();
  console.error(`$ ctrain ${args.join(" ")}`);
  const child = spawn(process.execPath, [BIN, ...args], { stdio: ["ignore", "inherit", "inherit"] });
  const code = await new Promise<number>((resolve) => child.on("close", (c) => resolve(c ?? 1)));
  return { code, wall: (performance.now() - t0) / 1000, load: { before, after: loadavg().map((x) => Number(x.toFixed(2))) } };
}

const readJson = async <T>(file: string): Promise<T> => JSON.parse(await readFile(file, "utf8")) as T;

interface RunSummary {
  samples: { train: number; val: number; test: number };
  feature_layer: string;
  pooling: string;
  fine_tune?: { unfreeze: string; first_unfrozen: string };
  phases: Record<string, { epochs: number; epochs_asked: number; val_accuracy: number; test_accuracy: number; seconds: number }>;
  options: Record<string, unknown>;
}
interface BaselineSummary {
  samples: { train: number; val: number; test: number };
  pixel_size: number;
  channels: number;
  baselines: Record<string, { epochs: number; epochs_asked: number; val_accuracy: number; test_accuracy: number; seconds: number; params: number }>;
}

const epochsOf = (p: { epochs: number; epochs_asked: number }): string => `${p.epochs}/${p.epochs_asked}`;

async function baselineRows(data: string, dataArg: string, limit: number, models: string, common: string[]): Promise<Row[]> {
  const out = join("runs", `bench-quality-baseline-${data}-${limit}-${models.replace(/,/g, "-")}`);
  const args = ["baseline", "--data", dataArg, "--limit", String(limit), "--models", models, "--out", out, ...common];
  const r = await ctrain(args);
  if (r.code !== 0) throw new Error(`ctrain baseline exited ${r.code}`);
  const s = await readJson<BaselineSummary>(join(out, "summary.json"));
  return Object.entries(s.baselines).map(([kind, p]) => ({
    data, limit, model: "raw pixels", method: `baseline ${kind}`, samples: s.samples, test_accuracy: p.test_accuracy, val_accuracy: p.val_accuracy,
    epochs: epochsOf(p), seconds: p.seconds, wall_seconds: Number(r.wall.toFixed(1)), detail: `${s.pixel_size}x${s.pixel_size}x${s.channels} pixels, ${p.params} params`,
    command: `ctrain ${args.join(" ")}`, load_average: r.load, date: new Date().toISOString(),
  }));
}

async function runRows(data: string, dataArg: string, model: string, method: string, limit: number, extra: string[], common: string[], tag = ""): Promise<Row[]> {
  const slug = `${data}-${model}-${method}-${limit}${tag ? `-${tag}` : ""}`.replace(/[^a-zA-Z0-9-]/g, "-");
  const out = join("runs", `bench-quality-${slug}`);
  const args = ["run", "--data", dataArg, "--model", model, "--limit", String(limit), ...extra, "--out", out, "--job", `bq-${slug}`.slice(0, 63), "--metrics-port", "-1", ...common];
  const r = await ctrain(args);
  if (r.code !== 0) throw new Error(`ctrain run exited ${r.code} (${tag})`);
  const s = await readJson<RunSummary>(join(out, "summary.json"));
  const base = { data, limit, model, samples: s.samples, wall_seconds: Number(r.wall.toFixed(1)), command: `ctrain ${args.join(" ")}`, load_average: r.load, date: new Date().toISOString() };
  const layer = `${s.feature_layer}, ${s.pooling} pooling${extra.includes("--learning-rate") ? `, lr ${s.options["learning-rate"]}` : ""}${extra.includes("--head-units") ? `, ${s.options["head-units"]} units` : ""}`;
  const head = s.phases.head;
  const rows: Row[] = [{ ...base, method: `${method === "augment" ? "augment" : "cached"}${tag ? ` ${tag}` : ""}`, test_accuracy: head.test_accuracy, val_accuracy: head.val_accuracy, epochs: epochsOf(head), seconds: head.seconds, detail: layer }];
  const ft = s.phases.fine_tune;
  if (ft && s.fine_tune)
    rows.push({ ...base, method: `fine-tune${tag ? ` ${tag}` : ""}`, test_accuracy: ft.test_accuracy, val_accuracy: ft.val_accuracy, epochs: epochsOf(ft), seconds: ft.seconds,
      detail: `${layer}; unfrozen ${/^\d+$/.test(s.fine_tune.unfreeze) ? `${s.fine_tune.unfreeze} layers ` : ""}from ${s.fine_tune.first_unfrozen}, lr ${s.options["fine-tune-learning-rate"]}, ${s.options["lr-schedule"]} schedule` });
  // A fine-tuning run's head row is a method-1 row at this limit; keep it only when asked for method 1 here.
  return method === "fine-tune" ? rows.filter((x) => x.method.startsWith("fine-tune")) : rows;
}

function keyOf(r: Pick<Row, "data" | "limit" | "model" | "method">): string {
  return `${r.data}|${r.limit}|${r.model}|${r.method}`;
}

function table(rows: Row[]): string {
  const pct = (x: number): string => `${(x * 100).toFixed(2)}%`;
  const lines = ["| data | train/val/test | model | method | test acc | val acc | epochs | detail |", "| --- | --- | --- | --- | --- | --- | --- | --- |"];
  const sorted = [...rows].sort((a, b) => a.data.localeCompare(b.data) || b.samples.train - a.samples.train || a.model.localeCompare(b.model) || a.method.localeCompare(b.method));
  for (const r of sorted)
    lines.push(`| ${r.data} | ${r.samples.train}/${r.samples.val}/${r.samples.test} | ${r.model} | ${r.method} | ${pct(r.test_accuracy)} | ${pct(r.val_accuracy)} | ${r.epochs} | ${r.detail} |`);
  return lines.join("\n");
}

async function main(): Promise<void> {
  const data = arg("data", "fashion-mnist");
  const methods = arg("methods", "baseline,cached,augment,fine-tune").split(",");
  const models = arg("models", "mobilenet_v2").split(",");
  const limit = Number(arg("limit", "0"));
  const augmentLimit = Number(arg("augment-limit", "3000"));
  const ftLimit = Number(arg("fine-tune-limit", "3000"));
  const ft = ["--fine-tune-layers", arg("fine-tune-layers", "18"), "--fine-tune-epochs", arg("fine-tune-epochs", "5"), "--fine-tune-learning-rate", arg("fine-tune-learning-rate", "1e-4")];
  const train = ["--epochs", arg("epochs", "20"), "--lr-schedule", arg("lr-schedule", "cosine")];
  const common = ["--cache-dir", arg("cache-dir", ".ctrain-cache"), "--log-format", "json", ...train];
  // Feature layer per model: block_12_add for MobileNetV2 (npm start's), the base output for the others.
  const layers = new Map(arg("feature-layer", "mobilenet_v2=block_12_add,inception_v3=auto").split(",").map((kv) => kv.split("=") as [string, string]));
  const more = arg("run-args", "").split(" ").filter(Boolean);
  const runArgs = (model: string): string[] => ["--workers", arg("workers", "1"), "--feature-layer", layers.get(model) ?? "auto", ...more];
  let dataArg = data;
  if (data === "tinted") {
    dataArg = join("runs", "bench-quality-tinted");
    const perClass = Number(arg("per-class", "1500"));
    if (!existsSync(dataArg)) console.error(`wrote ${await writeTintedFolder(dataArg, perClass)} tinted PNGs to ${dataArg}`);
  }
  const limits = new Set<number>();
  const todo: (() => Promise<Row[]>)[] = [];
  for (const model of models) {
    if (methods.includes("cached")) { limits.add(limit); todo.push(() => runRows(data, dataArg, model, "cached", limit, runArgs(model), common, arg("tag", ""))); }
    if (methods.includes("augment")) { limits.add(augmentLimit); todo.push(() => runRows(data, dataArg, model, "augment", augmentLimit, ["--method", "augment", ...runArgs(model)], common, arg("tag", ""))); }
    if (methods.includes("fine-tune")) { limits.add(ftLimit); todo.push(() => runRows(data, dataArg, model, "fine-tune", ftLimit, [...ft, ...runArgs(model)], common, arg("tag", ""))); }
  }
  if (methods.includes("baseline")) for (const l of limits.size ? limits : [limit]) todo.unshift(() => baselineRows(data, dataArg, l, arg("baseline-models", "logistic,mlp"), ["--log-format", "json", ...train]));
  if (process.argv.includes("--dry-run")) return console.log(`${todo.length} commands`);
  if (process.argv.includes("--table")) return console.log(table((await readJson<{ rows: Row[] }>(RESULTS)).rows));

  let byKey = new Map<string, Row>();
  for (const step of todo) {
    for (const row of await step()) {
      console.log(JSON.stringify({ data: row.data, limit: row.limit, model: row.model, method: row.method, test_accuracy: row.test_accuracy }));
      // Read again before each write: two benches (say baselines and method 1) may fill the file side by side.
      const previous = existsSync(RESULTS) ? (await readJson<{ rows: Row[] }>(RESULTS)).rows : [];
      byKey = new Map(previous.map((r) => [keyOf(r), r]));
      byKey.set(keyOf(row), row);
      // Written after every command: a bench stopped half-way keeps what it measured.
      const result = { bench: "quality", input_size: 96, machine: { cores: availableParallelism(), cpu: cpus()[0]?.model }, rows: [...byKey.values()] };
      await mkdir("bench/results", { recursive: true });
      await writeFile(RESULTS, `${JSON.stringify(result, null, 2)}\n`);
    }
  }
  console.log(table([...byKey.values()]));
}

void main().catch((e: unknown) => { console.error(e); process.exit(1); });

/**
 * bench/allreduce: synchronous gradient averaging (worker/gradient_averaging.ts) between N worker
 * PROCESSES on loopback through one real nats-server, for G = 1, 10, 100 MB of float32 gradient and
 * N = 2, 4, 8, fp32 and fp16 on the wire.
 *
 * Per combination: N processes open averagers, then the parent starts each round by IPC; each process
 * times its own average() and reports the bytes it sent and received. A round's time is the slowest
 * member's (the step is synchronous). Against it, the same run measures raw NATS loopback throughput:
 * one publisher process -> one subscriber of 512 KiB messages. Achieved bandwidth is reported as a
 * fraction of that raw figure, per worker (its received bytes / round time) and for the server as a
 * whole (all workers' received bytes / round time), since every process shares one server and the
 * machine's cores.
 *
 * Bounded: each combination has a time budget (--budget seconds, default 60); rounds stop when the
 * next one would not fit, and a combination whose round is predicted (from the same N at G/10, times
 * 10) not to fit, or that would not fit in memory, is recorded as skipped with the reason.
 * Writes bench/results/allreduce.json.
 *
 * With --profile every member runs under `node --cpu-prof` and each result carries the breakdown of
 * the members' CPU time (encode, decode, fp16, copies, checks, reduction, NATS, GC, waiting: see
 * bench/cpu_profile.ts).
 *
 * Raw NATS throughput is measured before and after the combinations and their mean is the reference:
 * on a shared machine the load drifts during a run.
 *
 * --floor runs, after each combination, the same messages with NATS alone (no encoding, checks or
 * reduction: class Exchange), as `kind: "exchange_floor"`: what the averager could reach at best here.
 *
 * --bucket-sweep KIB,KIB,... runs every size and dtype at each chunk size (`--bucket-bytes` of a job)
 * and appends the table to `bucket_sweep.runs` of the output file, keeping its other keys (and the
 * earlier sweeps: on a shared machine one sweep proves little); a plain run keeps `bucket_sweep`. --baseline FILE embeds that file's results (a run of the code before
 * a change, same conditions) under `before`.
 *
 *   node dist/bench/allreduce.js [--sizes 1,10,100] [--workers 2,4,8] [--dtypes fp32,fp16] [--budget 60] [--rounds 5] [--raw-seconds 3] [--bucket-kib 512] [--profile] [--floor] [--out FILE]
 *   node dist/bench/allreduce.js --bucket-sweep 64,128,256,512,1023 [--sizes 10,100] [--workers 2] [--dtypes fp32,fp16]
 *   node dist/bench/allreduce.js --baseline before.json ...
 */
import { fork, type ChildProcess } from "node:child_process";
import { mkdir, mkdtemp, readFile, rm, writeFile } from "node:fs/promises";
import { availableParallelism, cpus, freemem, loadavg, tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { connect, type NatsConnection } from "nats";
import { DEFAULT_BUCKET_BYTES, type WireDtype } from "../proto/tensor_codec.js";
import { GradientAverager, type AllreduceStats } from "../worker/gradient_averaging.js";
import { profileBreakdown, type ProfileBreakdown } from "./cpu_profile.js";
import { startNatsServer } from "../test/helpers/nats_server.js";

const MB = 1024 * 1024;
const RAW_MESSAGE_BYTES = 512 * 1024;

interface WorkerArgs { mode: "worker"; url: string; job: string; self: string; members: string[]; elements: number; dtype: WireDtype; bucketBytes: number; exchange?: boolean }
interface RawArgs { mode: "raw"; url: string; subject: string; seconds: number }
type ChildArgs = WorkerArgs | RawArgs;
type ToChild = { type: "round"; step: number } | { type: "exit" };
type FromChild = { type: "ready" } | { type: "done"; stats: AllreduceStats; cpuSeconds: number } | { type: "error"; message: string };

// ---------------------------------------------------------------------------------------------
// Child processes

/**
 * The floor under the averager: the same messages (sizes, counts, subjects' fan-out, the owner
 * publishing chunk k once every peer's chunk k is in) with no encoding, checks or reduction: one
 * preallocated payload, NATS alone. What the averager costs is its time above this.
 */
class Exchange {
  private readonly peers: string[];
  private readonly payload: Uint8Array;
  private readonly chunks: number;
  private got = new Map<string, number>();
  private fanned = 0;
  private fanIn = 0;
  private done: (() => void) | undefined;
  constructor(private readonly nc: NatsConnection, private readonly a: WorkerArgs) {
    this.peers = a.members.filter((m) => m !== a.self);
    const sliceBytes = Math.ceil((a.elements * (a.dtype === "fp16" ? 2 : 4)) / a.members.length);
    this.chunks = Math.ceil(sliceBytes / a.bucketBytes);
    this.payload = new Uint8Array(Math.min(a.bucketBytes, sliceBytes));
    nc.subscribe(`x.${a.self}.*`, { callback: (_e, m) => this.onGrad(m.subject.slice(m.subject.lastIndexOf(".") + 1)) });
    for (const p of this.peers) nc.subscribe(`f.${p}`, { callback: () => this.onFan() });
  }
  async round(): Promise<AllreduceStats> {
    const t0 = performance.now();
    const finished = new Promise<void>((r) => (this.done = r));
    this.check();
    let since = 0;
    for (const p of this.peers) {
      for (let k = 0; k < this.chunks; k++) {
        this.nc.publish(`x.${p}.${this.a.self}`, this.payload);
        if ((since += this.payload.length) >= 1024 * 1024) {
          since = 0;
          await new Promise<void>((r) => setImmediate(r));
        }
      }
    }
    await finished;
    const bytes = this.chunks * this.payload.length;
    const stats = { step: 0, seconds: (performance.now() - t0) / 1000, bytesSent: bytes * (this.peers.length + 1), bytesReceived: bytes * 2 * this.peers.length, messagesSent: 0, messagesReceived: 0 };
    this.got.clear();
    this.fanned = 0;
    this.fanIn = 0;
    return stats;
  }
  private onGrad(sender: string): void {
    this.got.set(sender, (this.got.get(sender) ?? 0) + 1);
    const all = Math.min(...this.peers.map((p) => this.got.get(p) ?? 0));
    while (this.fanned < all) {
      this.nc.publish(`f.${this.a.self}`, this.payload);
      this.fanned++;
    }
    this.check();
  }
  private onFan(): void {
    this.fanIn++;
    this.check();
  }
  private check(): void {
    if (this.fanned === this.chunks && this.fanIn === this.chunks * this.peers.length) this.done?.();
  }
}

async function exchangeMain(a: WorkerArgs): Promise<void> {
  const nc = await connect({ servers: a.url });
  const x = new Exchange(nc, a);
  await nc.flush();
  process.on("message", (m: ToChild) => {
    if (m.type === "exit") return void nc.close().then(() => process.exit(0));
    const cpu0 = process.cpuUsage();
    void x.round().then((stats) => {
      const cpu = process.cpuUsage(cpu0);
      process.send!({ type: "done", stats, cpuSeconds: (cpu.user + cpu.system) / 1e6 } satisfies FromChild);
    });
  });
  process.send!({ type: "ready" } satisfies FromChild);
}

async function workerMain(a: WorkerArgs): Promise<void> {
  if (a.exchange) return exchangeMain(a);
  const nc = await connect({ servers: a.url });
  const averager = await GradientAverager.open({ nc, job: a.job, self: a.self, members: a.members, epoch: 1, wireDtype: a.dtype, bucketBytes: a.bucketBytes, timeoutMs: 600_000 });
  const flat = new Float32Array(a.elements);
  let s = (a.members.indexOf(a.self) + 1) * 2654435761;
  for (let i = 0; i < flat.length; i++) {
    s = (Math.imul(s, 1664525) + 1013904223) >>> 0;
    flat[i] = s / 4294967296 - 0.5;
  }
  const samples = a.members.indexOf(a.self) + 1;
  process.on("message", (m: ToChild) => {
    if (m.type === "exit") {
      void averager.close().then(() => nc.close()).then(() => process.exit(0));
      return;
    }
    const cpu0 = process.cpuUsage();
    // reuseResult as gradientHookFor: the result is not kept, so no fresh vector per round.
    averager.average(m.step, flat, samples, { reuseResult: true }).then(
      () => {
        const cpu = process.cpuUsage(cpu0);
        process.send!({ type: "done", stats: averager.lastStats!, cpuSeconds: (cpu.user + cpu.system) / 1e6 } satisfies FromChild);
      },
      (e: unknown) => process.send!({ type: "error", message: `${(e as Error).name}: ${(e as Error).message}` } satisfies FromChild),
    );
  });
  process.send!({ type: "ready" } satisfies FromChild);
}

/** Publishes 512 KiB messages as fast as the connection takes them for `seconds`, then an empty end marker. */
async function rawMain(a: RawArgs): Promise<void> {
  const nc = await connect({ servers: a.url });
  const payload = new Uint8Array(RAW_MESSAGE_BYTES).fill(7);
  process.send!({ type: "ready" } satisfies FromChild);
  await new Promise<void>((r) => process.once("message", () => r()));
  const end = performance.now() + a.seconds * 1000;
  while (performance.now() < end) {
    for (let i = 0; i < 32; i++) nc.publish(a.subject, payload);
    await nc.flush(); // keeps the client's buffer bounded: at most 16 MiB in flight
  }
  nc.publish(a.subject, new Uint8Array(0));
  await nc.flush();
  await nc.close();
  process.exit(0);
}

// ---------------------------------------------------------------------------------------------
// Parent

class Kid {
  readonly proc: ChildProcess;
  private stderr = "";
  private waiters: Array<{ resolve: (m: FromChild) => void; reject: (e: Error) => void }> = [];
  private queue: FromChild[] = [];
  /** @param profileDir when set, the child runs under `--cpu-prof` and writes its profile there on exit. */
  constructor(args: ChildArgs, profileDir?: string) {
    const execArgv = profileDir ? ["--cpu-prof", "--cpu-prof-dir", profileDir] : [];
    this.proc = fork(fileURLToPath(import.meta.url), ["--child", JSON.stringify(args)], { stdio: ["ignore", "inherit", "pipe", "ipc"], execArgv });
    this.proc.stderr!.on("data", (d: Buffer) => (this.stderr = (this.stderr + d.toString()).slice(-2000)));
    this.proc.on("message", (m: FromChild) => {
      const w = this.waiters.shift();
      if (w) w.resolve(m);
      else this.queue.push(m);
    });
    this.proc.on("exit", (code) => {
      for (const w of this.waiters.splice(0)) w.reject(new Error(`child exited ${code}: ${this.stderr.trim().split("\n").slice(-3).join(" | ")}`));
    });
  }
  next(): Promise<FromChild> {
    const q = this.queue.shift();
    if (q) return Promise.resolve(q);
    if (this.proc.exitCode !== null) return Promise.reject(new Error(`child exited ${this.proc.exitCode}: ${this.stderr.trim()}`));
    return new Promise((resolve, reject) => this.waiters.push({ resolve, reject }));
  }
  send(m: ToChild): void {
    this.proc.send(m);
  }
  /** Resolves when the child has exited (its profile is written by then), or after `ms`. */
  exited(ms: number): Promise<void> {
    if (this.proc.exitCode !== null) return Promise.resolve();
    return new Promise((resolve) => {
      const t = setTimeout(resolve, ms);
      this.proc.once("exit", () => {
        clearTimeout(t);
        resolve();
      });
    });
  }
  kill(): void {
    if (this.proc.exitCode === null) this.proc.kill("SIGKILL");
  }
}

function withTimeout<T>(p: Promise<T>, ms: number, what: string): Promise<T> {
  let t: NodeJS.Timeout;
  return Promise.race([p, new Promise<T>((_, rej) => (t = setTimeout(() => rej(new Error(`${what}: over ${Math.round(ms / 1000)} s`)), ms))).finally(() => clearTimeout(t))]);
}

async function rawThroughput(url: string, seconds: number): Promise<{ bytes_per_second: number; messages: number; seconds: number }> {
  const nc = await connect({ servers: url });
  const subject = "bench.raw";
  let bytes = 0;
  let messages = 0;
  let first = 0;
  let last = 0;
  const done = new Promise<void>((resolve) => {
    nc.subscribe(subject, {
      callback: (_err, msg) => {
        if (msg.data.length === 0) return resolve();
        const now = performance.now();
        if (messages === 0) first = now;
        else bytes += msg.data.length; // bytes after the first message, over the time since it
        last = now;
        messages++;
      },
    });
  });
  await nc.flush();
  const kid = new Kid({ mode: "raw", url, subject, seconds });
  await kid.next();
  kid.send({ type: "round", step: 0 });
  await withTimeout(done, (seconds + 30) * 1000, "raw throughput");
  await nc.close();
  const s = (last - first) / 1000;
  return { bytes_per_second: Math.round(bytes / s), messages, seconds: Number(s.toFixed(2)) };
}

interface ComboResult {
  /** `averager`: worker/gradient_averaging.ts; `exchange_floor`: the same messages with NATS alone (class Exchange). */
  kind?: "averager" | "exchange_floor";
  size_mb: number;
  workers: number;
  dtype: WireDtype;
  /** Chunk (message) data budget, KiB. */
  bucket_kib: number;
  skipped?: string;
  rounds?: number;
  /** Slowest member's average() seconds per round, median over the timed rounds. */
  round_seconds_median?: number;
  round_seconds_min?: number;
  round_seconds_max?: number;
  bytes_sent_per_worker?: number;
  bytes_received_per_worker?: number;
  /** bytes sent per worker / (G bytes at the wire dtype): 1 + headers when O(G). */
  sent_over_g?: number;
  received_over_g?: number;
  /** G (float32 MB) per round second: the gradient averaged per second. */
  algorithmic_mb_per_second?: number;
  /** One worker's received bytes per second / raw NATS throughput. */
  per_worker_fraction_of_raw?: number;
  /** All workers' received bytes per second (what the server delivered) / raw NATS throughput. */
  server_fraction_of_raw?: number;
  /**
   * CPU seconds (user + system) one member's process used per round, median over members and rounds.
   * Unlike the round's wall time it barely moves with the machine's load, so it compares data paths
   * fairly on a shared machine.
   */
  cpu_seconds_per_round_per_worker?: number;
  /** With --profile: where the members' CPU went (bench/cpu_profile.ts), all rounds and warm-up included. */
  profile?: ProfileBreakdown;
  note?: string;
}

async function combo(url: string, sizeMb: number, n: number, dtype: WireDtype, bucketKib: number, budgetS: number, maxRounds: number, raw: number, profile: boolean, exchange = false): Promise<ComboResult> {
  const base: ComboResult = { kind: exchange ? "exchange_floor" : "averager", size_mb: sizeMb, workers: n, dtype, bucket_kib: bucketKib };
  const elements = Math.floor((sizeMb * MB) / 4);
  const members = Array.from({ length: n }, (_, i) => `w${i}`);
  const job = `bench-${sizeMb}-${n}-${dtype}-${bucketKib}`;
  const t0 = performance.now();
  const profileDir = profile ? await mkdtemp(join(tmpdir(), "ctrain-allreduce-prof-")) : undefined;
  const kids = members.map((self) => new Kid({ mode: "worker", url, job, self, members, elements, dtype, bucketBytes: bucketKib * 1024, exchange }, profileDir));
  const left = (): number => budgetS * 1000 - (performance.now() - t0);
  try {
    for (const m of await withTimeout(Promise.all(kids.map((k) => k.next())), Math.max(1, left()), "start-up")) if (m.type !== "ready") throw new Error(JSON.stringify(m));
    const rounds: Array<{ seconds: number; stats: AllreduceStats[]; cpu: number[] }> = [];
    // Round 0 warms up (JIT, buffers) and is not counted.
    for (let step = 0; step <= maxRounds; step++) {
      const last = rounds.at(-1)?.seconds ?? 0;
      if (step > 1 && left() < last * 1000 * 1.5) break;
      kids.forEach((k) => k.send({ type: "round", step }));
      const replies = await withTimeout(Promise.all(kids.map((k) => k.next())), Math.max(1, left()), `round ${step}`);
      const done = replies.map((r) => {
        if (r.type !== "done") throw new Error(r.type === "error" ? r.message : JSON.stringify(r));
        return r;
      });
      const stats = done.map((r) => r.stats);
      const seconds = Math.max(...stats.map((s) => s.seconds));
      if (step === 0) {
        if (left() < seconds * 1000) return { ...base, skipped: `warm-up round took ${seconds.toFixed(1)} s: no timed round fits the ${budgetS} s budget` };
        continue;
      }
      rounds.push({ seconds, stats, cpu: done.map((r) => r.cpuSeconds) });
    }
    kids.forEach((k) => k.send({ type: "exit" }));
    const prof = profileDir ? (await Promise.all(kids.map((k) => k.exited(30_000))), await profileBreakdown(profileDir)) : undefined;
    const secs = rounds.map((r) => r.seconds).sort((a, b) => a - b);
    const median = secs[Math.floor(secs.length / 2)]!;
    const all = rounds.flatMap((r) => r.stats);
    const cpus = rounds.flatMap((r) => r.cpu).sort((a, b) => a - b);
    const sent = all.reduce((a, s) => a + s.bytesSent, 0) / all.length;
    const received = all.reduce((a, s) => a + s.bytesReceived, 0) / all.length;
    const gWire = elements * (dtype === "fp16" ? 2 : 4);
    const r3 = (x: number): number => Number(x.toPrecision(3));
    return {
      ...base,
      rounds: rounds.length,
      round_seconds_median: r3(median),
      round_seconds_min: r3(secs[0]!),
      round_seconds_max: r3(secs.at(-1)!),
      bytes_sent_per_worker: Math.round(sent),
      bytes_received_per_worker: Math.round(received),
      sent_over_g: r3(sent / gWire),
      received_over_g: r3(received / gWire),
      algorithmic_mb_per_second: r3(sizeMb / median),
      per_worker_fraction_of_raw: r3(received / median / raw),
      server_fraction_of_raw: r3((received * n) / median / raw),
      cpu_seconds_per_round_per_worker: r3(cpus[Math.floor(cpus.length / 2)]!),
      ...(prof ? { profile: prof } : {}),
    };
  } catch (err) {
    return { ...base, skipped: (err as Error).message };
  } finally {
    for (const k of kids) k.kill();
    if (profileDir) await rm(profileDir, { recursive: true, force: true });
  }
}

function arg(name: string, def: string): string {
  const i = process.argv.indexOf(`--${name}`);
  return i >= 0 ? process.argv[i + 1]! : def;
}

interface RunPlan {
  sizes: number[];
  workers: number[];
  dtypes: WireDtype[];
  buckets: number[];
  budget: number;
  maxRounds: number;
  profile: boolean;
  /** After each combination, the same messages with NATS alone (--floor). */
  floor: boolean;
}

/**
 * Every combination of the plan; a size predicted not to fit the budget or memory is skipped with the
 * reason. Bucket sizes vary fastest, so the chunk sizes of one combination run back to back: on a
 * shared machine the load drifts, and a sweep compares them under the same load.
 */
async function runCombos(url: string, p: RunPlan, raw: number): Promise<ComboResult[]> {
  const results: ComboResult[] = [];
  const perRound = new Map<string, { sizeMb: number; seconds: number }>();
  for (const dtype of p.dtypes) {
    for (const n of p.workers) {
      for (const sizeMb of p.sizes) {
        for (const bucketKib of p.buckets) {
          const k = `${dtype}/${n}/${bucketKib}`;
          const prev = perRound.get(k);
          const predicted = prev ? (prev.seconds * sizeMb) / prev.sizeMb : 0;
          const memory = n * sizeMb * MB * 6; // flat + result + encoded chunks in flight, per process
          const base = { size_mb: sizeMb, workers: n, dtype, bucket_kib: bucketKib };
          let r: ComboResult;
          if (predicted * 2 > p.budget) r = { ...base, skipped: `predicted ${predicted.toFixed(1)} s per round (scaled from ${prev!.sizeMb} MB): warm-up plus one round exceed the ${p.budget} s budget` };
          else if (memory > freemem() * 0.7) r = { ...base, skipped: `needs about ${(memory / 2 ** 30).toFixed(1)} GiB, ${(freemem() / 2 ** 30).toFixed(1)} GiB free` };
          else r = await combo(url, sizeMb, n, dtype, bucketKib, p.budget, p.maxRounds, raw, p.profile);
          perRound.set(k, { sizeMb, seconds: r.round_seconds_median ?? Infinity });
          results.push(r);
          console.log(JSON.stringify(r));
          if (p.floor && !r.skipped) {
            results.push(await combo(url, sizeMb, n, dtype, bucketKib, p.budget, p.maxRounds, raw, false, true));
            console.log(JSON.stringify(results.at(-1)));
          }
        }
      }
    }
  }
  return results;
}

/**
 * The sweep's table: per chunk size, each combination's round time and CPU per worker, and the chunk
 * size with the least CPU summed over the combinations (CPU, unlike wall time, barely moves with the
 * machine's load).
 */
function sweepSummary(results: ComboResult[]): Record<string, unknown> {
  const byBucket = new Map<number, ComboResult[]>();
  for (const r of results.filter((x) => x.kind !== "exchange_floor")) byBucket.set(r.bucket_kib, [...(byBucket.get(r.bucket_kib) ?? []), r]);
  const rows = [...byBucket].map(([kib, rs]) => ({
    bucket_kib: kib,
    cpu_seconds_sum: rs.some((r) => r.skipped) ? null : Number(rs.reduce((a, r) => a + r.cpu_seconds_per_round_per_worker!, 0).toPrecision(3)),
    combos: rs.map((r) => ({ size_mb: r.size_mb, workers: r.workers, dtype: r.dtype, round_seconds_median: r.round_seconds_median, per_worker_fraction_of_raw: r.per_worker_fraction_of_raw, cpu_seconds_per_round_per_worker: r.cpu_seconds_per_round_per_worker, ...(r.skipped ? { skipped: r.skipped } : {}) })),
  }));
  const ok = rows.filter((r) => r.cpu_seconds_sum !== null);
  const best = ok.sort((a, b) => a.cpu_seconds_sum! - b.cpu_seconds_sum!)[0];
  return { least_cpu_bucket_kib: best?.bucket_kib ?? null, default_bucket_kib: DEFAULT_BUCKET_BYTES / 1024, rows: rows.sort((a, b) => a.bucket_kib - b.bucket_kib) };
}

async function readJson(file: string): Promise<Record<string, unknown> | undefined> {
  try {
    return JSON.parse(await readFile(file, "utf8")) as Record<string, unknown>;
  } catch {
    return undefined;
  }
}

async function main(): Promise<void> {
  const sweep = process.argv.includes("--bucket-sweep");
  const plan: RunPlan = {
    sizes: arg("sizes", sweep ? "10,100" : "1,10,100").split(",").map(Number),
    workers: arg("workers", sweep ? "2" : "2,4,8").split(",").map(Number),
    dtypes: arg("dtypes", "fp32,fp16").split(",") as WireDtype[],
    buckets: (sweep ? arg("bucket-sweep", "") : arg("bucket-kib", String(DEFAULT_BUCKET_BYTES / 1024))).split(",").map(Number),
    budget: Number(arg("budget", "60")),
    maxRounds: Number(arg("rounds", "5")),
    profile: process.argv.includes("--profile"),
    floor: process.argv.includes("--floor"),
  };
  for (const b of plan.buckets) if (!Number.isInteger(b) || b < 4 || b > 1023) throw new Error(`bucket sizes are KiB in 4..1023 (a chunk must fit NATS's 1 MiB max_payload), got ${b}`);
  const rawSeconds = Number(arg("raw-seconds", "3"));
  const outFile = arg("out", "bench/results/allreduce.json");
  const baseline = process.argv.includes("--baseline") ? await readJson(arg("baseline", "")) : undefined;
  // A burst of G(N-1)/N bytes lands on each owner at once: let the server buffer it rather than cut
  // the "slow consumer" off (the default max_pending is 64 MB).
  const server = await startNatsServer({ jetstream: false, config: "max_pending: 1073741824\nwrite_deadline: \"120s\"" });
  const t0 = performance.now();
  try {
    const rawBefore = await rawThroughput(server.url, rawSeconds);
    console.log(`raw NATS loopback: ${(rawBefore.bytes_per_second / MB).toFixed(0)} MB/s (512 KiB messages, ${rawBefore.seconds} s)`);
    const results = await runCombos(server.url, plan, rawBefore.bytes_per_second);
    const rawAfter = await rawThroughput(server.url, rawSeconds);
    console.log(`raw NATS loopback after: ${(rawAfter.bytes_per_second / MB).toFixed(0)} MB/s`);
    const raw = (rawBefore.bytes_per_second + rawAfter.bytes_per_second) / 2;
    for (const r of results) rescaleToRaw(r, rawBefore.bytes_per_second, raw);
    const run = {
      bench: "allreduce",
      method: "reduce-scatter to slice owners + NATS fan-out of averaged slices (worker/gradient_averaging.ts), chunk frames of bucket_kib",
      machine: { cores: availableParallelism(), cpu: cpus()[0]?.model },
      note: "All N worker processes, the parent and one nats-server share this machine's cores (and other jobs: see load_average); rounds per combination are bounded by the budget. Fractions of raw use the mean of the raw throughput measured before and after the combinations.",
      load_average: loadavg().map((x) => Number(x.toFixed(2))),
      profiled: plan.profile,
      budget_seconds_per_combination: plan.budget,
      max_timed_rounds: plan.maxRounds,
      raw_nats_loopback: { before: rawBefore, after: rawAfter, message_bytes: RAW_MESSAGE_BYTES, mb_per_second: Number((raw / MB).toFixed(1)) },
      total_seconds: Number(((performance.now() - t0) / 1000).toFixed(1)),
      date: new Date().toISOString(),
      results,
    };
    const prev = (await readJson(outFile)) ?? {};
    const sweeps = ((prev["bucket_sweep"] as { runs?: unknown[] } | undefined)?.runs ?? []);
    const out = sweep ? { ...prev, bucket_sweep: { ...(prev["bucket_sweep"] as object), runs: [...sweeps, { ...run, summary: sweepSummary(results) }] } } : { ...run, ...(baseline ? { before: baseline } : prev["before"] ? { before: prev["before"] } : {}), ...(prev["bucket_sweep"] ? { bucket_sweep: prev["bucket_sweep"] } : {}) };
    await mkdir("bench/results", { recursive: true });
    await writeFile(outFile, `${JSON.stringify(out, null, 2)}\n`);
    console.log(`wrote ${outFile}`);
  } finally {
    await server.stop();
  }
}

/** Re-expresses a result's fractions of raw against `raw` instead of the `measured` figure it was computed with. */
function rescaleToRaw(r: ComboResult, measured: number, raw: number): void {
  const f = (x: number | undefined): number | undefined => (x === undefined ? undefined : Number(((x * measured) / raw).toPrecision(3)));
  r.per_worker_fraction_of_raw = f(r.per_worker_fraction_of_raw);
  r.server_fraction_of_raw = f(r.server_fraction_of_raw);
}

if (process.argv[2] === "--child") {
  const a = JSON.parse(process.argv[3]!) as ChildArgs;
  void (a.mode === "raw" ? rawMain(a) : workerMain(a)).catch((e: unknown) => {
    console.error(`${(e as Error).name}: ${(e as Error).message}`);
    process.exit(1);
  });
} else void main().then(() => process.exit(0), (e: unknown) => {
  console.error(e);
  process.exit(1);
});

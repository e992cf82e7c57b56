/**
 * Whole jobs as a user runs them: real `ctrain coordinator` and `ctrain worker` processes against a
 * real nats-server, their JSON log lines parsed as they arrive so a test (or the chaos scheduler) can
 * wait for progress ("shard claimed", "shard done") instead of sleeping. Shared by the distributed
 * extraction tests and the chaos scenarios (test/chaos/).
 */
import { spawn, type ChildProcess } from "node:child_process";
import { existsSync } from "node:fs";
import { readdir } from "node:fs/promises";
import { join } from "node:path";
import { FeatureCache, type FeatureSet } from "../../core/datasets/feature_store.js";
import { CTRAIN_BIN } from "./cli.js";
import { freePort } from "./free_port.js";
import { check } from "./nats_server.js";
import { parseExposition } from "./prom_text.js";

/** One parsed JSON log line of a ctrain process. */
export interface LogLine {
  msg: string;
  level: string;
  [k: string]: unknown;
}

/** A ctrain child process with its parsed log lines and the tail of its output. */
export class Proc {
  lines: LogLine[] = [];
  stderr = "";
  stdout = "";
  readonly exited: Promise<number | null>;
  constructor(readonly name: string, readonly proc: ChildProcess, readonly metricsPort?: number) {
    let buf = "";
    proc.stderr!.on("data", (d: Buffer) => {
      const s = d.toString();
      this.stderr = (this.stderr + s).slice(-200_000);
      buf += s;
      let i;
      while ((i = buf.indexOf("\n")) >= 0) {
        const line = buf.slice(0, i);
        buf = buf.slice(i + 1);
        if (line.startsWith("{")) {
          try {
            this.lines.push(JSON.parse(line) as LogLine);
          } catch {
            // not a log line
          }
        }
      }
    });
    proc.stdout!.on("data", (d: Buffer) => (this.stdout += d.toString()));
    this.exited = new Promise((r) => proc.once("exit", (code, signal) => r(code ?? (signal ? -1 : null))));
  }
  /** True while the process has not exited (a SIGSTOPped process is alive). */
  get alive(): boolean {
    return this.proc.exitCode === null && this.proc.signalCode === null;
  }
  logged(msg: string): LogLine[] {
    return this.lines.filter((l) => l.msg === msg);
  }
  async waitFor(msg: string, timeoutMs = 60_000, count = 1): Promise<LogLine> {
    return check(() => {
      if (this.proc.exitCode !== null && this.logged(msg).length < count) throw new Error(`${this.name} exited ${this.proc.exitCode} before logging "${msg}":\n${this.stderr.slice(-3000)}`);
      const l = this.logged(msg);
      return l.length >= count ? l[count - 1] : undefined;
    }, timeoutMs, 50);
  }
  async metrics(): Promise<ReturnType<typeof parseExposition>> {
    const r = await fetch(`http://127.0.0.1:${this.metricsPort}/metrics`);
    return parseExposition(await r.text());
  }
  tail(): string {
    return `--- ${this.name} stderr ---\n${this.stderr.slice(-4000)}`;
  }
}

/** Options of a {@link Cluster}. */
export interface ClusterOptions {
  /** Root of every job's out/ and cache/ folders (`<dir>/<job>/out`, `<dir>/<job>/cache`). */
  dir: string;
  /** Job options given to every coordinator (data, limit, input size, shard size, seed...). */
  jobArgs: string[];
  /** Coordinator options after the job options. Default: 2 workers, ack wait 3 s, max deliver 5. */
  coordinatorArgs?: string[];
  /** CTRAIN_LOG_LEVEL of the children. Default debug. */
  logLevel?: string;
}

/** The ctrain processes of one test file or chaos run; `killAll()` ends whatever is left. */
export class Cluster {
  readonly procs: Proc[] = [];
  constructor(readonly o: ClusterOptions) {}

  get dir(): string {
    return this.o.dir;
  }

  ctrain(name: string, args: string[], env: NodeJS.ProcessEnv = {}, metricsPort?: number): Proc {
    const proc = spawn(process.execPath, [CTRAIN_BIN, ...args], { env: { ...process.env, CTRAIN_LOG_LEVEL: this.o.logLevel ?? "debug", ...env }, stdio: ["ignore", "pipe", "pipe"] });
    const p = new Proc(name, proc, metricsPort);
    this.procs.push(p);
    return p;
  }

  async worker(url: string, job: string, id: string, extra: string[] = [], env: NodeJS.ProcessEnv = {}): Promise<Proc> {
    const port = await freePort();
    return this.ctrain(id, ["worker", "--nats", url, "--job", job, "--worker-id", id, "--backend", "wasm", "--metrics-port", String(port), "--metrics-host", "127.0.0.1", "--log-format", "json", ...extra], env, port);
  }

  async coordinator(url: string, job: string, extra: string[] = [], env: NodeJS.ProcessEnv = {}): Promise<Proc> {
    const port = await freePort();
    const coord = this.o.coordinatorArgs ?? ["--workers", "2", "--ack-wait", "3", "--max-deliver", "5"];
    return this.ctrain(`coordinator-${job}`, ["coordinator", "--nats", url, "--job", job, ...this.o.jobArgs, "--cache-dir", this.cacheDir(job), "--out", this.outDir(job), "--metrics-port", String(port), ...coord, ...extra], env, port);
  }

  cacheDir(job: string): string {
    return join(this.o.dir, job, "cache");
  }

  outDir(job: string): string {
    return join(this.o.dir, job, "out");
  }

  /** Committed cache entries of a job (folders with meta.json). */
  async committedKeys(job: string): Promise<string[]> {
    const root = this.cacheDir(job);
    if (!existsSync(root)) return [];
    return (await readdir(root)).filter((n) => existsSync(join(root, n, "meta.json")));
  }

  /** The one committed cache entry of a job; throws when there is none or more than one. */
  async committed(job: string): Promise<FeatureSet> {
    const entries = await this.committedKeys(job);
    if (entries.length !== 1) throw new Error(`one committed cache entry expected in ${this.cacheDir(job)}, found ${entries.join(", ") || "none"}`);
    return new FeatureCache(this.cacheDir(job)).load(entries[0]);
  }

  /** SIGKILLs every process still running (SIGCONT first, so a stopped one dies too). */
  killAll(): void {
    for (const p of this.procs) {
      if (!p.alive) continue;
      p.proc.kill("SIGCONT");
      p.proc.kill("SIGKILL");
    }
  }
}

/** SIGTERM (drain), up to 10 s, then SIGKILL. */
export async function stopAll(ps: Proc[]): Promise<void> {
  for (const p of ps) if (p.proc.exitCode === null && p.proc.signalCode === null) p.proc.kill("SIGTERM");
  await Promise.all(ps.map((p) => Promise.race([p.exited, new Promise((r) => setTimeout(r, 10_000).unref())])));
  for (const p of ps) if (p.proc.exitCode === null && p.proc.signalCode === null) p.proc.kill("SIGKILL");
}

/**
 * SIGKILLs (SIGCONT first, so a stopped one dies too) and waits for the exits. For workers whose job is
 * over when the test needs no more of their logs: a drain (stopAll) waits out each worker's task pull (up
 * to 2 s) and lets a worker log its last "shard done", which comes after the shard's notice and ack.
 */
export async function killNow(ps: Proc[]): Promise<void> {
  for (const p of ps) {
    if (!p.alive) continue;
    p.proc.kill("SIGCONT");
    p.proc.kill("SIGKILL");
  }
  await Promise.all(ps.map((p) => p.exited));
}

/** The coordinator's exit code, or "timeout" after `timeoutMs`. */
export async function waitExit(c: Proc, timeoutMs: number): Promise<number | null | "timeout"> {
  let timer: NodeJS.Timeout | undefined;
  const code = await Promise.race([c.exited, new Promise<"timeout">((r) => (timer = setTimeout(() => r("timeout"), timeoutMs)))]);
  clearTimeout(timer);
  return code;
}

/** Shards extracted to the end, per worker log: shard id -> times. */
export function shardsDone(ws: Proc[]): Map<string, number> {
  const m = new Map<string, number>();
  for (const w of ws) for (const l of w.logged("shard done")) m.set(String(l.shard), (m.get(String(l.shard)) ?? 0) + 1);
  return m;
}

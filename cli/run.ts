/**
 * `ctrain run`: the whole job on this machine. Options are validated before any work starts; a
 * /metrics endpoint is served while the job runs (`--metrics-port`, 0 = a free port).
 *
 * With `--workers 1` and no `--nats` the job extracts in this process (no broker, no child: the
 * cheapest way to use one core, and the reference the distributed path is tested against).
 * Otherwise it is the distributed job on one machine: an embedded nats-server on a free port (unless
 * `--nats` names one), N `ctrain worker` child processes (tfjs has no threads in Node: one process per
 * core is how cores are used), and the coordinator here. Everything it started is stopped on the way
 * out, on success, on error and on Ctrl-C. The /metrics address of every process goes to the log and
 * to `<parent of out>/ctrain-targets/<job>.json` ({@link targetsFileOf}; Prometheus file_sd, which
 * deploy/prometheus/prometheus.yml watches for the default `runs/<job>`).
 */
import { spawn, type ChildProcess } from "node:child_process";
import { threadsFor } from "../core/models/inference_engine.js";
import { mkdir } from "node:fs/promises";
import { createServer } from "node:net";
import { createInterface } from "node:readline";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { Registry } from "prom-client";
import { loadOptions, optionsHelp, parseArgs, type JobOptions } from "../core/runtime/config.js";
import { ServiceLostError } from "../core/runtime/errors.js";
import { createLogger, parseLogLevel, type Logger } from "../core/runtime/log.js";
import { createMetrics, serveMetrics, writeScrapeTargets, type ScrapeTarget } from "../core/runtime/metrics.js";
import { connectNats, NATS_AUTH_FLAGS, natsAuthEnv, natsAuthFrom, splitUrlCredentials, type NatsAuth } from "../core/runtime/nats_connect.js";
import type { NatsConnection } from "nats";
import { startEmbeddedNats, type EmbeddedNats } from "../coordinator/embedded_nats.js";
import { preflight } from "../coordinator/preflight.js";
import { runJob, type JobDeps } from "../coordinator/job.js";
import { natsExecutorFactory } from "../coordinator/nats_executor.js";
import { printSummary } from "./coordinator.js";

export const RUN_HELP = `usage: ctrain run [options] [--config job.yaml]

Runs the whole job on this machine and writes model/, history.json, summary.json and report.html
into --out. With --workers N > 1 (default: one per core) it starts a private nats-server (or uses
--nats URL) and N \`ctrain worker\` processes for feature extraction; --workers 1 extracts in-process.
Prometheus targets of every process are written to <parent of --out>/ctrain-targets/<job>.json
(runs/ctrain-targets/ by default, which deploy/prometheus/prometheus.yml watches).

options:
${optionsHelp()}
  --verbose                    show the workers' info lines on the terminal too (default: their warnings and errors)
  --nats-user, --nats-pass, --nats-token, --nats-creds, --nats-nkey, --nats-tls-ca/cert/key: credentials for --nats`;

/**
 * The run's Prometheus file_sd targets: one file per job in a `ctrain-targets/` folder next to the run
 * folder, so one glob (`runs/ctrain-targets/*.json` in the shipped prometheus.yml) finds every run
 * under `runs/`. File discovery globs only the last path segment: `runs/*\/ctrain-targets.json` cannot be watched.
 */
export function targetsFileOf(opts: Pick<JobOptions, "out" | "job">): string {
  return join(dirname(resolve(opts.out)), "ctrain-targets", `${opts.job}.json`);
}

const CLI = fileURLToPath(new URL("./main.js", import.meta.url));

async function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const s = createServer();
    s.once("error", reject);
    s.listen(0, "127.0.0.1", () => {
      const a = s.address();
      const port = typeof a === "object" && a ? a.port : 0;
      s.close(() => resolve(port));
    });
  });
}

interface LocalCluster {
  workers: { id: string; proc: ChildProcess; metricsPort: number }[];
  nats?: EmbeddedNats;
  stop(): Promise<void>;
}

/** True once http://127.0.0.1:port/healthz answers (any status); false when `proc` exits or after `timeoutMs`. */
async function answers(port: number, proc: ChildProcess, timeoutMs: number): Promise<boolean> {
  const end = Date.now() + timeoutMs;
  while (Date.now() < end && proc.exitCode === null && proc.signalCode === null) {
    try {
      await fetch(`http://127.0.0.1:${port}/healthz`, { signal: AbortSignal.timeout(2000) });
      return true;
    } catch {
      await new Promise((r) => setTimeout(r, 100));
    }
  }
  return false;
}

/**
 * On a terminal, one line a worker process wrote (JSON), printed by this process as a log line above
 * the progress bars; a line that is not a log event (a crash trace) is wrapped in a warning.
 */
function routeWorkerLine(log: Logger, worker: string, line: string): void {
  if (line.trim() === "") return;
  let event: Record<string, unknown> | undefined;
  try {
    const v = JSON.parse(line) as unknown;
    if (v && typeof v === "object" && typeof (v as { msg?: unknown }).msg === "string") event = v as Record<string, unknown>;
  } catch {
    // not a log event: a crash trace, a library's own print
  }
  if (!event) return log.warn("worker output", { worker, line });
  const level = parseLogLevel(String(event.level)) ?? "info";
  const { ts: _ts, level: _level, msg, job: _job, ...fields } = event;
  log[level](String(msg), fields);
}

/** Starts the embedded NATS (unless opts.nats) and N worker processes (their output through routeWorkerLine on a terminal). */
async function startLocalCluster(opts: JobOptions, auth: NatsAuth, log: Logger, onAllExited: () => void, onNatsLost: (e: Error) => void, verbose = false): Promise<LocalCluster & { url: string; auth: NatsAuth }> {
  let nats: EmbeddedNats | undefined;
  let url = opts.nats;
  const ids = Array.from({ length: opts.workers }, (_, i) => `${opts.job}-w${i}`.slice(-63).replace(/^[^a-zA-Z0-9]+/, ""));
  if (!url) {
    // Our own server: per-job users, the coordinator's for this process, one per worker with its role's permissions.
    nats = await startEmbeddedNats({
      job: opts.job, workers: ids, onError: (line) => log.warn("embedded nats-server", { error: line }),
      onExit: (e) => {
        if (e.restarted) return log.warn("embedded nats-server died: restarted on its store, clients reconnect", { pid: e.pid, how: e.how, new_pid: e.newPid, last_line: e.lastLine });
        onNatsLost(new ServiceLostError(`the embedded nats-server (pid ${e.pid}) died (${e.how}${e.lastLine ? `: ${e.lastLine}` : ""}) and could not be restarted. Run the same command again with --job ${opts.job} to resume: finished shards are in the feature cache.`));
      },
    });
    url = nats.url;
    auth = nats.credentials.coordinator;
    log.info("embedded nats-server started", { url, pid: nats.pid, auth: "per-job users" });
  } else {
    // Userinfo in --nats goes to the workers' environment, never their argv.
    const split = splitUrlCredentials(url);
    url = split.servers;
    if (Object.keys(auth).length === 0) auth = split.auth;
  }
  // On a terminal the workers' lines come through this process (whole, above the bars), warnings and
  // errors only unless --verbose: few lines, so a busy coordinator never leaves a worker blocked on a
  // full pipe. Otherwise each worker writes its JSON lines to the same stderr itself, every level.
  const routed = opts.logFormat === "human" || (opts.logFormat === "auto" && process.stderr.isTTY === true);
  // Inherited CTRAIN_NATS_* must not mix with the credentials given below.
  const env = Object.fromEntries(Object.entries(process.env).filter(([k]) => !k.startsWith("CTRAIN_NATS_")));
  const workers: LocalCluster["workers"] = [];
  for (const id of ids) {
    const metricsPort = opts.metricsPort >= 0 ? await freePort() : -1;
    const args = [CLI, "worker", "--nats", url, "--job", opts.job, "--worker-id", id, "--backend", opts.backend, "--threads", String(threadsFor(opts.threads, opts.workers)), "--engine-provider", opts.engineProvider, "--metrics-port", String(metricsPort), "--metrics-host", "127.0.0.1", "--log-format", routed ? "json" : opts.logFormat];
    // Credentials go through the environment: argv is visible to every user of the machine.
    const level = routed && !verbose ? { CTRAIN_LOG_LEVEL: "warn" } : {};
    const proc = spawn(process.execPath, args, { stdio: ["ignore", routed ? "pipe" : "inherit", routed ? "pipe" : "inherit"], env: { ...env, ...level, ...natsAuthEnv(nats?.credentials.workers.get(id) ?? auth) } });
    if (routed) for (const out of [proc.stdout, proc.stderr]) createInterface({ input: out!, crlfDelay: Infinity }).on("line", (line) => routeWorkerLine(log, id, line));
    proc.on("exit", (code, signal) => {
      if (stopping) return;
      log.warn("worker process exited", { worker: id, code, signal });
      if (workers.every((w) => w.proc.exitCode !== null || w.proc.signalCode !== null)) onAllExited();
    });
    workers.push({ id, proc, metricsPort });
  }
  let stopping = false;
  return {
    url,
    auth,
    workers,
    nats,
    async stop() {
      stopping = true;
      await Promise.all(workers.map(async (w) => {
        if (w.proc.exitCode !== null || w.proc.signalCode !== null) return;
        const exited = new Promise<void>((r) => w.proc.once("exit", () => r()));
        const timer = setTimeout(() => w.proc.kill("SIGKILL"), 10_000);
        w.proc.kill("SIGTERM");
        await exited;
        clearTimeout(timer);
      }));
      await nats?.stop();
    },
  };
}

export async function main(argv: string[]): Promise<number> {
  const parsed = parseArgs(argv, [...NATS_AUTH_FLAGS], ["help", "verbose"]);
  if (parsed.extra["help"]) {
    console.log(RUN_HELP);
    return 0;
  }
  if (parsed.positionals.length > 0) {
    console.error(`ctrain run: unexpected argument ${JSON.stringify(parsed.positionals[0])}; options start with --.`);
    return 2;
  }
  const opts = loadOptions(parsed);
  const auth = natsAuthFrom(parsed.extra);
  // Refuse a job that cannot run before starting nats-server and workers or writing anything.
  await preflight(opts, { localWorkers: opts.workers, dataParallelWorkers: opts.workers });
  const log = createLogger({ job: opts.job, format: opts.logFormat });
  const registry = new Registry();
  const metrics = createMetrics(registry, { job: opts.job });
  const server = opts.metricsPort >= 0 ? await serveMetrics(registry, opts.metricsPort, "127.0.0.1") : undefined;
  if (server) log.info("serving metrics", { url: server.url });

  const distributed = opts.workers > 1 || opts.nats !== "";
  let cluster: (LocalCluster & { url: string; auth: NatsAuth }) | undefined;
  let nc: NatsConnection | undefined;
  const lost = new AbortController();
  // The coordinator is a target from the start, also on a cache hit that starts no other process.
  const targets: ScrapeTarget[] = server ? [{ address: `127.0.0.1:${server.port}`, job: opts.job, worker: "coordinator" }] : [];
  let targetsFile: string | undefined;
  if (server) {
    const file = targetsFileOf(opts);
    await mkdir(dirname(file), { recursive: true });
    await writeScrapeTargets(file, targets);
    targetsFile = file;
    log.info("prometheus targets", { prometheus_file_sd: file });
  }
  const cleanup = async (): Promise<void> => {
    // Processes that are gone leave Prometheus' file discovery, so a finished job is not "down".
    const file = targetsFile;
    targetsFile = undefined; // no late addition after this
    if (file) await writeScrapeTargets(file, []).catch((err: unknown) => log.warn("clearing the scrape targets failed", { error: err as Error }));
    await nc?.drain().catch(() => undefined);
    await cluster?.stop().catch((err: unknown) => log.warn("stopping local workers failed", { error: err as Error }));
    await server?.close().catch(() => undefined);
  };
  const onSignal = (sig: NodeJS.Signals): void => {
    log.warn("interrupted: stopping workers and NATS", { signal: sig });
    void cleanup().finally(() => process.exit(130));
  };
  process.once("SIGINT", onSignal);
  process.once("SIGTERM", onSignal);
  // The cluster starts only when something must be extracted (runJob asks for an executor then):
  // a cache hit or a config refused by runJob starts no process.
  const ensureCluster = async (): Promise<void> => {
    if (!cluster) {
      cluster = await startLocalCluster(opts, auth, log, () => lost.abort(new Error(`every local worker process exited; see their errors above`)), (e) => {
        log.error("embedded nats-server lost", { error: e });
        lost.abort(e);
        // Fine-tuning waits on NATS and has no abort signal: end the job here, within seconds, with the message.
        setTimeout(() => void cleanup().finally(() => process.exit(1)), 5000).unref();
      }, parsed.extra["verbose"] !== undefined);
      await mkdir(opts.out, { recursive: true });
      // A process enters the targets file once it answers, so Prometheus never scrapes a port that is
      // not open yet (a worker loads tfjs before it listens) and CtrainWorkerDown stays quiet.
      const file = targetsFile;
      const c = cluster;
      void (async () => {
        let writing = Promise.resolve();
        await Promise.all(c.workers.filter((w) => w.metricsPort > 0).map(async (w) => {
          if (!(await answers(w.metricsPort, w.proc, 120_000))) {
            if (w.proc.exitCode === null && w.proc.signalCode === null) log.warn("worker metrics endpoint does not answer: not a scrape target", { worker: w.id, port: w.metricsPort });
            return;
          }
          targets.push({ address: `127.0.0.1:${w.metricsPort}`, job: opts.job, worker: w.id });
          writing = writing.then(() => (targetsFile && file ? writeScrapeTargets(file, targets) : undefined));
          await writing;
        }));
        if (targetsFile) log.info("metrics endpoints", { targets: targets.map((t) => `${t.worker}=http://${t.address}/metrics`), prometheus_file_sd: file });
      })().catch((err: unknown) => log.warn("writing the scrape targets failed", { error: err as Error }));
      nc = await connectNats(cluster.url, cluster.auth, { name: `ctrain-coordinator-${opts.job}` });
      const conn = nc;
      void (async () => {
        for await (const s of conn.status()) if (s.type === "disconnect" || s.type === "reconnect") log.info(`NATS ${s.type}`, { server: String(s.data) });
      })();
    }
  };
  const executor: JobDeps["executor"] = async (ctx) => {
    await ensureCluster();
    return natsExecutorFactory({ nc: nc!, opts, log, metrics, workers: opts.workers, signal: lost.signal })(ctx);
  };
  let summary: Awaited<ReturnType<typeof runJob>>;
  try {
    // Fine-tuning is data-parallel on the local workers whenever there are several.
    const dataParallel: JobDeps["dataParallel"] = async () => {
      await ensureCluster();
      return { nc: nc!, workers: opts.workers };
    };
    summary = await runJob(opts, distributed ? { log, metrics, executor, workers: opts.workers, dataParallel: opts.workers > 1 ? dataParallel : undefined } : { log, metrics });
  } finally {
    process.off("SIGINT", onSignal);
    process.off("SIGTERM", onSignal);
    await cleanup();
  }
  // After the workers and NATS are stopped, so their last lines come before it: the summary is the end.
  printSummary(summary, opts);
  return 0;
}

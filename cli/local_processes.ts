/**
 * The worker processes of `ctrain run` on this machine: an embedded nats-server on a free port
 * (unless `--nats` names one) with per-job users, and N `ctrain worker` child processes (tfjs has no
 * threads in Node: one process per core is how cores are used). On a terminal their log lines come
 * through this process, above the progress bars.
 */
import { spawn, type ChildProcess } from "node:child_process";
import { createServer } from "node:net";
import { createInterface } from "node:readline";
import { fileURLToPath } from "node:url";
import { threadsFor } from "../core/models/inference_engine.js";
import type { JobOptions } from "../core/runtime/config.js";
import { ServiceLostError } from "../core/runtime/errors.js";
import { parseLogLevel, type Logger } from "../core/runtime/log.js";
import { natsAuthEnv, splitUrlCredentials, type NatsAuth } from "../core/runtime/nats_connect.js";
import { startEmbeddedNats, type EmbeddedNats } from "../coordinator/embedded_nats.js";

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

export interface LocalCluster {
  workers: { id: string; proc: ChildProcess; metricsPort: number }[];
  nats?: EmbeddedNats;
  stop(): Promise<void>;
}

/** True once http://127.0.0.1:port/healthz answers (any status); false when `proc` exits or after `timeoutMs`. */
export async function answers(port: number, proc: ChildProcess, timeoutMs: number): Promise<boolean> {
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
export async function startLocalCluster(opts: JobOptions, auth: NatsAuth, log: Logger, onAllExited: () => void, onNatsLost: (e: Error) => void, verbose = false): Promise<LocalCluster & { url: string; auth: NatsAuth }> {
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


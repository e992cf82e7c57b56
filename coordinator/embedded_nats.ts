/**
 * The nats-server `ctrain run` starts for itself: on a free port of 127.0.0.1 (`port: -1`, read back
 * from the ports file the server writes), JetStream in a temp store dir, gone after `stop()`.
 * It always requires authentication: one user for the coordinator and one per local worker, each with
 * a fresh random password and its role's permissions (proto/nats_permissions.ts). The passwords
 * live only in the 0600 config in a 0700 temp dir and in memory; callers hand them to workers through
 * the environment, never argv, and nothing logs them.
 * Adapted from the test harness (test/helpers/nats_server.ts), which production code must not import.
 */
import { spawn, type ChildProcess } from "node:child_process";
import { accessSync, constants, mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { delimiter, join } from "node:path";
import { EMBEDDED_NATS_GOMEMLIMIT, envString } from "../core/runtime/config.js";
import { ConfigError, ServiceStartError } from "../core/runtime/errors.js";
import type { NatsAuth } from "../core/runtime/nats_connect.js";
import { authorizationBlock, jobUsers } from "../proto/nats_permissions.js";

export interface EmbeddedNatsOptions {
  /** nats-server binary. Default: $NATS_SERVER_BIN, /usr/sbin/nats-server, then PATH. */
  binary?: string;
  /** How long to wait for the server to listen, milliseconds. Default 10000. */
  startTimeoutMs?: number;
  /** Job whose worker permissions the server enforces. Default `embedded` (no worker user unless `workers`). */
  job?: string;
  /** Worker ids to create users for. Default none (only the coordinator user). */
  workers?: readonly string[];
  /** Called with each error line of the server (a permission violation, a full store...). */
  onError?: (line: string) => void;
  /** Called when the server process dies unasked, after the restart (or the decision not to). */
  onExit?: (e: { pid: number; how: string; lastLine: string; restarted: boolean; newPid?: number }) => void;
  /** Restarts after unasked deaths before giving up. Default 3. */
  maxRestarts?: number;
}

/** Credentials of the embedded server's users. */
export interface EmbeddedNatsCredentials {
  /** Every subject (the coordinator, tools). */
  coordinator: NatsAuth;
  /** One per worker id, with the worker role's permissions. */
  workers: ReadonlyMap<string, NatsAuth>;
}

export interface EmbeddedNats extends AsyncDisposable {
  /** `nats://127.0.0.1:<port>`. */
  readonly url: string;
  /** Pid of the current server process (a new one after a restart). */
  pid: number;
  readonly credentials: EmbeddedNatsCredentials;
  /** SIGTERM (SIGKILL after 5 s), then removes the store. Idempotent. */
  stop(): Promise<void>;
}

/** Finds nats-server or throws a ConfigError saying how to get it. */
export function findNatsServerBinary(binary?: string): string {
  const candidates = binary ? [binary] : [envString("NATS_SERVER_BIN"), "/usr/sbin/nats-server", ...(process.env.PATH ?? "").split(delimiter).filter(Boolean).map((d) => join(d, "nats-server"))];
  for (const c of candidates) {
    if (!c) continue;
    try {
      accessSync(c, constants.X_OK);
      return c;
    } catch {
      // next
    }
  }
  throw new ConfigError(`ctrain run needs nats-server for its workers: install it (apt-get install nats-server), set NATS_SERVER_BIN, pass --nats URL of a running server, or use --workers 1.`);
}

/**
 * Removes the stores of embedded servers whose `ctrain run` is gone (SIGKILLed: no exit hook ran), so a
 * killed run does not leave its JetStream store in the temp folder for good.
 */
function removeStaleStores(): void {
  for (const name of readdirSync(tmpdir())) {
    const m = /^ctrain-embedded-nats-(\d+)-/.exec(name);
    if (!m || Number(m[1]) === process.pid) continue;
    try {
      process.kill(Number(m[1]), 0);
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === "ESRCH") rmSync(join(tmpdir(), name), { recursive: true, force: true });
    }
  }
}

/** One nats-server process on `port` (-1: a free one); resolves once it listens. */
async function launch(bin: string, dir: string, conf: string, port: number, users: ReturnType<typeof jobUsers>, opts: EmbeddedNatsOptions): Promise<{ proc: ChildProcess; port: number; exited: Promise<void>; stderr: () => string }> {
  writeFileSync(conf, configText(dir, port, users), { mode: 0o600 });
  const proc: ChildProcess = spawn(bin, ["-c", conf], { stdio: ["ignore", "ignore", "pipe"], env: serverEnv(process.env) });
  let stderr = "";
  proc.stderr!.setEncoding("utf8");
  let partial = "";
  proc.stderr!.on("data", (d: string) => {
    stderr = (stderr + d).slice(-4000);
    const lines = (partial + d).split("\n");
    partial = lines.pop() ?? "";
    for (const l of lines) if (/\[(ERR|FTL)\]/.test(l)) opts.onError?.(l.replace(/^\[\d+\] \S+ \S+ /, ""));
  });
  let spawnError: Error | undefined;
  proc.once("error", (e) => (spawnError = e));
  const exited = new Promise<void>((resolve) => proc.once("exit", () => resolve()));
  const deadline = Date.now() + (opts.startTimeoutMs ?? 10_000);
  let bound = 0;
  while (bound === 0) {
    if (spawnError || proc.exitCode !== null || proc.signalCode !== null)
      throw new ServiceStartError(`nats-server (${bin}) did not start: ${spawnError?.message ?? `exit ${proc.exitCode ?? proc.signalCode}`}${lastLine(stderr)}. Fix NATS_SERVER_BIN or the nats-server install, or pass --nats URL of a running server.`, { cause: spawnError });
    const name = proc.pid !== undefined ? readdirSync(dir).find((f) => f.endsWith(`_${proc.pid}.ports`)) : undefined;
    if (name) {
      try {
        const url = (JSON.parse(readFileSync(join(dir, name), "utf8")) as { nats?: string[] }).nats?.[0];
        if (url) bound = Number(new URL(url).port);
      } catch {
        // partly written
      }
    }
    if (bound === 0) {
      if (Date.now() > deadline) {
        proc.kill("SIGKILL");
        throw new ServiceStartError(`nats-server (${bin}) did not listen within ${opts.startTimeoutMs ?? 10_000} ms${lastLine(stderr)}. The machine may be overloaded: run again, or pass --nats URL of a running server.`);
      }
      await new Promise((r) => setTimeout(r, 20));
    }
  }
  return { proc, port: bound, exited, stderr: () => stderr };
}

/** The last line nats-server wrote, as `: <line>` for a one-line message; empty when it wrote nothing. */
function lastLine(stderr: string): string {
  const line = stderr.trim().split("\n").at(-1)?.trim();
  return line ? `: ${line}` : "";
}

/**
 * The embedded server's environment: the caller's, plus a soft memory limit for its Go runtime
 * ({@link EMBEDDED_NATS_GOMEMLIMIT}, a row of the option table) unless GOMEMLIMIT is set. What
 * the server holds is small (the shards in flight and a few 8 MB file-store block caches), but Go's
 * default GC lets the heap reach twice the live data before collecting, and nats-server churns
 * through a block buffer per shard written or read: without a limit its RSS sat at 300-700 MiB at
 * 10^4-3x10^4 images while its live heap was ~40 MiB. Soft: the server may exceed it when it must
 * (many workers storing at once), the GC then just runs more often.
 */
export function serverEnv(env: NodeJS.ProcessEnv): NodeJS.ProcessEnv {
  return env.GOMEMLIMIT ? env : { ...env, GOMEMLIMIT: EMBEDDED_NATS_GOMEMLIMIT };
}

function configText(dir: string, port: number, users: ReturnType<typeof jobUsers>): string {
  return [`listen: "127.0.0.1:${port}"`, `ports_file_dir: ${JSON.stringify(dir)}`, `server_name: ctrain_run_${process.pid}`,
    `jetstream {`, `  store_dir: ${JSON.stringify(join(dir, "jetstream"))}`, `}`,
    authorizationBlock([users.coordinator, ...users.workers.values()])].join("\n") + "\n";
}

/**
 * Starts a private nats-server with JetStream. If it dies while in use, it is started again on the
 * same port with the same store (clients reconnect; streams, buckets and queued tasks survive), up
 * to `maxRestarts` times; `onExit` hears of each death and whether it was restarted.
 */
export async function startEmbeddedNats(opts: EmbeddedNatsOptions = {}): Promise<EmbeddedNats> {
  const bin = findNatsServerBinary(opts.binary);
  removeStaleStores();
  const dir = mkdtempSync(join(tmpdir(), `ctrain-embedded-nats-${process.pid}-`));
  const conf = join(dir, "server.conf");
  const users = jobUsers(opts.job ?? "embedded", opts.workers ?? []);
  const credentials: EmbeddedNatsCredentials = {
    coordinator: { user: users.coordinator.user, pass: users.coordinator.password },
    workers: new Map([...users.workers].map(([w, u]) => [w, { user: u.user, pass: u.password }])),
  };
  let current: Awaited<ReturnType<typeof launch>> | undefined;
  // Never outlive the process that started us.
  const onExit = (): void => {
    if (current && current.proc.exitCode === null && current.proc.signalCode === null) current.proc.kill("SIGKILL");
    rmSync(dir, { recursive: true, force: true });
  };
  process.on("exit", onExit);
  try {
    current = await launch(bin, dir, conf, -1, users, opts);
  } catch (err) {
    onExit();
    process.off("exit", onExit);
    throw err;
  }
  const port = current.port;
  let stopped = false;
  let restarts = 0;
  const watch = (c: Awaited<ReturnType<typeof launch>>): void => {
    void c.exited.then(async () => {
      if (stopped) return;
      const how = c.proc.signalCode ?? `exit code ${c.proc.exitCode}`;
      const why = c.stderr().trim().split("\n").filter((l) => /\[(ERR|FTL)\]/.test(l)).slice(-1)[0] ?? "";
      if (restarts >= (opts.maxRestarts ?? 3)) return opts.onExit?.({ pid: c.proc.pid ?? -1, how, lastLine: why, restarted: false });
      restarts++;
      try {
        current = await launch(bin, dir, conf, port, users, opts);
        server.pid = current.proc.pid ?? -1;
        opts.onExit?.({ pid: c.proc.pid ?? -1, how, lastLine: why, restarted: true, newPid: server.pid });
        watch(current);
      } catch (err) {
        opts.onExit?.({ pid: c.proc.pid ?? -1, how, lastLine: `${why}; restart failed: ${(err as Error).message.split("\n")[0]}`, restarted: false });
      }
    });
  };
  const server = {
    url: `nats://127.0.0.1:${port}`,
    pid: current.proc.pid ?? -1,
    credentials,
    async stop() {
      if (stopped) return;
      stopped = true;
      const c = current!;
      if (c.proc.exitCode === null && c.proc.signalCode === null) {
        const timer = setTimeout(() => c.proc.kill("SIGKILL"), 5000);
        c.proc.kill("SIGTERM");
        await c.exited;
        clearTimeout(timer);
      }
      rmSync(dir, { recursive: true, force: true });
      process.off("exit", onExit);
    },
    async [Symbol.asyncDispose]() {
      await server.stop();
    },
  };
  watch(current);
  return server;
}

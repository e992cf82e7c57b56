/**
 * A real nats-server per test, after nats.js's own harness: a config file with `port: -1` (the server
 * picks a free port) and a `ports_file_dir`; the port is read from the ports file the server writes,
 * polled with a timeout. No fixed ports, no sleeps, no mocked broker. JetStream state lives in a temp
 * dir that survives `restart()` (same port, same store) and is removed by `stop()`. Servers still
 * running when the test process exits are killed.
 */
import { spawn, type ChildProcess } from "node:child_process";
import { existsSync, mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { findNatsServerBinary } from "../../coordinator/embedded_nats.js";

/** Options of {@link startNatsServer}. */
export interface NatsServerOptions {
  /** Enable JetStream with a store in the server's temp dir. Default true. */
  jetstream?: boolean;
  /** Require user/password or token authentication. Default: none. */
  auth?: { user: string; pass: string } | { token: string };
  /** Extra config text appended to the generated config. */
  config?: string;
  /** Port to listen on. Default: -1 (a free port the server picks). */
  port?: number;
  /** nats-server binary. Default: $NATS_SERVER_BIN, /usr/sbin/nats-server, then `nats-server` on PATH. */
  binary?: string;
  /** How long to wait for the server to come up, milliseconds. Default 10000. */
  startTimeoutMs?: number;
}

/** A running nats-server. */
export interface NatsServer extends AsyncDisposable {
  /** `nats://127.0.0.1:<port>`. */
  readonly url: string;
  readonly port: number;
  /** Pid of the current server process (changes on restart). */
  readonly pid: number;
  /** Temp dir holding the config, ports file and JetStream store. */
  readonly dir: string;
  /** JetStream store dir. */
  readonly storeDir: string;
  /** Stops the server (SIGTERM, then SIGKILL after 5 s) and removes its temp dir. Idempotent. */
  stop(): Promise<void>;
  /** Sends `signal` (default SIGKILL) and waits for the process to exit; the temp dir stays (see restart). */
  kill(signal?: NodeJS.Signals): Promise<void>;
  /** Stops the process if running and starts it again on the same port with the same store dir. */
  restart(): Promise<void>;
}

const live = new Set<ChildProcess>();
const dirs = new Set<string>();
let exitHookInstalled = false;
function installExitHook(): void {
  if (exitHookInstalled) return;
  exitHookInstalled = true;
  const cleanup = (): void => {
    for (const p of live) {
      try {
        p.kill("SIGKILL");
      } catch {
        // already gone
      }
    }
    live.clear();
    for (const d of dirs) rmSync(d, { recursive: true, force: true });
    dirs.clear();
  };
  process.on("exit", cleanup);
  // A signal ends the process without "exit": clean up, then die of the same signal as before.
  for (const sig of ["SIGINT", "SIGTERM"] as const) {
    const onSignal = (): void => {
      cleanup();
      process.removeListener(sig, onSignal);
      process.kill(process.pid, sig);
    };
    process.on(sig, onSignal);
  }
}

/** Finds the nats-server binary the way `ctrain run` does, or throws an error that says how to install it. */
export const findNatsServer = findNatsServerBinary;

function configText(opts: NatsServerOptions, port: number, dir: string, storeDir: string): string {
  const lines = [`listen: "127.0.0.1:${port}"`, `ports_file_dir: ${JSON.stringify(dir)}`, `server_name: ctrain_test_${process.pid}`];
  if (opts.jetstream ?? true) lines.push(`jetstream {`, `  store_dir: ${JSON.stringify(storeDir)}`, `  max_memory_store: 268435456`, `  max_file_store: 1073741824`, `}`);
  if (opts.auth && "token" in opts.auth) lines.push(`authorization { token: ${JSON.stringify(opts.auth.token)} }`);
  else if (opts.auth) lines.push(`authorization { user: ${JSON.stringify(opts.auth.user)}, password: ${JSON.stringify(opts.auth.pass)} }`);
  if (opts.config) lines.push(opts.config);
  return lines.join("\n") + "\n";
}

function waitExit(p: ChildProcess): Promise<void> {
  if (p.exitCode !== null || p.signalCode !== null) return Promise.resolve();
  return new Promise((resolve) => p.once("exit", () => resolve()));
}

interface Started {
  proc: ChildProcess;
  port: number;
}

async function launch(bin: string, confFile: string, dir: string, timeoutMs: number): Promise<Started> {
  const proc = spawn(bin, ["-c", confFile], { stdio: ["ignore", "ignore", "pipe"] });
  live.add(proc);
  let stderr = "";
  proc.stderr!.setEncoding("utf8");
  proc.stderr!.on("data", (d: string) => {
    stderr = (stderr + d).slice(-4000);
  });
  let spawnError: Error | undefined;
  proc.once("error", (e) => {
    spawnError = e;
  });
  proc.once("exit", () => live.delete(proc));
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    if (spawnError) throw new Error(`cannot start ${bin}: ${spawnError.message}`, { cause: spawnError });
    if (proc.exitCode !== null || proc.signalCode !== null)
      throw new Error(`nats-server exited (${proc.exitCode ?? proc.signalCode}) before listening:\n${stderr.trim()}`);
    if (proc.pid !== undefined) {
      const name = readdirSync(dir).find((f) => f.endsWith(`_${proc.pid}.ports`));
      if (name) {
        try {
          const ports = JSON.parse(readFileSync(join(dir, name), "utf8")) as { nats?: string[] };
          const url = ports.nats?.[0];
          if (url) {
            const port = Number(new URL(url).port);
            if (port > 0) return { proc, port };
          }
        } catch {
          // partly written: poll again
        }
      }
    }
    if (Date.now() > deadline) {
      proc.kill("SIGKILL");
      throw new Error(`nats-server did not write its ports file within ${timeoutMs} ms:\n${stderr.trim()}`);
    }
    await new Promise((r) => setTimeout(r, 20));
  }
}

/** Starts a nats-server (see {@link NatsServerOptions}); stop it with `stop()` or `await using`. */
export async function startNatsServer(opts: NatsServerOptions = {}): Promise<NatsServer> {
  const bin = findNatsServer(opts.binary);
  installExitHook();
  const dir = mkdtempSync(join(tmpdir(), "ctrain-nats-"));
  dirs.add(dir);
  const storeDir = join(dir, "jetstream");
  const timeoutMs = opts.startTimeoutMs ?? 10_000;
  const confFile = join(dir, "server.conf");
  writeFileSync(confFile, configText(opts, opts.port ?? -1, dir, storeDir));
  let current: Started;
  try {
    current = await launch(bin, confFile, dir, timeoutMs);
  } catch (err) {
    rmSync(dir, { recursive: true, force: true });
    dirs.delete(dir);
    throw err;
  }
  const port = current.port;
  // From now on the port is fixed, so a restart comes back where clients reconnect.
  writeFileSync(confFile, configText(opts, port, dir, storeDir));
  let stopped = false;

  const kill = async (signal: NodeJS.Signals = "SIGKILL"): Promise<void> => {
    const p = current.proc;
    if (p.exitCode === null && p.signalCode === null) p.kill(signal);
    await waitExit(p);
  };
  const terminate = async (): Promise<void> => {
    const p = current.proc;
    if (p.exitCode !== null || p.signalCode !== null) return;
    const timer = setTimeout(() => p.kill("SIGKILL"), 5000);
    p.kill("SIGTERM");
    await waitExit(p);
    clearTimeout(timer);
  };
  const server: NatsServer = {
    url: `nats://127.0.0.1:${port}`,
    port,
    get pid() {
      return current.proc.pid ?? -1;
    },
    dir,
    storeDir,
    kill,
    async stop() {
      if (stopped) return;
      stopped = true;
      await terminate();
      rmSync(dir, { recursive: true, force: true });
      dirs.delete(dir);
    },
    async restart() {
      if (stopped) throw new Error("restart() after stop(): the store dir is gone");
      await terminate();
      // The old ports file names the old pid; remove it so polling finds only the new one.
      for (const f of readdirSync(dir)) if (f.endsWith(".ports")) rmSync(join(dir, f), { force: true });
      current = await launch(bin, confFile, dir, timeoutMs);
    },
    async [Symbol.asyncDispose]() {
      await server.stop();
    },
  };
  return server;
}

/**
 * Polls `fn` until it returns a value other than `false`/`undefined` without throwing, and returns it.
 * Rejects after `timeoutMs` with the last error (or a timeout message).
 */
export async function check<T>(fn: () => T | Promise<T>, timeoutMs = 5000, intervalMs = 25): Promise<Exclude<T, false | undefined>> {
  const deadline = Date.now() + timeoutMs;
  let last: unknown;
  for (;;) {
    try {
      const v = await fn();
      if (v !== false && v !== undefined) return v as Exclude<T, false | undefined>;
      last = undefined;
    } catch (err) {
      last = err;
    }
    if (Date.now() > deadline) {
      if (last instanceof Error) throw new Error(`check timed out after ${timeoutMs} ms: ${last.message}`, { cause: last });
      throw new Error(`check timed out after ${timeoutMs} ms`);
    }
    await new Promise((r) => setTimeout(r, intervalMs));
  }
}

/** True when a file or dir exists (for tests of cleanup). */
export function pathExists(p: string): boolean {
  return existsSync(p);
}

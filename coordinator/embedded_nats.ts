/**
 * The nats-server `ctrain run` starts for itself: on a free port of 127.0.0.1 (`port: -1`, read back
 * from the ports file the server writes), JetStream in a temp store dir, gone after `stop()`.
 * Adapted from the test harness (test/helpers/nats_server.ts), which production code must not import.
 */
import { spawn, type ChildProcess } from "node:child_process";
import { accessSync, constants, mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { delimiter, join } from "node:path";
import { ConfigError } from "../core/errors.js";

export interface EmbeddedNatsOptions {
  /** nats-server binary. Default: $NATS_SERVER_BIN, /usr/sbin/nats-server, then PATH. */
  binary?: string;
  /** How long to wait for the server to listen, milliseconds. Default 10000. */
  startTimeoutMs?: number;
}

export interface EmbeddedNats extends AsyncDisposable {
  /** `nats://127.0.0.1:<port>`. */
  readonly url: string;
  readonly pid: number;
  /** SIGTERM (SIGKILL after 5 s), then removes the store. Idempotent. */
  stop(): Promise<void>;
}

/** Finds nats-server or throws a ConfigError saying how to get it. */
export function findNatsServerBinary(binary?: string): string {
  const candidates = binary ? [binary] : [process.env.NATS_SERVER_BIN, "/usr/sbin/nats-server", ...(process.env.PATH ?? "").split(delimiter).filter(Boolean).map((d) => join(d, "nats-server"))];
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

/** Starts a private nats-server with JetStream. */
export async function startEmbeddedNats(opts: EmbeddedNatsOptions = {}): Promise<EmbeddedNats> {
  const bin = findNatsServerBinary(opts.binary);
  const dir = mkdtempSync(join(tmpdir(), "ctrain-embedded-nats-"));
  const conf = join(dir, "server.conf");
  writeFileSync(
    conf,
    [`listen: "127.0.0.1:-1"`, `ports_file_dir: ${JSON.stringify(dir)}`, `server_name: ctrain_run_${process.pid}`,
      `jetstream {`, `  store_dir: ${JSON.stringify(join(dir, "jetstream"))}`, `}`].join("\n") + "\n",
  );
  const proc: ChildProcess = spawn(bin, ["-c", conf], { stdio: ["ignore", "ignore", "pipe"] });
  let stderr = "";
  proc.stderr!.setEncoding("utf8");
  proc.stderr!.on("data", (d: string) => (stderr = (stderr + d).slice(-4000)));
  let spawnError: Error | undefined;
  proc.once("error", (e) => (spawnError = e));
  // Never outlive the process that started us.
  const onExit = (): void => {
    if (proc.exitCode === null && proc.signalCode === null) proc.kill("SIGKILL");
    rmSync(dir, { recursive: true, force: true });
  };
  process.on("exit", onExit);
  const exited = new Promise<void>((resolve) => proc.once("exit", () => resolve()));
  const deadline = Date.now() + (opts.startTimeoutMs ?? 10_000);
  let port = 0;
  while (port === 0) {
    if (spawnError || proc.exitCode !== null || proc.signalCode !== null) {
      onExit();
      process.off("exit", onExit);
      throw new Error(`nats-server did not start: ${spawnError?.message ?? `exit ${proc.exitCode ?? proc.signalCode}`}\n${stderr.trim()}`);
    }
    const name = proc.pid !== undefined ? readdirSync(dir).find((f) => f.endsWith(`_${proc.pid}.ports`)) : undefined;
    if (name) {
      try {
        const url = (JSON.parse(readFileSync(join(dir, name), "utf8")) as { nats?: string[] }).nats?.[0];
        if (url) port = Number(new URL(url).port);
      } catch {
        // partly written
      }
    }
    if (port === 0) {
      if (Date.now() > deadline) {
        onExit();
        process.off("exit", onExit);
        throw new Error(`nats-server did not listen within ${opts.startTimeoutMs ?? 10_000} ms:\n${stderr.trim()}`);
      }
      await new Promise((r) => setTimeout(r, 20));
    }
  }
  let stopped = false;
  const server: EmbeddedNats = {
    url: `nats://127.0.0.1:${port}`,
    pid: proc.pid ?? -1,
    async stop() {
      if (stopped) return;
      stopped = true;
      if (proc.exitCode === null && proc.signalCode === null) {
        const timer = setTimeout(() => proc.kill("SIGKILL"), 5000);
        proc.kill("SIGTERM");
        await exited;
        clearTimeout(timer);
      }
      rmSync(dir, { recursive: true, force: true });
      process.off("exit", onExit);
    },
    async [Symbol.asyncDispose]() {
      await server.stop();
    },
  };
  return server;
}

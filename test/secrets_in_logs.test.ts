/**
 * Credentials never reach a log line, an error message or a child's argv: a worker given
 * `--nats nats://ctrain:<password>@host` while the server is down (it retries, backing off), a wrong
 * password (a one-line error), and a whole `ctrain run --nats nats://ctrain:<password>@host --workers 2`
 * against a server that requires them. Every line each process wrote is searched for the password.
 */
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { mkdtemp, readdir, readFile, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, test } from "node:test";
import { redactSecrets, registerSecret } from "../core/runtime/log.js";
import { CTRAIN_BIN, runCli } from "./helpers/cli.js";
import { Cluster } from "./helpers/cluster.js";
import { freePort } from "./helpers/free_port.js";
import { check, startNatsServer, type NatsServer } from "./helpers/nats_server.js";

const PASSWORD = "s3cretPW-9f2c41";
let dir: string;
let server: NatsServer;
let cluster: Cluster;

before(async () => {
  dir = await mkdtemp(join(tmpdir(), "ctrain-secrets-"));
  server = await startNatsServer({ auth: { user: "ctrain", pass: PASSWORD } });
  cluster = new Cluster({ dir, jobArgs: [] });
});
after(async () => {
  cluster?.killAll();
  await server?.stop();
  await rm(dir, { recursive: true, force: true });
});

const withPassword = (url: string, pass = PASSWORD): string => url.replace("nats://", `nats://ctrain:${encodeURIComponent(pass)}@`);

test("secrets - redactSecrets masks URL userinfo and registered values", () => {
  assert.equal(redactSecrets("at nats://ctrain:pw0rd@h:4222, tls://tok3n@h2"), "at nats://ctrain:***@h:4222, tls://***@h2");
  registerSecret('we"ird-secret');
  assert.equal(redactSecrets(JSON.stringify({ e: 'password we"ird-secret refused' })), JSON.stringify({ e: "password *** refused" }));
});

test("secrets - a worker retrying an absent server backs off and never logs the password", { timeout: 60_000 }, async () => {
  const port = await freePort();
  const w = cluster.ctrain("w-absent", ["worker", "--nats", withPassword(`nats://127.0.0.1:${port}`), "--job", "sec", "--worker-id", "sec-w0", "--backend", "cpu", "--metrics-port", "-1", "--log-format", "json"]);
  try {
    await w.waitFor("NATS not reachable yet, retrying", 30_000, 4);
  } finally {
    w.proc.kill("SIGKILL");
    await w.exited;
  }
  assert.ok(!w.stderr.includes(PASSWORD) && !w.stdout.includes(PASSWORD), `the password is in the worker's output:\n${w.stderr.slice(-2000)}`);
  assert.ok(w.stderr.includes("ctrain:***@"), "the URL is shown with its password masked");
  const at = w.logged("NATS not reachable yet, retrying").map((l) => Date.parse(String(l.ts)));
  assert.ok(at[3]! - at[2]! >= 1500, `retries back off: gaps ${at.slice(1).map((t, i) => t - at[i]!).join(", ")} ms`);
});

test("secrets - a wrong password is a one-line error without the password", async () => {
  const wrong = "Wr0ngPassw0rd-77";
  const r = await runCli(["worker", "--nats", withPassword(server.url, wrong), "--job", "sec", "--backend", "cpu", "--metrics-port", "-1", "--log-format", "json"], { timeoutMs: 60_000 });
  assert.equal(r.code, 2, r.stderr);
  assert.match(r.stderr, /refused the credentials/);
  assert.ok(!(r.stdout + r.stderr).includes(wrong), r.stderr);
});

test("secrets - ctrain run --nats with a password in the URL: not in any log line, not in the workers' argv", { timeout: 180_000 }, async () => {
  const args = [
    CTRAIN_BIN, "run", "--nats", withPassword(server.url), "--data", "fashion-mnist", "--limit", "40", "--input-size", "64", "--epochs", "1", "--head-units", "8",
    "--shard-size", "16", "--backend", "wasm", "--workers", "2", "--job", "secrun", "--cache-dir", join(dir, "cache"), "--out", join(dir, "out"),
    "--metrics-port", "-1", "--log-format", "json", "--seed", "3",
  ];
  const child = spawn(process.execPath, args, { stdio: ["ignore", "pipe", "pipe"], env: { ...process.env, CTRAIN_LOG_LEVEL: "debug" } });
  let output = "";
  child.stdout.on("data", (d: Buffer) => (output += d.toString()));
  child.stderr.on("data", (d: Buffer) => (output += d.toString()));
  const exited = new Promise<number | null>((r) => child.once("close", (c) => r(c)));
  const argvs = new Map<string, string>();
  await check(async () => {
    for (const pid of await readdir("/proc")) {
      if (!/^\d+$/.test(pid) || argvs.has(pid)) continue;
      try {
        const stat = await readFile(`/proc/${pid}/stat`, "utf8");
        if (Number(stat.slice(stat.lastIndexOf(")") + 2).split(" ")[1]) === child.pid) argvs.set(pid, await readFile(`/proc/${pid}/cmdline`, "utf8"));
      } catch {
        // gone
      }
    }
    return argvs.size >= 2 || child.exitCode !== null;
  }, 60_000, 50);
  assert.equal(await exited, 0, output.slice(-4000));
  assert.equal(argvs.size, 2, "two workers seen");
  for (const a of argvs.values()) assert.ok(!a.includes(PASSWORD), `a worker's argv holds the password: ${a.replace(/\0/g, " ")}`);
  const lines = output.split("\n").filter(Boolean);
  assert.ok(lines.length > 20, `${lines.length} lines`);
  const leaks = lines.filter((l) => l.includes(PASSWORD));
  assert.deepEqual(leaks, [], "log lines with the password");
});

/**
 * The embedded nats-server of `ctrain run` killed mid-job (as an OOM killer or a stray `kill` would):
 * once, it is started again on its own store and port, the clients reconnect and the job finishes;
 * again and again past its restart budget, the job ends within 30 s with a message that says what
 * happened and how to resume.
 */
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { existsSync, mkdirSync, rmSync } from "node:fs";
import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, test } from "node:test";
import { startEmbeddedNats } from "../coordinator/embedded_nats.js";
import { CTRAIN_BIN } from "./helpers/cli.js";
import { Proc } from "./helpers/cluster.js";

let dir: string;
const procs: Proc[] = [];
before(async () => {
  dir = await mkdtemp(join(tmpdir(), "ctrain-natsfault-"));
});
after(async () => {
  for (const p of procs) if (p.alive) p.proc.kill("SIGKILL");
  await rm(dir, { recursive: true, force: true });
});

function run(job: string): Proc {
  const args = [
    CTRAIN_BIN, "run", "--data", "fashion-mnist", "--limit", "160", "--input-size", "64", "--epochs", "1", "--head-units", "8", "--shard-size", "8",
    "--backend", "wasm", "--workers", "2", "--job", job, "--cache-dir", join(dir, job, "cache"), "--out", join(dir, job, "out"),
    "--metrics-port", "-1", "--log-format", "json", "--seed", "5",
  ];
  const p = new Proc(job, spawn(process.execPath, args, { stdio: ["ignore", "pipe", "pipe"], env: { ...process.env, CTRAIN_LOG_LEVEL: "info" } }));
  procs.push(p);
  return p;
}

test("embedded nats faults - the store of a SIGKILLed run is removed by the next start, a live run's is kept", async () => {
  const dead = spawn(process.execPath, ["-e", ""]);
  await new Promise((r) => dead.once("exit", r));
  const stale = join(tmpdir(), `ctrain-embedded-nats-${dead.pid}-test`);
  const live = join(tmpdir(), `ctrain-embedded-nats-${process.ppid}-test`);
  for (const d of [stale, live]) mkdirSync(join(d, "jetstream"), { recursive: true });
  const server = await startEmbeddedNats();
  await server.stop();
  assert.equal(existsSync(stale), false, "the dead run's store is gone");
  assert.equal(existsSync(live), true, "a running process's store stays");
  rmSync(live, { recursive: true, force: true });
});

const restartMsg = "embedded nats-server died: restarted on its store, clients reconnect";

test("embedded nats faults - killed mid-extraction: restarted on its store, the job finishes", { timeout: 180_000 }, async () => {
  const p = run("natskill");
  const started = await p.waitFor("embedded nats-server started", 60_000);
  await p.waitFor("shard tasks queued", 60_000);
  process.kill(Number(started.pid), "SIGKILL");
  const restarted = await p.waitFor(restartMsg, 30_000);
  assert.equal(Number(restarted.pid), Number(started.pid));
  assert.equal(await p.exited, 0, p.tail());
  assert.ok(existsSync(join(dir, "natskill", "out", "summary.json")));
});

test("embedded nats faults - killed past its restart budget: the job ends within 30 s saying how to resume", { timeout: 180_000 }, async () => {
  const p = run("natsgone");
  let pid = Number((await p.waitFor("embedded nats-server started", 60_000)).pid);
  await p.waitFor("shard tasks queued", 60_000);
  for (let i = 1; i <= 3; i++) {
    process.kill(pid, "SIGKILL");
    pid = Number((await p.waitFor(restartMsg, 30_000, i)).new_pid);
  }
  process.kill(pid, "SIGKILL");
  const t0 = performance.now();
  const code = await p.exited;
  assert.notEqual(code, 0);
  assert.ok(performance.now() - t0 < 30_000, `ended ${((performance.now() - t0) / 1000).toFixed(1)} s after the last kill`);
  assert.match(p.stderr, /embedded nats-server \(pid \d+\) died \(SIGKILL\) and could not be restarted\. Run the same command again with --job natsgone to resume/);
});

/**
 * What a standalone `ctrain worker` exposes: /metrics on loopback unless --metrics-host says otherwise,
 * the address it really bound in its log, and a port in use refused in one line naming the flag.
 */
import assert from "node:assert/strict";
import { once } from "node:events";
import { createServer } from "node:net";
import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, test } from "node:test";
import type { AddressInfo } from "node:net";
import { runCli } from "./helpers/cli.js";
import { Cluster } from "./helpers/cluster.js";
import { freePort } from "./helpers/free_port.js";

let dir: string;
let cluster: Cluster;
before(async () => {
  dir = await mkdtemp(join(tmpdir(), "ctrain-netsurface-"));
  cluster = new Cluster({ dir, jobArgs: [] });
});
after(async () => {
  cluster?.killAll();
  await rm(dir, { recursive: true, force: true });
});

test("network surface - ctrain worker serves /metrics on 127.0.0.1 by default and logs the address it bound", { timeout: 60_000 }, async () => {
  const nats = `nats://127.0.0.1:${await freePort()}`; // nobody there: the worker serves metrics while it waits
  const w = cluster.ctrain("w-default", ["worker", "--nats", nats, "--job", "net", "--backend", "cpu", "--metrics-port", "0", "--log-format", "json"]);
  const wide = cluster.ctrain("w-wide", ["worker", "--nats", nats, "--job", "net", "--backend", "cpu", "--metrics-port", "0", "--metrics-host", "0.0.0.0", "--log-format", "json"]);
  try {
    const l = await w.waitFor("serving metrics", 30_000);
    assert.match(String(l.listen), /^127\.0\.0\.1:\d+$/, `bound ${String(l.listen)}`);
    assert.ok((await fetch(`http://127.0.0.1:${String(l.port)}/healthz`)).ok);
    const lw = await wide.waitFor("serving metrics", 30_000);
    assert.match(String(lw.listen), /^0\.0\.0\.0:\d+$/, `bound ${String(lw.listen)}`);
  } finally {
    cluster.killAll();
  }
});

test("network surface - a metrics port in use is a one-line error naming --metrics-port", { timeout: 60_000 }, async () => {
  const busy = createServer();
  busy.listen(0, "127.0.0.1");
  await once(busy, "listening");
  const port = (busy.address() as AddressInfo).port;
  try {
    const r = await runCli(["worker", "--nats", "nats://127.0.0.1:1", "--job", "net", "--backend", "cpu", "--metrics-port", String(port), "--log-format", "json"], { timeoutMs: 30_000 });
    assert.equal(r.code, 2, r.stderr);
    const lines = r.stderr.trim().split("\n");
    assert.equal(lines.length, 1, r.stderr);
    assert.match(lines[0]!, /--metrics-port/);
    assert.match(lines[0]!, new RegExp(`127\\.0\\.0\\.1:${port}.*EADDRINUSE`));
  } finally {
    busy.close();
  }
});

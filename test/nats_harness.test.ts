/** The NATS test harness: a real nats-server per test, JetStream, restart on the same port, auth. */
import { test } from "node:test";
import assert from "node:assert/strict";
import { AckPolicy, ErrorCode, RetentionPolicy, StringCodec, connect, type NatsError } from "nats";
import { check, pathExists, startNatsServer } from "./helpers/nats_server.js";

const sc = StringCodec();

test("nats harness - starts a server on a free port and carries core messages", async () => {
  await using server = await startNatsServer({ jetstream: false });
  assert.ok(server.port > 0 && server.port !== 4222, `port ${server.port}`);
  const nc = await connect({ servers: server.url });
  try {
    const sub = nc.subscribe("ctrain.t.echo", { max: 1 });
    nc.publish("ctrain.t.echo", sc.encode("hi"));
    for await (const m of sub) assert.equal(sc.decode(m.data), "hi");
  } finally {
    await nc.close();
  }
});

test("nats harness - JetStream work queue: publish, consume and ack", async () => {
  await using server = await startNatsServer({ jetstream: true });
  const nc = await connect({ servers: server.url });
  try {
    const jsm = await nc.jetstreamManager();
    await jsm.streams.add({ name: "CTRAIN_t_TASKS", subjects: ["ctrain.t.tasks"], retention: RetentionPolicy.Workqueue });
    await jsm.consumers.add("CTRAIN_t_TASKS", { durable_name: "extractors", ack_policy: AckPolicy.Explicit, ack_wait: 5_000_000_000 });
    const js = nc.jetstream();
    for (let i = 0; i < 3; i++) await js.publish("ctrain.t.tasks", sc.encode(`shard-${i}`));
    const consumer = await js.consumers.get("CTRAIN_t_TASKS", "extractors");
    const got: string[] = [];
    for (let i = 0; i < 3; i++) {
      const m = await consumer.next({ expires: 2000 });
      assert.ok(m, "a message within 2 s");
      got.push(sc.decode(m.data));
      await m.ackAck();
    }
    assert.deepEqual(got, ["shard-0", "shard-1", "shard-2"]);
    // Work-queue retention: acked messages are gone.
    await check(async () => (await jsm.streams.info("CTRAIN_t_TASKS")).state.messages === 0, 5000);
  } finally {
    await nc.close();
  }
});

test("nats harness - restart on the same port keeps JetStream state and clients reconnect", async () => {
  await using server = await startNatsServer({ jetstream: true });
  const nc = await connect({ servers: server.url, maxReconnectAttempts: -1, reconnectTimeWait: 50 });
  try {
    const jsm = await nc.jetstreamManager();
    await jsm.streams.add({ name: "S", subjects: ["s.>"] });
    const js = nc.jetstream();
    for (let i = 0; i < 5; i++) await js.publish(`s.${i}`, sc.encode(String(i)));
    const events: string[] = [];
    void (async () => {
      for await (const s of nc.status()) events.push(s.type);
    })();
    const port = server.port;
    const oldPid = server.pid;
    await server.kill("SIGKILL");
    await server.restart();
    assert.equal(server.port, port);
    assert.notEqual(server.pid, oldPid);
    await check(() => events.includes("reconnect"), 10_000);
    const info = await check(async () => jsm.streams.info("S"), 10_000);
    assert.equal(info.state.messages, 5, "messages survive a SIGKILL and restart");
    // And a plain restart (SIGTERM) too, with a fresh client.
    await server.restart();
    const nc2 = await connect({ servers: server.url });
    const info2 = await (await nc2.jetstreamManager()).streams.info("S");
    assert.equal(info2.state.messages, 5);
    await nc2.close();
  } finally {
    await nc.close();
  }
});

test("nats harness - an auth-enabled server refuses a client without credentials and accepts the right ones", async () => {
  await using server = await startNatsServer({ jetstream: false, auth: { user: "ctrain", pass: "s3cret" } });
  await assert.rejects(connect({ servers: server.url }), (err: NatsError) => {
    assert.equal(err.code, ErrorCode.AuthorizationViolation, String(err));
    return true;
  });
  await assert.rejects(connect({ servers: server.url, user: "ctrain", pass: "wrong" }), (err: NatsError) => err.code === ErrorCode.AuthorizationViolation);
  const nc = await connect({ servers: server.url, user: "ctrain", pass: "s3cret" });
  await nc.flush();
  await nc.close();

  await using tokenServer = await startNatsServer({ jetstream: false, auth: { token: "t0ken" } });
  await assert.rejects(connect({ servers: tokenServer.url }), (err: NatsError) => err.code === ErrorCode.AuthorizationViolation);
  const nc2 = await connect({ servers: tokenServer.url, token: "t0ken" });
  await nc2.close();
});

test("nats harness - stop removes the temp dir and a missing binary says how to install it", async () => {
  const server = await startNatsServer();
  assert.ok(pathExists(server.storeDir) || pathExists(server.dir));
  await server.stop();
  await server.stop(); // idempotent
  assert.equal(pathExists(server.dir), false);
  await assert.rejects(startNatsServer({ binary: "/nonexistent/nats-server" }), /apt-get install nats-server/);
  await assert.rejects(startNatsServer({ config: "this is { not valid" }), /nats-server exited/);
});

test("nats harness - check polls until the condition holds and times out with the last error", async () => {
  let n = 0;
  assert.equal(await check(() => ++n >= 3 && n, 1000, 1), 3);
  await assert.rejects(check(() => { throw new Error("never"); }, 50, 5), /timed out after 50 ms: never/);
});

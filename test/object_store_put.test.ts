/**
 * Objects stored through core/training/checkpoints.ts putBytes: handed to nats.js in pieces with an
 * acknowledgement timeout that grows with the size (nats.js publishes every chunk before it awaits
 * their acknowledgements, each within one timeout: 5 s by default, which a 746 MB object missed),
 * read back byte for byte, and a failed upload says which object, how big, and what to check.
 * A real nats-server with a JetStream file store; bench/object_digest.ts measures the large puts.
 */
import assert from "node:assert/strict";
import { randomBytes } from "node:crypto";
import { after, before, test } from "node:test";
import type { NatsConnection } from "nats";
import { getBytes, getBytesWithin, putBytes, putTimeoutMs } from "../core/training/checkpoints.js";
import { connectNats } from "../core/runtime/nats_connect.js";
import { startNatsServer, type NatsServer } from "./helpers/nats_server.js";

let server: NatsServer;
let nc: NatsConnection;
before(async () => {
  server = await startNatsServer();
  nc = await connectNats(server.url, {}, { name: "put-test" });
});
after(async () => {
  await nc?.close();
  await server?.stop();
});

test("object store put - a 48 MiB object is stored in pieces and read back byte for byte, and replaced in place", async () => {
  const os = await nc.jetstream().views.os("put-large");
  const data = randomBytes(48 * 2 ** 20 + 13);
  await putBytes(os, "big", data);
  const got = await getBytes(os, "big");
  assert.ok(got && got.length === data.length && Buffer.compare(Buffer.from(got), data) === 0, "the object reads back byte for byte");
  // Replaced in place: the new content wins.
  const small = randomBytes(1000);
  await putBytes(os, "big", small);
  assert.deepEqual(Buffer.from((await getBytes(os, "big"))!), small);
  // Empty objects too.
  await putBytes(os, "empty", new Uint8Array(0));
  assert.equal((await getBytes(os, "empty"))?.length, 0);
});

test("object store put - the acknowledgement timeout grows with the size: 30 s plus 1 s per 8 MiB", () => {
  assert.equal(putTimeoutMs(0), 30_000);
  assert.equal(putTimeoutMs(8 * 2 ** 20), 31_000);
  assert.equal(putTimeoutMs(746 * 2 ** 20), 30_000 + 93_250);
});

test("object store put - an upload the server refuses names the object and its size", async () => {
  const os = await nc.jetstream().views.os("put-small", { max_bytes: 1024 * 1024 });
  await assert.rejects(putBytes(os, "too-big", randomBytes(3 * 1024 * 1024)), (err: Error) => {
    assert.match(err.message, /storing object "too-big" \(3\.0 MiB\) in the NATS object store failed: /);
    return true;
  });
});

test("object store get - a read overtaken by a rewrite of the object can wait forever; getBytesWithin gives up and a new read gets the new copy", async (t) => {
  // What the coordinator meets when a redelivered shard is finished twice: the second worker's put
  // purges the chunks the first read is waiting for (coordinator/extraction_round.ts reads bounded).
  const os = await nc.jetstream().views.os("get-rewritten");
  const first = randomBytes(16 * 2 ** 20), second = randomBytes(16 * 2 ** 20);
  let stalled = 0;
  for (let i = 0; i < 2; i++) {
    await putBytes(os, "shard", first);
    const read = getBytesWithin(os, "shard", 2000);
    await putBytes(os, "shard", second);
    const got = await read;
    if (got === undefined) stalled++;
    else assert.ok(got && (Buffer.compare(Buffer.from(got), first) === 0 || Buffer.compare(Buffer.from(got), second) === 0), "a read that ends holds one whole copy");
  }
  // Measured here: the read right after a put stalls in most tries (nats.js 2.x); each stalled read ended at its bound.
  t.diagnostic(`${stalled} of 2 reads overtaken by a rewrite stalled and were given up after 2 s`);
  assert.equal(Buffer.compare(Buffer.from((await getBytesWithin(os, "shard", 10_000))!), second), 0, "a new read gets the copy that stayed");
});

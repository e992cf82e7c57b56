/**
 * Object-store digests on node:crypto (core/runtime/object_digest.ts): the same SHA-256 as nats.js'
 * own js-sha256, objects written by either hasher read back through the other, and a digest that
 * does not match the data is still refused on read. A real nats-server, real objects of a few MB.
 */
import assert from "node:assert/strict";
import { createHash, randomBytes } from "node:crypto";
import { after, before, test } from "node:test";
import { headers, type NatsConnection } from "nats";
import { connectNats } from "../core/runtime/nats_connect.js";
import { nativeObjectDigests, nativeSha256, natsSha256Module, useNativeObjectDigests } from "../core/runtime/object_digest.js";
import { objectMetaSubject } from "../proto/extraction_wire.js";
import { startNatsServer, type NatsServer } from "./helpers/nats_server.js";

const jsSha256 = natsSha256Module()!;
// Taken before anything swaps the factory: nats.js' own pure-JS hasher.
const original = jsSha256.sha256.create;

let server: NatsServer;
let nc: NatsConnection;
before(async () => {
  server = await startNatsServer();
});
after(async () => {
  await nc?.close();
  await server?.stop();
});

const b64url = (bytes: Uint8Array): string => Buffer.from(bytes).toString("base64").replace(/\+/g, "-").replace(/\//g, "_");

test("object digest - node:crypto gives js-sha256's digest, chunk by chunk, and may be read twice", () => {
  const data = randomBytes(3 * 1024 * 1024 + 17);
  const js = original(), native = nativeSha256();
  for (let i = 0; i < data.length; i += 128 * 1024) {
    js.update(data.subarray(i, i + 128 * 1024));
    native.update(data.subarray(i, i + 128 * 1024));
  }
  const d = native.digest();
  assert.deepEqual(Array.from(d), Array.from(js.digest()));
  assert.deepEqual(Array.from(native.digest()), Array.from(d));
  assert.throws(() => native.update(new Uint8Array(1)), /update after digest/);
});

test("object digest - the NATS connection installs it; objects of either hasher read back through the other", async () => {
  assert.equal(nativeObjectDigests(), false, "nothing swapped before a ctrain connection");
  nc = await connectNats(server.url, {}, { name: "digest-test" });
  assert.equal(nativeObjectDigests(), true);
  const os = await nc.jetstream().views.os("digest");
  const before = randomBytes(2 << 20), after = randomBytes(5 << 20);
  jsSha256.sha256.create = original;
  await os.putBlob({ name: "js" }, before);
  assert.equal(useNativeObjectDigests(), true);
  const info = await os.putBlob({ name: "native" }, after);
  assert.equal(info.digest, `SHA-256=${b64url(createHash("sha256").update(after).digest())}`);
  assert.deepEqual(Buffer.from((await os.getBlob("js"))!), before);
  assert.deepEqual(Buffer.from((await os.getBlob("native"))!), after);
  jsSha256.sha256.create = original;
  assert.deepEqual(Buffer.from((await os.getBlob("native"))!), after, "nats.js' own hasher accepts what node:crypto wrote");
  useNativeObjectDigests();
});

test("object digest - data that does not match its digest is still refused on read", async () => {
  nc ??= await connectNats(server.url, {}, { name: "digest-test" });
  const os = await nc.jetstream().views.os("digest-corrupt");
  await os.putBlob({ name: "a" }, randomBytes(1 << 20));
  const subject = objectMetaSubject("digest-corrupt", "a");
  const stored = await (await nc.jetstreamManager()).streams.getMessage("OBJ_digest-corrupt", { last_by_subj: subject });
  // Rewrite the object's record with the digest of other bytes (a rollup of its metadata subject).
  const forged = { ...(JSON.parse(new TextDecoder().decode(stored.data)) as Record<string, unknown>), digest: `SHA-256=${b64url(createHash("sha256").update("other bytes").digest())}` };
  const h = headers();
  h.set("Nats-Rollup", "sub");
  await nc.jetstream().publish(subject, new TextEncoder().encode(JSON.stringify(forged)), { headers: h });
  assert.equal(nativeObjectDigests(), true);
  await assert.rejects(async () => os.getBlob("a"), /digests do not match|corrupt/);
});

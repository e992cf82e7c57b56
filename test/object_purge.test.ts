/**
 * Feature shards leave the object store without a trace once the coordinator holds them: a real
 * nats-server (file store, as the job's buckets use) and real objects of ~1 MB. `ObjectStore.delete()`
 * keeps a delete marker per object, and with it every 8 MB block of the store (on disk, and read back
 * into memory by each listing): these tests fail on that.
 */
import assert from "node:assert/strict";
import { readdirSync, statSync } from "node:fs";
import { join } from "node:path";
import { after, before, test } from "node:test";
import { connect, type NatsConnection } from "nats";
import { serverEnv } from "../coordinator/embedded_nats.js";
import { EMBEDDED_NATS_GOMEMLIMIT } from "../core/runtime/config.js";
import { objectMetaSubject, purgeObject } from "../proto/extraction_wire.js";
import { startNatsServer, type NatsServer } from "./helpers/nats_server.js";

let server: NatsServer;
let nc: NatsConnection;
before(async () => {
  server = await startNatsServer();
  nc = await connect({ servers: server.url });
});
after(async () => {
  await nc?.close();
  await server?.stop();
});

function bytesBelow(dir: string): number {
  let n = 0;
  for (const e of readdirSync(dir, { withFileTypes: true })) n += e.isDirectory() ? bytesBelow(join(dir, e.name)) : statSync(join(dir, e.name)).size;
  return n;
}

function blob(i: number): Uint8Array {
  const b = new Uint8Array(1 << 20);
  for (let j = 0; j < b.length; j += 251) b[j] = (i + j) & 255;
  return b;
}

test("object purge - the metadata subject is the one nats.js writes", async () => {
  const os = await nc.jetstream().views.os("purge-subject");
  const jsm = await nc.jetstreamManager();
  for (const name of ["r0123456789abcdef.shard-00001", "a/b+c?"]) {
    await os.putBlob({ name }, new Uint8Array([1, 2, 3]));
    const last = await jsm.streams.getMessage("OBJ_purge-subject", { last_by_subj: objectMetaSubject("purge-subject", name) });
    assert.equal(last.subject, objectMetaSubject("purge-subject", name));
  }
});

test("object purge - purged shards leave no message, no listing entry and no store block behind", async () => {
  const bucket = "purge-blocks";
  const os = await nc.jetstream().views.os(bucket);
  const jsm = await nc.jetstreamManager();
  for (let i = 0; i < 24; i++) {
    await os.putBlob({ name: `s${i}` }, blob(i));
    assert.equal((await os.getBlob(`s${i}`))?.length, 1 << 20);
    assert.equal(await purgeObject(jsm, os, bucket, `s${i}`), true);
  }
  assert.equal(await purgeObject(jsm, os, bucket, "s0"), false, "a second purge finds nothing");
  assert.equal(await purgeObject(jsm, os, bucket, "never-stored"), false);
  const state = (await jsm.streams.info(`OBJ_${bucket}`)).state;
  assert.equal(state.messages, 0);
  assert.deepEqual(await os.list(), []);
  // 24 MB went through; ObjectStore.delete() would keep ~3 blocks of 8 MB on disk.
  const dir = readdirSync(join(server.storeDir, "jetstream"), { recursive: true, withFileTypes: true }).find((e) => e.isDirectory() && e.name === `OBJ_${bucket}`);
  assert.ok(dir, "the bucket's store folder");
  const onDisk = bytesBelow(join(dir.parentPath ?? dir.path, dir.name));
  assert.ok(onDisk < 2 * 2 ** 20, `the bucket's store holds ${onDisk} bytes after every object was purged`);
});

test("object purge - a shard stored again after a purge is an object like any other", async () => {
  const bucket = "purge-again";
  const os = await nc.jetstream().views.os(bucket);
  const jsm = await nc.jetstreamManager();
  await os.putBlob({ name: "s" }, blob(1));
  await purgeObject(jsm, os, bucket, "s");
  await os.putBlob({ name: "s" }, blob(2));
  assert.deepEqual(await os.getBlob("s"), blob(2));
  assert.deepEqual((await os.list()).map((i) => i.name), ["s"]);
});

test("object purge - the embedded server gets a soft Go memory limit unless the environment sets one", () => {
  assert.equal(serverEnv({ PATH: "/bin" }).GOMEMLIMIT, EMBEDDED_NATS_GOMEMLIMIT);
  assert.equal(serverEnv({ PATH: "/bin" }).PATH, "/bin");
  assert.equal(serverEnv({ GOMEMLIMIT: "1GiB" }).GOMEMLIMIT, "1GiB");
});

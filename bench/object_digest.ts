/**
 * bench/object_digest: what SHA-256 costs the object-store transfers that carry every feature shard,
 * with nats.js' bundled js-sha256 and with node:crypto (core/runtime/object_digest.ts), in the same run:
 * hashing alone (64 MiB in the object store's 128 KiB chunks), and put + get of feature-shard-sized
 * objects through a private nats-server (file store, as the job's buckets). Each measurement is the
 * median of --repeats; the two hashers alternate so the machine's load falls on both alike.
 * Writes bench/results/object_digest.json.
 *
 *   node dist/bench/object_digest.js [--mib 64] [--object-mib 4] [--repeats 3] [--out FILE]
 */
import { randomBytes } from "node:crypto";
import { mkdir, writeFile } from "node:fs/promises";
import { availableParallelism, cpus, loadavg } from "node:os";
import { dirname } from "node:path";
import { connect } from "nats";
import { startEmbeddedNats } from "../coordinator/embedded_nats.js";
import { nativeSha256, natsSha256Module, type Sha256Hasher } from "../core/runtime/object_digest.js";

const arg = (name: string, def: string): string => {
  const i = process.argv.indexOf(`--${name}`);
  return i >= 0 ? process.argv[i + 1]! : def;
};

const jsSha256 = natsSha256Module()!;
const HASHERS = { "js-sha256": jsSha256.sha256.create, "node:crypto": nativeSha256 };
type Name = keyof typeof HASHERS;

const median = (xs: number[]): number => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)]!;
const mbps = (bytes: number, seconds: number): number => Number((bytes / 1e6 / seconds).toFixed(1));

function hashSeconds(create: () => Sha256Hasher, data: Uint8Array): number {
  const t0 = performance.now();
  const h = create();
  for (let i = 0; i < data.length; i += 128 * 1024) h.update(data.subarray(i, i + 128 * 1024));
  h.digest();
  return (performance.now() - t0) / 1000;
}

async function main(): Promise<void> {
  const total = Number(arg("mib", "64")) * 1024 * 1024;
  const objectBytes = Number(arg("object-mib", "4")) * 1024 * 1024;
  const repeats = Number(arg("repeats", "3"));
  const data = randomBytes(total);
  const load = { before: loadavg().map((x) => Number(x.toFixed(2))), after: [] as number[] };
  const hash: Record<Name, number[]> = { "js-sha256": [], "node:crypto": [] };
  for (let r = 0; r < repeats; r++) for (const name of Object.keys(HASHERS) as Name[]) hash[name].push(hashSeconds(HASHERS[name], data));

  const nats = await startEmbeddedNats();
  const { user, pass } = nats.credentials.coordinator;
  const nc = await connect({ servers: nats.url, user, pass });
  const transfer: Record<Name, { put: number[]; get: number[] }> = { "js-sha256": { put: [], get: [] }, "node:crypto": { put: [], get: [] } };
  try {
    const os = await nc.jetstream().views.os("bench-digest");
    for (let r = 0; r < repeats; r++)
      for (const name of Object.keys(HASHERS) as Name[]) {
        jsSha256.sha256.create = HASHERS[name];
        let t0 = performance.now();
        for (let i = 0; i * objectBytes < total; i++) await os.putBlob({ name: `${name}-${r}-${i}` }, data.subarray(i * objectBytes, (i + 1) * objectBytes));
        transfer[name].put.push((performance.now() - t0) / 1000);
        t0 = performance.now();
        for (let i = 0; i * objectBytes < total; i++) await os.getBlob(`${name}-${r}-${i}`);
        transfer[name].get.push((performance.now() - t0) / 1000);
        for (let i = 0; i * objectBytes < total; i++) await os.delete(`${name}-${r}-${i}`);
      }
  } finally {
    jsSha256.sha256.create = HASHERS["js-sha256"];
    await nc.close();
    await nats.stop();
  }
  load.after = loadavg().map((x) => Number(x.toFixed(2)));
  const rows = (Object.keys(HASHERS) as Name[]).map((name) => ({
    hasher: name,
    hash_mb_per_s: mbps(total, median(hash[name])),
    object_put_mb_per_s: mbps(total, median(transfer[name].put)),
    object_get_mb_per_s: mbps(total, median(transfer[name].get)),
  }));
  const [js, native] = rows;
  const result = {
    bench: "object_digest", when: new Date().toISOString(), machine: { cpus: availableParallelism(), model: cpus()[0]?.model }, load,
    setup: { bytes: total, object_bytes: objectBytes, chunk_bytes: 128 * 1024, repeats, server: "embedded nats-server (file store)" },
    rows,
    ratios: { hash: Number((native!.hash_mb_per_s / js!.hash_mb_per_s).toFixed(2)), put: Number((native!.object_put_mb_per_s / js!.object_put_mb_per_s).toFixed(2)), get: Number((native!.object_get_mb_per_s / js!.object_get_mb_per_s).toFixed(2)) },
  };
  const out = arg("out", "bench/results/object_digest.json");
  await mkdir(dirname(out), { recursive: true });
  await writeFile(out, `${JSON.stringify(result, null, 2)}\n`);
  console.log(JSON.stringify(result.rows), JSON.stringify(result.ratios));
  console.log(`wrote ${out}`);
}

void main().catch((e: unknown) => { console.error(e); process.exit(1); });

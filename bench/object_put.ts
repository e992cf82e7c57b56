/**
 * bench/object_put: one large object (fine-tuning's activations reach hundreds of MB: 746 MB at
 * block_11_expand on full Fashion-MNIST) stored in the job's object store through the embedded
 * nats-server (file store), with nats.js' putBlob as it is (every chunk published before their
 * acknowledgements are awaited, each within the client's 5 s default) and with ctrain's putBytes
 * (core/training/checkpoints.ts: 4 MiB pieces, a timeout that grows with the size, one retry), in the
 * same run, alternating. Records for each: whether it stored the object, seconds, MB/s, the error,
 * and the process's peak RSS growth. Writes bench/results/object_put.json.
 *
 *   node dist/bench/object_put.js [--mib 746] [--repeats 2] [--out FILE]
 */
import { randomBytes } from "node:crypto";
import { mkdir, writeFile } from "node:fs/promises";
import { availableParallelism, cpus, loadavg } from "node:os";
import { dirname } from "node:path";
import { connect, type ObjectStore } from "nats";
import { startEmbeddedNats } from "../coordinator/embedded_nats.js";
import { useNativeObjectDigests } from "../core/runtime/object_digest.js";
import { getBytes, putBytes } from "../core/training/checkpoints.js";

const arg = (name: string, def: string): string => {
  const i = process.argv.indexOf(`--${name}`);
  return i >= 0 ? process.argv[i + 1]! : def;
};

/** This process's resident set now, MiB. */
const rssMib = (): number => Math.round(process.memoryUsage.rss() / 2 ** 20);

type Way = "nats.js putBlob" | "ctrain putBytes";
const WAYS: Record<Way, (os: ObjectStore, name: string, data: Uint8Array) => Promise<unknown>> = {
  "nats.js putBlob": (os, name, data) => os.putBlob({ name }, data),
  "ctrain putBytes": (os, name, data) => putBytes(os, name, data),
};

interface Try { way: Way; stored: boolean; seconds: number; mb_per_s?: number; error?: string; rss_mib_before: number; rss_mib_peak: number }

async function main(): Promise<void> {
  const bytes = Number(arg("mib", "746")) * 2 ** 20;
  const repeats = Number(arg("repeats", "2"));
  useNativeObjectDigests();
  const data = randomBytes(bytes);
  const load = { before: loadavg().map((x) => Number(x.toFixed(2))), after: [] as number[] };
  const nats = await startEmbeddedNats();
  const { user, pass } = nats.credentials.coordinator;
  const nc = await connect({ servers: nats.url, user, pass });
  const tries: Try[] = [];
  try {
    const os = await nc.jetstream().views.os("bench-put", { max_bytes: 4 * bytes });
    for (let r = 0; r < repeats; r++)
      for (const way of Object.keys(WAYS) as Way[]) {
        const before = rssMib();
        let peak = before;
        const sampler = setInterval(() => (peak = Math.max(peak, rssMib())), 100);
        const t0 = performance.now();
        const err = await WAYS[way](os, `obj-${r}`, data).then(() => undefined, (e: Error) => e.message);
        const seconds = (performance.now() - t0) / 1000;
        clearInterval(sampler);
        let stored = err === undefined;
        if (stored) {
          const back = await getBytes(os, `obj-${r}`);
          stored = back !== null && back.length === data.length && Buffer.compare(Buffer.from(back.buffer, back.byteOffset, back.length), data) === 0;
        }
        await os.delete(`obj-${r}`).catch(() => undefined);
        const t: Try = { way, stored, seconds: Number(seconds.toFixed(2)), rss_mib_before: before, rss_mib_peak: Math.max(peak, rssMib()) };
        if (stored) t.mb_per_s = Number((bytes / 1e6 / seconds).toFixed(1));
        if (err) t.error = err.slice(0, 300);
        tries.push(t);
        console.log(JSON.stringify(t));
      }
  } finally {
    await nc.close();
    await nats.stop();
  }
  load.after = loadavg().map((x) => Number(x.toFixed(2)));
  const result = {
    bench: "object_put", when: new Date().toISOString(), machine: { cpus: availableParallelism(), model: cpus()[0]?.model }, load,
    setup: { bytes, repeats, server: "embedded nats-server (file store)", client_default_timeout_ms: 5000 },
    tries,
  };
  const out = arg("out", "bench/results/object_put.json");
  await mkdir(dirname(out), { recursive: true });
  await writeFile(out, `${JSON.stringify(result, null, 2)}\n`);
  console.log(`wrote ${out}`);
}

void main().catch((e: unknown) => { console.error(e); process.exit(1); });

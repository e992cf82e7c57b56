/**
 * `ctrain worker`: an extraction worker against a NATS server. Serves /metrics, /healthz and /readyz
 * (ready once connected, bound to the job's queue and the model loaded). SIGTERM/SIGINT drain: the
 * shard in hand is finished and acked, then the process exits 0.
 */
import { Registry } from "prom-client";
import { selectBackend } from "../core/models/backend.js";
import { BACKENDS, type BackendName, ENGINE_PROVIDERS, type EngineProvider } from "../core/runtime/config.js";
import { ConfigError } from "../core/runtime/errors.js";
import { createLogger, type LogFormat } from "../core/runtime/log.js";
import { createMetrics, serveMetrics } from "../core/runtime/metrics.js";
import { connectNats, NATS_AUTH_FLAGS, natsAuthFrom } from "../core/runtime/nats_connect.js";
import { validateJobId, validateWorkerId } from "../proto/subjects.js";
import { defaultWorkerId, NatsWorker } from "../worker/nats_worker.js";

export const WORKER_HELP = `usage: ctrain worker --nats URL [--job ID|any] [options]

Pulls feature-extraction shards of a job from NATS, extracts them, stores the features.
When the coordinator publishes a fine-tuning spec, it also trains as a data-parallel replica.

options:
  --nats URL                 NATS server(s), comma-separated (required)
  --job ID|any               job to serve; any = whichever job has tasks queued [default any]
  --worker-id ID             name in the registry, logs and metrics [default <host>-<pid>]
  --backend NAME             ${BACKENDS.join("|")} [default auto]
  --batch-size N             images per forward pass [default 32]
  --threads N                onnxruntime threads when the job leaves it to the worker [default: cores]
  --engine-provider P        onnxruntime execution provider: auto|cpu|cuda [default auto: cuda when installed]
  --metrics-port N           port of /metrics, /healthz, /readyz (0 = free port, -1 = off) [default 0]
  --metrics-host HOST        address to bind; 0.0.0.0 to be scraped from other hosts [default 127.0.0.1]
  --log-format FMT           auto|json|human [default auto]
  --nats-user U              with CTRAIN_NATS_PASS (or --nats-pass); or --nats-token T, --nats-creds FILE,
                             --nats-nkey SEEDFILE; TLS: --nats-tls-ca, --nats-tls-cert, --nats-tls-key
                             (every flag also reads CTRAIN_NATS_<NAME>)`;

const FLAGS = ["nats", "job", "worker-id", "backend", "batch-size", "threads", "engine-provider", "metrics-port", "metrics-host", "log-format", ...NATS_AUTH_FLAGS];

function intFlag(v: string | true | undefined, name: string, def: number, min: number, max: number): number {
  if (v === undefined) return def;
  const n = Number(v);
  if (!Number.isInteger(n) || n < min || n > max) throw new ConfigError(`--${name} must be a whole number in ${min}..${max}, got ${JSON.stringify(v)}.`);
  return n;
}

export async function main(argv: string[]): Promise<number> {
  // Worker flags are not job options: parse them here (job options come from the JobSpec on NATS).
  const extra: Record<string, string | true> = {};
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    if (a === "--help" || a === "-h") {
      console.log(WORKER_HELP);
      return 0;
    }
    if (!a.startsWith("--")) throw new ConfigError(`ctrain worker: unexpected argument ${JSON.stringify(a)}.`);
    let name = a.slice(2);
    let value: string | undefined;
    const eq = name.indexOf("=");
    if (eq >= 0) [name, value] = [name.slice(0, eq), name.slice(eq + 1)];
    if (!FLAGS.includes(name)) throw new ConfigError(`ctrain worker: unknown option --${name}. Run ctrain worker --help.`);
    if (value === undefined) {
      value = argv[++i];
      if (value === undefined) throw new ConfigError(`--${name} needs a value.`);
    }
    extra[name] = value;
  }
  const nats = typeof extra.nats === "string" ? extra.nats : process.env.CTRAIN_NATS_URL;
  if (!nats) throw new ConfigError(`ctrain worker needs --nats URL (or CTRAIN_NATS_URL).`);
  const natsUrl: string = nats;
  const job = typeof extra.job === "string" ? extra.job : "any";
  if (job !== "any") validateJobId(job);
  const workerId = validateWorkerId(typeof extra["worker-id"] === "string" ? extra["worker-id"] : defaultWorkerId());
  const backendName = (typeof extra.backend === "string" ? extra.backend : "auto") as BackendName;
  if (!BACKENDS.includes(backendName)) throw new ConfigError(`--backend must be one of ${BACKENDS.join(", ")}; got ${JSON.stringify(backendName)}.`);
  const batchSize = intFlag(extra["batch-size"], "batch-size", 32, 1, 4096);
  const threads = intFlag(extra["threads"], "threads", 0, 0, 1024) || undefined;
  const provider = (typeof extra["engine-provider"] === "string" ? extra["engine-provider"] : "auto") as EngineProvider;
  if (!ENGINE_PROVIDERS.includes(provider)) throw new ConfigError(`--engine-provider must be one of ${ENGINE_PROVIDERS.join(", ")}; got ${JSON.stringify(provider)}.`);
  const metricsPort = intFlag(extra["metrics-port"], "metrics-port", 0, -1, 65535);
  const format = (typeof extra["log-format"] === "string" ? extra["log-format"] : "auto") as LogFormat;
  const auth = natsAuthFrom(extra);

  const log = createLogger({ job, worker: workerId, format });
  const registry = new Registry();
  const metrics = createMetrics(registry, { job, worker: workerId });
  let worker: NatsWorker | undefined;
  const server = metricsPort >= 0
    ? await serveMetrics(registry, metricsPort, typeof extra["metrics-host"] === "string" ? extra["metrics-host"] : "127.0.0.1", { ready: () => worker?.isReady() ?? false })
    : undefined;
  if (server) log.info("serving metrics", { url: server.url, port: server.port, listen: server.listen });

  try {
    return await serve();
  } finally {
    await server?.close();
  }

  async function serve(): Promise<number> {
    const backend = await selectBackend(backendName);
    metrics.setBackend(backend.name);
    const nc = await connectNats(natsUrl, auth, { name: `ctrain-worker-${workerId}`, onRetry: (e) => log.warn("NATS not reachable yet, retrying", { error: e.message }) });
    log.info("connected to NATS", { server: nc.getServer(), backend: backend.name });
    void (async () => {
      for await (const s of nc.status()) {
        if (s.type === "disconnect" || s.type === "reconnect") log.info(`NATS ${s.type}`, { server: String(s.data) });
      }
    })();
    worker = new NatsWorker({ nc, job, workerId, log, metrics, backend: backend.name, batchSize, threads, provider });
    let signals = 0;
    const onSignal = (sig: NodeJS.Signals): void => {
      signals++;
      if (signals > 1) {
        log.warn("second signal: exiting without draining", { signal: sig });
        process.exit(130);
      }
      log.info("signal: draining", { signal: sig });
      void worker!.drain();
    };
    process.on("SIGTERM", onSignal);
    process.on("SIGINT", onSignal);
    await worker.start();
    const err = await worker.closed();
    await nc.drain().catch(() => undefined);
    return err ? 1 : 0;
  }
}

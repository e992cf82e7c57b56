/**
 * `ctrain worker`: an extraction worker against a NATS server. Serves /metrics, /healthz and /readyz
 * (ready once connected, bound to the job's queue and the model loaded). SIGTERM/SIGINT drain: the
 * shard in hand is finished and acked, then the process exits 0.
 */
import { Registry } from "prom-client";
import { selectBackend } from "../core/models/backend.js";
import { checkEnvironment, envHelp, parseWorkerArgs, workerOptionsHelp } from "../core/runtime/config.js";
import { ConfigError } from "../core/runtime/errors.js";
import { createLogger } from "../core/runtime/log.js";
import { createMetrics, serveMetrics } from "../core/runtime/metrics.js";
import { connectNats, NATS_AUTH_FLAGS, natsAuthFrom } from "../core/runtime/nats_connect.js";
import { validateJobId, validateWorkerId } from "../proto/subjects.js";
import { defaultWorkerId, NatsWorker } from "../worker/nats_worker.js";

export const WORKER_HELP = `usage: ctrain worker --nats URL [--job ID|any] [options]

Pulls feature-extraction shards of a job from NATS, extracts them, stores the features.
When the coordinator publishes a fine-tuning spec, it also trains as a data-parallel replica.
The job's settings (model, input size, images per forward pass...) come from the coordinator
with each task; these are the worker's own.

options (flag, or the environment variable shown):
${workerOptionsHelp()}
  --nats-user U                with CTRAIN_NATS_PASS (or --nats-pass); or --nats-token T, --nats-creds FILE,
                               --nats-nkey SEEDFILE; TLS: --nats-tls-ca, --nats-tls-cert, --nats-tls-key

environment:
${envHelp("worker")}`;

export async function main(argv: string[]): Promise<number> {
  const { options: o, extra, help } = parseWorkerArgs(argv, NATS_AUTH_FLAGS);
  if (help) {
    console.log(WORKER_HELP);
    return 0;
  }
  checkEnvironment("worker");
  if (!o.nats) throw new ConfigError(`ctrain worker needs --nats URL (or CTRAIN_NATS_URL).`);
  const natsUrl = o.nats;
  const job = o.job;
  if (job !== "any") validateJobId(job);
  const workerId = validateWorkerId(o.workerId || defaultWorkerId());
  const format = o.logFormat;
  const auth = natsAuthFrom(extra);

  const log = createLogger({ job, worker: workerId, format });
  const registry = new Registry();
  const metrics = createMetrics(registry, { job, worker: workerId });
  let worker: NatsWorker | undefined;
  const server = o.metricsPort >= 0
    ? await serveMetrics(registry, o.metricsPort, o.metricsHost, { ready: () => worker?.isReady() ?? false })
    : undefined;
  if (server) log.info("serving metrics", { url: server.url, port: server.port, listen: server.listen });

  try {
    return await serve();
  } finally {
    await server?.close();
  }

  async function serve(): Promise<number> {
    const backend = await selectBackend(o.backend);
    metrics.setBackend(backend.name);
    const nc = await connectNats(natsUrl, auth, { name: `ctrain-worker-${workerId}`, onRetry: (e) => log.warn("NATS not reachable yet, retrying", { error: e.message }) });
    log.info("connected to NATS", { server: nc.getServer(), backend: backend.name });
    void (async () => {
      for await (const s of nc.status()) {
        if (s.type === "disconnect" || s.type === "reconnect") log.info(`NATS ${s.type}`, { server: String(s.data) });
      }
    })();
    // Images per forward pass come with each extraction round (the job's --extract-batch-size).
    worker = new NatsWorker({ nc, job, workerId, log, metrics, backend: backend.name, threads: o.threads || undefined, provider: o.engineProvider });
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

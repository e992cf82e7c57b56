/**
 * `ctrain coordinator`: the whole job against an existing NATS (--nats URL); feature extraction is
 * done by `ctrain worker` processes elsewhere, through the NATS shard executor plugged into runJob.
 * Re-running with the same --job resumes: shards in the local cache or in the job's object store are
 * not extracted again.
 */
import { join } from "node:path";
import { Registry } from "prom-client";
import { loadOptions, optionsHelp, parseArgs, type JobOptions } from "../core/runtime/config.js";
import { ConfigError } from "../core/runtime/errors.js";
import { DEFAULT_ACK_WAIT_MS, DEFAULT_MAX_DELIVER } from "../proto/extraction_wire.js";
import { createLogger, type Logger } from "../core/runtime/log.js";
import { createMetrics, serveMetrics, type CtrainMetrics } from "../core/runtime/metrics.js";
import { connectNats, NATS_AUTH_FLAGS, natsAuthFrom, type NatsAuth } from "../core/runtime/nats_connect.js";
import { runJob, type JobSummary } from "../coordinator/job.js";
import { natsExecutorFactory } from "../coordinator/nats_executor.js";
import { launchWorkers } from "../coordinator/launch_workers.js";
import { preflight } from "../coordinator/preflight.js";

export const COORDINATOR_FLAGS = [...NATS_AUTH_FLAGS, "ack-wait", "max-deliver", "metrics-host", "data-parallel"] as const;

export const COORDINATOR_HELP = `usage: ctrain coordinator --nats URL [options] [--config job.yaml]

Runs the job against an existing NATS server; start \`ctrain worker --nats URL --job <id>\` processes
anywhere that sees the same NATS and data set. Same --job again resumes an interrupted job.

coordinator options:
  --ack-wait SECONDS         a task not acked (or in-progress acked) for this long is redelivered [default ${DEFAULT_ACK_WAIT_MS / 1000}]
  --max-deliver N            deliveries of a task before the job fails naming the shard [default ${DEFAULT_MAX_DELIVER}]
  --metrics-host HOST        address of /metrics [default 127.0.0.1]
  --data-parallel on|off|auto  fine-tune data-parallel on the workers (auto: when --workers > 1) [default auto]
  --nats-user U              with CTRAIN_NATS_PASS (or --nats-pass); or --nats-token, --nats-creds FILE,
                             --nats-nkey SEEDFILE; TLS: --nats-tls-ca, --nats-tls-cert, --nats-tls-key

job options:
${optionsHelp()}`;

export interface DistributedJobOptions {
  log: Logger;
  metrics?: CtrainMetrics;
  auth: NatsAuth;
  ackWaitMs?: number;
  maxDeliver?: number;
  /** Workers to report in the summary. */
  workers?: number;
  /** Fine-tune data-parallel on the workers. Default: when opts.workers > 1. */
  dataParallel?: boolean;
}

/** runJob with the NATS executor: connects, runs, drains. */
export async function runDistributedJob(opts: JobOptions, d: DistributedJobOptions): Promise<JobSummary> {
  if (!opts.nats) throw new ConfigError(`the distributed job needs --nats URL.`);
  const { log } = d;
  const nc = await connectNats(opts.nats, d.auth, { name: `ctrain-coordinator-${opts.job}`, onRetry: (e) => log.warn("NATS not reachable yet, retrying", { error: e.message }) });
  log.info("connected to NATS", { server: nc.getServer() });
  void (async () => {
    for await (const s of nc.status()) if (s.type === "disconnect" || s.type === "reconnect") log.info(`NATS ${s.type}`, { server: String(s.data) });
  })();
  try {
    const executor = natsExecutorFactory({ nc, opts, log, metrics: d.metrics, ackWaitMs: d.ackWaitMs, maxDeliver: d.maxDeliver, workers: d.workers });
    const workers = d.workers ?? opts.workers;
    const dataParallel = (d.dataParallel ?? workers > 1) ? async () => ({ nc, workers }) : undefined;
    return await runJob(opts, { log, metrics: d.metrics, executor, workers, dataParallel });
  } finally {
    await nc.drain().catch(() => undefined);
  }
}

function positiveNumber(v: string | true | undefined, name: string): number | undefined {
  if (v === undefined) return undefined;
  const n = Number(v);
  if (!Number.isFinite(n) || n <= 0) throw new ConfigError(`--${name} must be a positive number, got ${JSON.stringify(v)}.`);
  return n;
}

export async function main(argv: string[]): Promise<number> {
  const parsed = parseArgs(argv, COORDINATOR_FLAGS, ["help"]);
  if (parsed.extra["help"]) {
    console.log(COORDINATOR_HELP);
    return 0;
  }
  if (parsed.positionals.length > 0) throw new ConfigError(`ctrain coordinator: unexpected argument ${JSON.stringify(parsed.positionals[0])}; options start with --.`);
  const opts = loadOptions(parsed);
  if (!opts.nats) throw new ConfigError(`ctrain coordinator needs --nats URL (use ctrain run for a job on this machine alone).`);
  const auth = natsAuthFrom(parsed.extra);
  const ackWait = positiveNumber(parsed.extra["ack-wait"], "ack-wait");
  const maxDeliver = positiveNumber(parsed.extra["max-deliver"], "max-deliver");
  const dpFlag = parsed.extra["data-parallel"] ?? "auto";
  if (dpFlag !== "on" && dpFlag !== "off" && dpFlag !== "auto") throw new ConfigError(`--data-parallel must be on, off or auto, got ${JSON.stringify(dpFlag)}.`);
  const dataParallel = dpFlag === "auto" ? undefined : dpFlag === "on";
  await preflight(opts, { dataParallelWorkers: dataParallel ?? opts.workers > 1 ? opts.workers : 0 });
  const log = createLogger({ job: opts.job, format: opts.logFormat });
  const registry = new Registry();
  const metrics = createMetrics(registry, { job: opts.job });
  const host = typeof parsed.extra["metrics-host"] === "string" ? parsed.extra["metrics-host"] : "127.0.0.1";
  const server = opts.metricsPort >= 0 ? await serveMetrics(registry, opts.metricsPort, host) : undefined;
  if (server) log.info("serving metrics", { url: server.url, port: server.port, listen: server.listen });
  const workers = await launchWorkers(opts, log);
  try {
    const summary = await runDistributedJob(opts, { log, metrics, auth, ackWaitMs: ackWait !== undefined ? ackWait * 1000 : undefined, maxDeliver: maxDeliver !== undefined ? Math.round(maxDeliver) : undefined, dataParallel });
    printSummary(summary, opts);
    return 0;
  } finally {
    await workers.stop().catch((err: unknown) => log.error("scaling workers to zero failed", { error: err as Error }));
    await server?.close();
  }
}

/** A percentage with one decimal. */
const pct = (x: number): string => `${(x * 100).toFixed(1)}%`;

/**
 * The last thing a run prints: every phase that ran with its test and validation accuracy, where
 * the features came from, what was skipped, and which model was saved where.
 */
export function printSummary(summary: JobSummary, opts: JobOptions): void {
  const { head, fine_tune: ft } = summary.phases;
  const x = summary.extraction;
  const who = summary.workers === 0 ? "no worker started" : summary.workers === 1 ? "in this process" : `${summary.workers} workers`;
  const phase = (name: string, p: typeof head): string =>
    `  ${name.padEnd(10)} test accuracy ${pct(p.test_accuracy)}, ${Number.isFinite(p.val_accuracy) ? `val ${pct(p.val_accuracy)}` : "no validation"} (${p.epochs}/${p.epochs_asked} epochs, ${p.seconds.toFixed(1)} s)`;
  const lines = [
    `\njob ${summary.job} done in ${summary.seconds.toFixed(1)} s (frozen passes on ${summary.engine.name}, training on ${summary.backend}, ${who})`,
    `  features   ${x.cache_hit ? `from the cache (${summary.samples.train + summary.samples.val + summary.samples.test} samples)` : `${x.images} images extracted at ${x.images_per_second} img/s`}, ${summary.skipped_inputs.length} inputs skipped${summary.skipped_inputs.length ? " (listed in summary.json)" : ""}`,
    phase("head", head),
    ...(ft ? [phase("fine-tune", ft)] : []),
    ft
      ? `  saved      ${join(opts.out, "model")} (fine-tuned, test ${pct(ft.test_accuracy)}); head only: ${join(opts.out, "model-head")} (test ${pct(head.test_accuracy)})`
      : `  saved      ${join(opts.out, "model")} (test ${pct(head.test_accuracy)})`,
    `run folder: ${opts.out} (history.json, summary.json, report.html, job.yaml)`,
  ];
  console.log(lines.join("\n"));
}

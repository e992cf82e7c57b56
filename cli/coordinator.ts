/**
 * `ctrain coordinator`: the whole job against an existing NATS (--nats URL); feature extraction is
 * done by `ctrain worker` processes elsewhere, through the NATS shard executor plugged into runJob.
 * Re-running with the same --job resumes: shards in the local cache or in the job's object store are
 * not extracted again.
 */
import { join } from "node:path";
import { Registry } from "prom-client";
import { checkEnvironment, envHelp, fineTunesDataParallel, loadOptions, type OptionRow, optionsHelp, parseArgs, readRows, rowsHelp, type JobOptions } from "../core/runtime/config.js";
import { ConfigError } from "../core/runtime/errors.js";
import { DEFAULT_ACK_WAIT_MS, DEFAULT_MAX_DELIVER } from "../proto/extraction_wire.js";
import { createLogger } from "../core/runtime/log.js";
import { createMetrics, serveMetrics } from "../core/runtime/metrics.js";
import { connectNats, NATS_AUTH_FLAGS, natsAuthFrom } from "../core/runtime/nats_connect.js";
import { runJob, type JobSummary } from "../coordinator/job.js";
import { launchWorkers } from "../coordinator/launch_workers.js";
import { preflight } from "../coordinator/preflight.js";
import { natsCluster } from "./cluster.js";

/** `ctrain coordinator`'s own settings (the job's are the job table's). */
interface CoordinatorSettings {
  /** Seconds a task may go unacked before it is redelivered. */
  ackWait: number;
  /** Deliveries of a task before the job fails naming the shard. */
  maxDeliver: number;
  /** Address /metrics binds to. */
  metricsHost: string;
}

/** The table of `ctrain coordinator`'s own flags, in `--help` order. */
export const COORDINATOR_OPTION_SPECS: readonly OptionRow[] = [
  { key: "ackWait", kind: "number", help: "seconds a task may go unacked (or in-progress acked) before it is redelivered", default: () => DEFAULT_ACK_WAIT_MS / 1000, min: 0.001, max: 86_400 },
  { key: "maxDeliver", kind: "int", help: "deliveries of a task before the job fails naming the shard", default: () => DEFAULT_MAX_DELIVER, min: 1, max: 10_000 },
  { key: "metricsHost", kind: "string", help: "address of /metrics (0.0.0.0 to be scraped from other hosts)", default: () => "127.0.0.1" },
];

export const COORDINATOR_FLAGS = [...NATS_AUTH_FLAGS, "ack-wait", "max-deliver", "metrics-host"] as const;

export const COORDINATOR_HELP = `usage: ctrain coordinator --nats URL [options] [--config job.yaml]

Runs the job against an existing NATS server; start \`ctrain worker --nats URL --job <id>\` processes
anywhere that sees the same NATS and data set. Same --job again resumes an interrupted job.

coordinator options:
${rowsHelp(COORDINATOR_OPTION_SPECS)}
  --nats-user U              with CTRAIN_NATS_PASS (or --nats-pass); or --nats-token, --nats-creds FILE,
                             --nats-nkey SEEDFILE; TLS: --nats-tls-ca, --nats-tls-cert, --nats-tls-key

job options (flag, YAML key, or the environment variable shown):
${optionsHelp()}

environment:
${envHelp("coordinator")}`;

export async function main(argv: string[]): Promise<number> {
  const parsed = parseArgs(argv, COORDINATOR_FLAGS, ["help"]);
  if (parsed.extra["help"]) {
    console.log(COORDINATOR_HELP);
    return 0;
  }
  if (parsed.positionals.length > 0) throw new ConfigError(`ctrain coordinator: unexpected argument ${JSON.stringify(parsed.positionals[0])}; options start with --.`);
  checkEnvironment("coordinator");
  const opts = loadOptions(parsed);
  if (!opts.nats) throw new ConfigError(`ctrain coordinator needs --nats URL (use ctrain run for a job on this machine alone).`);
  const auth = natsAuthFrom(parsed.extra);
  const own = readRows(COORDINATOR_OPTION_SPECS, parsed.extra) as unknown as CoordinatorSettings;
  const { dataset } = await preflight(opts, { dataParallelWorkers: fineTunesDataParallel(opts) ? opts.workers : 0 });
  const log = createLogger({ job: opts.job, format: opts.logFormat });
  const registry = new Registry();
  const metrics = createMetrics(registry, { job: opts.job });
  const server = opts.metricsPort >= 0 ? await serveMetrics(registry, opts.metricsPort, own.metricsHost) : undefined;
  if (server) log.info("serving metrics", { url: server.url, port: server.port, listen: server.listen });
  const workers = await launchWorkers(opts, log);
  try {
    const nc = await connectNats(opts.nats, auth, { name: `ctrain-coordinator-${opts.job}`, onRetry: (e) => log.warn("NATS not reachable yet, retrying", { error: e.message }) });
    log.info("connected to NATS", { server: nc.getServer() });
    void (async () => {
      for await (const s of nc.status()) if (s.type === "disconnect" || s.type === "reconnect") log.info(`NATS ${s.type}`, { server: String(s.data) });
    })();
    let summary: JobSummary;
    try {
      const cluster = natsCluster(opts, { connect: async () => nc, log, metrics, ackWaitMs: own.ackWait * 1000, maxDeliver: own.maxDeliver });
      summary = await runJob(opts, { log, metrics, cluster, dataset });
    } finally {
      await nc.drain().catch(() => undefined);
    }
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

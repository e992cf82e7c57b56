/**
 * `ctrain run`: the whole job on this machine. Options are validated before any work starts; a
 * /metrics endpoint is served while the job runs (`--metrics-port`, 0 = a free port).
 *
 * With `--workers 1` and no `--nats` the job extracts in this process (no broker, no child: the
 * cheapest way to use one core, and the reference the distributed path is tested against).
 * Otherwise it is the distributed job on one machine (cli/local_processes.ts): an embedded
 * nats-server on a free port (unless `--nats` names one), N `ctrain worker` child processes, and the
 * coordinator here. Everything it started is stopped on the way out, on success, on error and on
 * Ctrl-C. The /metrics address of every process goes to the log and to
 * `<parent of out>/ctrain-targets/<job>.json` ({@link targetsFileOf}; Prometheus file_sd, which
 * deploy/prometheus/prometheus.yml watches for the default `runs/<job>`).
 */
import { mkdir } from "node:fs/promises";
import { dirname, join, resolve } from "node:path";
import { Registry } from "prom-client";
import type { NatsConnection } from "nats";
import { checkEnvironment, envHelp, fineTunesDataParallel, loadOptions, optionsHelp, parseArgs, type JobOptions } from "../core/runtime/config.js";
import { ConfigError, WorkersUnavailableError } from "../core/runtime/errors.js";
import { createLogger, type Logger } from "../core/runtime/log.js";
import { createMetrics, serveMetrics, writeScrapeTargets, type ScrapeTarget } from "../core/runtime/metrics.js";
import { connectNats, NATS_AUTH_FLAGS, natsAuthFrom, type NatsAuth } from "../core/runtime/nats_connect.js";
import { preflight } from "../coordinator/preflight.js";
import { runJob, type JobCluster, type JobSummary } from "../coordinator/job.js";
import { inProcessCluster, natsCluster, runsOnWorkers } from "./cluster.js";
import { answers, startLocalCluster, type LocalCluster } from "./local_processes.js";
import { printSummary } from "./coordinator.js";

export const RUN_HELP = `usage: ctrain run [options] [--config job.yaml]

Runs the whole job on this machine and writes model/, history.json, summary.json and report.html
into --out. With --workers N > 1 (default: one per core) it starts a private nats-server (or uses
--nats URL) and N \`ctrain worker\` processes for feature extraction; --workers 1 extracts in-process.
Prometheus targets of every process are written to <parent of --out>/ctrain-targets/<job>.json
(runs/ctrain-targets/ by default, which deploy/prometheus/prometheus.yml watches).

options (flag, YAML key, or the environment variable shown):
${optionsHelp()}
  --verbose                    show the workers' info lines on the terminal too (default: their warnings and errors)
  --nats-user, --nats-pass, --nats-token, --nats-creds, --nats-nkey, --nats-tls-ca/cert/key: credentials for --nats

environment:
${envHelp("run")}`;

/**
 * The run's Prometheus file_sd targets: one file per job in a `ctrain-targets/` folder next to the run
 * folder, so one glob (`runs/ctrain-targets/*.json` in the shipped prometheus.yml) finds every run
 * under `runs/`. File discovery globs only the last path segment: `runs/*\/ctrain-targets.json` cannot be watched.
 */
export function targetsFileOf(opts: Pick<JobOptions, "out" | "job">): string {
  return join(dirname(resolve(opts.out)), "ctrain-targets", `${opts.job}.json`);
}

/** The scrape-targets file of a run: the coordinator from the start, each worker once it answers; emptied at the end. */
class ScrapeTargets {
  private readonly targets: ScrapeTarget[] = [];
  private writing = Promise.resolve();
  private closed = false;

  constructor(readonly file: string, private readonly opts: JobOptions, private readonly log: Logger) {}

  async add(address: string, worker: string): Promise<void> {
    this.targets.push({ address, job: this.opts.job, worker });
    this.writing = this.writing.then(() => (this.closed ? undefined : writeScrapeTargets(this.file, this.targets)));
    await this.writing;
  }

  /**
   * A worker enters once it answers, so Prometheus never scrapes a port that is not open yet (a
   * worker loads tfjs before it listens) and CtrainWorkerDown stays quiet.
   */
  async addWorkers(cluster: LocalCluster): Promise<void> {
    await Promise.all(cluster.workers.filter((w) => w.metricsPort > 0).map(async (w) => {
      if (!(await answers(w.metricsPort, w.proc, 120_000))) {
        if (w.proc.exitCode === null && w.proc.signalCode === null) this.log.warn("worker metrics endpoint does not answer: not a scrape target", { worker: w.id, port: w.metricsPort });
        return;
      }
      await this.add(`127.0.0.1:${w.metricsPort}`, w.id);
    }));
    if (!this.closed) this.log.info("metrics endpoints", { targets: this.targets.map((t) => `${t.worker}=http://${t.address}/metrics`), prometheus_file_sd: this.file });
  }

  /** Processes that are gone leave Prometheus' file discovery, so a finished job is not "down". */
  async close(): Promise<void> {
    this.closed = true; // no late addition after this
    await writeScrapeTargets(this.file, []).catch((err: unknown) => this.log.warn("clearing the scrape targets failed", { error: err as Error }));
  }
}

/** The run's workers and NATS, started on first use: a cache hit or a config refused by runJob starts no process. */
class LocalWorkers {
  private cluster?: LocalCluster & { url: string; auth: NatsAuth };
  private nc?: NatsConnection;
  private starting?: Promise<NatsConnection>;
  readonly lost = new AbortController();

  constructor(private readonly opts: JobOptions, private readonly auth: NatsAuth, private readonly log: Logger, private readonly verbose: boolean, private readonly targets: ScrapeTargets | undefined, private readonly onNatsLost: () => void) {}

  /** The job's connection to NATS, starting the embedded server and the worker processes the first time. */
  connect(): Promise<NatsConnection> {
    this.starting ??= this.start();
    return this.starting;
  }

  private async start(): Promise<NatsConnection> {
    const { opts, log } = this;
    this.cluster = await startLocalCluster(opts, this.auth, log, () => this.lost.abort(new WorkersUnavailableError(`every local worker process exited; see their errors above`)), (e) => {
      log.error("embedded nats-server lost", { error: e });
      this.lost.abort(e);
      this.onNatsLost();
    }, this.verbose);
    await mkdir(opts.out, { recursive: true });
    if (this.targets) void this.targets.addWorkers(this.cluster).catch((err: unknown) => log.warn("writing the scrape targets failed", { error: err as Error }));
    const nc = await connectNats(this.cluster.url, this.cluster.auth, { name: `ctrain-coordinator-${opts.job}` });
    this.nc = nc;
    void (async () => {
      for await (const s of nc.status()) if (s.type === "disconnect" || s.type === "reconnect") log.info(`NATS ${s.type}`, { server: String(s.data) });
    })();
    return nc;
  }

  async stop(): Promise<void> {
    await this.nc?.drain().catch(() => undefined);
    await this.cluster?.stop().catch((err: unknown) => this.log.warn("stopping local workers failed", { error: err as Error }));
  }
}

export async function main(argv: string[]): Promise<number> {
  const parsed = parseArgs(argv, [...NATS_AUTH_FLAGS], ["help", "verbose"]);
  if (parsed.extra["help"]) {
    console.log(RUN_HELP);
    return 0;
  }
  if (parsed.positionals.length > 0) throw new ConfigError(`ctrain run: unexpected argument ${JSON.stringify(parsed.positionals[0])}; options start with --.`);
  checkEnvironment("run");
  const opts = loadOptions(parsed);
  const auth = natsAuthFrom(parsed.extra);
  // Refuse a job that cannot run before starting nats-server and workers or writing anything.
  const { dataset } = await preflight(opts, { localWorkers: opts.workers, dataParallelWorkers: runsOnWorkers(opts) && fineTunesDataParallel(opts) ? opts.workers : 0 });
  const log = createLogger({ job: opts.job, format: opts.logFormat });
  const registry = new Registry();
  const metrics = createMetrics(registry, { job: opts.job });
  const server = opts.metricsPort >= 0 ? await serveMetrics(registry, opts.metricsPort, "127.0.0.1") : undefined;
  if (server) log.info("serving metrics", { url: server.url });
  // The coordinator is a target from the start, also on a cache hit that starts no other process.
  const targets = server ? new ScrapeTargets(targetsFileOf(opts), opts, log) : undefined;
  if (server && targets) {
    await mkdir(dirname(targets.file), { recursive: true });
    await targets.add(`127.0.0.1:${server.port}`, "coordinator");
    log.info("prometheus targets", { prometheus_file_sd: targets.file });
  }
  const cleanup = async (): Promise<void> => {
    await targets?.close();
    await workers.stop();
    await server?.close().catch(() => undefined);
  };
  // Fine-tuning waits on NATS and has no abort signal: a lost nats-server ends the job here, within seconds, with the message.
  const workers = new LocalWorkers(opts, auth, log, parsed.extra["verbose"] !== undefined, targets, () => setTimeout(() => void cleanup().finally(() => process.exit(1)), 5000).unref());
  const onSignal = (sig: NodeJS.Signals): void => {
    log.warn("interrupted: stopping workers and NATS", { signal: sig });
    void cleanup().finally(() => process.exit(130));
  };
  process.once("SIGINT", onSignal);
  process.once("SIGTERM", onSignal);
  const cluster: JobCluster = runsOnWorkers(opts)
    ? natsCluster(opts, { connect: () => workers.connect(), log, metrics, signal: workers.lost.signal })
    : inProcessCluster(opts, metrics);
  let summary: JobSummary;
  try {
    summary = await runJob(opts, { log, metrics, cluster, dataset });
  } finally {
    process.off("SIGINT", onSignal);
    process.off("SIGTERM", onSignal);
    await cleanup();
  }
  // After the workers and NATS are stopped, so their last lines come before it: the summary is the end.
  printSummary(summary, opts);
  return 0;
}

/**
 * `ctrain run`: the whole job on this machine. Options are validated before any work starts; a
 * /metrics endpoint is served while the job runs (`--metrics-port`, 0 = a free port).
 */
import { Registry } from "prom-client";
import { loadOptions, optionsHelp, parseArgs } from "../core/config.js";
import { createLogger } from "../core/log.js";
import { createMetrics, serveMetrics } from "../core/metrics.js";
import { runJob } from "../coordinator/job.js";

export const RUN_HELP = `usage: ctrain run [options] [--config job.yaml]

Runs the whole job on this machine and writes model/, history.json, summary.json and report.html
into --out.

options:
${optionsHelp()}`;

export async function main(argv: string[]): Promise<number> {
  const parsed = parseArgs(argv, [], ["help"]);
  if (parsed.extra["help"]) {
    console.log(RUN_HELP);
    return 0;
  }
  if (parsed.positionals.length > 0) {
    console.error(`ctrain run: unexpected argument ${JSON.stringify(parsed.positionals[0])}; options start with --.`);
    return 2;
  }
  const opts = loadOptions(parsed);
  const log = createLogger({ job: opts.job, format: opts.logFormat });
  const registry = new Registry();
  const metrics = createMetrics(registry, { job: opts.job });
  const server = opts.metricsPort >= 0 ? await serveMetrics(registry, opts.metricsPort, "127.0.0.1") : undefined;
  if (server) log.info("serving metrics", { url: server.url });
  try {
    const summary = await runJob(opts, { log, metrics });
    const h = summary.phases.head;
    console.log(
      `\njob ${summary.job} done in ${summary.seconds.toFixed(1)} s on ${summary.backend}: ` +
        `extraction ${summary.extraction.cache_hit ? "from cache" : `${summary.extraction.images} images at ${summary.extraction.images_per_second} img/s`}, ` +
        `head test accuracy ${(h.test_accuracy * 100).toFixed(1)}% (val ${(h.val_accuracy * 100).toFixed(1)}%), ` +
        `${summary.skipped_inputs.length} inputs skipped.\nrun folder: ${opts.out} (model/, history.json, summary.json, report.html)`,
    );
    return 0;
  } finally {
    await server?.close();
  }
}

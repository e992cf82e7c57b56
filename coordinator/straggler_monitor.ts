/**
 * The coordinator's side of straggler visibility: feeds the replicas' per-step timings (from their
 * TrainingReports) to the pure {@link StragglerDetector}, exports each replica's recent figures as
 * `ctrain_step_compute_seconds` / `ctrain_step_wait_seconds`, and logs a straggler by name when it
 * appears and when it recovers. Wired into coordinator/data_parallel.ts's report watch.
 */
import type { Logger } from "../core/runtime/log.js";
import type { CtrainMetrics } from "../core/runtime/metrics.js";
import type { TrainingReport } from "../proto/training_wire.js";
import { StragglerDetector, type StragglerOptions } from "./straggler_detector.js";

/** Options of {@link StragglerMonitor}. */
export interface StragglerMonitorOptions extends StragglerOptions {
  log: Logger;
  /** Where the per-worker figures go. Default: none. */
  metrics?: Pick<CtrainMetrics, "setStepTiming" | "removeStepTiming">;
}

/** Per-worker step timing from reports: metrics, and a log line per straggler. */
export class StragglerMonitor {
  readonly detector: StragglerDetector;
  private readonly log: Logger;
  private readonly metrics: StragglerMonitorOptions["metrics"];
  private readonly known = new Set<string>();

  constructor(opts: StragglerMonitorOptions) {
    this.detector = new StragglerDetector(opts);
    this.log = opts.log;
    this.metrics = opts.metrics;
  }

  /** Takes one decoded report (any state): the first from a worker starts its series at 0. */
  onReport(r: TrainingReport): void {
    if (!this.known.has(r.worker)) {
      this.known.add(r.worker);
      this.metrics?.setStepTiming(r.worker, 0, 0);
    }
    if (r.state === "evicted" || r.state === "failed") return this.forget(r.worker);
    if (!r.step_timings?.length) return;
    this.detector.observe(r.worker, r.step_timings.map((t) => ({ step: t.step, computeSeconds: t.compute_seconds, waitSeconds: t.wait_seconds })));
    const recent = this.detector.recent(r.worker);
    if (recent) this.metrics?.setStepTiming(r.worker, recent.computeSeconds, recent.waitSeconds);
    for (const e of this.detector.evaluate()) {
      const fields = { worker: e.worker, compute_seconds: round(e.computeSeconds), median_compute_seconds: round(e.medianSeconds) };
      // Fixed messages, the worker in a field: log processors and tests match on them.
      if (e.type === "straggler")
        this.log.warn("straggler", { ...fields, ratio: round(e.ratio), hint: `every step waits for ${e.worker}: check its node (CPU throttling, noisy neighbours, a stopped process)` });
      else this.log.info("straggler recovered", fields);
    }
  }

  /** A worker left the membership: its series and figures go. */
  forget(worker: string): void {
    this.detector.forget(worker);
    if (this.known.delete(worker)) this.metrics?.removeStepTiming(worker);
  }
}

function round(x: number): number {
  return Number(x.toFixed(4));
}

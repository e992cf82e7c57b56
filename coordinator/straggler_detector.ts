/**
 * Straggler detection for data-parallel fine-tuning: which replica's compute time per step stays well
 * above the others'. Synchronous SGD runs at the pace of its slowest member, so one slow node (a noisy
 * neighbour, thermal throttling, a stopped process) costs every worker its time; users of horovod and
 * DDP name this their first question ("who is slow?").
 *
 * Pure: it is fed the per-step timings the replicas report (TrainingReport.step_timings) and answers
 * with each worker's recent figures and with events when a worker becomes or stops being a straggler;
 * the coordinator (data_parallel.ts) logs the events and exports the figures as
 * `ctrain_step_compute_seconds` / `ctrain_step_wait_seconds`. The Prometheus rule CtrainStraggler
 * (deploy/prometheus/alerts.yml) applies the same test to those gauges.
 *
 * The test: a worker's recent compute time (the median of its last `window` steps, so one slow step,
 * a GC pause, does not count, but a worker slow on most recent steps does) is above `ratio` times the
 * median of every worker's recent compute time; it is reported recovered once it is back under half-way
 * (1.25x at ratio 1.5). A worker is judged once it has reported `minSteps` steps. With 2 workers the median is their mean, so the slow
 * one is flagged when it is over 3x the other at ratio 1.5; with 3 or more, the median is a typical
 * worker's.
 */

/** One step of one replica, as reported. */
export interface StepTiming {
  /** Global step number. */
  step: number;
  /** Seconds the replica computed (forward, backward, update): the step's wall time outside averaging. */
  computeSeconds: number;
  /** Seconds the replica spent in gradient averaging, most of it waiting for its peers' chunks. */
  waitSeconds: number;
}

/** Options of {@link StragglerDetector}. */
export interface StragglerOptions {
  /** A worker is a straggler above this many times the median. Default 1.5. */
  ratio?: number;
  /** Steps per worker the recent figures are the median of. Default 5. */
  window?: number;
  /** A worker is judged, and counts in the median, once it has reported this many steps (one or two early steps say little). Default min(3, window). */
  minSteps?: number;
}

/** A worker's recent figures: medians over its last steps, seconds. */
export interface RecentTiming {
  computeSeconds: number;
  waitSeconds: number;
  /** Steps the medians are over (fewer than the window at first). */
  steps: number;
}

/** What changed at an {@link StragglerDetector.evaluate}. */
export type StragglerEvent =
  | { type: "straggler"; worker: string; computeSeconds: number; medianSeconds: number; ratio: number }
  | { type: "recovered"; worker: string; computeSeconds: number; medianSeconds: number };

function median(xs: readonly number[]): number {
  if (xs.length === 0) return NaN;
  const s = [...xs].sort((a, b) => a - b);
  const m = s.length >> 1;
  return s.length % 2 ? s[m]! : (s[m - 1]! + s[m]!) / 2;
}

/** Recent per-worker step timings and the straggler test over them. */
export class StragglerDetector {
  readonly ratio: number;
  readonly window: number;
  readonly minSteps: number;
  private readonly steps = new Map<string, StepTiming[]>();
  private readonly flagged = new Set<string>();

  constructor(opts: StragglerOptions = {}) {
    this.ratio = opts.ratio ?? 1.5;
    this.window = opts.window ?? 5;
    this.minSteps = opts.minSteps ?? Math.min(3, this.window);
    if (!(this.ratio > 1)) throw new RangeError(`ratio must be > 1, got ${opts.ratio}`);
    if (!Number.isInteger(this.window) || this.window < 1) throw new RangeError(`window must be a positive integer, got ${opts.window}`);
    if (!Number.isInteger(this.minSteps) || this.minSteps < 1 || this.minSteps > this.window)
      throw new RangeError(`minSteps must be an integer from 1 to the window (${this.window}), got ${opts.minSteps}`);
  }

  /** Adds a worker's timings (any order; a step reported twice counts once, the later figure wins). Non-finite or negative figures are ignored. */
  observe(worker: string, timings: readonly StepTiming[]): void {
    const list = this.steps.get(worker) ?? [];
    for (const t of timings) {
      if (!(Number.isFinite(t.computeSeconds) && t.computeSeconds >= 0 && Number.isFinite(t.waitSeconds) && t.waitSeconds >= 0)) continue;
      const at = list.findIndex((x) => x.step === t.step);
      if (at >= 0) list[at] = { ...t };
      else list.push({ ...t });
    }
    list.sort((a, b) => a.step - b.step);
    this.steps.set(worker, list.slice(-this.window));
  }

  /** Forgets a worker (it left the membership); a flagged one is no longer reported. */
  forget(worker: string): void {
    this.steps.delete(worker);
    this.flagged.delete(worker);
  }

  /** Workers with figures, sorted. */
  workers(): string[] {
    return [...this.steps.keys()].filter((w) => this.steps.get(w)!.length > 0).sort();
  }

  /** A worker's recent figures, or undefined before its first step. */
  recent(worker: string): RecentTiming | undefined {
    const list = this.steps.get(worker);
    if (!list || list.length === 0) return undefined;
    return { computeSeconds: median(list.map((t) => t.computeSeconds)), waitSeconds: median(list.map((t) => t.waitSeconds)), steps: list.length };
  }

  /** Median over the judged workers (those with at least `minSteps` steps) of their recent compute seconds (NaN with none). */
  medianComputeSeconds(): number {
    return median(this.judged().map((w) => this.recent(w)!.computeSeconds));
  }

  private judged(): string[] {
    return this.workers().filter((w) => this.steps.get(w)!.length >= this.minSteps);
  }

  /** Workers flagged now, sorted. */
  stragglers(): string[] {
    return [...this.flagged].sort();
  }

  /** Applies the test to every judged worker; returns who became a straggler and who recovered since the last call. */
  evaluate(): StragglerEvent[] {
    const workers = this.judged();
    const med = this.medianComputeSeconds();
    const events: StragglerEvent[] = [];
    for (const w of workers) {
      const c = this.recent(w)!.computeSeconds;
      // Fewer than 2 workers: nobody to compare with. A zero median: nothing measurable yet.
      const comparable = workers.length >= 2 && med > 0;
      const slow = comparable && c > this.ratio * med;
      // Hysteresis: a flagged worker recovers only below half-way between the median and the ratio, so
      // one borderline step does not make the log flap.
      const recovered = !comparable || c <= (1 + (this.ratio - 1) / 2) * med;
      if (slow && !this.flagged.has(w)) {
        this.flagged.add(w);
        events.push({ type: "straggler", worker: w, computeSeconds: c, medianSeconds: med, ratio: c / med });
      } else if (recovered && this.flagged.has(w)) {
        this.flagged.delete(w);
        events.push({ type: "recovered", worker: w, computeSeconds: c, medianSeconds: med });
      }
    }
    return events;
  }
}

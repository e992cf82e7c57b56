/**
 * A replica's per-step split of wall time into compute and averaging (wait), batched for its
 * TrainingReports: the coordinator's straggler detection (coordinator/straggler_detector.ts) and the
 * ctrain_step_compute_seconds / ctrain_step_wait_seconds metrics are fed from them.
 *
 * Compute is the time from the end of the previous averaging to the start of this one (forward,
 * backward, the previous update, batch slicing); wait is the averaging itself, which on a healthy
 * loopback is mostly waiting for the slowest peer's chunks. A process that is stopped (SIGSTOP, a
 * long GC, a descheduled VM) while computing shows it as compute time, and its peers as wait time.
 *
 * The first step after {@link StepTimer.restart} (a stint's start: training begins, resumes or is
 * joined) is not recorded: its "compute" would carry the start-up (loading, the first batch, the
 * boundary decision) and make a healthy replica look slow.
 */

/** One step's split, as reported (TrainingReport.step_timings). */
export interface StepSplit {
  step: number;
  compute_seconds: number;
  wait_seconds: number;
}

/** Options of {@link StepTimer}. */
export interface StepTimerOptions {
  /** Least time between two reports of timings, milliseconds. Default 1000. */
  reportEveryMs?: number;
  /** Steps kept at most between reports (older ones are dropped). Default 256. */
  maxPending?: number;
  /** Clock in milliseconds. Default `performance.now`. */
  now?: () => number;
}

/** Times steps around the averaging call and hands out the splits in batches. */
export class StepTimer {
  private readonly reportEveryMs: number;
  private readonly maxPending: number;
  private readonly now: () => number;
  private lastEnd: number;
  private started: number | undefined;
  private lastReport: number;
  private pending: StepSplit[] = [];
  /** The next averaged step has no previous step to time from: not recorded. */
  private untimed = true;

  constructor(opts: StepTimerOptions = {}) {
    this.reportEveryMs = opts.reportEveryMs ?? 1000;
    this.maxPending = opts.maxPending ?? 256;
    this.now = opts.now ?? (() => performance.now());
    this.lastEnd = this.now();
    this.lastReport = this.lastEnd;
  }

  /** A stint starts (fit() begins): the next step is not recorded, the one after it is timed from its end. */
  restart(): void {
    this.untimed = true;
  }

  /** The step's gradients are computed; averaging starts (call once per step, before the first attempt). */
  averaging(): void {
    this.started = this.now();
  }

  /** Averaging of `step` ended; records its split (not the first step after a start or {@link restart}). */
  averaged(step: number): StepSplit {
    const end = this.now();
    const start = this.started ?? end;
    const split = { step, compute_seconds: Math.max(0, start - this.lastEnd) / 1000, wait_seconds: Math.max(0, end - start) / 1000 };
    this.lastEnd = end;
    this.started = undefined;
    if (this.untimed) {
      this.untimed = false;
      return split;
    }
    this.pending.push(split);
    if (this.pending.length > this.maxPending) this.pending.shift();
    return split;
  }

  /** The splits since the last take, when a report is due (`reportEveryMs` since the last); else undefined. */
  takeDue(): StepSplit[] | undefined {
    const t = this.now();
    if (this.pending.length === 0 || t - this.lastReport < this.reportEveryMs) return undefined;
    this.lastReport = t;
    const out = this.pending;
    this.pending = [];
    return out;
  }
}

/** Busy time of one prepared image batch (core/training/image_batches.ts BatchTiming), seconds. */
export interface BatchPrepTiming {
  rows: number;
  decode_augment_seconds: number;
  frozen_seconds: number;
}

/**
 * Sums of the image batches' busy time (decode + augment, frozen forward) for a replica's "training
 * done" summary. With prefetch, batch b+1 is prepared while step b trains, so these are busy times,
 * not parts of the wall step: compare them with it, do not subtract them from it.
 */
export class BatchPrepTimes {
  private batches = 0;
  private rows = 0;
  private decodeAugment = 0;
  private frozen = 0;

  /** Adds one prepared batch (an ImageBatchOptions.onTiming callback). */
  readonly add = (t: BatchPrepTiming): void => {
    this.batches++;
    this.rows += t.rows;
    this.decodeAugment += t.decode_augment_seconds;
    this.frozen += t.frozen_seconds;
  };

  /** The sums since the last take (empty when no image batch was prepared), and a reset. */
  take(): Record<string, number> {
    const out: Record<string, number> = this.batches === 0 ? {} : {
      prep_batches: this.batches, prep_rows: this.rows,
      decode_augment_seconds: Number(this.decodeAugment.toFixed(3)), frozen_forward_seconds: Number(this.frozen.toFixed(3)),
    };
    this.batches = this.rows = this.decodeAugment = this.frozen = 0;
    return out;
  }
}

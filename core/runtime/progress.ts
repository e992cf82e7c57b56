/**
 * Progress of a long phase (extraction, training) and the one owner of the terminal's last line.
 *
 * On a terminal a bar redraws in place; every other line written to the same stream (log lines,
 * through {@link writeAbove}) is printed above the live bar, which is then redrawn, so bars and logs
 * never overwrite each other. When the stream is not a terminal nothing but JSON is written: a bar
 * given a logger reports an `info` "progress" event every `intervalSeconds`, otherwise it is silent.
 */
import type { Logger } from "./log.js";

/** Whether bars are drawn on `stream` (a terminal); per-epoch log events can go to debug then. */
export function drawsBars(stream: TermStream = process.stderr): boolean {
  return stream.isTTY === true;
}

/** Something a bar and log lines are written to. */
export interface TermStream {
  write(chunk: string): unknown;
  isTTY?: boolean;
}

export interface ProgressOptions {
  /** Label at the left, e.g. "extract". */
  label: string;
  /** Total units (images, steps). */
  total: number;
  /** Unit name for the rate, e.g. "img". */
  unit: string;
  stream?: TermStream;
  /** Where progress goes when the stream is not a terminal (one JSON event per interval). Default: nowhere. */
  log?: Logger;
  /** Seconds between events when not a terminal. Default 10. */
  intervalSeconds?: number;
}

/** The bar line drawn last on each terminal stream, redrawn below anything written above it. */
const live = new Map<TermStream, string>();

/**
 * Writes whole lines (`text` ends with a newline) to `stream`; on a terminal with a live bar, above
 * the bar, which is redrawn after them.
 */
export function writeAbove(stream: TermStream, text: string): void {
  const bar = live.get(stream);
  if (bar === undefined) stream.write(text);
  else stream.write(`\r\x1b[K${text}${bar}`);
}

/** Ends every live bar's line where it stands (before an error is printed): later output starts on a line of its own. */
export function endLiveLines(): void {
  for (const stream of live.keys()) stream.write("\n");
  live.clear();
}

function clock(seconds: number): string {
  if (!Number.isFinite(seconds)) return "--:--";
  const s = Math.round(seconds);
  const h = Math.floor(s / 3600);
  const m = Math.floor((s % 3600) / 60);
  const ss = String(s % 60).padStart(2, "0");
  return h > 0 ? `${h}:${String(m).padStart(2, "0")}:${ss}` : `${m}:${ss}`;
}

export class Progress {
  private done = 0;
  private readonly start = performance.now();
  private lastDraw = 0;
  private readonly stream: TermStream;
  private readonly tty: boolean;
  private suffix = "";
  private finished = false;

  constructor(private readonly o: ProgressOptions) {
    this.stream = o.stream ?? process.stderr;
    this.tty = Boolean(this.stream.isTTY);
  }

  /** Units per second since the start. */
  rate(): number {
    const s = (performance.now() - this.start) / 1000;
    return s > 0 ? this.done / s : 0;
  }

  /** Seconds left at the current rate. */
  eta(): number {
    const r = this.rate();
    return r > 0 ? (this.o.total - this.done) / r : Infinity;
  }

  get value(): number {
    return this.done;
  }

  /** Adds `n` units; `suffix` (e.g. "loss 0.31") is shown after the rate. */
  tick(n: number, suffix?: string): void {
    this.set(this.done + n, suffix);
  }

  /** Moves to `done` units (progress reported as a position, e.g. a data-parallel step). */
  set(done: number, suffix?: string): void {
    if (this.finished) return;
    this.done = Math.max(this.done, Math.min(done, this.o.total));
    if (suffix !== undefined) this.suffix = suffix;
    const now = performance.now();
    const every = this.tty ? 200 : (this.o.intervalSeconds ?? 10) * 1000;
    if (now - this.lastDraw >= every) {
      this.lastDraw = now;
      this.draw();
    }
  }

  private line(tail: string): string {
    const frac = this.o.total > 0 ? Math.min(1, this.done / this.o.total) : 1;
    const width = 24;
    const filled = Math.round(frac * width);
    const bar = `${"=".repeat(Math.max(0, filled - 1))}${filled > 0 ? (frac < 1 ? ">" : "=") : ""}${".".repeat(width - filled)}`;
    const total = String(this.o.total);
    return `${this.o.label.padEnd(14)} ${String(this.done).padStart(total.length)}/${total} [${bar}] ${tail}${this.suffix ? ` - ${this.suffix}` : ""}`;
  }

  private draw(): void {
    if (this.tty) {
      const text = this.line(`${this.rate().toFixed(1)} ${this.o.unit}/s, ETA ${clock(this.eta())}`);
      live.set(this.stream, text);
      this.stream.write(`\r${text}\x1b[K`);
    } else {
      this.o.log?.info("progress", { phase: this.o.label, done: this.done, total: this.o.total, per_second: Number(this.rate().toFixed(2)), eta_seconds: Math.round(this.eta()), ...(this.suffix ? { status: this.suffix } : {}) });
    }
  }

  /** Removes the bar without a final line (nothing was done); idempotent. */
  discard(): void {
    if (this.finished) return;
    this.finished = true;
    if (!this.tty || !live.has(this.stream)) return;
    live.delete(this.stream);
    this.stream.write("\r\x1b[K");
  }

  /** Final line (the bar stays on the terminal, with the elapsed time); idempotent. */
  finish(suffix?: string, opts: { full?: boolean } = {}): void {
    if (this.finished) return;
    if (opts.full) this.done = this.o.total;
    if (suffix !== undefined) this.suffix = suffix;
    this.finished = true;
    const elapsed = (performance.now() - this.start) / 1000;
    if (!this.tty) return;
    live.delete(this.stream);
    this.stream.write(`\r${this.line(`${clock(elapsed)}, ${this.rate().toFixed(1)} ${this.o.unit}/s`)}\x1b[K\n`);
  }
}

/** What a training epoch ends with (core/training/train_loop.ts EpochStats). */
export interface EpochFigures {
  /** Epoch number, from 1. */
  epoch: number;
  loss: number;
  accuracy: number;
  val_loss?: number;
  val_accuracy?: number;
}

/**
 * Keras-like progress of a training phase (`fit(verbose=1)`): one bar per epoch, with the running
 * mean of the batch losses while it runs and the epoch's loss, accuracy and validation figures when
 * it ends. Batches report by count ({@link batch}) or by position ({@link moveTo}, data-parallel).
 */
export class EpochBars {
  private bar?: Progress;
  private current = -1;
  private lossSum = 0;
  private lossCount = 0;

  constructor(private readonly o: { label: string; epochs: number; stepsPerEpoch: number; stream?: TermStream; log?: Logger }) {}

  private open(epoch: number): Progress {
    if (this.bar && epoch === this.current) return this.bar;
    this.bar?.finish(undefined, { full: true });
    this.current = epoch;
    this.lossSum = 0;
    this.lossCount = 0;
    this.bar = new Progress({ label: `${this.o.label} ${epoch + 1}/${this.o.epochs}`, total: this.o.stepsPerEpoch, unit: "step", stream: this.o.stream, log: this.o.log, intervalSeconds: 30 });
    return this.bar;
  }

  /** A batch of epoch `epoch` (from 0) ended with `loss`. */
  batch(epoch: number, loss: number): void {
    const bar = this.open(epoch);
    if (Number.isFinite(loss)) {
      this.lossSum += loss;
      this.lossCount++;
    }
    bar.tick(1, this.lossCount > 0 ? `loss ${(this.lossSum / this.lossCount).toFixed(4)}` : undefined);
  }

  /** The phase is at step `step` of `totalSteps` (counted over the phase, whatever its step size) in epoch `epoch` (from 0). */
  moveTo(epoch: number, step: number, totalSteps: number): void {
    const perEpoch = totalSteps / this.o.epochs;
    this.open(epoch).set(Math.round(((step - epoch * perEpoch) / perEpoch) * this.o.stepsPerEpoch));
  }

  /** Shows the first epoch's bar before its first batch (data-parallel steps report late). */
  begin(): void {
    this.open(0).set(0);
  }

  /**
   * Closes the epoch's bar with its figures and opens the next one, so an epoch's bar shows from its
   * start (its clock includes the epoch's validation, as Keras' does).
   */
  epochEnd(s: EpochFigures): void {
    const f = (x: number | undefined): string => (x === undefined || !Number.isFinite(x) ? "-" : x.toFixed(4));
    const val = s.val_loss !== undefined ? ` - val_loss ${f(s.val_loss)} - val_accuracy ${f(s.val_accuracy)}` : "";
    this.open(s.epoch - 1).finish(`loss ${f(s.loss)} - accuracy ${f(s.accuracy)}${val}`, { full: true });
    this.bar = undefined;
    if (s.epoch < this.o.epochs) this.open(s.epoch).set(0);
  }

  /** Closes an epoch left open: one that never started (early stop) leaves no line. */
  finish(): void {
    if (this.bar?.value === 0) this.bar.discard();
    else this.bar?.finish();
    this.bar = undefined;
  }
}

/**
 * Progress of a long phase (extraction, training): a bar with rate and ETA that redraws in place on
 * a terminal, or a plain line every few seconds when stderr is a file or a pipe (CI, kubectl logs).
 */
export interface ProgressOptions {
  /** Label at the left, e.g. "extract". */
  label: string;
  /** Total units (images, steps). */
  total: number;
  /** Unit name for the rate, e.g. "img". */
  unit: string;
  stream?: NodeJS.WriteStream;
  /** Seconds between lines when not a terminal. Default 10. */
  intervalSeconds?: number;
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
  private readonly stream: NodeJS.WriteStream;
  private readonly tty: boolean;
  private suffix = "";

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
    this.done += n;
    if (suffix !== undefined) this.suffix = suffix;
    const now = performance.now();
    const every = this.tty ? 200 : (this.o.intervalSeconds ?? 10) * 1000;
    if (now - this.lastDraw >= every || this.done >= this.o.total) {
      this.lastDraw = now;
      this.draw();
    }
  }

  private line(): string {
    const frac = this.o.total > 0 ? Math.min(1, this.done / this.o.total) : 1;
    const width = 24;
    const filled = Math.round(frac * width);
    const bar = `${"#".repeat(filled)}${".".repeat(width - filled)}`;
    return `${this.o.label.padEnd(10)} [${bar}] ${this.done}/${this.o.total} ${this.o.unit}  ${this.rate().toFixed(1)} ${this.o.unit}/s  ETA ${clock(this.eta())}${this.suffix ? `  ${this.suffix}` : ""}`;
  }

  private draw(): void {
    if (this.tty) this.stream.write(`\r${this.line()}\x1b[K`);
    else this.stream.write(`${this.line()}\n`);
  }

  /** Final line. */
  finish(suffix?: string): void {
    if (suffix !== undefined) this.suffix = suffix;
    const elapsed = (performance.now() - this.start) / 1000;
    const text = `${this.line().replace(/ETA \S+/, `in ${clock(elapsed)}`)}`;
    this.stream.write(this.tty ? `\r${text}\x1b[K\n` : `${text}\n`);
  }
}

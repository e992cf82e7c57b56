/**
 * Structured logs for every ctrain process. One JSON object per line when the output is not a
 * terminal (containers, log collectors, `kubectl logs`), a compact human line on a terminal.
 * Every event carries the job id and, in a worker, the worker name, so logs of many processes can be
 * merged and filtered like the metrics.
 *
 * The level comes from `CTRAIN_LOG_LEVEL` (`debug|info|warn|error`, default `info`) unless given.
 * Every line goes through {@link redactSecrets}: URL userinfo and registered secrets are masked.
 */
import { writeAbove } from "./progress.js";

/** Log levels, lowest first. */
export const LOG_LEVELS = ["debug", "info", "warn", "error"] as const;
export type LogLevel = (typeof LOG_LEVELS)[number];

/** Output formats. `auto`: human on a TTY, JSON otherwise. */
export const LOG_FORMATS = ["auto", "json", "human"] as const;
export type LogFormat = (typeof LOG_FORMATS)[number];

/** Extra fields of an event. Errors are serialized with name, message and cause. */
export type LogFields = Record<string, unknown>;

/** Where lines go: anything with `write(string)`; `isTTY` decides the `auto` format. */
export interface LogStream {
  write(chunk: string): unknown;
  isTTY?: boolean;
}

export interface LoggerOptions {
  /** ctrain job id, the `job` field of every event. */
  job: string;
  /** Worker name, the `worker` field; left out in the coordinator. */
  worker?: string;
  /** `auto` (default): human on a TTY, JSON otherwise; `json`; `human`. */
  format?: LogFormat;
  /** Output. Default `process.stderr` (stdout stays free for command output). */
  stream?: LogStream;
  /** Lowest level written. Default: `CTRAIN_LOG_LEVEL`, else `info`. */
  level?: LogLevel;
  /** Clock, for tests. Default `() => new Date()`. */
  now?: () => Date;
}

export interface Logger {
  /** The lowest level this logger writes. */
  readonly level: LogLevel;
  debug(msg: string, fields?: LogFields): void;
  info(msg: string, fields?: LogFields): void;
  warn(msg: string, fields?: LogFields): void;
  error(msg: string, fields?: LogFields): void;
  /** Whether `level` would be written (to skip building costly fields). */
  enabled(level: LogLevel): boolean;
  /** A logger that adds `fields` to every event (its own fields win over the parent's). */
  child(fields: LogFields): Logger;
}

/** Parse a level name (case-insensitive); `undefined` for anything else. */
export function parseLogLevel(value: string | undefined): LogLevel | undefined {
  const v = value?.trim().toLowerCase();
  return (LOG_LEVELS as readonly string[]).includes(v ?? "") ? (v as LogLevel) : undefined;
}

/** The level from `CTRAIN_LOG_LEVEL`, default `info`. An unknown value falls back to `info`. */
export function levelFromEnv(env: NodeJS.ProcessEnv = process.env): LogLevel {
  return parseLogLevel(env.CTRAIN_LOG_LEVEL) ?? "info";
}

const secrets = new Set<string>();

/**
 * Registers a value (a password, a token) that no log line or printed error of this process may show.
 * Values shorter than 4 characters are ignored (they would mask ordinary text).
 */
export function registerSecret(value: string | undefined): void {
  if (!value || value.length < 4) return;
  secrets.add(value);
  const escaped = JSON.stringify(value).slice(1, -1); // as it appears inside a JSON log line
  if (escaped !== value) secrets.add(escaped);
}

/**
 * `text` with the userinfo of every URL masked (`nats://user:***@host`, `nats://***@host` for a token)
 * and every registered secret replaced by `***`.
 */
export function redactSecrets(text: string): string {
  let out = text.replace(/\b([a-z][a-z0-9+.-]*:\/\/)([^\s/?#@"'<>\\]+)@/gi, (_m, scheme: string, info: string) => {
    const colon = info.indexOf(":");
    return `${scheme}${colon >= 0 ? `${info.slice(0, colon)}:***` : "***"}@`;
  });
  for (const s of secrets) if (out.includes(s)) out = out.split(s).join("***");
  return out;
}

const MAX_CAUSE_DEPTH = 5;

/** An Error as plain JSON: name, message, own extra fields (`id`, `reason`, `code`...), stack, cause chain. */
export function serializeError(err: Error, depth = 0): Record<string, unknown> {
  const out: Record<string, unknown> = { name: err.name, message: err.message };
  for (const [k, v] of Object.entries(err)) {
    if (k !== "name" && k !== "message" && k !== "cause" && k !== "stack") out[k] = v;
  }
  if (err.stack) out.stack = err.stack;
  if (err.cause !== undefined) {
    out.cause =
      err.cause instanceof Error ? (depth < MAX_CAUSE_DEPTH ? serializeError(err.cause, depth + 1) : { name: err.cause.name, message: err.cause.message }) : err.cause;
  }
  if (err instanceof AggregateError) out.errors = err.errors.map((e: unknown) => (e instanceof Error && depth < MAX_CAUSE_DEPTH ? serializeError(e, depth + 1) : e));
  return out;
}

/** JSON.stringify that survives errors, bigints, circular references and NaN. */
function toJsonLine(event: Record<string, unknown>): string {
  const seen = new WeakSet<object>();
  return JSON.stringify(event, (_key, value: unknown) => {
    if (value instanceof Error) return serializeError(value);
    if (typeof value === "bigint") return value.toString();
    if (typeof value === "number" && !Number.isFinite(value)) return String(value); // NaN/Infinity matter here (a NaN loss)
    if (typeof value === "object" && value !== null) {
      if (seen.has(value)) return "[circular]";
      seen.add(value);
    }
    return value;
  });
}

const LEVEL_COLOR: Record<LogLevel, string> = { debug: "\x1b[90m", info: "\x1b[36m", warn: "\x1b[33m", error: "\x1b[31m" };

function humanValue(value: unknown): string {
  if (value instanceof Error) {
    let s = `${value.name}: ${value.message}`;
    let cause: unknown = value.cause;
    for (let i = 0; cause !== undefined && i < MAX_CAUSE_DEPTH; i++) {
      s += cause instanceof Error ? ` (cause: ${cause.name}: ${cause.message})` : ` (cause: ${String(cause)})`;
      cause = cause instanceof Error ? cause.cause : undefined;
    }
    return JSON.stringify(s);
  }
  if (typeof value === "string") return /^[\w.:/@+-]*$/.test(value) && value !== "" ? value : JSON.stringify(value);
  if (typeof value === "number" || typeof value === "boolean" || value === null || value === undefined) return String(value);
  return toJsonLine(value as Record<string, unknown>);
}

/** `12:34:56.789 INFO  [job/worker] message key=value ...` */
function toHumanLine(ts: Date, level: LogLevel, msg: string, base: LogFields, fields: LogFields, color: boolean, stacks: boolean): string {
  const hh = ts.toTimeString().slice(0, 8);
  const ms = String(ts.getMilliseconds()).padStart(3, "0");
  const lvl = level.toUpperCase().padEnd(5);
  const who = base.worker !== undefined ? `${String(base.job)}/${String(base.worker)}` : String(base.job);
  const rest = Object.entries({ ...base, ...fields })
    .filter(([k, v]) => k !== "job" && k !== "worker" && v !== undefined)
    .map(([k, v]) => `${k}=${humanValue(v)}`)
    .join(" ");
  const head = color ? `${LEVEL_COLOR[level]}${lvl}\x1b[0m` : lvl;
  // Stacks are noise on a terminal except when debugging.
  const errStack = stacks ? Object.values(fields).find((v): v is Error => v instanceof Error)?.stack : undefined;
  return `${hh}.${ms} ${head} [${who}] ${msg}${rest ? " " + rest : ""}\n${errStack ? errStack + "\n" : ""}`;
}

/** Create a logger. See {@link LoggerOptions} for defaults. */
export function createLogger(options: LoggerOptions): Logger {
  const stream: LogStream = options.stream ?? process.stderr;
  const format = options.format ?? "auto";
  if (!(LOG_FORMATS as readonly string[]).includes(format)) throw new RangeError(`log format must be auto, json or human, got ${JSON.stringify(format)}`);
  const human = format === "human" || (format === "auto" && stream.isTTY === true);
  const color = human && stream.isTTY === true && !process.env.NO_COLOR;
  const level = options.level ?? levelFromEnv();
  const min = LOG_LEVELS.indexOf(level);
  const now = options.now ?? (() => new Date());
  const base: LogFields = { job: options.job };
  if (options.worker !== undefined) base.worker = options.worker;

  const make = (bound: LogFields): Logger => {
    const write = (lvl: LogLevel, msg: string, fields?: LogFields): void => {
      if (LOG_LEVELS.indexOf(lvl) < min) return;
      const ts = now();
      const f = fields ?? {};
      let line: string;
      try {
        if (human) {
          line = toHumanLine(ts, lvl, msg, bound, f, color, min === 0);
        } else {
          // ts, level and msg come first and cannot be overwritten by fields.
          const head = { ts: ts.toISOString(), level: lvl, msg };
          line = toJsonLine(Object.assign({ ...head }, bound, f, head)) + "\n";
        }
      } catch (err) {
        // A field that cannot be serialized (a throwing getter, say) must not take the process down.
        line = toJsonLine({ ts: ts.toISOString(), level: lvl, msg, ...bound, log_error: String(err) }) + "\n";
      }
      // Secrets never reach the output, whatever field or error message carried them.
      // Above a live progress bar on a terminal (core/runtime/progress.ts owns the last line).
      writeAbove(stream, redactSecrets(line));
    };
    return {
      level,
      debug: (msg, fields) => write("debug", msg, fields),
      info: (msg, fields) => write("info", msg, fields),
      warn: (msg, fields) => write("warn", msg, fields),
      error: (msg, fields) => write("error", msg, fields),
      enabled: (lvl) => LOG_LEVELS.indexOf(lvl) >= min,
      child: (fields) => make({ ...bound, ...fields }),
    };
  };
  return make(base);
}

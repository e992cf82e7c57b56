/**
 * Error classes that decide what the caller does next (after horovod's split between a failed
 * collective and a changed membership). Every error keeps its `cause`; messages say what is wrong
 * and what to do about it.
 */

/** A job option or config file is invalid. Raised before any work starts; the CLI prints it without a stack. */
export class ConfigError extends Error {
  override name = "ConfigError";
  constructor(message: string, options?: { cause?: unknown }) {
    super(message, options);
  }
}

/** One input (an image, an IDX file, a message) is unusable. The sample is skipped and reported; the job goes on. */
export class BadInputError extends Error {
  override name = "BadInputError";
  /** Stable id of the offending sample or message. */
  readonly id: string;
  /** Short machine-readable reason, used as a metric label (`corrupt`, `empty`, `too_many_pixels`, ...). */
  readonly reason: string;
  constructor(id: string, reason: string, message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.id = id;
    this.reason = reason;
  }
}

/** A worker stopped answering (heartbeat expired or step deadline passed). Recover by re-planning without it. */
export class WorkerLostError extends Error {
  override name = "WorkerLostError";
  readonly worker: string;
  constructor(worker: string, message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.worker = worker;
  }
}

/** The set of workers changed (a new membership epoch). Keep state, meet again, redo the step. */
export class MembershipChanged extends Error {
  override name = "MembershipChanged";
  readonly epoch: number;
  constructor(epoch: number, message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.epoch = epoch;
  }
}

/** The requested compute backend cannot be loaded here. */
export class BackendUnavailableError extends Error {
  override name = "BackendUnavailableError";
  constructor(message: string, options?: { cause?: unknown }) {
    super(message, options);
  }
}

/** A file the job writes cannot be written (disk full, read-only, no permission). The job stops; nothing half-written is kept. */
export class StorageError extends Error {
  override name = "StorageError";
  /** The file or folder that could not be written. */
  readonly path: string;
  /** The errno code (`ENOSPC`, `EROFS`, `EACCES`, `EDQUOT`). */
  readonly code: string;
  constructor(path: string, code: string, message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.path = path;
    this.code = code;
  }
}

/** A service the job runs on (its embedded nats-server) died and could not be brought back. The message says how to resume. */
export class ServiceLostError extends Error {
  override name = "ServiceLostError";
  constructor(message: string, options?: { cause?: unknown }) {
    super(message, options);
  }
}

/** The requested inference engine (`--engine onnx`) cannot run here: onnxruntime-node is missing or refused the graph. */
export class EngineUnavailableError extends Error {
  override name = "EngineUnavailableError";
  constructor(message: string, options?: { cause?: unknown }) {
    super(message, options);
  }
}

const STORAGE_CODES: Record<string, string> = { ENOSPC: "no space left on the device", EDQUOT: "disk quota exceeded", EROFS: "read-only file system", EACCES: "permission denied", EPERM: "permission denied" };

/**
 * `err` as a StorageError naming `path` when it is a disk-full / read-only / permission failure
 * (`need`: bytes the write wanted, for the message); otherwise `err` unchanged.
 */
export function storageError(err: unknown, path: string, need?: number): unknown {
  const code = (err as NodeJS.ErrnoException)?.code;
  if (!code || !STORAGE_CODES[code]) return err;
  const size = need !== undefined ? ` (writing ${(need / 2 ** 20).toFixed(1)} MiB)` : "";
  return new StorageError(path, code, `cannot write ${path}: ${STORAGE_CODES[code]} (${code})${size}. Free space or choose another folder (--cache-dir, --out), then run the job again: what was stored completely is reused.`, { cause: err });
}

/** Errors whose message says all a user needs (what to fix, how to resume): printed as one line, without a stack trace. */
export function isUserError(err: unknown): err is Error {
  return USER_ERRORS.some((C) => err instanceof C);
}

/**
 * A layer (or a setting of one) that the TF.js -> ONNX converter does not handle. The caller runs
 * the model on tfjs instead and logs this message: never a wrong answer from a half-converted graph.
 */
export class UnsupportedLayerError extends ConfigError {
  override name = "UnsupportedLayerError";
  /** Name of the layer in the model. */
  readonly layer: string;
  /** Its Keras class (`UpSampling2D`, `Conv2D`...). */
  readonly className: string;
  constructor(layer: string, className: string, reason: string, options?: { cause?: unknown }) {
    super(`cannot convert layer ${JSON.stringify(layer)} (${className}) to ONNX: ${reason}. Run this model with --engine tfjs (--engine auto falls back to it).`, options);
    this.layer = layer;
    this.className = className;
  }
}

/** A shard gave up after the consumer's max deliveries. Fix the cause (the message says it) and run the job again. */
export class ShardFailedError extends Error {
  override name = "ShardFailedError";
  readonly shard: string;
  readonly lastError: string;
  constructor(shard: string, lastError: string, message: string) {
    super(message);
    this.shard = shard;
    this.lastError = lastError;
  }
}

/** Replicas disagree on their weights after the same step: a missed or double-applied update. */
export class ReplicaMismatchError extends Error {
  override name = "ReplicaMismatchError";
  constructor(readonly step: number, detail: string) {
    super(`step ${step}: replicas' weights differ (${detail}); the job stops. Rerun from the last checkpoint; if it repeats, check that every worker runs the same backend and version`);
  }
}

/** This replica was left out of the membership (the others went on without it). */
export class EvictedError extends Error {
  override name = "EvictedError";
}

/** A data-parallel replica reported that it failed (or broke the protocol); the attempt stops. `worker` is the replica. */
export class ReplicaFailedError extends Error {
  override name = "ReplicaFailedError";
  readonly worker: string;
  constructor(worker: string, message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.worker = worker;
  }
}

/** The local gradient holds NaN or an infinity: the step is stopped before anything is sent. */
export class NonFiniteGradientError extends Error {
  override name = "NonFiniteGradientError";
  readonly step: number;
  /** First offending element of the flat vector. */
  readonly index: number;
  constructor(step: number, index: number, value: number) {
    super(`step ${step}: the local gradient holds ${value} at element ${index}; nothing was sent. Lower the learning rate or check the input batch, then redo the step`);
    this.step = step;
    this.index = index;
  }
}

/**
 * Peers did not deliver their part of a step in time. A member whose gradient chunks did not reach us
 * is the likely culprit; an owner whose averaged slice is missing may only be waiting for someone else.
 * `worker` is the first of `missing`, culprits first.
 */
export class StepPeersLostError extends WorkerLostError {
  readonly step: number;
  /** Members whose gradient chunks for our slice did not all arrive. */
  readonly missingGradients: readonly string[];
  /** Owners whose averaged slice did not all arrive. */
  readonly missingAveraged: readonly string[];
  /** Both lists, without repeats, `missingGradients` first. */
  readonly missing: readonly string[];
  constructor(step: number, missingGradients: readonly string[], missingAveraged: readonly string[], timeoutMs: number) {
    const missing = [...new Set([...missingGradients, ...missingAveraged])];
    const q = (l: readonly string[]): string => l.map((m) => JSON.stringify(m)).join(", ");
    const parts = [missingGradients.length ? `no gradient from ${q(missingGradients)}` : "", missingAveraged.length ? `no averaged slice from ${q(missingAveraged)}` : ""];
    super(missing[0] ?? "", `step ${step}: ${parts.filter(Boolean).join(", ")} within ${timeoutMs} ms; re-plan without the lost member (new membership epoch) and redo the step`);
    this.step = step;
    this.missingGradients = missingGradients;
    this.missingAveraged = missingAveraged;
    this.missing = missing;
  }
}

/** No worker is (or stays) available for a phase that needs workers: none became ready, or every one was lost. */
export class WorkersUnavailableError extends Error {
  override name = "WorkersUnavailableError";
  constructor(message: string, options?: { cause?: unknown }) {
    super(message, options);
  }
}

/** A service the job starts for itself (its embedded nats-server) did not come up. The message says why and what to do instead. */
export class ServiceStartError extends Error {
  override name = "ServiceStartError";
  constructor(message: string, options?: { cause?: unknown }) {
    super(message, options);
  }
}

/** Errors whose message tells the user what to fix or how to resume (see isUserError). */
const USER_ERRORS: readonly (abstract new (...args: never[]) => Error)[] = [
  ConfigError, BadInputError, BackendUnavailableError, EngineUnavailableError, StorageError, ServiceLostError,
  ShardFailedError, ReplicaMismatchError, WorkersUnavailableError, ServiceStartError,
];

/** A user error as the CLI prints it: `ctrain: <name>: <message>` on one line (no stack; a multi-line message joined). */
export function userErrorLine(err: Error): string {
  return `ctrain: ${err.name}: ${err.message.split(/\s*\n\s*/).filter(Boolean).join(" | ")}`;
}

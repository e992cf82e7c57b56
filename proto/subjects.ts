/**
 * Every NATS name ctrain uses, job-scoped, in one place: subjects (core and JetStream), stream and
 * consumer names, KV and object store buckets. Nothing else in the code builds a subject by hand.
 *
 * Layout (`<job>` is the job id, `<w>` a worker id):
 *   ctrain.<job>.tasks              JetStream work queue of ShardTask (stream CTRAIN_<job>_TASKS)
 *   ctrain.<job>.hello              WorkerHello (core)
 *   ctrain.<job>.heartbeat          Heartbeat (core; the registry KV holds the latest, with a TTL)
 *   ctrain.<job>.progress           Progress of shards (core)
 *   ctrain.<job>.shard.done         FeatureShard metadata once stored (core)
 *   ctrain.<job>.step.plan          StepPlan (core, coordinator -> workers)
 *   ctrain.<job>.grad.<w>           GradientChunk for the slice owned by <w> (core, reduce-scatter)
 *   ctrain.<job>.avg.<w>            AveragedChunk of the slice owned by <w> (core, fan-out)
 *   ctrain.<job>.weights            WeightsChecksum after a step (core)
 *   ctrain.<job>.control            Control (core, coordinator -> workers)
 *   $JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.<stream>.<consumer>   the server's advisory when a task
 *                                   used up its deliveries (JSON, proto/extraction_wire.ts parses it)
 *   buckets ctrain-<job>-features (object store), ctrain-<job>-checkpoints (object store),
 *           ctrain-<job>-state (KV), ctrain-<job>-workers (KV with a TTL)
 *
 * The stream name keeps the job id's case: uppercasing it would let jobs `a` and `A` share a stream.
 */
import { ConfigError } from "../core/runtime/errors.js";

/** A job or worker id: a NATS-safe token (no `.`, `*`, `>`, whitespace), also valid in stream and bucket names. */
const TOKEN = /^[a-zA-Z0-9][a-zA-Z0-9_-]{0,62}$/;

/** Root of every ctrain subject. */
export const SUBJECT_ROOT = "ctrain";

/** Time a worker's registry entry lives without a heartbeat, milliseconds. */
export const WORKER_REGISTRY_TTL_MS = 15_000;

/** Returns the job id if it is a NATS-safe token, else throws ConfigError quoting it. */
export function validateJobId(job: string): string {
  if (typeof job !== "string" || !TOKEN.test(job))
    throw new ConfigError(`job id ${JSON.stringify(job)} must be 1-63 letters, digits, '-' or '_', starting with a letter or digit (it names NATS subjects and streams)`);
  return job;
}

/** Returns the worker id if it is a NATS-safe token, else throws ConfigError quoting it. */
export function validateWorkerId(worker: string): string {
  if (typeof worker !== "string" || !TOKEN.test(worker))
    throw new ConfigError(`worker id ${JSON.stringify(worker)} must be 1-63 letters, digits, '-' or '_', starting with a letter or digit (it names NATS subjects)`);
  return worker;
}

const TASKS_CONSUMER = "extractors";
const TASKS_STREAM = /^CTRAIN_([a-zA-Z0-9][a-zA-Z0-9_-]{0,62})_TASKS$/;

function tasksStreamOf(job: string): string {
  return `CTRAIN_${job}_TASKS`;
}

/** The job whose task stream `stream` is; undefined for any other stream (how `--job any` finds jobs). */
export function jobOfTasksStream(stream: string): string | undefined {
  return TASKS_STREAM.exec(stream)?.[1];
}

/** The NATS names of one job. */
export interface JobNames {
  readonly job: string;
  /** `ctrain.<job>.>`: everything of the job (permissions, taps). */
  readonly all: string;
  /** Work-queue subject of ShardTask. */
  readonly tasks: string;
  /** JetStream stream (work-queue retention) holding `tasks`. */
  readonly tasksStream: string;
  /** Durable pull consumer shared by all extraction workers. */
  readonly tasksConsumer: string;
  /** The server's advisory for a task that used up its deliveries on `tasksConsumer`. */
  readonly tasksMaxDeliveries: string;
  readonly hello: string;
  readonly heartbeat: string;
  readonly progress: string;
  readonly shardDone: string;
  readonly stepPlan: string;
  readonly weights: string;
  readonly control: string;
  /** Subject of gradient chunks for the slice owned by `worker`. */
  gradients(worker: string): string;
  /** Wildcard over every owner's gradient subject. */
  readonly gradientsAll: string;
  /** Subject of averaged chunks of the slice owned by `worker`. */
  averaged(worker: string): string;
  /** Wildcard over every owner's averaged subject (what each member subscribes to). */
  readonly averagedAll: string;
  /** Object store bucket of features (one object per shard id). */
  readonly featuresBucket: string;
  /** Object store bucket of checkpoints. */
  readonly checkpointsBucket: string;
  /** KV bucket of job state (phase, epoch, step, shard states). */
  readonly stateBucket: string;
  /** KV bucket of the worker registry (entries expire after {@link WORKER_REGISTRY_TTL_MS}). */
  readonly workersBucket: string;
}

/** All NATS names of a job; throws ConfigError for an invalid job id. */
export function jobNames(job: string): JobNames {
  validateJobId(job);
  const s = `${SUBJECT_ROOT}.${job}`;
  return Object.freeze({
    job,
    all: `${s}.>`,
    tasks: `${s}.tasks`,
    tasksStream: tasksStreamOf(job),
    tasksConsumer: TASKS_CONSUMER,
    tasksMaxDeliveries: `$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.${tasksStreamOf(job)}.${TASKS_CONSUMER}`,
    hello: `${s}.hello`,
    heartbeat: `${s}.heartbeat`,
    progress: `${s}.progress`,
    shardDone: `${s}.shard.done`,
    stepPlan: `${s}.step.plan`,
    weights: `${s}.weights`,
    control: `${s}.control`,
    gradients: (worker: string) => `${s}.grad.${validateWorkerId(worker)}`,
    gradientsAll: `${s}.grad.*`,
    averaged: (worker: string) => `${s}.avg.${validateWorkerId(worker)}`,
    averagedAll: `${s}.avg.*`,
    featuresBucket: `ctrain-${job}-features`,
    checkpointsBucket: `ctrain-${job}-checkpoints`,
    stateBucket: `ctrain-${job}-state`,
    workersBucket: `ctrain-${job}-workers`,
  });
}

/**
 * Who may publish what on a job's NATS: the coordinator everything, a worker only what its role sends.
 * `ctrain run` writes these into its embedded nats-server's config (one user per process, a fresh
 * random password per job); an operator running their own server can render the same blocks.
 *
 * A worker may not publish work or plans: no task (`ctrain.<job>.tasks`, also not through the
 * JetStream API), no StepPlan or Control (`step.plan`, `control`), no membership or spec key in the
 * state KV. It may send what a worker sends: hello, heartbeats, progress, shard-done notices and
 * weight checksums; gradient chunks to every slice owner (reduce-scatter is worker to worker) but
 * averaged chunks only of its own slice; feature objects; its own registry entry and training report,
 * shard error records and the epoch-boundary decision (member 0 writes it). What is left open by
 * design: a worker can still send a wrong gradient or overwrite an object in the job's buckets (object
 * chunk subjects do not carry the object's name); the coordinator checks every feature shard against
 * its plan (coordinator/nats_executor.ts).
 */
import { randomBytes } from "node:crypto";
import { jobNames } from "./subjects.js";
import { TRAINING_KEYS } from "./training_wire.js";
import { ROUND_KEYS } from "./extraction_wire.js";

/** A nats-server `permissions` block. */
export interface NatsPermissions {
  publish: { allow: string[] };
  subscribe: { allow: string[] };
}

/** One user of the server config. */
export interface NatsUser {
  user: string;
  password: string;
  permissions: NatsPermissions;
}

/** The coordinator (and `ctrain run` itself): every subject. */
export function coordinatorPermissions(): NatsPermissions {
  return { publish: { allow: [">"] }, subscribe: { allow: [">"] } };
}

/** What worker `worker` of `job` may publish and subscribe to. */
export function workerPermissions(job: string, worker: string): NatsPermissions {
  const n = jobNames(job);
  const kv = (bucket: string): string => `KV_${bucket}`;
  const obj = (bucket: string): string => `OBJ_${bucket}`;
  const streams = [kv(n.stateBucket), kv(n.workersBucket), obj(n.featuresBucket), obj(n.checkpointsBucket)];
  const api = "$JS.API";
  return {
    publish: {
      allow: [
        n.hello, n.heartbeat, n.progress, n.shardDone, n.weights, n.gradientsAll, n.averaged(worker),
        // Pulling and acking tasks from the shared consumer; reading (not writing) the stream list.
        `${api}.INFO`, `${api}.STREAM.NAMES`, `${api}.STREAM.LIST`, `${api}.STREAM.INFO.*`,
        `${api}.CONSUMER.INFO.${n.tasksStream}.${n.tasksConsumer}`, `${api}.CONSUMER.MSG.NEXT.${n.tasksStream}.${n.tasksConsumer}`, `$JS.ACK.${n.tasksStream}.>`,
        // KV and object store clients: open (or create) the job's buckets, read, watch, put objects.
        ...streams.flatMap((s) => [
          `${api}.STREAM.CREATE.${s}`, `${api}.STREAM.MSG.GET.${s}`, `${api}.DIRECT.GET.${s}`, `${api}.DIRECT.GET.${s}.>`,
          `${api}.CONSUMER.CREATE.${s}`, `${api}.CONSUMER.CREATE.${s}.>`, `${api}.CONSUMER.DELETE.${s}.>`, `${api}.CONSUMER.INFO.${s}.>`,
          `$JS.FC.${s}.>`, // flow-control replies of the ordered consumers that read objects and watch keys
        ]),
        `${api}.STREAM.PURGE.${obj(n.featuresBucket)}`, `${api}.STREAM.PURGE.${obj(n.checkpointsBucket)}`,
        `$O.${n.featuresBucket}.>`, `$O.${n.checkpointsBucket}.>`,
        `$KV.${n.workersBucket}.${worker}`,
        `$KV.${n.stateBucket}.${ROUND_KEYS.errorAll}`, `$KV.${n.stateBucket}.${ROUND_KEYS.failedAll}`,
        `$KV.${n.stateBucket}.${TRAINING_KEYS.report(worker)}`, `$KV.${n.stateBucket}.${TRAINING_KEYS.boundary}`,
      ],
    },
    subscribe: { allow: ["_INBOX.>", n.all] },
  };
}

/** A random password (192 bits, URL-safe). */
export function randomPassword(): string {
  return randomBytes(24).toString("base64url");
}

/** The users of a `ctrain run` job: `coordinator` and one per worker id, each with a fresh password. */
export function jobUsers(job: string, workers: readonly string[]): { coordinator: NatsUser; workers: Map<string, NatsUser> } {
  return {
    coordinator: { user: "coordinator", password: randomPassword(), permissions: coordinatorPermissions() },
    workers: new Map(workers.map((w) => [w, { user: `worker-${w}`, password: randomPassword(), permissions: workerPermissions(job, w) }])),
  };
}

/** The `authorization { users = [...] }` block of a nats-server config (JSON is valid NATS config syntax). */
export function authorizationBlock(users: readonly NatsUser[]): string {
  return `authorization {\n  users = ${JSON.stringify(users, null, 2)}\n}`;
}

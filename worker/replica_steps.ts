/**
 * The bookkeeping of one data-parallel replica that needs no broker and no model: where the data
 * cursor goes after a step, which steps carry a checksum, a checkpoint or a boundary decision, whom a
 * failed step names as lost, and the reports a replica puts in the state KV. ReplicaSession
 * (worker/replica_session.ts) calls these; test/replica_session.test.ts checks them without NATS.
 */
import type { DataCursor } from "../core/training/checkpoints.js";
import { EvictedError, StepPeersLostError } from "../core/runtime/errors.js";
import type { TrainingReport } from "../proto/training_wire.js";

/** The cursor after batch `batch` of `batches` in training epoch `epoch` ran: the next batch to run, one step further. */
export function advanceCursor(cursor: DataCursor, done: { epoch: number; batch: number; batches: number }): DataCursor {
  const step = cursor.step + 1;
  return done.batch + 1 >= done.batches ? { epoch: done.epoch + 1, batch: 0, step } : { epoch: done.epoch, batch: done.batch + 1, step };
}

/** Whether a checksum is published after step count `step` (every `every` steps; 0 = never). */
export function isChecksumStep(step: number, every: number): boolean {
  return every > 0 && step % every === 0;
}

/**
 * Whether member 0 stores a checkpoint before running step `step`: every `every` steps (0 = never),
 * never at the attempt's start step (that state is already stored as the start state). Taken before
 * the step runs so that the cursor in it is exact.
 */
export function isCheckpointStep(step: number, o: { attemptStartStep: number; every: number; member0: boolean }): boolean {
  return o.member0 && o.every > 0 && step > o.attemptStartStep && step % o.every === 0;
}

/**
 * Whether step `step` (batch `batch` of its training epoch) is a training-epoch boundary where member 0
 * decides on a pending join: the first batch of an epoch, past the step this stint started at (a
 * replica that starts or joins at a boundary already has that step's membership).
 */
export function isBoundaryStep(step: number, batch: number, stintFrom: number): boolean {
  return batch === 0 && step > stintFrom;
}

/** The peers a failed step names as lost: for a timeout, those whose gradients did not come (else everyone missing); none for a changed membership. */
export function lostPeersOf(err: Error): string[] {
  if (!(err instanceof StepPeersLostError)) return [];
  return [...(err.missingGradients.length ? err.missingGradients : err.missing)];
}

/** The part of a report that the replica chooses (attempt, worker and time are filled in by {@link buildReport}). */
export type ReportBody = Omit<TrainingReport, "attempt" | "worker" | "at">;

export function buildReport(attempt: string, worker: string, body: ReportBody, now: number = Date.now()): TrainingReport {
  return { ...body, attempt, worker, at: now };
}

/** The `done` report: where training ended, the history, and this replica's averaging cost. */
export function doneReport(cursor: DataCursor, history: TrainingReport["history"], allreduce: { seconds: number; bytes: number }, members: readonly string[]): ReportBody {
  return { state: "done", step: cursor.step, cursor: { ...cursor }, history, allreduce_seconds: allreduce.seconds, allreduce_bytes: allreduce.bytes, members: [...members] };
}

/** The report for an attempt that ended with `err`: evicted, failed, or nothing when it was superseded or stopped. */
export function endReport(err: Error, stopped: boolean): ReportBody | undefined {
  if (stopped) return undefined;
  if (err instanceof EvictedError) return { state: "evicted", error: err.message };
  return { state: "failed", error: `${err.name}: ${err.message}` };
}

/** The figures of the "training done" log line. */
export function trainingSummary(steps: number, stepsRun: number, trainSeconds: number, allreduce: { seconds: number; bytes: number }): Record<string, number> {
  return {
    steps, steps_run: stepsRun, train_seconds: Number(trainSeconds.toFixed(3)), allreduce_seconds: Number(allreduce.seconds.toFixed(3)),
    step_seconds: stepsRun ? Number((trainSeconds / stepsRun).toFixed(4)) : 0, allreduce_bytes_per_step: stepsRun ? Math.round(allreduce.bytes / stepsRun) : 0,
  };
}

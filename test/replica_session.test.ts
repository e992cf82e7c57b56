/**
 * The replica session's bookkeeping without NATS: data cursor accounting across epochs, which steps
 * carry a checksum / checkpoint / boundary decision, whom a failed step names, the reports, and the
 * replica checksum comparison. The replica's life over a real nats-server runs in data_parallel.test.ts.
 */
import assert from "node:assert/strict";
import { describe, test } from "node:test";
import { EvictedError, MembershipChanged, ReplicaMismatchError, StepPeersLostError } from "../core/runtime/errors.js";
import { ChecksumBook } from "../worker/replica_checksums.js";
import { advanceCursor, buildReport, doneReport, endReport, isBoundaryStep, isCheckpointStep, isChecksumStep, lostPeersOf, trainingSummary } from "../worker/replica_steps.js";

describe("replica session", () => {
  test("replica session - the cursor counts steps and moves to the next epoch after an epoch's last batch", () => {
    let c = { epoch: 0, batch: 0, step: 0 };
    const seen: string[] = [];
    for (const epoch of [0, 1]) {
      for (let batch = 0; batch < 3; batch++) {
        c = advanceCursor(c, { epoch, batch, batches: 3 });
        seen.push(`${c.epoch}/${c.batch}/${c.step}`);
      }
    }
    assert.deepEqual(seen, ["0/1/1", "0/2/2", "1/0/3", "1/1/4", "1/2/5", "2/0/6"]);
    // A resumed stint: fit starts at initialBatch, the cursor goes on from the checkpoint's step.
    assert.deepEqual(advanceCursor({ epoch: 1, batch: 2, step: 7 }, { epoch: 1, batch: 2, batches: 3 }), { epoch: 2, batch: 0, step: 8 });
  });

  test("replica session - checksums every K steps, checkpoints by member 0 only and never at the attempt's start step", () => {
    assert.deepEqual([1, 2, 3, 4, 5, 6].filter((s) => isChecksumStep(s, 3)), [3, 6]);
    assert.equal(isChecksumStep(10, 0), false, "0 = never");
    const ck = (step: number, member0 = true, start = 0, every = 5): boolean => isCheckpointStep(step, { attemptStartStep: start, every, member0 });
    assert.deepEqual([0, 4, 5, 9, 10].filter((s) => ck(s)), [5, 10]);
    assert.equal(ck(5, false), false, "not member 0");
    assert.equal(ck(10, true, 10), false, "the resumed attempt's start state is already stored");
    assert.equal(ck(15, true, 10), true);
    assert.equal(ck(20, true, 0, 0), false, "0 = only the final state");
  });

  test("replica session - a boundary is the first batch of an epoch past the stint's first step", () => {
    assert.equal(isBoundaryStep(5, 0, 0), true);
    assert.equal(isBoundaryStep(5, 1, 0), false, "mid-epoch");
    assert.equal(isBoundaryStep(5, 0, 5), false, "the step a replica joined or started at");
    assert.equal(isBoundaryStep(0, 0, 0), false, "the attempt's first step");
  });

  test("replica session - a timed-out step names the peers whose gradients did not come, else every missing one; a new membership names none", () => {
    assert.deepEqual(lostPeersOf(new StepPeersLostError(3, ["b"], ["c"], 1000)), ["b"]);
    assert.deepEqual(lostPeersOf(new StepPeersLostError(3, [], ["c"], 1000)), ["c"]);
    assert.deepEqual(lostPeersOf(new MembershipChanged(4, "redo")), []);
  });

  test("replica session - reports carry the attempt, the worker and the outcome", () => {
    assert.deepEqual(buildReport("a1", "w0", { state: "ready", step: 3 }, 42), { state: "ready", step: 3, attempt: "a1", worker: "w0", at: 42 });
    const h = [{ epoch: 0, loss: 1, accuracy: 0.5, seconds: 1, samples_per_second: 2 }];
    assert.deepEqual(doneReport({ epoch: 3, batch: 0, step: 15 }, h, { seconds: 1.5, bytes: 99 }, ["w0", "w1"]), {
      state: "done", step: 15, cursor: { epoch: 3, batch: 0, step: 15 }, history: h, allreduce_seconds: 1.5, allreduce_bytes: 99, members: ["w0", "w1"],
    });
    assert.deepEqual(endReport(new EvictedError("left out of membership epoch 4"), false), { state: "evicted", error: "left out of membership epoch 4" });
    assert.deepEqual(endReport(new ReplicaMismatchError(10, "x"), false), { state: "failed", error: `ReplicaMismatchError: ${new ReplicaMismatchError(10, "x").message}` });
    assert.equal(endReport(new Error("a newer training spec"), true), undefined, "a superseded attempt reports nothing");
    assert.deepEqual(trainingSummary(15, 5, 2, { seconds: 1, bytes: 500 }), { steps: 15, steps_run: 5, train_seconds: 2, allreduce_seconds: 1, step_seconds: 0.4, allreduce_bytes_per_step: 100 });
    assert.equal(trainingSummary(15, 0, 2, { seconds: 0, bytes: 0 }).step_seconds, 0);
  });

  test("replica session - checksums are compared once every member's is in; a difference is a ReplicaMismatchError naming both", () => {
    const book = new ChecksumBook("a");
    const members = ["a", "b", "c"];
    assert.equal(book.record({ worker: "a", step: 10, checksum: 1, sum: 0.5 }, members), undefined);
    assert.equal(book.record({ worker: "x", step: 10, checksum: 9, sum: 0 }, members), undefined, "a non-member's digest is ignored");
    assert.equal(book.record({ worker: "b", step: 10, checksum: 1, sum: 0.5 }, members), undefined);
    assert.equal(book.open, 1, "still waiting for c");
    assert.equal(book.record({ worker: "c", step: 10, checksum: 1, sum: 0.5 }, members), undefined, "all agree");
    assert.equal(book.open, 0);
    book.record({ worker: "b", step: 20, checksum: 7, sum: 0.25 }, members);
    book.record({ worker: "c", step: 20, checksum: 2, sum: 0.75 }, members);
    const bad = book.record({ worker: "a", step: 20, checksum: 2, sum: 0.75 }, members);
    assert.ok(bad instanceof ReplicaMismatchError);
    assert.equal(bad.step, 20);
    assert.match(bad.message, /a crc 2 sum 0\.75; b crc 7 sum 0\.25/);
  });
});

/**
 * MembershipPlanner: the coordinator's membership rules for data-parallel training, without NATS.
 * Each case feeds the planner what the driver would observe (ready replicas, losses, joiners, member
 * 0's boundary decisions, reports) and checks the plans it asks to publish. The plans are also fed to
 * a replica's MembershipView, which must agree with the planner on the membership in force.
 */
import assert from "node:assert/strict";
import { describe, test } from "node:test";
import { allreduceOf, keepWaiting, MembershipPlanner, reportAction } from "../coordinator/membership_planner.js";
import { WorkersUnavailableError } from "../core/runtime/errors.js";
import type { TrainingReport } from "../proto/training_wire.js";
import { MembershipView } from "../worker/membership_view.js";

const report = (worker: string, state: TrainingReport["state"], extra: Partial<TrainingReport> = {}): TrainingReport => ({ attempt: "a1", worker, at: 0, state, ...extra });

describe("membership planner", () => {
  test("membership planner - the first plan is the ready replicas in order, under epoch 1; none ready is WorkersUnavailableError", () => {
    const p = new MembershipPlanner();
    assert.throws(() => p.start([], 5000), (e: unknown) => e instanceof WorkersUnavailableError && /within 5000 ms/.test(e.message));
    assert.deepEqual(p.start(["w2", "w0", "w1"], 5000), { epoch: 1, members: ["w0", "w1", "w2"], joining: [] });
    assert.deepEqual(p.current, { epoch: 1, members: ["w0", "w1", "w2"] });
  });

  test("membership planner - a lost member is evicted at once under a new epoch; losing the last one fails with WorkersUnavailableError", () => {
    const p = new MembershipPlanner();
    p.start(["a", "b"], 1);
    assert.equal(p.lose(["stranger"]), undefined, "a worker that is neither member nor joiner changes nothing");
    const d = p.lose(["a"])!;
    assert.deepEqual(d.plan, { epoch: 2, members: ["b"], joining: [] });
    assert.deepEqual(d.lostMembers, ["a"]);
    assert.deepEqual(p.current, { epoch: 2, members: ["b"] });
    assert.throws(() => p.lose(["b"]), (e: unknown) => e instanceof WorkersUnavailableError && /every fine-tuning worker was lost \(last: b\)/.test(e.message));
  });

  test("membership planner - joiners are proposed with the members unchanged and admitted only when member 0 applies the proposal at a boundary", () => {
    const p = new MembershipPlanner();
    p.start(["a", "b"], 1);
    assert.equal(p.propose(["a", "b"]), undefined, "members are not joiners");
    const plan = p.propose(["c", "c"])!;
    assert.deepEqual(plan, { epoch: 2, members: ["a", "b", "c"], joining: ["c"] });
    assert.deepEqual(p.current, { epoch: 1, members: ["a", "b"] }, "the members go on under epoch 1");
    assert.equal(p.propose(["d"]), undefined, "one proposal at a time");
    assert.deepEqual(p.watched(), ["a", "b", "c"], "a proposed joiner's heartbeat is watched");
    assert.equal(p.decide(5, 1), undefined, "a boundary that keeps the membership admits nobody");
    assert.deepEqual(p.decide(10, 2), { step: 10, epoch: 2, joined: ["c"], members: ["a", "b", "c"] });
    assert.deepEqual(p.current, { epoch: 2, members: ["a", "b", "c"] });
    assert.equal(p.decide(10, 2), undefined, "a repeated decision changes nothing");
  });

  test("membership planner - a loss withdraws the pending proposal; a late decision for it admits nobody; the joiner is proposed again", () => {
    const p = new MembershipPlanner();
    p.start(["a", "b"], 1);
    p.propose(["c"]);
    const d = p.lose(["b"])!;
    assert.deepEqual(d.plan, { epoch: 3, members: ["a"], joining: [] }, "the proposal's epoch 2 is skipped");
    assert.equal(p.decide(10, 2), undefined, "member 0's decision for the withdrawn proposal");
    assert.deepEqual(p.current, { epoch: 3, members: ["a"] });
    assert.deepEqual(p.propose(["c"]), { epoch: 4, members: ["a", "c"], joining: ["c"] });
    const j = p.lose(["c"])!;
    assert.deepEqual(j.lostJoiners, ["c"]);
    assert.deepEqual(j.lostMembers, []);
    assert.deepEqual(j.plan, { epoch: 5, members: ["a"], joining: [] }, "a lost joiner withdraws the proposal under a new epoch");
  });

  test("membership planner - a survivor's peers_lost report drops the dead peers it names, all of them when none is dead, and nothing for an older epoch", () => {
    const p = new MembershipPlanner();
    p.start(["a", "b", "c"], 1);
    assert.deepEqual(p.lostFromReport(1, ["b", "c"], ["c"]), ["c"]);
    assert.deepEqual(p.lostFromReport(1, ["b"], []), ["b"], "a live peer that cannot deliver a step is as lost");
    p.lose(["c"]);
    assert.deepEqual(p.lostFromReport(1, ["b"], ["b"]), [], "a report of epoch 1 after epoch 2 was planned");
  });

  test("membership planner - the plans it publishes lead a replica's MembershipView to the same membership", () => {
    const p = new MembershipPlanner();
    const v = new MembershipView();
    const feed = (plan: { epoch: number; members: readonly string[]; joining: readonly string[] } | undefined): void => {
      if (plan) v.applyPlan(plan.epoch, plan.members, plan.joining);
    };
    feed(p.start(["a", "b"], 1));
    feed(p.propose(["c"]));
    v.applyDecision(5, 2);
    p.decide(5, 2);
    assert.deepEqual({ epoch: v.current!.epoch, members: v.current!.members }, p.current);
    feed(p.lose(["a"])?.plan);
    assert.deepEqual({ epoch: v.current!.epoch, members: v.current!.members }, p.current);
    assert.deepEqual(p.current.members, ["b", "c"]);
  });

  test("membership planner - reports: a failure stops, only member 0's done ends the attempt and only its new epochs are passed on", () => {
    assert.deepEqual(reportAction(report("b", "failed", { error: "boom" }), "a", 0), { type: "fail", message: "fine-tuning failed on worker b: boom" });
    assert.deepEqual(reportAction(report("b", "done"), "a", 0), { type: "none" });
    assert.deepEqual(reportAction(report("a", "done"), "a", 0), { type: "done" });
    const h = { epoch: 0, loss: 1, accuracy: 0.5, seconds: 1, samples_per_second: 1 };
    assert.deepEqual(reportAction(report("a", "training", { history: [h] }), "a", 0), { type: "epoch_end", epochs: 1 });
    assert.deepEqual(reportAction(report("a", "training", { history: [h] }), "a", 1), { type: "none" }, "an epoch already passed on");
    assert.deepEqual(reportAction(report("b", "training", { history: [h, h] }), "a", 0), { type: "none" }, "not member 0");
    assert.deepEqual(reportAction(report("b", "checkpoint"), "a", 0), { type: "checkpoint" });
    assert.deepEqual(reportAction(report("b", "peers_lost"), "a", 0), { type: "peers_lost" });
    assert.deepEqual(reportAction(report("b", "waiting"), "a", 0), { type: "none" });
  });

  test("membership planner - waiting for replicas ends when enough are ready or at the deadline; allreduce figures are per-worker means", () => {
    assert.equal(keepWaiting(1, 3, 100, 200), true);
    assert.equal(keepWaiting(3, 3, 100, 200), false);
    assert.equal(keepWaiting(1, 3, 200, 200), false);
    const done = [report("a", "done", { allreduce_seconds: 1, allreduce_bytes: 100 }), report("b", "done", { allreduce_seconds: 3, allreduce_bytes: 300 })];
    assert.deepEqual(allreduceOf(done, 2), { seconds: 2, bytes: 200, workers: 2 });
    assert.deepEqual(allreduceOf([], 0), { seconds: 0, bytes: 0, workers: 0 });
  });
});

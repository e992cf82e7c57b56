/**
 * MembershipView: the membership every replica derives from the ordered stream of plans and boundary
 * decisions. Each case feeds the same event sequence to the views of several replicas that started
 * watching at different points and checks that they agree (the end-to-end join runs in
 * data_parallel.test.ts).
 */
import assert from "node:assert/strict";
import { describe, test } from "node:test";
import { MembershipView } from "../worker/membership_view.js";

type Ev = { plan: [number, string[], string[]] } | { decide: [number, number] };

function replay(events: Ev[], from = 0): MembershipView {
  const v = new MembershipView();
  for (const e of events.slice(from)) {
    if ("plan" in e) v.applyPlan(...e.plan);
    else v.applyDecision(...e.decide);
  }
  return v;
}

describe("membership view", () => {
  test("membership view - a proposal leaves the members as they are until member 0 applies it at a boundary", () => {
    const v = new MembershipView();
    assert.equal(v.applyPlan(1, ["a", "b"], []), "immediate");
    assert.equal(v.applyPlan(2, ["a", "b", "c"], ["c"]), "proposal");
    assert.deepEqual(v.current, { epoch: 1, members: ["a", "b"], origin: { kind: "plan" } });
    assert.equal(v.applyDecision(5, 1), null, "a boundary that keeps the membership");
    assert.equal(v.current!.epoch, 1);
    const sw = v.applyDecision(10, 2);
    assert.deepEqual(sw && { step: sw.step, epoch: sw.epoch, members: sw.members }, { step: 10, epoch: 2, members: ["a", "b", "c"] });
    assert.deepEqual(v.current, { epoch: 2, members: ["a", "b", "c"], origin: { kind: "join", step: 10 } });
    assert.equal(v.applyDecision(10, 2), null, "the first decision for a step wins");
    assert.equal(v.joinFor("c", 0)?.step, 10);
    assert.equal(v.joinFor("c", sw!.seq), undefined, "no later join");
  });

  test("membership view - a joiner that starts watching late reaches the same membership", () => {
    const events: Ev[] = [{ plan: [1, ["a", "b"], []] }, { decide: [5, 1] }, { plan: [2, ["a", "b", "c"], ["c"]] }, { decide: [10, 2] }];
    const member = replay(events);
    // A KV watch opened later delivers the last value of each key in stream order.
    const joiner = replay(events, 2);
    assert.deepEqual(joiner.current, member.current);
    assert.equal(joiner.joinFor("c", 0)?.epoch, 2);
  });

  test("membership view - a member lost while a proposal waits: the proposal is withdrawn, a late decision for it changes nothing", () => {
    const events: Ev[] = [{ plan: [1, ["a", "b"], []] }, { plan: [2, ["a", "b", "c"], ["c"]] }, { plan: [3, ["a"], []] }, { decide: [10, 2] }];
    const v = replay(events);
    assert.deepEqual(v.current, { epoch: 3, members: ["a"], origin: { kind: "plan" } });
    assert.equal(v.pending, undefined);
    assert.equal(v.boundaries.get(10), null);
    assert.equal(v.joinFor("c", 0), undefined, "c keeps waiting");
  });

  test("membership view - a decision that came before the withdrawal: the joiner is in, then left out by the next plan", () => {
    const events: Ev[] = [{ plan: [1, ["a", "b"], []] }, { plan: [2, ["a", "b", "c"], ["c"]] }, { decide: [10, 2] }, { plan: [3, ["a"], []] }];
    const v = replay(events);
    assert.deepEqual(v.current!.members, ["a"], "b lost, c left out (it reports waiting and is proposed again)");
    assert.equal(v.joinFor("c", 0)?.step, 10, "c was in from step 10");
  });

  test("membership view - a joiner already let in stays a member when a plan still lists it as joining", () => {
    const v = replay([{ plan: [1, ["a", "b"], []] }, { plan: [2, ["a", "b", "c"], ["c"]] }, { decide: [10, 2] }]);
    assert.equal(v.applyPlan(3, ["a", "c"], ["c"]), "immediate");
    assert.deepEqual(v.current!.members, ["a", "c"]);
    assert.equal(v.pending, undefined);
  });

  test("membership view - stale plans are ignored", () => {
    const v = replay([{ plan: [2, ["a", "b"], []] }]);
    assert.equal(v.applyPlan(2, ["a"], []), "stale");
    assert.equal(v.applyPlan(1, ["a"], []), "stale");
    assert.deepEqual(v.current!.members, ["a", "b"]);
  });
});

/**
 * coordinator/straggler_detector.ts (pure) and worker/step_timing.ts: who is a straggler, from what
 * per-step timings, and when it stops being one.
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import { StragglerDetector, type StepTiming } from "../coordinator/straggler_detector.js";
import { StepTimer } from "../worker/step_timing.js";

const steps = (from: number, compute: number[], wait = 0.01): StepTiming[] => compute.map((c, i) => ({ step: from + i, computeSeconds: c, waitSeconds: wait }));

test("straggler - a worker whose compute stays above 1.5x the median is flagged by name, once", () => {
  const d = new StragglerDetector();
  d.observe("w0", steps(0, [0.2, 0.21, 0.2, 0.19, 0.2]));
  d.observe("w1", steps(0, [0.2, 0.2, 0.22, 0.2, 0.2]));
  d.observe("w2", steps(0, [0.2, 0.6, 0.65, 0.7, 0.6]));
  const events = d.evaluate();
  assert.deepEqual(events.map((e) => [e.type, e.worker]), [["straggler", "w2"]]);
  const e = events[0]!;
  assert.equal(e.type === "straggler" && Number(e.ratio.toFixed(2)), 3);
  assert.deepEqual(d.stragglers(), ["w2"]);
  assert.deepEqual(d.evaluate(), [], "no second event while it stays slow");
});

test("straggler - one slow step (a GC pause) does not flag a worker; most of its recent steps do", () => {
  const d = new StragglerDetector({ window: 5 });
  d.observe("w0", steps(0, [0.2, 0.2, 0.2, 0.2, 0.2]));
  d.observe("w1", steps(0, [0.2, 0.2, 0.2, 0.2, 0.2]));
  d.observe("w2", steps(0, [0.2, 0.2, 5, 0.2, 0.2]));
  assert.deepEqual(d.evaluate(), []);
  d.observe("w2", steps(5, [5, 5]));
  assert.deepEqual(d.evaluate().map((e) => e.worker), ["w2"], "3 of its last 5 steps are slow");
});

test("straggler - a flagged worker that speeds up is reported recovered", () => {
  const d = new StragglerDetector({ window: 3 });
  d.observe("a", steps(0, [1, 1, 1]));
  d.observe("b", steps(0, [1, 1, 1]));
  d.observe("c", steps(0, [4, 4, 4]));
  assert.deepEqual(d.evaluate().map((e) => e.type), ["straggler"]);
  d.observe("c", steps(3, [1.4, 1.4, 1.4]));
  assert.deepEqual(d.evaluate(), [], "1.4x the median: no longer slow, not yet recovered (no flapping)");
  d.observe("c", steps(6, [1, 1, 1]));
  const ev = d.evaluate();
  assert.deepEqual(ev.map((e) => [e.type, e.worker]), [["recovered", "c"]]);
  assert.deepEqual(d.stragglers(), []);
});

test("straggler - with two workers the median is their mean: the slow one must be over 3x the other", () => {
  const d = new StragglerDetector();
  d.observe("a", steps(0, [1, 1, 1]));
  d.observe("b", steps(0, [2.9, 2.9, 2.9]));
  assert.deepEqual(d.evaluate(), [], "2.9x: below 1.5x the mean of 1 and 2.9");
  d.observe("b", steps(3, [3.5, 3.5, 3.5]));
  assert.deepEqual(d.evaluate().map((e) => e.worker), ["b"]);
});

test("straggler - a worker is judged, and counts in the median, only once it has reported minSteps steps", () => {
  const d = new StragglerDetector({ window: 5, minSteps: 3 });
  d.observe("w0", steps(0, [0.2, 0.2, 0.2]));
  d.observe("w1", steps(0, [2, 2]));
  assert.deepEqual(d.evaluate(), [], "w1 has 2 steps: not judged, and w0 alone has nobody to compare with");
  assert.ok(Number.isNaN(new StragglerDetector().medianComputeSeconds()));
  assert.equal(d.medianComputeSeconds(), 0.2, "the median leaves w1 out");
  d.observe("w1", steps(2, [2]));
  assert.deepEqual(d.evaluate().map((e) => e.worker), ["w1"]);
  assert.throws(() => new StragglerDetector({ window: 3, minSteps: 4 }), /minSteps must be an integer from 1 to the window \(3\)/);
});

test("straggler - one worker alone, zero figures and non-finite figures flag nobody", () => {
  const d = new StragglerDetector();
  d.observe("solo", steps(0, [9, 9, 9]));
  assert.deepEqual(d.evaluate(), []);
  d.observe("zero", steps(0, [0, 0, 0]));
  d.observe("zero2", steps(0, [0, 0, 0]));
  assert.deepEqual(d.evaluate(), [], "a median of 0 (nothing measured yet) flags nobody");
  const e = new StragglerDetector();
  e.observe("a", steps(0, [0, 0]));
  e.observe("b", steps(0, [0, 0]));
  e.observe("c", [{ step: 0, computeSeconds: NaN, waitSeconds: 0 }, { step: 1, computeSeconds: Infinity, waitSeconds: 0 }, { step: 2, computeSeconds: -1, waitSeconds: 0 }]);
  assert.equal(e.recent("c"), undefined, "non-finite and negative figures are ignored");
  assert.deepEqual(e.evaluate(), []);
});

test("straggler - a step reported twice counts once; forget() drops a worker that left", () => {
  const d = new StragglerDetector({ window: 3 });
  d.observe("a", steps(0, [1, 1, 1]));
  d.observe("a", [{ step: 2, computeSeconds: 3, waitSeconds: 0 }]);
  assert.deepEqual(d.recent("a"), { computeSeconds: 1, waitSeconds: 0.01, steps: 3 }, "step 2 is 3 s now: the median of 1, 1, 3");
  d.observe("b", steps(0, [1, 1, 1]));
  d.observe("c", steps(0, [9, 9, 9]));
  assert.deepEqual(d.evaluate().map((e) => e.worker), ["c"]);
  d.forget("c");
  assert.deepEqual(d.stragglers(), []);
  assert.deepEqual(d.workers(), ["a", "b"]);
  assert.throws(() => new StragglerDetector({ ratio: 1 }), RangeError);
  assert.throws(() => new StragglerDetector({ window: 0 }), RangeError);
});

test("straggler - the step timer splits compute from averaging and batches reports", () => {
  let now = 0;
  const t = new StepTimer({ now: () => now, reportEveryMs: 1000 });
  now = 2000; // start-up: loading, the first batch, the boundary decision
  t.averaging();
  now = 2050;
  t.averaged(0);
  assert.equal(t.takeDue(), undefined, "the first step carries the start-up: not recorded");
  now = 2350; // forward + backward
  t.averaging();
  now = 2400;
  assert.deepEqual(t.averaged(1), { step: 1, compute_seconds: 0.3, wait_seconds: 0.05 });
  now = 3200;
  t.averaging();
  now = 3400;
  t.averaged(2);
  const due = t.takeDue();
  assert.deepEqual(due?.map((s) => s.step), [1, 2]);
  assert.equal(due?.[1]?.compute_seconds, 0.8);
  assert.equal(t.takeDue(), undefined, "nothing pending");
  // A new stint (a join, a resume) starts untimed again.
  now = 9000;
  t.restart();
  now = 9500;
  t.averaging();
  t.averaged(3);
  now = 9600;
  t.averaging();
  t.averaged(4);
  now = 10500;
  assert.deepEqual(t.takeDue()?.map((s) => [s.step, s.compute_seconds]), [[4, 0.1]]);
});

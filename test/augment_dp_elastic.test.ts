/**
 * Method 2 (`--method augment`) data-parallel is elastic like fine-tuning on activations: a worker that
 * arrives during the head attempt joins at a training-epoch boundary and is counted, and member 0
 * SIGKILLed mid-epoch leaves the survivors to redo the step and finish. Both end with the one-process
 * head, and every replica's "training done" images are exactly its parts of the global batches under
 * the memberships it trained in: every sample of each epoch trained once, none twice, none skipped.
 * Real nats-server, `ctrain coordinator` / `ctrain worker` processes, Fashion-MNIST (200 training images
 * at input 32), the real MobileNetV2 base (test/helpers/augment_jobs.ts); 6 head epochs (9 steps each). The late
 * worker's join is proposed while a member is held (SIGSTOP) in the first epoch, so it has 5 boundaries left to
 * join at however busy the machine is; the kill lands after step 3. More epochs only lengthen the three runs
 * (the reference, the join and the kill).
 */
import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";
import { epochBatches } from "../core/training/train_loop.js";
import { memberSlice } from "../proto/training_wire.js";
import { AUGMENT_JOB_ARGS, AugmentJobs, maxAbsDiff, stop, withOptions } from "./helpers/augment_jobs.js";
import type { Proc } from "./helpers/cluster.js";

const EPOCHS = 6;
const BATCH = 24;
const SEED = 7;
const ARGS = withOptions(AUGMENT_JOB_ARGS, { "--epochs": String(EPOCHS) });

/** Images of `self`'s parts of every global batch of the attempt, the members of step s being `membersAt(s)` (self absent: none). */
function partImages(train: number, self: string, membersAt: (step: number) => readonly string[]): number {
  let images = 0;
  let step = 0;
  for (let e = 0; e < EPOCHS; e++) {
    for (const b of epochBatches(train, BATCH, SEED, e)) {
      const m = membersAt(step++);
      if (m.includes(self)) images += memberSlice(b, m, self).length;
    }
  }
  return images;
}

/** The images a replica says it trained in the job's (one) head attempt. */
function trained(w: Proc): number {
  const done = w.logged("training done");
  assert.equal(done.length, 1, `${w.name} finished one attempt\n${w.tail()}`);
  return done[0]!["samples"] as number;
}

/** The first step a survivor ran again under the membership without the lost worker (whichever recovery it took). */
function redoneAt(w: Proc): number | undefined {
  const recoveries = ["redoing the step with the new membership", "membership changed during the step: recomputing my part", "part cut ahead under an older membership: cutting it again", "no boundary decision from member 0"];
  const steps = recoveries.flatMap((m) => w.logged(m).map((l) => l["step"] as number));
  return steps.length ? Math.min(...steps) : undefined;
}

let jobs: AugmentJobs;

before(async () => {
  jobs = await AugmentJobs.start(ARGS);
});

after(async () => {
  await jobs?.close();
});

describe("augment data-parallel elastic", () => {
  test("augment data-parallel elastic - a worker arriving mid-head-phase joins at an epoch boundary, is counted, every sample trained once per epoch", async (t) => {
    const job = "augjoin";
    const ws = [0, 1].map((i) => jobs.worker(job, `${job}-w${i}`));
    // Started with the others but held (SIGSTOP) from the moment it joined the job until the head attempt's
    // first membership was planned without it: it arrives during training, its process already up.
    const late = jobs.worker(job, `${job}-late`);
    const c = jobs.coordinator(job, 2, {}, { fineTune: false });
    await late.waitFor("joined job", 60_000);
    late.proc.kill("SIGSTOP");
    const first = await c.waitFor("membership", 120_000);
    // Training is short (about a second an epoch): hold a member while the late worker loads, so that the
    // join is proposed before the attempt ends however busy the machine is; the member resumes at once.
    ws[0]!.proc.kill("SIGSTOP");
    late.proc.kill("SIGCONT");
    await c.waitFor("join proposed for the next training-epoch boundary", 60_000).finally(() => ws[0]!.proc.kill("SIGCONT"));
    assert.deepEqual(first["members"], [`${job}-w0`, `${job}-w1`], "the first membership is without the late worker");
    await jobs.succeeds(c, [...ws, late]);
    const joined = c.logged("workers joined at a training-epoch boundary");
    assert.equal(joined.length, 1, `one join\n${c.tail()}\n${late.tail()}`);
    assert.deepEqual(joined[0]!["joined"], [`${job}-late`]);
    const at = joined[0]!["step"] as number;
    const s = await jobs.summary(job);
    const perEpoch = Math.ceil(s.samples.train / BATCH);
    assert.ok(at > 0 && at % perEpoch === 0, `joined at step ${at}: an epoch boundary (${perEpoch} steps an epoch)`);
    assert.equal(late.logged("joining the training at a training-epoch boundary")[0]?.["step"], at, "the joiner starts from member 0's state at the boundary");
    assert.equal(s.phases.head.workers, 3, "summary counts the joiner in phases.head.workers");
    assert.equal(s.phases.head.epochs, EPOCHS);
    // Each replica's images are its parts of every global batch: two members before the boundary, three from it.
    const members = joined[0]!["members"] as string[];
    const membersAt = (step: number): readonly string[] => (step < at ? members.filter((w) => w !== `${job}-late`) : members);
    // A replica other than member 0 may log its count after the coordinator ended (it clears the spec once member 0 is done).
    await Promise.all([...ws, late].map((w) => w.waitFor("training done", 30_000)));
    for (const w of [...ws, late]) assert.equal(trained(w), partImages(s.samples.train, w.name, membersAt), `${w.name}'s images`);
    assert.equal([...ws, late].reduce((a, w) => a + trained(w), 0), EPOCHS * s.samples.train, "every sample once per epoch");
    const d = maxAbsDiff(await jobs.weights(job, "model"), jobs.reference.head);
    t.diagnostic(`joined at step ${at} of ${EPOCHS * perEpoch}; max |w - w_ref| = ${d.toExponential(2)}`);
    assert.ok(d < 1e-4, `head max |w - w_ref| = ${d}`);
    await stop([...ws, late]);
  });

  test("augment data-parallel elastic - member 0 SIGKILLed mid-epoch: the survivors redo the step and finish; every sample trained once per epoch", async (t) => {
    const job = "augkill0";
    const ws = [0, 1, 2].map((i) => jobs.worker(job, `${job}-w${i}`));
    // A checkpoint every 3 steps: the first one (step 3) lands mid-epoch (9 steps an epoch), and member 0 dies right after saving it.
    const c = jobs.coordinator(job, 3, { CTRAIN_DP_STEP_TIMEOUT_MS: "4000", CTRAIN_DP_CHECKPOINT_EVERY: "3" }, { fineTune: false });
    const members = (await c.waitFor("membership", 120_000))["members"] as string[];
    const victim = ws.find((w) => w.name === members[0])!;
    await victim.waitFor("checkpoint saved", 120_000);
    victim.proc.kill("SIGKILL");
    await jobs.succeeds(c, ws);
    const lost = c.logged("worker lost: new membership");
    assert.ok(lost.length >= 1, `the coordinator re-planned without the lost worker\n${c.tail()}`);
    // Only the victim is dropped; a survivor dropped too (named by the other after a step timeout) shows here with the reports that named it.
    assert.deepEqual(lost.at(-1)!["members"], members.slice(1), `re-plans: ${JSON.stringify(lost)}\n${c.tail()}\n${ws.filter((w) => w !== victim).map((w) => w.tail()).join("\n")}`);
    const s = await jobs.summary(job);
    const perEpoch = Math.ceil(s.samples.train / BATCH);
    assert.equal(s.phases.head.workers, 3, "every worker that trained a step counts");
    assert.equal(s.phases.head.epochs, EPOCHS);
    for (const w of ws.filter((x) => x !== victim)) {
      const k = redoneAt(w);
      assert.ok(k !== undefined, `${w.name} recovered from the loss\n${w.tail()}`);
      assert.ok(k % perEpoch !== 0, `${w.name} redid step ${k}: mid-epoch (${perEpoch} steps an epoch)`);
      // Its parts under three members before step k, under the two survivors from k on: no step counted twice or skipped.
      // A survivor other than the new member 0 may log its count after the coordinator ended (it clears the spec once member 0 is done).
      await w.waitFor("training done", 30_000);
      assert.equal(trained(w), partImages(s.samples.train, w.name, (step) => (step < k ? members : members.slice(1))), `${w.name}'s images (new membership from step ${k})`);
      t.diagnostic(`${w.name} redid step ${k} under the new membership`);
    }
    const d = maxAbsDiff(await jobs.weights(job, "model"), jobs.reference.head);
    t.diagnostic(`max |w - w_ref| = ${d.toExponential(2)}`);
    assert.ok(d < 1e-4, `head max |w - w_ref| = ${d}`);
    await stop(ws);
  });
});

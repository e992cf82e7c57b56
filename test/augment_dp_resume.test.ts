/**
 * Method 2 data-parallel survives the whole job dying mid-head-phase: a restarted coordinator (same job
 * id) resumes the head phase from its checkpoint (`latest-head`, kept apart from fine-tuning's
 * `latest`) on fresh workers, then fine-tunes, and ends with the one-process weights. Real processes
 * (test/helpers/augment_jobs.ts).
 */
import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";
import { AugmentJobs, maxAbsDiff, stop } from "./helpers/augment_jobs.js";

let jobs: AugmentJobs;

before(async () => {
  jobs = await AugmentJobs.start();
});

after(async () => {
  await jobs?.close();
});

describe("augment data-parallel resume", () => {
  test("augment data-parallel resume - a restarted coordinator resumes the head phase from its checkpoint; weights as one process", async () => {
    const job = "augresume";
    const env = { CTRAIN_DP_CHECKPOINT_EVERY: "5" };
    const first = [0, 1].map((i) => jobs.worker(job, `${job}-a${i}`));
    const c1 = jobs.coordinator(job, 2, env);
    const ck = await c1.waitFor("checkpoint saved", 120_000);
    await stop([c1, ...first]);
    const saved = ck["step"] as number;
    const second = [0, 1].map((i) => jobs.worker(job, `${job}-b${i}`));
    const c2 = jobs.coordinator(job, 2, env);
    const resumed = await c2.waitFor("resuming the head phase from checkpoint", 120_000);
    assert.ok((resumed["step"] as number) >= saved, `resumed at step ${resumed["step"]}, checkpoint was at ${saved}`);
    await jobs.succeeds(c2, second);
    for (const w of second) assert.equal((w.logged("training")[0]?.["from"] as { step: number } | undefined)?.step, resumed["step"], `${w.name} started at the checkpoint's step`);
    assert.ok(maxAbsDiff(await jobs.weights(job), jobs.reference.head) < 1e-4, "head weights as one process");
    assert.ok(maxAbsDiff(await jobs.weights(job, "model"), jobs.reference.fineTuned) < 1e-4, "fine-tuned weights as one process");
    await stop(second);
  });
});

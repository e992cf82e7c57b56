/**
 * Keras' training controls on data-parallel training: `--method augment` with a cosine schedule, early
 * stopping (patience 1) and best weights restored trains the head and the fine-tuned top on 2 worker
 * processes (no fallback to the coordinator) and ends where the one-process run with the same options
 * ends: same weights, same number of epochs, same best epoch. Every replica validates the same rows
 * with identical weights, so every replica stops at the same epoch and restores the same best one.
 * Real nats-server, real `ctrain coordinator` / `ctrain worker` processes, Fashion-MNIST (200 training
 * images at input 32), the real MobileNetV2 base (test/helpers/augment_jobs.ts).
 */
import assert from "node:assert/strict";
import { readFile } from "node:fs/promises";
import { join } from "node:path";
import { after, before, describe, test } from "node:test";
import { AUGMENT_JOB_ARGS, AugmentJobs, maxAbsDiff, stop, withOptions } from "./helpers/augment_jobs.js";

const EPOCHS = 8;
// A head rate this high overfits the 200 images quickly: with seed 7 the head stops at epoch 5 (best 4) and fine-tuning at 2 of 3 (best 1).
const ARGS = withOptions(AUGMENT_JOB_ARGS, {
  "--epochs": String(EPOCHS), "--learning-rate": "0.05", "--fine-tune-epochs": "3", "--restore-best-weights": "true", "--lr-schedule": "cosine", "--early-stopping-patience": "1",
});

let jobs: AugmentJobs;

before(async () => {
  jobs = await AugmentJobs.start(ARGS);
});

after(async () => {
  await jobs?.close();
});

describe("data-parallel training controls", () => {
  test("data-parallel training controls - 2 workers with cosine, early stopping and best weights end as one process does", async (t) => {
    const ref = await jobs.summary("reference");
    t.diagnostic(`reference: head ${ref.phases.head.epochs}/${EPOCHS} epochs (best ${ref.phases.head.best_epoch ?? "last"}), fine-tune ${ref.phases.fine_tune.epochs}/3 (best ${ref.phases.fine_tune.best_epoch ?? "last"})`);
    assert.ok(ref.phases.head.epochs < EPOCHS && ref.phases.head.best_epoch !== undefined, "the reference's head phase stopped early and restored an earlier epoch (else this test shows nothing)");
    assert.ok(ref.phases.fine_tune.epochs < 3 && ref.phases.fine_tune.best_epoch !== undefined, "so did its fine-tuning");
    const job = "ctl2";
    const ws = [0, 1].map((i) => jobs.worker(job, `${job}-w${i}`));
    const c = jobs.coordinator(job, 2);
    await jobs.succeeds(c, ws);
    assert.equal(c.logged("head phase on the workers").length, 1, `the head trained on the workers\n${c.tail()}`);
    assert.equal(c.logged("fine-tuning with augmentation on the workers").length, 1, `fine-tuning ran on the workers\n${c.tail()}`);
    assert.equal(c.lines.filter((l) => l.level === "warn" && /coordinator process/.test(l.msg)).length, 0, "no fallback to training in the coordinator");
    const s = await jobs.summary(job);
    // The replicas validated what one process validates: the same figures every epoch (they decide early stopping).
    const history = async (j: string): Promise<Record<string, { val_loss?: number }[]>> => JSON.parse(await readFile(join(jobs.dir, j, "history.json"), "utf8"));
    const [refHistory, dpHistory] = [await history("reference"), await history(job)];
    for (const phase of ["head", "fine_tune"] as const) {
      const want = refHistory[phase]!.map((e) => e.val_loss!), got = dpHistory[phase]!.map((e) => e.val_loss!);
      assert.equal(got.length, want.length, `${phase}: epochs in history.json`);
      got.forEach((v, i) => assert.ok(Math.abs(v - want[i]!) < 1e-3, `${phase} epoch ${i + 1}: val_loss ${v} on the workers, ${want[i]} in one process`));
    }
    for (const phase of ["head", "fine_tune"] as const) {
      assert.equal(s.phases[phase].workers, 2, `${phase} trained by both workers`);
      assert.equal(s.phases[phase].epochs, ref.phases[phase].epochs, `${phase}: as many epochs as one process`);
      assert.equal(s.phases[phase].best_epoch, ref.phases[phase].best_epoch, `${phase}: the same best epoch restored`);
    }
    const d = maxAbsDiff(await jobs.weights(job), jobs.reference.head);
    const f = maxAbsDiff(await jobs.weights(job, "model"), jobs.reference.fineTuned);
    t.diagnostic(`N=2: head max |w - w_ref| = ${d.toExponential(2)}, fine-tuned ${f.toExponential(2)}`);
    assert.ok(d < 1e-4, `head max |w - w_ref| = ${d}`);
    assert.ok(f < 1e-4, `fine-tuned max |w - w_ref| = ${f}`);
    await stop(ws);
  });
});

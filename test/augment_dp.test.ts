/**
 * Method 2 (`--method augment`) data-parallel end to end, the head phase and fine-tuning with
 * augmentation (3 top layers): a real nats-server, real `ctrain coordinator` and `ctrain worker`
 * processes, real Fashion-MNIST (200 training images at input 32) and the real MobileNetV2 base (the
 * frozen part on each worker's inference engine). The reference is the one-process path (`ctrain
 * run --workers 1`) with the same seed and global batch; every run shares one feature cache so only
 * the reference extracts (test/helpers/augment_jobs.ts).
 */
import assert from "node:assert/strict";
import { join } from "node:path";
import { after, before, describe, test } from "node:test";
import { AugmentJobs, exitCode, maxAbsDiff, stop } from "./helpers/augment_jobs.js";
import { freePort } from "./helpers/free_port.js";

let jobs: AugmentJobs;

before(async () => {
  jobs = await AugmentJobs.start();
});

after(async () => {
  await jobs?.close();
});

describe("augment data-parallel", () => {
  test("augment data-parallel - 1, 2 and 3 workers train head and fine-tuned top to the one-process weights; images per worker in its metrics", async (t) => {
    for (const n of [1, 2, 3]) {
      const job = `aug${n}`;
      const port = await freePort();
      const ws = Array.from({ length: n }, (_, i) => jobs.worker(job, `${job}-w${i}`, i === 0 ? { metricsPort: port } : {}));
      const c = jobs.coordinator(job, n);
      await jobs.succeeds(c, ws);
      assert.equal(c.logged("head phase on the workers").length, 1, `the head trained on the workers\n${c.tail()}`);
      assert.equal(c.logged("fine-tuning with augmentation on the workers").length, 1, `fine-tuning ran on the workers\n${c.tail()}`);
      assert.equal(c.lines.filter((l) => l.level === "warn" && /--method augment/.test(l.msg)).length, 0, "no warning that method 2 trains in the coordinator");
      const s = await jobs.summary(job);
      assert.equal(s.phases.head.workers, n, `summary phases.head.workers`);
      assert.equal(s.phases.fine_tune.workers, n, `summary phases.fine_tune.workers`);
      const d = maxAbsDiff(await jobs.weights(job), jobs.reference.head);
      const f = maxAbsDiff(await jobs.weights(job, "model"), jobs.reference.fineTuned);
      t.diagnostic(`N=${n}: head max |w - w_ref| = ${d.toExponential(2)}, fine-tuned ${f.toExponential(2)}`);
      assert.ok(d < 1e-4, `N=${n}: head max |w - w_ref| = ${d}`);
      assert.ok(f < 1e-4, `N=${n}: fine-tuned max |w - w_ref| = ${f}`);
      const m = await ws[0]!.metrics();
      const images = m.samples.filter((x) => x.name === "ctrain_images_processed_total" && x.labels["phase"] === "head").reduce((a, x) => a + x.value, 0);
      // Four epochs of this worker's part of each global batch: within one image per batch of train/n.
      const batches = 4 * Math.ceil(s.samples.train / 24);
      assert.ok(Math.abs(images - (4 * s.samples.train) / n) <= batches, `worker 0 counted ${images} head images, ${s.samples.train} train images, ${n} workers`);
      await stop(ws);
    }
  });

  test("augment data-parallel - a worker SIGKILLed mid-head-phase: the survivors finish both phases with the undisturbed weights", async () => {
    const job = "augkill";
    const ws = [0, 1, 2].map((i) => jobs.worker(job, `${job}-w${i}`));
    const c = jobs.coordinator(job, 3, { CTRAIN_DP_STEP_TIMEOUT_MS: "4000" });
    const plan = await c.waitFor("membership", 120_000);
    const members = plan["members"] as string[];
    const victim = ws.find((w) => w.name === members[1])!;
    await victim.waitFor("training", 120_000);
    await new Promise((r) => setTimeout(r, 1500));
    victim.proc.kill("SIGKILL");
    await jobs.succeeds(c, ws);
    const lost = c.logged("worker lost: new membership");
    assert.ok(lost.length >= 1, `the coordinator re-planned without the lost worker\n${c.tail()}`);
    assert.ok(!(lost.at(-1)!["members"] as string[]).includes(victim.name));
    const s = await jobs.summary(job);
    assert.equal(s.phases.head.workers, 3, "every worker that trained a step counts");
    assert.equal(s.phases.head.epochs, 4);
    assert.equal(s.phases.fine_tune.workers, 2, "fine-tuning started without the lost worker");
    assert.ok(maxAbsDiff(await jobs.weights(job), jobs.reference.head) < 1e-4, "head weights as undisturbed");
    assert.ok(maxAbsDiff(await jobs.weights(job, "model"), jobs.reference.fineTuned) < 1e-4, "fine-tuned weights as undisturbed");
    await stop(ws);
  });

  test("augment data-parallel - a worker without the data set is left out with a message naming the path; none with it stops the job", async () => {
    const missing = join(jobs.dir, "not-mounted", "fashion-mnist");
    const job = "augbad";
    const good = jobs.worker(job, `${job}-good`);
    const bad = jobs.worker(job, `${job}-bad`, { env: { CTRAIN_FASHION_MNIST_DIR: missing } });
    const c = jobs.coordinator(job, 2, {}, { fineTune: false });
    // The job with no worker able to open the data set is independent of this one (own job id, worker
    // and out/): it runs at the same time, and is checked below.
    const none = "augnone";
    const alone = jobs.worker(none, `${none}-bad`, { env: { CTRAIN_FASHION_MNIST_DIR: missing } });
    const c2 = jobs.coordinator(none, 1, {}, { fineTune: false });
    const ended = exitCode(c2);
    await jobs.succeeds(c, [good, bad]);
    const left = c.logged("worker left out: it cannot open the data set");
    assert.equal(left.length, 1, c.tail());
    assert.equal(left[0]!["worker"], `${job}-bad`);
    assert.match(String(left[0]!["error"]), new RegExp(`${missing}.*Mount the data set`, "s"));
    assert.equal((await jobs.summary(job)).phases.head.workers, 1);
    await stop([good, bad]);

    const code = await ended;
    assert.notEqual(code, 0);
    assert.match(c2.stderr, /no worker can open the data set/);
    assert.match(c2.stderr, new RegExp(missing));
    await stop([alone]);
  });
});

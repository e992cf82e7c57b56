/**
 * One data-parallel worker for the train_loop equivalence test (a child process: `fit` runs one at a
 * time per process). Trains a tiny head on its slice of every global batch with gradients averaged
 * over NATS, then prints its weights as JSON on stdout. With `sweep`: a small conv model on wasm, one fit per
 * training-set size (short last batches leave some members an empty slice).
 *
 * Usage: node dp_fit_worker.js '<json DpFitArgs>'
 */
import { connect } from "nats";
import * as tf from "@tensorflow/tfjs";
import { selectBackend } from "../../core/models/backend.js";
import { sliceRanges } from "../../proto/tensor_codec.js";
import { fit } from "../../core/training/train_loop.js";
import { GradientAverager, gradientHookFor } from "../../worker/gradient_averaging.js";
import { weightsChecksum } from "../../worker/weights_checksum.js";
import { registerWasmTrainingKernels } from "../../core/models/wasm_kernels.js";
import { DP_CONV, DP_SETUP, dpConvData, dpConvModel, dpData, dpModel, type DpFitArgs } from "./dp_fit_setup.js";

const args = JSON.parse(process.argv[2]!) as DpFitArgs;
const me = args.members.indexOf(args.self);
// Member i takes the i-th contiguous part of each global batch (what a StepPlan's sample ranges say).
const sliceOf = (idx: Int32Array): Int32Array => {
  const r = sliceRanges(idx.length, args.members.length)[me]!;
  return idx.subarray(r.offset, r.offset + r.length);
};
await selectBackend(args.sweep ? "wasm" : "cpu");
if (args.sweep) registerWasmTrainingKernels();
const nc = await connect({ servers: args.url });
const jobs = args.sweep ? args.sweep.sizes.map((n) => `${args.job}-n${n}`) : [args.job];
const averagers = await Promise.all(jobs.map((job) => GradientAverager.open({ nc, job, self: args.self, members: args.members, epoch: 1, timeoutMs: 20_000 })));
// Barrier: tell the parent we are subscribed, wait for its go.
const go = nc.subscribe(`${args.job}-go`, { max: 1 });
nc.publish(`${args.job}-ready`, new TextEncoder().encode(args.self));
for await (const _ of go) break;

if (args.sweep) {
  // One fit per training-set size, in order; every member's weights after each.
  const out = [];
  for (const [i, n] of args.sweep.sizes.entries()) {
    const model = dpConvModel();
    const optimizer = tf.train.sgd(DP_CONV.learningRate);
    await fit(model, dpConvData(n), {
      epochs: 1, batchSize: DP_CONV.batchSize, seed: DP_CONV.seed, numClasses: DP_CONV.classes, optimizer, sliceOf, gradientHook: gradientHookFor(averagers[i]!, model),
    });
    out.push({ size: n, digest: weightsChecksum(model), weights: model.trainableWeights.map((w) => Array.from(w.read().dataSync())) });
  }
  process.stdout.write(JSON.stringify({ self: args.self, sweep: out }) + "\n");
} else {
  const model = dpModel();
  const optimizer = tf.train.sgd(DP_SETUP.learningRate);
  await fit(model, dpData(), {
    epochs: DP_SETUP.epochs, batchSize: DP_SETUP.batchSize, seed: DP_SETUP.seed, numClasses: DP_SETUP.classes, optimizer, sliceOf, gradientHook: gradientHookFor(averagers[0]!, model),
  });
  const weights = model.trainableWeights.map((w) => Array.from(w.read().dataSync()));
  process.stdout.write(JSON.stringify({ self: args.self, digest: weightsChecksum(model), weights }) + "\n");
}
for (const a of averagers) await a.close();
await nc.drain();

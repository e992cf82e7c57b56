/**
 * One data-parallel worker for the train_loop equivalence test (a child process: `fit` runs one at a
 * time per process). Trains a tiny head on its slice of every global batch with gradients averaged
 * over NATS, then prints its weights as JSON on stdout.
 *
 * Usage: node dp_fit_worker.js '<json DpFitArgs>'
 */
import { connect } from "nats";
import * as tf from "@tensorflow/tfjs";
import { selectBackend } from "../../core/backend.js";
import { sliceRanges } from "../../core/tensor_codec.js";
import { fit } from "../../core/train_loop.js";
import { GradientAverager, gradientHookFor } from "../../worker/gradient_averaging.js";
import { weightsChecksum } from "../../worker/weights_checksum.js";
import { DP_SETUP, dpData, dpModel, type DpFitArgs } from "./dp_fit_setup.js";

const args = JSON.parse(process.argv[2]!) as DpFitArgs;
await selectBackend("cpu");
const nc = await connect({ servers: args.url });
const averager = await GradientAverager.open({ nc, job: args.job, self: args.self, members: args.members, epoch: 1, timeoutMs: 20_000 });
// Barrier: tell the parent we are subscribed, wait for its go.
const go = nc.subscribe(`${args.job}-go`, { max: 1 });
nc.publish(`${args.job}-ready`, new TextEncoder().encode(args.self));
for await (const _ of go) break;

const model = dpModel();
const optimizer = tf.train.sgd(DP_SETUP.learningRate);
const me = args.members.indexOf(args.self);
await fit(model, dpData(), {
  epochs: DP_SETUP.epochs, batchSize: DP_SETUP.batchSize, seed: DP_SETUP.seed, numClasses: DP_SETUP.classes, optimizer,
  // Member i takes the i-th contiguous part of each global batch (what a StepPlan's sample ranges say).
  sliceOf: (idx) => {
    const r = sliceRanges(idx.length, args.members.length)[me]!;
    return idx.subarray(r.offset, r.offset + r.length);
  },
  gradientHook: gradientHookFor(averager, model),
});
const weights = model.trainableWeights.map((w) => Array.from(w.read().dataSync()));
process.stdout.write(JSON.stringify({ self: args.self, digest: weightsChecksum(model), weights }) + "\n");
await averager.close();
await nc.drain();

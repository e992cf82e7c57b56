/**
 * The training controls' state (train_loop's ControlsState) carried across an interruption: a fit
 * stopped after an epoch and resumed from a checkpoint of that moment (weights, Adam, cursor and the
 * controls' state, through the checkpoint blob) ends as the uninterrupted fit does under early
 * stopping, the plateau schedule and best weights restored: same epochs, rates, stopping epoch, best
 * epoch and final weights. A checkpoint without controls (an older ctrain's) still loads.
 */
import assert from "node:assert/strict";
import { before, describe, test } from "node:test";
import * as tf from "@tensorflow/tfjs";
import { selectBackend } from "../core/models/backend.js";
import { buildHead } from "../core/models/head.js";
import { Rng } from "../core/runtime/rng.js";
import { captureState, decodeState, encodeState, packArrays, restoreState, type TrainingState } from "../core/training/checkpoints.js";
import { type ArrayData, type ControlsState, type EpochStats, fit, type FitOptions } from "../core/training/train_loop.js";

before(async () => {
  await selectBackend("wasm");
});

/** Gaussian blobs in 8 dimensions, barely separated: val_loss is best at epoch 2 and then climbs. */
function blobs(n: number, seed: number): ArrayData {
  const rng = new Rng(seed);
  const x = new Float32Array(n * 8);
  const y = Int32Array.from({ length: n }, (_, i) => i % 3);
  for (let i = 0; i < n; i++) for (let d = 0; d < 8; d++) x[i * 8 + d] = (d % 3 === y[i] ? 0.3 : 0) + 2 * (rng.next() - 0.5);
  return { x, sampleShape: [8], y };
}

const TRAIN = blobs(96, 1);
const VAL = blobs(60, 2);
/** Patience 4 and plateau patience 2: with these data the best epoch is 2, the rate drops after epoch 4, the fit stops at 6. */
const CONTROLS = { earlyStoppingPatience: 4, restoreBestWeights: true, lrSchedule: "plateau", lrPatience: 2 } as const;
const RESUME_AT = 3;

function run(o: Partial<FitOptions> = {}) {
  const model = buildHead({ featureDim: 8, numClasses: 3, units: 32, dropout: 0, seed: 3 });
  const optimizer = tf.train.adam(0.01);
  const opts: FitOptions = { epochs: 12, batchSize: 8, seed: 1, numClasses: 3, optimizer, validation: VAL, controls: CONTROLS, ...o };
  return { model, optimizer, opts };
}

const flat = (m: tf.LayersModel): Float32Array => Float32Array.from(m.getWeights().flatMap((w) => Array.from(w.dataSync())));
const figures = (h: readonly EpochStats[]) => h.map((e) => ({ epoch: e.epoch, loss: e.loss, val_loss: e.val_loss, lr: e.lr }));

/** Trains until epoch RESUME_AT has ended and returns the checkpoint of that moment, through the blob format. */
async function interrupted(): Promise<{ state: TrainingState; history: EpochStats[] }> {
  const { model, optimizer, opts } = run();
  const stop = new AbortController();
  let read: (() => ControlsState) | undefined;
  let state: TrainingState | undefined;
  const history: EpochStats[] = [];
  await assert.rejects(fit(model, TRAIN, {
    ...opts, signal: stop.signal, onControls: (r) => (read = r),
    onEpochEnd: async (s) => {
      history.push(s);
      if (s.epoch !== RESUME_AT) return;
      state = { ...(await captureState(model, optimizer, { epoch: RESUME_AT, batch: 0, step: 0 })), controls: read!() };
      stop.abort(new Error("interrupted"));
    },
  }), /interrupted/);
  model.dispose();
  optimizer.dispose();
  return { state: decodeState(encodeState(state!)), history };
}

describe("controls resume", () => {
  test("controls resume - a fit resumed from a checkpoint with the controls' state ends as the uninterrupted fit (stop, rates, best epoch, weights)", async () => {
    const whole = run();
    let readWhole: (() => ControlsState) | undefined;
    const full = await fit(whole.model, TRAIN, { ...whole.opts, onControls: (r) => (readWhole = r) });
    const bestEpoch = full.find((h) => h.best)?.epoch;
    // What makes the comparison worth something: every count crosses the interruption.
    assert.equal(full.length, 6, `stopped early at epoch 6: ${JSON.stringify(figures(full))}`);
    assert.equal(bestEpoch, 2, "best epoch before the interruption");
    assert.ok(full[4]!.lr! < full[3]!.lr!, "the plateau lowered the rate after the interruption");

    const { state, history: first } = await interrupted();
    const c = state.controls!;
    assert.deepEqual({ best: c.best, bestEpoch: c.bestEpoch, wait: c.wait, lrWait: c.lrWait, lr: c.lr }, { best: full[1]!.val_loss, bestEpoch: 2, wait: 1, lrWait: 1, lr: 0.01 });
    assert.equal(c.bestWeights?.length, whole.model.trainableWeights.length, "the best epoch's trainable weights travel");

    const resumed = run({ initialEpoch: RESUME_AT, initialControls: state.controls });
    await restoreState(resumed.model, resumed.optimizer, state);
    let readResumed: (() => ControlsState) | undefined;
    const rest = await fit(resumed.model, TRAIN, { ...resumed.opts, onControls: (r) => (readResumed = r) });
    assert.deepEqual(figures([...first, ...rest]), figures(full), "same epochs, losses and rates, same stopping epoch");
    const end = (r: () => ControlsState) => ({ ...r(), bestWeights: undefined });
    assert.deepEqual(end(readResumed!), end(readWhole!), "the same controls' state at the end");
    assert.deepEqual(flat(resumed.model), flat(whole.model), "the best epoch's weights restored, bit for bit");
    assert.equal(rest.some((h) => h.best), false, "the best epoch is before the resume: not among the resumed fit's epochs");
    for (const m of [whole, resumed]) {
      m.model.dispose();
      m.optimizer.dispose();
    }
  });

  test("controls resume - a checkpoint without controls (an older ctrain's) loads, and its fit starts them from scratch", async () => {
    const { model, optimizer, opts } = run();
    const s = await captureState(model, optimizer, { epoch: 0, batch: 0, step: 0 }, { history: [] });
    // The blob as ctrain wrote it before the controls were stored: no `controls` in the header.
    const old = packArrays({ kind: "ctrain-training-state", cursor: s.cursor, weightCount: s.weights.length, meta: s.meta }, [...s.weights, ...s.optimizer]);
    const back = decodeState(old);
    assert.equal(back.controls, undefined);
    assert.equal(back.optimizer.length, s.optimizer.length);
    const fresh = decodeState(encodeState(s));
    assert.deepEqual(fresh.weights, back.weights);
    let read: (() => ControlsState) | undefined;
    await fit(model, TRAIN, { ...opts, epochs: 1, initialControls: back.controls, onControls: (r) => (read = r) });
    assert.equal(read!().bestEpoch, 1, "from scratch: the first epoch is the best so far");
    model.dispose();
    optimizer.dispose();
  });

  test("controls resume - best weights of another model are refused before any work", async () => {
    const { model, optimizer, opts } = run();
    const controls: ControlsState = { best: 1, bestEpoch: 1, wait: 0, lrWait: 0, bestWeights: [{ shape: [2, 2], data: new Float32Array(4) }] };
    await assert.rejects(fit(model, TRAIN, { ...opts, initialControls: controls }), /initialControls holds best weights of shapes \[2x2\]/);
    model.dispose();
    optimizer.dispose();
  });
});

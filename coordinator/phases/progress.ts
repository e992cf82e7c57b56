/**
 * Progress of one training phase, the same for the head and for fine-tuning, in this process or
 * data-parallel: the terminal's epoch bars, the phase's metrics (step, images, step time, loss and
 * accuracy per split) and one log event per epoch. Before, each phase had its own near-copy.
 */
import type { Logger } from "../../core/runtime/log.js";
import type { CtrainMetrics } from "../../core/runtime/metrics.js";
import { drawsBars, EpochBars } from "../../core/runtime/progress.js";
import type { EpochStats } from "../../core/training/train_loop.js";

export type TrainingPhase = "head" | "fine_tune";

/** The callbacks a training loop reports to, plus the bars' life cycle. */
export interface PhaseProgress {
  /** After each batch of a loop in this process. */
  onBatchEnd(info: { epoch: number; batch: number; samples: number; loss: number }): void;
  /** After each epoch (validation figures included when there are some). */
  onEpochEnd(s: EpochStats): void;
  /** A step count reported from elsewhere (data-parallel workers): moves the bar and the step gauges. */
  moveTo(step: number, totalSteps: number, epoch: number): void;
  begin(): void;
  finish(): void;
}

export const round = (x: number, d = 4): number => (Number.isFinite(x) ? Number(x.toFixed(d)) : x);

/** Progress of `phase`: `epochs` epochs of `stepsPerEpoch` steps. */
export function phaseProgress(phase: TrainingPhase, epochs: number, stepsPerEpoch: number, log: Logger, metrics?: CtrainMetrics): PhaseProgress {
  const bars = new EpochBars({ label: phase === "head" ? "head" : "fine-tune", epochs, stepsPerEpoch, log });
  // On a terminal the epoch's bar shows its figures; the log event is for files and collectors.
  const epochLevel = drawsBars() ? "debug" : "info";
  const timeStep = stepMetrics(metrics, phase);
  let step = 0;
  return {
    onBatchEnd: ({ epoch, batch, samples, loss }) => {
      timeStep({ batch, samples });
      step++;
      bars.batch(epoch, loss);
      metrics?.setEpoch(phase, epoch + 1, step);
      metrics?.progress(phase, step, stepsPerEpoch * epochs);
    },
    onEpochEnd: (s) => {
      metrics?.setEvaluation(phase, "train", { loss: s.loss, accuracy: s.accuracy });
      if (s.val_loss !== undefined) metrics?.setEvaluation(phase, "val", { loss: s.val_loss, accuracy: s.val_accuracy });
      bars.epochEnd(s);
      log[epochLevel]("epoch", { phase, epoch: s.epoch, loss: round(s.loss), accuracy: round(s.accuracy), val_loss: round(s.val_loss ?? NaN), val_accuracy: round(s.val_accuracy ?? NaN), lr: s.lr });
    },
    moveTo: (s, total, epoch) => {
      bars.moveTo(epoch, s, total);
      metrics?.setEpoch(phase, epoch + 1, s);
      metrics?.progress(phase, s, total);
    },
    begin: () => bars.begin(),
    finish: () => bars.finish(),
  };
}

/**
 * Images and step time of a training loop that runs in this process, for
 * ctrain_images_processed_total and ctrain_step_duration_seconds. A step is timed from the previous
 * batch's end; the first batch of an epoch is counted but not timed, because its gap would include
 * the previous epoch's validation.
 */
function stepMetrics(metrics: CtrainMetrics | undefined, phase: TrainingPhase): (info: { batch: number; samples: number }) => void {
  let last = 0;
  return ({ batch, samples }) => {
    const now = performance.now();
    if (batch > 0 && last > 0) metrics?.observeStep(phase, (now - last) / 1000);
    last = now;
    metrics?.countImages(phase, samples);
  };
}

/**
 * The training role of a ctrain worker: one replica of data-parallel fine-tuning (the design is in
 * coordinator/data_parallel.ts). NatsWorker starts it when the coordinator puts a training spec
 * (a JobSpec whose `training` is a TrainingAttempt, proto/training_wire.ts) under TRAINING_KEYS.spec
 * in the job's state KV. The replica itself is worker/replica_session.ts.
 *
 * A replica: fetches the head model, the start state and the training data from the job's checkpoints
 * object store -- cached activation rows, or for an image attempt (`--method augment`, head phase or
 * fine-tuning) the train sample ids, the images then opened and run through the frozen stage on this
 * worker (worker/replica_data.ts); builds the trainable part exactly as the one-process path does (the
 * head alone, or top + pooling + head: core/models/model_split.ts fineTuneModel); opens its GradientAverager as the only member (so its
 * gradient subject exists before any peer can send to it) and reports `ready`; then waits for the
 * coordinator's membership (a StepPlan under TRAINING_KEYS.members) and runs train_loop's fit() with
 * `sliceOf` = its contiguous part of every global batch (by member index) and the averaging hook.
 *
 * Elastic: the optimizer update runs only after averaging returned, so when averaging fails
 * (StepPeersLostError, or the coordinator moved the membership on) the weights and the optimizer are
 * still those of the last completed step. The hook reports the lost peers, waits for the next
 * membership epoch, recomputes its part of the SAME global batch under the new membership and
 * averages again; fit() never sees the failure. Membership comes from one ordered watch over the
 * coordinator's plans and member 0's training-epoch-boundary decisions (worker/membership_view.ts):
 * a replica that is not a member (started late, or left out of a membership) reports `ready` /
 * `waiting` and is let in at a boundary from member 0's state there (the join protocol is described
 * in coordinator/data_parallel.ts).
 *
 * Consistency: every `checksumEvery` steps each replica publishes a WeightsChecksum; every replica
 * compares the members' checksums of that step and stops the job with ReplicaMismatchError on any
 * difference. Member 0 writes a checkpoint every `checkpointEvery` steps (before the step runs, so
 * its cursor is exact) and the final state.
 */
import { ReplicaSession, type TrainingWorkerOptions } from "./replica_session.js";

export type { TrainingWorkerOptions };

/** Runs one training attempt to its end. Reports every outcome in the state KV; never throws. */
export async function runTrainingWorker(o: TrainingWorkerOptions): Promise<void> {
  await new ReplicaSession(o).run();
}

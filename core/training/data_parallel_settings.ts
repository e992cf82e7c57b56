/**
 * The tunable settings of data-parallel fine-tuning and their defaults, in one place. The coordinator
 * (coordinator/data_parallel.ts), the wire conversion (proto/training_wire.ts) and the option table
 * (core/runtime/config.ts: flags, env, YAML) all take their defaults from here, so a replica and the
 * coordinator can never disagree on one. Lives in core/ because the option table may not import a role.
 */

/** Settings of one data-parallel training attempt that a user may tune. */
export interface DataParallelSettings {
  /** Steps between replica weight-checksum exchanges; 0 = never. Steps. */
  checksumEvery: number;
  /** Steps between checkpoints of member 0; 0 = only the final state. Steps. */
  checkpointEvery: number;
  /** How long a step (or a boundary decision) may wait for peers before they count as lost, ms. */
  stepTimeoutMs: number;
  /** How long the coordinator waits for the asked number of replicas to be ready before starting with those that are, ms. */
  readyTimeoutMs: number;
  /**
   * Data bytes of one gradient chunk on the wire (one NATS message), bytes. Must leave 1 KiB under
   * the server's max_payload (1 MiB by default). 0 in a TrainingAttempt (an older coordinator's)
   * means this default.
   */
  bucketBytes: number;
}

/** Defaults of {@link DataParallelSettings}. */
export const DATA_PARALLEL_DEFAULTS: Readonly<DataParallelSettings> = Object.freeze({
  checksumEvery: 10,
  checkpointEvery: 20,
  stepTimeoutMs: 30_000,
  readyTimeoutMs: 120_000,
  // bench/allreduce --bucket-sweep (bench/results/allreduce.json, `bucket_sweep`): 128 KiB to 1023 KiB
  // cost the same within the noise of a shared 2-core machine, 64 KiB clearly more. 512 KiB sits in
  // the flat part with half of NATS's default max_payload to spare.
  bucketBytes: 512 * 1024,
});

/** The largest `bucketBytes`: 1 KiB (a chunk's header, rounded up) under NATS's default max_payload of 1 MiB. */
export const MAX_BUCKET_BYTES = 1024 * 1024 - 1024;
/** The smallest `bucketBytes`: below it the per-message cost swamps the data. */
export const MIN_BUCKET_BYTES = 4096;

/**
 * The bookkeeping of one extraction round on the coordinator, without NATS: which shards are still
 * pending, claimed (a worker sent progress), being fetched or stored; how many images were already
 * reported through progress (so a stored shard adds only the rest); the first failure, which ends
 * the round. Also the give-up rules (how often a rejected result is extracted again) and the error
 * a failed shard becomes. Unit-tested in test/extraction_round_units.test.ts.
 */
import { shardSize, type Shard } from "../core/datasets/shards.js";
import { ShardFailedError } from "../core/runtime/errors.js";
import { parseWireShardId, wireShardId, type ShardErrorRecord } from "../proto/extraction_wire.js";

/** Shards by state, as `ctrain_shards{state}` shows them. */
export interface ShardCounts {
  pending: number;
  running: number;
  done: number;
  failed: number;
}

export class ExtractionLedger {
  private readonly pending: Map<string, Shard>;
  /** Claimed: a worker reported progress. A subset of `pending`. */
  private readonly running = new Set<string>();
  private readonly fetching = new Set<string>();
  /** Images of a shard already reported through progress. */
  private readonly imagesSeen = new Map<string, number>();
  private done = 0;
  private failure: Error | undefined;

  constructor(readonly round: string, shards: readonly Shard[]) {
    this.pending = new Map(shards.map((s) => [wireShardId(round, s.id), s]));
  }

  /** The pending shard of a wire shard id; undefined once stored, or when it is not this round's. */
  shard(wire: string): Shard | undefined {
    return this.pending.get(wire);
  }

  /** Wire ids of the pending shards. */
  wires(): string[] {
    return [...this.pending.keys()];
  }

  get remaining(): number {
    return this.pending.size;
  }

  /** True once every shard is stored. */
  get finished(): boolean {
    return this.pending.size === 0;
  }

  /** The error that ended the round, if one did. */
  get failed(): Error | undefined {
    return this.failure;
  }

  /**
   * A worker's progress on a shard: `claimed` the first time, `images` newly done (progress never
   * counts beyond the shard's size nor backwards). Undefined for a shard that is not pending.
   */
  progress(wire: string, done: number): { claimed: boolean; images: number } | undefined {
    const shard = this.pending.get(wire);
    if (!shard) return undefined;
    const claimed = !this.running.has(wire);
    this.running.add(wire);
    const seen = this.imagesSeen.get(wire) ?? 0;
    const now = Math.min(done, shardSize(shard));
    if (now <= seen) return { claimed, images: 0 };
    this.imagesSeen.set(wire, now);
    return { claimed, images: now - seen };
  }

  /** Starts fetching a stored result; false when the shard is not pending, is being fetched, or the round failed. */
  beginFetch(wire: string): boolean {
    if (!this.pending.has(wire) || this.fetching.has(wire) || this.failure) return false;
    this.fetching.add(wire);
    return true;
  }

  endFetch(wire: string): void {
    this.fetching.delete(wire);
  }

  /**
   * A shard's features are stored: it leaves `pending`. `images` are those progress had not reported.
   * Undefined when it was not pending (stored twice: count it once).
   */
  complete(wire: string): { images: number } | undefined {
    const shard = this.pending.get(wire);
    if (!shard) return undefined;
    this.pending.delete(wire);
    this.running.delete(wire);
    this.done++;
    return { images: Math.max(0, shardSize(shard) - (this.imagesSeen.get(wire) ?? 0)) };
  }

  /** Ends the round with `e`; true the first time (later failures are ignored). */
  fail(e: Error): boolean {
    if (this.failure) return false;
    this.failure = e;
    return true;
  }

  counts(): ShardCounts {
    return { pending: this.pending.size - this.running.size, running: this.running.size, done: this.done, failed: this.failure ? 1 : 0 };
  }
}

/**
 * The attempt after `previous` for a shard whose stored result was rejected, and whether to give up:
 * a worker that keeps sending bad results must not keep the job busy forever, so after `maxDeliver`
 * attempts the shard fails.
 */
export function nextAttempt(previous: number, maxDeliver: number): { attempt: number; giveUp: boolean } {
  const attempt = Math.max(1, previous) + 1;
  return { attempt, giveUp: attempt > maxDeliver };
}

/** The job error of a shard that used up its deliveries; `last` is its last recorded failure, if any. */
export function shardFailed(wire: string, deliveries: number, last: ShardErrorRecord | undefined): ShardFailedError {
  const shard = parseWireShardId(wire)?.shardId ?? wire;
  const lastError = last ? `${last.error} (worker ${last.worker}, delivery ${last.attempt})` : "no error was reported: the workers holding it died or timed out (ack wait)";
  return new ShardFailedError(shard, lastError, `shard ${shard} failed after ${deliveries} deliveries; last error: ${lastError}. Fix the cause and run the job again with the same --job to resume.`);
}

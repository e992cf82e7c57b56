/**
 * Replica consistency: the weights digests the members published for a step, compared once every
 * current member's is in. Replicas that applied the same updates hold bit-identical weights, so any
 * difference in the CRC is a missed or double-applied update (ReplicaMismatchError). Pure: the session
 * feeds it what arrives on the weights subject (test/replica_session.test.ts checks it without NATS).
 */
import { ReplicaMismatchError } from "../core/runtime/errors.js";
import type { ReplicaDigest } from "../proto/training_wire.js";

export class ChecksumBook {
  private readonly byStep = new Map<number, Map<string, { checksum: number; sum: number }>>();

  constructor(private readonly self: string) {}

  /**
   * Records `d` (ignored unless its worker is one of `members`); when every member's digest of that step
   * is in, compares them with this replica's and forgets the step. Returns the mismatch, if any.
   */
  record(d: ReplicaDigest, members: readonly string[]): ReplicaMismatchError | undefined {
    if (!members.includes(d.worker)) return undefined;
    const got = this.byStep.get(d.step) ?? new Map<string, { checksum: number; sum: number }>();
    got.set(d.worker, { checksum: d.checksum, sum: d.sum });
    this.byStep.set(d.step, got);
    if (!members.every((m) => got.has(m))) return undefined;
    this.byStep.delete(d.step);
    const mine = got.get(this.self);
    if (!mine) return undefined;
    const bad = [...got].filter(([w, x]) => members.includes(w) && x.checksum !== mine.checksum);
    if (bad.length === 0) return undefined;
    return new ReplicaMismatchError(d.step, `${this.self} crc ${mine.checksum} sum ${mine.sum}; ${bad.map(([w, x]) => `${w} crc ${x.checksum} sum ${x.sum}`).join("; ")}`);
  }

  /** Steps still waiting for a member's digest. */
  get open(): number {
    return this.byStep.size;
  }
}

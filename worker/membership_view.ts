/**
 * What one replica knows of the data-parallel membership, derived only from the ordered stream of
 * membership events in the job's state KV (one watch over TRAINING_KEYS.plan, so every replica sees the
 * same events in the same order and reaches the same conclusions):
 *
 * - StepPlan (coordinator). `members` in order; `joining` names the members that are not replicas yet.
 *   A plan with no joiner takes effect at once (a lost member, or the attempt's first plan): the step
 *   in flight is redone under it. A plan with joiners is a proposal: the members it already has go on
 *   unchanged, and the joiners come in at the next training-epoch boundary, if member 0 says so.
 * - Control EPOCH_BOUNDARY (member 0 of the current membership, at the first step S of a training
 *   epoch): `header.epoch` names the pending proposal it applies from step S on, or the current epoch
 *   when it keeps the membership. The first decision for a step wins; a decision for a proposal that a
 *   later plan cancelled (stream order) changes nothing.
 *
 * The coordinator keeps one invariant that makes this consistent: a plan with joiners lists the current
 * members unchanged, so a membership never changes at once and at a boundary under the same epoch.
 */

export interface Membership {
  epoch: number;
  members: readonly string[];
  /** How it came in: a plan that took effect at once, or a join applied at boundary step `step`. */
  origin: { kind: "plan" } | { kind: "join"; step: number };
}

export interface PendingJoin {
  epoch: number;
  members: readonly string[];
  joining: readonly string[];
}

/** A join applied at a boundary: from step `step` on, `members` under `epoch`. */
export interface JoinSwitch {
  step: number;
  /** Position of the decision in the event stream (MembershipView.seq when it was applied). */
  seq: number;
  epoch: number;
  members: readonly string[];
}

export type PlanEffect = "stale" | "immediate" | "proposal";

const same = (a: readonly string[], b: readonly string[]): boolean => a.length === b.length && a.every((w, i) => w === b[i]);

export class MembershipView {
  /** The membership in force (undefined before the attempt's first plan). */
  current: Membership | undefined;
  /** A proposal waiting for a boundary. */
  pending: PendingJoin | undefined;
  /** Boundary step -> the join applied there, or null when member 0 kept the membership. */
  readonly boundaries = new Map<number, JoinSwitch | null>();
  /** Events applied so far. */
  seq = 0;
  private lastPlanEpoch = 0;

  /** Applies a plan (in stream order). */
  applyPlan(epoch: number, members: readonly string[], joining: readonly string[]): PlanEffect {
    this.seq++;
    if (epoch <= this.lastPlanEpoch) return "stale";
    this.lastPlanEpoch = epoch;
    const cur = this.current?.members ?? [];
    // A joiner that a boundary already let in is a member like the others.
    const waiting = joining.filter((w) => !cur.includes(w));
    if (waiting.length === 0 || this.current === undefined) {
      this.current = { epoch, members: members.filter((w) => !waiting.includes(w)), origin: { kind: "plan" } };
      this.pending = waiting.length ? { epoch, members: [...members], joining: waiting } : undefined;
      return "immediate";
    }
    const active = members.filter((w) => !waiting.includes(w));
    if (!same(active, cur)) {
      // Breaks the coordinator's invariant; take the member change at once and leave the joiners waiting
      // (the coordinator proposes them again).
      this.current = { epoch, members: active, origin: { kind: "plan" } };
      this.pending = undefined;
      return "immediate";
    }
    this.pending = { epoch, members: [...members], joining: waiting };
    return "proposal";
  }

  /** Applies member 0's decision at boundary `step` (in stream order); returns the join it applied, if any. */
  applyDecision(step: number, epoch: number): JoinSwitch | null {
    this.seq++;
    if (this.boundaries.has(step)) return null;
    if (this.pending && this.pending.epoch === epoch) {
      const sw: JoinSwitch = { step, seq: this.seq, epoch, members: this.pending.members };
      this.current = { epoch, members: sw.members, origin: { kind: "join", step } };
      this.pending = undefined;
      this.boundaries.set(step, sw);
      return sw;
    }
    this.boundaries.set(step, null);
    return null;
  }

  /** The latest join applied after event `afterSeq` that lets `self` in. */
  joinFor(self: string, afterSeq: number): JoinSwitch | undefined {
    let best: JoinSwitch | undefined;
    for (const sw of this.boundaries.values()) if (sw && sw.seq > afterSeq && sw.members.includes(self) && (!best || sw.seq > best.seq)) best = sw;
    return best;
  }
}

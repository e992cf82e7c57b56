/**
 * The coordinator's side of data-parallel membership, as a small pure state machine (the replicas'
 * side is worker/membership_view.ts). It turns what the driver observed -- replicas ready, members
 * lost, joiners waiting, member 0's boundary decisions, the replicas' reports -- into the next
 * membership plan and the decisions around it. No I/O: the driver (coordinator/data_parallel_driver.ts)
 * publishes the plans it returns and does what the decisions say, so every rule here is unit-tested
 * without NATS (test/membership_planner.test.ts).
 *
 * Epochs: `epoch` is the newest plan's; the active epoch is the one the replicas average under. A plan
 * without joiners takes effect at once (active = its epoch). A plan with joiners is a proposal: it lists
 * the current members unchanged (the invariant MembershipView relies on) plus the joiners, and only
 * becomes active when member 0 applies it at a training-epoch boundary. Losing a member (or a joiner)
 * withdraws a pending proposal; its joiners that are still alive are proposed again later.
 */
import { WorkersUnavailableError } from "../core/runtime/errors.js";
import type { MembershipPlan, TrainingReport } from "../proto/training_wire.js";

/** What losing workers changed. */
export interface LossDecision {
  /** The plan to publish (takes effect at once). */
  plan: MembershipPlan;
  /** Members removed. */
  lostMembers: string[];
  /** Proposed joiners removed (their proposal is withdrawn). */
  lostJoiners: string[];
}

/** A proposal that member 0 applied at boundary `step`. */
export interface JoinApplied {
  step: number;
  epoch: number;
  joined: readonly string[];
  members: readonly string[];
}

export class MembershipPlanner {
  private members: string[] = [];
  private epoch = 0;
  private active = 0;
  private proposal: { epoch: number; joiners: string[] } | undefined;

  /** The membership the replicas average under (members in order; member 0 first). */
  get current(): { epoch: number; members: readonly string[] } {
    return { epoch: this.active, members: this.members };
  }

  /** The pending proposal's joiners (empty when none is pending). */
  get joiners(): readonly string[] {
    return this.proposal?.joiners ?? [];
  }

  /** Workers whose liveness matters: the members and the proposed joiners. */
  watched(): string[] {
    return [...this.members, ...this.joiners];
  }

  isMember(w: string): boolean {
    return this.members.includes(w);
  }

  /** The attempt's first membership (epoch 1): the ready replicas, sorted. Throws WorkersUnavailableError when there is none. */
  start(ready: readonly string[], readyTimeoutMs: number): MembershipPlan {
    if (ready.length === 0) throw new WorkersUnavailableError(`no worker became ready for fine-tuning within ${readyTimeoutMs} ms: start workers on the job (ctrain worker --job ...) or raise the ready timeout`);
    this.members = [...ready].sort();
    this.epoch = 1;
    this.active = 1;
    this.proposal = undefined;
    return { epoch: 1, members: [...this.members], joining: [] };
  }

  /**
   * Removes `lost` (members and proposed joiners); the new plan takes effect at once. Undefined when
   * none of them is a member or joiner. Throws WorkersUnavailableError when no member is left.
   */
  lose(lost: readonly string[]): LossDecision | undefined {
    const lostMembers = lost.filter((w) => this.members.includes(w));
    const lostJoiners = lost.filter((w) => this.joiners.includes(w));
    if (lostMembers.length === 0 && lostJoiners.length === 0) return undefined;
    this.members = this.members.filter((w) => !lostMembers.includes(w));
    if (this.members.length === 0) throw new WorkersUnavailableError(`every fine-tuning worker was lost (last: ${lostMembers.join(", ")}); start workers and run the job again: it resumes from the last checkpoint`);
    this.proposal = undefined;
    this.epoch++;
    this.active = this.epoch;
    return { plan: { epoch: this.epoch, members: [...this.members], joining: [] }, lostMembers, lostJoiners };
  }

  /**
   * Whom a survivor's `peers_lost` report of membership epoch `epoch` lets the coordinator drop: of
   * the `reported` peers, those whose heartbeat is gone (`dead`), else all of them (a live peer that
   * cannot deliver a step is as lost). Empty for a report of an older membership (already handled).
   */
  lostFromReport(epoch: number | undefined, reported: readonly string[], dead: readonly string[]): string[] {
    if (epoch !== this.active) return [];
    const gone = reported.filter((w) => dead.includes(w));
    return gone.length ? gone : [...reported];
  }

  /**
   * Proposes the `candidates` (ready or waiting replicas that are alive) that are not members to join at
   * the next boundary. Undefined when a proposal is pending or none is left.
   */
  propose(candidates: readonly string[]): MembershipPlan | undefined {
    if (this.proposal) return undefined;
    const joiners = [...new Set(candidates)].filter((w) => !this.members.includes(w)).sort();
    if (joiners.length === 0) return undefined;
    this.epoch++;
    this.proposal = { epoch: this.epoch, joiners };
    return { epoch: this.epoch, members: [...this.members, ...joiners], joining: joiners };
  }

  /** Member 0's decision at boundary `step` naming membership epoch `epoch`: the join it applied, if it applied the pending proposal. */
  decide(step: number, epoch: number): JoinApplied | undefined {
    if (!this.proposal || epoch !== this.proposal.epoch) return undefined;
    const joined = this.proposal.joiners;
    this.members = [...this.members, ...joined];
    this.active = this.proposal.epoch;
    this.proposal = undefined;
    return { step, epoch, joined, members: [...this.members] };
  }
}

/** What the driver does with one report (reports of `loading`/`ready` only feed the ready set). */
export type ReportAction =
  | { type: "fail"; message: string }
  | { type: "checkpoint" }
  | { type: "peers_lost" }
  | { type: "done" }
  | { type: "epoch_end"; epochs: number }
  | { type: "none" };

/**
 * The action for report `r`, given member 0 now and the epochs of history already passed on. Only
 * member 0's `done` ends the attempt and only its epoch ends are passed on (every replica reports the
 * same figures; member 0 is the one sure to have them after a loss).
 */
export function reportAction(r: TrainingReport, member0: string | undefined, epochsSeen: number): ReportAction {
  switch (r.state) {
    case "failed":
      return { type: "fail", message: `fine-tuning failed on worker ${r.worker}: ${r.error}` };
    case "checkpoint":
      return { type: "checkpoint" };
    case "peers_lost":
      return { type: "peers_lost" };
    case "done":
      return r.worker === member0 ? { type: "done" } : { type: "none" };
    case "training":
      return r.worker === member0 && (r.history?.length ?? 0) > epochsSeen ? { type: "epoch_end", epochs: r.history!.length } : { type: "none" };
    default:
      return { type: "none" };
  }
}

/** Whether to keep waiting for replicas before the first plan: `ready` of `asked` so far, until `deadline` (ms since epoch). */
export function keepWaiting(ready: number, asked: number, now: number, deadline: number): boolean {
  return ready < asked && now < deadline;
}

/** Per-worker mean of the finished replicas' averaging time and bytes (for the run's log). */
export function allreduceOf(done: readonly TrainingReport[], workers: number): { seconds: number; bytes: number; workers: number } {
  const n = Math.max(1, done.length);
  return {
    seconds: done.reduce((a, x) => a + (x.allreduce_seconds ?? 0), 0) / n,
    bytes: done.reduce((a, x) => a + (x.allreduce_bytes ?? 0), 0) / n,
    workers,
  };
}

/**
 * The coordinator's supervision of one data-parallel training attempt (the design is in
 * coordinator/data_parallel.ts): watch the replicas' reports and member 0's boundary decisions, wait
 * for replicas, publish memberships, drop lost members, propose joiners, and end when member 0
 * reports done. Every membership rule is in MembershipPlanner (pure, unit-tested); this object only
 * does the I/O around it.
 */
import type { KV, ObjectStore } from "nats";
import type { Logger } from "../core/runtime/log.js";
import type { CtrainMetrics } from "../core/runtime/metrics.js";
import { ReplicaFailedError, WorkersUnavailableError } from "../core/runtime/errors.js";
import type { EpochStats } from "../core/training/train_loop.js";
import { decodeState, getBytes, getBytesWithin, writeStateFile, type TrainingState } from "../core/training/checkpoints.js";
import { decode, DecodeError } from "../proto/codec.js";
import { WORKER_REGISTRY_TTL_MS } from "../proto/subjects.js";
import { attemptPhase, cannotJoin, decodeBoundaryDecision, decodeReport, encodeMembershipPlan, TRAINING_KEYS, TRAINING_OBJECTS, type BoundaryDecision, type MembershipPlan, type TrainingAttempt, type TrainingReport } from "../proto/training_wire.js";
import { allreduceOf, keepWaiting, MembershipPlanner, reportAction } from "./membership_planner.js";
import { StragglerMonitor } from "./straggler_monitor.js";

/** What the driver needs: the job's stores, the attempt, and the run's hooks. */
export interface DriverContext {
  job: string;
  log: Logger;
  metrics?: CtrainMetrics;
  state: KV;
  registry: KV;
  os: ObjectStore;
  attempt: TrainingAttempt;
  /** The attempt's start cursor (a resumed attempt starts past 0). */
  start: TrainingState;
  totalSteps: number;
  /** Replicas to wait for before the first step. */
  workers: number;
  readyTimeoutMs: number;
  out?: string;
  onBatchProgress?: (step: number, totalSteps: number, epoch: number) => void;
  onEpochEnd?: (s: EpochStats) => void | Promise<void>;
  signal?: AbortSignal;
}

export interface DriveResult {
  final: TrainingState;
  history: EpochStats[];
  allreduce: { seconds: number; bytes: number; workers: number };
  /** Every worker that was a member at some step of the attempt (summary.json's phases.<phase>.workers). */
  trainedBy: string[];
}

type Watch = Awaited<ReturnType<KV["watch"]>>;

/** How often the heartbeats of members and joiners are checked, ms. */
const HEARTBEAT_CHECK_MS = 2000;

export class DataParallelDriver {
  private readonly planner = new MembershipPlanner();
  private readonly reports = new Map<string, TrainingReport>();
  private readonly pending: TrainingReport[] = [];
  private readonly decisions: BoundaryDecision[] = [];
  private readonly watches: Watch[] = [];
  private wake: (() => void) | undefined;
  private lastHeartbeatCheck = 0;
  private lastLiveCheck = 0;
  private epochsSeen = 0;
  /** Workers that were members under some active membership. */
  private readonly trainedBy = new Set<string>();
  /** Workers that could not open the attempt's data (cannotJoin), already logged. */
  private readonly leftOut = new Set<string>();
  /** Per-step compute/wait of every replica: metrics, and a log line naming a straggler. */
  private readonly stragglers: StragglerMonitor;
  /** The copy of the latest checkpoint to --out in progress (one at a time, beside the supervision loop). */
  private copying: Promise<void> | undefined;

  constructor(private readonly c: DriverContext) {
    this.stragglers = new StragglerMonitor({ log: c.log, ...(c.metrics ? { metrics: c.metrics } : {}) });
  }

  /** Membership and supervision until member 0 reports done. */
  async run(): Promise<DriveResult> {
    try {
      await this.watchReports();
      const ready = await this.waitReady();
      await this.publish(this.planner.start(ready, this.c.readyTimeoutMs));
      if (ready.length < this.c.workers) this.c.log.warn("starting fine-tuning with fewer workers than asked", { ready: ready.length, asked: this.c.workers });
      await this.watchDecisions();
      return await this.supervise();
    } finally {
      for (const w of this.watches) w.stop();
    }
  }

  /** Collects the attempt's reports: the latest per worker, and the news to act on in order. */
  private async watchReports(): Promise<void> {
    const watch = await this.c.state.watch({ key: TRAINING_KEYS.reports });
    this.watches.push(watch);
    void (async () => {
      for await (const e of watch) {
        if (e.operation !== "PUT") continue;
        const r = this.decodeReport(e.key, e.value);
        if (!r || r.attempt !== this.c.attempt.attempt) continue;
        this.stragglers.onReport(r);
        this.reports.set(r.worker, r);
        if (r.state !== "loading" && r.state !== "ready") this.pending.push(r);
        this.wake?.();
      }
    })();
  }

  private decodeReport(key: string, value: Uint8Array): TrainingReport | undefined {
    try {
      return decodeReport(this.c.job, value);
    } catch (err) {
      const reason = err instanceof DecodeError ? err.reason : "malformed";
      this.c.metrics?.droppedMessage(reason);
      this.c.log.warn("dropped a training report that does not decode", { key, reason, error: err as Error });
      return undefined;
    }
  }

  /** Member 0's boundary decisions, in order. */
  private async watchDecisions(): Promise<void> {
    const watch = await this.c.state.watch({ key: TRAINING_KEYS.boundary });
    this.watches.push(watch);
    void (async () => {
      for await (const e of watch) {
        if (e.operation !== "PUT" || e.value.length === 0) continue;
        try {
          const d = decodeBoundaryDecision(this.c.job, this.c.attempt.attempt, e.value, "coordinator");
          if (!d) continue;
          this.decisions.push(d);
          this.wake?.();
        } catch {
          this.c.metrics?.droppedMessage("decode_error");
        }
      }
    })();
  }

  /** Sleeps up to `ms`; a report or decision ends the sleep early. */
  private tick(ms: number): Promise<void> {
    return new Promise((r) => {
      const t = setTimeout(r, ms);
      this.wake = () => {
        clearTimeout(t);
        r();
      };
    });
  }

  private checkAbort(): void {
    if (this.c.signal?.aborted) throw this.c.signal.reason;
  }

  /**
   * Waits for `workers` ready replicas (or the ready timeout, or every live worker of the registry
   * ready: a worker lost in an earlier phase is not waited for); returns the ready ones. A replica that
   * could not open the attempt's data is left out (the others go on; none left is WorkersUnavailableError);
   * any other failure to load stops the attempt.
   */
  private async waitReady(): Promise<string[]> {
    const deadline = Date.now() + this.c.readyTimeoutMs;
    const ready = (): string[] => [...this.reports.values()].filter((r) => r.state === "ready").map((r) => r.worker).sort();
    let settled = 0;
    while (keepWaiting(ready().length, this.c.workers - this.leftOut.size, Date.now(), deadline)) {
      this.checkAbort();
      const live = await this.everyLiveWorkerReady(ready());
      if (live !== undefined) settled = live ? settled + 1 : 0;
      // Twice in a row (a second apart at least): a worker that registers a moment late is still waited for.
      if (settled >= 2) {
        this.c.log.info("every live worker is ready: starting without waiting for the rest", { ready: ready(), asked: this.c.workers });
        break;
      }
      this.checkFailures();
      await this.tick(500);
    }
    this.checkFailures();
    return ready();
  }

  /** Leaves out the replicas that cannot open the data; throws for any other failure, or when every worker asked for is left out. */
  private checkFailures(): void {
    const failed = [...this.reports.values()].filter((r) => r.state === "failed");
    for (const r of failed.filter(cannotJoin)) this.leaveOut(r);
    const other = failed.find((r) => !cannotJoin(r));
    if (other) throw new ReplicaFailedError(other.worker, `worker ${other.worker} could not start fine-tuning: ${other.error}`);
    const ready = [...this.reports.values()].some((r) => r.state === "ready");
    if (!ready && this.leftOut.size >= this.c.workers) throw new WorkersUnavailableError(`no worker can open the data set of the ${this.c.attempt.phase} phase: ${failed.map((r) => r.error).join(" | ")}`);
  }

  /** Whether some replica is ready and every live worker in the registry is ready or left out; undefined between checks (every 2 s). */
  private async everyLiveWorkerReady(ready: readonly string[]): Promise<boolean | undefined> {
    if (ready.length === 0) return false;
    if (Date.now() - this.lastLiveCheck < HEARTBEAT_CHECK_MS) return undefined;
    this.lastLiveCheck = Date.now();
    const keys: string[] = [];
    for await (const k of await this.c.registry.keys()) keys.push(k);
    for (const w of keys) if (!ready.includes(w) && !this.leftOut.has(w) && (await this.alive(w))) return false;
    return true;
  }

  /** A replica that cannot open the attempt's data: logged once, never a member. */
  private leaveOut(r: TrainingReport): void {
    if (this.leftOut.has(r.worker)) return;
    this.leftOut.add(r.worker);
    this.c.log.error("worker left out: it cannot open the data set", { worker: r.worker, error: r.error });
  }

  /** Is `w`'s registry entry there, fresh and not `stopped`? */
  private async alive(w: string): Promise<boolean> {
    const e = await this.c.registry.get(w).catch(() => null);
    if (!e || e.operation !== "PUT" || e.value.length === 0) return false;
    try {
      const hb = decode("Heartbeat", e.value, { job: this.c.job });
      return hb.state !== "stopped" && Date.now() - e.created.getTime() < WORKER_REGISTRY_TTL_MS;
    } catch {
      return false;
    }
  }

  private async dead(workers: readonly string[]): Promise<string[]> {
    const out: string[] = [];
    for (const w of workers) if (!(await this.alive(w))) out.push(w);
    return out;
  }

  private async publish(plan: MembershipPlan): Promise<void> {
    await this.c.state.put(TRAINING_KEYS.members, encodeMembershipPlan(this.c.job, this.c.attempt, plan, this.c.start.cursor));
    if (plan.joining.length === 0) {
      for (const w of plan.members) this.trainedBy.add(w);
      this.c.metrics?.setWorkers({ alive: plan.members.length });
      this.c.log.info("membership", { epoch: plan.epoch, members: plan.members });
    } else {
      const members = plan.members.filter((w) => !plan.joining.includes(w));
      this.c.log.info("join proposed for the next training-epoch boundary", { epoch: plan.epoch, members, joining: plan.joining });
    }
  }

  /** Removes lost workers and publishes the membership without them. */
  private async drop(lost: readonly string[], why: string): Promise<void> {
    const d = this.planner.lose(lost);
    if (!d) return;
    for (const w of lost) this.stragglers.forget(w);
    const { epoch, members } = d.plan;
    if (d.lostMembers.length) this.c.log.warn("worker lost: new membership", { lost: d.lostMembers, why, epoch, members });
    else this.c.log.warn("joiner lost before its boundary: proposal withdrawn", { lost: d.lostJoiners, why, epoch });
    await this.publish(d.plan);
  }

  /** Until member 0 reports done: decisions, reports, heartbeats, joiners, once a second (sooner on news). */
  private async supervise(): Promise<DriveResult> {
    for (;;) {
      this.checkAbort();
      this.applyDecisions();
      for (const r of this.pending.splice(0)) {
        const done = await this.handle(r);
        if (done) return done;
      }
      await this.checkHeartbeats();
      await this.proposeJoiners();
      await this.tick(1000);
    }
  }

  private applyDecisions(): void {
    for (const d of this.decisions.splice(0)) {
      const j = this.planner.decide(d.step, d.epoch);
      if (!j) continue;
      this.c.log.info("workers joined at a training-epoch boundary", { joined: j.joined, step: j.step, epoch: j.epoch, members: j.members });
      for (const w of j.members) this.trainedBy.add(w);
      this.c.metrics?.setWorkers({ alive: j.members.length });
    }
  }

  /** Acts on one report; the attempt's result when it is member 0's `done`. */
  private async handle(r: TrainingReport): Promise<DriveResult | undefined> {
    if (cannotJoin(r) && !this.planner.watched().includes(r.worker)) {
      this.leaveOut(r);
      return undefined;
    }
    const a = reportAction(r, this.planner.current.members[0], this.epochsSeen);
    switch (a.type) {
      case "fail":
        throw new ReplicaFailedError(r.worker, a.message);
      case "checkpoint":
        this.onCheckpoint(r);
        return undefined;
      case "peers_lost": {
        // Trust a survivor's report only for peers whose heartbeat is gone or stale.
        const lost = this.planner.lostFromReport(r.epoch, r.lost ?? [], await this.dead(r.lost ?? []));
        if (lost.length) await this.drop(lost, "the survivors' step timed out");
        return undefined;
      }
      case "done":
        return this.finish(r);
      case "epoch_end":
        this.epochsSeen = a.epochs;
        // Progress between checkpoints (ctrain_progress_ratio, ctrain_epoch/step of fine_tune): member 0's step at the epoch's end.
        if (r.step !== undefined) this.c.onBatchProgress?.(r.step, this.c.totalSteps, a.epochs - 1);
        await this.c.onEpochEnd?.(r.history!.at(-1)!);
        return undefined;
      case "none":
        return undefined;
    }
  }

  private onCheckpoint(r: TrainingReport): void {
    this.c.log.info("checkpoint saved", { step: r.step, cursor: r.cursor, by: r.worker });
    this.c.onBatchProgress?.(r.step ?? 0, this.c.totalSteps, r.cursor?.epoch ?? 0);
    // Not awaited: a copy can take its whole timeout (see copyLatest), and the loop must go on reading reports,
    // heartbeats and joiners meanwhile. A checkpoint that comes during a copy is left to the next one.
    if (!this.c.out || this.copying) return;
    this.copying = this.copyLatest(this.c.out)
      .catch((err: unknown) => this.c.log.warn("checkpoint copy to --out failed", { error: err as Error }))
      .finally(() => (this.copying = undefined));
  }

  /** Copies `latest` to <out>/checkpoints/. */
  private async copyLatest(out: string): Promise<void> {
    // Best effort, bounded: member 0 may overwrite `latest` while we read it, and a read whose chunks
    // were purged never ends (it stalled the whole supervision loop).
    const phase = attemptPhase(this.c.attempt);
    const b = await getBytesWithin(this.c.os, TRAINING_OBJECTS.latestOf(phase), 5000).catch(() => null);
    if (b) await writeStateFile(out, TRAINING_OBJECTS.fileOf(phase, "latest"), decodeState(b));
  }

  /** Member 0 is done: its final state and history, and the replicas' averaging cost. */
  private async finish(r: TrainingReport): Promise<DriveResult> {
    const name = TRAINING_OBJECTS.final(this.c.attempt.attempt);
    await this.copying;
    const b = await getBytes(this.c.os, name);
    if (!b) throw new ReplicaFailedError(r.worker, `member 0 (${r.worker}) reported done but ${name} is not in the store`);
    const done = [...this.reports.values()].filter((x) => x.state === "done");
    return { final: decodeState(b), history: r.history ?? [], allreduce: allreduceOf(done, this.planner.current.members.length), trainedBy: [...this.trainedBy].sort() };
  }

  /** Heartbeat TTL: a member or joiner whose registry entry expired (or says stopped) is gone. */
  private async checkHeartbeats(): Promise<void> {
    if (Date.now() - this.lastHeartbeatCheck <= HEARTBEAT_CHECK_MS) return;
    this.lastHeartbeatCheck = Date.now();
    const gone = await this.dead(this.planner.watched());
    if (gone.length) await this.drop(gone, "no heartbeat");
  }

  /** Elastic scale-up: ready (or waiting) replicas that are alive and not members come in at the next boundary. */
  private async proposeJoiners(): Promise<void> {
    if (this.planner.joiners.length) return;
    const candidates: string[] = [];
    for (const r of this.reports.values()) {
      if ((r.state === "ready" || r.state === "waiting") && !this.planner.isMember(r.worker) && (await this.alive(r.worker))) candidates.push(r.worker);
    }
    const plan = this.planner.propose(candidates);
    if (plan) await this.publish(plan);
  }
}

/**
 * Synchronous data-parallel gradient averaging over core NATS: reduce-scatter to slice owners, then
 * fan-out of each averaged slice (an all-gather through NATS subject interest).
 *
 * The flat gradient vector (every trainable tensor fused, G elements) is cut into N contiguous slices
 * (`sliceRanges`); member i owns slice i. Each step every member
 *   1. sends every slice it does not own to that slice's owner on `grad.<owner>`, in chunks that fit a
 *      NATS message, with its sample count alongside (GradientChunk.sample_count);
 *   2. as owner, accumulates in fp32 sum_i(n_i * g_i) over its slice (its own gradient included),
 *      divides by sum_i(n_i) once every member's chunks are in, and publishes the averaged slice ONCE
 *      on `avg.<self>`; the server fans it out to the N-1 members subscribed there;
 *   3. assembles the full averaged vector from its own slice and the N-1 slices it receives.
 * So each worker sends G(N-1)/N + G/N = G elements and receives 2G(N-1)/N per step, whatever N: no
 * process relays N*G. Weighting by sample count makes the result the mean gradient of the global
 * batch even when members hold unequal parts of it (the last, short batch). With fp16 on the wire the
 * owner rounds its own slice through fp16 too, so every member ends the step with identical values.
 *
 * Trust: every message is decoded by proto/codec.ts (job, membership epoch, CRC, NaN/Inf) and then
 * checked against this step's plan (sender is a member, the chunk is in the plan, right dtype). Whatever
 * fails is dropped and counted by reason (`metrics.droppedMessage`), never applied. A member may run one
 * step ahead of another (it finished step s and already sends s+1 while a slow owner still waits for
 * the last slices of s), so messages of the next step, and of a newer membership epoch, are held in a
 * bounded buffer until their step starts; anything older is dropped as `wrong_step` / `stale_epoch`.
 *
 * Failure: a NaN/Inf in the local gradient throws {@link NonFiniteGradientError} before anything is
 * sent, so no peer can ever apply it. The peers then do not get that member's chunks and, after
 * `timeoutMs`, throw {@link StepPeersLostError} (a WorkerLostError) naming it; the driver bumps the
 * membership epoch and the survivors redo the step. A driver that learns of the failure sooner (a
 * Control ABORT_STEP) calls `abort()` to end the wait at once.
 *
 * Catch-up: survivors need not fail a step together. A member can complete step s (the last averaged
 * slice reached it) while another gave up on it a moment earlier (its timeout fired first, or the new
 * membership aborted it with the last slice still in flight). The first applied s and runs s+1; the
 * second redoes s under the new epoch, and the two would wait for each other forever. So each member
 * keeps the vector it returned for its last completed step; when a gradient chunk of that step
 * arrives under a newer epoch (someone is redoing what it finished), it resends that whole vector once
 * per epoch on its averaged subject, marked `replay`, in fp32 (exact, fp16-rounded values included).
 * A member redoing the step takes the first complete replay as the step's result: it applies exactly
 * what the others applied, and everyone meets again at s+1. Cost: one copy of the flat vector.
 *
 * Start-up: subscriptions must reach the server before any peer publishes, so create averagers with
 * {@link GradientAverager.open} (it flushes) and start step 0 only once every member has opened (the
 * coordinator's StepPlan is that barrier).
 */
import type { NatsConnection, Subscription, Msg } from "nats";
import * as tf from "@tensorflow/tfjs";
import { ConfigError, MembershipChanged } from "../core/runtime/errors.js";
import type { CtrainMetrics } from "../core/runtime/metrics.js";
import {
  DEFAULT_BUCKET_BYTES,
  accumulateChunk,
  anyNonFinite,
  bytesPerElement,
  encodeChunkFrame,
  planChunks,
  roundThroughFloat16,
  scaleInto,
  sliceRanges,
  writeChunk,
  type ChunkSpec,
  type Range,
  type WireDtype,
} from "../proto/tensor_codec.js";
import type { GradientHook } from "../core/training/train_loop.js";
import { DecodeError, decode, makeHeader, type TensorChunk } from "../proto/codec.js";
import { jobNames, validateWorkerId, type JobNames } from "../proto/subjects.js";
import { NonFiniteGradientError, StepPeersLostError } from "../core/runtime/errors.js";

/** The part of the process metrics (core/runtime/metrics.ts) the averager reports to. */
export type AveragerMetrics = Pick<CtrainMetrics, "observeAllreduce" | "droppedMessage">;

/** Bytes the averager publishes before it yields to the event loop once (see `sendGradients`). */
const SEND_YIELD_BYTES = 1024 * 1024;

/** Bytes a GradientChunk/AveragedChunk adds to its data (header, ids, CRC), rounded up generously. */
const MESSAGE_OVERHEAD_BYTES = 1024;

/** Options of {@link GradientAverager}. */
export interface GradientAveragerOptions {
  /** Connection to the job's NATS. Not closed by the averager. */
  nc: NatsConnection;
  /** Job id (a NATS-safe token). */
  job: string;
  /** This worker's id; must be one of `members`. */
  self: string;
  /** Members in slice order: member i owns slice i. Same order on every member. */
  members: readonly string[];
  /** Membership epoch of `members`. */
  epoch: number;
  /** Element type on the wire. Default `fp32`. */
  wireDtype?: WireDtype;
  /** Byte budget of one chunk's data. Default {@link DEFAULT_BUCKET_BYTES} (512 KiB); must leave room under the server's max_payload. */
  bucketBytes?: number;
  /** Metrics of this process (allreduce duration and bytes, dropped messages by reason). Default: none. */
  metrics?: AveragerMetrics;
  /** How long one `average()` waits for peers before {@link StepPeersLostError}, milliseconds. Default 30000. */
  timeoutMs?: number;
  /** Upper bound of the bytes of early messages (next step, newer epoch) held until their step starts. Default 512 MiB. */
  maxBufferedBytes?: number;
}

/** Options of one {@link GradientAverager.average} call. */
export interface AverageOptions {
  /**
   * Write the result into one of two buffers the averager keeps and alternates, instead of a fresh
   * vector per step: no 4 bytes per element of fresh memory (page faults, GC) every step. The
   * returned vector is then overwritten by the next-but-one `average()`: for callers that copy it out
   * at once ({@link gradientHookFor}). Default false.
   */
  reuseResult?: boolean;
}

/** What one `average()` moved, for benchmarks and logs. */
export interface AllreduceStats {
  step: number;
  seconds: number;
  /** Encoded message bytes this member published. */
  bytesSent: number;
  /** Encoded message bytes this member received and applied for the step. */
  bytesReceived: number;
  messagesSent: number;
  messagesReceived: number;
}

interface Incoming {
  kind: "grad" | "avg";
  /** Owner named by the subject the message came on. */
  owner: string;
  msg: TensorChunk;
  bytes: number;
}

interface StepState {
  step: number;
  epoch: number;
  dtype: WireDtype;
  length: number;
  slices: Range[];
  /** Chunks of the plan by `bucket:chunk`. */
  plan: Map<string, ChunkSpec>;
  mySlice: Range;
  /** fp32 sum of n_i * g_i over my slice. */
  acc: Float32Array;
  samples: number;
  result: Float32Array;
  /** Chunks of my slice still expected per peer. */
  gradMissing: Map<string, Set<string>>;
  /** Per chunk of my slice (by key): peers whose part of it is still missing. At 0 the chunk is averaged and sent. */
  chunkWaiting: Map<string, number>;
  /** Chunks of my slice not yet averaged; my slice is done at 0. */
  ownLeft: number;
  gradSamples: Map<string, number>;
  /** Averaged chunks still expected per owner (peers only). */
  avgMissing: Map<string, Set<string>>;
  ownDone: boolean;
  /** A peer's resent result of this step (catch-up): its sender, the chunks still expected, the vector. */
  replay: { from: string; missing: Set<string>; result: Float32Array } | undefined;
  bytesReceived: number;
  messagesReceived: number;
  bytesSent: number;
  messagesSent: number;
  resolve: (v: Float32Array) => void;
  reject: (e: Error) => void;
  settled: boolean;
}

const key = (bucketId: number, chunkIndex: number): string => `${bucketId}:${chunkIndex}`;

/**
 * One worker's end of the all-reduce. One `average()` at a time; `setMembership()` between steps (or
 * during one, which ends it with MembershipChanged); `close()` when done.
 */
export class GradientAverager implements AsyncDisposable {
  readonly job: string;
  readonly self: string;
  readonly wireDtype: WireDtype;
  readonly bucketBytes: number;
  readonly timeoutMs: number;
  private readonly nc: NatsConnection;
  private readonly names: JobNames;
  private readonly metrics: AveragerMetrics | undefined;
  private readonly maxBufferedBytes: number;
  private _epoch: number;
  private _members: string[];
  private gradSub: Subscription;
  private readonly avgSubs = new Map<string, Subscription>();
  private active: StepState | undefined;
  /** Membership epoch and step of the last step that started; undefined before the first. */
  private last: { epoch: number; step: number } | undefined;
  private early: Incoming[] = [];
  private earlyBytes = 0;
  private closed = false;
  /** The last completed step and a copy of the vector it returned, for a member that must catch up. */
  private completed: { epoch: number; step: number; result: Float32Array } | undefined;
  /** The accumulator of my slice, reused across steps (a fresh array per step costs page faults and GC). */
  private accBuffer = new Float32Array(0);
  /** Result vectors for `reuseResult` calls; the one the last completed step returned is never handed out. */
  private resultPool: Float32Array[] = [];
  /** Membership epochs the completed step was already resent under (one resend reaches every member). */
  private readonly replayedUnder = new Set<number>();
  /** Completed steps resent to members that were redoing them (see "Catch-up" above). */
  replaysSent = 0;
  /** Steps this member completed with a peer's resent result instead of its own averaging. */
  replaysApplied = 0;
  /** Stats of the last completed `average()`. */
  lastStats: AllreduceStats | undefined;

  /** Creates an averager and waits until the server has its subscriptions (see the start-up note above). */
  static async open(opts: GradientAveragerOptions): Promise<GradientAverager> {
    const a = new GradientAverager(opts);
    await a.nc.flush();
    return a;
  }

  /** Prefer {@link GradientAverager.open}: without a flush a fast peer's first chunks may arrive before the subscription. */
  constructor(opts: GradientAveragerOptions) {
    this.nc = opts.nc;
    this.names = jobNames(opts.job);
    this.job = opts.job;
    this.self = validateWorkerId(opts.self);
    this.wireDtype = opts.wireDtype ?? "fp32";
    if (this.wireDtype !== "fp32" && this.wireDtype !== "fp16") throw new ConfigError(`wireDtype must be fp32 or fp16, got ${JSON.stringify(opts.wireDtype)}`);
    this.bucketBytes = opts.bucketBytes ?? DEFAULT_BUCKET_BYTES;
    const maxPayload = this.nc.info?.max_payload ?? 1024 * 1024;
    if (!Number.isSafeInteger(this.bucketBytes) || this.bucketBytes < 4 || this.bucketBytes + MESSAGE_OVERHEAD_BYTES > maxPayload)
      throw new ConfigError(`bucketBytes (--bucket-bytes) ${opts.bucketBytes} must be an integer >= 4 and leave ${MESSAGE_OVERHEAD_BYTES} bytes under the NATS server's max_payload of ${maxPayload}: lower it, or raise the server's max_payload`);
    this.timeoutMs = opts.timeoutMs ?? 30_000;
    if (!(this.timeoutMs > 0)) throw new ConfigError(`timeoutMs must be > 0, got ${opts.timeoutMs}`);
    this.maxBufferedBytes = opts.maxBufferedBytes ?? 512 * 1024 * 1024;
    this.metrics = opts.metrics;
    if (!Number.isSafeInteger(opts.epoch) || opts.epoch < 0) throw new ConfigError(`epoch must be a non-negative integer, got ${opts.epoch}`);
    this._epoch = opts.epoch;
    this._members = checkMembers(opts.members, this.self);
    this.gradSub = this.nc.subscribe(this.names.gradients(this.self), { callback: (err, msg) => !err && this.onMessage("grad", this.self, msg) });
    this.syncAvgSubs();
  }

  get epoch(): number {
    return this._epoch;
  }

  get members(): readonly string[] {
    return this._members;
  }

  /**
   * Moves to a new membership (elastic re-planning): later steps use the new members and slices, and
   * messages of older epochs are dropped as stale. An `average()` in flight ends with MembershipChanged.
   */
  async setMembership(epoch: number, members: readonly string[]): Promise<void> {
    if (!(epoch > this._epoch)) throw new RangeError(`membership epoch must grow: ${epoch} after ${this._epoch}`);
    const next = checkMembers(members, this.self);
    this._epoch = epoch;
    this._members = next;
    if (this.active) this.fail(this.active, new MembershipChanged(epoch, `step ${this.active.step}: membership changed to epoch ${epoch} (${next.join(", ")}); redo the step`));
    this.early = this.early.filter((m) => {
      if (m.msg.header.epoch >= epoch) return true;
      this.drop("stale_epoch");
      return false;
    });
    this.earlyBytes = this.early.reduce((a, m) => a + m.bytes, 0);
    this.syncAvgSubs();
    await this.nc.flush();
  }

  /** Ends a waiting `average()` with `reason` (e.g. the coordinator aborted the step). No-op when idle. */
  abort(reason: Error): void {
    if (this.active) this.fail(this.active, reason);
  }

  /**
   * Averages `flat` (this member's gradient of the mean loss over its `sampleCount` samples) with every
   * member's: returns sum_i(n_i * g_i) / sum_i(n_i) over the whole vector. A member with no samples
   * contributes nothing (its values are ignored). Every member must call it with the same `step` and the
   * same vector length. Do not modify the returned vector: the averager keeps it (without a copy) to
   * resend to a member that must catch up on this step.
   */
  async average(step: number, flat: Float32Array, sampleCount: number, opts: AverageOptions = {}): Promise<Float32Array> {
    if (this.closed) throw new Error("GradientAverager: average() after close()");
    if (this.active) throw new Error(`GradientAverager: average(${step}) while step ${this.active.step} is running`);
    if (!Number.isSafeInteger(step) || step < 0) throw new RangeError(`step must be a non-negative integer, got ${step}`);
    if (!Number.isSafeInteger(sampleCount) || sampleCount < 0 || sampleCount > 0xffffffff) throw new RangeError(`sampleCount must be an integer in [0, 2^32), got ${sampleCount}`);
    if (sampleCount > 0) checkFinite(step, flat);
    const t0 = performance.now();
    const n = this._members.length;
    const me = this._members.indexOf(this.self);
    const dtype = this.wireDtype;
    const slices = sliceRanges(flat.length, n);
    const chunks = planChunks([flat.length], { dtype, bucketBytes: this.bucketBytes, slices });
    const mySlice = slices[me]!;
    if (this.accBuffer.length !== mySlice.length) this.accBuffer = new Float32Array(mySlice.length);
    const acc = this.accBuffer;
    if (sampleCount > 0) scaleInto(acc, flat.subarray(mySlice.offset), sampleCount);
    else acc.fill(0);

    let resolve!: (v: Float32Array) => void;
    let reject!: (e: Error) => void;
    const done = new Promise<Float32Array>((res, rej) => {
      resolve = res;
      reject = rej;
    });
    // The step may fail while the gradients are still being sent (before `await done`): not unhandled.
    done.catch(() => undefined);
    const st: StepState = {
      step, epoch: this._epoch, dtype, length: flat.length, slices, plan: new Map(), mySlice, acc, samples: sampleCount,
      result: opts.reuseResult ? this.pooledResult(flat.length) : new Float32Array(flat.length), gradMissing: new Map(), chunkWaiting: new Map(), ownLeft: 0, gradSamples: new Map(), avgMissing: new Map(), ownDone: false,
      replay: undefined, bytesReceived: 0, messagesReceived: 0, bytesSent: 0, messagesSent: 0, resolve, reject, settled: false,
    };
    for (const c of chunks) {
      st.plan.set(key(c.bucketId, c.chunkIndex), c);
      if (c.slice === me) {
        st.chunkWaiting.set(key(c.bucketId, c.chunkIndex), n - 1);
        st.ownLeft++;
      }
    }
    for (const m of this._members) {
      if (m === this.self) continue;
      st.gradMissing.set(m, new Set(chunks.filter((c) => c.slice === me).map((c) => key(c.bucketId, c.chunkIndex))));
      const owner = this._members.indexOf(m);
      st.avgMissing.set(m, new Set(chunks.filter((c) => c.slice === owner).map((c) => key(c.bucketId, c.chunkIndex))));
    }
    this.active = st;
    this.last = { epoch: st.epoch, step };

    // Early arrivals of this step (and drop what is now too old), then my own slice's chunks that need
    // no peer (a single member).
    const held = this.early;
    this.early = [];
    this.earlyBytes = 0;
    for (const m of held) this.route(m);
    if (n === 1) for (const [k, c] of st.plan) this.finishChunk(st, k, c);
    if (st.ownLeft === 0) st.ownDone = true; // an empty slice (fewer elements than members) or a single member
    this.maybeComplete(st);
    const timer = setTimeout(() => {
      const grads = [...st.gradMissing].filter(([, s]) => s.size > 0).map(([m]) => m);
      const avgs = [...st.avgMissing].filter(([, s]) => s.size > 0).map(([m]) => m);
      this.fail(st, new StepPeersLostError(step, grads, avgs, this.timeoutMs));
    }, this.timeoutMs);
    try {
      await this.sendGradients(st, chunks, sampleCount > 0 ? flat : new Float32Array(flat.length), sampleCount);
      const out = await done;
      // Kept without a copy: callers must not modify the returned vector (gradientHookFor only reads it).
      this.completed = { epoch: st.epoch, step, result: out };
      this.replayedUnder.clear();
      const seconds = (performance.now() - t0) / 1000;
      this.lastStats = { step, seconds, bytesSent: st.bytesSent, bytesReceived: st.bytesReceived, messagesSent: st.messagesSent, messagesReceived: st.messagesReceived };
      this.metrics?.observeAllreduce(seconds, st.bytesSent, st.bytesReceived);
      return out;
    } finally {
      clearTimeout(timer);
      if (this.active === st) this.active = undefined;
    }
  }

  /** Unsubscribes; a waiting `average()` is rejected. The connection stays open. */
  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    if (this.active) this.fail(this.active, new Error("GradientAverager closed during a step"));
    this.gradSub.unsubscribe();
    for (const s of this.avgSubs.values()) s.unsubscribe();
    this.avgSubs.clear();
    this.early = [];
    this.earlyBytes = 0;
    this.completed = undefined;
  }

  async [Symbol.asyncDispose](): Promise<void> {
    await this.close();
  }

  // -------------------------------------------------------------------------------------------

  /**
   * A result vector of `length` elements from the pool of two, never the last completed step's (a
   * member redoing that step may still ask for it: see "Catch-up"). Every element of a result is
   * written before the step completes, so a reused vector needs no clearing.
   */
  private pooledResult(length: number): Float32Array {
    this.resultPool = this.resultPool.filter((b) => b.length === length);
    const free = this.resultPool.find((b) => b !== this.completed?.result);
    if (free) return free;
    const b = new Float32Array(length);
    this.resultPool.push(b);
    return b;
  }

  private syncAvgSubs(): void {
    const want = new Set(this._members.filter((m) => m !== this.self));
    for (const [m, s] of this.avgSubs) {
      if (!want.has(m)) {
        s.unsubscribe();
        this.avgSubs.delete(m);
      }
    }
    for (const m of want) {
      if (!this.avgSubs.has(m)) this.avgSubs.set(m, this.nc.subscribe(this.names.averaged(m), { callback: (err, msg) => !err && this.onMessage("avg", m, msg) }));
    }
  }

  /**
   * Reduce-scatter: my gradient for every slice I do not own, to its owner, starting with the next
   * member's slice (so members do not all hit owner 0 first). The loop yields to the event loop every
   * {@link SEND_YIELD_BYTES}: the client writes what is encoded so far while I encode the rest, and
   * peers' chunks that arrive meanwhile are reduced (and their averaged chunks sent) at once.
   */
  private async sendGradients(st: StepState, chunks: readonly ChunkSpec[], values: Float32Array, sampleCount: number): Promise<void> {
    const n = this._members.length;
    const me = this._members.indexOf(this.self);
    let since = 0;
    for (let d = 1; d < n; d++) {
      const owner = (me + d) % n;
      const subject = this.names.gradients(this._members[owner]!);
      for (const c of chunks) {
        if (c.slice !== owner) continue;
        if (st.settled) return;
        const bytes = this.chunkMessage(st, c, values, 0, sampleCount, false);
        this.nc.publish(subject, bytes);
        st.bytesSent += bytes.length;
        st.messagesSent++;
        since += bytes.length;
        if (since >= SEND_YIELD_BYTES) {
          since = 0;
          await new Promise<void>((r) => setImmediate(r));
        }
      }
    }
  }

  /** Frames chunk `c` (global offsets) of `values` divided by `divisor`, whose element 0 is global element `base`. */
  private chunkMessage(st: StepState, c: ChunkSpec, values: Float32Array, base: number, sampleCount: number, replay: boolean, divisor = 1): Uint8Array {
    return encodeChunkFrame({
      header: makeHeader(this.job, this.self, st.epoch, st.step),
      bucketId: c.bucketId, chunkIndex: c.chunkIndex, chunkCount: c.chunkCount, offset: c.offset, sampleCount, replay,
    }, values.subarray(c.offset - base, c.offset - base + c.length), st.dtype, divisor);
  }

  private drop(reason: string): void {
    this.metrics?.droppedMessage(reason);
  }

  private onMessage(kind: "grad" | "avg", owner: string, msg: Msg): void {
    if (this.closed) return;
    let chunk: TensorChunk;
    try {
      chunk = decode(kind === "grad" ? "GradientChunk" : "AveragedChunk", msg.data, { job: this.job, minEpoch: this._epoch, self: this.self, peer: "peer" });
    } catch (err) {
      this.drop(err instanceof DecodeError ? err.reason : "malformed");
      return;
    }
    this.route({ kind, owner, msg: chunk, bytes: msg.data.length });
  }

  /** Applies a decoded message to the running step, holds it for a later one, or drops it. */
  private route(m: Incoming): void {
    const h = m.msg.header;
    if (h.epoch < this._epoch) return this.drop("stale_epoch");
    // Someone redoes, under a newer membership, the step I completed: send them what I applied.
    const c = this.completed;
    if (m.kind === "grad" && c && h.step === c.step && h.epoch > c.epoch) return this.replay(h.epoch);
    // The step being run, else the last one started (a step ended by setMembership counts as done).
    const st = this.active && !this.active.settled ? this.active : undefined;
    const ref = st ? { epoch: st.epoch, step: st.step } : this.last;
    const running = st !== undefined && h.epoch === st.epoch && h.step === st.step;
    if (!running) {
      // Before the first step, a newer membership (any step: a redo keeps its number), or the next
      // step of a peer that is one ahead of us: hold it until that step starts. Anything else is late.
      if (ref === undefined || h.epoch > ref.epoch || h.step === ref.step + 1) {
        if (this.earlyBytes + m.bytes > this.maxBufferedBytes) return this.drop("buffer_full");
        this.early.push(m);
        this.earlyBytes += m.bytes;
        return;
      }
      // A resent result for a member that is behind me: not mine, not an error.
      if (m.msg.replay) return;
      return this.drop("wrong_step");
    }
    if (m.msg.replay) return this.applyReplay(st, m);
    if (m.msg.dtype !== st.dtype) return this.drop("bad_shape");
    const k = key(m.msg.bucketId, m.msg.chunkIndex);
    const spec = st.plan.get(k);
    if (!spec || spec.offset !== m.msg.offset || spec.length !== m.msg.length || spec.chunkCount !== m.msg.chunkCount) return this.drop("not_in_plan");
    const sender = h.sender;
    if (m.kind === "grad") {
      const missing = st.gradMissing.get(sender);
      if (!missing) return this.drop("unknown_sender");
      if (spec.slice !== this._members.indexOf(this.self)) return this.drop("not_in_plan");
      const n = st.gradSamples.get(sender);
      if (n !== undefined && n !== m.msg.sampleCount) return this.drop("bad_shape");
      if (!missing.delete(k)) return this.drop("duplicate");
      st.gradSamples.set(sender, m.msg.sampleCount);
      if (m.msg.sampleCount > 0) accumulateChunk(st.acc, spec.offset - st.mySlice.offset, m.msg.data, st.dtype, m.msg.sampleCount);
      st.bytesReceived += m.bytes;
      st.messagesReceived++;
      const waiting = st.chunkWaiting.get(k)! - 1;
      st.chunkWaiting.set(k, waiting);
      if (waiting === 0) this.finishChunk(st, k, spec);
    } else {
      if (sender !== m.owner || this._members[spec.slice] !== m.owner) return this.drop("unknown_sender");
      const missing = st.avgMissing.get(m.owner);
      if (!missing) return this.drop("unknown_sender");
      if (!missing.delete(k)) return this.drop("duplicate");
      writeChunk(st.result, spec.offset, m.msg.data, st.dtype);
      st.bytesReceived += m.bytes;
      st.messagesReceived++;
    }
    this.maybeComplete(st);
  }

  /** Resends my last completed step's result, whole, on my averaged subject (once per membership epoch). */
  private replay(epoch: number): void {
    const c = this.completed!;
    if (this.replayedUnder.has(epoch)) return;
    this.replayedUnder.add(epoch);
    this.replaysSent++;
    for (const ch of planChunks([c.result.length], { dtype: "fp32", bucketBytes: this.bucketBytes })) {
      this.nc.publish(this.names.averaged(this.self), encodeChunkFrame({
        header: makeHeader(this.job, this.self, epoch, c.step),
        bucketId: ch.bucketId, chunkIndex: ch.chunkIndex, chunkCount: ch.chunkCount, offset: ch.offset, sampleCount: 0, replay: true,
      }, c.result.subarray(ch.offset, ch.offset + ch.length), "fp32"));
    }
  }

  /** A chunk of a member's resent result of the running step: the step ends with that result once it is whole. */
  private applyReplay(st: StepState, m: Incoming): void {
    const sender = m.msg.header.sender;
    if (sender !== m.owner || !this._members.includes(sender) || sender === this.self) return this.drop("unknown_sender");
    if (m.msg.dtype !== "fp32") return this.drop("bad_shape");
    const plan = new Map(planChunks([st.length], { dtype: "fp32", bucketBytes: this.bucketBytes }).map((c) => [key(c.bucketId, c.chunkIndex), c]));
    const k = key(m.msg.bucketId, m.msg.chunkIndex);
    const spec = plan.get(k);
    if (!spec || spec.offset !== m.msg.offset || spec.length !== m.msg.length || spec.chunkCount !== m.msg.chunkCount) return this.drop("not_in_plan");
    st.replay ??= { from: sender, missing: new Set(plan.keys()), result: new Float32Array(st.length) };
    // Replays of one step are identical (every sender applied the same vector): the first sender's suffice.
    if (st.replay.from !== sender || !st.replay.missing.delete(k)) return this.drop("duplicate");
    writeChunk(st.replay.result, spec.offset, m.msg.data, "fp32");
    st.bytesReceived += m.bytes;
    st.messagesReceived++;
    if (st.replay.missing.size > 0 || st.settled) return;
    st.settled = true;
    this.replaysApplied++;
    st.resolve(st.replay.result);
  }

  /**
   * Chunk `k` of my slice has every member's part: divide it by the step's sample total, publish it
   * once on my averaged subject, and keep it (through the wire dtype, so every member holds identical
   * values). Chunk by chunk, so the fan-out of early chunks overlaps the arrival of later ones.
   */
  private finishChunk(st: StepState, k: string, c: ChunkSpec): void {
    if (st.settled || !st.chunkWaiting.has(k)) return;
    st.chunkWaiting.delete(k);
    // Every peer sent this chunk, and each of its chunks carries its sample count: the total is known.
    let total = st.samples;
    for (const n of st.gradSamples.values()) total += n;
    const from = c.offset - st.mySlice.offset;
    const part = st.acc.subarray(from, from + c.length);
    // No samples at all: nothing was added, and the mean is 0 (not 0/0).
    if (total === 0) part.fill(0);
    if (this._members.length > 1) {
      // The division happens on the way into the frame: one pass over the chunk, not two.
      const bytes = this.chunkMessage(st, c, st.acc, st.mySlice.offset, total, false, total > 0 ? total : 1);
      this.nc.publish(this.names.averaged(this.self), bytes);
      st.bytesSent += bytes.length;
      st.messagesSent++;
      // Keep what the peers decode: the frame's data region (the fp16 rounding is done once, there).
      writeChunk(st.result, c.offset, bytes.subarray(bytes.length - c.length * bytesPerElement(st.dtype)), st.dtype);
    } else {
      if (total > 0) for (let i = 0; i < part.length; i++) part[i] = part[i]! / total;
      if (st.dtype === "fp16") roundThroughFloat16(part);
      st.result.set(part, c.offset);
    }
    if (--st.ownLeft === 0) {
      st.ownDone = true;
      this.maybeComplete(st);
    }
  }

  private maybeComplete(st: StepState): void {
    if (st.settled || !st.ownDone) return;
    for (const s of st.avgMissing.values()) if (s.size > 0) return;
    st.settled = true;
    st.resolve(st.result);
  }

  private fail(st: StepState, err: Error): void {
    if (st.settled) return;
    st.settled = true;
    st.reject(err);
  }
}

/** Throws NonFiniteGradientError naming the first NaN/Inf; one branch-free pass when there is none. */
function checkFinite(step: number, flat: Float32Array): void {
  if (!anyNonFinite(flat)) return;
  for (let i = 0; i < flat.length; i++) if (!Number.isFinite(flat[i]!)) throw new NonFiniteGradientError(step, i, flat[i]!);
}

function checkMembers(members: readonly string[], self: string): string[] {
  if (!Array.isArray(members) || members.length === 0) throw new ConfigError("members must list at least one worker id");
  const seen = new Set<string>();
  for (const m of members) {
    validateWorkerId(m);
    if (seen.has(m)) throw new ConfigError(`member ${JSON.stringify(m)} listed twice`);
    seen.add(m);
  }
  if (!seen.has(self)) throw new ConfigError(`self ${JSON.stringify(self)} is not one of the members ${members.join(", ")}`);
  return [...members];
}

// ---------------------------------------------------------------------------------------------
// train_loop adapter

/** Options of {@link gradientHookFor}. */
export interface GradientHookOptions {
  /** Step number of the first call; each successful call takes the next (a failed one is redone under the same number). Default 0. */
  firstStep?: number;
  /** Called after each averaging with its stats. */
  onAverage?: (stats: AllreduceStats) => void;
}

/**
 * Adapts an averager to train_loop's GradientHook: the gradients (of the mean loss over this worker's
 * slice of the global batch) are fused in the model's trainable-weight order, which is the same on
 * every replica of one architecture even when layer names differ between processes, averaged with
 * the slice's sample count as weight, and cut back into tensors. With every worker on its slice of the
 * same global batch, the result is the global batch's mean gradient.
 */
export function gradientHookFor(averager: GradientAverager, model: tf.LayersModel, opts: GradientHookOptions = {}): GradientHook {
  let step = opts.firstStep ?? 0;
  return async (grads, batchSamples) => {
    const names = model.trainableWeights.map((w) => (w.read() as tf.Variable).name);
    const missing = names.filter((n) => !(n in grads));
    if (missing.length > 0) throw new Error(`gradient hook: no gradient for trainable weight(s) ${missing.join(", ")}`);
    const shapes = names.map((n) => grads[n]!.shape);
    const sizes = names.map((n) => grads[n]!.size);
    const flat = new Float32Array(sizes.reduce((a, b) => a + b, 0));
    let at = 0;
    for (let i = 0; i < names.length; i++) {
      flat.set(grads[names[i]!]!.dataSync() as Float32Array, at);
      at += sizes[i]!;
    }
    // The result is copied into tensors below, so the averager may reuse its buffer two steps on.
    const avg = await averager.average(step, flat, batchSamples, { reuseResult: true });
    step++;
    if (averager.lastStats) opts.onAverage?.(averager.lastStats);
    const out: tf.NamedTensorMap = {};
    at = 0;
    for (let i = 0; i < names.length; i++) {
      // A copy (slice): a backend may keep the array it is given (cpu does), and `avg` is reused.
      out[names[i]!] = tf.tensor(avg.slice(at, at + sizes[i]!), shapes[i]!, "float32");
      at += sizes[i]!;
    }
    return out;
  };
}

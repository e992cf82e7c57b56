/**
 * The coordinator's view of the workers of a job: who is alive, who was lost. Workers write their
 * latest Heartbeat into the job's registry KV (entries expire after WORKER_REGISTRY_TTL_MS); this
 * polls the bucket (a poll survives a NATS restart where a watch would need re-arming) and reports
 * joins and losses to the log and `ctrain_workers{state}`.
 */
import type { KV } from "nats";
import { decode, DecodeError, type Heartbeat } from "../proto/codec.js";
import { WORKER_REGISTRY_TTL_MS } from "../proto/subjects.js";
import type { Logger } from "../core/runtime/log.js";
import type { CtrainMetrics } from "../core/runtime/metrics.js";

export interface WorkerView {
  worker: string;
  state: "alive" | "lost" | "left";
  lastSeenMs: number;
  heartbeat: Heartbeat;
}

export class WorkerRegistryMonitor {
  private readonly workers = new Map<string, WorkerView>();
  private timer?: NodeJS.Timeout;
  private polling = false;

  constructor(
    private readonly kv: KV,
    private readonly job: string,
    private readonly log: Logger,
    private readonly metrics?: CtrainMetrics,
    /** Poll period, ms. Default 2000. */
    private readonly periodMs = 2000,
  ) {}

  start(): void {
    if (this.timer) return;
    void this.poll();
    this.timer = setInterval(() => void this.poll(), this.periodMs);
    this.timer.unref();
  }

  stop(): void {
    if (this.timer) clearInterval(this.timer);
    this.timer = undefined;
  }

  /** Workers seen so far, by state. */
  counts(): { alive: number; lost: number; left: number } {
    const c = { alive: 0, lost: 0, left: 0 };
    for (const w of this.workers.values()) c[w.state]++;
    return c;
  }

  list(): WorkerView[] {
    return [...this.workers.values()];
  }

  async poll(): Promise<void> {
    if (this.polling) return;
    this.polling = true;
    try {
      const now = Date.now();
      const keys = await this.kv.keys();
      const seen = new Set<string>();
      for await (const key of keys) seen.add(key);
      for (const key of seen) {
        const e = await this.kv.get(key);
        if (!e || e.operation !== "PUT") continue;
        let hb: Heartbeat;
        try {
          hb = decode("Heartbeat", e.value, { job: this.job });
        } catch (err) {
          if (!(err instanceof DecodeError)) throw err;
          this.metrics?.droppedMessage(err.reason);
          continue;
        }
        const prev = this.workers.get(hb.worker);
        const lastSeenMs = e.created.getTime();
        if (!prev) this.log.info("worker joined", { worker: hb.worker, host: hb.host, pid: hb.pid, backend: hb.backend });
        else if (prev.state === "lost" && lastSeenMs > prev.lastSeenMs) this.log.info("worker back", { worker: hb.worker });
        if (!prev || lastSeenMs > prev.lastSeenMs) {
          const state = hb.state === "stopped" ? "left" : now - lastSeenMs < WORKER_REGISTRY_TTL_MS ? "alive" : "lost";
          if (state === "left" && prev?.state !== "left") this.log.info("worker left", { worker: hb.worker, shards_done: hb.shardsDone });
          this.workers.set(hb.worker, { worker: hb.worker, state, lastSeenMs, heartbeat: hb });
        }
      }
      for (const w of this.workers.values()) {
        if (w.state === "alive" && now - w.lastSeenMs >= WORKER_REGISTRY_TTL_MS) {
          w.state = "lost";
          this.log.warn("worker lost: no heartbeat", { worker: w.worker, last_seen_seconds_ago: Math.round((now - w.lastSeenMs) / 1000), shard: w.heartbeat.shardId || undefined });
        }
      }
      const c = this.counts();
      this.metrics?.setWorkers(c);
    } catch (err) {
      this.log.debug("worker registry poll failed (retrying)", { error: err as Error });
    } finally {
      this.polling = false;
    }
  }
}

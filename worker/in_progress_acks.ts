/**
 * In-progress acks of a task being worked on, so JetStream does not redeliver it meanwhile. Sent at
 * most every third of the ack wait, from the work itself (`working()` between steps) and from a
 * timer: loading the model or opening the data set for the first shard can take longer than the ack
 * wait, with no step in between.
 */
import type { JsMsg } from "nats";

export class InProgressAcks {
  private last = Date.now();
  private readonly timer: NodeJS.Timeout;

  /** `ackWaitMs`: the consumer's ack wait, ms. */
  constructor(
    private readonly msg: Pick<JsMsg, "working">,
    private readonly ackWaitMs: number,
  ) {
    this.timer = setInterval(() => this.working(), Math.max(100, Math.floor(ackWaitMs / 6)));
  }

  /** Sends an in-progress ack when the last one is a third of the ack wait old. */
  working(): void {
    if (Date.now() - this.last < this.ackWaitMs / 3) return;
    this.msg.working();
    this.last = Date.now();
  }

  stop(): void {
    clearInterval(this.timer);
  }
}

/**
 * Starting and stopping the workers of a coordinator job. `--launcher local` (default): workers are
 * started by someone else (`ctrain run`, a Deployment, a person). `--launcher kubernetes`: the
 * coordinator creates or scales the job's worker StatefulSet through the Kubernetes API, reports
 * pods that cannot be scheduled (no GPU free) or crash-loop, and scales the workers to zero when the
 * job ends, whether it succeeded or not.
 */
import type { JobOptions } from "../core/runtime/config.js";
import type { Logger } from "../core/runtime/log.js";
import { KubernetesLauncher, kubernetesLauncherOptionsFromEnv, type LauncherEvent } from "./kubernetes_launcher.js";

export interface WorkerLaunch {
  /** Scales workers down and stops watching. Safe to call twice. */
  stop(): Promise<void>;
}

function logEvent(log: Logger, ev: LauncherEvent): void {
  switch (ev.type) {
    case "pod-running":
      log.info("worker pod running", { pod: ev.pod, node: ev.node, ready: ev.ready });
      break;
    case "pod-pending-unschedulable":
      log.warn("worker pod cannot be scheduled", { pod: ev.pod, reason: ev.reason, causes: ev.causes, message: ev.message });
      break;
    case "pod-crash-loop":
      log.error("worker pod is crash-looping", { pod: ev.pod, container: ev.container, reason: ev.reason, restarts: ev.restarts, last_termination: ev.lastTerminationReason, message: ev.lastTerminationMessage, exit_code: ev.exitCode });
      break;
    case "pod-start-error":
      log.error("worker pod cannot start", { pod: ev.pod, container: ev.container, reason: ev.reason, message: ev.message });
      break;
    case "pod-failed":
      log.error("worker pod failed", { pod: ev.pod, reason: ev.reason, message: ev.message });
      break;
    case "pod-deleted":
      log.info("worker pod gone", { pod: ev.pod });
      break;
  }
}

/** Starts the workers the job's launcher is responsible for. */
export async function launchWorkers(opts: JobOptions, log: Logger, env: NodeJS.ProcessEnv = process.env): Promise<WorkerLaunch> {
  if (opts.launcher === "local") return { stop: async () => undefined };
  const launcher = new KubernetesLauncher(kubernetesLauncherOptionsFromEnv(opts, env));
  const how = await launcher.start(opts.workers);
  log.info("worker StatefulSet " + how, { workers: opts.workers });
  const events = launcher.watch();
  const watching = (async () => {
    for await (const ev of events) logEvent(log, ev);
  })().catch((err: unknown) => log.warn("watching worker pods stopped", { error: err as Error }));
  let stopped = false;
  return {
    async stop(): Promise<void> {
      if (stopped) return;
      stopped = true;
      try {
        await launcher.scaleToZero();
        log.info("workers scaled to zero");
      } finally {
        await events.return?.();
        await launcher.close();
        await watching;
      }
    },
  };
}

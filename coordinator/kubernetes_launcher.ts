/**
 * Starts workers on Kubernetes: the coordinator (`--launcher kubernetes`) scales the job's worker
 * StatefulSet up at the start and to zero at the end, and watches the job's pods so that a worker that
 * cannot be scheduled (no free GPU), crash-loops or fails is reported with the cluster's own reason
 * instead of being waited for in silence.
 *
 * API calls (and nothing else; the Role in k8s_manifests.ts grants exactly these):
 *   GET    apps/v1 statefulsets/<name>          read, to decide between create and scale
 *   POST   apps/v1 statefulsets                 create when missing (built by k8s_manifests.ts)
 *   PATCH  apps/v1 statefulsets/<name>/scale    merge patch {spec: {replicas}}
 *   GET    v1 pods?watch=true&labelSelector=... the job's worker pods
 */
import {
  AppsV1Api, KubeConfig, PatchStrategy, Watch, setHeaderOptions,
  type V1ContainerStatus, type V1Pod,
} from "@kubernetes/client-node";
import { readFileSync } from "node:fs";
import { ConfigError } from "../core/runtime/errors.js";
import type { JobOptions } from "../core/runtime/config.js";
import { workerSelector, workerStatefulSet, workerStatefulSetName, type RenderOptions } from "./k8s_manifests.js";

/** What the launcher reports about the job's worker pods. One event per change of a pod's state. */
export type LauncherEvent =
  /** A worker pod runs (`ready`: its /readyz answers). */
  | { type: "pod-running"; pod: string; node?: string; ready: boolean }
  /**
   * The scheduler cannot place the pod. `reason` is the cause from the PodScheduled condition's
   * message (e.g. `Insufficient nvidia.com/gpu`), `message` the whole message.
   */
  | { type: "pod-pending-unschedulable"; pod: string; reason: string; causes: string[]; message: string }
  /** A container restarts over and over. `reason` is the waiting reason (`CrashLoopBackOff`); `lastTermination*` say why it last died. */
  | {
      type: "pod-crash-loop"; pod: string; container: string; reason: string; restarts: number;
      lastTerminationReason?: string; lastTerminationMessage?: string; exitCode?: number;
    }
  /** A container cannot start at all (image pull error, bad config): `reason` is the waiting reason. */
  | { type: "pod-start-error"; pod: string; container: string; reason: string; message: string }
  /** The pod ended in phase Failed (evicted, or its container exited non-zero with restartPolicy Never). */
  | { type: "pod-failed"; pod: string; reason: string; message: string }
  /** The pod is gone (scaled down, deleted, evicted and removed). */
  | { type: "pod-deleted"; pod: string };

export type LauncherEventType = LauncherEvent["type"];

/** Options of {@link KubernetesLauncher}. */
export interface KubernetesLauncherOptions {
  /** The job: its id names the StatefulSet and labels the pods; its options become the workers' args when the launcher creates the StatefulSet. */
  job: JobOptions;
  /** Namespace of the worker StatefulSet. Default: the pod's own namespace in-cluster, else the kubeconfig context's, else `default`. */
  namespace?: string;
  /** Image, GPUs per worker and data claim, used only when the StatefulSet does not exist yet. */
  render?: Omit<RenderOptions, "namespace">;
  /** A ready KubeConfig (tests). Default: in-cluster when KUBERNETES_SERVICE_HOST is set, else `kubeconfig` or the default kubeconfig. */
  kubeConfig?: KubeConfig;
  /** Path of a kubeconfig file, used outside a cluster. Default: $KUBECONFIG or ~/.kube/config. */
  kubeconfig?: string;
  /** Delay before re-opening a watch that ended, in ms; doubles up to 30 s. Default 1000. */
  rewatchDelayMs?: number;
}

/** Launcher options from the environment the coordinator Job sets (POD_NAMESPACE, CTRAIN_IMAGE, CTRAIN_GPUS_PER_WORKER, CTRAIN_DATA_CLAIM). */
export function kubernetesLauncherOptionsFromEnv(job: JobOptions, env: NodeJS.ProcessEnv = process.env): KubernetesLauncherOptions {
  const gpus = Number(env.CTRAIN_GPUS_PER_WORKER ?? "0");
  if (!Number.isInteger(gpus) || gpus < 0) throw new ConfigError(`CTRAIN_GPUS_PER_WORKER must be a whole number, got ${JSON.stringify(env.CTRAIN_GPUS_PER_WORKER)}.`);
  return {
    job,
    namespace: env.POD_NAMESPACE || undefined,
    render: env.CTRAIN_IMAGE ? { image: env.CTRAIN_IMAGE, gpusPerWorker: gpus, dataClaim: env.CTRAIN_DATA_CLAIM || undefined } : undefined,
    kubeconfig: env.KUBECONFIG || undefined,
  };
}

const SA_NAMESPACE_FILE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace";

function loadKubeConfig(o: KubernetesLauncherOptions): KubeConfig {
  if (o.kubeConfig) return o.kubeConfig;
  const kc = new KubeConfig();
  try {
    if (process.env.KUBERNETES_SERVICE_HOST) kc.loadFromCluster();
    else if (o.kubeconfig) kc.loadFromFile(o.kubeconfig);
    else kc.loadFromDefault();
  } catch (cause) {
    throw new ConfigError(`Cannot load a Kubernetes config (${(cause as Error).message}); run in a cluster or pass a kubeconfig.`, { cause });
  }
  if (!kc.getCurrentCluster()) throw new ConfigError("No Kubernetes cluster configured: run in a cluster, set KUBECONFIG, or pass a kubeconfig path.");
  return kc;
}

function defaultNamespace(kc: KubeConfig): string {
  if (process.env.KUBERNETES_SERVICE_HOST) {
    try {
      return readFileSync(SA_NAMESPACE_FILE, "utf8").trim();
    } catch {
      /* fall through */
    }
  }
  return kc.getContextObject(kc.getCurrentContext())?.namespace ?? "default";
}

function statusCode(err: unknown): number | undefined {
  const e = err as { code?: unknown; statusCode?: unknown };
  if (typeof e?.code === "number") return e.code;
  if (typeof e?.statusCode === "number") return e.statusCode;
  return undefined;
}

/** Errors from the API server, with what to do about them. */
export class KubernetesApiError extends Error {
  override name = "KubernetesApiError";
  readonly status?: number;
  constructor(action: string, err: unknown) {
    const status = statusCode(err);
    const hint = status === 403 ? " The coordinator's ServiceAccount lacks a right: apply the Role from deploy/k8s (ctrain-launcher)." : "";
    super(`Kubernetes API: ${action} failed${status ? ` (HTTP ${status})` : ""}: ${(err as Error)?.message ?? String(err)}.${hint}`, { cause: err });
    this.status = status;
  }
}

/** `0/3 nodes are available: 3 Insufficient nvidia.com/gpu, 1 node(s) had taint {...}. preemption: ...` -> the causes without counts. */
export function unschedulableCauses(message: string): string[] {
  const m = /nodes are available:\s*(.*?)(?:\.\s|\.$|$)/s.exec(message);
  if (!m) return [];
  return m[1]
    .split(/,\s*/)
    .map((c) => c.trim().replace(/^\d+\s+/, ""))
    .filter((c) => c.length > 0);
}

const START_ERRORS = new Set(["ErrImagePull", "ImagePullBackOff", "InvalidImageName", "CreateContainerConfigError", "CreateContainerError", "RunContainerError"]);

/** The event a pod's current status calls for, or undefined when there is nothing to report (e.g. Pending but not yet judged). */
export function podEvent(pod: V1Pod): LauncherEvent | undefined {
  const name = pod.metadata?.name ?? "?";
  const status = pod.status ?? {};
  const statuses: V1ContainerStatus[] = [...(status.initContainerStatuses ?? []), ...(status.containerStatuses ?? [])];
  for (const c of statuses) {
    const waiting = c.state?.waiting;
    if (waiting?.reason === "CrashLoopBackOff") {
      const last = c.lastState?.terminated;
      return {
        type: "pod-crash-loop", pod: name, container: c.name, reason: waiting.reason, restarts: c.restartCount ?? 0,
        lastTerminationReason: last?.reason, lastTerminationMessage: last?.message?.trim() || undefined, exitCode: last?.exitCode,
      };
    }
    if (waiting?.reason && START_ERRORS.has(waiting.reason))
      return { type: "pod-start-error", pod: name, container: c.name, reason: waiting.reason, message: waiting.message ?? "" };
  }
  if (status.phase === "Failed") {
    const term = statuses.map((c) => c.state?.terminated).find((t) => t && t.exitCode !== 0);
    return {
      type: "pod-failed", pod: name,
      reason: status.reason ?? term?.reason ?? "Failed",
      message: status.message ?? term?.message ?? (term ? `exit code ${term.exitCode}` : ""),
    };
  }
  if (status.phase === "Pending") {
    const sched = status.conditions?.find((c) => c.type === "PodScheduled");
    if (sched?.status === "False" && sched.reason === "Unschedulable") {
      const message = sched.message ?? "";
      const causes = unschedulableCauses(message);
      return { type: "pod-pending-unschedulable", pod: name, reason: causes.join("; ") || sched.reason, causes, message };
    }
    return undefined;
  }
  if (status.phase === "Running") {
    const ready = status.conditions?.some((c) => c.type === "Ready" && c.status === "True") ?? false;
    return { type: "pod-running", pod: name, node: pod.spec?.nodeName, ready };
  }
  return undefined;
}

/** A single-consumer queue that is an async iterator. */
class EventQueue<T> implements AsyncIterableIterator<T> {
  private items: T[] = [];
  private waiters: ((r: IteratorResult<T>) => void)[] = [];
  private ended = false;
  constructor(private readonly onReturn: () => void) {}
  push(item: T): void {
    if (this.ended) return;
    const w = this.waiters.shift();
    if (w) w({ value: item, done: false });
    else this.items.push(item);
  }
  end(): void {
    this.ended = true;
    for (const w of this.waiters.splice(0)) w({ value: undefined, done: true });
  }
  next(): Promise<IteratorResult<T>> {
    const item = this.items.shift();
    if (item !== undefined) return Promise.resolve({ value: item, done: false });
    if (this.ended) return Promise.resolve({ value: undefined, done: true });
    return new Promise((resolve) => this.waiters.push(resolve));
  }
  return(): Promise<IteratorResult<T>> {
    this.end();
    this.onReturn();
    return Promise.resolve({ value: undefined, done: true });
  }
  [Symbol.asyncIterator](): AsyncIterableIterator<T> {
    return this;
  }
}

/**
 * Creates or scales a job's worker StatefulSet and reports on its pods.
 *
 * ```ts
 * await using launcher = new KubernetesLauncher(kubernetesLauncherOptionsFromEnv(opts));
 * await launcher.start(opts.workers);
 * for await (const ev of launcher.watch()) if (ev.type === "pod-pending-unschedulable") log.warn(ev.reason);
 * await launcher.scaleToZero();
 * ```
 */
export class KubernetesLauncher implements AsyncDisposable {
  readonly namespace: string;
  readonly statefulSet: string;
  private readonly kc: KubeConfig;
  private readonly apps: AppsV1Api;
  private readonly opts: KubernetesLauncherOptions;
  private readonly watches = new Set<{ stop(): void }>();
  private closed = false;

  constructor(opts: KubernetesLauncherOptions) {
    this.opts = opts;
    this.kc = loadKubeConfig(opts);
    this.namespace = opts.namespace ?? defaultNamespace(this.kc);
    this.statefulSet = workerStatefulSetName(opts.job.job);
    this.apps = this.kc.makeApiClient(AppsV1Api);
  }

  /** Makes `count` workers run: creates the StatefulSet with that many replicas when missing, else patches its scale. Returns what was done. */
  async start(count: number): Promise<"created" | "scaled"> {
    if (!Number.isInteger(count) || count < 0) throw new ConfigError(`Worker count must be a whole number >= 0, got ${count}.`);
    this.checkOpen();
    const existing = await this.readStatefulSet();
    if (!existing) {
      if (!this.opts.render?.image)
        throw new ConfigError(`StatefulSet ${this.namespace}/${this.statefulSet} does not exist and no image is known to create it: apply the manifests from 'ctrain k8s render' or set CTRAIN_IMAGE.`);
      const body = workerStatefulSet(this.opts.job, { ...this.opts.render, namespace: this.namespace }, count);
      try {
        await this.apps.createNamespacedStatefulSet({ namespace: this.namespace, body });
        return "created";
      } catch (err) {
        // Created by someone else between our read and create: scale it like any existing one.
        if (statusCode(err) !== 409) throw new KubernetesApiError(`create StatefulSet ${this.namespace}/${this.statefulSet}`, err);
      }
    }
    await this.scale(count);
    return "scaled";
  }

  /** Scales the workers to zero (job end). A missing StatefulSet is already at zero. */
  async scaleToZero(): Promise<void> {
    try {
      await this.scale(0);
    } catch (err) {
      if (err instanceof KubernetesApiError && err.status === 404) return;
      throw err;
    }
  }

  /**
   * Events about the job's worker pods until {@link close} (or the iterator's `return`). Each call
   * opens its own watch; a watch that ends (the API server closes them every few minutes) is re-opened,
   * and only changes are reported, so a re-list does not repeat events.
   */
  watch(): AsyncIterableIterator<LauncherEvent> {
    this.checkOpen();
    const last = new Map<string, string>();
    let controller: AbortController | undefined;
    let timer: NodeJS.Timeout | undefined;
    let stopped = false;
    let delay = this.opts.rewatchDelayMs ?? 1000;
    const handle = { stop: () => {} };
    const queue = new EventQueue<LauncherEvent>(() => handle.stop());
    handle.stop = () => {
      if (stopped) return;
      stopped = true;
      if (timer) clearTimeout(timer);
      controller?.abort();
      this.watches.delete(handle);
      queue.end();
    };
    this.watches.add(handle);
    const path = `/api/v1/namespaces/${encodeURIComponent(this.namespace)}/pods`;
    const open = (): void => {
      if (stopped) return;
      new Watch(this.kc)
        .watch(
          path,
          { labelSelector: workerSelector(this.opts.job.job), allowWatchBookmarks: false },
          (phase: string, pod: V1Pod) => {
            delay = this.opts.rewatchDelayMs ?? 1000;
            const name = pod?.metadata?.name;
            if (!name) return;
            if (phase === "DELETED") {
              last.delete(name);
              queue.push({ type: "pod-deleted", pod: name });
              return;
            }
            if (phase !== "ADDED" && phase !== "MODIFIED") return;
            const ev = podEvent(pod);
            if (!ev) return;
            const key = JSON.stringify(ev);
            if (last.get(name) === key) return;
            last.set(name, key);
            queue.push(ev);
          },
          () => {
            if (stopped) return;
            timer = setTimeout(open, delay);
            timer.unref?.();
            delay = Math.min(delay * 2, 30_000);
          },
        )
        .then((c) => {
          controller = c;
          if (stopped) c.abort();
        }, () => {
          /* errors arrive through the done callback */
        });
    };
    open();
    return queue;
  }

  /** Stops every watch. Does not scale anything: call {@link scaleToZero} first at job end. */
  async close(): Promise<void> {
    this.closed = true;
    for (const w of [...this.watches]) w.stop();
  }

  async [Symbol.asyncDispose](): Promise<void> {
    await this.close();
  }

  private checkOpen(): void {
    if (this.closed) throw new Error("KubernetesLauncher is closed.");
  }

  private async readStatefulSet(): Promise<boolean> {
    try {
      await this.apps.readNamespacedStatefulSet({ name: this.statefulSet, namespace: this.namespace });
      return true;
    } catch (err) {
      if (statusCode(err) === 404) return false;
      throw new KubernetesApiError(`read StatefulSet ${this.namespace}/${this.statefulSet}`, err);
    }
  }

  private async scale(replicas: number): Promise<void> {
    try {
      await this.apps.patchNamespacedStatefulSetScale(
        { name: this.statefulSet, namespace: this.namespace, body: { spec: { replicas } } },
        setHeaderOptions("Content-Type", PatchStrategy.MergePatch),
      );
    } catch (err) {
      throw new KubernetesApiError(`scale StatefulSet ${this.namespace}/${this.statefulSet} to ${replicas}`, err);
    }
  }
}

/**
 * The Kubernetes launcher against a fake API server on 127.0.0.1 that speaks the paths and verbs the
 * launcher uses, records every request and answers with real-shaped objects (checked against the
 * Kubernetes schemas with kubernetes-models). The watch is a chunked stream of newline-delimited JSON
 * events, like the API server's. The requests seen are mapped onto RBAC (group, resource, verb) and
 * must equal the Role the manifests ship: the launcher needs no more, and the Role grants no more.
 */
import { test, after } from "node:test";
import assert from "node:assert/strict";
import { createServer, type IncomingMessage, type ServerResponse, type Server } from "node:http";
import type { AddressInfo } from "node:net";
import { KubeConfig } from "@kubernetes/client-node";
import { Pod } from "kubernetes-models/v1/Pod";
import { Scale } from "kubernetes-models/autoscaling/v1/Scale";
import { StatefulSet } from "kubernetes-models/apps/v1/StatefulSet";
import { resolveOptions } from "../core/runtime/config.js";
import { LAUNCHER_RBAC_RULES, workerStatefulSet } from "../coordinator/k8s_manifests.js";
import {
  KubernetesApiError, KubernetesLauncher, kubernetesLauncherOptionsFromEnv, podEvent, unschedulableCauses,
  type LauncherEvent,
} from "../coordinator/kubernetes_launcher.js";

const NS = "ml";
const JOB = resolveOptions({ job: "demo", workers: 3, nats: "nats://nats:4222", data: "/data/images" });
const STS = "demo-worker";
const STS_PATH = `/apis/apps/v1/namespaces/${NS}/statefulsets`;
const UNSCHEDULABLE = "0/3 nodes are available: 3 Insufficient nvidia.com/gpu. preemption: 0/3 nodes are available: 3 No preemption victims found for incoming pod.";

interface Recorded { method: string; path: string; query: URLSearchParams; contentType?: string; body?: any }

/** Every (group/resource, verb) any test made, for the RBAC check at the end. */
const usedRights = new Set<string>();

function rightOf(r: Recorded): string {
  const watch = r.query.get("watch") === "true";
  if (r.path.startsWith(`/api/v1/namespaces/${NS}/pods`)) return `/pods:${watch ? "watch" : r.method === "GET" ? (r.path.endsWith("/pods") ? "list" : "get") : r.method}`;
  if (r.path === STS_PATH && r.method === "POST") return "apps/statefulsets:create";
  if (r.path === `${STS_PATH}/${STS}/scale`) return `apps/statefulsets/scale:${{ GET: "get", PATCH: "patch", PUT: "update" }[r.method]}`;
  if (r.path === `${STS_PATH}/${STS}`) return `apps/statefulsets:${{ GET: "get", PATCH: "patch", PUT: "update", DELETE: "delete" }[r.method]}`;
  return `?${r.method} ${r.path}`;
}

function status(code: number, reason: string, message: string) {
  return { kind: "Status", apiVersion: "v1", metadata: {}, status: "Failure", message, reason, code };
}

function scaleOf(replicas: number) {
  const s = {
    apiVersion: "autoscaling/v1", kind: "Scale",
    metadata: { name: STS, namespace: NS, resourceVersion: "12" },
    spec: { replicas }, status: { replicas, selector: "ctrain.dev/job=demo,app.kubernetes.io/component=worker" },
  };
  new Scale(s as any).validate();
  return s;
}

function pod(name: string, status: any) {
  const p = {
    apiVersion: "v1", kind: "Pod",
    metadata: { name, namespace: NS, labels: { "ctrain.dev/job": "demo", "app.kubernetes.io/component": "worker" }, resourceVersion: "100" },
    spec: { containers: [{ name: "worker", image: "ctrain:0.1.0-gpu" }], nodeName: status.phase === "Running" ? "gpu-node-1" : undefined },
    status,
  };
  new Pod(p as any).validate();
  return p;
}

const PENDING_POD = pod("demo-worker-2", {
  phase: "Pending",
  conditions: [{ type: "PodScheduled", status: "False", reason: "Unschedulable", message: UNSCHEDULABLE, lastTransitionTime: "2024-05-01T10:00:00Z" }],
  qosClass: "Burstable",
});
const CRASH_POD = pod("demo-worker-1", {
  phase: "Running",
  conditions: [{ type: "PodScheduled", status: "True" }, { type: "Ready", status: "False", reason: "ContainersNotReady" }],
  containerStatuses: [{
    name: "worker", image: "ctrain:0.1.0-gpu", imageID: "", ready: false, restartCount: 4, started: false,
    state: { waiting: { reason: "CrashLoopBackOff", message: "back-off 1m20s restarting failed container=worker pod=demo-worker-1" } },
    lastState: { terminated: { exitCode: 1, reason: "Error", message: "BackendUnavailableError: tensorflow-gpu: libcudnn.so.8: cannot open shared object file", startedAt: "2024-05-01T10:01:00Z", finishedAt: "2024-05-01T10:01:05Z" } },
  }],
});
const RUNNING_POD = pod("demo-worker-0", {
  phase: "Running",
  conditions: [{ type: "PodScheduled", status: "True" }, { type: "Ready", status: "True" }],
  containerStatuses: [{ name: "worker", image: "ctrain:0.1.0-gpu", imageID: "", ready: true, restartCount: 0, state: { running: { startedAt: "2024-05-01T10:00:30Z" } } }],
});
const FAILED_POD = pod("demo-worker-3", { phase: "Failed", reason: "Evicted", message: "The node was low on resource: ephemeral-storage." });

/** A fake API server; `statefulSetExists` decides GET's answer; `forbid` answers 403 to everything. */
async function fakeApi(opts: { statefulSetExists: boolean; forbid?: boolean; watchEvents?: object[] }) {
  const requests: Recorded[] = [];
  const streams = new Set<ServerResponse>();
  let watchOpened: () => void = () => {};
  const watchOpen = new Promise<void>((r) => { watchOpened = r; });
  const server: Server = createServer((req: IncomingMessage, res: ServerResponse) => {
    const chunks: Buffer[] = [];
    req.on("data", (c: Buffer) => chunks.push(c));
    req.on("end", () => {
      const url = new URL(req.url!, "http://x");
      const text = Buffer.concat(chunks).toString("utf8");
      const rec: Recorded = { method: req.method!, path: url.pathname, query: url.searchParams, contentType: req.headers["content-type"], body: text ? JSON.parse(text) : undefined };
      requests.push(rec);
      usedRights.add(rightOf(rec));
      const send = (code: number, body: object): void => {
        res.writeHead(code, { "content-type": "application/json" });
        res.end(JSON.stringify(body));
      };
      if (opts.forbid) return send(403, status(403, "Forbidden", `statefulsets.apps "${STS}" is forbidden: User "system:serviceaccount:${NS}:default" cannot get resource "statefulsets" in API group "apps" in the namespace "${NS}"`));
      if (rec.method === "GET" && rec.path === `${STS_PATH}/${STS}`) {
        if (!opts.statefulSetExists) return send(404, status(404, "NotFound", `statefulsets.apps "${STS}" not found`));
        const sts = { ...workerStatefulSet(JOB, { image: "ctrain:0.1.0-gpu", namespace: NS, gpusPerWorker: 1 }, 0), status: { replicas: 0, availableReplicas: 0 } };
        new StatefulSet(sts as any).validate();
        return send(200, sts);
      }
      if (rec.method === "POST" && rec.path === STS_PATH) {
        opts.statefulSetExists = true;
        return send(201, { ...rec.body, metadata: { ...rec.body.metadata, uid: "u-1", resourceVersion: "1" } });
      }
      if (rec.method === "PATCH" && rec.path === `${STS_PATH}/${STS}/scale`) {
        if (!opts.statefulSetExists) return send(404, status(404, "NotFound", `statefulsets.apps "${STS}" not found`));
        return send(200, scaleOf(rec.body?.spec?.replicas));
      }
      if (rec.method === "GET" && rec.path === `/api/v1/namespaces/${NS}/pods` && rec.query.get("watch") === "true") {
        res.writeHead(200, { "content-type": "application/json", "transfer-encoding": "chunked" });
        streams.add(res);
        res.on("close", () => streams.delete(res));
        for (const e of opts.watchEvents ?? []) res.write(`${JSON.stringify(e)}\n`);
        watchOpened();
        return; // left open, like a real watch
      }
      send(404, status(404, "NotFound", `fake API: no route for ${rec.method} ${rec.path}`));
    });
  });
  await new Promise<void>((r) => server.listen(0, "127.0.0.1", r));
  const port = (server.address() as AddressInfo).port;
  const kc = new KubeConfig();
  kc.loadFromOptions({
    clusters: [{ name: "fake", server: `http://127.0.0.1:${port}`, skipTLSVerify: true }],
    users: [{ name: "test", token: "test-token" }],
    contexts: [{ name: "fake", cluster: "fake", user: "test", namespace: NS }],
    currentContext: "fake",
  });
  return {
    kc, requests, watchOpen,
    push(e: object) { for (const s of streams) s.write(`${JSON.stringify(e)}\n`); },
    /** Ends the open watch streams, as the API server does after its watch timeout. */
    endWatches() { for (const s of streams) s.end(); },
    async close() {
      for (const s of streams) s.end();
      server.closeAllConnections();
      await new Promise<void>((r) => server.close(() => r()));
    },
  };
}

function launcher(kc: KubeConfig, withImage = true): KubernetesLauncher {
  return new KubernetesLauncher({
    job: JOB, kubeConfig: kc, namespace: NS, rewatchDelayMs: 50,
    render: withImage ? { image: "ctrain:0.1.0-gpu", gpusPerWorker: 1 } : undefined,
  });
}

/** The next `n` events, or a clear failure after `ms`. */
async function take(it: AsyncIterator<LauncherEvent>, n: number, ms = 5000): Promise<LauncherEvent[]> {
  const out: LauncherEvent[] = [];
  while (out.length < n) {
    let timer: NodeJS.Timeout | undefined;
    const timeout = new Promise<never>((_, rej) => {
      timer = setTimeout(() => rej(new Error(`timed out after ${out.length}/${n} events: ${JSON.stringify(out)}`)), ms);
    });
    try {
      const r = await Promise.race([it.next(), timeout]);
      if (r.done) break;
      out.push(r.value);
    } finally {
      clearTimeout(timer);
    }
  }
  return out;
}

/** Polls `fn` until it holds, failing after `ms` (no fixed sleeps). */
async function check(fn: () => boolean, ms = 5000): Promise<void> {
  const end = Date.now() + ms;
  while (!fn()) {
    if (Date.now() > end) assert.fail(`condition not met within ${ms} ms: ${fn}`);
    await new Promise((r) => setTimeout(r, 10));
  }
}

test("k8s - start creates the worker StatefulSet when it is missing, with the job's args and GPUs", async () => {
  const api = await fakeApi({ statefulSetExists: false });
  try {
    await using l = launcher(api.kc);
    assert.equal(await l.start(3), "created");
    assert.deepEqual(api.requests.map((r) => `${r.method} ${r.path}`), [`GET ${STS_PATH}/${STS}`, `POST ${STS_PATH}`]);
    const body = api.requests[1].body;
    new StatefulSet(body).validate();
    assert.equal(body.metadata.name, STS);
    assert.equal(body.metadata.namespace, NS);
    assert.equal(body.spec.replicas, 3);
    const c = body.spec.template.spec.containers[0];
    assert.equal(c.image, "ctrain:0.1.0-gpu");
    assert.equal(c.resources.limits["nvidia.com/gpu"], "1");
    assert.equal(c.args[0], "worker");
    assert.equal(c.args[c.args.indexOf("--job") + 1], "demo");
    assert.ok(api.requests.every((r) => r.query.get("dryRun") === null));
  } finally {
    await api.close();
  }
});

test("k8s - start scales an existing StatefulSet with a merge patch of the scale sub-resource; scaleToZero patches 0", async () => {
  const api = await fakeApi({ statefulSetExists: true });
  try {
    await using l = launcher(api.kc, false);
    assert.equal(await l.start(4), "scaled");
    await l.scaleToZero();
    assert.deepEqual(api.requests.map((r) => `${r.method} ${r.path}`), [
      `GET ${STS_PATH}/${STS}`, `PATCH ${STS_PATH}/${STS}/scale`, `PATCH ${STS_PATH}/${STS}/scale`,
    ]);
    for (const [i, n] of [[1, 4], [2, 0]]) {
      assert.equal(api.requests[i].contentType, "application/merge-patch+json");
      assert.deepEqual(api.requests[i].body, { spec: { replicas: n } });
    }
  } finally {
    await api.close();
  }
});

test("k8s - scaleToZero on a missing StatefulSet is a no-op; start without an image says how to fix it", async () => {
  const api = await fakeApi({ statefulSetExists: false });
  try {
    await using l = launcher(api.kc, false);
    await l.scaleToZero();
    await assert.rejects(l.start(2), /does not exist and no image is known.*ctrain k8s render/);
  } finally {
    await api.close();
  }
});

test("k8s - a forbidden call names the missing RBAC right", async () => {
  const api = await fakeApi({ statefulSetExists: true, forbid: true });
  try {
    await using l = launcher(api.kc);
    await assert.rejects(l.start(2), (err: unknown) => {
      assert.ok(err instanceof KubernetesApiError);
      assert.equal(err.status, 403);
      assert.match(err.message, /HTTP 403.*lacks a right.*ctrain-launcher/s);
      return true;
    });
  } finally {
    await api.close();
  }
});

test("k8s - watch reports an unschedulable GPU pod, a crash loop, a running pod, a failed pod and a deletion, once each", async () => {
  const api = await fakeApi({
    statefulSetExists: true,
    watchEvents: [
      { type: "ADDED", object: RUNNING_POD },
      { type: "ADDED", object: PENDING_POD },
      { type: "ADDED", object: CRASH_POD },
      { type: "MODIFIED", object: { ...CRASH_POD, metadata: { ...CRASH_POD.metadata, resourceVersion: "101" } } }, // same state: not repeated
    ],
  });
  try {
    const l = launcher(api.kc);
    const events = l.watch();
    const first = await take(events, 3);
    const watchReq = api.requests.find((r) => r.query.get("watch") === "true")!;
    assert.equal(watchReq.path, `/api/v1/namespaces/${NS}/pods`);
    assert.equal(watchReq.query.get("labelSelector"), "ctrain.dev/job=demo,app.kubernetes.io/component=worker");
    assert.deepEqual(first[0], { type: "pod-running", pod: "demo-worker-0", node: "gpu-node-1", ready: true });
    assert.deepEqual(first[1], {
      type: "pod-pending-unschedulable", pod: "demo-worker-2", reason: "Insufficient nvidia.com/gpu",
      causes: ["Insufficient nvidia.com/gpu"], message: UNSCHEDULABLE,
    });
    assert.deepEqual(first[2], {
      type: "pod-crash-loop", pod: "demo-worker-1", container: "worker", reason: "CrashLoopBackOff", restarts: 4,
      lastTerminationReason: "Error", exitCode: 1,
      lastTerminationMessage: "BackendUnavailableError: tensorflow-gpu: libcudnn.so.8: cannot open shared object file",
    });
    api.push({ type: "MODIFIED", object: FAILED_POD });
    api.push({ type: "DELETED", object: PENDING_POD });
    const more = await take(events, 2);
    assert.deepEqual(more, [
      { type: "pod-failed", pod: "demo-worker-3", reason: "Evicted", message: "The node was low on resource: ephemeral-storage." },
      { type: "pod-deleted", pod: "demo-worker-2" },
    ]);
    await l.close();
    assert.deepEqual(await events.next(), { value: undefined, done: true }, "close ends the stream");
    assert.throws(() => l.watch(), /closed/);
  } finally {
    await api.close();
  }
});

test("k8s - a watch the server ends is re-opened without repeating events", async () => {
  const api = await fakeApi({ statefulSetExists: true, watchEvents: [{ type: "ADDED", object: PENDING_POD }] });
  try {
    await using l = launcher(api.kc);
    const events = l.watch();
    assert.equal((await take(events, 1))[0].type, "pod-pending-unschedulable");
    // The API server ends watches every few minutes; the new watch's initial list repeats ADDED for
    // every pod, which must not be reported again.
    api.endWatches();
    await check(() => api.requests.filter((r) => r.query.get("watch") === "true").length === 2);
    api.push({ type: "MODIFIED", object: RUNNING_POD });
    assert.deepEqual(await take(events, 1), [{ type: "pod-running", pod: "demo-worker-0", node: "gpu-node-1", ready: true }]);
  } finally {
    await api.close();
  }
});

test("k8s - podEvent and unschedulableCauses read the cluster's own reasons", () => {
  assert.deepEqual(unschedulableCauses("0/5 nodes are available: 2 Insufficient cpu, 3 node(s) had untolerated taint {nvidia.com/gpu: present}. preemption: 0/5 nodes are available: 5 Preemption is not helpful for scheduling."),
    ["Insufficient cpu", "node(s) had untolerated taint {nvidia.com/gpu: present}"]);
  assert.deepEqual(unschedulableCauses("0/1 nodes are available: 1 Insufficient nvidia.com/gpu."), ["Insufficient nvidia.com/gpu"]);
  assert.deepEqual(unschedulableCauses("something else"), []);
  const pulling = pod("p", {
    phase: "Pending", conditions: [{ type: "PodScheduled", status: "True" }],
    containerStatuses: [{ name: "worker", image: "x", imageID: "", ready: false, restartCount: 0, state: { waiting: { reason: "ImagePullBackOff", message: "Back-off pulling image \"x\"" } } }],
  });
  assert.deepEqual(podEvent(pulling as any), { type: "pod-start-error", pod: "p", container: "worker", reason: "ImagePullBackOff", message: "Back-off pulling image \"x\"" });
  assert.equal(podEvent(pod("q", { phase: "Pending" }) as any), undefined, "pending but not judged yet: nothing to say");
  assert.deepEqual(podEvent(pod("r", {
    phase: "Failed",
    containerStatuses: [{ name: "worker", image: "x", imageID: "", ready: false, restartCount: 0, state: { terminated: { exitCode: 137, reason: "OOMKilled" } } }],
  }) as any), { type: "pod-failed", pod: "r", reason: "OOMKilled", message: "exit code 137" });
});

test("k8s - launcher options come from the coordinator Job's environment", () => {
  const o = kubernetesLauncherOptionsFromEnv(JOB, { POD_NAMESPACE: "ml", CTRAIN_IMAGE: "ctrain:0.1.0-gpu", CTRAIN_GPUS_PER_WORKER: "2", CTRAIN_DATA_CLAIM: "images" });
  assert.equal(o.namespace, "ml");
  assert.deepEqual(o.render, { image: "ctrain:0.1.0-gpu", gpusPerWorker: 2, dataClaim: "images" });
  assert.throws(() => kubernetesLauncherOptionsFromEnv(JOB, { CTRAIN_GPUS_PER_WORKER: "one" }), /CTRAIN_GPUS_PER_WORKER/);
});

after(() => {
  // Exactly the Role's rights: every call the launcher made is granted, every granted right was used.
  const granted = new Set(LAUNCHER_RBAC_RULES.flatMap((r) => r.apiGroups!.flatMap((g) => r.resources!.flatMap((res) => r.verbs.map((v) => `${g}/${res}:${v}`)))));
  assert.deepEqual([...usedRights].sort(), [...granted].sort(), "launcher API calls = RBAC rules in k8s_manifests.ts");
});

test("k8s - ctrain coordinator --launcher kubernetes starts workers, logs pod problems with reasons, scales to zero at the end", async () => {
  const api = await fakeApi({ statefulSetExists: false, watchEvents: [{ type: "ADDED", object: PENDING_POD }, { type: "ADDED", object: CRASH_POD }] });
  const { mkdtemp, writeFile, rm } = await import("node:fs/promises");
  const { tmpdir } = await import("node:os");
  const { join } = await import("node:path");
  const { createLogger } = await import("../core/runtime/log.js");
  const { launchWorkers } = await import("../coordinator/launch_workers.js");
  const dir = await mkdtemp(join(tmpdir(), "ctrain-kube-"));
  try {
    const kubeconfig = join(dir, "config");
    await writeFile(kubeconfig, api.kc.exportConfig());
    const lines: Record<string, unknown>[] = [];
    const log = createLogger({ job: "demo", format: "json", stream: { write: (s: string) => { for (const l of s.split("\n")) if (l) lines.push(JSON.parse(l)); } } });
    const opts = resolveOptions({ ...JOB, launcher: "kubernetes" });
    const env = { KUBECONFIG: kubeconfig, POD_NAMESPACE: NS, CTRAIN_IMAGE: "ctrain:0.1.0-gpu", CTRAIN_GPUS_PER_WORKER: "1" };
    const workers = await launchWorkers(opts, log, env);
    const created = api.requests.find((r) => r.method === "POST" && r.path === STS_PATH);
    assert.ok(created, "the worker StatefulSet is created");
    assert.equal(created.body.spec.replicas, 3);
    await check(() => lines.some((l) => l.msg === "worker pod is crash-looping"));
    const unsched = lines.find((l) => l.msg === "worker pod cannot be scheduled")!;
    assert.equal(unsched.reason, "Insufficient nvidia.com/gpu");
    assert.equal(unsched.level, "warn");
    const crash = lines.find((l) => l.msg === "worker pod is crash-looping")!;
    assert.equal(crash.reason, "CrashLoopBackOff");
    assert.match(String(crash.message), /libcudnn/);
    await workers.stop();
    const scale = api.requests.filter((r) => r.method === "PATCH" && r.path === `${STS_PATH}/${STS}/scale`).at(-1);
    assert.equal(scale?.body?.spec?.replicas, 0, "scaled to zero at the end");
    assert.ok(lines.some((l) => l.msg === "workers scaled to zero"));
    const local = await launchWorkers(resolveOptions({ ...JOB, launcher: "local" }), log, env);
    const before = api.requests.length;
    await local.stop();
    assert.equal(api.requests.length, before, "--launcher local calls no Kubernetes API");
  } finally {
    await api.close();
    await rm(dir, { recursive: true, force: true });
  }
});

/**
 * Kubernetes manifests for one job, as plain typed objects: NATS with JetStream, the coordinator Job,
 * the worker StatefulSet, the launcher's RBAC, a PodMonitor and the Grafana dashboard ConfigMap.
 * `ctrain k8s render` prints them; the Kubernetes launcher builds the worker StatefulSet from here
 * when it has to create it; deploy/k8s/base holds the same objects for kustomize users (a test keeps
 * the two in step). No templating tool: the job's options become container args through the same
 * schema (`OPTION_SPECS`, `flagName`) that parses them.
 */
import type {
  V1ConfigMap, V1Container, V1EnvVar, V1Job, V1PersistentVolumeClaim, V1PolicyRule, V1Probe,
  V1ResourceRequirements, V1Role, V1RoleBinding, V1Secret, V1SecurityContext, V1Service,
  V1ServiceAccount, V1StatefulSet, V1Volume, V1VolumeMount, V1PodSecurityContext,
} from "@kubernetes/client-node";
import { randomBytes } from "node:crypto";
import { stringify } from "yaml";
import { ConfigError } from "../core/runtime/errors.js";
import { redactSecrets } from "../core/runtime/log.js";
import { OPTION_SPECS, WORKER_OPTION_SPECS, flagName, type JobOptions } from "../core/runtime/config.js";

/** Port every ctrain process serves /metrics, /healthz and /readyz on inside a pod (container port `metrics`). */
export const METRICS_PORT = 9400;
/** Where the feature cache (an emptyDir) is mounted. */
export const CACHE_DIR = "/cache";
/** Where the coordinator writes runs (a PersistentVolumeClaim, so results outlive the Job's pod). */
export const OUT_DIR = "/out";
/** Where `--data-claim` mounts the data set, read-only. */
export const DATA_DIR = "/data";
/** Names shared by every job in a namespace. */
export const NAMES = {
  nats: "nats",
  natsHeadless: "nats-headless",
  natsConfig: "nats-config",
  natsSecret: "nats-credentials",
  launcherAccount: "ctrain-launcher",
  runsClaim: "ctrain-runs",
  podMonitor: "ctrain",
  dashboard: "ctrain-grafana-dashboard",
} as const;
/** Label keys. `ctrain.dev/job` scopes a job's pods; the launcher watches by it. */
export const LABELS = {
  name: "app.kubernetes.io/name",
  component: "app.kubernetes.io/component",
  partOf: "app.kubernetes.io/part-of",
  job: "ctrain.dev/job",
  metrics: "ctrain.dev/metrics",
} as const;

/**
 * The only API calls the Kubernetes launcher makes, as RBAC rules: read the worker StatefulSet,
 * create it when missing, patch its scale sub-resource, watch the job's pods. The Role grants exactly
 * these; the launcher test checks that the requests it sees map onto this list and nothing else.
 */
export const LAUNCHER_RBAC_RULES: readonly V1PolicyRule[] = [
  { apiGroups: ["apps"], resources: ["statefulsets"], verbs: ["get", "create"] },
  { apiGroups: ["apps"], resources: ["statefulsets/scale"], verbs: ["patch"] },
  { apiGroups: [""], resources: ["pods"], verbs: ["watch"] },
];

/** Prometheus operator's PodMonitor (a CRD, so not in the client's types). */
export interface PodMonitor {
  apiVersion: "monitoring.coreos.com/v1";
  kind: "PodMonitor";
  metadata: { name: string; namespace?: string; labels?: Record<string, string> };
  spec: {
    selector: { matchLabels: Record<string, string> };
    podMetricsEndpoints: { port: string; path: string; interval: string; scrapeTimeout?: string; honorLabels?: boolean }[];
  };
}

export type Manifest =
  | V1ConfigMap | V1Secret | V1Service | V1StatefulSet | V1Job | V1ServiceAccount | V1Role
  | V1RoleBinding | V1PersistentVolumeClaim | PodMonitor;

/** What a rendering needs besides the job's options. */
export interface RenderOptions {
  /** Container image of ctrain (Dockerfile.gpu or Dockerfile.cpu). Required. */
  image: string;
  /** Namespace of every namespaced object. Default `default`. */
  namespace: string;
  /** `nvidia.com/gpu` per worker pod; 0 = CPU workers. Default 0. */
  gpusPerWorker: number;
  /** PersistentVolumeClaim holding the data set, mounted read-only at /data on workers and the coordinator; empty = none (data baked into the image, e.g. fashion-mnist). */
  dataClaim?: string;
  /** Image of the NATS server. Default `nats:2.10.22-alpine`. */
  natsImage?: string;
  /** Size of the JetStream volume. Default `10Gi`. */
  natsStorage?: string;
  /** Size of the runs volume. Default `5Gi`. */
  runsStorage?: string;
  /** Size limit of a worker's feature cache (emptyDir). Default `20Gi`. */
  cacheSize?: string;
  /** Password in the rendered NATS Secret. Default: 24 random bytes, hex. */
  natsPassword?: string;
  /** Leave the NATS Secret out (it exists already). Default false. */
  omitSecret?: boolean;
  /** Grafana dashboard JSON to ship as a ConfigMap; absent = no dashboard ConfigMap. */
  dashboardJson?: string;
}

const QUANTITY = /^\d+(\.\d+)?(Ki|Mi|Gi|Ti|Pi|k|M|G|T|P)?$/;
const DNS_LABEL = /^[a-z0-9]([-a-z0-9]*[a-z0-9])?$/;

/** A DNS-1123 label made from a job id (lower case, `_` to `-`, at most `max` characters). */
export function dnsName(jobId: string, max = 40): string {
  let s = jobId.toLowerCase().replace(/[^a-z0-9-]/g, "-").replace(/^-+|-+$/g, "");
  if (s.length > max) {
    // Keep names unique when truncating: a short hash of the whole id.
    let h = 0;
    for (const c of jobId) h = (Math.imul(h, 31) + c.charCodeAt(0)) >>> 0;
    s = `${s.slice(0, max - 7).replace(/-+$/, "")}-${h.toString(36).slice(0, 6)}`;
  }
  return s || "ctrain";
}

/** Name of a job's worker StatefulSet (also its headless Service). At most 47 characters, so pod names and revision-hash labels fit in 63. */
export function workerStatefulSetName(jobId: string): string {
  return `${dnsName(jobId)}-worker`;
}

/** Name of a job's coordinator Job. */
export function coordinatorJobName(jobId: string): string {
  return `${dnsName(jobId)}-coordinator`;
}

/** Labels of a job's pods of one component. */
export function jobLabels(jobId: string, component: "worker" | "coordinator"): Record<string, string> {
  return {
    [LABELS.name]: "ctrain",
    [LABELS.partOf]: "ctrain",
    [LABELS.component]: component,
    [LABELS.job]: dnsName(jobId, 63),
  };
}

/** Label selector (string form) of a job's worker pods. */
export function workerSelector(jobId: string): string {
  const l = jobLabels(jobId, "worker");
  return `${LABELS.job}=${l[LABELS.job]},${LABELS.component}=worker`;
}

/** Options every ctrain pod must have, whatever the user passed: where things live inside a pod. */
function podOptions(opts: JobOptions): JobOptions {
  return { ...opts, metricsPort: METRICS_PORT, cacheDir: CACHE_DIR, out: `${OUT_DIR}/${opts.job}`, logFormat: "json" };
}

/**
 * NATS URL(s) as they go into container args: a scheme, never credentials (args show in `kubectl
 * describe` and in `ps`); the Secret reaches ctrain as CTRAIN_NATS_USER / CTRAIN_NATS_PASS instead.
 */
function natsUrls(nats: string): string {
  return nats
    .split(",")
    .map((u) => {
      const t = u.trim();
      const m = /^((?:nats|tls|wss?):\/\/)?(.*)$/.exec(t)!;
      if (m[2].includes("@")) throw new ConfigError(`--nats ${redactSecrets(t)} holds credentials; manifests take them from the ${NAMES.natsSecret} Secret: give the URL without user:password@.`);
      return `${m[1] ?? "nats://"}${m[2]}`;
    })
    .join(",");
}

const ALWAYS: Record<"coordinator" | "worker", readonly (keyof JobOptions)[]> = {
  coordinator: ["job", "data", "nats", "workers", "launcher", "metricsPort", "cacheDir", "out", "logFormat"],
  worker: ["job", "nats", "metricsPort", "logFormat"],
};
const NEVER: Record<"coordinator" | "worker", readonly (keyof JobOptions)[]> = {
  coordinator: [],
  worker: ["workers", "launcher", "out"],
};

/**
 * Container args for a role: `<role>` then `--flag value` for every option that differs from its
 * default, plus the ones a pod always needs, in schema order.
 */
export function containerArgs(opts: JobOptions, role: "coordinator" | "worker"): string[] {
  const o = podOptions(opts);
  if (role === "worker") return workerArgs(o);
  o.launcher = "kubernetes";
  const args: string[] = [role];
  for (const s of OPTION_SPECS) {
    if (NEVER[role].includes(s.key)) continue;
    const v = o[s.key];
    if (!ALWAYS[role].includes(s.key) && v === s.default()) continue;
    const value = s.key === "nats" ? natsUrls(String(v)) : String(v);
    args.push(`--${flagName(s.key)}`, value);
  }
  // Said explicitly: Prometheus and the kubelet's probes reach /metrics on the pod IP.
  args.push("--metrics-host", "0.0.0.0");
  return args;
}

/**
 * A worker pod's args: only `ctrain worker`'s own table (WORKER_OPTION_SPECS). Job options reach a
 * worker in the coordinator's spec over NATS, and `ctrain worker` refuses job flags.
 */
function workerArgs(o: JobOptions): string[] {
  const args = ["worker"];
  const fromJob = o as unknown as Record<string, unknown>;
  for (const s of WORKER_OPTION_SPECS) {
    if (s.key === "metricsHost" || !(s.key in fromJob)) continue;
    const v = fromJob[s.key];
    if (!ALWAYS.worker.includes(s.key as keyof JobOptions) && v === s.default()) continue;
    args.push(`--${flagName(s.key)}`, s.key === "nats" ? natsUrls(String(v)) : String(v));
  }
  args.push("--metrics-host", "0.0.0.0");
  return args;
}

const RESTRICTED_CONTAINER: V1SecurityContext = {
  allowPrivilegeEscalation: false,
  readOnlyRootFilesystem: true,
  runAsNonRoot: true,
  capabilities: { drop: ["ALL"] },
};

function podSecurity(uid: number): V1PodSecurityContext {
  return { runAsNonRoot: true, runAsUser: uid, runAsGroup: uid, fsGroup: uid, seccompProfile: { type: "RuntimeDefault" } };
}

function credentialsEnv(): V1EnvVar[] {
  return ["NATS_USER", "NATS_PASSWORD"].map((k) => ({
    name: k,
    valueFrom: { secretKeyRef: { name: NAMES.natsSecret, key: k } },
  }));
}

function ctrainEnv(): V1EnvVar[] {
  // ctrain reads its NATS credentials from these (core/runtime/nats_connect.ts), never from a URL in args.
  const from = (name: string, key: string): V1EnvVar => ({ name, valueFrom: { secretKeyRef: { name: NAMES.natsSecret, key } } });
  return [from("CTRAIN_NATS_USER", "NATS_USER"), from("CTRAIN_NATS_PASS", "NATS_PASSWORD"), { name: "HOME", value: "/tmp" }];
}

function httpProbe(path: string, period: number, failures: number): V1Probe {
  return { httpGet: { path, port: "metrics" }, periodSeconds: period, timeoutSeconds: 5, failureThreshold: failures };
}

function ctrainVolumes(r: RenderOptions): { volumes: V1Volume[]; mounts: V1VolumeMount[] } {
  const volumes: V1Volume[] = [
    { name: "cache", emptyDir: { sizeLimit: r.cacheSize ?? "20Gi" } },
    { name: "tmp", emptyDir: { sizeLimit: "2Gi" } },
  ];
  const mounts: V1VolumeMount[] = [
    { name: "cache", mountPath: CACHE_DIR },
    { name: "tmp", mountPath: "/tmp" },
  ];
  if (r.dataClaim) {
    volumes.push({ name: "data", persistentVolumeClaim: { claimName: r.dataClaim, readOnly: true } });
    mounts.push({ name: "data", mountPath: DATA_DIR, readOnly: true });
  }
  return { volumes, mounts };
}

function meta(name: string, r: RenderOptions, labels: Record<string, string>) {
  return { name, namespace: r.namespace, labels };
}

/** The worker StatefulSet. `replicas` is left out unless given: the launcher owns the count, and `kubectl apply` must not reset it mid-job. */
export function workerStatefulSet(opts: JobOptions, r: RenderOptions, replicas?: number): V1StatefulSet {
  const name = workerStatefulSetName(opts.job);
  const labels = jobLabels(opts.job, "worker");
  const { volumes, mounts } = ctrainVolumes(r);
  const resources: V1ResourceRequirements = {
    requests: { cpu: "2", memory: "4Gi", "ephemeral-storage": "1Gi" },
    limits: { cpu: "4", memory: "8Gi", "ephemeral-storage": "4Gi" },
  };
  if (r.gpusPerWorker > 0) {
    resources.requests!["nvidia.com/gpu"] = String(r.gpusPerWorker);
    resources.limits!["nvidia.com/gpu"] = String(r.gpusPerWorker);
  }
  const container: V1Container = {
    name: "worker",
    image: r.image,
    imagePullPolicy: "IfNotPresent",
    args: containerArgs(opts, "worker"),
    env: [
      ...ctrainEnv(),
      { name: "POD_NAME", valueFrom: { fieldRef: { fieldPath: "metadata.name" } } },
    ],
    ports: [{ name: "metrics", containerPort: METRICS_PORT, protocol: "TCP" }],
    resources,
    // Model loading can take a while on a cold node: the startup probe gives it 5 minutes.
    startupProbe: httpProbe("/healthz", 5, 60),
    livenessProbe: httpProbe("/healthz", 10, 3),
    readinessProbe: httpProbe("/readyz", 5, 2),
    securityContext: RESTRICTED_CONTAINER,
    volumeMounts: mounts,
  };
  const sts: V1StatefulSet = {
    apiVersion: "apps/v1",
    kind: "StatefulSet",
    metadata: meta(name, r, labels),
    spec: {
      serviceName: name,
      // Workers are interchangeable: start and stop them all at once, not one by one.
      podManagementPolicy: "Parallel",
      selector: { matchLabels: { [LABELS.job]: labels[LABELS.job], [LABELS.component]: "worker" } },
      template: {
        metadata: { labels: { ...labels, [LABELS.metrics]: "true" } },
        spec: {
          automountServiceAccountToken: false,
          terminationGracePeriodSeconds: 60,
          securityContext: podSecurity(1000),
          containers: [container],
          volumes,
          ...(r.gpusPerWorker > 0
            ? { tolerations: [{ key: "nvidia.com/gpu", operator: "Exists", effect: "NoSchedule" }] }
            : {}),
        },
      },
    },
  };
  if (replicas !== undefined) sts.spec!.replicas = replicas;
  return sts;
}

/** Headless Service of the worker StatefulSet (stable pod DNS names; no load balancing). */
export function workerService(opts: JobOptions, r: RenderOptions): V1Service {
  const name = workerStatefulSetName(opts.job);
  const labels = jobLabels(opts.job, "worker");
  return {
    apiVersion: "v1",
    kind: "Service",
    metadata: meta(name, r, labels),
    spec: {
      clusterIP: "None",
      selector: { [LABELS.job]: labels[LABELS.job], [LABELS.component]: "worker" },
      ports: [{ name: "metrics", port: METRICS_PORT, targetPort: "metrics" }],
    },
  };
}

/** The coordinator: a Job that runs the whole training and scales the workers through the launcher. */
export function coordinatorJob(opts: JobOptions, r: RenderOptions): V1Job {
  const labels = jobLabels(opts.job, "coordinator");
  const { volumes, mounts } = ctrainVolumes(r);
  volumes.push({ name: "runs", persistentVolumeClaim: { claimName: NAMES.runsClaim } });
  mounts.push({ name: "runs", mountPath: OUT_DIR });
  const container: V1Container = {
    name: "coordinator",
    image: r.image,
    imagePullPolicy: "IfNotPresent",
    args: containerArgs(opts, "coordinator"),
    env: [
      ...ctrainEnv(),
      // Read by the Kubernetes launcher (kubernetesLauncherOptionsFromEnv) to create/scale workers.
      { name: "POD_NAMESPACE", valueFrom: { fieldRef: { fieldPath: "metadata.namespace" } } },
      { name: "CTRAIN_IMAGE", value: r.image },
      { name: "CTRAIN_GPUS_PER_WORKER", value: String(r.gpusPerWorker) },
      ...(r.dataClaim ? [{ name: "CTRAIN_DATA_CLAIM", value: r.dataClaim }] : []),
    ],
    ports: [{ name: "metrics", containerPort: METRICS_PORT, protocol: "TCP" }],
    resources: {
      requests: { cpu: "1", memory: "2Gi", "ephemeral-storage": "1Gi" },
      limits: { cpu: "2", memory: "4Gi", "ephemeral-storage": "4Gi" },
    },
    // The coordinator serves /metrics; a TCP check needs nothing more of it (no /healthz contract).
    startupProbe: { tcpSocket: { port: "metrics" }, periodSeconds: 5, failureThreshold: 60 },
    livenessProbe: { tcpSocket: { port: "metrics" }, periodSeconds: 20, timeoutSeconds: 5, failureThreshold: 3 },
    securityContext: RESTRICTED_CONTAINER,
    volumeMounts: mounts,
  };
  return {
    apiVersion: "batch/v1",
    kind: "Job",
    metadata: meta(coordinatorJobName(opts.job), r, labels),
    spec: {
      // A restarted coordinator resumes from the checkpoints in /out; three tries, then give up.
      backoffLimit: 3,
      template: {
        metadata: { labels: { ...labels, [LABELS.metrics]: "true" } },
        spec: {
          serviceAccountName: NAMES.launcherAccount,
          restartPolicy: "Never",
          securityContext: podSecurity(1000),
          containers: [container],
          volumes,
        },
      },
    },
  };
}

/** NATS server config: JetStream on the volume, max_payload left at its 1 MB default, user/password from the Secret. */
export const NATS_CONF = `# NATS for ctrain: JetStream (work queue, object store, KV) on the StatefulSet's volume.
port: 4222
http_port: 8222
server_name: $POD_NAME
# The default (1 MB), written out because ctrain chunks tensors to stay under it.
max_payload: 1048576
jetstream {
  store_dir: /data/jetstream
  max_memory_store: 256MB
  max_file_store: 8GB
}
authorization {
  user: $NATS_USER
  password: $NATS_PASSWORD
}
`;

/** NATS with JetStream: config, Secret, client + headless Services, a one-replica StatefulSet with a volume. */
export function natsObjects(r: RenderOptions): Manifest[] {
  const labels = { [LABELS.name]: "nats", [LABELS.partOf]: "ctrain", [LABELS.component]: "nats" };
  const selector = { [LABELS.name]: "nats", [LABELS.component]: "nats" };
  const config: V1ConfigMap = {
    apiVersion: "v1",
    kind: "ConfigMap",
    metadata: meta(NAMES.natsConfig, r, labels),
    data: { "nats.conf": NATS_CONF },
  };
  const out: Manifest[] = [config];
  if (!r.omitSecret) {
    const secret: V1Secret = {
      apiVersion: "v1",
      kind: "Secret",
      metadata: meta(NAMES.natsSecret, r, labels),
      type: "Opaque",
      stringData: { NATS_USER: "ctrain", NATS_PASSWORD: r.natsPassword ?? randomBytes(24).toString("hex") },
    };
    out.push(secret);
  }
  out.push(...natsServices(r, labels, selector), natsStatefulSet(r, labels, selector));
  return out;
}

/** The client Service and the headless one the StatefulSet names its pod under. */
function natsServices(r: RenderOptions, labels: Record<string, string>, selector: Record<string, string>): V1Service[] {
  const client: V1Service = {
    apiVersion: "v1",
    kind: "Service",
    metadata: meta(NAMES.nats, r, labels),
    spec: { selector, ports: [{ name: "client", port: 4222, targetPort: "client" }] },
  };
  const headless: V1Service = {
    apiVersion: "v1",
    kind: "Service",
    metadata: meta(NAMES.natsHeadless, r, labels),
    spec: {
      clusterIP: "None",
      publishNotReadyAddresses: true,
      selector,
      ports: [
        { name: "client", port: 4222, targetPort: "client" },
        { name: "monitor", port: 8222, targetPort: "monitor" },
      ],
    },
  };
  return [client, headless];
}

/** One nats-server pod with a volume claim (JetStream clustering needs routes and three replicas). */
function natsStatefulSet(r: RenderOptions, labels: Record<string, string>, selector: Record<string, string>): V1StatefulSet {
  return {
    apiVersion: "apps/v1",
    kind: "StatefulSet",
    metadata: meta(NAMES.nats, r, labels),
    spec: {
      // One server: JetStream clustering needs routes and three replicas; see deploy/k8s/README.md.
      replicas: 1,
      serviceName: NAMES.natsHeadless,
      selector: { matchLabels: selector },
      template: {
        metadata: { labels },
        spec: {
          automountServiceAccountToken: false,
          terminationGracePeriodSeconds: 60,
          securityContext: podSecurity(1000),
          containers: [
            natsContainer(r),
          ],
          volumes: [{ name: "config", configMap: { name: NAMES.natsConfig } }],
        },
      },
      volumeClaimTemplates: [
        {
          apiVersion: "v1",
          kind: "PersistentVolumeClaim",
          metadata: { name: "data" },
          spec: { accessModes: ["ReadWriteOnce"], resources: { requests: { storage: r.natsStorage ?? "10Gi" } } },
        },
      ],
    },
  };
}

/** The nats-server container: config from the ConfigMap, credentials from the Secret, JetStream on /data. */
function natsContainer(r: RenderOptions): V1Container {
  return {
    name: "nats",
    image: r.natsImage ?? "nats:2.10.22-alpine",
    imagePullPolicy: "IfNotPresent",
    command: ["nats-server", "--config", "/etc/nats/nats.conf"],
    env: [...credentialsEnv(), { name: "POD_NAME", valueFrom: { fieldRef: { fieldPath: "metadata.name" } } }],
    ports: [
      { name: "client", containerPort: 4222, protocol: "TCP" },
      { name: "monitor", containerPort: 8222, protocol: "TCP" },
    ],
    resources: {
      requests: { cpu: "100m", memory: "256Mi" },
      limits: { cpu: "1", memory: "1Gi" },
    },
    startupProbe: { httpGet: { path: "/healthz", port: "monitor" }, periodSeconds: 5, failureThreshold: 30 },
    livenessProbe: { httpGet: { path: "/healthz?js-enabled-only=true", port: "monitor" }, periodSeconds: 10, timeoutSeconds: 5, failureThreshold: 3 },
    readinessProbe: { httpGet: { path: "/healthz", port: "monitor" }, periodSeconds: 5, timeoutSeconds: 5, failureThreshold: 2 },
    securityContext: RESTRICTED_CONTAINER,
    volumeMounts: [
      { name: "config", mountPath: "/etc/nats", readOnly: true },
      { name: "data", mountPath: "/data" },
    ],
  };
}

/** ServiceAccount, Role and RoleBinding of the coordinator: exactly {@link LAUNCHER_RBAC_RULES}. */
export function rbacObjects(r: RenderOptions): Manifest[] {
  const labels = { [LABELS.name]: "ctrain", [LABELS.partOf]: "ctrain", [LABELS.component]: "coordinator" };
  const sa: V1ServiceAccount = { apiVersion: "v1", kind: "ServiceAccount", metadata: meta(NAMES.launcherAccount, r, labels) };
  const role: V1Role = {
    apiVersion: "rbac.authorization.k8s.io/v1",
    kind: "Role",
    metadata: meta(NAMES.launcherAccount, r, labels),
    rules: LAUNCHER_RBAC_RULES.map((x) => ({ apiGroups: [...x.apiGroups!], resources: [...x.resources!], verbs: [...x.verbs] })),
  };
  const binding: V1RoleBinding = {
    apiVersion: "rbac.authorization.k8s.io/v1",
    kind: "RoleBinding",
    metadata: meta(NAMES.launcherAccount, r, labels),
    roleRef: { apiGroup: "rbac.authorization.k8s.io", kind: "Role", name: NAMES.launcherAccount },
    subjects: [{ kind: "ServiceAccount", name: NAMES.launcherAccount, namespace: r.namespace }],
  };
  return [sa, role, binding];
}

/** Volume of the coordinator's runs (model, history, summary, checkpoints). */
export function runsClaim(r: RenderOptions): V1PersistentVolumeClaim {
  return {
    apiVersion: "v1",
    kind: "PersistentVolumeClaim",
    metadata: meta(NAMES.runsClaim, r, { [LABELS.name]: "ctrain", [LABELS.partOf]: "ctrain" }),
    spec: { accessModes: ["ReadWriteOnce"], resources: { requests: { storage: r.runsStorage ?? "5Gi" } } },
  };
}

/** PodMonitor scraping /metrics of every ctrain pod that carries `ctrain.dev/metrics: "true"`. */
export function podMonitor(r: RenderOptions): PodMonitor {
  return {
    apiVersion: "monitoring.coreos.com/v1",
    kind: "PodMonitor",
    metadata: { name: NAMES.podMonitor, namespace: r.namespace, labels: { [LABELS.name]: "ctrain", [LABELS.partOf]: "ctrain" } },
    spec: {
      selector: { matchLabels: { [LABELS.partOf]: "ctrain", [LABELS.metrics]: "true" } },
      // honorLabels: ctrain's own `job` label (the job id) must win over the scrape job name.
      podMetricsEndpoints: [{ port: "metrics", path: "/metrics", interval: "15s", scrapeTimeout: "10s", honorLabels: true }],
    },
  };
}

/** The Grafana dashboard as a ConfigMap labelled for Grafana's sidecar (`grafana_dashboard: "1"`). */
export function dashboardConfigMap(json: string, r: RenderOptions): V1ConfigMap {
  return {
    apiVersion: "v1",
    kind: "ConfigMap",
    metadata: meta(NAMES.dashboard, r, { [LABELS.name]: "ctrain", [LABELS.partOf]: "ctrain", grafana_dashboard: "1" }),
    data: { "ctrain-dashboard.json": json },
  };
}

/** Checks the render options; throws ConfigError naming the flag. */
export function checkRenderOptions(r: RenderOptions): void {
  if (!r.image || /\s/.test(r.image)) throw new ConfigError(`--image is required (a container image built from deploy/docker), got ${JSON.stringify(r.image ?? "")}.`);
  if (!DNS_LABEL.test(r.namespace) || r.namespace.length > 63)
    throw new ConfigError(`--namespace ${JSON.stringify(r.namespace)} must be a DNS label (lower-case letters, digits, '-').`);
  if (!Number.isInteger(r.gpusPerWorker) || r.gpusPerWorker < 0 || r.gpusPerWorker > 16)
    throw new ConfigError(`--gpus-per-worker must be a whole number from 0 to 16, got ${JSON.stringify(r.gpusPerWorker)}.`);
  if (r.dataClaim !== undefined && r.dataClaim !== "" && !DNS_LABEL.test(r.dataClaim))
    throw new ConfigError(`--data-claim ${JSON.stringify(r.dataClaim)} must be a PersistentVolumeClaim name.`);
  for (const [flag, v] of [["--nats-storage", r.natsStorage], ["--runs-storage", r.runsStorage], ["--cache-size", r.cacheSize]] as const)
    if (v !== undefined && !QUANTITY.test(v)) throw new ConfigError(`${flag} must be a size like 10Gi, got ${JSON.stringify(v)}.`);
}

/** Every object of a job, in apply order (config and RBAC before the workloads that use them). */
export function buildManifests(opts: JobOptions, r: RenderOptions): Manifest[] {
  checkRenderOptions(r);
  if (!opts.nats) throw new ConfigError(`--nats is required on Kubernetes (e.g. nats://${NAMES.nats}:4222); the embedded server is for 'ctrain run'.`);
  const out: Manifest[] = [...natsObjects(r), ...rbacObjects(r), runsClaim(r)];
  if (r.dashboardJson !== undefined) out.push(dashboardConfigMap(r.dashboardJson, r));
  out.push(podMonitor(r), workerService(opts, r), workerStatefulSet(opts, r), coordinatorJob(opts, r));
  return out;
}

/** Multi-document YAML. */
export function toYaml(objects: readonly object[]): string {
  return objects.map((o) => stringify(o, { lineWidth: 0, aliasDuplicateObjects: false })).join("---\n");
}

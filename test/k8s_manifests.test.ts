/**
 * Every Kubernetes object ctrain ships or renders is checked against the Kubernetes OpenAPI schemas
 * (kubernetes-models' `validate()`) and against the invariants the deployment relies on: GPUs on GPU
 * workers, non-root, least-privilege RBAC, requests + limits + probes everywhere, the /metrics port.
 *
 * `ctrain k8s render` runs as a real child process. The kustomize overlays are built here without
 * kustomize (not installed): resources, configMapGenerator, images, namespace and strategic-merge
 * patches, with the merge keys Kubernetes uses for the lists our patches touch.
 * Not validated against a schema: PodMonitor (monitoring.coreos.com/v1) — kubernetes-models has no
 * Prometheus operator models (@kubernetes-models/prometheus-operator is not installed); its shape is
 * checked by hand below.
 */
import { after, test } from "node:test";
import assert from "node:assert/strict";
import { spawnSync } from "node:child_process";
import { cpSync, mkdtempSync, readFileSync, readdirSync, rmSync, statSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { basename, dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { parseAllDocuments, parse as parseYaml } from "yaml";
import { ConfigMap } from "kubernetes-models/v1/ConfigMap";
import { Secret } from "kubernetes-models/v1/Secret";
import { Service } from "kubernetes-models/v1/Service";
import { ServiceAccount } from "kubernetes-models/v1/ServiceAccount";
import { PersistentVolumeClaim } from "kubernetes-models/v1/PersistentVolumeClaim";
import { Namespace } from "kubernetes-models/v1/Namespace";
import { StatefulSet } from "kubernetes-models/apps/v1/StatefulSet";
import { Deployment } from "kubernetes-models/apps/v1/Deployment";
import { Job } from "kubernetes-models/batch/v1/Job";
import { Role } from "kubernetes-models/rbac.authorization.k8s.io/v1/Role";
import { RoleBinding } from "kubernetes-models/rbac.authorization.k8s.io/v1/RoleBinding";
import { LAUNCHER_RBAC_RULES, METRICS_PORT, dnsName } from "../coordinator/k8s_manifests.js";
import { parseWorkerArgs } from "../core/runtime/config.js";
import { NATS_AUTH_FLAGS } from "../core/runtime/nats_connect.js";

// dist/test/k8s_manifests.test.js -> repository root
const ROOT = resolve(dirname(fileURLToPath(import.meta.url)), "..", "..");
const CLI = join(ROOT, "dist", "cli", "main.js");
const K8S_DIR = join(ROOT, "deploy", "k8s");

/**
 * A copy of deploy/ with the nats-credentials.env a user creates (it is not shipped): the overlays
 * are built from here. Returns deploy/k8s in the copy; `credentials: false` leaves the file out.
 */
function deployCopy(credentials = true): string {
  const tmp = mkdtempSync(join(tmpdir(), "ctrain-kz-"));
  copies.push(tmp);
  cpSync(join(ROOT, "deploy"), join(tmp, "deploy"), { recursive: true });
  const env = join(tmp, "deploy", "k8s", "base", "nats-credentials.env");
  rmSync(env, { force: true });
  if (credentials) writeFileSync(env, "NATS_USER=ctrain\nNATS_PASSWORD=test-only-password\n");
  return join(tmp, "deploy", "k8s");
}
const copies: string[] = [];
after(() => {
  for (const d of copies) rmSync(d, { recursive: true, force: true });
});
const K8S_BUILD = deployCopy();

type Obj = {
  apiVersion: string; kind: string;
  metadata: { name: string; namespace?: string; labels?: Record<string, string> };
  [k: string]: any; // eslint-disable-line @typescript-eslint/no-explicit-any
};

const MODELS: Record<string, new (data: any) => { validate(): void }> = {
  "v1/ConfigMap": ConfigMap,
  "v1/Secret": Secret,
  "v1/Service": Service,
  "v1/ServiceAccount": ServiceAccount,
  "v1/PersistentVolumeClaim": PersistentVolumeClaim,
  "v1/Namespace": Namespace,
  "apps/v1/StatefulSet": StatefulSet,
  "apps/v1/Deployment": Deployment,
  "batch/v1/Job": Job,
  "rbac.authorization.k8s.io/v1/Role": Role,
  "rbac.authorization.k8s.io/v1/RoleBinding": RoleBinding,
};
/** CRDs kubernetes-models does not carry; checked by hand. */
const UNMODELLED = new Set(["monitoring.coreos.com/v1/PodMonitor"]);

function validate(o: Obj, where: string): void {
  const key = `${o.apiVersion}/${o.kind}`;
  if (UNMODELLED.has(key)) return checkPodMonitorShape(o, where);
  const Model = MODELS[key];
  assert.ok(Model, `${where}: no schema for ${key} (add it to MODELS)`);
  try {
    new Model(o).validate();
  } catch (err) {
    assert.fail(`${where}: ${key} ${o.metadata?.name} does not match the Kubernetes schema: ${(err as Error).message}`);
  }
}

function checkPodMonitorShape(o: Obj, where: string): void {
  assert.equal(o.kind, "PodMonitor", where);
  assert.ok(o.metadata?.name, `${where}: PodMonitor needs a name`);
  assert.ok(o.spec?.selector?.matchLabels && Object.keys(o.spec.selector.matchLabels).length > 0, `${where}: PodMonitor needs a selector`);
  assert.ok(Array.isArray(o.spec.podMetricsEndpoints) && o.spec.podMetricsEndpoints.length > 0, `${where}: PodMonitor needs endpoints`);
  for (const e of o.spec.podMetricsEndpoints) {
    assert.equal(typeof e.port, "string", `${where}: endpoint port must be a port name`);
    assert.match(e.interval ?? "30s", /^\d+(ms|s|m|h)$/, where);
  }
}

function parseDocs(text: string, where: string): Obj[] {
  const docs = parseAllDocuments(text);
  const out: Obj[] = [];
  for (const d of docs) {
    assert.equal(d.errors.length, 0, `${where}: YAML error ${d.errors[0]?.message}`);
    const v = d.toJS();
    if (v !== null && v !== undefined) out.push(v as Obj);
  }
  return out;
}

function render(args: string[]): { code: number | null; stdout: string; stderr: string } {
  const r = spawnSync(process.execPath, [CLI, "k8s", "render", ...args], { encoding: "utf8", cwd: ROOT });
  return { code: r.status, stdout: r.stdout, stderr: r.stderr };
}

function renderOk(args: string[]): Obj[] {
  const r = render(args);
  assert.equal(r.code, 0, `ctrain k8s render ${args.join(" ")} failed: ${r.stderr}`);
  return parseDocs(r.stdout, "render");
}

// ---------------------------------------------------------------- kustomize, the parts we use

const MERGE_KEYS: Record<string, string> = {
  containers: "name", initContainers: "name", env: "name", volumes: "name", volumeMounts: "mountPath",
  ports: "containerPort", imagePullSecrets: "name",
};

function strategicMerge(target: any, patch: any): any {
  if (patch === null || typeof patch !== "object" || Array.isArray(patch)) return patch;
  const out = target && typeof target === "object" && !Array.isArray(target) ? { ...target } : {};
  for (const [k, v] of Object.entries(patch)) {
    if (v === null) { delete out[k]; continue; }
    const mk = MERGE_KEYS[k];
    if (Array.isArray(v) && mk && Array.isArray(out[k])) {
      const merged = [...out[k]];
      for (const item of v as any[]) {
        const i = merged.findIndex((m) => m[mk] === item[mk]);
        if (i >= 0) merged[i] = strategicMerge(merged[i], item);
        else merged.push(item);
      }
      out[k] = merged;
    } else if (v && typeof v === "object" && !Array.isArray(v)) {
      out[k] = strategicMerge(out[k], v);
    } else {
      out[k] = v;
    }
  }
  return out;
}

function podSpecs(o: Obj): any[] {
  return o.spec?.template?.spec ? [o.spec.template.spec] : [];
}

function containers(o: Obj): any[] {
  return podSpecs(o).flatMap((s) => [...(s.initContainers ?? []), ...(s.containers ?? [])]);
}

/** `kustomize build dir`, for the features our kustomizations use; anything else fails the test. */
function kustomize(dir: string): Obj[] {
  const k = parseYaml(readFileSync(join(dir, "kustomization.yaml"), "utf8"));
  const known = new Set(["apiVersion", "kind", "namespace", "resources", "images", "patches", "configMapGenerator", "secretGenerator", "replacements"]);
  for (const key of Object.keys(k)) assert.ok(known.has(key), `${dir}: kustomization field ${key} is not emulated by this test`);
  let objs: Obj[] = [];
  for (const r of k.resources ?? []) {
    const p = resolve(dir, r);
    objs.push(...(statSync(p).isDirectory() ? kustomize(p) : parseDocs(readFileSync(p, "utf8"), p)));
  }
  for (const g of k.configMapGenerator ?? []) {
    const data: Record<string, string> = {};
    for (const f of g.files ?? []) data[basename(f)] = readFileSync(resolve(dir, f), "utf8");
    assert.equal(g.options?.disableNameSuffixHash, true, `${dir}: generated ConfigMaps keep stable names`);
    objs.push({ apiVersion: "v1", kind: "ConfigMap", metadata: { name: g.name, labels: g.options?.labels }, data });
  }
  for (const g of k.secretGenerator ?? []) {
    const data: Record<string, string> = {};
    for (const f of g.envs ?? [])
      for (const line of readFileSync(resolve(dir, f), "utf8").split("\n")) {
        const eq = line.indexOf("=");
        if (eq > 0 && !line.startsWith("#")) data[line.slice(0, eq)] = Buffer.from(line.slice(eq + 1)).toString("base64");
      }
    assert.equal(g.options?.disableNameSuffixHash, true, `${dir}: generated Secrets keep stable names`);
    objs.push({ apiVersion: "v1", kind: "Secret", metadata: { name: g.name, labels: g.options?.labels }, type: g.type, data });
  }
  for (const p of k.patches ?? []) {
    assert.ok(p.path && !p.target, `${dir}: only strategic-merge patches by path are emulated`);
    for (const doc of parseDocs(readFileSync(resolve(dir, p.path), "utf8"), p.path)) {
      const i = objs.findIndex((o) => o.kind === doc.kind && o.metadata.name === doc.metadata.name);
      assert.ok(i >= 0, `${dir}/${p.path}: patch target ${doc.kind}/${doc.metadata.name} not found`);
      objs[i] = strategicMerge(objs[i], doc);
    }
  }
  for (const img of k.images ?? []) {
    for (const o of objs)
      for (const c of containers(o)) {
        const [name, tag] = String(c.image).split(":");
        if (name === img.name) c.image = `${img.newName ?? name}:${img.newTag ?? tag}`;
      }
  }
  for (const r of k.replacements ?? []) replace(objs, r, dir);
  if (k.namespace) objs = objs.map((o) => ({ ...o, metadata: { ...o.metadata, namespace: k.namespace } }));
  return objs;
}

/** A kustomize field path (`a.b.[name=x].c`) into `o`: the parent object and the last key, or undefined. */
function fieldRef(o: any, path: string): { parent: any; key: string } | undefined {
  const parts = path.split(".");
  let cur = o;
  for (const [i, p] of parts.entries()) {
    const sel = /^\[(\w+)=(.+)\]$/.exec(p);
    if (i === parts.length - 1) return sel || cur == null ? undefined : { parent: cur, key: p };
    cur = sel ? (cur as any[] | undefined)?.find((x) => String(x?.[sel[1]]) === sel[2]) : cur?.[p];
  }
  return undefined;
}

/** kustomize `replacements`, for a source and targets selected by kind and name. */
function replace(objs: Obj[], r: any, dir: string): void {
  const pick = (sel: { kind: string; name: string }): Obj[] => objs.filter((o) => o.kind === sel.kind && o.metadata.name === sel.name);
  const [src] = pick(r.source);
  const from = src && fieldRef(src, r.source.fieldPath);
  assert.ok(from && from.parent[from.key] !== undefined, `${dir}: replacement source ${r.source.kind}/${r.source.name} ${r.source.fieldPath} not found`);
  for (const t of r.targets)
    for (const o of pick(t.select))
      for (const f of t.fieldPaths) {
        const to = fieldRef(o, f);
        assert.ok(to, `${dir}: replacement target ${f} not found`);
        to.parent[to.key] = from.parent[from.key];
      }
}

/** `kubectl kustomize dir` (the kustomize built into kubectl) when kubectl is installed; undefined otherwise. */
function realKustomize(dir: string): Obj[] | undefined {
  const r = spawnSync("kubectl", ["kustomize", dir], { encoding: "utf8" });
  if (r.error && (r.error as NodeJS.ErrnoException).code === "ENOENT") return undefined;
  assert.equal(r.status, 0, `kubectl kustomize ${dir} failed: ${r.stderr}`);
  return parseDocs(r.stdout, `kubectl kustomize ${dir}`);
}

// ---------------------------------------------------------------- invariants

const CPU_UNITS: Record<string, number> = { m: 1e-3, "": 1 };
const MEM_UNITS: Record<string, number> = { "": 1, k: 1e3, M: 1e6, G: 1e9, T: 1e12, Ki: 1024, Mi: 1024 ** 2, Gi: 1024 ** 3, Ti: 1024 ** 4 };
function quantity(q: string | number, units: Record<string, number>): number {
  const m = /^(\d+(?:\.\d+)?)([a-zA-Z]*)$/.exec(String(q));
  assert.ok(m && m[2] in units, `bad quantity ${q}`);
  return Number(m[1]) * units[m[2]];
}

function byKind(objs: Obj[], kind: string): Obj[] {
  return objs.filter((o) => o.kind === kind);
}

function component(o: Obj): string | undefined {
  return o.spec?.template?.metadata?.labels?.["app.kubernetes.io/component"];
}

function checkInvariants(objs: Obj[], where: string, expect: { gpus: number }): void {
  for (const o of objs) validate(o, where);
  const names = new Set(objs.map((o) => `${o.kind}/${o.metadata.name}`));
  assert.equal(names.size, objs.length, `${where}: duplicate objects`);

  // Workloads: non-root, restricted containers, requests + limits, probes.
  const workloads = objs.filter((o) => ["StatefulSet", "Job", "Deployment"].includes(o.kind));
  assert.deepEqual(workloads.map((w) => component(w)).sort(), ["coordinator", "nats", "worker"], `${where}: workloads`);
  for (const w of workloads) {
    const spec = podSpecs(w)[0];
    assert.equal(spec.securityContext?.runAsNonRoot, true, `${where}: ${w.metadata.name} pod must run as non-root`);
    assert.ok(spec.securityContext?.runAsUser > 0, `${where}: ${w.metadata.name} runAsUser must not be 0`);
    for (const c of containers(w)) {
      const id = `${where}: ${w.metadata.name}/${c.name}`;
      assert.notEqual(c.securityContext?.runAsNonRoot, false, id);
      assert.equal(c.securityContext?.allowPrivilegeEscalation, false, `${id}: allowPrivilegeEscalation`);
      assert.equal(c.securityContext?.readOnlyRootFilesystem, true, `${id}: readOnlyRootFilesystem`);
      assert.deepEqual(c.securityContext?.capabilities?.drop, ["ALL"], `${id}: capabilities`);
      for (const r of ["cpu", "memory"]) {
        assert.ok(c.resources?.requests?.[r], `${id}: requests.${r}`);
        assert.ok(c.resources?.limits?.[r], `${id}: limits.${r}`);
      }
      assert.ok(quantity(c.resources.limits.cpu, CPU_UNITS) >= quantity(c.resources.requests.cpu, CPU_UNITS), `${id}: cpu limit < request`);
      assert.ok(quantity(c.resources.limits.memory, MEM_UNITS) >= quantity(c.resources.requests.memory, MEM_UNITS), `${id}: memory limit < request`);
      // Every container here is long-running (the coordinator's Job runs for the whole training).
      assert.ok(c.livenessProbe, `${id}: livenessProbe`);
      assert.ok(c.startupProbe, `${id}: startupProbe`);
      if (w.kind === "StatefulSet") assert.ok(c.readinessProbe, `${id}: readinessProbe`);
      // $(VAR) in args expands only from env defined in the container.
      const env = new Set((c.env ?? []).map((e: { name: string }) => e.name));
      for (const a of [...(c.args ?? []), ...(c.command ?? [])])
        for (const [, v] of String(a).matchAll(/\$\(([A-Z_][A-Z0-9_]*)\)/g)) assert.ok(env.has(v), `${id}: $(${v}) in args but not in env`);
      // Secret and ConfigMap references resolve.
      for (const e of c.env ?? []) {
        const ref = e.valueFrom?.secretKeyRef;
        if (!ref) continue;
        const s = objs.find((o) => o.kind === "Secret" && o.metadata.name === ref.name);
        if (s) assert.ok(ref.key in (s.stringData ?? s.data ?? {}), `${id}: Secret ${ref.name} has no key ${ref.key}`);
        else assert.fail(`${id}: Secret ${ref.name} is not shipped`);
      }
    }
    for (const v of spec.volumes ?? []) {
      if (v.configMap) assert.ok(names.has(`ConfigMap/${v.configMap.name}`), `${where}: ConfigMap ${v.configMap.name} missing`);
    }
  }

  // Workers: GPU request as expected, metrics port, probes on it, cache emptyDir, no API token.
  const [worker] = workloads.filter((w) => component(w) === "worker");
  assert.equal(worker.kind, "StatefulSet");
  assert.equal(worker.spec.replicas, undefined, `${where}: the launcher owns the worker count`);
  assert.ok(names.has(`Service/${worker.spec.serviceName}`), `${where}: worker StatefulSet's serviceName has no Service`);
  const wspec = podSpecs(worker)[0];
  assert.equal(wspec.automountServiceAccountToken, false, `${where}: workers need no API access`);
  const [wc] = wspec.containers;
  if (expect.gpus > 0) {
    assert.equal(wc.resources.limits["nvidia.com/gpu"], String(expect.gpus), `${where}: GPU limit`);
    assert.equal(wc.resources.requests?.["nvidia.com/gpu"] ?? wc.resources.limits["nvidia.com/gpu"], String(expect.gpus), `${where}: GPU request`);
    assert.ok((wspec.tolerations ?? []).some((t: { key: string }) => t.key === "nvidia.com/gpu"), `${where}: GPU toleration`);
  } else {
    assert.equal(wc.resources.limits["nvidia.com/gpu"], undefined, `${where}: CPU workers must not ask for GPUs`);
  }
  assert.deepEqual(wc.ports.find((p: { name: string }) => p.name === "metrics"), { name: "metrics", containerPort: METRICS_PORT, protocol: "TCP" });
  assert.deepEqual(wc.livenessProbe.httpGet, { path: "/healthz", port: "metrics" }, `${where}: worker liveness`);
  assert.deepEqual(wc.readinessProbe.httpGet, { path: "/readyz", port: "metrics" }, `${where}: worker readiness`);
  const cacheMount = wc.volumeMounts.find((m: { mountPath: string }) => m.mountPath === "/cache");
  assert.ok(cacheMount, `${where}: cache mount`);
  assert.ok(wspec.volumes.find((v: { name: string }) => v.name === cacheMount.name)?.emptyDir, `${where}: cache is an emptyDir`);
  const wargs: string[] = wc.args;
  assert.equal(wargs[0], "worker");
  assert.equal(wargs[wargs.indexOf("--metrics-port") + 1], String(METRICS_PORT));
  // Only flags ctrain worker accepts: job options reach workers in the coordinator's spec.
  assert.doesNotThrow(() => parseWorkerArgs(wargs.slice(1), NATS_AUTH_FLAGS, {}), `${where}: ctrain worker accepts its pod's args ${wargs.join(" ")}`);
  assert.equal(wargs[wargs.indexOf("--nats") + 1], "nats://nats:4222", `${where}: no credentials in args`);
  assert.equal(wargs[wargs.indexOf("--metrics-host") + 1], "0.0.0.0", `${where}: metrics reachable on the pod IP, said explicitly`);
  const wenv = new Map<string, { secretKeyRef?: { key: string } }>(wc.env.map((e: { name: string; valueFrom?: { secretKeyRef?: { key: string } } }) => [e.name, e.valueFrom ?? {}]));
  assert.equal(wenv.get("CTRAIN_NATS_PASS")?.secretKeyRef?.key, "NATS_PASSWORD", `${where}: the password comes from the Secret as an env var`);
  assert.ok(!JSON.stringify(objs).includes("$(NATS_PASSWORD)"), `${where}: no password placeholder in any URL`);

  // Coordinator: a Job with the launcher's ServiceAccount, --launcher kubernetes.
  const [coord] = workloads.filter((w) => component(w) === "coordinator");
  assert.equal(coord.kind, "Job");
  const cargs: string[] = podSpecs(coord)[0].containers[0].args;
  assert.equal(cargs[0], "coordinator");
  assert.equal(cargs[cargs.indexOf("--launcher") + 1], "kubernetes");
  assert.equal(dnsName(cargs[cargs.indexOf("--job") + 1], 63), worker.spec.selector.matchLabels["ctrain.dev/job"], `${where}: coordinator job id = worker label`);
  const sa = podSpecs(coord)[0].serviceAccountName;
  assert.ok(names.has(`ServiceAccount/${sa}`), `${where}: coordinator ServiceAccount ${sa}`);

  // RBAC: exactly the launcher's calls, bound to the coordinator's ServiceAccount only.
  const roles = byKind(objs, "Role");
  assert.equal(roles.length, 1, `${where}: one Role`);
  assert.equal(byKind(objs, "ClusterRole").length + byKind(objs, "ClusterRoleBinding").length, 0, `${where}: no cluster-wide rights`);
  assert.deepEqual(roles[0].rules, LAUNCHER_RBAC_RULES, `${where}: Role rules = the launcher's calls`);
  const [binding] = byKind(objs, "RoleBinding");
  assert.deepEqual(binding.roleRef, { apiGroup: "rbac.authorization.k8s.io", kind: "Role", name: roles[0].metadata.name });
  assert.deepEqual(binding.subjects.map((s: { kind: string; name: string }) => `${s.kind}/${s.name}`), [`ServiceAccount/${sa}`]);
  const ns = coord.metadata.namespace;
  if (ns) assert.equal(binding.subjects[0].namespace, ns, `${where}: RoleBinding subject namespace`);

  // PodMonitor selects both the workers and the coordinator, on a port named metrics they both have.
  const [pm] = byKind(objs, "PodMonitor");
  assert.ok(pm, `${where}: PodMonitor`);
  for (const w of [worker, coord]) {
    const labels = w.spec.template.metadata.labels;
    for (const [k, v] of Object.entries(pm.spec.selector.matchLabels)) assert.equal(labels[k], v, `${where}: PodMonitor misses ${w.metadata.name} (${k})`);
    for (const e of pm.spec.podMetricsEndpoints)
      assert.ok(podSpecs(w)[0].containers[0].ports.some((p: { name: string }) => p.name === e.port), `${where}: ${w.metadata.name} has no port ${e.port}`);
  }

  // NATS: JetStream on a claimed volume, default max_payload, headless + client Services.
  const [nats] = workloads.filter((w) => component(w) === "nats");
  assert.equal(nats.spec.volumeClaimTemplates?.length, 1, `${where}: NATS volumeClaimTemplate`);
  assert.ok(names.has(`Service/${nats.spec.serviceName}`), `${where}: NATS headless Service`);
  assert.equal(objs.find((o) => o.kind === "Service" && o.metadata.name === nats.spec.serviceName)!.spec.clusterIP, "None");
  assert.ok(names.has("Service/nats"), `${where}: NATS client Service (nats://nats:4222)`);
  const conf: string = objs.find((o) => o.kind === "ConfigMap" && o.metadata.name === "nats-config")!.data["nats.conf"];
  assert.match(conf, /jetstream\s*\{[^}]*store_dir:\s*\/data/);
  assert.match(conf, /max_payload:\s*1048576\b/);
  assert.match(conf, /authorization\s*\{[^}]*\$NATS_PASSWORD/);
}

// ---------------------------------------------------------------- tests

const JOB = ["--workers", "4", "--data", "/data/images", "--nats", "nats://nats:4222", "--job", "demo-job"];

test("k8s - rendered GPU manifests validate against the Kubernetes schemas and keep every invariant", () => {
  const objs = renderOk([...JOB, "--image", "ctrain:0.1.0-gpu", "--gpus-per-worker", "1", "--namespace", "ml", "--data-claim", "images"]);
  assert.ok(objs.length >= 13, `expected every object, got ${objs.length}`);
  for (const o of objs) assert.equal(o.metadata.namespace, "ml", `${o.kind}/${o.metadata.name} namespace`);
  checkInvariants(objs, "render gpu", { gpus: 1 });
  const job = objs.find((o) => o.kind === "Job")!;
  const args: string[] = job.spec.template.spec.containers[0].args;
  for (const [flag, value] of [["--workers", "4"], ["--data", "/data/images"], ["--job", "demo-job"], ["--out", "/out/demo-job"]])
    assert.equal(args[args.indexOf(flag) + 1], value, flag);
  const worker = objs.find((o) => o.kind === "StatefulSet" && o.metadata.name === "demo-job-worker")!;
  assert.equal(worker.spec.template.spec.containers[0].image, "ctrain:0.1.0-gpu");
  assert.ok(worker.spec.template.spec.volumes.some((v: any) => v.persistentVolumeClaim?.claimName === "images" && v.persistentVolumeClaim.readOnly));
  const secret = objs.find((o) => o.kind === "Secret")!;
  assert.match(secret.stringData.NATS_PASSWORD, /^[0-9a-f]{48}$/, "a random password, not a placeholder");
});

test("k8s - rendered CPU manifests from a --config file validate and ask for no GPU", () => {
  const dir = mkdtempSync(join(tmpdir(), "ctrain-k8s-"));
  try {
    const file = join(dir, "job.yaml");
    writeFileSync(file, "data: fashion-mnist\nworkers: 3\nnats: nats://nats:4222\njob: From_Config\nepochs: 5\ninput-size: 128\n");
    const objs = renderOk(["--config", file, "--image", "ctrain:0.1.0-cpu", "--namespace", "default", "--no-secret", "--no-dashboard"]);
    checkInvariants([...objs, { apiVersion: "v1", kind: "Secret", metadata: { name: "nats-credentials" }, stringData: { NATS_USER: "u", NATS_PASSWORD: "p" } }], "render cpu", { gpus: 0 });
    assert.equal(objs.filter((o) => o.kind === "Secret").length, 0, "--no-secret");
    const worker = objs.find((o) => o.kind === "StatefulSet" && o.metadata.name === "from-config-worker");
    assert.ok(worker, "job ids become DNS names");
    const cargs: string[] = objs.find((o) => o.kind === "Job")!.spec.template.spec.containers[0].args;
    assert.deepEqual(cargs.slice(cargs.indexOf("--epochs"), cargs.indexOf("--epochs") + 2), ["--epochs", "5"]);
    assert.deepEqual(cargs.slice(cargs.indexOf("--input-size"), cargs.indexOf("--input-size") + 2), ["--input-size", "128"]);
    assert.equal(cargs[cargs.indexOf("--workers") + 1], "3");
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test("k8s - render refuses bad flags with a ConfigError and exit code 2", () => {
  const cases: [string[], RegExp][] = [
    [[...JOB, "--gpus-per-worker", "1"], /--image is required/],
    [[...JOB, "--image", "x", "--gpus-per-worker", "1.5"], /--gpus-per-worker must be a whole number/],
    [[...JOB, "--image", "x", "--namespace", "Bad_NS"], /--namespace "Bad_NS" must be a DNS label/],
    [[...JOB, "--image", "x", "--workrs", "2"], /Unknown option --workrs\. Did you mean --workers\?/],
    [["--workers", "2", "--image", "x"], /--nats is required/],
    [[...JOB, "--image", "x", "--nats-storage", "lots"], /--nats-storage must be a size/],
    [[...JOB, "--image", "x", "--epochs", "0"], /--epochs .* must be between 1/],
  ];
  for (const [args, re] of cases) {
    const r = render(args);
    assert.equal(r.code, 2, `${args.join(" ")}: exit code (stderr: ${r.stderr})`);
    assert.match(r.stderr, /ConfigError/, args.join(" "));
    assert.match(r.stderr, re, args.join(" "));
    assert.doesNotMatch(r.stderr, /\n\s+at /, "no stack trace for a user error");
    assert.equal(r.stdout, "", "nothing on stdout");
  }
});

test("k8s - every shipped YAML document under deploy/k8s parses, and complete objects validate", () => {
  const files: string[] = [];
  const walk = (d: string): void => {
    for (const f of readdirSync(d)) {
      const p = join(d, f);
      if (statSync(p).isDirectory()) walk(p);
      else if (/\.ya?ml$/.test(f)) files.push(p);
    }
  };
  walk(K8S_DIR);
  assert.ok(files.length >= 10, `found ${files.length} YAML files`);
  let validated = 0;
  for (const f of files) {
    const docs = parseDocs(readFileSync(f, "utf8"), f);
    assert.ok(docs.length > 0, `${f} is empty`);
    if (basename(f) === "kustomization.yaml" || f.includes(`${join("k8s", "overlays")}`)) continue; // patches are partial
    for (const d of docs) { validate(d, f); validated++; }
  }
  assert.ok(validated >= 12, `validated ${validated} base objects`); // the Secret is generated (secretGenerator), not a file
});

for (const [overlay, gpus] of [["gpu", 1], ["cpu", 0], ["dev", 0]] as const) {
  test(`k8s - overlay ${overlay} builds (kustomize emulated), validates and keeps every invariant`, () => {
    {
      const objs = kustomize(join(K8S_BUILD, "overlays", overlay));
      for (const o of objs) assert.equal(o.metadata.namespace, "ctrain");
      checkInvariants(objs, `overlay ${overlay}`, { gpus });
      const dash = objs.find((o) => o.kind === "ConfigMap" && o.metadata.name === "ctrain-grafana-dashboard");
      assert.ok(dash, "dashboard ConfigMap from the configMapGenerator");
      assert.equal(dash.metadata.labels?.grafana_dashboard, "1");
      JSON.parse(dash.data["ctrain-dashboard.json"]);
      const images = new Set(objs.flatMap(containers).map((c) => c.image).filter((i) => !i.startsWith("nats:")));
      assert.equal(images.size, 1, `one ctrain image: ${[...images]}`);
      const image = [...images][0];
      assert.notEqual(image, "ctrain", "overlay pins a tag");
      const coord = objs.find((o) => o.kind === "Job")!;
      const env = coord.spec.template.spec.containers[0].env;
      assert.equal(env.find((e: { name: string }) => e.name === "CTRAIN_IMAGE").value, image, "launcher creates workers with the same image");
      assert.equal(env.find((e: { name: string }) => e.name === "CTRAIN_GPUS_PER_WORKER").value, String(gpus));
    }
  });

  test(`k8s - overlay ${overlay} builds with the real kustomize (kubectl kustomize, default load restrictor) into what the emulation builds`, (t) => {
    const dir = join(K8S_BUILD, "overlays", overlay);
    const real = realKustomize(dir);
    if (!real) return t.skip("kubectl is not installed: the emulated build above is the check");
    const key = (o: Obj): string => `${o.kind}/${o.metadata.namespace}/${o.metadata.name}`;
    // Strategic merge puts patched list items first; the order of keyed lists (env, volumes...) means nothing.
    const norm = (v: any): any => {
      if (Array.isArray(v)) {
        const items = v.map(norm);
        const mk = ["name", "mountPath", "containerPort"].find((k) => items.length > 0 && items.every((i) => i && typeof i === "object" && k in i));
        return mk ? items.sort((a, b) => String(a[mk]).localeCompare(String(b[mk]))) : items;
      }
      return v && typeof v === "object" ? Object.fromEntries(Object.entries(v).map(([k, x]) => [k, norm(x)])) : v;
    };
    const emulated = kustomize(dir);
    assert.deepEqual(real.map(key).sort(), emulated.map(key).sort());
    for (const o of real) {
      validate(o, `kubectl kustomize ${overlay}`);
      assert.deepEqual(norm(o), norm(emulated.find((e) => key(e) === key(o))), `${key(o)}: the emulation differs from kustomize`);
    }
  });
}

test("k8s - renaming the image in an overlay (images: newName/newTag) renames CTRAIN_IMAGE too", () => {
  const k8s = deployCopy();
  {
    for (const overlay of ["gpu", "cpu", "dev"]) {
      const dir = join(k8s, "overlays", overlay);
      const file = join(dir, "kustomization.yaml");
      writeFileSync(file, readFileSync(file, "utf8").replace(/newName: ctrain\n\s+newTag: \S+/, "newName: registry.example/ml/ctrain\n    newTag: \"7.1\""));
      for (const [how, objs] of [["emulated", kustomize(dir)], ["kubectl kustomize", realKustomize(dir)]] as const) {
        if (!objs) continue;
        const c = objs.find((o) => o.kind === "Job")!.spec.template.spec.containers[0];
        assert.equal(c.image, "registry.example/ml/ctrain:7.1", `${overlay} (${how})`);
        assert.equal(c.env.find((e: { name: string }) => e.name === "CTRAIN_IMAGE").value, c.image, `${overlay} (${how}): the launcher starts workers from the renamed image`);
      }
    }
  }
});

test("k8s - no password ships: the overlays refuse to build without nats-credentials.env", () => {
  const k8s = deployCopy(false);
  for (const overlay of ["gpu", "cpu", "dev"]) {
    const dir = join(k8s, "overlays", overlay);
    assert.throws(() => kustomize(dir), /nats-credentials\.env/, `${overlay} (emulated)`);
    const r = spawnSync("kubectl", ["kustomize", dir], { encoding: "utf8" });
    if (r.error) continue; // no kubectl: the emulation is the check
    assert.notEqual(r.status, 0, `${overlay}: kubectl kustomize built without credentials`);
    assert.match(r.stderr, /nats-credentials\.env/);
  }
  const shipped = readdirSync(join(K8S_DIR, "base")).flatMap((f) => (/\.ya?ml$/.test(f) ? parseDocs(readFileSync(join(K8S_DIR, "base", f), "utf8"), f) : []));
  assert.deepEqual(shipped.filter((o) => o.kind === "Secret").map((o) => o.metadata.name), [], "no Secret with a password in the base");
});

test("k8s - the schema check rejects a malformed object", () => {
  const [sts] = renderOk([...JOB, "--image", "x", "--no-dashboard"]).filter((o) => o.kind === "StatefulSet" && o.metadata.name !== "nats");
  const bad = structuredClone(sts);
  bad.spec.template.spec.containers[0].resources.limits.cpu = { cores: 2 };
  assert.throws(() => validate(bad, "bad"), /does not match the Kubernetes schema/);
  const noSelector = structuredClone(sts);
  delete noSelector.spec.selector;
  assert.throws(() => validate(noSelector, "bad"), /selector/);
});

test("k8s - the kustomize base holds the same objects as ctrain k8s render", () => {
  const all = renderOk(["--job", "ctrain", "--workers", "2", "--nats", "nats://nats:4222", "--image", "ctrain", "--namespace", "ctrain", "--no-dashboard"]);
  const rendered = all.filter((o) => o.kind !== "Secret");
  const base = parseYaml(readFileSync(join(K8S_DIR, "base", "kustomization.yaml"), "utf8"));
  const files = (base.resources as string[]).filter((f) => f.endsWith(".yaml")); // ../../grafana: the dashboard kustomization
  const shipped = files.flatMap((f) => parseDocs(readFileSync(join(K8S_DIR, "base", f), "utf8"), f));
  const strip = (o: Obj): Obj => {
    const c = structuredClone(o);
    delete c.metadata.namespace;
    if (c.kind === "Secret") c.stringData = { ...c.stringData, NATS_PASSWORD: "x" };
    return c;
  };
  const key = (o: Obj): string => `${o.kind}/${o.metadata.name}`;
  assert.deepEqual(shipped.map(key).sort(), rendered.map(key).sort());
  for (const r of rendered) assert.deepEqual(strip(shipped.find((s) => key(s) === key(r))!), strip(r), `${key(r)} drifted from the renderer`);
  // The Secret comes from the base's secretGenerator: same name, labels, type and keys as rendered.
  const secret = all.find((o) => o.kind === "Secret")!;
  const [gen] = base.secretGenerator as { name: string; type: string; options: { labels: Record<string, string> } }[];
  assert.equal(gen.name, secret.metadata.name);
  assert.equal(gen.type, secret.type);
  assert.deepEqual(gen.options.labels, secret.metadata.labels);
  const built = kustomize(join(K8S_BUILD, "base")).find((o) => o.kind === "Secret")!;
  assert.deepEqual(Object.keys(built.data).sort(), Object.keys(secret.stringData).sort());
});

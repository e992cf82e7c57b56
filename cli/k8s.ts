/**
 * `ctrain k8s render`: every Kubernetes object of a job as multi-document YAML on stdout, ready for
 * `kubectl apply -f -`. The job options are the same as for `ctrain run` (flags or --config); the
 * manifests come from coordinator/k8s_manifests.ts, which the Kubernetes launcher uses too.
 */
import { existsSync, readFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { loadOptions, optionsHelp, parseArgs, checkEnvironment, envHelp } from "../core/runtime/config.js";
import { ConfigError } from "../core/runtime/errors.js";
import { buildManifests, toYaml, type RenderOptions } from "../coordinator/k8s_manifests.js";

const RENDER_FLAGS = ["image", "gpus-per-worker", "namespace", "data-claim", "nats-image", "nats-storage", "cache-size", "dashboard"] as const;
const RENDER_BOOLEANS = ["no-secret", "no-dashboard", "help"] as const;

function help(): string {
  return `usage: ctrain k8s render --image IMAGE [--gpus-per-worker N] [--namespace NS] [job options | --config job.yaml]

Prints every Kubernetes object of the job (NATS with JetStream, RBAC, coordinator Job, worker
StatefulSet, PodMonitor, Grafana dashboard ConfigMap) as YAML:  ctrain k8s render ... | kubectl apply -f -

render options:
  --image IMAGE              ctrain container image (built from deploy/docker) [required]
  --gpus-per-worker N        nvidia.com/gpu per worker pod; 0 = CPU workers [default 0]
  --namespace NS             namespace of every object [default "default"]
  --data-claim PVC           PersistentVolumeClaim with the data set, mounted read-only at /data
  --nats-image IMAGE         NATS server image [default "nats:2.10.22-alpine"]
  --nats-storage SIZE        JetStream volume size [default "10Gi"]
  --cache-size SIZE          size limit of a worker's feature cache (emptyDir) [default "20Gi"]
  --dashboard FILE           Grafana dashboard JSON [default deploy/grafana/ctrain-dashboard.json when present]
  --no-dashboard             leave the dashboard ConfigMap out
  --no-secret                leave the NATS Secret out (it exists already; otherwise a random password is rendered)

Inside pods --metrics-port is 9400, --cache-dir /cache, --out /out/<job> and --log-format json,
whatever is given; --nats is required (e.g. nats://nats:4222) and gets the Secret's credentials.

job options:
${optionsHelp()}

environment:
${envHelp("k8s")}`;
}

function defaultDashboard(): string | undefined {
  // dist/cli/k8s.js -> repository (or image) root.
  const root = join(dirname(fileURLToPath(import.meta.url)), "..", "..");
  const file = join(root, "deploy", "grafana", "ctrain-dashboard.json");
  return existsSync(file) ? file : undefined;
}

function intFlag(name: string, raw: string | true | undefined, def: number): number {
  if (raw === undefined) return def;
  const n = typeof raw === "string" && /^\d+$/.test(raw.trim()) ? Number(raw) : NaN;
  if (!Number.isInteger(n)) throw new ConfigError(`--${name} must be a whole number, got ${JSON.stringify(raw)}.`);
  return n;
}

function strFlag(extra: Record<string, string | true>, name: string): string | undefined {
  const v = extra[name];
  return v === true ? undefined : v;
}

export async function main(argv: string[]): Promise<number> {
  const [sub, ...rest] = argv;
  if (!sub || sub === "--help" || sub === "-h" || sub === "help") {
    console.log(help());
    return sub ? 0 : 2;
  }
  if (sub !== "render") throw new ConfigError(`Unknown k8s command '${sub}'. Use 'ctrain k8s render'.`);
  const parsed = parseArgs(rest, RENDER_FLAGS, RENDER_BOOLEANS);
  if (parsed.extra.help) {
    console.log(help());
    return 0;
  }
  if (parsed.positionals.length > 0) throw new ConfigError(`Unexpected argument ${JSON.stringify(parsed.positionals[0])}; options start with --.`);
  checkEnvironment("k8s");
  const opts = loadOptions(parsed);
  const image = strFlag(parsed.extra, "image");
  if (!image) throw new ConfigError("--image is required (a container image built from deploy/docker/Dockerfile.gpu or Dockerfile.cpu).");
  const dashboardFile = parsed.extra["no-dashboard"] ? undefined : strFlag(parsed.extra, "dashboard") ?? defaultDashboard();
  let dashboardJson: string | undefined;
  if (dashboardFile) {
    try {
      dashboardJson = readFileSync(dashboardFile, "utf8");
      JSON.parse(dashboardJson);
    } catch (cause) {
      throw new ConfigError(`--dashboard ${dashboardFile}: not a readable JSON file (${(cause as Error).message}).`, { cause });
    }
  } else if (!parsed.extra["no-dashboard"]) {
    console.error("ctrain k8s render: no Grafana dashboard found (deploy/grafana/ctrain-dashboard.json); rendering without it.");
  }
  const render: RenderOptions = {
    image,
    namespace: strFlag(parsed.extra, "namespace") ?? "default",
    gpusPerWorker: intFlag("gpus-per-worker", parsed.extra["gpus-per-worker"], 0),
    dataClaim: strFlag(parsed.extra, "data-claim"),
    natsImage: strFlag(parsed.extra, "nats-image"),
    natsStorage: strFlag(parsed.extra, "nats-storage"),
    cacheSize: strFlag(parsed.extra, "cache-size"),
    omitSecret: Boolean(parsed.extra["no-secret"]),
    dashboardJson,
  };
  process.stdout.write(toYaml(buildManifests(opts, render)));
  return 0;
}

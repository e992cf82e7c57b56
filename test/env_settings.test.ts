/**
 * Every environment variable ctrain reads is a row of an option table (core/runtime/config.ts): a job
 * option's `env`, the worker table's, or an environment-only setting. This reads the source for every
 * `env.NAME` and `envSetting("NAME")`-style read, so a new variable read deep in a module without a
 * row -- invisible in `--help`, never validated -- fails here.
 */
import assert from "node:assert/strict";
import { readdirSync, readFileSync, statSync } from "node:fs";
import { dirname, join, relative, resolve } from "node:path";
import { test } from "node:test";
import { fileURLToPath } from "node:url";
import { checkEnvironment, ENV_SETTINGS, envOptions, envString, OPTION_SPECS, WORKER_OPTION_SPECS } from "../core/runtime/config.js";
import { FASHION_MNIST_DIR } from "../core/datasets/open.js";
import { ConfigError } from "../core/runtime/errors.js";
import { envName, NATS_AUTH_FLAGS } from "../core/runtime/nats_connect.js";

const ROOT = resolve(dirname(fileURLToPath(import.meta.url)), "..", "..");
/** Set by the system, not by a user: Kubernetes' in-cluster marker and the search path. */
const NOT_SETTINGS = new Set(["KUBERNETES_SERVICE_HOST", "PATH"]);

function sources(dir: string): string[] {
  return readdirSync(dir).flatMap((name) => {
    const p = join(dir, name);
    if (statSync(p).isDirectory()) return sources(p);
    return name.endsWith(".ts") ? [p] : [];
  });
}

function tableNames(): Set<string> {
  const rows = [...OPTION_SPECS, ...WORKER_OPTION_SPECS] as readonly { env?: string }[];
  return new Set([...ENV_SETTINGS.map((e) => e.name), ...rows.flatMap((r) => (r.env ? [r.env] : []))]);
}

test("env settings - every variable the source reads has a row in an option table", () => {
  const known = tableNames();
  const missing: string[] = [];
  let reads = 0;
  for (const folder of ["core", "proto", "worker", "coordinator", "cli"]) {
    for (const file of sources(join(ROOT, folder))) {
      const text = readFileSync(file, "utf8");
      const found = [
        ...text.matchAll(/\benv\.([A-Z][A-Z0-9_]+)/g),
        ...text.matchAll(/\benv\[\s*"([A-Z][A-Z0-9_]+)"\s*\]/g),
        ...text.matchAll(/\benv(?:Setting|String|Int)\(\s*"([A-Z][A-Z0-9_]+)"/g),
      ].map((m) => m[1]!);
      for (const name of found) {
        reads++;
        if (!known.has(name) && !NOT_SETTINGS.has(name)) missing.push(`${relative(ROOT, file)} reads ${name}`);
      }
    }
  }
  for (const flag of NATS_AUTH_FLAGS) if (!known.has(envName(flag))) missing.push(`nats_connect.ts reads ${envName(flag)} (for --${flag})`);
  assert.ok(reads > 10, `only ${reads} reads found: the scan is broken`);
  assert.deepEqual(missing, []);
});

test("env settings - a bad value is refused naming the variable; an unset one gives the default", () => {
  assert.throws(() => envOptions({ CTRAIN_DP_STEP_TIMEOUT_MS: "soon" }), (e: unknown) => e instanceof ConfigError && /--step-timeout-ms \(environment CTRAIN_DP_STEP_TIMEOUT_MS\) must be a number, got "soon"/.test(e.message));
  assert.throws(() => envOptions({ CTRAIN_DP_CHECKSUM_EVERY: "-1" }), /CTRAIN_DP_CHECKSUM_EVERY\) must be between 0 and/);
  assert.deepEqual(envOptions({ CTRAIN_DP_CHECKPOINT_EVERY: "5" }), { checkpointEvery: 5 });
  assert.throws(() => checkEnvironment("run", { CTRAIN_LOG_LEVEL: "loud" }), /environment CTRAIN_LOG_LEVEL must be one of debug, info, warn, error; got "loud"/);
  assert.throws(() => checkEnvironment("worker", { CTRAIN_WORKER_MEMORY_BYTES: "lots" }), /environment CTRAIN_WORKER_MEMORY_BYTES must be a whole number/);
  assert.throws(() => checkEnvironment("coordinator", { CTRAIN_GPUS_PER_WORKER: "1.5" }), /CTRAIN_GPUS_PER_WORKER/);
  // A setting another command reads is not this command's business.
  checkEnvironment("predict", { CTRAIN_DP_STEP_TIMEOUT_MS: "soon", CTRAIN_WORKER_MEMORY_BYTES: "lots" });
  assert.equal(envString("CTRAIN_FASHION_MNIST_DIR", {}), undefined);
  assert.equal(ENV_SETTINGS.find((e) => e.name === "CTRAIN_FASHION_MNIST_DIR")?.default, FASHION_MNIST_DIR, "--help shows the default open.ts uses");
});

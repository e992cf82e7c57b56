/**
 * The Node version decision and the images' installs (issue 16 items 10, 11). ctrain supports and is
 * tested on Node 20 (package.json engines `>=20`, the images' node:20): every package installed for
 * running it accepts that Node, except the ones listed below with why they work anyway; set-up and
 * image builds install the lockfile's tree with `npm ci`, quietly.
 */
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { test } from "node:test";

const ROOT = fileURLToPath(new URL("../../", import.meta.url));
const read = (p: string): string => readFileSync(join(ROOT, p), "utf8");

/** Runtime packages whose `engines.node` excludes Node 20, and why ctrain runs them on Node 20 anyway. */
const ACCEPTED: Record<string, string> = {
  "node_modules/nsfwjs": "declares exactly 22.13.0 (its own build's Node); ctrain loads only its bundled MobileNetV2 weights and model JSON, plain files read by tfjs",
};

type Semver = [number, number, number];
const parse = (v: string): Semver => {
  const [a = "0", b = "0", c = "0"] = v.replace(/^v/, "").split(".");
  return [Number(a), b === "x" ? 0 : Number(b), c === "x" ? 0 : Number(c)];
};
const cmp = (a: Semver, b: Semver): number => a[0] - b[0] || a[1] - b[1] || a[2] - b[2];

/** Whether the npm range `range` (the forms engines fields use: >=, >, <, <=, ^, ~, x, exact, ||) allows `version`. */
export function allows(range: string, version: string): boolean {
  const v = parse(version);
  return range.split("||").some((set) => {
    const parts = set.trim().replace(/\.\*/g, ".x").replace(/(>=|<=|>|<|=)\s+/g, "$1").split(/\s+/).filter(Boolean);
    return parts.every((p) => {
      if (p === "*" || p === "x") return true;
      const m = /^(>=|<=|>|<|\^|~|=)?(\d+(?:\.(?:\d+|x))?(?:\.(?:\d+|x))?)$/.exec(p);
      assert.ok(m, `cannot read the range ${JSON.stringify(range)}`);
      const [op = "", ver] = [m[1], m[2]];
      const w = parse(ver);
      const given = ver.split(".").length;
      switch (op) {
        case ">=": return cmp(v, w) >= 0;
        case ">": return cmp(v, w) > 0;
        case "<=": return cmp(v, w) <= 0;
        case "<": return cmp(v, w) < 0;
        case "^": return cmp(v, w) >= 0 && v[0] === w[0];
        case "~": return cmp(v, w) >= 0 && v[0] === w[0] && v[1] === w[1];
        default: return given < 3 || ver.includes("x") ? v[0] === w[0] && (given < 2 || ver.split(".")[1] === "x" || v[1] === w[1]) : cmp(v, w) === 0;
      }
    });
  });
}

test("node version - the range reader agrees with npm on the forms engines use", () => {
  for (const [range, version, ok] of [[">=20", "20.1.0", true], [">=22", "20.20.2", false], ["22.13.0", "20.20.2", false], ["^18.17.0 || >=20.5.0", "20.20.2", true],
    [">= 10.16.0", "20.0.0", true], ["6.* || 8.* || >= 10.*", "20.0.0", true], ["6.* || 8.*", "20.0.0", false], ["^14 || ^16", "20.0.0", false], ["20.x", "20.3.1", true], [">=14 <21", "20.0.0", true], ["~20.1.0", "20.2.0", false]] as const)
    assert.equal(allows(range, version), ok, `${range} vs ${version}`);
});

test("node version - package.json, the images and this Node agree on Node 20", () => {
  const pkg = JSON.parse(read("package.json")) as { engines: { node: string } };
  assert.equal(pkg.engines.node, ">=20");
  assert.ok(allows(pkg.engines.node, process.versions.node), `this Node ${process.versions.node}`);
  for (const f of ["deploy/docker/Dockerfile.cpu", "deploy/docker/Dockerfile.gpu"]) assert.match(read(f), /^ARG NODE_IMAGE=node:20-/m, `${f} builds on the Node that is tested`);
});

test("node version - every runtime package accepts Node 20, or is listed with why it works", () => {
  const lock = JSON.parse(read("package-lock.json")) as { packages: Record<string, { engines?: { node?: string } | string[]; dev?: boolean }> };
  const refused: string[] = [];
  for (const [path, p] of Object.entries(lock.packages)) {
    const range = !Array.isArray(p.engines) ? p.engines?.node : undefined;
    if (!path || p.dev || !range) continue; // dev packages never reach a run or an image
    if (!allows(range, "20.0.0") && !allows(range, process.versions.node) && !ACCEPTED[path]) refused.push(`${path} (node ${range})`);
  }
  assert.deepEqual(refused, [], "runtime packages that refuse Node 20: upgrade ctrain's Node (package.json, images, README) or list them in ACCEPTED with why they work");
  for (const path of Object.keys(ACCEPTED)) assert.ok(lock.packages[path], `${path} is still installed`);
});

test("node version - set-up and both images install the lockfile with npm ci, quietly", () => {
  const setup = read("scripts/setup.sh");
  assert.match(setup, /^\s*npm ci --omit=optional .*--loglevel=error/m, "set-up: npm ci, warnings (EBADENGINE) quiet");
  for (const f of ["deploy/docker/Dockerfile.cpu", "deploy/docker/Dockerfile.gpu"]) {
    const text = read(f).split("\n").filter((l) => !l.trimStart().startsWith("#")).join("\n");
    assert.match(text, /\bnpm ci\b[^\n]*--loglevel=error/, `${f} runs npm ci`);
    assert.doesNotMatch(text, /\bnpm (install|i)\b/, `${f}: npm install does not apply the lockfile`);
    assert.doesNotMatch(text, /npm pkg delete/, `${f}: package.json must keep matching the lockfile`);
  }
});

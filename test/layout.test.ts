/**
 * The layout is the architecture (../shared/STYLE.md): proto/ is the wire contract, core/ knows no
 * role, coordinator/ and worker/ are roles that meet only through core/ and proto/. A role that
 * imports the other would ship the coordinator's code in every worker image and tie their
 * versions together; this test reads every import of the source tree and refuses such an edge.
 */
import assert from "node:assert/strict";
import { readdirSync, readFileSync, statSync } from "node:fs";
import { dirname, join, relative, resolve, sep } from "node:path";
import { test } from "node:test";
import { fileURLToPath } from "node:url";

const ROOT = resolve(dirname(fileURLToPath(import.meta.url)), "..", "..");
/** What each top-level folder may import (besides itself and npm packages). */
const ALLOWED: Record<string, readonly string[]> = {
  // core/ is the base and knows nothing above it; proto/ (the wire contract) builds on core/ (errors,
  // checkpoint blobs); neither may import a role.
  proto: ["core"],
  core: [],
  // The roles meet only through core/ and proto/; cli/ builds the cluster (executor, trainer, workers)
  // and hands it to the coordinator, so the coordinator never needs the worker's code.
  worker: ["core", "proto"],
  coordinator: ["core", "proto"],
  cli: ["core", "proto", "worker", "coordinator"],
};

function sources(dir: string): string[] {
  return readdirSync(dir).flatMap((name) => {
    const p = join(dir, name);
    if (statSync(p).isDirectory()) return sources(p);
    return name.endsWith(".ts") ? [p] : [];
  });
}

/** Relative module specifiers of a file's import/export ... from, side-effect import and dynamic import(). */
function importsOf(file: string): string[] {
  const text = readFileSync(file, "utf8");
  const out: string[] = [];
  for (const m of text.matchAll(/(?:^|\n)\s*(?:import|export)\s[^;]*?from\s+"(\.[^"]+)"/g)) out.push(m[1]!);
  for (const m of text.matchAll(/(?:^|\n)\s*import\s+"(\.[^"]+)"/g)) out.push(m[1]!);
  for (const m of text.matchAll(/import\(\s*"(\.[^"]+)"\s*\)/g)) out.push(m[1]!);
  return out;
}

test("layout - core/ and proto/ know no role; no role imports another role", () => {
  const bad: string[] = [];
  let edges = 0;
  for (const [folder, allowed] of Object.entries(ALLOWED)) {
    for (const file of sources(join(ROOT, folder))) {
      for (const spec of importsOf(file)) {
        const target = relative(ROOT, resolve(dirname(file), spec)).split(sep)[0]!;
        edges++;
        if (target !== folder && !allowed.includes(target)) bad.push(`${relative(ROOT, file)} imports ${spec} (${folder}/ may import ${allowed.join(", ") || "nothing else"})`);
      }
    }
  }
  assert.ok(edges > 100, `only ${edges} imports found: the scan is broken`);
  assert.deepEqual(bad, []);
});

test("layout - only proto/ names NATS subjects, streams, KV keys and objects", () => {
  // A string or template literal that starts like a subject, a JetStream/KV/object-store name, or a
  // key of the job's state KV. (`ctrain.dev/` is a Kubernetes label prefix, not a subject.)
  const inline = /[`"'](\$JS\.|\$KV\.|\$O\.|KV_|OBJ_|ctrain\.(?!dev\/)|ft\.|spec\.|error\.|failed\.|retry\.)/;
  const bad: string[] = [];
  let files = 0;
  for (const folder of ["core", "coordinator", "worker", "cli"]) {
    for (const file of sources(join(ROOT, folder))) {
      files++;
      readFileSync(file, "utf8").split("\n").forEach((line, i) => {
        if (inline.test(line.replace(/^\s*(\*|\/\/).*$/, "").replace(/\/\/.*$/, ""))) bad.push(`${relative(ROOT, file)}:${i + 1}: ${line.trim().slice(0, 100)}`);
      });
    }
  }
  assert.ok(files > 50, `only ${files} files scanned`);
  assert.deepEqual(bad, [], "build NATS names with proto/subjects.ts, extraction_wire.ts or training_wire.ts");
});

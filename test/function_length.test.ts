/**
 * Issue 13's rule, kept: no function over 80 lines in the roles and the wire contract (coordinator/,
 * worker/, proto/), where correctness is hardest and a long closure-laden function cannot be unit
 * tested. Functions are found with the TypeScript parser; a body's length counts from its first
 * line to its closing brace.
 */
import assert from "node:assert/strict";
import { readdirSync, readFileSync, statSync } from "node:fs";
import { dirname, join, relative, resolve } from "node:path";
import { test } from "node:test";
import { fileURLToPath } from "node:url";
import ts from "typescript";

const ROOT = resolve(dirname(fileURLToPath(import.meta.url)), "..", "..");
const MAX_LINES = 80;

function sources(dir: string): string[] {
  return readdirSync(dir).flatMap((name) => {
    const p = join(dir, name);
    if (statSync(p).isDirectory()) return sources(p);
    return name.endsWith(".ts") ? [p] : [];
  });
}

/** Every function, method, arrow function and accessor with a body, with its length in lines. */
function functionLengths(file: string): { name: string; line: number; lines: number }[] {
  const sf = ts.createSourceFile(file, readFileSync(file, "utf8"), ts.ScriptTarget.Latest, true);
  const out: { name: string; line: number; lines: number }[] = [];
  const visit = (node: ts.Node): void => {
    if (ts.isFunctionLike(node) && (node as ts.FunctionLikeDeclaration).body) {
      const start = sf.getLineAndCharacterOfPosition(node.getStart(sf)).line;
      const end = sf.getLineAndCharacterOfPosition(node.end).line;
      const name = (node as ts.FunctionLikeDeclaration).name?.getText(sf) ?? "(anonymous)";
      out.push({ name, line: start + 1, lines: end - start + 1 });
    }
    ts.forEachChild(node, visit);
  };
  visit(sf);
  return out;
}

test("layout - no function over 80 lines in coordinator/, worker/ and proto/", () => {
  const long: string[] = [];
  let count = 0;
  for (const folder of ["coordinator", "worker", "proto"]) {
    for (const file of sources(join(ROOT, folder))) {
      for (const f of functionLengths(file)) {
        count++;
        if (f.lines > MAX_LINES) long.push(`${relative(ROOT, file)}:${f.line} ${f.name} is ${f.lines} lines`);
      }
    }
  }
  assert.ok(count > 200, `only ${count} functions found: the scan is broken`);
  assert.deepEqual(long, [], "split these into named steps (issue 13)");
});

/**
 * The columnar sample list behind every data set: it must read back exactly what was put in (odd
 * UTF-8, ids across chunk boundaries), plan the same shards as the per-object planner it replaced,
 * and answer id membership like the Set of strings it replaced.
 */
import assert from "node:assert/strict";
import { mkdtempSync, readdirSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { test } from "node:test";
import fc from "fast-check";
import { PlannedShard, planShards } from "../coordinator/shard_planner.js";
import { IdIndex, MAX_ID_BYTES, SampleColumns, SampleList } from "../core/datasets/sample_list.js";
import { applyLimit, stratifiedSplit } from "../core/datasets/splits.js";
import { SPLITS, type SampleRef } from "../core/datasets/types.js";

// Plain objects (fast-check's records have no prototype); ids of any code point but lone surrogates,
// which no file name read as UTF-8 holds.
const ref = fc
  .record({ id: fc.string({ unit: "binary", minLength: 1, maxLength: 40 }), label: fc.nat({ max: 6 }), split: fc.constantFrom(...SPLITS) })
  .map((r): SampleRef => ({ id: r.id, label: r.label, split: r.split }));

/** The planner as it was with an object per sample (commit c3db7ff): the reference. */
function referencePlan(samples: readonly SampleRef[], shardSize: number): { id: string; samples: SampleRef[] }[] {
  const byClass = new Map<number, SampleRef[]>();
  for (const s of samples) {
    let list = byClass.get(s.label);
    if (!list) byClass.set(s.label, (list = []));
    list.push(s);
  }
  const queues = [...byClass.entries()].sort((a, b) => a[0] - b[0]).map(([, v]) => v);
  const dealt: SampleRef[] = [];
  for (let i = 0; dealt.length < samples.length; i++) for (const q of queues) if (i < q.length) dealt.push(q[i]);
  const out = [];
  const width = Math.max(5, String(Math.ceil(dealt.length / shardSize)).length);
  for (let i = 0; i < dealt.length; i += shardSize) out.push({ id: `shard-${String(i / shardSize).padStart(width, "0")}`, samples: dealt.slice(i, i + shardSize) });
  return out;
}

test("sample list - reads back every id, label and split, in order, through from() and select()", () => {
  fc.assert(
    fc.property(fc.array(ref, { maxLength: 200 }), (refs) => {
      const list = SampleList.from(refs);
      assert.equal(list.length, refs.length);
      assert.deepEqual([...list], refs);
      assert.deepEqual(list.ids(), refs.map((r) => r.id));
      assert.deepEqual(list.counts(), { train: refs.filter((r) => r.split === "train").length, val: refs.filter((r) => r.split === "val").length, test: refs.filter((r) => r.split === "test").length });
      const columns = new SampleColumns();
      for (const r of refs) columns.push(r.id, r.label);
      const order = refs.map((_, i) => refs.length - 1 - i);
      assert.deepEqual([...SampleList.select(columns, order, (row) => refs[row].split)], order.map((i) => refs[i]));
    }),
    { numRuns: 200, seed: 7 },
  );
});

test("sample list - ids fill several 4 MiB chunks without one straddling two; an over-long id is refused", () => {
  const columns = new SampleColumns();
  const n = 40_000;
  const idOf = (i: number): string => `class_${i % 7}/d${Math.floor(i / 1000)}/${"é".repeat(i % 97)}img_${i}.png`;
  for (let i = 0; i < n; i++) columns.push(idOf(i), i % 7);
  assert.ok(columns.bytes() > 8 * 2 ** 20, `${columns.bytes()} bytes: more than two chunks`);
  for (let i = 0; i < n; i += 1) assert.equal(columns.id(i), idOf(i));
  assert.throws(() => columns.push("x".repeat(MAX_ID_BYTES + 1), 0), /at most 65535/);
});

test("sample list - ids past the in-memory budget spill to an unlinked file and read back exactly, in any order", () => {
  const dir = mkdtempSync(join(tmpdir(), "ctrain-spill-"));
  try {
    const columns = new SampleColumns({ spillAfterBytes: 0, spillDir: dir });
    const n = 60_000;
    const idOf = (i: number): string => `c${i % 5}/${"ü".repeat(i % 131)}/${i}.png`;
    for (let i = 0; i < n; i++) columns.push(idOf(i), i % 5);
    assert.ok(columns.spilledBytes() > 6 * 2 ** 20, `${columns.spilledBytes()} bytes spilled`);
    assert.ok(columns.bytes() < 8 * 2 ** 20, `${columns.bytes()} bytes in memory`);
    assert.deepEqual(readdirSync(dir), [], "the spill file is unlinked at once");
    for (let i = 0; i < n; i++) assert.equal(columns.id(i), idOf(i));
    for (let k = 0, i = 7; k < n; k++, i = (i * 7919 + 13) % n) assert.equal(columns.id(i), idOf(i));
    const list = SampleList.select(columns, Array.from({ length: n }, (_, k) => n - 1 - k), () => "train");
    assert.equal(list.get(0).id, idOf(n - 1));
    assert.equal(new IdIndex(list).has(idOf(12345)), true);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
  const nowhere = new SampleColumns({ spillAfterBytes: 0, spillDir: join(tmpdir(), "ctrain-no-such-folder", "x") });
  assert.throws(() => { for (let i = 0; i < 200_000; i++) nowhere.push(`class/${i}/${"x".repeat(40)}.png`, 0); }, /cannot write its sample ids to .*ctrain-no-such-folder.*set TMPDIR/);
});

test("sample list - planShards over a list equals the per-object planner (ids, samples, order)", () => {
  fc.assert(
    fc.property(fc.array(ref, { maxLength: 300 }), fc.integer({ min: 1, max: 40 }), (refs, size) => {
      const got = planShards(SampleList.from(refs), size);
      const want = referencePlan(refs, size);
      assert.deepEqual(got.map((s) => ({ id: s.id, samples: s.samples })), want);
      for (const s of got) assert.equal(s.size, s.samples.length);
      assert.ok(got.every((s) => s instanceof PlannedShard));
    }),
    { numRuns: 200, seed: 11 },
  );
});

test("sample list - splits and --limit over columns equal those over an array of ids", () => {
  fc.assert(
    fc.property(fc.uniqueArray(fc.string({ minLength: 1, maxLength: 12 }), { maxLength: 150 }), fc.nat({ max: 60 }), (ids, limit) => {
      const columns = new SampleColumns();
      ids.forEach((id, i) => columns.push(id, i % 4));
      const labels = columns.labels();
      const f = { seed: 5, valFraction: 0.2, testFraction: 0.1 };
      const splits = stratifiedSplit(columns, labels, f);
      assert.deepEqual(splits, stratifiedSplit(ids, labels, f));
      assert.deepEqual(applyLimit(columns, labels, splits, limit, 5), applyLimit(ids, labels, splits, limit, 5));
    }),
    { numRuns: 100, seed: 3 },
  );
});

test("sample list - IdIndex knows exactly the listed ids", () => {
  const refs = Array.from({ length: 5000 }, (_, i) => ({ id: `c${i % 3}/${i}.png`, label: i % 3, split: "train" as const }));
  const index = new IdIndex(SampleList.from(refs));
  for (const r of refs) assert.ok(index.has(r.id), r.id);
  for (const id of ["c0/5000.png", "c1/0.png", "../etc/passwd", "", "c0/1.png "]) assert.equal(index.has(id), false, id);
});

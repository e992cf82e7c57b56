/**
 * Seeded, stratified train/val/test splits and `--limit` subsets, generic over (ids, labels).
 *
 * Within each class, samples are ordered by a seeded hash of their id (not by a shuffled array
 * position), so the same seed gives the same split in any process and on any machine, and adding a
 * few files to a folder moves only a few samples between splits. Counts are per class, so every
 * split keeps the class balance of the whole.
 */
import type { Split } from "./types.js";

/** Sample ids: an array, or a column that makes each on demand (sample_list.ts). */
export type Ids = readonly string[] | { readonly length: number; id(i: number): string };

const idAt = (ids: Ids): ((i: number) => string) => ("id" in ids && typeof ids.id === "function" ? (i) => ids.id(i) : (i) => (ids as readonly string[])[i]);

/** 53-bit string hash (cyrb53): fast, well mixed, deterministic across platforms. */
export function hash53(text: string, seed: number): number {
  let h1 = 0xdeadbeef ^ seed;
  let h2 = 0x41c6ce57 ^ seed;
  for (let i = 0; i < text.length; i++) {
    const c = text.charCodeAt(i);
    h1 = Math.imul(h1 ^ c, 2654435761);
    h2 = Math.imul(h2 ^ c, 1597334677);
  }
  h1 = Math.imul(h1 ^ (h1 >>> 16), 2246822507);
  h1 ^= Math.imul(h2 ^ (h2 >>> 13), 3266489909);
  h2 = Math.imul(h2 ^ (h2 >>> 16), 2246822507);
  h2 ^= Math.imul(h1 ^ (h1 >>> 13), 3266489909);
  return 4294967296 * (2097151 & h2) + (h1 >>> 0);
}

/**
 * Indices of `candidates` grouped by label, each group ordered by the seeded hash of its ids (`salt`
 * separates uses). Groups are typed arrays, counted then filled: no array slot per sample to grow.
 */
function rankedGroups(ids: Ids, labels: ArrayLike<number>, candidates: ArrayLike<number>, seed: number, salt: string): Map<number, Uint32Array> {
  const id = idAt(ids);
  const sizes = new Map<number, number>();
  for (let k = 0; k < candidates.length; k++) {
    const l = labels[candidates[k]];
    sizes.set(l, (sizes.get(l) ?? 0) + 1);
  }
  const groups = new Map<number, Uint32Array>();
  const filled = new Map<number, number>();
  for (const [l, n] of sizes) {
    groups.set(l, new Uint32Array(n));
    filled.set(l, 0);
  }
  const keys = new Float64Array(ids.length);
  for (let k = 0; k < candidates.length; k++) {
    const i = candidates[k];
    const l = labels[i];
    const at = filled.get(l)!;
    groups.get(l)![at] = i;
    filled.set(l, at + 1);
    keys[i] = hash53(salt + id(i), seed >>> 0);
  }
  const byId = (a: number, b: number): number => {
    const x = id(a);
    const y = id(b);
    return x < y ? -1 : x > y ? 1 : 0;
  };
  for (const g of groups.values()) g.sort((a, b) => keys[a] - keys[b] || byId(a, b));
  return groups;
}

/** 0..n-1. */
function allIndices(n: number): Uint32Array {
  const out = new Uint32Array(n);
  for (let i = 0; i < n; i++) out[i] = i;
  return out;
}

export interface SplitFractions {
  /** Seed of the ordering; the same seed gives the same split. */
  seed: number;
  /** Fraction of each class that goes to `val`, in [0, 1). */
  valFraction: number;
  /** Fraction of each class that goes to `test`, in [0, 1). */
  testFraction: number;
}

/**
 * Assigns every item a split, class by class: round(n * testFraction) to test, round(n * valFraction)
 * to val, the rest to train. A class keeps at least one training sample when it has any.
 * Returns an array parallel to `ids`.
 */
export function stratifiedSplit(ids: Ids, labels: ArrayLike<number>, f: SplitFractions): Split[] {
  if (ids.length !== labels.length) throw new RangeError(`stratifiedSplit: ${ids.length} ids but ${labels.length} labels`);
  const out = new Array<Split>(ids.length).fill("train");
  for (const g of rankedGroups(ids, labels, allIndices(ids.length), f.seed, "split\0").values()) {
    const n = g.length;
    let nTest = Math.round(n * f.testFraction);
    let nVal = Math.round(n * f.valFraction);
    // Keep one sample to train on; take back from val first, then test.
    while (nTest + nVal > n - 1 && nVal > 0) nVal--;
    while (nTest + nVal > n - 1 && nTest > 0) nTest--;
    for (let k = 0; k < nTest; k++) out[g[k]] = "test";
    for (let k = nTest; k < nTest + nVal; k++) out[g[k]] = "val";
  }
  return out;
}

/**
 * A stratified, seeded subset of `candidates` with at most `max` items (largest-remainder allocation
 * of `max` over the classes in proportion to their counts). Returns indices in ascending order;
 * all of `candidates` when there are no more than `max` of them.
 */
export function stratifiedSubset(ids: Ids, labels: ArrayLike<number>, candidates: readonly number[], max: number, seed: number): number[] {
  if (candidates.length <= max) return [...candidates].sort((a, b) => a - b);
  if (max <= 0) return [];
  const groups = rankedGroups(ids, labels, candidates, seed, "limit\0");
  const total = candidates.length;
  const classes = [...groups.keys()].sort((a, b) => a - b);
  const quota = new Map<number, number>();
  const remainders: { label: number; rem: number }[] = [];
  let given = 0;
  for (const c of classes) {
    const exact = (max * groups.get(c)!.length) / total;
    const q = Math.floor(exact);
    quota.set(c, q);
    given += q;
    remainders.push({ label: c, rem: exact - q });
  }
  remainders.sort((a, b) => b.rem - a.rem || a.label - b.label);
  for (let k = 0; given < max && k < remainders.length; k++, given++) quota.set(remainders[k].label, quota.get(remainders[k].label)! + 1);
  const kept: number[] = [];
  // Loops, not push(...xs): spreading 10^5 indices overflows the call stack.
  for (const c of classes) for (const i of groups.get(c)!.slice(0, quota.get(c))) kept.push(i);
  return kept.sort((a, b) => a - b);
}

/**
 * What `--limit N` keeps: at most N training samples, and val and test in the proportion the splits
 * hold to train (`counts`: samples per split before the limit), so `--val-split` and `--test-split`
 * keep their meaning: with --val-split 0.3, val is 0.3 / 0.7 of train, not a fixed N / 5.
 */
export function limitsFor(limit: number, counts: Record<Split, number>): Record<Split, number> {
  if (limit <= 0) return { train: Infinity, val: Infinity, test: Infinity };
  const train = Math.min(limit, counts.train);
  const share = (n: number): number => (counts.train > 0 ? Math.ceil((train * n) / counts.train) : n);
  return { train: limit, val: share(counts.val), test: share(counts.test) };
}

/**
 * Applies `--limit` to items that already have a split: a stratified subset per split. Returns the
 * kept indices ordered train, then val, then test, ascending within each.
 */
export function applyLimit(ids: Ids, labels: ArrayLike<number>, splits: readonly Split[], limit: number, seed: number): number[] {
  if (limit <= 0) {
    // Everything, in split order: one pass a split, no per-split lists (a folder may list 10^7 files).
    const out = new Array<number>(splits.length);
    let k = 0;
    for (const s of ["train", "val", "test"] as const) for (let i = 0; i < splits.length; i++) if (splits[i] === s) out[k++] = i;
    return out;
  }
  const bySplit: Record<Split, number[]> = { train: [], val: [], test: [] };
  for (let i = 0; i < splits.length; i++) bySplit[splits[i]].push(i);
  const max = limitsFor(limit, { train: bySplit.train.length, val: bySplit.val.length, test: bySplit.test.length });
  const out: number[] = [];
  for (const s of ["train", "val", "test"] as const) for (const i of stratifiedSubset(ids, labels, bySplit[s], max[s], seed)) out.push(i);
  return out;
}

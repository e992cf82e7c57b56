/**
 * Breakdown of a V8 CPU profile (`node --cpu-prof`) into the costs of the gradient-averaging data path:
 * encode, decode, fp16 conversion, copies, checks (CRC-32, NaN/Inf), reduction, averager bookkeeping,
 * NATS client, GC, waiting (idle), training compute (tfjs, wasm kernels), and what is left. Benchmarks put it in their JSON output so a reader
 * sees where a round's CPU goes without opening the profile.
 *
 * Each sample is charged to the innermost frame of its stack that matches a category (leaf first), so
 * a memcpy builtin called from `float32ToBytes` counts as a copy, and protobufjs's writer called from
 * codec `encode` counts as encoding. Samples of the benchmark's own set-up (`workerMain`: filling the
 * random gradient) are counted apart and left out of the shares.
 */
import { readFile, readdir } from "node:fs/promises";
import { join } from "node:path";

interface CallFrame { functionName: string; url: string }
interface ProfileNode { id: number; callFrame: CallFrame; children?: number[] }
interface CpuProfile { nodes: ProfileNode[]; samples: number[]; timeDeltas: number[]; startTime: number; endTime: number }

/** Category names, in the order they are reported. */
export const CATEGORIES = ["compute", "encode", "decode", "fp16", "copies", "checks", "reduction", "bookkeeping", "nats", "gc", "waiting", "other", "setup"] as const;
export type Category = (typeof CATEGORIES)[number];

const BY_NAME: Record<string, Category> = {
  f32BitsToF16Bits: "fp16", encodeFloat16: "fp16", decodeFloat16: "fp16", float16Table: "fp16", float16BitsToFloat32: "fp16", float32ToFloat16Bits: "fp16",
  f16Encode: "fp16", f16Decode: "fp16", f16Accumulate: "fp16",
  crc32: "checks", crc32Portable: "checks", hasNonFinite: "checks", checkFinite: "checks", anyNonFinite: "checks",
  float32ToBytes: "copies", bytesToFloat32: "copies", bytesToUint16: "copies", uint16ToBytes: "copies", alignedView: "copies",
  accumulateChunk: "reduction", writeChunk: "reduction", scaleInto: "reduction", accumulateInto: "reduction", divideInPlace: "reduction",
  decodeFrame: "decode", decode: "decode", onMessage: "decode", encodeFrame: "encode", encode: "encode", encodeValues: "encode", chunkMessage: "encode",
  workerMain: "setup",
};

function categorise(frame: CallFrame): Category | undefined {
  const { functionName: f, url } = frame;
  if (f === "(garbage collector)") return "gc";
  if (f === "(idle)") return "waiting";
  if (f === "(program)" || f === "(root)") return undefined;
  const byName = Object.hasOwn(BY_NAME, f) ? BY_NAME[f] : undefined;
  // Builtins (empty url) with common names such as `encode` are charged to their caller instead.
  if (byName && url !== "" && !url.includes("node_modules")) return byName;
  if (url.includes("/worker/gradient_averaging")) return "bookkeeping";
  // Training itself (finetune_dp): tfjs and its wasm kernels, onnxruntime.
  if (url.includes("@tensorflow") || url.startsWith("wasm://") || url.includes("onnxruntime")) return "compute";
  if (url.includes("node_modules/nats/")) return "nats";
  return undefined;
}

/** Milliseconds per category and shares of the total without set-up. */
export interface ProfileBreakdown {
  /** Profiles summed. */
  profiles: number;
  /** Sampled milliseconds per category (summed over profiles). */
  ms: Record<Category, number>;
  /** Share of each category in the sampled time without `setup`, 0..1. */
  share: Record<Category, number>;
  /** The functions with the most self time: `name (file) category`, milliseconds. */
  top: Array<{ fn: string; category: Category; ms: number }>;
}

/** Sums the breakdown of one profile into `ms`. */
function addProfile(p: CpuProfile, ms: Record<Category, number>, self: Map<string, { category: Category; ms: number }>): void {
  const parent = new Map<number, number>();
  const byId = new Map<number, ProfileNode>();
  for (const n of p.nodes) {
    byId.set(n.id, n);
    for (const c of n.children ?? []) parent.set(c, n.id);
  }
  const memo = new Map<number, Category>();
  const categoryOf = (id: number): Category => {
    const hit = memo.get(id);
    if (hit) return hit;
    let cat: Category = "other";
    for (let at: number | undefined = id; at !== undefined; at = parent.get(at)) {
      const c = categorise(byId.get(at)!.callFrame);
      if (c) {
        cat = c;
        break;
      }
    }
    memo.set(id, cat);
    return cat;
  };
  for (let i = 0; i < p.samples.length; i++) {
    const id = p.samples[i]!;
    const t = (p.timeDeltas[i] ?? 0) / 1000;
    const category = categoryOf(id);
    ms[category] += t;
    const f = byId.get(id)!.callFrame;
    const name = `${f.functionName || "(anonymous)"} (${f.url.split("/").slice(-2).join("/")})`;
    const e = self.get(name) ?? { category, ms: 0 };
    e.ms += t;
    self.set(name, e);
  }
}

/** Reads every `.cpuprofile` in `dir` and returns their summed breakdown. */
export async function profileBreakdown(dir: string): Promise<ProfileBreakdown> {
  const files = (await readdir(dir)).filter((f) => f.endsWith(".cpuprofile"));
  const ms = Object.fromEntries(CATEGORIES.map((c) => [c, 0])) as Record<Category, number>;
  const self = new Map<string, { category: Category; ms: number }>();
  for (const f of files) addProfile(JSON.parse(await readFile(join(dir, f), "utf8")) as CpuProfile, ms, self);
  const top = [...self].sort((a, b) => b[1].ms - a[1].ms).slice(0, 20).map(([fn, e]) => ({ fn, category: e.category, ms: Math.round(e.ms) }));
  const total = CATEGORIES.reduce((a, c) => a + (c === "setup" ? 0 : ms[c]), 0) || 1;
  const share = Object.fromEntries(CATEGORIES.map((c) => [c, c === "setup" ? 0 : Number((ms[c] / total).toFixed(3))])) as Record<Category, number>;
  for (const c of CATEGORIES) ms[c] = Math.round(ms[c]);
  return { profiles: files.length, ms, share, top };
}

/**
 * Fuzzing what users hand us: IDX files, image files, job configs (YAML and flags) and the on-disk
 * feature cache. Random bytes, truncations, bit flips and chunk deletions of valid inputs built here
 * must end in a valid result or the one error class the caller handles (ConfigError, BadInputError
 * with a known reason, a clear "damaged" Error) -- never another exception, a hang, an allocation
 * sized by a forged header, or a result of the wrong size. Seeded: a failure replays the same way.
 */
import { after, test } from "node:test";
import assert from "node:assert/strict";
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { mkdir, readFile, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { crc32, gzipSync } from "node:zlib";
import fc from "fast-check";
import sharp from "sharp";
import { stringify as toYaml } from "yaml";
import { OPTION_SPECS, flagName, parseArgs, readConfigFile, resolveOptions, type JobOptions } from "../core/runtime/config.js";
import { decodeImage } from "../core/datasets/image_decode.js";
import { gunzipIdx, loadIdxSet, parseIdxImages, parseIdxLabels } from "../core/datasets/idx.js";
import { SKIP_REASONS } from "../core/datasets/types.js";
import { BadInputError, ConfigError } from "../core/runtime/errors.js";
import { FeatureCache, decodeShard, encodeShard, type FeatureShardData } from "../core/datasets/feature_store.js";

const SEED = 20240612;
const tmp = mkdtempSync(join(tmpdir(), "ctrain-fuzz-inputs-"));
after(() => rmSync(tmp, { recursive: true, force: true }));

/**
 * Runs `fn`; `ms` is the time it takes on a quiet machine. Speed is not asserted here (the machine
 * is shared and noisy): only a runaway -- a hang, or a decoder that really decodes a bomb -- fails,
 * at 20x the expected time.
 */
async function timed<T>(name: string, ms: number, fn: () => Promise<T> | T): Promise<T> {
  const t0 = performance.now();
  const r = await fn();
  const took = performance.now() - t0;
  assert.ok(took < ms * 20, `${name} took ${took.toFixed(0)} ms: more than 20x its usual ${ms} ms, a runaway`);
  return r;
}

type Edit = { kind: "flip"; at: number; bit: number } | { kind: "set"; at: number; value: number } | { kind: "delete"; at: number; len: number } | { kind: "insert"; at: number; value: number } | { kind: "truncate"; at: number };

const edits = fc.array(
  fc.oneof(
    fc.record({ kind: fc.constant("flip" as const), at: fc.nat(), bit: fc.integer({ min: 0, max: 7 }) }),
    fc.record({ kind: fc.constant("set" as const), at: fc.nat(), value: fc.integer({ min: 0, max: 255 }) }),
    fc.record({ kind: fc.constant("delete" as const), at: fc.nat(), len: fc.integer({ min: 1, max: 64 }) }),
    fc.record({ kind: fc.constant("insert" as const), at: fc.nat(), value: fc.integer({ min: 0, max: 255 }) }),
    fc.record({ kind: fc.constant("truncate" as const), at: fc.nat() }),
  ),
  { minLength: 1, maxLength: 4 },
);

/** Applies byte edits to a copy of `base`. */
function mutate(base: Uint8Array, list: Edit[]): Uint8Array {
  const b = Array.from(base);
  for (const e of list) {
    const at = e.at % Math.max(1, b.length);
    if (e.kind === "flip") b[at] = (b[at] ?? 0) ^ (1 << e.bit);
    else if (e.kind === "set") b[at] = e.value;
    else if (e.kind === "delete") b.splice(at, e.len);
    else if (e.kind === "insert") b.splice(at, 0, e.value);
    else b.length = at;
  }
  return Uint8Array.from(b);
}

// ---------------------------------------------------------------- IDX

function idxImages(count: number, rows: number, cols: number): Buffer {
  const b = Buffer.alloc(16 + count * rows * cols);
  b.writeUInt32BE(0x803, 0);
  b.writeUInt32BE(count, 4);
  b.writeUInt32BE(rows, 8);
  b.writeUInt32BE(cols, 12);
  for (let i = 16; i < b.length; i++) b[i] = (i * 31) & 0xff;
  return b;
}
function idxLabels(count: number): Buffer {
  const b = Buffer.alloc(8 + count);
  b.writeUInt32BE(0x801, 0);
  b.writeUInt32BE(count, 4);
  for (let i = 0; i < count; i++) b[8 + i] = i % 10;
  return b;
}
const IMAGES = idxImages(6, 5, 4);
const LABELS = idxLabels(6);

/** Parses an IDX images or labels file as loadIdxSet does (gunzip when gzipped); "ok" or throws. */
async function parseIdx(raw: Uint8Array, kind: "images" | "labels"): Promise<"ok"> {
  const file = `fuzz-${kind}`;
  const data = raw.length >= 2 && raw[0] === 0x1f && raw[1] === 0x8b ? await gunzipIdx(raw, file) : raw;
  if (kind === "images") {
    const r = parseIdxImages(data, file);
    assert.equal(r.pixels!.length, r.count * r.rows * r.cols, "pixels match the header");
  } else parseIdxLabels(data, file);
  return "ok";
}

/** Only ConfigError, with a one-line message naming the file, may come out of an IDX parse. */
async function idxOutcome(raw: Uint8Array, kind: "images" | "labels"): Promise<string> {
  try {
    return await parseIdx(raw, kind);
  } catch (err) {
    if (!(err instanceof ConfigError)) throw new Error(`IDX ${kind} threw ${String(err)} for ${Buffer.from(raw.subarray(0, 64)).toString("hex")}`, { cause: err });
    assert.match(err.message, new RegExp(`fuzz-${kind}`));
    assert.doesNotMatch(err.message, /\n/);
    return /magic/.test(err.message) ? "magic" : /gzip/.test(err.message) ? "gzip" : /truncated|too long|too short|empty/.test(err.message) ? "length" : "other";
  }
}

test("fuzz - IDX random bytes and random headers give a ConfigError or a consistent parse", async () => {
  const counts = new Map<string, number>();
  const count = (k: string): void => void counts.set(k, (counts.get(k) ?? 0) + 1);
  await timed("IDX random", 5000, async () => {
    // Plain random bytes, and random bytes behind either magic.
    await fc.assert(
      fc.asyncProperty(fc.uint8Array({ maxLength: 96 }), fc.constantFrom(null, 0x801, 0x803), fc.constantFrom("images" as const, "labels" as const), async (bytes, magic, kind) => {
        const b = Buffer.from(bytes.length >= 4 || magic === null ? bytes : new Uint8Array(4));
        if (magic !== null) b.writeUInt32BE(magic, 0);
        count(await idxOutcome(b, kind));
      }),
      { seed: SEED, numRuns: 3000 },
    );
    // Random header fields (any uint32, huge ones included) over a small body.
    const u32 = fc.oneof(fc.integer({ min: 0, max: 8 }), fc.constantFrom(2 ** 31, 2 ** 32 - 1, 65536, 60000), fc.nat({ max: 2 ** 32 - 1 }));
    await fc.assert(
      fc.asyncProperty(fc.constantFrom(0x803, 0x801, 0x802, 0x0803_0000, 0), u32, u32, u32, fc.nat({ max: 200 }), async (magic, n, r, c, body) => {
        const b = Buffer.alloc(16 + body);
        b.writeUInt32BE(magic, 0);
        b.writeUInt32BE(n, 4);
        b.writeUInt32BE(r, 8);
        b.writeUInt32BE(c, 12);
        count(await idxOutcome(b, "images"));
        count(await idxOutcome(b.subarray(0, 8 + (body % 16)), "labels"));
      }),
      { seed: SEED, numRuns: 3000 },
    );
  });
  assert.ok((counts.get("magic") ?? 0) > 100 && (counts.get("length") ?? 0) > 100, JSON.stringify([...counts]));
});

test("fuzz - IDX truncations and bit flips of a valid pair, plain and gzipped, give a ConfigError or a consistent parse", async () => {
  assert.equal(await parseIdx(IMAGES, "images"), "ok");
  assert.equal(await parseIdx(gzipSync(LABELS), "labels"), "ok");
  const counts = new Map<string, number>();
  await timed("IDX mutations", 8000, async () => {
    for (const [kind, base] of [["images", IMAGES], ["labels", LABELS]] as const) {
      for (const gz of [false, true]) {
        const valid = gz ? gzipSync(base) : base;
        // Every truncation, then random edits.
        for (let n = 0; n < valid.length; n++) await idxOutcome(valid.subarray(0, n), kind);
        await fc.assert(
          fc.asyncProperty(edits, async (list) => {
            const r = await idxOutcome(mutate(valid, list), kind);
            counts.set(r, (counts.get(r) ?? 0) + 1);
          }),
          { seed: SEED, numRuns: gz ? 1000 : 2000 },
        );
      }
    }
    // Gzipped garbage: a gzip header followed by random bytes.
    await fc.assert(
      fc.asyncProperty(fc.uint8Array({ maxLength: 128 }), async (bytes) => {
        const r = await idxOutcome(Buffer.concat([Buffer.from([0x1f, 0x8b, 0x08, 0x00, 0, 0, 0, 0, 0, 0xff]), bytes]), "images");
        counts.set(r, (counts.get(r) ?? 0) + 1);
      }),
      { seed: SEED, numRuns: 1000 },
    );
  });
  assert.ok((counts.get("ok") ?? 0) > 0 && (counts.get("gzip") ?? 0) > 0, JSON.stringify([...counts]));
});

test("fuzz - IDX headers claiming 2^31 images are refused before allocating, plain or gzipped", async () => {
  const huge = Buffer.alloc(16 + 784 * 3);
  huge.writeUInt32BE(0x803, 0);
  huge.writeUInt32BE(2 ** 31, 4);
  huge.writeUInt32BE(28, 8);
  huge.writeUInt32BE(28, 12);
  const labels = Buffer.alloc(8 + 3);
  labels.writeUInt32BE(0x801, 0);
  labels.writeUInt32BE(2 ** 32 - 1, 4);
  // A gzip "bomb": a real header for 2^20 images (822 MB) over 8 MB of zeros that compress to 8 kB.
  const bombHeader = Buffer.from(huge.subarray(0, 16));
  bombHeader.writeUInt32BE(2 ** 20, 4);
  const bomb = gzipSync(Buffer.concat([bombHeader, Buffer.alloc(8 << 20)]), { level: 1 });
  // A gzip file whose header claims 10 images but inflates to 8 MB: stopped at the claimed size.
  const longHeader = Buffer.from(bombHeader);
  longHeader.writeUInt32BE(10, 4);
  const tooLong = gzipSync(Buffer.concat([longHeader, Buffer.alloc(8 << 20)]), { level: 1 });
  const before = process.memoryUsage().arrayBuffers;
  await timed("huge IDX headers", 1500, async () => {
    for (const [raw, kind, re] of [
      [huge, "images", /header \(2147483648 images of 28x28\).*truncated/],
      [gzipSync(huge), "images", /header says 1683627180048 bytes, more than a \d+-byte gzip file can hold/],
      [labels, "labels", /4294967295 labels.*truncated/],
      [gzipSync(labels), "labels", /more than a \d+-byte gzip file can hold/],
      [bomb, "images", /header says 822083600 bytes, more than a \d+-byte gzip file can hold/],
      [tooLong, "images", /decompresses to more than the 7856 bytes its header says/],
    ] as const) {
      await assert.rejects(parseIdx(raw, kind), (err: unknown) => err instanceof ConfigError && re.test(err.message), String(re));
    }
  });
  assert.ok(process.memoryUsage().arrayBuffers - before < 64 << 20, "no allocation sized by the header");
});

test("fuzz - IDX folders with mutated files load or fail with a ConfigError naming the file", async () => {
  const names = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"];
  const files = [IMAGES, LABELS, idxImages(3, 5, 4), idxLabels(3)];
  let i = 0;
  const outcomes = new Map<string, number>();
  await timed("IDX folders", 5000, async () => {
    await fc.assert(
      fc.asyncProperty(fc.nat({ max: 3 }), fc.boolean(), edits, async (which, gz, list) => {
        const dir = join(tmp, `idx-${i++}`);
        await mkdir(dir);
        for (let f = 0; f < 4; f++) {
          const bytes = f === which ? mutate(files[f], list) : files[f];
          await writeFile(join(dir, names[f] + (gz ? ".gz" : "")), gz ? gzipSync(bytes) : bytes);
        }
        try {
          const set = await loadIdxSet(dir);
          assert.equal(set.train.labels.length, set.train.images.count);
          assert.equal(set.test.labels.length, set.test.images.count);
          outcomes.set("ok", (outcomes.get("ok") ?? 0) + 1);
        } catch (err) {
          assert.ok(err instanceof ConfigError, String(err));
          assert.ok(err.message.includes(names[which]), err.message);
          outcomes.set("refused", (outcomes.get("refused") ?? 0) + 1);
        }
      }),
      { seed: SEED, numRuns: 300 },
    );
  });
  assert.ok((outcomes.get("refused") ?? 0) > 100, JSON.stringify([...outcomes]));
});

// ---------------------------------------------------------------- images

const DECODE_REASONS: string[] = [SKIP_REASONS.empty, SKIP_REASONS.corrupt, SKIP_REASONS.truncated, SKIP_REASONS.notAnImage, SKIP_REASONS.tooManyPixels, SKIP_REASONS.tooSmall];
const SIZE = 8;

/** decodeImage's outcome: "ok" (size*size*3 bytes) or a known BadInputError reason; anything else fails. */
async function decodeOutcome(bytes: Uint8Array, maxPixels = 1_000_000): Promise<string> {
  try {
    const px = await decodeImage("fuzz", bytes, { size: SIZE, maxPixels });
    assert.equal(px.length, SIZE * SIZE * 3);
    return "ok";
  } catch (err) {
    if (!(err instanceof BadInputError)) throw new Error(`decodeImage threw ${String(err)} for ${Buffer.from(bytes.subarray(0, 64)).toString("hex")}`, { cause: err });
    assert.ok(DECODE_REASONS.includes(err.reason), `unknown reason ${err.reason}`);
    assert.equal(err.id, "fuzz");
    assert.doesNotMatch(err.message, /\n/, "one-line message");
    return err.reason;
  }
}

/** Deterministic noise pixels, so the encoders produce real entropy-coded data. */
function noise(w: number, h: number, channels: number, seed: number): ReturnType<typeof sharp> {
  const px = Buffer.alloc(w * h * channels);
  let s = seed;
  for (let i = 0; i < px.length; i++) {
    s = (s * 1103515245 + 12345) >>> 0;
    px[i] = (s >>> 16) & 0xff;
  }
  return sharp(px, { raw: { width: w, height: h, channels: channels as 1 | 2 | 3 | 4 } });
}

async function sampleImages(): Promise<Record<string, Buffer>> {
  return {
    png: await noise(16, 12, 3, 1).png().toBuffer(),
    jpeg: await noise(16, 12, 3, 2).jpeg({ quality: 80 }).toBuffer(),
    progressiveJpeg: await noise(16, 12, 3, 3).jpeg({ progressive: true }).toBuffer(),
    webp: await noise(16, 12, 3, 4).webp({ quality: 70 }).toBuffer(),
    webpLossless: await noise(16, 12, 4, 5).webp({ lossless: true }).toBuffer(),
    cmykJpeg: await noise(16, 12, 3, 6).toColourspace("cmyk").jpeg().toBuffer(),
    png16: await noise(16, 12, 3, 7).toColourspace("rgb16").png().toBuffer(),
    grayAlphaPng: await noise(16, 12, 2, 8).png().toBuffer(),
    palettePng: await noise(16, 12, 3, 9).png({ palette: true, colours: 16 }).toBuffer(),
  };
}

/** Splits a PNG into chunks (offset, length in bytes) after the signature. */
function pngChunks(b: Buffer): [number, number][] {
  const out: [number, number][] = [];
  for (let p = 8; p + 12 <= b.length; ) {
    const len = b.readUInt32BE(p);
    out.push([p, 12 + len]);
    p += 12 + len;
  }
  return out;
}
/** Splits a JPEG into marker segments (offset, length) before the scan. */
function jpegSegments(b: Buffer): [number, number][] {
  const out: [number, number][] = [];
  for (let p = 2; p + 4 <= b.length && b[p] === 0xff; ) {
    const len = 2 + b.readUInt16BE(p + 2);
    out.push([p, len]);
    if (b[p + 1] === 0xda) break;
    p += len;
  }
  return out;
}
const without = (b: Buffer, [at, len]: [number, number]): Buffer => Buffer.concat([b.subarray(0, at), b.subarray(at + len)]);

test("fuzz - images: random bytes, with or without an image signature, decode or give a known reason", async () => {
  const counts = new Map<string, number>();
  const signatures = [[], [0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a], [0xff, 0xd8, 0xff], [0x52, 0x49, 0x46, 0x46, 0x40, 0, 0, 0, 0x57, 0x45, 0x42, 0x50, 0x56, 0x50, 0x38]];
  await timed("random image bytes", 5000, async () => {
    await fc.assert(
      fc.asyncProperty(fc.constantFrom(...signatures), fc.uint8Array({ maxLength: 200 }), async (sig, bytes) => {
        const r = await decodeOutcome(Uint8Array.from([...sig, ...bytes]));
        counts.set(r, (counts.get(r) ?? 0) + 1);
      }),
      { seed: SEED, numRuns: 400 },
    );
  });
  assert.ok((counts.get("not_an_image") ?? 0) > 0 && (counts.get("corrupt") ?? 0) + (counts.get("truncated") ?? 0) > 0, JSON.stringify([...counts]));
});

test("fuzz - images: truncations, bit flips and chunk deletions of real PNG/JPEG/WebP files decode or give a known reason", async () => {
  const images = await sampleImages();
  for (const [name, b] of Object.entries(images)) assert.equal(await decodeOutcome(b), "ok", name);
  const counts = new Map<string, number>();
  const count = (k: string): void => void counts.set(k, (counts.get(k) ?? 0) + 1);
  await timed("image mutations", 10000, async () => {
    // Structure-aware: drop each PNG chunk and each JPEG segment in turn.
    for (const name of ["png", "png16", "grayAlphaPng", "palettePng"]) for (const c of pngChunks(images[name])) count(await decodeOutcome(without(images[name], c)));
    for (const name of ["jpeg", "progressiveJpeg", "cmykJpeg"]) for (const s of jpegSegments(images[name])) count(await decodeOutcome(without(images[name], s)));
    // Truncations at 24 points of each file.
    for (const b of Object.values(images)) for (let k = 0; k < 24; k++) count(await decodeOutcome(b.subarray(0, Math.floor((b.length * k) / 24))));
    // Random edits.
    await fc.assert(
      fc.asyncProperty(fc.constantFrom(...Object.keys(images)), edits, async (name, list) => count(await decodeOutcome(mutate(images[name], list)))),
      { seed: SEED, numRuns: 500 },
    );
  });
  // The mutations reach the decoders, not only the format sniffing.
  for (const k of ["ok", "truncated", "corrupt"]) assert.ok((counts.get(k) ?? 0) > 0, `${k}: ${JSON.stringify([...counts])}`);
});

/** Sets a PNG's IHDR width and height, with a correct CRC so only the size is wrong. */
function pngWithSize(png: Buffer, w: number, h: number): Buffer {
  const b = Buffer.from(png);
  b.writeUInt32BE(w, 16);
  b.writeUInt32BE(h, 20);
  b.writeUInt32BE(crc32(b.subarray(12, 29)), 29);
  return b;
}
function jpegWithSize(jpeg: Buffer, w: number, h: number): Buffer {
  const b = Buffer.from(jpeg);
  const sof = jpegSegments(b).find(([p]) => b[p + 1] === 0xc0 || b[p + 1] === 0xc2);
  assert.ok(sof, "SOF marker");
  b.writeUInt16BE(h, sof[0] + 5);
  b.writeUInt16BE(w, sof[0] + 7);
  return b;
}
/** Lossy WebP: the VP8 frame header holds 14-bit width and height at offsets 26 and 28. */
function webpWithSize(webp: Buffer, w: number, h: number): Buffer {
  const b = Buffer.from(webp);
  assert.equal(b.toString("latin1", 12, 16), "VP8 ");
  b.writeUInt16LE(w & 0x3fff, 26);
  b.writeUInt16LE(h & 0x3fff, 28);
  return b;
}

test("fuzz - images: headers claiming huge dimensions are refused with too_many_pixels without decoding", async () => {
  const images = await sampleImages();
  const bombs: Record<string, Buffer> = {
    png: pngWithSize(images.png, 100_000, 100_000),
    png16: pngWithSize(images.png16, 2 ** 31 - 1, 2 ** 31 - 1),
    jpeg: jpegWithSize(images.jpeg, 65_000, 65_000),
    progressiveJpeg: jpegWithSize(images.progressiveJpeg, 65_535, 1000),
    webp: webpWithSize(images.webp, 16_383, 16_383),
    svg: Buffer.from(`<svg xmlns="http://www.w3.org/2000/svg" width="100000" height="100000"><rect width="100%" height="100%"/></svg>`),
  };
  for (const [name, b] of Object.entries(bombs)) {
    await timed(`bomb ${name}`, 1000, async () => assert.equal(await decodeOutcome(b, 40_000_000), "too_many_pixels", name));
  }
  // Under the limit but with almost no data behind the header: refused quickly as corrupt or truncated.
  for (const b of [pngWithSize(images.png, 6000, 6000), webpWithSize(images.webp, 6000, 6000)]) {
    await timed("big header, tiny body", 2000, async () => {
      const r = await decodeOutcome(b, 40_000_000);
      assert.ok(["truncated", "corrupt"].includes(r), r);
    });
  }
  // A JPEG's scan that stops at EOI before the frame is full is only a libjpeg warning, which
  // failOn: "error" lets through (the rest comes out grey): bounded in time, not refused.
  await timed("big JPEG header, tiny body", 2000, () => decodeOutcome(jpegWithSize(images.jpeg, 6000, 6000), 40_000_000));
});

test("fuzz - images: odd but valid shapes and colour models decode, or are refused clearly", async () => {
  const mean = (px: Uint8Array, c: number): number => {
    let s = 0;
    for (let i = c; i < px.length; i += 3) s += px[i];
    return s / (px.length / 3);
  };
  const solid = (w: number, h: number, channels: 3 | 4, bg: { r: number; g: number; b: number; alpha?: number }) => sharp({ create: { width: w, height: h, channels, background: bg } });
  const red = { r: 200, g: 30, b: 30 };
  const cases: [string, Buffer, string][] = [
    ["1x1 png", await solid(1, 1, 3, red).png().toBuffer(), "too_small"],
    ["1x1 jpeg", await solid(1, 1, 3, red).jpeg().toBuffer(), "too_small"],
    ["1x500 png", await solid(1, 500, 3, red).png().toBuffer(), "too_small"],
    ["2x2 png", await solid(2, 2, 3, red).png().toBuffer(), "ok"],
    ["2x2 webp", await solid(2, 2, 3, red).webp({ lossless: true }).toBuffer(), "ok"],
    ["4000x2 png", await solid(4000, 2, 3, red).png().toBuffer(), "ok"],
    ["2x4000 jpeg", await solid(2, 4000, 3, red).jpeg().toBuffer(), "ok"],
    ["palette png", await solid(20, 20, 3, red).png({ palette: true }).toBuffer(), "ok"],
    ["gray+alpha png", await solid(20, 20, 4, { ...red, alpha: 1 }).toColourspace("b-w").png().toBuffer(), "ok"],
    ["16-bit gray png", await solid(20, 20, 3, red).toColourspace("grey16").png().toBuffer(), "ok"],
    ["cmyk jpeg 2x2", await solid(2, 2, 3, red).toColourspace("cmyk").jpeg().toBuffer(), "ok"],
    ["tiff", await solid(20, 20, 3, red).tiff().toBuffer(), "ok"],
  ];
  await timed("odd images", 5000, async () => {
    for (const [name, bytes, expected] of cases) {
      assert.equal(await decodeOutcome(bytes), expected, name);
      if (expected !== "ok") continue;
      const px = await decodeImage(name, bytes, { size: 4, maxPixels: 1e6 });
      const [r, g, b] = [0, 1, 2].map((c) => mean(px, c));
      if (/gray/.test(name)) assert.ok(Math.abs(r - g) <= 1 && Math.abs(g - b) <= 1 && r > 40, `${name} is grey: ${r} ${g} ${b}`);
      else assert.ok(r > 150 && g < 80 && b < 80, `${name} stays red: ${r} ${g} ${b}`);
    }
  });
});

// ---------------------------------------------------------------- configs

/** The canonical option key of a flag or YAML key as config.ts reads it, or undefined. */
function canonical(name: string): string | undefined {
  const k = name.replace(/^-+/, "").replace(/[-_]([a-z])/g, (_, c: string) => c.toUpperCase());
  return OPTION_SPECS.some((s) => s.key === k) ? k : undefined;
}

/** Every field of a resolved JobOptions is of its type, within its range and choices, and the cross-field rules hold. */
function assertValid(o: JobOptions): void {
  for (const s of OPTION_SPECS) {
    const v = (o as unknown as Record<string, unknown>)[s.key];
    const spec = s as { kind: string; min?: number; max?: number; choices?: readonly string[] };
    if (spec.kind === "string") {
      assert.equal(typeof v, "string", s.key);
      if (spec.choices) assert.ok(spec.choices.includes(v as string), `${s.key}=${String(v)}`);
    } else if (spec.kind === "bool") {
      assert.equal(typeof v, "boolean", s.key);
    } else {
      assert.ok(typeof v === "number" && Number.isFinite(v), `${s.key}=${String(v)}`);
      if (spec.kind === "int") assert.ok(Number.isInteger(v), `${s.key}=${v}`);
      if (spec.min !== undefined) assert.ok(v >= spec.min, `${s.key}=${v}`);
      if (spec.max !== undefined) assert.ok(v <= spec.max, `${s.key}=${v}`);
    }
  }
  assert.match(o.job, /^[a-zA-Z0-9][a-zA-Z0-9_-]{0,62}$/);
  assert.ok(o.valSplit + o.testSplit < 0.9);
  for (const k of ["data", "model", "featureLayer", "fineTuneLayers"] as const) assert.notEqual(o[k].trim(), "", k);
  if (o.nats) for (const u of o.nats.split(",")) assert.match(u.trim(), /^((nats|tls|wss?):\/\/[^\s/]+|[^\s/:]+:\d+)/);
}

/** A ConfigError whose one-line message names one of `names`; anything else fails. */
function assertNames(err: unknown, names: string[], what: string): void {
  if (!(err instanceof ConfigError)) throw new Error(`${what}: threw ${String(err)}`, { cause: err });
  assert.doesNotMatch(err.message, /\n/, `one-line message: ${err.message}`);
  assert.ok(names.some((n) => err.message.includes(n)), `${err.message} names none of ${JSON.stringify(names)} (${what})`);
}

const KEYS = OPTION_SPECS.map((s) => s.key as string);
const NASTY_STRINGS = ["", " ", "NaN", "Infinity", "-Infinity", "1e400", "-1", "0", "0x10", "1e3", "8", "32", "96", "224", "0.5", "0.45", "0.95", "1.5", "avg", "mean", "cached", "augment", "wasm", "gpu", "fp16", "nats://a:4222", "nats://a:4222,b:4223", "http://x:4222", "localhost", "nats://", "a b", "a.b", "job_1", "--", "-5", "x\ny", "ünï", "2147483648"];
const keyName = fc.oneof(
  { weight: 6, arbitrary: fc.constantFrom(...KEYS).chain((k) => fc.constantFrom(flagName(k), k, flagName(k).replace(/-/g, "_"))) },
  { weight: 1, arbitrary: fc.string({ maxLength: 12 }) },
);
const scalar = fc.oneof(
  fc.integer({ min: -5, max: 300 }),
  fc.integer(),
  fc.double(),
  fc.constantFrom(NaN, Infinity, -Infinity, 1e308, 2 ** 53, -0, 0.1, 0.5, 0.9),
  fc.boolean(),
  fc.constant(null),
  fc.constantFrom(...NASTY_STRINGS),
  fc.string({ maxLength: 16 }),
);
const yamlValue = fc.oneof({ weight: 8, arbitrary: scalar }, { weight: 1, arbitrary: fc.array(scalar, { maxLength: 3 }) }, { weight: 1, arbitrary: fc.dictionary(fc.string({ maxLength: 4 }), scalar, { maxKeys: 2 }) });

test("fuzz - config files: random YAML mappings give valid options or a ConfigError naming the key", async () => {
  let n = 0;
  let ok = 0;
  await timed("random YAML configs", 8000, () => {
    fc.assert(
      fc.property(fc.array(fc.tuple(keyName, yamlValue), { maxLength: 6 }), (pairs) => {
        const doc = Object.fromEntries(pairs);
        const file = join(tmp, `job-${n++ % 8}.yaml`);
        writeFileSync(file, toYaml(doc));
        const names = Object.keys(doc).flatMap((k) => [JSON.stringify(k).slice(0, 70), ...(canonical(k) ? [`--${flagName(canonical(k)!)}`] : [])]);
        try {
          assertValid(resolveOptions(readConfigFile(file)));
          ok++;
        } catch (err) {
          if (err instanceof assert.AssertionError) throw err;
          assertNames(err, names, toYaml(doc));
        }
      }),
      { seed: SEED, numRuns: 1000 },
    );
  });
  assert.ok(ok > 25, `${ok} of 1000 configs valid`);
});

test("fuzz - config files: random YAML text, aliases and cycles give options or a one-line ConfigError", async () => {
  const texts = fc.oneof(
    fc.string({ unit: fc.constantFrom(..."ab:-[]{}&*!|>'\"#%@`, \n\t?.0123456789".split("")), maxLength: 60 }),
    fc.array(fc.tuple(fc.constantFrom(...KEYS.map(flagName)), fc.constantFrom("[1, 2]", "{a: 1}", "&a [*a]", "*nope", "!!binary aGk=", "!!str 12", "!!int x", "'unterminated", ".nan", ".inf", "-.inf", "0o17", "~", "yes", "1_000", "2001-12-14")), { maxLength: 4 }).map((l) => l.map(([k, v]) => `${k}: ${v}`).join("\n")),
  );
  let i = 0;
  await timed("random YAML text", 8000, () => {
    fc.assert(
      fc.property(texts, (text) => {
        const file = join(tmp, `text-${i++ % 8}.yaml`);
        writeFileSync(file, text);
        try {
          assertValid(resolveOptions(readConfigFile(file)));
        } catch (err) {
          if (err instanceof assert.AssertionError) throw err;
          assertNames(err, ["--", "Unknown key", file], JSON.stringify(text));
        }
      }),
      { seed: SEED, numRuns: 1000 },
    );
  });
});

test("fuzz - flags: random argument vectors give valid options or a ConfigError naming the flag", async () => {
  const value = fc.oneof(fc.constantFrom(...NASTY_STRINGS), fc.integer().map(String), fc.double().map(String), fc.string({ maxLength: 10 }));
  const flag = fc.oneof({ weight: 8, arbitrary: fc.constantFrom(...KEYS.map(flagName)) }, { weight: 1, arbitrary: fc.string({ maxLength: 8 }) });
  const token = fc.oneof(
    fc.tuple(flag, value).map(([f, v]) => [`--${f}`, v]),
    fc.tuple(flag, value).map(([f, v]) => [`--${f}=${v}`]),
    flag.map((f) => [`--${f}`]),
    value.map((v) => [v]),
  );
  let ok = 0;
  await timed("random flags", 5000, () => {
    fc.assert(
      fc.property(fc.array(token, { maxLength: 6 }), (tokens) => {
        const argv = tokens.flat();
        const names = argv.filter((a) => a.startsWith("--")).flatMap((a) => {
          const name = a.slice(2).split("=")[0];
          const c = canonical(name);
          const shown = name.replace(/[\u0000-\u001f\u007f]/g, (ch) => JSON.stringify(ch).slice(1, -1));
          return [`--${shown.slice(0, 70)}`, ...(c ? [`--${flagName(c)}`] : [])];
        });
        try {
          const parsed = parseArgs(argv, [], ["help"]);
          const resolved = resolveOptions(parsed.options);
          assertValid(resolved);
          // Resolved options are passed on (the Kubernetes launcher, the job spec): resolving again changes nothing.
          assert.deepEqual(resolveOptions(resolved), resolved);
          ok++;
        } catch (err) {
          if (err instanceof assert.AssertionError) throw err;
          assertNames(err, names, JSON.stringify(argv));
        }
      }),
      { seed: SEED, numRuns: 3000 },
    );
  });
  assert.ok(ok > 50, `${ok} of 3000 argument vectors valid`);
});

test("fuzz - configs: wrong types and impossible values are refused naming the option", () => {
  const refused: [Record<string, unknown>, RegExp][] = [
    [{ epochs: [1, 2] }, /--epochs .* must be a number, got \[1,2\]/],
    [{ epochs: { a: 1 } }, /--epochs .* must be a number/],
    [{ epochs: true }, /--epochs .* must be a number, got true/],
    [{ epochs: NaN }, /--epochs .* must be a number/],
    [{ "learning-rate": Infinity }, /--learning-rate .* must be a number/],
    [{ "batch-size": 0 }, /--batch-size .* between 1 and 65536, got 0/],
    [{ "batch-size": -1 }, /--batch-size .* between 1 and 65536, got -1/],
    [{ workers: 1e12 }, /--workers .* between 1 and 4096/],
    [{ "input-size": 8 }, /--input-size .* between 32 and 1024, got 8/],
    [{ "input-size": 96.5 }, /--input-size .* whole number/],
    [{ "input-size": "big" }, /--input-size .* must be a number, got "big"/],
    [{ pooling: ["avg"] }, /--pooling .* must be a string/],
    [{ data: { path: "/x" } }, /--data .* must be a string/],
    [{ data: "" }, /--data must not be empty/],
    [{ model: " " }, /--model must not be empty/],
    [{ "val-split": 0.5, "test-split": 0.45 }, /--val-split \+ --test-split/],
    [{ "val-split": 0.6 }, /--val-split .* between 0 and 0.5/],
    [{ job: "my job" }, /--job "my job" must be/],
    [{ job: "my.job" }, /--job "my.job" must be/],
    [{ job: "x".repeat(64) }, /--job "x{64}" must be/],
    [{ job: "-x" }, /--job "-x" must be/],
    [{ nats: "http://localhost:4222" }, /--nats "http:\/\/localhost:4222" is not a NATS URL/],
    [{ nats: "nats://a:4222," }, /--nats "" is not a NATS URL/],
    [{ nats: "localhost" }, /--nats "localhost" is not a NATS URL/],
    [{ "fine-tune-layers": " " }, /--fine-tune-layers must be/],
  ];
  for (const [doc, re] of refused) {
    const file = join(tmp, "wrong.yaml");
    writeFileSync(file, toYaml(doc));
    assert.throws(() => resolveOptions(readConfigFile(file)), (err: unknown) => err instanceof ConfigError && re.test(err.message) && !err.message.includes("\n"), `${JSON.stringify(doc)} -> ${re}`);
  }
  // A cycle made with YAML aliases is named, not a TypeError from JSON.stringify.
  const cyc = join(tmp, "cycle.yaml");
  writeFileSync(cyc, "epochs: &a [*a]\n");
  assert.throws(() => readConfigFile(cyc), /--epochs .* must be a number, got a list/);
  // A YAML syntax error is one line, with its position.
  writeFileSync(cyc, "epochs: 3\ninput-size: [96\n");
  assert.throws(() => readConfigFile(cyc), (err: unknown) => err instanceof ConfigError && /not valid YAML: .* at line \d+, column \d+\.$/.test(err.message) && !err.message.includes("\n"));
  // A long data folder name still gives a valid job id.
  const o = resolveOptions({ data: `/data/${"a_very_long_folder_name_".repeat(5)}/` });
  assertValid(o);
  assert.match(o.job, /^ctrain-a-very-long-folder-name-a-very-long-fold-\d{8}-\d{6}$/);
});

// ---------------------------------------------------------------- feature cache

function shard(rows: number, dim: number): FeatureShardData {
  return {
    shardId: "s-000",
    ids: Array.from({ length: rows }, (_, i) => `train/${i}`),
    labels: Array.from({ length: rows }, (_, i) => i % 3),
    splits: Array.from({ length: rows }, (_, i) => (["train", "val", "test"] as const)[i % 3]),
    features: Float32Array.from({ length: rows * dim }, (_, i) => i / 7),
    skipped: [{ id: "train/bad", reason: "corrupt", message: "bad" }],
  };
}

/** decodeShard's outcome: "ok" with consistent rows, or "damaged" (a clear Error); anything else fails. */
function shardOutcome(buf: Buffer): string {
  try {
    const s = decodeShard(buf, "fuzz.bin");
    const rows = s.ids.length;
    assert.equal(s.labels.length, rows);
    assert.equal(s.splits.length, rows);
    for (const sp of s.splits) assert.ok(sp === "train" || sp === "val" || sp === "test");
    if (rows === 0) assert.equal(s.features.length, 0);
    else assert.equal(s.features.length % rows, 0);
    return "ok";
  } catch (err) {
    if (err instanceof assert.AssertionError) throw err;
    assert.ok(err instanceof Error && /^fuzz\.bin is damaged \(.+\); delete it/.test(err.message), `not a clear error: ${String(err)}`);
    return "damaged";
  }
}

test("fuzz - feature shards: random bytes, truncations and bit flips never decode to rows of the wrong length", async () => {
  const valid = encodeShard(shard(5, 4));
  assert.equal(shardOutcome(valid), "ok");
  const counts = new Map<string, number>();
  await timed("feature shards", 4000, () => {
    for (let n = 0; n < valid.length; n++) assert.equal(shardOutcome(valid.subarray(0, n)), "damaged", `cut at ${n}`);
    fc.assert(fc.property(fc.uint8Array({ maxLength: 128 }), (b) => void shardOutcome(Buffer.from(b))), { seed: SEED, numRuns: 2000 });
    fc.assert(
      fc.property(edits, (list) => {
        const r = shardOutcome(Buffer.from(mutate(valid, list)));
        counts.set(r, (counts.get(r) ?? 0) + 1);
      }),
      { seed: SEED, numRuns: 3000 },
    );
    // Header fields of the wrong type or count, with a correct length prefix.
    const h = JSON.parse(valid.subarray(4, 4 + valid.readUInt32LE(0)).toString()) as Record<string, unknown>;
    const body = valid.subarray(4 + valid.readUInt32LE(0));
    const wrong: Record<string, unknown>[] = [{ n: 21 }, { n: -20 }, { n: "20" }, { n: 1e300 }, { ids: "x" }, { ids: [1, 2, 3, 4, 5] }, { labels: [0] }, { labels: [0, 1, 2, 0, 1.5] }, { splits: [0, 1, 2, 0, 7] }, { splits: null }, { skipped: {} }, { shardId: 3 }];
    for (const w of wrong) {
      const head = Buffer.from(JSON.stringify({ ...h, ...w }));
      const len = Buffer.alloc(4);
      len.writeUInt32LE(head.length);
      assert.equal(shardOutcome(Buffer.concat([len, head, body])), "damaged", JSON.stringify(w));
    }
    const notJson = Buffer.from(valid);
    notJson[4] = 0x7b ^ 0xff;
    assert.throws(() => decodeShard(notJson, "x.bin"), /x\.bin is damaged \(header is not valid JSON\)/);
  });
  assert.ok((counts.get("damaged") ?? 0) > 100 && (counts.get("ok") ?? 0) > 0, JSON.stringify([...counts]));
});

test("fuzz - feature cache entries: damaged files fail load with a clear error, never features of the wrong length", async () => {
  const cache = new FeatureCache(join(tmp, "cache"));
  const meta = { featureDim: 4, featureShape: [4], classes: ["a", "b", "c"], model: "m", inputSize: 96, featureLayer: "out_relu", pooling: "avg" };
  await cache.putShard("k", shard(6, 4));
  const committed = await cache.commit("k", meta, [...shard(6, 4).ids, "train/bad"]);
  const dir = cache.entryDir("k");
  const files = ["features.f32", "index.json", "meta.json", "skipped.json"];
  const originals = Object.fromEntries(await Promise.all(files.map(async (f) => [f, await readFile(join(dir, f))] as const)));
  const outcomes = new Map<string, number>();
  let last = files[0];
  await timed("feature cache load", 8000, async () => {
    await fc.assert(
      fc.asyncProperty(fc.constantFrom(...files), edits, async (file, list) => {
        if (last !== file) await writeFile(join(dir, last), originals[last]);
        await writeFile(join(dir, file), mutate(originals[file], list));
        last = file;
        try {
          const set = await cache.load("k");
          assert.equal(set.features.length, set.ids.length * set.meta.featureDim, "features match the index");
          assert.equal(set.labels.length, set.ids.length);
          for (const l of set.labels) assert.ok(l >= 0 && l < set.meta.classes.length);
          outcomes.set("ok", (outcomes.get("ok") ?? 0) + 1);
        } catch (err) {
          if (err instanceof assert.AssertionError) throw err;
          assert.ok(err instanceof Error && err.message.startsWith(`feature cache ${dir} is damaged: `) && /delete the folder to rebuild it\.$/.test(err.message), `not a clear error: ${String(err)}`);
          outcomes.set(file, (outcomes.get(file) ?? 0) + 1);
        }
      }),
      { seed: SEED, numRuns: 400 },
    );
  });
  for (const f of files) assert.ok((outcomes.get(f) ?? 0) > 0 || f === "skipped.json", `${f}: ${JSON.stringify([...outcomes])}`);
  // Restored, it loads as committed.
  for (const f of files) await writeFile(join(dir, f), originals[f]);
  assert.deepEqual((await cache.load("k")).features, committed.features);
});

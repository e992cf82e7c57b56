/**
 * Data set layer on real data: Debian's Fashion-MNIST, and folder data sets made with sharp at test
 * time in a temp dir (real PNG/JPEG/WebP images plus every kind of bad input we promise to refuse).
 */
import assert from "node:assert/strict";
import { existsSync } from "node:fs";
import { mkdir, mkdtemp, readFile, rm, utimes, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, test } from "node:test";
import { crc32, deflateSync, gzipSync } from "node:zlib";
import sharp, { type Sharp } from "sharp";
import { BadInputError, ConfigError } from "../core/runtime/errors.js";
import { loadIdxSet } from "../core/datasets/idx.js";
import { FASHION_MNIST_DIR, openDataset, type OpenOptions } from "../core/datasets/open.js";
import { applyLimit, stratifiedSplit, stratifiedSubset } from "../core/datasets/splits.js";
import type { Dataset, SampleRef, Split } from "../core/datasets/types.js";

const OPTS: OpenOptions = { seed: 42, valSplit: 0.1, testSplit: 0.1, limit: 0, maxPixels: 40_000_000 };
const HAVE_FMNIST = existsSync(FASHION_MNIST_DIR);
const fmnistSkip = HAVE_FMNIST ? false : `${FASHION_MNIST_DIR} missing (apt-get install dataset-fashion-mnist)`;

let tmp: string;
before(async () => {
  tmp = await mkdtemp(join(tmpdir(), "ctrain-datasets-"));
});
after(async () => {
  await rm(tmp, { recursive: true, force: true });
});

/** Deterministic pseudo-random bytes (a fixture must not depend on luck). */
function prng(seed: number): () => number {
  let x = seed >>> 0 || 1;
  return () => {
    x ^= x << 13;
    x >>>= 0;
    x ^= x >>> 17;
    x ^= x << 5;
    x >>>= 0;
    return x & 0xff;
  };
}
function randomBytes(n: number, seed: number): Buffer {
  const r = prng(seed);
  return Buffer.from(Array.from({ length: n }, r));
}

/** A w x h RGB image, a gradient tinted by `tint`, as raw input for sharp. */
function rgbImage(w: number, h: number, tint: [number, number, number], seed = 1): Sharp {
  const r = prng(seed);
  const data = Buffer.alloc(w * h * 3);
  for (let y = 0; y < h; y++)
    for (let x = 0; x < w; x++)
      for (let c = 0; c < 3; c++) data[(y * w + x) * 3 + c] = Math.min(255, (tint[c] * 0.7 + ((x + y) * 2) % 60 + (r() % 16)) | 0);
  return sharp(data, { raw: { width: w, height: h, channels: 3 } });
}

function pngChunk(type: string, data: Buffer): Buffer {
  const len = Buffer.alloc(4);
  len.writeUInt32BE(data.length);
  const body = Buffer.concat([Buffer.from(type, "ascii"), data]);
  const crc = Buffer.alloc(4);
  crc.writeUInt32BE(crc32(body) >>> 0);
  return Buffer.concat([len, body, crc]);
}

/** A small valid-looking PNG whose header claims w x h grey pixels: a decompression bomb's calling card. */
function bombPng(w: number, h: number): Buffer {
  const ihdr = Buffer.alloc(13);
  ihdr.writeUInt32BE(w, 0);
  ihdr.writeUInt32BE(h, 4);
  ihdr[8] = 8; // bit depth
  ihdr[9] = 0; // greyscale
  const rows = deflateSync(Buffer.alloc((w + 1) * 4)); // a few zero rows; the rest would follow if anyone asked
  return Buffer.concat([Buffer.from([0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a]), pngChunk("IHDR", ihdr), pngChunk("IDAT", rows), pngChunk("IEND", Buffer.alloc(0))]);
}

const CLASSES = ["cats", "dogs", "fish"] as const;
const TINTS: Record<(typeof CLASSES)[number], [number, number, number]> = { cats: [220, 120, 40], dogs: [40, 200, 90], fish: [30, 80, 230] };
const PER_CLASS = 12;

/** Bad files put in cats/, and the reason each must be refused with (at listing or at decoding). */
const BAD: Record<string, string> = {
  "cats/random.jpg": "not_an_image", // random bytes: no image format at all
  "cats/broken.jpg": "corrupt", // a real JPEG with its Huffman tables overwritten
  "cats/truncated.jpg": "truncated", // the first half of a real JPEG
  "cats/truncated.png": "truncated", // a real PNG cut before IEND
  "cats/zero.png": "empty",
  "cats/text.png": "not_an_image",
  "cats/tiny.png": "too_small", // 1x1
  "cats/bomb.png": "too_many_pixels", // header says 100000 x 100000
  "cats/notes.txt": "not_an_image", // wrong extension: refused at listing
};
/** Unusual but valid images that must decode. */
const ODD_GOOD = ["dogs/cmyk.jpg", "dogs/deep16.png", "dogs/rgba.png", "dogs/gray.png", "dogs/UPPER.JPEG"];

async function makeFolder(name: string): Promise<string> {
  const root = join(tmp, name);
  for (const [ci, c] of CLASSES.entries()) {
    await mkdir(join(root, c), { recursive: true });
    for (let i = 0; i < PER_CLASS; i++) {
      const img = rgbImage(40 + i, 30 + ci, TINTS[c], i + 10 * ci);
      const fmt = i % 3 === 0 ? "png" : i % 3 === 1 ? "jpg" : "webp";
      const enc = fmt === "png" ? img.png() : fmt === "jpg" ? img.jpeg({ quality: 90 }) : img.webp();
      await enc.toFile(join(root, c, `${String(i).padStart(3, "0")}.${fmt}`));
    }
  }
  // A nested folder counts for its class, like Keras.
  await mkdir(join(root, "fish", "deep"), { recursive: true });
  await rgbImage(33, 33, TINTS.fish).png().toFile(join(root, "fish", "deep", "nested.png"));
  // Hidden files and folders are ignored, silently.
  await writeFile(join(root, "cats", ".DS_Store"), "junk");
  await mkdir(join(root, ".thumbs"), { recursive: true });
  await writeFile(join(root, "README.txt"), "files at the root are not samples");

  const jpg = await rgbImage(64, 48, TINTS.cats).jpeg().toBuffer();
  const png = await rgbImage(64, 48, TINTS.cats).png().toBuffer();
  await writeFile(join(root, "cats/random.jpg"), randomBytes(3000, 7));
  const broken = Buffer.from(jpg);
  const dht = broken.indexOf(Buffer.from([0xff, 0xc4])); // the Huffman tables, overwritten; the file stays whole
  broken.fill(0xff, dht + 5, dht + 25);
  await writeFile(join(root, "cats/broken.jpg"), broken);
  await writeFile(join(root, "cats/truncated.jpg"), jpg.subarray(0, jpg.length >> 1));
  await writeFile(join(root, "cats/truncated.png"), png.subarray(0, png.length - 40));
  await writeFile(join(root, "cats/zero.png"), Buffer.alloc(0));
  await writeFile(join(root, "cats/text.png"), "this is a text file, not a PNG\n");
  await sharp({ create: { width: 1, height: 1, channels: 3, background: "red" } }).png().toFile(join(root, "cats/tiny.png"));
  await writeFile(join(root, "cats/bomb.png"), bombPng(100_000, 100_000));
  await writeFile(join(root, "cats/notes.txt"), "not an image");

  await rgbImage(50, 40, TINTS.dogs).toColourspace("cmyk").jpeg().toFile(join(root, "dogs/cmyk.jpg"));
  await rgbImage(50, 40, TINTS.dogs).toColourspace("rgb16").png().toFile(join(root, "dogs/deep16.png"));
  await sharp({ create: { width: 20, height: 20, channels: 4, background: { r: 0, g: 255, b: 0, alpha: 0.5 } } }).png().toFile(join(root, "dogs/rgba.png"));
  await sharp(Buffer.alloc(30 * 30, 150), { raw: { width: 30, height: 30, channels: 1 } }).toColourspace("b-w").png().toFile(join(root, "dogs/gray.png"));
  await rgbImage(30, 30, TINTS.dogs).jpeg().toFile(join(root, "dogs/UPPER.JPEG"));
  return root;
}

function sample(d: Dataset, id: string): SampleRef {
  const s = d.samples.find((x) => x.id === id);
  assert.ok(s, `${id} should be a listed sample`);
  return s;
}

async function rejectsWith(p: Promise<unknown>, reason: string, id: string): Promise<void> {
  await assert.rejects(p, (err: unknown) => {
    assert.ok(err instanceof BadInputError, `${id}: expected BadInputError, got ${String(err)}`);
    assert.equal(err.reason, reason, `${id}: ${err.message}`);
    assert.equal(err.id, id);
    return true;
  });
}

function countBy<T>(xs: Iterable<T>, key: (x: T) => string | number): Map<string | number, number> {
  const m = new Map<string | number, number>();
  for (const x of xs) m.set(key(x), (m.get(key(x)) ?? 0) + 1);
  return m;
}

// ---- Fashion-MNIST (real data) ----

test("datasets - fashion-mnist with limit 270 keeps 270/30/50 (val and test in their splits' proportion to train), 27/3/5 per class", { skip: fmnistSkip }, async () => {
  const d = await openDataset("fashion-mnist", { ...OPTS, limit: 270 });
  assert.equal(d.name, "fashion-mnist");
  assert.deepEqual(d.classes, ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]);
  assert.deepEqual(d.skipped, []);
  const bySplit = countBy(d.samples, (s) => s.split);
  // 54,000 train / 6,000 val / 10,000 test before the limit.
  assert.deepEqual(Object.fromEntries(bySplit), { train: 270, val: 30, test: 50 });
  for (const split of ["train", "val", "test"] as Split[]) {
    const perClass = countBy(d.samples.filter((s) => s.split === split), (s) => s.label);
    assert.equal(perClass.size, 10, `${split} has every class`);
    for (const [label, n] of perClass) assert.equal(n, { train: 27, val: 3, test: 5 }[split], `${split} class ${label}`);
  }
  for (const s of d.samples) {
    const m = /^fashion-mnist\/(train|test)\/(\d+)$/.exec(s.id);
    assert.ok(m, s.id);
    assert.equal(m[1] === "test", s.split === "test", `${s.id} is in ${s.split}`);
  }
});

test("datasets - fashion-mnist full listing: 54000/6000/10000, stratified, fast once parsed", { skip: fmnistSkip }, async () => {
  await openDataset("fashion-mnist", OPTS); // parse (and gunzip) once
  const t0 = performance.now();
  const d = await openDataset("fashion-mnist", OPTS);
  const ms = performance.now() - t0;
  assert.ok(ms < 1000, `listing 70k samples took ${ms.toFixed(0)} ms`);
  assert.deepEqual(Object.fromEntries(countBy(d.samples, (s) => s.split)), { train: 54000, val: 6000, test: 10000 });
  for (const [, n] of countBy(d.samples.filter((s) => s.split === "val"), (s) => s.label)) assert.equal(n, 600);
  const order = d.samples.map((s) => ["train", "val", "test"].indexOf(s.split));
  for (let i = 1; i < order.length; i++) assert.ok(order[i] >= order[i - 1], "train, then val, then test");
});

test("datasets - fashion-mnist opens identically twice, splits are disjoint, seed and limit change the fingerprint", { skip: fmnistSkip }, async () => {
  const a = await openDataset("fashion-mnist", { ...OPTS, limit: 300 });
  const b = await openDataset("fashion-mnist", { ...OPTS, limit: 300 });
  assert.deepEqual([...a.samples], [...b.samples]);
  assert.equal(a.fingerprint, b.fingerprint);
  assert.match(a.fingerprint, /^[0-9a-f]{64}$/);
  const ids = a.samples.map((s) => s.id);
  assert.equal(new Set(ids).size, ids.length, "no sample in two splits (or twice in one)");

  const c = await openDataset("fashion-mnist", { ...OPTS, limit: 300, seed: 7 });
  assert.notEqual(c.fingerprint, a.fingerprint);
  assert.notDeepEqual(c.samples.map((s) => s.id), ids);
  const e = await openDataset("fashion-mnist", { ...OPTS, limit: 301 });
  assert.notEqual(e.fingerprint, a.fingerprint);
  const f = await openDataset("fashion-mnist", { ...OPTS, limit: 300, valSplit: 0.2 });
  assert.notEqual(f.fingerprint, a.fingerprint);
});

test("datasets - fashion-mnist readRgb gives 96x96x3 grey images with plausible values, concurrently", { skip: fmnistSkip }, async () => {
  const d = await openDataset("fashion-mnist", { ...OPTS, limit: 300 });
  const picks = d.samples.filter((_, i) => i % 17 === 0);
  const imgs = await Promise.all(picks.map((s) => d.readRgb(s, 96)));
  for (const [k, px] of imgs.entries()) {
    assert.ok(px instanceof Uint8Array);
    assert.equal(px.length, 96 * 96 * 3);
    let sum = 0;
    let max = 0;
    for (let i = 0; i < px.length; i += 3) {
      assert.ok(px[i] === px[i + 1] && px[i] === px[i + 2], `${picks[k].id}: channels equal`);
      sum += px[i];
      max = Math.max(max, px[i]);
    }
    const mean = sum / (96 * 96);
    assert.ok(mean > 5 && mean < 200, `${picks[k].id}: mean ${mean}`);
    assert.ok(max > 100, `${picks[k].id}: max ${max}`);
    assert.equal(px[0], 0, "Fashion-MNIST corners are black");
  }
  // Native size is passed through untouched, and equals the IDX bytes.
  const first = d.samples.find((s) => s.id === "fashion-mnist/test/0") ?? { id: "fashion-mnist/test/0", label: 9, split: "test" as Split };
  const px28 = await d.readRgb(first, 28);
  assert.equal(px28.length, 28 * 28 * 3);
  await rejectsWith(d.readRgb({ id: "fashion-mnist/train/99999999", label: 0, split: "train" }, 96), "unknown_sample", "fashion-mnist/train/99999999");
});

test("datasets - fashion-mnist missing is a ConfigError that says how to install it", async () => {
  const saved = process.env.CTRAIN_FASHION_MNIST_DIR;
  process.env.CTRAIN_FASHION_MNIST_DIR = join(tmp, "no-such-dir");
  try {
    await assert.rejects(openDataset("fashion-mnist", OPTS), (err: unknown) => err instanceof ConfigError && /apt-get install dataset-fashion-mnist/.test(err.message));
  } finally {
    if (saved === undefined) delete process.env.CTRAIN_FASHION_MNIST_DIR;
    else process.env.CTRAIN_FASHION_MNIST_DIR = saved;
  }
});

// ---- IDX files ----

function idxImages(count: number, rows: number, cols: number, fill: (i: number) => number): Buffer {
  const b = Buffer.alloc(16 + count * rows * cols);
  b.writeUInt32BE(0x803, 0);
  b.writeUInt32BE(count, 4);
  b.writeUInt32BE(rows, 8);
  b.writeUInt32BE(cols, 12);
  for (let i = 0; i < count * rows * cols; i++) b[16 + i] = fill(i);
  return b;
}
function idxLabels(labels: number[]): Buffer {
  const b = Buffer.alloc(8 + labels.length);
  b.writeUInt32BE(0x801, 0);
  b.writeUInt32BE(labels.length, 4);
  labels.forEach((l, i) => (b[8 + i] = l));
  return b;
}
async function writeIdx(dir: string, files: Partial<Record<"trainImages" | "trainLabels" | "testImages" | "testLabels", Buffer>>, gz: boolean): Promise<string> {
  await mkdir(dir, { recursive: true });
  const names = { trainImages: "train-images-idx3-ubyte", trainLabels: "train-labels-idx1-ubyte", testImages: "t10k-images-idx3-ubyte", testLabels: "t10k-labels-idx1-ubyte" };
  const labels = (n: number) => Array.from({ length: n }, (_, i) => i % 10);
  const all = { trainImages: idxImages(100, 28, 28, (i) => i % 251), trainLabels: idxLabels(labels(100)), testImages: idxImages(20, 28, 28, (i) => i % 13), testLabels: idxLabels(labels(20)), ...files };
  for (const [k, v] of Object.entries(all)) await writeFile(join(dir, names[k as keyof typeof names] + (gz ? ".gz" : "")), gz ? gzipSync(v) : v);
  return dir;
}

test("datasets - mnist:<dir> reads plain and gzipped IDX files", async () => {
  for (const gz of [false, true]) {
    const dir = await writeIdx(join(tmp, `idx-ok-${gz}`), {}, gz);
    const d = await openDataset(`mnist:${dir}`, OPTS);
    assert.deepEqual(d.classes, ["0", "1", "2", "3", "4", "5", "6", "7", "8", "9"]);
    assert.deepEqual(Object.fromEntries(countBy(d.samples, (s) => s.split)), { train: 90, val: 10, test: 20 });
    assert.ok(d.samples.every((s) => /^mnist\/(train|test)\/\d+$/.test(s.id)));
    const px = await d.readRgb(sample(d, "mnist/train/0"), 28);
    assert.deepEqual([...px.subarray(0, 9)], [0, 0, 0, 1, 1, 1, 2, 2, 2]);
    assert.equal((await d.readRgb(sample(d, "mnist/train/0"), 64)).length, 64 * 64 * 3);
    // Uncompressed images stay on disk and are read by offset; gzipped ones have no offsets and are inflated.
    const set = await loadIdxSet(dir);
    assert.equal(set.train.images.pixels === undefined, !gz);
    const last = await d.readRgb(sample(d, "mnist/test/19"), 28);
    assert.deepEqual([...last.subarray(0, 3)], [(19 * 784) % 13, (19 * 784) % 13, (19 * 784) % 13]);
  }
  // The cache key's content hash does not depend on how the files are read.
  const plain = await loadIdxSet(join(tmp, "idx-ok-false"));
  const gzipped = await loadIdxSet(join(tmp, "idx-ok-true"));
  assert.notEqual(plain.contentHash, gzipped.contentHash, "stored bytes differ");
  const { createHash } = await import("node:crypto");
  const h = createHash("sha256");
  for (const n of ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]) h.update(await readFile(join(tmp, "idx-ok-false", n)));
  assert.equal(plain.contentHash, h.digest("hex"), "sha256 of the four files back to back, as before images were streamed");
});

test("datasets - IDX with wrong magic, bad length, bad labels or broken gzip is a ConfigError naming the file", async () => {
  const wrongMagic = idxImages(100, 28, 28, () => 0);
  wrongMagic.writeUInt32BE(0x801, 0);
  const cases: [string, Parameters<typeof writeIdx>[1], boolean, RegExp][] = [
    ["magic", { trainImages: wrongMagic }, false, /train-images-idx3-ubyte.*magic number 0x00000801, expected 0x00000803/],
    ["magic-labels", { testLabels: idxImages(20, 28, 28, () => 0) }, true, /t10k-labels-idx1-ubyte\.gz.*magic/],
    ["truncated", { trainImages: idxImages(100, 28, 28, () => 1).subarray(0, 16 + 50 * 784) }, false, /train-images-idx3-ubyte is 39216 bytes .* truncated/],
    ["too-long", { testLabels: Buffer.concat([idxLabels([1, 2]), Buffer.alloc(3)]) }, false, /t10k-labels-idx1-ubyte.*too long/],
    ["count-mismatch", { trainLabels: idxLabels([1, 2, 3]) }, false, /do not match/],
    ["label-range", { trainLabels: idxLabels(Array.from({ length: 100 }, (_, i) => (i === 37 ? 12 : 0))) }, false, /label 12 at index 37 is out of range/],
    ["header-only", { testImages: Buffer.from([0, 0, 8]) }, false, /t10k-images-idx3-ubyte.*too short/],
  ];
  for (const [name, files, gz, re] of cases) {
    const dir = await writeIdx(join(tmp, `idx-${name}`), files, gz);
    await assert.rejects(openDataset(`idx:${dir}`, OPTS), (err: unknown) => {
      assert.ok(err instanceof ConfigError, `${name}: ${String(err)}`);
      assert.match(err.message, re, name);
      return true;
    });
  }
  // A gzip stream cut in half.
  const dir = await writeIdx(join(tmp, "idx-badgz"), {}, true);
  const gz = await readFile(join(dir, "train-images-idx3-ubyte.gz"));
  await writeFile(join(dir, "train-images-idx3-ubyte.gz"), gz.subarray(0, gz.length >> 1));
  await assert.rejects(openDataset(`idx:${dir}`, OPTS), (err: unknown) => err instanceof ConfigError && /train-images-idx3-ubyte\.gz.*gzip/.test(err.message));
  // A missing file.
  await rm(join(dir, "t10k-labels-idx1-ubyte.gz"));
  await assert.rejects(openDataset(`idx:${dir}`, OPTS), (err: unknown) => err instanceof ConfigError && /t10k-labels-idx1-ubyte/.test(err.message));
});

// ---- Folders ----

let folder: string;
test("datasets - folder lists classes by sorted sub-folder, ids relative to the root, refuses at listing", async () => {
  folder = await makeFolder("pets");
  const d = await openDataset(folder, OPTS);
  assert.equal(d.name, folder);
  assert.deepEqual(d.classes, ["cats", "dogs", "fish"]);
  const ids = d.samples.map((s) => s.id);
  assert.ok(ids.includes("cats/000.png") && ids.includes("dogs/UPPER.JPEG") && ids.includes("fish/deep/nested.png"));
  assert.ok(!ids.some((id) => id.includes(".DS_Store") || id.startsWith("README")), "hidden and root files are not samples");
  for (const s of d.samples) assert.equal(s.label, d.classes.indexOf(s.id.split("/")[0]), s.id);
  const skipped = Object.fromEntries(d.skipped.map((s) => [s.id, s.reason]));
  assert.deepEqual(skipped, { "cats/notes.txt": "not_an_image", "cats/zero.png": "empty" });
  // Every file with an image extension and bytes is listed; decoding decides the rest.
  const expected = 3 * PER_CLASS + 1 + Object.keys(BAD).length - 2 + ODD_GOOD.length;
  assert.equal(d.samples.length, expected);
  assert.equal(new Set(ids).size, ids.length);
  for (const [, n] of countBy(d.samples.filter((s) => s.split !== "train"), (s) => s.label)) assert.ok(n >= 2, "each class has val and test samples");
});

test("datasets - folder bad images are refused with the right reason, and a whole pass never throws anything else", async () => {
  const d = await openDataset(folder, OPTS);
  for (const [id, reason] of Object.entries(BAD)) {
    if (d.skipped.some((s) => s.id === id)) {
      assert.equal(d.skipped.find((s) => s.id === id)!.reason, reason, id);
      continue;
    }
    await rejectsWith(d.readRgb(sample(d, id), 96), reason, id);
  }
  // Three passes at once: failures decoded concurrently must still get their own reasons.
  const expectedRefused = Object.fromEntries(Object.entries(BAD).filter(([id]) => !d.skipped.some((s) => s.id === id)));
  const passes = await Promise.all([0, 1, 2].map(() => Promise.allSettled(d.samples.map((s) => d.readRgb(s, 64)))));
  for (const results of passes) {
    const refused = new Map<string, string>();
    results.forEach((r, i) => {
      if (r.status === "fulfilled") assert.equal(r.value.length, 64 * 64 * 3);
      else {
        assert.ok(r.reason instanceof BadInputError, `${d.samples.get(i).id}: ${String(r.reason)}`);
        refused.set(d.samples.get(i).id, r.reason.reason);
      }
    });
    assert.deepEqual(Object.fromEntries(refused), expectedRefused);
  }
});

test("datasets - folder CMYK, 16-bit, RGBA, grayscale and WebP images decode to sane RGB", async () => {
  const d = await openDataset(folder, OPTS);
  const mean = (px: Uint8Array, c: number): number => {
    let s = 0;
    for (let i = c; i < px.length; i += 3) s += px[i];
    return s / (px.length / 3);
  };
  for (const id of [...ODD_GOOD, "cats/002.webp", "fish/001.jpg", "fish/000.png"]) {
    const px = await d.readRgb(sample(d, id), 32);
    assert.equal(px.length, 32 * 32 * 3, id);
    const [r, g, b] = [0, 1, 2].map((c) => mean(px, c));
    if (id.startsWith("dogs/") && id !== "dogs/gray.png" && id !== "dogs/rgba.png") assert.ok(g > r + 30 && g > b + 30, `${id} is green: ${r} ${g} ${b}`);
    if (id.startsWith("fish/")) assert.ok(b > r + 30, `${id} is blue: ${r} ${g} ${b}`);
    if (id.startsWith("cats/")) assert.ok(r > b + 30, `${id} is orange: ${r} ${g} ${b}`);
  }
  const gray = await d.readRgb(sample(d, "dogs/gray.png"), 16);
  for (let i = 0; i < gray.length; i++) assert.equal(gray[i], 150, "grey stays 150 on every channel");
  const rgba = await d.readRgb(sample(d, "dogs/rgba.png"), 16);
  // 50% green over black.
  assert.ok(Math.abs(rgba[1] - 128) <= 2 && rgba[0] === 0 && rgba[2] === 0, `rgba flattened onto black: ${rgba.subarray(0, 3).join(",")}`);
});

test("datasets - folder decompression bomb and --max-pixels are refused before decoding", async () => {
  const root = join(tmp, "big");
  await mkdir(join(root, "a"), { recursive: true });
  await mkdir(join(root, "b"), { recursive: true });
  // A real image over the limit: 3000 x 2000 blank PNG, a few kB.
  await sharp({ create: { width: 3000, height: 2000, channels: 3, background: "white" } }).png().toFile(join(root, "a", "big.png"));
  await writeFile(join(root, "a", "bomb.png"), bombPng(100_000, 100_000));
  await rgbImage(20, 20, [1, 2, 3]).png().toFile(join(root, "b", "ok.png"));
  const d = await openDataset(root, { ...OPTS, maxPixels: 1_000_000 });
  const t0 = performance.now();
  await rejectsWith(d.readRgb(sample(d, "a/big.png"), 96), "too_many_pixels", "a/big.png");
  await rejectsWith(d.readRgb(sample(d, "a/bomb.png"), 96), "too_many_pixels", "a/bomb.png");
  assert.ok(performance.now() - t0 < 2000, "refused from the header, not after decoding");
  const roomy = await openDataset(root, { ...OPTS, maxPixels: 10_000_000 });
  assert.equal((await roomy.readRgb(sample(roomy, "a/big.png"), 8)).length, 8 * 8 * 3);
  assert.notEqual(roomy.fingerprint, d.fingerprint);
});

test("datasets - folder ids from elsewhere are refused, not read", async () => {
  const d = await openDataset(folder, OPTS);
  await rejectsWith(d.readRgb({ id: "../../etc/passwd", label: 0, split: "train" }, 32), "unknown_sample", "../../etc/passwd");
});

test("datasets - folder fingerprint follows file sizes and mtimes; splits are deterministic", async () => {
  const root = await makeFolder("fp");
  const a = await openDataset(root, OPTS);
  const b = await openDataset(root, OPTS);
  assert.equal(a.fingerprint, b.fingerprint);
  assert.deepEqual([...a.samples], [...b.samples]);
  await utimes(join(root, "cats", "000.png"), new Date(2001, 1, 1), new Date(2001, 1, 1));
  const c = await openDataset(root, OPTS);
  assert.notEqual(c.fingerprint, a.fingerprint);
  assert.deepEqual([...c.samples], [...a.samples], "an mtime changes the cache key, not the split");
  const lim = await openDataset(root, { ...OPTS, limit: 10 });
  const n = countBy(lim.samples, (s) => s.split);
  assert.equal(n.get("train"), 10);
  assert.ok((n.get("val") ?? 0) <= 2 && (n.get("test") ?? 0) <= 2);
});

test("datasets - folder with fewer than 2 classes, no images, or no folder is a ConfigError", async () => {
  const one = join(tmp, "one");
  await mkdir(join(one, "only"), { recursive: true });
  await rgbImage(8, 8, [0, 0, 0]).png().toFile(join(one, "only", "x.png"));
  await assert.rejects(openDataset(one, OPTS), (e: unknown) => e instanceof ConfigError && /at least 2/.test(e.message));
  const none = join(tmp, "none");
  await mkdir(join(none, "a"), { recursive: true });
  await mkdir(join(none, "b"), { recursive: true });
  await assert.rejects(openDataset(none, OPTS), (e: unknown) => e instanceof ConfigError && /no .* images/.test(e.message));
  await assert.rejects(openDataset(join(tmp, "missing"), OPTS), ConfigError);
  await assert.rejects(openDataset(folder, { ...OPTS, valSplit: 0.6, testSplit: 0.5 }), ConfigError);
});

// ---- Splits (generic) ----

test("datasets - stratified split keeps class proportions, is seeded, and limit is stratified too", () => {
  const ids = Array.from({ length: 1000 }, (_, i) => `s${i}`);
  const labels = ids.map((_, i) => (i < 700 ? 0 : i < 900 ? 1 : 2));
  const a = stratifiedSplit(ids, labels, { seed: 1, valFraction: 0.1, testFraction: 0.2 });
  assert.deepEqual(stratifiedSplit(ids, labels, { seed: 1, valFraction: 0.1, testFraction: 0.2 }), a);
  assert.notDeepEqual(stratifiedSplit(ids, labels, { seed: 2, valFraction: 0.1, testFraction: 0.2 }), a);
  const count = (split: Split, label: number) => a.filter((s, i) => s === split && labels[i] === label).length;
  assert.deepEqual([count("test", 0), count("test", 1), count("test", 2)], [140, 40, 20]);
  assert.deepEqual([count("val", 0), count("val", 1), count("val", 2)], [70, 20, 10]);
  // The split of an id does not depend on where it sits in the list.
  const rev = stratifiedSplit([...ids].reverse(), [...labels].reverse(), { seed: 1, valFraction: 0.1, testFraction: 0.2 }).reverse();
  assert.deepEqual(rev, a);
  // limit 100: 100 train (70/20/10); val and test keep their proportion to train (100 and 200 to 700).
  const kept = applyLimit(ids, labels, a, 100, 1);
  assert.equal(kept.filter((i) => a[i] === "train").length, 100);
  assert.deepEqual([0, 1, 2].map((l) => kept.filter((i) => a[i] === "train" && labels[i] === l).length), [70, 20, 10]);
  assert.equal(kept.filter((i) => a[i] === "val").length, Math.ceil((100 * 100) / 700));
  assert.equal(kept.filter((i) => a[i] === "test").length, Math.ceil((100 * 200) / 700));
  // --val-split is honoured under --limit: 0.3 gives more validation samples than 0.1.
  const valUnderLimit = (valFraction: number) => {
    const s = stratifiedSplit(ids, labels, { seed: 1, valFraction, testFraction: 0.2 });
    return applyLimit(ids, labels, s, 100, 1).filter((i) => s[i] === "val").length;
  };
  assert.equal(valUnderLimit(0.1), 15);
  assert.equal(valUnderLimit(0.3), 60, "0.3 of the data against 0.5 in train: 100 * 300 / 500");
  // A class of one stays in train.
  assert.deepEqual(stratifiedSplit(["x", "y", "z"], [0, 1, 1], { seed: 3, valFraction: 0.4, testFraction: 0.4 })[0], "train");
  assert.deepEqual(stratifiedSubset(ids, labels, [5, 3, 1], 10, 0), [1, 3, 5]);
});

test("datasets - IDX images are enlarged bilinearly in JS: centre-aligned (mirror-equivariant), close to sharp's linear resize", async () => {
  const { enlargeGrayToRgb, grayToRgb } = await import("../core/datasets/image_decode.js");
  const w = 28, h = 28;
  const src = Uint8Array.from({ length: w * h }, (_, i) => Math.round(127 + 120 * Math.sin((i % w) / 4) * Math.cos(Math.floor(i / w) / 5)));
  for (const size of [32, 96, 224]) {
    const got = enlargeGrayToRgb(src, w, h, size);
    const ref = await sharp(Buffer.from(src), { raw: { width: w, height: h, channels: 1 } }).resize(size, size, { fit: "fill", kernel: "linear" }).extractChannel(0).raw().toBuffer();
    let sum = 0;
    for (let i = 0; i < size * size; i++) {
      assert.ok(got[3 * i] === got[3 * i + 1] && got[3 * i] === got[3 * i + 2], "gray repeated over R, G, B");
      sum += Math.abs(got[3 * i] - ref[i]);
    }
    // sharp (libvips) places the upsampled grid slightly differently; the images agree to a few levels of 0..255.
    assert.ok(sum / (size * size) < 8, `size ${size}: mean abs difference to sharp ${sum / (size * size)}`);
    // Centre alignment: enlarging a mirrored image gives the mirrored enlargement (a shifted grid would not).
    const mirrored = Uint8Array.from({ length: w * h }, (_, i) => src[Math.floor(i / w) * w + (w - 1 - (i % w))]);
    const m = enlargeGrayToRgb(mirrored, w, h, size);
    for (let y = 0; y < size; y++) for (let x = 0; x < size; x++)
      assert.ok(Math.abs(m[3 * (y * size + x)] - got[3 * (y * size + size - 1 - x)]) <= 1, `size ${size}: not mirror-equivariant at ${x},${y}`);
  }
  // Same size: an exact copy; a constant image stays constant; corners keep the corner pixels.
  assert.deepEqual(Array.from(enlargeGrayToRgb(src, w, h, w).filter((_, i) => i % 3 === 0)), Array.from(src));
  assert.ok(enlargeGrayToRgb(new Uint8Array(w * h).fill(77), w, h, 96).every((v) => v === 77));
  const big = await grayToRgb("corner", src, w, h, 96);
  assert.equal(big[0], src[0]);
  assert.equal(big[big.length - 1], src[src.length - 1]);
  // Shrinking still goes through sharp (a filtering kernel): 28 -> 20.
  assert.equal((await grayToRgb("small", src, w, h, 20)).length, 20 * 20 * 3);
});

test("datasets - synthetic:N[:classes] is made from (seed, index): same pixels in any process, balanced labels, splits in proportion", async () => {
  const a = await openDataset("synthetic:3000:4", OPTS);
  const b = await openDataset("synthetic:3000:4", OPTS);
  assert.equal(a.samples.length, 3000);
  assert.deepEqual(a.classes.length, 4);
  assert.equal(a.fingerprint, b.fingerprint);
  assert.notEqual((await openDataset("synthetic:3000:4", { ...OPTS, seed: 43 })).fingerprint, a.fingerprint);
  const count = (s: Split) => a.samples.filter((x) => x.split === s).length;
  assert.ok(Math.abs(count("test") / 3000 - 0.1) < 0.04 && Math.abs(count("val") / 3000 - 0.1) < 0.04, `val ${count("val")} test ${count("test")}`);
  for (let c = 0; c < 4; c++) assert.equal(a.samples.filter((s) => s.label === c).length, 750);
  const s = a.samples.get(17);
  const px = await a.readRgb(s, 32);
  assert.equal(px.length, 32 * 32 * 3);
  assert.deepEqual(await b.readRgb(s, 32), px, "the same image from a second open (a worker)");
  assert.notDeepEqual(await a.readRgb(a.samples.get(18), 32), px);
  await assert.rejects(a.readRgb({ id: "synthetic/3000", label: 0, split: "train" }, 32), BadInputError);
  const limited = await openDataset("synthetic:3000:4", { ...OPTS, limit: 100 });
  assert.equal(limited.samples.filter((x) => x.split === "train").length, 100);
});

test("datasets - synthetic images carry a class signal a linear probe separates", async () => {
  const ds = await openDataset("synthetic:400:2", OPTS);
  // The two classes' gratings are orthogonal: the mean horizontal vs vertical gradient energy tells them apart.
  const energy = async (s: SampleRef): Promise<number> => {
    const px = await ds.readRgb(s, 24);
    let h = 0, v = 0;
    for (let y = 0; y < 23; y++) for (let x = 0; x < 23; x++) {
      const p = (y * 24 + x) * 3;
      h += Math.abs(px[p] - px[p + 3]);
      v += Math.abs(px[p] - px[p + 72]);
    }
    return h - v;
  };
  let right = 0;
  for (const s of ds.samples.slice(0, 100)) if ((await energy(s) > 0) === (s.label === 0)) right++;
  assert.ok(right >= 90, `${right}/100 told apart by gradient direction`);
});

test("datasets - synthetic with N <= 0, classes < 2 or a malformed spec is a ConfigError naming --data, before any work", async () => {
  for (const spec of ["synthetic:0", "synthetic:-5", "synthetic:100:1", "synthetic:100:0", "synthetic:abc", "synthetic:10:2:3", "synthetic:", "synthetic:1:5"])
    await assert.rejects(openDataset(spec, OPTS), (e: unknown) => e instanceof ConfigError && e.message.includes(`--data ${spec}`), spec);
  // The spec is refused even when the other options are bad too: it is checked first.
  await assert.rejects(openDataset("synthetic:0", { ...OPTS, valSplit: 2 }), /N must be at least 1/);
});

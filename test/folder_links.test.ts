/**
 * Folder data sets as people (and attackers) leave them: a symlink loop, a link into another class,
 * an empty class folder, a GIF or an SVG called .png; then a fuzz of random trees (nesting, odd names,
 * hidden entries, empty and non-image files, links to the root, a parent, another class, the own class,
 * files and nowhere) whose listing must equal a reference walk of the real files: every real image
 * once, with its own class's label, and only classes that have images.
 */
import assert from "node:assert/strict";
import { lstatSync, mkdirSync, mkdtempSync, realpathSync, rmSync, symlinkSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { basename, dirname, join, relative } from "node:path";
import { after, test } from "node:test";
import fc from "fast-check";
import sharp from "sharp";
import { openFolderDataset } from "../core/datasets/folder.js";
import { BadInputError, ConfigError } from "../core/runtime/errors.js";

const dirs: string[] = [];
after(() => {
  for (const d of dirs) rmSync(d, { recursive: true, force: true });
});
function tempDir(): string {
  const d = mkdtempSync(join(tmpdir(), "ctrain-folders-"));
  dirs.push(d);
  return d;
}
const open = (root: string) => openFolderDataset({ root, seed: 3, valSplit: 0.2, testSplit: 0.2, limit: 0, maxPixels: 1e7 });
const png = (v: number): Promise<Buffer> => sharp({ create: { width: 8, height: 8, channels: 3, background: { r: v, g: 0, b: 0 } } }).png().toBuffer();

test("folders - a symlink loop (ln -s .. a/up) neither multiplies nor relabels samples", async () => {
  const root = tempDir();
  for (const c of ["a", "b"]) {
    mkdirSync(join(root, c));
    for (let i = 0; i < 5; i++) writeFileSync(join(root, c, `${i}.png`), await png(i * 40));
  }
  symlinkSync("..", join(root, "a", "up"));
  symlinkSync(join(root, "b"), join(root, "a", "b-link"));
  const ds = await open(root);
  assert.deepEqual(ds.classes, ["a", "b"]);
  assert.equal(ds.samples.length, 10);
  for (const s of ds.samples) assert.equal(ds.classes[s.label], s.id.split("/")[0], s.id);
  assert.equal(new Set(ds.samples.map((s) => s.id)).size, 10);
  assert.ok(ds.warnings?.some((w) => /a\/up: a link back to the data set folder/.test(w)), JSON.stringify(ds.warnings));
  assert.ok(ds.warnings?.some((w) => /a\/b-link: a link into class folder b/.test(w)), JSON.stringify(ds.warnings));
});

test("folders - an empty class folder is left out of the classes with a warning", async () => {
  const root = tempDir();
  for (const c of ["a", "b", "c"]) mkdirSync(join(root, c));
  writeFileSync(join(root, "a", "1.png"), await png(10));
  writeFileSync(join(root, "c", "1.png"), await png(20));
  writeFileSync(join(root, "b", "notes.txt"), "no images here");
  const ds = await open(root);
  assert.deepEqual(ds.classes, ["a", "c"]);
  assert.deepEqual(ds.samples.map((s) => [s.id, s.label]).sort(), [["a/1.png", 0], ["c/1.png", 1]]);
  assert.ok(ds.warnings?.some((w) => /class folder b has no usable image/.test(w)));
});

test("folders - a GIF or an SVG named .png is refused by its content, like a .gif or .svg by its name", async () => {
  const root = tempDir();
  for (const c of ["a", "b"]) mkdirSync(join(root, c));
  writeFileSync(join(root, "a", "1.png"), await png(10));
  writeFileSync(join(root, "b", "1.png"), await png(20));
  writeFileSync(join(root, "a", "anim.png"), await sharp({ create: { width: 8, height: 8, channels: 3, background: "red" } }).gif().toBuffer());
  writeFileSync(join(root, "b", "vector.png"), '<svg xmlns="http://www.w3.org/2000/svg" width="8" height="8"><rect width="8" height="8"/></svg>');
  writeFileSync(join(root, "a", "anim.gif"), await sharp({ create: { width: 8, height: 8, channels: 3, background: "red" } }).gif().toBuffer());
  const ds = await open(root);
  assert.ok(ds.skipped.some((s) => s.id === "a/anim.gif" && s.reason === "not_an_image"));
  for (const id of ["a/anim.png", "b/vector.png"]) {
    const s = ds.samples.find((x) => x.id === id)!;
    await assert.rejects(ds.readRgb(s, 8), (e: unknown) => e instanceof BadInputError && e.reason === "not_an_image" && /content is (GIF|SVG)/.test(e.message), id);
  }
  assert.equal((await ds.readRgb(ds.samples.find((x) => x.id === "a/1.png")!, 8)).length, 8 * 8 * 3);
});

// ---------------------------------------------------------------- fuzz

type Entry =
  | { kind: "dir"; name: string; children: Entry[] }
  | { kind: "file"; name: string; ext: string; empty: boolean }
  | { kind: "link"; name: string; to: "root" | "parent" | "otherClass" | "ownClass" | "ownDir" | "ownFile" | "otherFile" | "dangling"; pick: number };

const NAMES = ["x", "B", "ä", "a b", "-n", "01", "z9", ".hid", "up", "ü ü"];
const entry = fc.letrec<{ entry: Entry; dir: Entry; file: Entry; link: Entry }>((tie) => ({
  entry: fc.oneof({ depthSize: "small", maxDepth: 3 }, tie("file"), tie("file"), tie("link"), tie("dir")),
  dir: fc.record({ kind: fc.constant("dir" as const), name: fc.constantFrom(...NAMES), children: fc.array(tie("entry"), { maxLength: 4 }) }),
  file: fc.record({ kind: fc.constant("file" as const), name: fc.constantFrom(...NAMES), ext: fc.constantFrom(".png", ".PNG", ".jpg", ".webp", ".txt", ""), empty: fc.boolean() }),
  link: fc.record({
    kind: fc.constant("link" as const), name: fc.constantFrom(...NAMES),
    to: fc.constantFrom("root", "parent", "otherClass", "ownClass", "ownDir", "ownFile", "otherFile", "dangling"), pick: fc.nat(),
  }),
}));
const tree = fc.uniqueArray(fc.record({ name: fc.constantFrom("cat", "Dog", "émeu", "b b", ".hidden", "-x", "z"), children: fc.array(entry.entry, { maxLength: 5 }) }), { minLength: 2, maxLength: 4, selector: (c) => c.name });

interface Built {
  root: string;
  /** Real path of every file that counts -> its class name. */
  images: Map<string, string>;
}

/** Writes the tree: folders and files first, then links to what exists (never into hidden places). */
function build(classes: { name: string; children: Entry[] }[]): Built {
  const root = tempDir();
  const images = new Map<string, string>();
  const visibleDirs = new Map<string, string[]>(); // class -> non-hidden folders (incl. the class folder)
  const visibleFiles = new Map<string, string[]>();
  const links: { path: string; cls: string; e: Extract<Entry, { kind: "link" }>; dir: string }[] = [];
  const put = (dir: string, cls: string, hidden: boolean, entries: Entry[]): void => {
    for (const e of entries) {
      const name = e.kind === "file" ? `${e.name}${e.ext}` : e.name;
      const path = join(dir, name);
      if (links.some((l) => l.path === path) || fileExists(path)) continue; // first of a name wins
      const h = hidden || name.startsWith(".");
      if (e.kind === "dir") {
        mkdirSync(path);
        if (!h) visibleDirs.get(cls)!.push(path);
        put(path, cls, h, e.children);
      } else if (e.kind === "file") {
        writeFileSync(path, e.empty ? "" : "img");
        if (!h) visibleFiles.get(cls)!.push(path);
        if (!h && !e.empty && [".png", ".jpg", ".webp"].includes(e.ext.toLowerCase())) images.set(path, cls);
      } else links.push({ path, cls, e, dir });
    }
  };
  for (const c of classes) {
    const dir = join(root, c.name);
    mkdirSync(dir);
    visibleDirs.set(c.name, c.name.startsWith(".") ? [] : [dir]);
    visibleFiles.set(c.name, []);
  }
  for (const c of classes) put(join(root, c.name), c.name, c.name.startsWith("."), c.children);
  const visible = classes.filter((c) => !c.name.startsWith("."));
  for (const { path, cls, e, dir } of links) {
    const others = visible.filter((c) => c.name !== cls);
    const any = <T>(xs: T[]): T | undefined => (xs.length ? xs[e.pick % xs.length] : undefined);
    const fileTarget = (c: string | undefined): string | undefined => (c === undefined ? undefined : any(visibleFiles.get(c)!));
    let target: string | undefined;
    let linkPath = path;
    switch (e.to) {
      case "root": target = relative(dir, root) || "."; break;
      case "parent": target = ".."; break;
      case "otherClass": target = any(others)?.name && join(root, any(others)!.name); break;
      case "ownClass": target = join(root, cls); break;
      case "ownDir": target = any(visibleDirs.get(cls)!); break;
      case "ownFile": target = fileTarget(cls); break;
      case "otherFile": target = fileTarget(any(others)?.name); break;
      case "dangling": target = join(root, "nowhere", "gone.png"); break;
    }
    if (!target) continue;
    // A link to a file carries the file's name (its extension decides as for the file itself).
    if (e.to === "ownFile" || e.to === "otherFile") linkPath = join(dirname(path), `l-${basename(target)}`);
    if (fileExists(linkPath)) continue;
    symlinkSync(target, linkPath);
  }
  return { root, images };
}

function fileExists(p: string): boolean {
  try {
    lstatSync(p); // a dangling link exists too
    return true;
  } catch {
    return false;
  }
}

test("folders - fuzz: random trees with links list every real image once, with its own class, and only classes with images", async () => {
  await fc.assert(
    fc.asyncProperty(tree, async (classes) => {
      const { root, images } = build(classes);
      const want = [...new Set(images.values())].sort((a, b) => (a < b ? -1 : a > b ? 1 : 0));
      let ds;
      try {
        ds = await open(root);
      } catch (err) {
        assert.ok(err instanceof ConfigError, String(err));
        assert.ok(want.length < 2, `refused (${(err as Error).message}) although ${want.length} classes have images`);
        return;
      }
      assert.deepEqual(ds.classes, want, "classes: those with images, in name order");
      const got = new Map<string, string>();
      for (const s of ds.samples) {
        const real = realpathSync(join(root, ...s.id.split("/")));
        assert.ok(!got.has(real), `${s.id}: ${real} listed twice`);
        got.set(real, ds.classes[s.label]!);
      }
      const realImages = new Map([...images].map(([p, c]) => [realpathSync(p), c]));
      assert.deepEqual(new Map([...got].sort()), new Map([...realImages].sort()));
    }),
    { numRuns: 150, seed: 14 },
  );
});

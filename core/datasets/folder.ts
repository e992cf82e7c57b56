/**
 * Keras `image_dataset_from_directory` folders: one sub-folder per class (sorted by name = label
 * index), images anywhere below it. Ids are paths relative to the root with `/` separators
 * (`cats/001.jpg`), so they are the same on every machine that mounts the data set.
 *
 * Listing only stats files (no decoding): empty files and files that are not .jpg/.jpeg/.png/.webp
 * are refused here; the rest are refused, if need be, when decoded (BadInputError from readRgb).
 * Hidden files and folders (names starting with ".") are ignored silently.
 */
import { createHash } from "node:crypto";
import type { Dirent } from "node:fs";
import { readdir, readFile, stat } from "node:fs/promises";
import { extname, join, relative, resolve, sep } from "node:path";
import { BadInputError, ConfigError } from "../errors.js";
import { decodeImage } from "./image_decode.js";
import { applyLimit, stratifiedSplit } from "./splits.js";
import { SKIP_REASONS, type Dataset, type SampleRef, type SkippedInput } from "./types.js";

/** Extensions listed as images (case-insensitive). */
export const IMAGE_EXTENSIONS = [".jpg", ".jpeg", ".png", ".webp"] as const;

export interface FolderDatasetOptions {
  root: string;
  seed: number;
  valSplit: number;
  testSplit: number;
  limit: number;
  maxPixels: number;
}

interface Listed {
  id: string;
  label: number;
  size: number;
  mtimeMs: number;
}

/** Stats are issued this many at a time: enough to hide latency on network file systems, few enough for the fd limit. */
const STAT_CONCURRENCY = 64;

const byCodePoint = (a: string, b: string): number => (a < b ? -1 : a > b ? 1 : 0);

async function readDirSorted(dir: string): Promise<Dirent[]> {
  let entries: Dirent[];
  try {
    entries = await readdir(dir, { withFileTypes: true });
  } catch (cause) {
    throw new ConfigError(`Cannot list data set folder ${dir}: ${(cause as Error).message}`, { cause });
  }
  return entries.filter((e) => !e.name.startsWith(".")).sort((a, b) => byCodePoint(a.name, b.name));
}

/** Every non-hidden file below `dir`, depth first in name order, as absolute paths. Follows symlinks (once per path). */
async function walkFiles(dir: string, out: string[]): Promise<void> {
  for (const e of await readDirSorted(dir)) {
    const p = join(dir, e.name);
    let isDir = e.isDirectory();
    let isFile = e.isFile();
    if (e.isSymbolicLink()) {
      try {
        const s = await stat(p);
        isDir = s.isDirectory();
        isFile = s.isFile();
      } catch {
        isFile = true; // a dangling link: listed, then refused as unreadable
      }
    }
    if (isDir) await walkFiles(p, out);
    else if (isFile) out.push(p);
  }
}

async function mapLimited<T, R>(items: readonly T[], limit: number, fn: (t: T) => Promise<R>): Promise<R[]> {
  const out = new Array<R>(items.length);
  let next = 0;
  const run = async (): Promise<void> => {
    while (next < items.length) {
      const i = next++;
      out[i] = await fn(items[i]);
    }
  };
  await Promise.all(Array.from({ length: Math.min(limit, items.length) }, run));
  return out;
}

/** Opens a class-per-folder data set with seeded stratified train/val/test splits. */
export async function openFolderDataset(o: FolderDatasetOptions): Promise<Dataset> {
  const root = resolve(o.root);
  let rootStat;
  try {
    rootStat = await stat(root);
  } catch (cause) {
    throw new ConfigError(`--data ${o.root}: no such folder (expected fashion-mnist, mnist:<dir>, idx:<dir> or a folder with one sub-folder per class).`, { cause });
  }
  if (!rootStat.isDirectory()) throw new ConfigError(`--data ${o.root} is not a folder (expected one sub-folder per class).`);

  const classDirs: string[] = [];
  for (const e of await readDirSorted(root)) {
    const p = join(root, e.name);
    if (e.isDirectory() || (e.isSymbolicLink() && (await stat(p).then((s) => s.isDirectory(), () => false)))) classDirs.push(e.name);
  }
  if (classDirs.length < 2)
    throw new ConfigError(`--data ${o.root} has ${classDirs.length} class folder${classDirs.length === 1 ? "" : "s"}${classDirs.length ? ` (${classDirs.join(", ")})` : ""}; a classifier needs at least 2 (one sub-folder per class).`);

  const files: { path: string; label: number }[] = [];
  for (let label = 0; label < classDirs.length; label++) {
    const found: string[] = [];
    await walkFiles(join(root, classDirs[label]), found);
    for (const path of found) files.push({ path, label });
  }

  const skipped: SkippedInput[] = [];
  const usable: Listed[] = [];
  const identity: string[] = [];
  const stats = await mapLimited(files, STAT_CONCURRENCY, async (f) => {
    try {
      return await stat(f.path);
    } catch (err) {
      return err as Error;
    }
  });
  for (let i = 0; i < files.length; i++) {
    const { path, label } = files[i];
    const id = relative(root, path).split(sep).join("/");
    const s = stats[i];
    if (s instanceof Error) {
      skipped.push({ id, reason: SKIP_REASONS.unreadable, message: `${id}: cannot stat: ${s.message}` });
      continue;
    }
    identity.push(`${id}\t${s.size}\t${s.mtimeMs}`);
    const ext = extname(path).toLowerCase();
    if (!(IMAGE_EXTENSIONS as readonly string[]).includes(ext)) {
      skipped.push({ id, reason: SKIP_REASONS.notAnImage, message: `${id}: extension "${ext || "(none)"}" is not one of ${IMAGE_EXTENSIONS.join(" ")}.` });
      continue;
    }
    if (s.size === 0) {
      skipped.push({ id, reason: SKIP_REASONS.empty, message: `${id}: the file is empty.` });
      continue;
    }
    usable.push({ id, label, size: s.size, mtimeMs: s.mtimeMs });
  }
  if (usable.length === 0) throw new ConfigError(`--data ${o.root}: no ${IMAGE_EXTENSIONS.join("/")} images found in ${classDirs.join(", ")}.`);

  const ids = usable.map((u) => u.id);
  const labels = usable.map((u) => u.label);
  const splits = stratifiedSplit(ids, labels, { seed: o.seed, valFraction: o.valSplit, testFraction: o.testSplit });
  const kept = applyLimit(ids, labels, splits, o.limit, o.seed);
  const samples: SampleRef[] = kept.map((i) => ({ id: ids[i], label: labels[i], split: splits[i] }));

  const h = createHash("sha256");
  h.update(JSON.stringify({ kind: "folder", v: 2, classes: classDirs, seed: o.seed, valSplit: o.valSplit, testSplit: o.testSplit, limit: o.limit, maxPixels: o.maxPixels }));
  for (const line of identity) h.update(`\n${line}`);

  const known = new Set(ids);
  return {
    name: o.root,
    classes: classDirs,
    samples,
    skipped,
    fingerprint: h.digest("hex"),
    async readRgb(sample: SampleRef, size: number): Promise<Uint8Array> {
      const id = sample.id;
      // Only ids we listed: an id from a message is never a path to go and read elsewhere.
      if (!known.has(id)) throw new BadInputError(id, SKIP_REASONS.unknownSample, `${id} is not a sample of ${o.root}.`);
      let bytes: Buffer;
      try {
        bytes = await readFile(join(root, ...id.split("/")));
      } catch (cause) {
        throw new BadInputError(id, SKIP_REASONS.unreadable, `${id}: cannot read: ${(cause as Error).message}`, { cause });
      }
      return decodeImage(id, bytes, { size, maxPixels: o.maxPixels });
    },
  };
}

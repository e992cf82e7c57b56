/**
 * Keras `image_dataset_from_directory` folders: one sub-folder per class (sorted by name = label
 * index), images anywhere below it. Ids are paths relative to the root with `/` separators
 * (`cats/001.jpg`), so they are the same on every machine that mounts the data set.
 *
 * Listing only stats files (no decoding): empty files and files that are not .jpg/.jpeg/.png/.webp
 * are refused here; the rest are refused, if need be, when decoded (BadInputError from readRgb).
 * Hidden files and folders (names starting with ".") are ignored silently. Links are followed to each
 * real file or folder once (see walkFiles); a class folder without a usable image is left out of the
 * classes with a warning, and the content of a file, not only its name, must be JPEG/PNG/WebP.
 */
import { createHash, type Hash } from "node:crypto";
import type { Dirent } from "node:fs";
import { readdir, readFile, realpath, stat } from "node:fs/promises";
import { basename, dirname, extname, join, relative, resolve, sep } from "node:path";
import { BadInputError, ConfigError } from "../runtime/errors.js";
import { decodeImage, sniffFormat } from "./image_decode.js";
import { IdIndex, SampleColumns, SampleList } from "./sample_list.js";
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

/** What one class's walk shares with the others: real folders and files already listed, and where not to go. */
interface WalkState {
  root: string;
  realRoot: string;
  /** Real path of each class folder, by label. */
  classReals: string[];
  label: number;
  seenDirs: Set<string>;
  /** Real folder being walked -> the name of its entry being looked at (absent once the folder is done). */
  walking: Map<string, string>;
  /**
   * Real path of each file listed through a link -> its id. Plain files are not recorded (at 10^7
   * files that map was the listing's largest part): whether one was listed is read from the walk's
   * position ({@link listedPlainly}).
   */
  linkedFiles: Map<string, string>;
  skipped: SkippedInput[];
  warnings: string[];
}

const idOf = (root: string, path: string): string => relative(root, path).split(sep).join("/");
const within = (path: string, dir: string): boolean => path === dir || path.startsWith(dir.endsWith(sep) ? dir : dir + sep);
/** How a duplicate names the file listed first: its real path, relative to the real root when inside it. */
const fileKey = (w: WalkState, target: string): string => (within(target, w.realRoot) ? idOf(w.realRoot, target) : target);

/**
 * Whether the real file `target` was already listed as a plain file: its real folder was walked up to
 * past its name (names in code point order), and its name is not hidden. A plain file never comes twice
 * (each real folder is walked once), so only a link can reach a file a second time.
 */
function listedPlainly(w: WalkState, target: string): boolean {
  const dir = dirname(target);
  const name = basename(target);
  if (name.startsWith(".") || !w.seenDirs.has(dir)) return false;
  const at = w.walking.get(dir);
  return at === undefined || byCodePoint(name, at) < 0;
}

/** A file to stat: its path and its id (relative to the root, `/` separators). */
interface Found {
  path: string;
  id: string;
}

/**
 * Every non-hidden file below `dir` (whose real path is `real`), depth first in name order, as
 * absolute paths handed to `onFiles` a folder's run of files at a time (so a walk of millions of files
 * never holds their paths all at once). Links are followed to each real path once: a link back to the
 * data set's root or above it (a loop) and a link into another class's folder are not followed (that
 * would relabel another class's images), and a file reached a second time is listed as a skipped duplicate.
 */
async function walkFiles(dir: string, real: string, onFiles: (files: Found[]) => Promise<void>, w: WalkState): Promise<void> {
  let out: Found[] = [];
  const flush = async (): Promise<void> => {
    if (out.length) await onFiles(out);
    out = [];
  };
  for (const e of await readDirSorted(dir)) {
    w.walking.set(real, e.name);
    const p = join(dir, e.name);
    let isDir = e.isDirectory();
    let isFile = e.isFile();
    let target = join(real, e.name);
    if (e.isSymbolicLink()) {
      try {
        target = await realpath(p);
        const s = await stat(target);
        isDir = s.isDirectory();
        isFile = s.isFile();
      } catch {
        out.push({ path: p, id: idOf(w.root, p) }); // a dangling link: listed, then refused as unreadable
        continue;
      }
    }
    // Files need the check only behind a link: a plain file is inside the folder being walked.
    if (isDir || e.isSymbolicLink()) {
      const other = w.classReals.findIndex((c, i) => i !== w.label && within(target, c));
      if (within(w.realRoot, target) || other >= 0) {
        const why = other >= 0 ? `a link into class folder ${idOf(w.realRoot, w.classReals[other]) || "."}` : "a link back to the data set folder or above it (a loop)";
        if (isDir) w.warnings.push(`${idOf(w.root, p)}: ${why}; not followed.`);
        else w.skipped.push({ id: idOf(w.root, p), reason: SKIP_REASONS.duplicate, message: `${idOf(w.root, p)}: ${why}; not listed.` });
        continue;
      }
    }
    if (isDir) {
      if (w.seenDirs.has(target)) continue; // another link to a folder already listed
      w.seenDirs.add(target);
      await flush();
      await walkFiles(p, target, onFiles, w);
    } else if (isFile) {
      const id = idOf(w.root, p);
      const link = e.isSymbolicLink();
      const first = w.linkedFiles.get(target) ?? (link && listedPlainly(w, target) ? fileKey(w, target) : undefined);
      if (first !== undefined) {
        w.skipped.push({ id, reason: SKIP_REASONS.duplicate, message: `${id}: the same file as ${first}; listed once.` });
        continue;
      }
      if (link) w.linkedFiles.set(target, id);
      out.push({ path: p, id });
    }
  }
  w.walking.delete(real);
  await flush();
}

/**
 * What listing keeps: each usable file's id and label, the skipped ones, and the data set's identity
 * (every listed file's id, size and mtime, hashed in walk order) -- not the paths nor the stats of the
 * files, which at 10^7 files would be gigabytes.
 */
interface Listing {
  usable: SampleColumns;
  skipped: SkippedInput[];
  warnings: string[];
  identity: Hash;
}

/** Lists every class folder, each real file once, in class then walk order. */
async function listClassFiles(root: string, classDirs: string[], listing: Listing): Promise<void> {
  const realRoot = await realpath(root);
  const classReals = await Promise.all(classDirs.map((c) => realpath(join(root, c))));
  const { skipped, warnings } = listing;
  const state: WalkState = { root, realRoot, classReals, label: 0, seenDirs: new Set(), walking: new Map(), linkedFiles: new Map(), skipped, warnings };
  for (let label = 0; label < classDirs.length; label++) {
    if (state.seenDirs.has(classReals[label])) {
      warnings.push(`class folder ${classDirs[label]} is the same folder as another class (a link): not listed again.`);
      continue;
    }
    state.seenDirs.add(classReals[label]);
    await walkFiles(join(root, classDirs[label]), classReals[label], (found) => statFiles(found, label, listing), { ...state, label });
  }
}

/** Stats one folder's run of files and records each, in order: usable, or skipped saying why. */
async function statFiles(found: Found[], label: number, listing: Listing): Promise<void> {
  const stats = await mapLimited(found, STAT_CONCURRENCY, (f) => stat(f.path).catch((err: unknown) => err as Error));
  for (let i = 0; i < found.length; i++) {
    const { id, path } = found[i];
    const s = stats[i];
    if (s instanceof Error) {
      listing.skipped.push({ id, reason: SKIP_REASONS.unreadable, message: `${id}: cannot stat: ${s.message}` });
      continue;
    }
    listing.identity.update(`\n${id}\t${s.size}\t${s.mtimeMs}`);
    const ext = extname(path).toLowerCase();
    if (!(IMAGE_EXTENSIONS as readonly string[]).includes(ext))
      listing.skipped.push({ id, reason: SKIP_REASONS.notAnImage, message: `${id}: extension "${ext || "(none)"}" is not one of ${IMAGE_EXTENSIONS.join(" ")}.` });
    else if (s.size === 0) listing.skipped.push({ id, reason: SKIP_REASONS.empty, message: `${id}: the file is empty.` });
    else listing.usable.push(id, label);
  }
}

/**
 * The class folders that hold a usable image, and each folder's new label (-1: left out). A class
 * without images would still be an output of the classifier, one it could never learn.
 */
function classesWithImages(root: string, classDirs: string[], usable: Listing["usable"], warnings: string[]): { classes: string[]; newLabel: number[] } {
  const present = classDirs.map(() => false);
  for (const label of usable.labels()) present[label] = true;
  const classes = classDirs.filter((_, label) => present[label]);
  for (const [label, name] of classDirs.entries()) if (!present[label]) warnings.push(`class folder ${name} has no usable image: left out of the classes.`);
  if (classes.length < 2)
    throw new ConfigError(`--data ${root}: only ${classes.length} class folder${classes.length === 1 ? "" : "s"} with images (${classes.join(", ") || "none"}); a classifier needs at least 2.`);
  return { classes, newLabel: classDirs.map((name) => classes.indexOf(name)) };
}

/** An id as the listing makes them: a relative path without empty, `.`, `..` or hidden parts. */
const plainRelative = (id: string): boolean => id.split("/").every((part) => part !== "" && !part.startsWith("."));

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

  const listing: Listing = { usable: new SampleColumns(), skipped: [], warnings: [], identity: createHash("sha256") };
  await listClassFiles(root, classDirs, listing);
  const { usable, skipped, warnings } = listing;
  if (usable.length === 0) throw new ConfigError(`--data ${o.root}: no ${IMAGE_EXTENSIONS.join("/")} images found in ${classDirs.join(", ")}.`);
  const { classes, newLabel } = classesWithImages(o.root, classDirs, usable, warnings);

  usable.relabel(newLabel);
  const labels = usable.labels();
  const splits = stratifiedSplit(usable, labels, { seed: o.seed, valFraction: o.valSplit, testFraction: o.testSplit });
  const samples = SampleList.select(usable, applyLimit(usable, labels, splits, o.limit, o.seed), splits);

  // v4: the files' identity is hashed while they are listed (v3 kept every line until the end).
  const h = createHash("sha256");
  h.update(JSON.stringify({ kind: "folder", v: 4, classes, seed: o.seed, valSplit: o.valSplit, testSplit: o.testSplit, limit: o.limit, maxPixels: o.maxPixels }));
  h.update(listing.identity.digest("hex"));

  // Built on the first read (a coordinator that only lists never needs it): 8 bytes a file.
  let known: IdIndex | undefined;
  return {
    name: o.root,
    classes,
    samples,
    skipped,
    warnings,
    fingerprint: h.digest("hex"),
    async readRgb(sample: SampleRef, size: number): Promise<Uint8Array> {
      const id = sample.id;
      // Only ids we listed: an id from a message is never a path to go and read elsewhere.
      known ??= new IdIndex(usable);
      if (!plainRelative(id) || !known.has(id)) throw new BadInputError(id, SKIP_REASONS.unknownSample, `${id} is not a sample of ${o.root}.`);
      let bytes: Buffer;
      try {
        bytes = await readFile(join(root, ...id.split("/")));
      } catch (cause) {
        throw new BadInputError(id, SKIP_REASONS.unreadable, `${id}: cannot read: ${(cause as Error).message}`, { cause });
      }
      // The content decides, by the same rule as the name: a GIF or SVG called .png is not an image here either.
      const format = sniffFormat(bytes);
      if (format === "gif" || format === "svg")
        throw new BadInputError(id, SKIP_REASONS.notAnImage, `${id}: the content is ${format.toUpperCase()}, not one of ${IMAGE_EXTENSIONS.join(" ")} whatever its name says.`);
      return decodeImage(id, bytes, { size, maxPixels: o.maxPixels });
    },
  };
}

/**
 * A Keras-style folder data set made from Fashion-MNIST: four classes of tops (the classes that are
 * hardest to tell apart), each image a 28 x 28 RGB PNG tinted by a colour drawn from its id, so colour
 * says nothing about the class and a model must read the shape. Used by test/baseline.test.ts and by
 * bench/quality.ts (the README's folder-data-set rows).
 */
import { mkdir } from "node:fs/promises";
import { join } from "node:path";
import sharp from "sharp";
import { openDataset } from "../../core/datasets/open.js";
import { hash53 } from "../../core/datasets/splits.js";

/** The four Fashion-MNIST classes of the folder set (folder names are the class names). */
export const TINTED_CLASSES = ["Pullover", "Dress", "Coat", "Shirt"] as const;

/**
 * Writes `<root>/<class>/<id>.png` for the Fashion-MNIST samples of {@link TINTED_CLASSES} among the
 * first `perClass` of each class (train and test files alike, by id order). Returns images written.
 */
export async function writeTintedFolder(root: string, perClass: number): Promise<number> {
  const ds = await openDataset("fashion-mnist", { seed: 1, valSplit: 0, testSplit: 0, limit: 0, maxPixels: 1e7 });
  const wanted = new Map<number, string>(TINTED_CLASSES.map((c) => [ds.classes.indexOf(c), c]));
  const count = new Map<number, number>();
  for (const cls of TINTED_CLASSES) await mkdir(join(root, cls), { recursive: true });
  let written = 0;
  for (const s of ds.samples) {
    const cls = wanted.get(s.label);
    const k = count.get(s.label) ?? 0;
    if (cls === undefined || k >= perClass) continue;
    count.set(s.label, k + 1);
    const rgb = await ds.readRgb(s, 28);
    // A tint per image: each channel scaled by a factor in [0.25, 1] drawn from the id.
    const tint = [0, 1, 2].map((c) => 0.25 + 0.75 * ((hash53(`tint${c}:${s.id}`, 7) % 1000) / 999));
    for (let p = 0; p < rgb.length; p++) rgb[p] = Math.round(rgb[p] * tint[p % 3]);
    await sharp(Buffer.from(rgb), { raw: { width: 28, height: 28, channels: 3 } }).png().toFile(join(root, cls, `${s.id.replace(/\//g, "_")}.png`));
    written++;
  }
  return written;
}

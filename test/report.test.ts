/**
 * report.html as a person opens it (issue 16 item 5): a real small run (head and fine-tuning), its
 * headline read against summary.json, and the page rendered by headless Chromium: the screenshot
 * shows the headline and both curves' colours. The browser part is skipped when Chromium is not
 * installed (`apt-get install -y chromium`).
 */
import assert from "node:assert/strict";
import { execFile, execFileSync } from "node:child_process";
import { mkdtemp, readFile, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { promisify } from "node:util";
import { after, before, test } from "node:test";
import sharp from "sharp";
import { runCli } from "./helpers/cli.js";

const run = promisify(execFile);

function chromium(): string | undefined {
  for (const bin of ["chromium", "chromium-browser", "google-chrome"]) {
    try {
      execFileSync(bin, ["--version"], { stdio: "ignore" });
      return bin;
    } catch {
      // next
    }
  }
  return undefined;
}

interface Summary {
  seconds: number;
  phases: { head: { test_accuracy: number; val_accuracy: number }; fine_tune: { test_accuracy: number } };
  samples: { train: number; val: number; test: number };
  skipped_inputs: unknown[];
}

let dir: string;
let html: string;
let summary: Summary;

before(async () => {
  dir = await mkdtemp(join(tmpdir(), "ctrain-report-"));
  const out = join(dir, "run");
  const r = await runCli(["run", "--data", "fashion-mnist", "--limit", "150", "--input-size", "64", "--feature-layer", "block_12_add", "--epochs", "3",
    "--fine-tune-layers", "9", "--fine-tune-epochs", "2", "--workers", "1", "--metrics-port", "-1", "--cache-dir", join(dir, "cache"), "--out", out, "--job", "report-1"]);
  assert.equal(r.code, 0, r.stderr.slice(-3000));
  html = await readFile(join(out, "report.html"), "utf8");
  summary = JSON.parse(await readFile(join(out, "summary.json"), "utf8")) as Summary;
});
after(async () => {
  await rm(dir, { recursive: true, force: true });
});

test("report - the headline comes first: accuracy per phase, saved model, data, skipped, wall time, options", () => {
  const top = html.slice(0, html.indexOf("<h2>Phase:"));
  const pct = (x: number): string => `${(x * 100).toFixed(1)}%`;
  assert.match(top, new RegExp(`<th>head</th><td class="big">${pct(summary.phases.head.test_accuracy).replace(".", "\\.")}</td><td>${pct(summary.phases.head.val_accuracy).replace(".", "\\.")}</td>`));
  assert.match(top, new RegExp(`<th>fine-tune</th><td class="big">${pct(summary.phases.fine_tune.test_accuracy).replace(".", "\\.")}</td>`));
  assert.match(top, /model\/ is the fine-tuned classifier/);
  assert.ok(top.includes(`${summary.samples.train} train / ${summary.samples.val} val / ${summary.samples.test} test samples`), top);
  assert.match(top, /<b>0 inputs skipped<\/b>/);
  assert.match(top, /Wall time<\/b> extraction [\d.]+ s .*head [\d.]+ s .*fine-tune [\d.]+ s .*whole run [\d.]+ s/);
  assert.match(top, /<code>--epochs 3<\/code>/);
  assert.match(top, /<code>--fine-tune-layers 9<\/code>/);
  assert.match(top, /Frozen forward passes: <b>/);
});

test("report - headless Chromium renders the headline and non-empty charts", { skip: chromium() ? false : "Chromium is not installed (apt-get install -y chromium)" }, async () => {
  const png = join(dir, "report.png");
  await run(chromium()!, ["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", `--user-data-dir=${join(dir, "chrome")}`, `--screenshot=${png}`, "--window-size=1100,1400", `file://${join(dir, "run", "report.html")}`], { timeout: 60_000 });
  const { data, info } = await sharp(png).removeAlpha().raw().toBuffer({ resolveWithObject: true });
  assert.ok(info.width >= 1000 && info.height >= 1300, `screenshot ${info.width}x${info.height}`);
  const near = (i: number, rgb: [number, number, number]): boolean => Math.abs(data[i] - rgb[0]) + Math.abs(data[i + 1] - rgb[1]) + Math.abs(data[i + 2] - rgb[2]) < 40;
  let train = 0, val = 0, ink = 0;
  let firstInkRow = -1;
  for (let i = 0; i < data.length; i += 3) {
    if (near(i, [0x1f, 0x77, 0xb4])) train++;
    if (near(i, [0xff, 0x7f, 0x0e])) val++;
    if (data[i] + data[i + 1] + data[i + 2] < 300) {
      ink++;
      if (firstInkRow < 0) firstInkRow = Math.floor(i / 3 / info.width);
    }
  }
  // Four charts (loss and accuracy of two phases), each with a train and a validation curve and legend.
  assert.ok(train > 400, `train curves drawn: ${train} pixels of their colour`);
  assert.ok(val > 400, `validation curves drawn: ${val} pixels of their colour`);
  assert.ok(ink > 5000, `text on the page: ${ink} dark pixels`);
  assert.ok(firstInkRow >= 0 && firstInkRow < 80, `the page starts with its title and headline (first text at row ${firstInkRow})`);
});

/**
 * What a person sees from the CLI (issue 16 items 3 and 4): each sub-command accepts, suggests and
 * lists only its own flags, `-h` and `--version` work everywhere, and the last lines of a run report
 * every phase that ran, the model saved, what was extracted and whether workers were started.
 */
import assert from "node:assert/strict";
import { createRequire } from "node:module";
import { mkdir, mkdtemp, readFile, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, describe, test } from "node:test";
import sharp from "sharp";
import { openDataset } from "../core/datasets/open.js";
import { ENV_SETTINGS, OPTION_SPECS, WORKER_OPTION_SPECS } from "../core/runtime/config.js";
import { runCli } from "./helpers/cli.js";

const VERSION = (createRequire(import.meta.url)("../../package.json") as { version: string }).version;

let dir: string;
before(async () => {
  dir = await mkdtemp(join(tmpdir(), "ctrain-ux-"));
});
after(async () => {
  await rm(dir, { recursive: true, force: true });
});

describe("cli - flags per sub-command", () => {
  for (const cmd of [["run"], ["coordinator"], ["worker"], ["predict"], ["model-info"], ["export-onnx"], ["k8s", "render"]]) {
    test(`cli - ctrain ${cmd.join(" ")} -h prints its usage and exits 0`, async () => {
      const r = await runCli([...cmd, "-h"]);
      assert.equal(r.code, 0, r.stderr);
      assert.match(r.stdout, new RegExp(`^usage: ctrain ${cmd.join(" ")}`));
    });
  }

  test("cli - --version works alone and after any command", async () => {
    for (const args of [["--version"], ["run", "--version"], ["predict", "--model", "x", "--version"], ["worker", "--version"]]) {
      const r = await runCli(args);
      assert.equal(r.code, 0, `${args.join(" ")}: ${r.stderr}`);
      assert.match(r.stdout, new RegExp(`^ctrain ${VERSION.replace(/\./g, "\\.")} `));
    }
  });

  test("cli - predict refuses a job option it does not read instead of ignoring it", async () => {
    const r = await runCli(["predict", "--model", join(dir, "none"), "--epochs", "3", "--out", "x", "img.png"]);
    assert.equal(r.code, 2, r.stderr);
    assert.match(r.stderr, /predict does not read --epochs/);
  });

  test("cli - predict suggests only its own flags", async () => {
    const r = await runCli(["predict", "--model", "m", "--topp", "2", "img.png"]);
    assert.equal(r.code, 2, r.stderr);
    assert.match(r.stderr, /Unknown option --topp\. Did you mean --top\?/);
    const e = await runCli(["predict", "--model", "m", "--engin", "onnx", "img.png"]);
    assert.match(e.stderr, /Did you mean --engine\?/);
    const c = await runCli(["predict", "--config", "job.yaml", "img.png"]);
    assert.equal(c.code, 2);
    assert.match(c.stderr, /predict does not read --config/);
  });

  test("cli - each help lists the options its command reads, and only those", async () => {
    const predict = (await runCli(["predict", "--help"])).stdout;
    for (const f of ["--top", "--json", "--engine", "--threads", "--backend"]) assert.ok(predict.includes(f), `predict --help lacks ${f}`);
    for (const f of ["--epochs", "--data", "--out", "--workers"]) assert.ok(!predict.includes(f), `predict --help lists ${f}`);
    const info = (await runCli(["model-info", "--help"])).stdout;
    assert.ok(info.includes("--feature-layer") && !info.includes("--epochs"), info);
    const run = (await runCli(["run", "--help"])).stdout;
    for (const f of ["--epochs", "--fine-tune-layers", "--data", "--workers"]) assert.ok(run.includes(f), `run --help lacks ${f}`);
    for (const f of ["--extract-batch-size", "--data-parallel", "--checksum-every", "--checkpoint-every", "--step-timeout-ms"]) assert.ok(run.includes(f), `run --help lacks ${f}`);
    const worker = (await runCli(["worker", "--help"])).stdout;
    assert.ok(!/--(extract-)?batch-size/.test(worker), `worker --help offers no batch size of its own: ${worker}`);
    const refused = await runCli(["model-info", "--pooling", "max"]);
    assert.equal(refused.code, 2);
    assert.match(refused.stderr, /model-info does not read --pooling/);
  });
});

describe("cli - environment settings in --help", () => {
  test("cli - every environment setting a command reads is listed in its --help", async () => {
    const rows = [...OPTION_SPECS, ...WORKER_OPTION_SPECS] as readonly { env?: string }[];
    const optionEnv = rows.flatMap((r) => (r.env ? [r.env] : []));
    for (const cmd of ["run", "coordinator", "worker"]) {
      const help = (await runCli([cmd, "--help"])).stdout;
      const expected = [...ENV_SETTINGS.filter((e) => e.commands.includes(cmd)).map((e) => e.name), ...(cmd === "worker" ? ["CTRAIN_NATS_URL"] : optionEnv.filter((n) => n !== "CTRAIN_NATS_URL"))];
      for (const name of expected) assert.ok(help.includes(name), `ctrain ${cmd} --help lacks ${name}`);
    }
    const run = (await runCli(["run", "--help"])).stdout;
    for (const name of ["CTRAIN_DP_CHECKSUM_EVERY", "CTRAIN_DP_CHECKPOINT_EVERY", "CTRAIN_DP_STEP_TIMEOUT_MS", "CTRAIN_FASHION_MNIST_DIR", "NATS_SERVER_BIN", "CTRAIN_NATS_PASS", "CTRAIN_LOG_LEVEL"])
      assert.ok(run.includes(name), `run --help lacks ${name}`);
  });
});

/** A folder data set of 3 easy Fashion-MNIST classes with 3 bad files; returns the good-image count. */
async function folderWithBadFiles(root: string): Promise<number> {
  const ds = await openDataset("fashion-mnist", { seed: 1, valSplit: 0.1, testSplit: 0.1, limit: 200, maxPixels: 1e7 });
  const wanted = ["Trouser", "Sneaker", "Bag"];
  for (const cls of wanted) await mkdir(join(root, cls), { recursive: true });
  let good = 0;
  for (const s of ds.samples) {
    const cls = ds.classes[s.label];
    if (!wanted.includes(cls)) continue;
    await sharp(Buffer.from(await ds.readRgb(s, 28)), { raw: { width: 28, height: 28, channels: 3 } }).png().toFile(join(root, cls, `${s.id.replace(/\//g, "_")}.png`));
    good++;
  }
  await writeFile(join(root, "Bag", "corrupt.jpg"), Buffer.from(Array.from({ length: 2048 }, (_, i) => (i * 7919) % 251)));
  await writeFile(join(root, "Sneaker", "empty.png"), Buffer.alloc(0));
  await writeFile(join(root, "Trouser", "notes.png"), "this is a text file, not a PNG\n");
  return good;
}

interface Summary {
  workers: number;
  samples: { train: number; val: number; test: number };
  extraction: { images: number; cache_hit: boolean };
  phases: { head: { test_accuracy: number }; fine_tune?: { test_accuracy: number } };
  skipped_inputs: unknown[];
}

describe("cli - the summary a run ends with", () => {
  let root: string;
  let good: number;
  const common = (out: string, job: string): string[] => ["--data", root, "--input-size", "64", "--feature-layer", "block_12_add", "--epochs", "2", "--metrics-port", "-1",
    "--cache-dir", join(dir, "cache"), "--out", out, "--job", job, "--log-format", "json", "--val-split", "0.2", "--test-split", "0.2"];
  before(async () => {
    root = join(dir, "folder");
    good = await folderWithBadFiles(root);
  });

  test("cli - with fine-tuning it reports both phases and the model saved; images = what was extracted", async () => {
    const out = join(dir, "ft");
    const r = await runCli(["run", ...common(out, "ux-ft"), "--workers", "1", "--fine-tune-layers", "9", "--fine-tune-epochs", "1"]);
    assert.equal(r.code, 0, r.stderr.slice(-3000));
    const s = JSON.parse(await readFile(join(out, "summary.json"), "utf8")) as Summary;
    assert.equal(s.extraction.images, good, "the bad files are skipped inputs, not extracted images");
    assert.equal(s.samples.train + s.samples.val + s.samples.test, good);
    assert.equal(s.skipped_inputs.length, 3);
    const pct = (x: number): string => `${(x * 100).toFixed(1)}%`;
    const text = r.stdout;
    assert.match(text, new RegExp(`head\\s+test accuracy ${pct(s.phases.head.test_accuracy).replace(".", "\\.")}`));
    assert.match(text, new RegExp(`fine-tune\\s+test accuracy ${pct(s.phases.fine_tune!.test_accuracy).replace(".", "\\.")}`));
    assert.ok(text.includes(`saved      ${join(out, "model")} (fine-tuned`), text);
    assert.ok(text.includes(join(out, "model-head")), text);
    assert.match(text, new RegExp(`${good} images extracted`));
    assert.match(text, /3 inputs skipped/);
    assert.match(text.trimEnd().split("\n").at(-1)!, /^run folder: /, "the summary is the last thing printed");
  });

  test("cli - a cache-hit run with --workers 2 starts no worker and does not claim any", async () => {
    const out = join(dir, "hit");
    const r = await runCli(["run", ...common(out, "ux-hit"), "--workers", "2"]);
    assert.equal(r.code, 0, r.stderr.slice(-3000));
    const s = JSON.parse(await readFile(join(out, "summary.json"), "utf8")) as Summary;
    assert.equal(s.extraction.cache_hit, true);
    assert.equal(s.workers, 0);
    assert.match(r.stdout, /no worker started/);
    assert.match(r.stdout, /features\s+from the cache/);
    assert.doesNotMatch(r.stdout + r.stderr, /embedded nats-server started/);
  });
});

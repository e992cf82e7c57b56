/**
 * Bad input through the real `ctrain` binary: a wrong config file or data set must end the run with
 * exit code 2 and one line that names the problem (no stack trace), before any work -- no output
 * folder, no cache, no nats-server. Fast: every case is refused before a model is loaded.
 */
import { after, before, describe, test } from "node:test";
import assert from "node:assert/strict";
import { existsSync } from "node:fs";
import { mkdir, mkdtemp, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { runCli } from "./helpers/cli.js";

let dir: string;
before(async () => {
  dir = await mkdtemp(join(tmpdir(), "ctrain-bad-input-"));
});
after(async () => {
  await rm(dir, { recursive: true, force: true });
});

/** An IDX folder whose train images file has the labels' magic number. */
async function wrongMagicIdx(): Promise<string> {
  const idx = join(dir, "idx-wrong-magic");
  await mkdir(idx, { recursive: true });
  const images = (n: number, magic: number): Buffer => {
    const b = Buffer.alloc(16 + n * 4);
    b.writeUInt32BE(magic, 0);
    b.writeUInt32BE(n, 4);
    b.writeUInt32BE(2, 8);
    b.writeUInt32BE(2, 12);
    return b;
  };
  const labels = (n: number): Buffer => {
    const b = Buffer.alloc(8 + n);
    b.writeUInt32BE(0x801, 0);
    b.writeUInt32BE(n, 4);
    return b;
  };
  await writeFile(join(idx, "train-images-idx3-ubyte"), images(10, 0x801));
  await writeFile(join(idx, "train-labels-idx1-ubyte"), labels(10));
  await writeFile(join(idx, "t10k-images-idx3-ubyte"), images(2, 0x803));
  await writeFile(join(idx, "t10k-labels-idx1-ubyte"), labels(2));
  return idx;
}

describe("bad input - refused by the CLI before any work", () => {
  const cases: { name: string; yaml?: string; args?: () => Promise<string[]>; pattern: RegExp }[] = [
    { name: "epochs is a list", yaml: "data: fashion-mnist\nepochs: [1, 2]\n", pattern: /--epochs \(.*job\.yaml\) must be a number, got \[1,2\]/ },
    { name: "input-size is a word", yaml: "input-size: \"big\"\n", pattern: /--input-size \(.*job\.yaml\) must be a number, got "big"/ },
    { name: "batch-size is negative", yaml: "batch-size: -1\n", pattern: /--batch-size \(.*job\.yaml\) must be between 1 and 65536, got -1/ },
    { name: "epochs is a YAML alias cycle", yaml: "epochs: &a [*a]\n", pattern: /--epochs \(.*job\.yaml\) must be a number, got a list/ },
    { name: "YAML syntax error", yaml: "epochs: 3\ninput-size: [96\n", pattern: /Config file .*job\.yaml is not valid YAML: .*at line \d+, column \d+/ },
    { name: "config file missing", args: async () => ["--config", join(dir, "no-such-job.yaml")], pattern: /Cannot read config file .*no-such-job\.yaml: ENOENT/ },
    { name: "IDX with wrong magic", args: async () => ["--data", `mnist:${await wrongMagicIdx()}`], pattern: /train-images-idx3-ubyte has magic number 0x00000801, expected 0x00000803/ },
  ];
  for (const c of cases) {
    test(`bad input - ${c.name}: exit 2, one line naming it, no output folder`, async () => {
      const slug = c.name.replace(/\W+/g, "-");
      const out = join(dir, `out-${slug}`);
      const cache = join(dir, `cache-${slug}`);
      let args: string[];
      if (c.yaml !== undefined) {
        const file = join(dir, slug, "job.yaml");
        await mkdir(join(dir, slug), { recursive: true });
        await writeFile(file, c.yaml);
        args = ["--config", file];
      } else args = await c.args!();
      const r = await runCli(["run", ...args, "--out", out, "--cache-dir", cache, "--workers", "1", "--metrics-port", "-1"], { timeoutMs: 60_000 });
      assert.equal(r.code, 2, r.stderr);
      const lines = r.stderr.trimEnd().split("\n");
      assert.equal(lines.length, 1, `one line: ${r.stderr}`);
      assert.match(lines[0], /^ctrain: ConfigError: /);
      assert.match(lines[0], c.pattern);
      assert.doesNotMatch(r.stderr, /\bat .*\.js:\d+/, "no stack trace");
      assert.ok(!existsSync(out), "no output folder");
      assert.ok(!existsSync(cache), "no cache folder");
    });
  }
});

describe("bad input - settings from the environment and command flags", () => {
  const refused = async (args: string[], env: NodeJS.ProcessEnv, pattern: RegExp): Promise<void> => {
    const out = join(dir, `out-env-${Object.keys(env).join("-") || args[0]}`);
    const r = await runCli([...args, ...(args[0] === "worker" ? [] : ["--out", out, "--cache-dir", join(out, "cache"), "--metrics-port", "-1"])], { env, timeoutMs: 60_000 });
    assert.equal(r.code, 2, r.stderr);
    const lines = r.stderr.trimEnd().split("\n");
    assert.equal(lines.length, 1, `one line: ${r.stderr}`);
    assert.match(lines[0], pattern);
    assert.doesNotMatch(r.stderr, /\bat .*\.js:\d+/, "no stack trace");
    assert.ok(!existsSync(out), "no output folder");
  };

  test("bad input - a bad CTRAIN_DP_* value is refused before any work, naming the variable", async () => {
    await refused(["run", "--workers", "1"], { CTRAIN_DP_STEP_TIMEOUT_MS: "soon" }, /^ctrain: ConfigError: --step-timeout-ms \(environment CTRAIN_DP_STEP_TIMEOUT_MS\) must be a number, got "soon"/);
    await refused(["coordinator", "--nats", "nats://127.0.0.1:1"], { CTRAIN_DP_CHECKPOINT_EVERY: "-3" }, /CTRAIN_DP_CHECKPOINT_EVERY\) must be between 0 and 1000000, got -3/);
  });

  test("bad input - a bad environment-only setting is refused before any work, naming it", async () => {
    await refused(["run", "--workers", "1"], { CTRAIN_LOG_LEVEL: "loud" }, /^ctrain: ConfigError: environment CTRAIN_LOG_LEVEL must be one of debug, info, warn, error; got "loud"/);
  });

  test("bad input - ctrain worker has no batch size of its own: --batch-size says where it is set", async () => {
    await refused(["worker", "--nats", "nats://127.0.0.1:1", "--batch-size", "8"], {}, /^ctrain: ConfigError: ctrain worker has no --batch-size: images per forward pass are the job's --extract-batch-size \(given to the coordinator\)/);
    await refused(["worker", "--nats", "nats://127.0.0.1:1", "--extract-batch-size=8"], {}, /ctrain worker has no --extract-batch-size:/);
  });

  test("bad input - --data-parallel takes auto, on or off, from a flag or the config file", async () => {
    await refused(["coordinator", "--nats", "nats://127.0.0.1:1", "--data-parallel", "maybe"], {}, /--data-parallel \(flag\) must be one of auto, on, off; got "maybe"/);
  });

  test("bad input - a nats-server that does not start ends the run with one line naming it (NATS_SERVER_BIN)", async () => {
    const out = join(dir, "out-bad-nats-bin");
    const r = await runCli(["run", "--data", "fashion-mnist", "--limit", "20", "--input-size", "32", "--epochs", "1", "--workers", "2", "--metrics-port", "-1",
      "--log-format", "json", "--out", out, "--cache-dir", join(dir, "cache-bad-nats-bin"), "--backend", "wasm"], { env: { NATS_SERVER_BIN: "/bin/false" }, timeoutMs: 120_000 });
    assert.equal(r.code, 2, r.stderr);
    const last = r.stderr.trimEnd().split("\n").at(-1)!;
    assert.match(last, /^ctrain: ServiceStartError: nats-server \(\/bin\/false\) did not start: exit 1\. Fix NATS_SERVER_BIN/);
    assert.doesNotMatch(r.stderr, /\bat .*\.js:\d+/, "no stack trace");
  });
});

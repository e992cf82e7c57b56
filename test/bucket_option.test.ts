/**
 * `--bucket-bytes` (issue 18): the gradient chunk size reaches data-parallel fine-tuning through the
 * option table like every other setting (flag, CTRAIN_DP_BUCKET_BYTES, config file), is refused with
 * a message naming the flag when it cannot fit a NATS message, and has one default, shared by the
 * option table, the TrainingAttempt and the averager.
 */
import assert from "node:assert/strict";
import { mkdtemp, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { test } from "node:test";
import { envOptions, loadOptions, parseArgs, reproducibleOptions } from "../core/runtime/config.js";
import { ConfigError } from "../core/runtime/errors.js";
import { DATA_PARALLEL_DEFAULTS, MAX_BUCKET_BYTES } from "../core/training/data_parallel_settings.js";
import { DEFAULT_BUCKET_BYTES } from "../proto/tensor_codec.js";

test("bucket option - flag, environment and config file, flags first; one default everywhere", async () => {
  const dir = await mkdtemp(join(tmpdir(), "ctrain-bucket-"));
  try {
    const file = join(dir, "job.yaml");
    await writeFile(file, "bucket-bytes: 65536\n");
    assert.equal(loadOptions(parseArgs(["--config", file]), {}).bucketBytes, 65536);
    assert.equal(loadOptions(parseArgs(["--config", file]), { CTRAIN_DP_BUCKET_BYTES: "131072" }).bucketBytes, 131072);
    assert.equal(loadOptions(parseArgs(["--config", file, "--bucket-bytes", "262144"]), { CTRAIN_DP_BUCKET_BYTES: "131072" }).bucketBytes, 262144);
    const d = loadOptions(parseArgs([]), {});
    assert.equal(d.bucketBytes, DATA_PARALLEL_DEFAULTS.bucketBytes);
    assert.equal(DEFAULT_BUCKET_BYTES, DATA_PARALLEL_DEFAULTS.bucketBytes, "the averager's default is the option's");
    assert.ok(!("bucket-bytes" in reproducibleOptions(d)), "chunking does not change the result: not part of job.yaml");
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
});

test("bucket option - values that cannot fit a NATS message, or are not byte counts, are refused naming the flag", () => {
  const bad = (argv: string[], env: NodeJS.ProcessEnv, re: RegExp): void =>
    assert.throws(() => loadOptions(parseArgs(argv), env), (e: unknown) => e instanceof ConfigError && re.test(e.message), `${argv.join(" ")} ${JSON.stringify(env)}`);
  bad(["--bucket-bytes", String(1024 * 1024)], {}, new RegExp(`--bucket-bytes \\(flag\\) must be between 4096 and ${MAX_BUCKET_BYTES}, got 1048576`));
  bad(["--bucket-bytes", "0"], {}, /--bucket-bytes \(flag\) must be between 4096/);
  bad(["--bucket-bytes", "512k"], {}, /--bucket-bytes \(flag\) must be a number, got "512k"/);
  bad(["--bucket-bytes", "65536.5"], {}, /must be a whole number/);
  assert.throws(() => envOptions({ CTRAIN_DP_BUCKET_BYTES: "-1" }), /--bucket-bytes \(environment CTRAIN_DP_BUCKET_BYTES\) must be between 4096/);
});

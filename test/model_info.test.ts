/**
 * `ctrain model-info` run as a user runs it: the built-in models' preprocessing, parameter counts
 * (Keras' include_top=False counts), the layers worth cutting at with their shapes at the asked input
 * size, and the input-size and option checks.
 */
import assert from "node:assert/strict";
import { describe, test } from "node:test";
import type { ModelInfo } from "../cli/model_info.js";
import { runCli } from "./helpers/cli.js";

describe("model-info - the CLI describes a pretrained base", () => {
  test("model-info - inception_v3 --json: mixed blocks with their shapes at 96 px, mixed10 the default", async () => {
    const r = await runCli(["model-info", "--model", "inception_v3", "--input-size", "96", "--json", "--backend", "wasm"], { timeoutMs: 60_000 });
    assert.equal(r.code, 0, r.stderr);
    const info = JSON.parse(r.stdout) as ModelInfo;
    assert.equal(info.model, "inception_v3");
    assert.equal(info.preprocessing, "unit");
    assert.equal(info.preprocessing_origin, "builtin");
    assert.equal(info.min_input_size, 75);
    assert.equal(info.default_feature_layer, "mixed10");
    assert.equal(info.parameters, 21_802_784);
    const byName = new Map(info.layers.map((l) => [l.name, l]));
    for (let i = 0; i <= 10; i++) assert.ok(byName.has(`mixed${i}`), `mixed${i} listed`);
    // Layers inside a block (branches of a mixed block) are no place to cut.
    assert.ok(!byName.has("mixed9_0"), "mixed9_0 sits inside a branch");
    assert.deepEqual(byName.get("mixed10")!.output_shape, [1, 1, 2048]);
    assert.deepEqual(byName.get("mixed2")!.output_shape, [9, 9, 288]);
    assert.ok(info.layers.every((l) => /Activation|Concatenate|Pooling|ReLU|Add/.test(l.class_name)));
  });

  test("model-info - mobilenet_v2 text output marks out_relu and lists block outputs with shapes", async () => {
    const r = await runCli(["model-info", "--input-size", "128", "--backend", "wasm"], { timeoutMs: 60_000 });
    assert.equal(r.code, 0, r.stderr);
    assert.match(r.stdout, /preprocessing\s+unit/);
    assert.match(r.stdout, /parameters\s+2,257,984/);
    assert.match(r.stdout, /^\* out_relu\s+ReLU\s+4x4x1280$/m);
    assert.match(r.stdout, /^ {2}block_12_add\s+Add\s+8x8x96$/m);
    assert.doesNotMatch(r.stdout, /block_12_project_BN|block_12_expand_relu/, "layers inside a residual block are not listed");
  });

  test("model-info - a too small input size and an unknown preprocessing are refused naming the option", async () => {
    const small = await runCli(["model-info", "--model", "inception_v3", "--input-size", "64", "--backend", "wasm"], { timeoutMs: 60_000 });
    assert.equal(small.code, 2);
    assert.match(small.stderr, /ConfigError: --input-size 64 is too small for inception_v3: .*at least 75/);
    const pre = await runCli(["model-info", "--preprocessing", "zero-one"], { timeoutMs: 60_000 });
    assert.equal(pre.code, 2);
    assert.match(pre.stderr, /--preprocessing \(flag\) must be one of auto, unit, tf, caffe, torch, none; got "zero-one"/);
  });
});

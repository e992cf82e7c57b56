/**
 * Fuzzing the trust boundary: random bytes, truncations and bit flips of valid messages fed to decode
 * for every message type. Decode may refuse, but only with DecodeError, and quickly.
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import fc from "fast-check";
import { DECODE_REASONS, DecodeError, MESSAGE_TYPES, decode, encode, type MessageType } from "../proto/codec.js";
import { EPOCH, JOB, STEP, sampleExtractionSpec, sampleMessages } from "./helpers/messages.js";

const SEED = 20240611;
const expect = { job: JOB, epoch: EPOCH, step: STEP };

/** Decodes and returns the outcome; fails the property on anything but success or DecodeError. */
function tryDecode(type: MessageType, bytes: Uint8Array): "ok" | DecodeError["reason"] {
  try {
    decode(type, bytes, expect);
    return "ok";
  } catch (err) {
    if (!(err instanceof DecodeError)) throw new Error(`decode(${type}) threw ${String(err)} for ${Buffer.from(bytes).toString("hex")}`, { cause: err });
    assert.ok((DECODE_REASONS as readonly string[]).includes(err.reason));
    return err.reason;
  }
}

const valid = Object.fromEntries(MESSAGE_TYPES.map((t) => [t, encode(t, sampleMessages()[t] as never)])) as Record<MessageType, Uint8Array>;

test("fuzz - random bytes decode to a DecodeError or a valid message, for every type", () => {
  const started = Date.now();
  for (const type of MESSAGE_TYPES) {
    fc.assert(fc.property(fc.uint8Array({ maxLength: 256 }), (bytes) => void tryDecode(type, bytes)), { seed: SEED, numRuns: 2000 });
  }
  assert.ok(Date.now() - started < 10_000, `took ${Date.now() - started} ms`);
});

test("fuzz - every truncation of a valid message is refused or decodes, never crashes", () => {
  for (const type of MESSAGE_TYPES) {
    const bytes = valid[type];
    for (let n = 0; n < bytes.length; n++) tryDecode(type, bytes.subarray(0, n));
    assert.equal(tryDecode(type, bytes), "ok", type);
  }
});

test("fuzz - bit flips and byte edits of valid messages give DecodeError or a valid message", () => {
  const started = Date.now();
  const counts = new Map<string, number>();
  for (const type of MESSAGE_TYPES) {
    const base = valid[type];
    const edit = fc.array(
      fc.oneof(
        fc.record({ kind: fc.constant("flip" as const), at: fc.nat(), bit: fc.integer({ min: 0, max: 7 }) }),
        fc.record({ kind: fc.constant("set" as const), at: fc.nat(), value: fc.integer({ min: 0, max: 255 }) }),
        fc.record({ kind: fc.constant("insert" as const), at: fc.nat(), value: fc.integer({ min: 0, max: 255 }) }),
        fc.record({ kind: fc.constant("delete" as const), at: fc.nat() }),
      ),
      { minLength: 1, maxLength: 4 },
    );
    fc.assert(
      fc.property(edit, (edits) => {
        const bytes = Array.from(base);
        for (const e of edits) {
          const at = e.at % Math.max(1, bytes.length);
          if (e.kind === "flip") bytes[at] = (bytes[at] ?? 0) ^ (1 << e.bit);
          else if (e.kind === "set") bytes[at] = e.value;
          else if (e.kind === "insert") bytes.splice(at, 0, e.value);
          else bytes.splice(at, 1);
        }
        const r = tryDecode(type, Uint8Array.from(bytes));
        counts.set(r, (counts.get(r) ?? 0) + 1);
      }),
      { seed: SEED, numRuns: 1500 },
    );
  }
  assert.ok(Date.now() - started < 10_000, `took ${Date.now() - started} ms`);
  // The edits reach past the parser: some hit the header checks and the shape checks.
  assert.ok((counts.get("malformed") ?? 0) > 0);
  assert.ok((counts.get("ok") ?? 0) > 0);
  assert.ok([...counts.keys()].some((k) => k !== "ok" && k !== "malformed"), JSON.stringify([...counts]));
});

test("fuzz - a chunk's payload bit flip never decodes as valid (checksum)", () => {
  for (const type of ["GradientChunk", "AveragedChunk"] as const) {
    const msg = sampleMessages()[type];
    fc.assert(
      fc.property(fc.nat(), fc.integer({ min: 0, max: 7 }), (at, bit) => {
        const data = new Uint8Array(msg.data);
        data[at % data.length]! ^= 1 << bit;
        const r = tryDecode(type, encode(type, { ...msg, data }));
        assert.notEqual(r, "ok");
      }),
      { seed: SEED, numRuns: 500 },
    );
  }
});

test("fuzz - truncations and byte edits of an extraction JobSpec give DecodeError or a valid round", () => {
  const base = encode("JobSpec", sampleExtractionSpec());
  for (let n = 0; n < base.length; n++) tryDecode("JobSpec", base.subarray(0, n));
  assert.equal(tryDecode("JobSpec", base), "ok");
  fc.assert(
    fc.property(fc.nat(), fc.integer({ min: 0, max: 255 }), (at, value) => {
      const bytes = Uint8Array.from(base);
      bytes[at % bytes.length] = value;
      if (tryDecode("JobSpec", bytes) !== "ok") return;
      // What decodes is a whole round or the flat shape, never a round with a setting missing.
      const spec = decode("JobSpec", bytes, expect);
      if (spec.extraction) assert.ok(spec.extraction.imagesPerBatch > 0 && spec.extraction.data !== "" && spec.extraction.inputSize > 0);
    }),
    { seed: SEED, numRuns: 2000 },
  );
});

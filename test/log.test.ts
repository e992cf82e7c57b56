/** core/runtime/log.ts: JSON lines off a terminal, a human line on one, levels, child fields, errors with causes. */
import { test } from "node:test";
import assert from "node:assert/strict";
import { BadInputError, ConfigError } from "../core/runtime/errors.js";
import { createLogger, levelFromEnv, parseLogLevel, type LogStream } from "../core/runtime/log.js";

function capture(isTTY = false): LogStream & { lines: string[] } {
  const lines: string[] = [];
  return { isTTY, lines, write: (s: string) => lines.push(s) };
}

const FIXED = new Date("2025-01-02T03:04:05.678Z");

test("log - auto format writes one JSON object per line when not a TTY", () => {
  const out = capture(false);
  const log = createLogger({ job: "j1", worker: "w0", stream: out, level: "info", now: () => FIXED });
  log.info("shard done", { shard: 3, images: 256 });
  assert.equal(out.lines.length, 1);
  assert.ok(out.lines[0].endsWith("\n") && !out.lines[0].slice(0, -1).includes("\n"));
  assert.deepEqual(JSON.parse(out.lines[0]), { ts: FIXED.toISOString(), level: "info", msg: "shard done", job: "j1", worker: "w0", shard: 3, images: 256 });
});

test("log - the coordinator's events have no worker field", () => {
  const out = capture();
  createLogger({ job: "j1", stream: out, level: "info" }).warn("slow");
  const e = JSON.parse(out.lines[0]) as Record<string, unknown>;
  assert.equal(e.job, "j1");
  assert.equal("worker" in e, false);
  assert.equal(e.level, "warn");
});

test("log - levels below the threshold are dropped", () => {
  const out = capture();
  const log = createLogger({ job: "j1", stream: out, level: "warn" });
  log.debug("d");
  log.info("i");
  log.warn("w");
  log.error("e");
  assert.deepEqual(out.lines.map((l) => (JSON.parse(l) as { msg: string }).msg), ["w", "e"]);
  assert.equal(log.enabled("info"), false);
  assert.equal(log.enabled("error"), true);
});

test("log - CTRAIN_LOG_LEVEL sets the level, default info", () => {
  assert.equal(levelFromEnv({}), "info");
  assert.equal(levelFromEnv({ CTRAIN_LOG_LEVEL: "DEBUG" }), "debug");
  assert.equal(levelFromEnv({ CTRAIN_LOG_LEVEL: "loud" }), "info");
  assert.equal(parseLogLevel("error"), "error");
  const saved = process.env.CTRAIN_LOG_LEVEL;
  process.env.CTRAIN_LOG_LEVEL = "error";
  try {
    assert.equal(createLogger({ job: "j1", stream: capture() }).level, "error");
  } finally {
    if (saved === undefined) delete process.env.CTRAIN_LOG_LEVEL;
    else process.env.CTRAIN_LOG_LEVEL = saved;
  }
});

test("log - child loggers add fields; the event's own fields win; reserved keys stay", () => {
  const out = capture();
  const log = createLogger({ job: "j1", worker: "w0", stream: out, level: "info" }).child({ phase: "extract", shard: 1 });
  log.child({ shard: 2 }).info("x", { attempt: 2, msg: "not this", level: "nope" });
  const e = JSON.parse(out.lines[0]) as Record<string, unknown>;
  assert.equal(e.phase, "extract");
  assert.equal(e.shard, 2);
  assert.equal(e.attempt, 2);
  assert.equal(e.msg, "x");
  assert.equal(e.level, "info");
  assert.deepEqual(Object.keys(e).slice(0, 3), ["ts", "level", "msg"]);
});

test("log - errors are serialized with name, message, extra fields and cause", () => {
  const out = capture();
  const cause = new Error("unexpected end of JPEG");
  const err = new BadInputError("cats/1.jpg", "corrupt", "cannot decode cats/1.jpg", { cause });
  createLogger({ job: "j1", stream: out, level: "info" }).error("skipped", { err, wrapped: new ConfigError("bad", { cause: "a string cause" }) });
  const e = JSON.parse(out.lines[0]) as { err: Record<string, unknown>; wrapped: Record<string, unknown> };
  assert.equal(e.err.name, "BadInputError");
  assert.equal(e.err.message, "cannot decode cats/1.jpg");
  assert.equal(e.err.id, "cats/1.jpg");
  assert.equal(e.err.reason, "corrupt");
  assert.deepEqual({ name: (e.err.cause as Record<string, unknown>).name, message: (e.err.cause as Record<string, unknown>).message }, { name: "Error", message: "unexpected end of JPEG" });
  assert.equal(e.wrapped.cause, "a string cause");
});

test("log - NaN, bigint and circular fields do not break a line", () => {
  const out = capture();
  const loop: Record<string, unknown> = { a: 1 };
  loop.self = loop;
  createLogger({ job: "j1", stream: out, level: "info" }).info("odd", { loss: Number.NaN, big: 10n, loop });
  const e = JSON.parse(out.lines[0]) as Record<string, unknown>;
  assert.equal(e.loss, "NaN");
  assert.equal(e.big, "10");
  assert.deepEqual(e.loop, { a: 1, self: "[circular]" });
});

test("log - a terminal gets one compact human line", () => {
  const out = capture(true);
  const saved = process.env.NO_COLOR;
  process.env.NO_COLOR = "1";
  try {
    createLogger({ job: "j1", worker: "w0", stream: out, level: "info" }).info("step done", { step: 7, note: "two words", err: new Error("boom") });
  } finally {
    if (saved === undefined) delete process.env.NO_COLOR;
    else process.env.NO_COLOR = saved;
  }
  assert.equal(out.lines.length, 1);
  assert.match(out.lines[0], /^\d\d:\d\d:\d\d\.\d{3} INFO  \[j1\/w0\] step done step=7 note="two words" err="Error: boom"\n$/);
});

test("log - format json wins over a TTY and format human over a pipe", () => {
  const tty = capture(true);
  createLogger({ job: "j1", stream: tty, format: "json", level: "info" }).info("a");
  assert.equal((JSON.parse(tty.lines[0]) as { msg: string }).msg, "a");
  const pipe = capture(false);
  createLogger({ job: "j1", stream: pipe, format: "human", level: "info" }).info("b");
  assert.match(pipe.lines[0], /INFO  \[j1\] b\n$/);
});

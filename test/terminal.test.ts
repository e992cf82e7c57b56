/**
 * What a person sees in a terminal (issue 16 items 1 and 2): one renderer owns the last line, so log
 * lines print whole above the live bar; Keras-like bars per epoch for head and fine-tuning, the
 * data-parallel one moving too; worker info lines stay out unless --verbose; nothing after the
 * summary; without a terminal every line of stderr is one JSON object. The whole-run checks drive a
 * real `ctrain run` in a tmux pane (skipped when tmux is not installed: `apt-get install -y tmux`).
 */
import assert from "node:assert/strict";
import { execFile, execFileSync } from "node:child_process";
import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { promisify } from "node:util";
import { after, before, describe, test } from "node:test";
import { createLogger } from "../core/runtime/log.js";
import { EpochBars, Progress } from "../core/runtime/progress.js";
import { CTRAIN_BIN, runCli } from "./helpers/cli.js";

const run = promisify(execFile);

/** A stream that says it is a terminal and keeps what was written. */
function fakeTty(): { isTTY: true; text: string; write(s: string): boolean } {
  return { isTTY: true, text: "", write(s: string) { this.text += s; return true; } };
}

/** What a terminal shows for `raw`: \r returns to the line start, \x1b[K clears to its end. */
function screen(raw: string): string[] {
  const lines: string[] = [""];
  for (const part of raw.split(/(\r|\n|\x1b\[K)/)) {
    if (part === "\n") lines.push("");
    else if (part === "\r") lines[lines.length - 1] = "\u0000" + lines[lines.length - 1]; // cursor to the start
    else if (part === "\x1b[K") lines[lines.length - 1] = lines[lines.length - 1].startsWith("\u0000") ? "\u0000" : lines[lines.length - 1];
    else if (part) {
      const cur = lines[lines.length - 1];
      if (cur.startsWith("\u0000")) lines[lines.length - 1] = part + cur.slice(1 + part.length);
      else lines[lines.length - 1] = cur + part;
    }
  }
  return lines.map((l) => l.replace(/\u0000/g, "").replace(/\x1b\[[0-9;]*m/g, ""));
}

describe("terminal - renderer", () => {
  test("terminal - a log line prints whole above a live bar, which is redrawn below it", () => {
    const tty = fakeTty();
    const log = createLogger({ job: "j", format: "human", stream: tty, level: "info" });
    const p = new Progress({ label: "extract", total: 10, unit: "img", stream: tty });
    p.tick(3);
    log.info("worker joined", { host: "vm", shard: undefined });
    p.finish();
    const shown = screen(tty.text).filter((l) => l !== "");
    assert.equal(shown.length, 2, JSON.stringify(shown));
    assert.match(shown[0], /^\d\d:\d\d:\d\d\.\d{3} \S*INFO\S* +\[j\] worker joined host=vm$/, "the log line, whole, without shard=undefined");
    assert.match(shown[1], /^extract +3\/10 \[/, "the bar below it");
  });

  test("terminal - epoch bars: one line per epoch with its figures, a data-parallel position moves it, an unstarted epoch leaves no line", () => {
    const tty = fakeTty();
    const bars = new EpochBars({ label: "head", epochs: 3, stepsPerEpoch: 2, stream: tty });
    bars.begin();
    bars.batch(0, 1.0);
    bars.batch(0, 0.5);
    bars.epochEnd({ epoch: 1, loss: 0.75, accuracy: 0.5, val_loss: 0.7, val_accuracy: 0.6 });
    bars.moveTo(1, 4, 6); // data-parallel report: step 4 of 6 = the end of epoch 2
    bars.epochEnd({ epoch: 2, loss: 0.6, accuracy: 0.7 });
    bars.finish(); // early stop before epoch 3
    const shown = screen(tty.text).filter((l) => l !== "");
    assert.equal(shown.length, 2, JSON.stringify(shown));
    assert.match(shown[0], /^head 1\/3 +2\/2 \[=+\] .* - loss 0\.7500 - accuracy 0\.5000 - val_loss 0\.7000 - val_accuracy 0\.6000$/);
    assert.match(shown[1], /^head 2\/3 +2\/2 \[=+\] .* - loss 0\.6000 - accuracy 0\.7000$/);
  });

  test("terminal - without a terminal a bar writes nothing but JSON events", () => {
    const lines: string[] = [];
    const stream = { isTTY: false, write: (s: string) => lines.push(s) };
    const log = createLogger({ job: "j", format: "auto", stream, level: "info" });
    const p = new Progress({ label: "extract", total: 10, unit: "img", stream, log, intervalSeconds: 0 });
    p.tick(5);
    p.finish();
    assert.ok(lines.length >= 1);
    for (const l of lines) assert.equal((JSON.parse(l) as { msg: string }).msg, "progress");
  });
});

function hasTmux(): boolean {
  try {
    execFileSync("tmux", ["-V"], { stdio: "ignore" });
    return true;
  } catch {
    return false;
  }
}

describe("terminal - a ctrain run in a tmux pane", { skip: hasTmux() ? false : "tmux is not installed (apt-get install -y tmux)", timeout: 300_000 }, () => {
  let dir: string;
  const session = `ctrain-ux-${process.pid}`;
  const JOB = ["--data", "fashion-mnist", "--limit", "300", "--input-size", "64", "--feature-layer", "block_12_add", "--epochs", "3", "--fine-tune-layers", "9", "--fine-tune-epochs", "2", "--workers", "2"];
  before(async () => {
    dir = await mkdtemp(join(tmpdir(), "ctrain-tty-"));
  });
  after(async () => {
    await run("tmux", ["kill-session", "-t", session]).catch(() => undefined);
    await rm(dir, { recursive: true, force: true });
  });

  test("terminal - bars and logs never share a line, worker info stays out, the summary ends the output", async () => {
    await run("tmux", ["new-session", "-d", "-s", session, "-x", "220", "-y", "50", "-c", dir]);
    const cmd = `${process.execPath} ${CTRAIN_BIN} run ${JOB.join(" ")} --cache-dir ${join(dir, "cache")} --job tty-1; tmux wait-for -S ${session}-done`;
    await run("tmux", ["send-keys", "-t", session, cmd, "Enter"]);
    await run("tmux", ["wait-for", `${session}-done`], { timeout: 280_000 });
    const { stdout } = await run("tmux", ["capture-pane", "-t", session, "-p", "-J", "-S", "-1000"]);
    const lines = stdout.split("\n").map((l) => l.trimEnd());
    const at = lines.findIndex((l) => l.includes(`--job tty-1`));
    const shown = lines.slice(at + 1).filter((l) => l !== "" && !/^\S+@\S+:.*[#$] ?$/.test(l));
    const pane = shown.join("\n");
    const logLine = /\d\d:\d\d:\d\d\.\d{3} (DEBUG|INFO|WARN|ERROR)/;
    for (const l of shown) {
      assert.ok(!(/\[[=>.]{24}\]/.test(l) && logLine.test(l)), `a bar and a log line share a line:\n${l}`);
      assert.ok(!/=undefined\b/.test(l), `an undefined field is printed:\n${l}`);
      assert.ok((l.match(/\d\d:\d\d:\d\d\.\d{3} /g) ?? []).length <= 1, `two log lines on one:\n${l}`);
    }
    for (const bar of ["head 1/3", "head 3/3", "fine-tune 1/2", "fine-tune 2/2"]) {
      const l = shown.find((x) => x.startsWith(bar));
      assert.ok(l, `a bar for ${bar}:\n${pane}`);
      assert.match(l, /(\d+)\/\1 \[=+\]/, `${bar} ends full: ${l}`);
      assert.match(l, / - loss \d\.\d{4} - accuracy \d\.\d{4} - val_loss \d\.\d{4} - val_accuracy \d\.\d{4}$/, `${bar} ends with its figures: ${l}`);
    }
    assert.ok(shown.some((l) => /^extract +\d+\/\d+ \[=+\] .* img\/s/.test(l)), `an extraction bar with img/s:\n${pane}`);
    for (const quiet of ["shard claimed", "shard done", "connected to NATS", "draining"]) assert.ok(!pane.includes(quiet), `worker info line "${quiet}" on the terminal:\n${pane}`);
    assert.match(shown.at(-1)!, /^run folder: runs\/tty-1 /, `the summary is the last thing printed:\n${shown.slice(-8).join("\n")}`);
    assert.ok(shown.some((l) => /^ {2}fine-tune +test accuracy \d+\.\d%/.test(l)));
  });

  test("terminal - without a terminal every stderr line of the same run is one JSON object, workers' included", async () => {
    const r = await runCli(["run", ...JOB, "--cache-dir", join(dir, "cache"), "--out", join(dir, "json-run"), "--job", "tty-2", "--metrics-port", "-1"]);
    assert.equal(r.code, 0, r.stderr.slice(-3000));
    const lines = r.stderr.split("\n").filter((l) => l !== "");
    for (const l of lines) assert.doesNotThrow(() => JSON.parse(l), `not JSON: ${l}`);
    const events = lines.map((l) => JSON.parse(l) as { msg: string; worker?: string });
    assert.ok(events.some((e) => e.worker === "tty-2-w0"), "the workers' lines pass through");
    assert.ok(events.some((e) => e.msg === "epoch"), "epoch events in the log");
  });
});

/**
 * A `ctrain` child process for the benches that run real coordinators and workers
 * (bench/finetune_dp.ts, bench/augment_dp.ts): its JSON log lines (other output kept as short text
 * lines) and its exit code.
 */
import { spawn, type ChildProcess } from "node:child_process";
import { fileURLToPath } from "node:url";

export const CTRAIN_CLI = fileURLToPath(new URL("../cli/main.js", import.meta.url));

export type LogLine = Record<string, unknown>;

export interface CtrainProcess {
  proc: ChildProcess;
  done: Promise<{ code: number | null; lines: LogLine[] }>;
}

/** Starts `ctrain <args>` with `env` added to this process's; `nodeArgs` go to node (e.g. --cpu-prof). */
export function runCtrain(args: string[], env: Record<string, string> = {}, nodeArgs: string[] = []): CtrainProcess {
  const p = spawn(process.execPath, [...nodeArgs, CTRAIN_CLI, ...args], { stdio: ["ignore", "pipe", "pipe"], env: { ...process.env, ...env } });
  return { proc: p, done: collectLines(p) };
}

function collectLines(p: ChildProcess): Promise<{ code: number | null; lines: LogLine[] }> {
  return new Promise((resolve) => {
    const lines: LogLine[] = [];
    let buf = "";
    const on = (d: Buffer): void => {
      buf += d.toString();
      let i;
      while ((i = buf.indexOf("\n")) >= 0) {
        const l = buf.slice(0, i);
        buf = buf.slice(i + 1);
        if (l.startsWith("{")) try { lines.push(JSON.parse(l) as LogLine); } catch { /* a progress line that starts with { */ }
        else if (l.trim()) lines.push({ text: l.slice(0, 300) });
      }
    };
    p.stdout!.on("data", on);
    p.stderr!.on("data", on);
    p.on("exit", (code) => resolve({ code, lines }));
  });
}

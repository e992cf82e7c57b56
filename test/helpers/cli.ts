/** Runs the built `ctrain` binary as a user would, capturing its output. */
import { spawn } from "node:child_process";
import { fileURLToPath } from "node:url";

export const CTRAIN_BIN = fileURLToPath(new URL("../../cli/main.js", import.meta.url));

export interface CliResult {
  code: number | null;
  stdout: string;
  stderr: string;
}

export async function runCli(args: string[], opts: { env?: NodeJS.ProcessEnv; cwd?: string; timeoutMs?: number } = {}): Promise<CliResult> {
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, [CTRAIN_BIN, ...args], {
      cwd: opts.cwd,
      env: { ...process.env, CTRAIN_LOG_LEVEL: "info", ...opts.env },
      stdio: ["ignore", "pipe", "pipe"],
    });
    let stdout = "";
    let stderr = "";
    child.stdout.on("data", (d: Buffer) => (stdout += d.toString()));
    child.stderr.on("data", (d: Buffer) => (stderr += d.toString()));
    const timer = setTimeout(() => {
      child.kill("SIGKILL");
      reject(new Error(`ctrain ${args.join(" ")} timed out after ${opts.timeoutMs} ms\n${stderr.slice(-4000)}`));
    }, opts.timeoutMs ?? 300_000);
    child.on("error", reject);
    child.on("close", (code) => {
      clearTimeout(timer);
      resolve({ code, stdout, stderr });
    });
  });
}

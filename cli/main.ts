#!/usr/bin/env node
/**
 * The `ctrain` binary: one entry, one module per sub-command, loaded lazily so `ctrain k8s render`
 * never pays for loading TensorFlow.js.
 */
import { createRequire } from "node:module";
import { inspect } from "node:util";
import { isUserError, userErrorLine } from "../core/runtime/errors.js";
import { redactSecrets } from "../core/runtime/log.js";
import { endLiveLines } from "../core/runtime/progress.js";

type Command = { summary: string; load: () => Promise<{ main(argv: string[]): Promise<number> }> };

const COMMANDS: Record<string, Command> = {
  run: { summary: "whole job on this machine: embedded nats-server and N local workers", load: () => import("./run.js") },
  coordinator: { summary: "the job against an existing NATS (--nats URL); workers elsewhere", load: () => import("./coordinator.js") },
  worker: { summary: "a feature-extraction worker (--nats URL); serves /metrics", load: () => import("./worker.js") },
  baseline: { summary: "logistic regression and an MLP on raw pixels, on the splits `run` uses", load: () => import("./baseline.js") },
  predict: { summary: "classify images with a trained model", load: () => import("./predict.js") },
  "model-info": { summary: "a pretrained base: preprocessing, parameters, layers worth cutting at", load: () => import("./model_info.js") },
  "export-onnx": { summary: "the frozen base (or a trained classifier) as an ONNX graph", load: () => import("./export_onnx.js") },
  k8s: { summary: "Kubernetes manifests for a job (`ctrain k8s render`)", load: () => import("./k8s.js") },
};

function usage(): string {
  const lines = Object.entries(COMMANDS).map(([name, c]) => `  ${name.padEnd(12)} ${c.summary}`);
  return `usage: ctrain <command> [options]\n\ncommands:\n${lines.join("\n")}\n\nRun 'ctrain <command> --help' (or -h) for the options of a command; 'ctrain --version' for the version.`;
}

/** The version of the ctrain package (package.json next to dist/). */
const VERSION = (createRequire(import.meta.url)("../../package.json") as { version: string }).version;

async function main(argv: string[]): Promise<number> {
  const [name, ...rest] = argv;
  // No flag takes a value that starts with --, so --version anywhere is the flag, for every command.
  if (argv.includes("--version")) {
    console.log(`ctrain ${VERSION} (node ${process.versions.node})`);
    return 0;
  }
  if (!name || name === "--help" || name === "-h" || name === "help") {
    console.log(usage());
    return name ? 0 : 2;
  }
  const cmd = COMMANDS[name];
  if (!cmd) {
    console.error(`ctrain: unknown command '${name}'.\n\n${usage()}`);
    return 2;
  }
  const mod = await cmd.load();
  return mod.main(rest);
}

main(process.argv.slice(2)).then(
  (code) => { process.exitCode = code; },
  (err: unknown) => {
    endLiveLines();
    if (isUserError(err)) {
      console.error(redactSecrets(userErrorLine(err)));
      process.exitCode = 2;
    } else {
      console.error(redactSecrets(inspect(err)));
      process.exitCode = 1;
    }
  },
);

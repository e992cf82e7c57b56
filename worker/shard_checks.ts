/**
 * What an extraction worker checks before it spends time on a shard, and which failures are final.
 * Pure (no NATS): unit-tested in test/extraction_round_units.test.ts.
 */
import type { RoundSettings } from "../proto/extraction_wire.js";
import { shardMemoryBytes } from "./extraction_executor.js";

/** A failure no retry can fix (the worker's model or data differ from the coordinator's, the shard cannot fit). */
export class TerminalShardError extends Error {
  override name = "TerminalShardError";
}

/** Throws TerminalShardError when this worker's extractor or data set differ from the coordinator's (by fingerprint). */
export function checkSameInputs(s: Pick<RoundSettings, "data" | "extractorFingerprint" | "datasetFingerprint"> & { extractor?: { precision?: string } }, extractorFingerprint: string, datasetFingerprint: string): void {
  if (s.extractorFingerprint !== extractorFingerprint) {
    // int8 weights are 7-bit on an x86 CPU without VNNI (core/models/onnx/quantize.ts): such a CPU computes other features.
    const int8 = s.extractor?.precision === "int8" ? "; with --engine-precision int8 the coordinator's and the workers' CPUs must also agree on VNNI (without it the weights are 7-bit): run them on one kind of node, or use fp32" : "";
    throw new TerminalShardError(`this worker's model differs from the coordinator's (extractor fingerprint ${extractorFingerprint.slice(0, 12)}, coordinator ${s.extractorFingerprint.slice(0, 12)}): run the same --model on both${int8}`);
  }
  if (s.datasetFingerprint !== datasetFingerprint)
    throw new TerminalShardError(`this worker's copy of data set ${s.data} differs from the coordinator's (fingerprint ${datasetFingerprint.slice(0, 12)} vs ${s.datasetFingerprint.slice(0, 12)}): share the same files`);
}

/** The extractor's sizes that decide a shard's memory. */
export interface ExtractorSize {
  featureDim: number;
  featureShape: number[];
  inputSize: number;
}

/** Throws TerminalShardError when a shard of `samples` needs more than `budget` bytes (see shardMemoryBytes). */
export function checkShardMemory(wire: string, samples: number, x: ExtractorSize, imagesPerBatch: number, budget: number): void {
  const need = shardMemoryBytes(samples, x.featureDim, x.inputSize, imagesPerBatch);
  if (need <= budget) return;
  throw new TerminalShardError(
    `shard ${wire} needs about ${Math.ceil(need / 2 ** 20)} MiB (${samples} samples x ${x.featureDim} features) but this worker may use ${Math.floor(budget / 2 ** 20)} MiB per shard: ` +
      `lower --shard-size${x.featureShape.length > 1 ? " or use --pooling avg" : ""}, or raise CTRAIN_WORKER_MEMORY_BYTES on the workers`,
  );
}

/** Whether a failed delivery is the shard's last: a terminal error, or the consumer's last delivery (maxDeliver <= 0: unbounded). */
export function isLastDelivery(err: Error, delivery: number, maxDeliver: number): boolean {
  return err instanceof TerminalShardError || (maxDeliver > 0 && delivery >= maxDeliver);
}

/**
 * The extraction phase: the frozen base's features of every sample, from the feature cache or
 * extracted by the cluster's executor (in this process, or the workers over NATS). Fine-tuning uses
 * the same road for the activations at its cut.
 */
import { cacheKey } from "../../core/datasets/feature_store.js";
import type { FeatureExtractor } from "../../core/models/feature_model.js";
import { type ExtractionResult, runExtraction } from "../extraction.js";
import type { JobCluster } from "../job.js";
import type { JobContext } from "./setup.js";

/** The features of a job (or the activations at a cut) and how they were obtained. */
export interface Extracted extends ExtractionResult {
  /** The feature-cache key: extractor fingerprint + data set fingerprint. */
  key: string;
}

/** Features of every sample by `extractor` (default: the job's), cached under their key. */
export async function extractPhase(ctx: JobContext, cluster: JobCluster, extractor: FeatureExtractor = ctx.extractor): Promise<Extracted> {
  const { opts, dataset } = ctx;
  const key = cacheKey(extractor.fingerprint, dataset.fingerprint);
  const result = await runExtraction({
    dataset, cache: ctx.cache, key, shardSize: opts.shardSize, log: ctx.log, metrics: ctx.metrics,
    executor: () => cluster.executor({ dataset, extractor, backend: ctx.backend }),
    meta: { featureDim: extractor.featureDim, featureShape: extractor.featureShape, model: ctx.source.name, inputSize: opts.inputSize, featureLayer: extractor.featureLayer, pooling: extractor.pooling },
  });
  return { ...result, key };
}

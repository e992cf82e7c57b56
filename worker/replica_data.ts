/**
 * What one data-parallel replica trains and on what, by the kind of attempt (proto/training_wire.ts):
 * the trainable model (the head alone for the head phase; top + pooling + head for fine-tuning) and
 * its training rows as a BatchSource that takes only this replica's part of each global batch.
 *
 * - Cached activations: the rows come whole from the attempt's object; a global batch's part is
 *   gathered from memory.
 * - Images (`--method augment`): the worker opens the data set and builds the frozen stage the way it
 *   does for extraction (the attempt carries an ExtractionRound; ExtractorCache shares what the
 *   extraction role already loaded), checks both fingerprints against the coordinator's, and each step
 *   decodes, augments and runs through the frozen stage only its part (image_batches' sliceOf); the next
 *   part is prepared while the current step trains.
 * - Cached features (the head of method 1): the train split's blocks, fetched from the object store as
 *   the one-process head's stream reaches them; every replica walks the same block order, each
 *   gathers only its part of each global batch. Validation streams the val blocks.
 * Validation of the others: rows the coordinator already has (cached features or activations of the val split).
 */
import type * as tf from "@tensorflow/tfjs";
import type { Dataset, SampleRef } from "../core/datasets/types.js";
import { calibrationImages, type FeatureExtractor } from "../core/models/feature_model.js";
import { buildSplit, fineTuneModel } from "../core/models/model_split.js";
import { loadPretrained } from "../core/models/model_zoo.js";
import { defaultThreads } from "../core/models/inference_engine.js";
import type { EngineProvider } from "../core/runtime/config.js";
import { type ArrayData, type BatchSource, evaluate, evaluateBatches, numSamples, takeRows } from "../core/training/train_loop.js";
import { blockBatches } from "../core/training/feature_batches.js";
import { heldBytes } from "../core/runtime/memory_accounting.js";
import type { FeatureInput } from "../proto/codec.js";
import { imageBatches, openImages } from "../core/training/image_batches.js";
import { fromExtractionRound, type RoundSettings } from "../proto/extraction_wire.js";
import { attemptPhase, DATA_UNAVAILABLE, decodeDataObject, decodeHeadObject, decodeSampleList, fromAugmentation, TRAINING_OBJECTS, type TrainingAttempt } from "../proto/training_wire.js";
import { ExtractorCache } from "./extractor_cache.js";
import { checkSameInputs } from "./shard_checks.js";
import { BatchPrepTimes } from "./step_timing.js";

/** A worker cannot open the attempt's images (a data set path missing on its machine): it never joins, the others go on. */
export class DataUnavailableError extends Error {
  override name = DATA_UNAVAILABLE;
}

/** This replica's part of global batch `batch` of `epoch` (sample indices in order). */
export type SliceOf = (indices: Int32Array, batch: number, epoch: number) => Int32Array;

export interface ReplicaData {
  /** The trainable part (owned: disposed with `dispose`). */
  model: tf.LayersModel;
  /** The training rows of each global batch, cut by `sliceOf`; validation on the val rows. */
  source(sliceOf: SliceOf): BatchSource;
  trainSamples: number;
  valSamples: number;
  /** Decode/augment and frozen-forward time of the image batches prepared (image attempts only). */
  prepTimes?: BatchPrepTimes;
  dispose(): void;
}

/** Where a replica gets what the attempt names. */
export interface ReplicaDataDeps {
  self: string;
  fetch(name: string): Promise<Uint8Array>;
  /** The worker's models and data sets (shared with its extraction role). */
  cache: ExtractorCache;
  /** onnxruntime threads when the attempt leaves it to the worker. */
  threads?: number;
  provider?: EngineProvider;
}

/** Builds the trainable part and its data for attempt `a`. */
export async function loadReplicaData(a: TrainingAttempt, d: ReplicaDataDeps): Promise<ReplicaData> {
  const owned: tf.LayersModel[] = [];
  const dispose = (): void => owned.forEach((m) => m.dispose());
  try {
    const head = await decodeHeadObject(await d.fetch(TRAINING_OBJECTS.head(a.attempt)));
    owned.push(head);
    const model = attemptPhase(a) === "head" ? head : await fineTuneReplica(a, head, owned);
    if (a.features) return { model, dispose, ...featureSource(a, a.features, d.fetch) };
    const val = decodeDataObject(await d.fetch(TRAINING_OBJECTS.data(a.attempt, "val")));
    const validate = numSamples(val) > 0 ? async (m: tf.LayersModel) => evaluate(m, val, a.numClasses) : undefined;
    if (a.images) {
      const prepTimes = new BatchPrepTimes();
      const images = await imageSource(a, d, prepTimes);
      return { model, trainSamples: images.labels.length, valSamples: numSamples(val), prepTimes, dispose, source: (sliceOf) => ({ ...images.batches(sliceOf), validate }) };
    }
    const train = decodeDataObject(await d.fetch(TRAINING_OBJECTS.data(a.attempt, "train")));
    return {
      model, trainSamples: numSamples(train), valSamples: numSamples(val), dispose,
      source: (sliceOf) => ({ samples: numSamples(train), batch: (indices, b, epoch) => takeRows(train, sliceOf(indices, b, epoch)), validate }),
    };
  } catch (err) {
    dispose();
    throw err;
  }
}

/**
 * A head attempt's cached features: the train split streamed from its block objects in the
 * one-process head's order (core/training/feature_batches.ts blockBatches; a window's blocks are
 * fetched together), validation streamed over the val blocks in entry order. Memory: two windows.
 */
function featureSource(a: TrainingAttempt, f: FeatureInput, fetch: ReplicaDataDeps["fetch"]): Pick<ReplicaData, "source" | "trainSamples" | "valSamples"> {
  const layout = { blockRows: f.blockRows, windowBlocks: f.windowBlocks };
  const load = (split: "train" | "val") => async (k: number): Promise<ArrayData> => {
    const block = decodeDataObject(await fetch(TRAINING_OBJECTS.rowBlock(f.entry, f.blockRows, split, k)));
    heldBytes("features", block.x.byteLength, block.x);
    return block;
  };
  const valBlocks = async function* (): AsyncGenerator<ArrayData> {
    for (let k = 0; k * f.blockRows < f.valRows; k++) yield load("val")(k);
  };
  const validate = f.valRows > 0 ? (m: tf.LayersModel) => evaluateBatches(m, valBlocks(), a.numClasses, f.valRows) : undefined;
  return {
    trainSamples: f.trainRows, valSamples: f.valRows,
    source: (sliceOf) => ({ ...blockBatches({ samples: f.trainRows, layout, seed: a.seed, sampleShape: f.sampleShape, load: load("train"), readWindows: true, sliceOf }), validate }),
  };
}

/** Top + pooling + head as the one-process path builds them (core/models/model_split.ts fineTuneModel). */
async function fineTuneReplica(a: TrainingAttempt, head: tf.LayersModel, owned: tf.LayersModel[]): Promise<tf.LayersModel> {
  const source = await loadPretrained(a.model);
  const split = await buildSplit(source, { inputSize: a.inputSize, featureLayer: a.featureLayer, unfreeze: a.fineTuneLayers });
  owned.push(split.bottom, split.top);
  return fineTuneModel(split, head, a.pooling, false);
}

/** The attempt's train images (opened on this worker) and the frozen stage in front of the trainable part. */
async function imageSource(a: TrainingAttempt, d: ReplicaDataDeps, prepTimes: BatchPrepTimes): Promise<{ labels: Int32Array; batches(sliceOf: SliceOf): BatchSource }> {
  const round = fromExtractionRound(a.images!.frozen);
  const dataset = await openData(round, d.self, d.cache);
  const x = round.extractor;
  const extractor: FeatureExtractor = await d.cache.extractor({
    ...x, threads: round.threads || d.threads || defaultThreads(1), provider: d.provider,
    ...(x.precision === "int8" ? { calibration: { dataset: dataset.fingerprint, images: calibrationImages(dataset, x.inputSize) } } : {}),
  });
  checkSameInputs(round, extractor.fingerprint, dataset.fingerprint);
  const list = decodeSampleList(await d.fetch(TRAINING_OBJECTS.data(a.attempt, "train")));
  const train = await openImages(dataset, samplesById(dataset, list.ids), round.extractor.inputSize).catch((err: unknown) => {
    throw unavailable(d.self, round, err);
  });
  const augment = fromAugmentation(a.images!.augment);
  return {
    labels: train.labels,
    batches: (sliceOf) => imageBatches(train, { seed: a.seed, preprocessing: extractor.preprocessing, augment, frozen: extractor, sliceOf, onTiming: prepTimes.add }),
  };
}

async function openData(round: RoundSettings, self: string, cache: ExtractorCache): Promise<Dataset> {
  try {
    return await cache.dataset(round.data, round.open);
  } catch (err) {
    throw unavailable(self, round, err);
  }
}

function unavailable(self: string, round: RoundSettings, err: unknown): DataUnavailableError {
  const why = err instanceof Error ? err.message : String(err);
  return new DataUnavailableError(
    `worker ${self} cannot open the data set ${JSON.stringify(round.data)} it is asked to train on: ${why} ` +
      `Mount the data set on this worker at the same path as on the coordinator (a folder: the same absolute path; fashion-mnist: /usr/share/datasets/fashion-mnist or $CTRAIN_FASHION_MNIST_DIR). ` +
      `This worker is left out; the others train.`,
    { cause: err },
  );
}

/** The samples of `ids` in that order; an id this worker's copy does not have means the copies differ. */
function samplesById(dataset: Dataset, ids: readonly string[]): SampleRef[] {
  const byId = new Map(dataset.samples.map((s) => [s.id, s]));
  return ids.map((id) => {
    const s = byId.get(id);
    if (!s) throw new Error(`sample ${JSON.stringify(id)} of the attempt is not in this worker's copy of ${dataset.name}: share the same files`);
    return s;
  });
}

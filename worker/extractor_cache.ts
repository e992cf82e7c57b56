/**
 * What a worker keeps between tasks and jobs: pretrained sources by model spec, feature extractors
 * by (model, input size, feature layer, pooling) and opened data sets by their options. Loading a
 * model and rebuilding it for an input size takes seconds; a shard takes about as long, so a worker
 * that rebuilt per task would spend half its time loading. Concurrent requests share one promise.
 */
import { openDataset, type OpenOptions } from "../core/datasets/open.js";
import type { Dataset } from "../core/datasets/types.js";
import { buildFeatureExtractor, type FeatureExtractor, isOnnxSource, loadModelSource, type ModelSource } from "../core/models/feature_model.js";
import { PREPROCESSINGS, type Preprocessing, withPreprocessing } from "../core/models/model_zoo.js";
import type { EngineName, EnginePrecision, EngineProvider, Pooling } from "../core/runtime/config.js";

export interface ExtractorKey {
  model: string;
  inputSize: number;
  featureLayer: string;
  pooling: Pooling;
  /** Inference engine (`--engine`). Default auto. */
  engine?: EngineName;
  /** onnxruntime intra-op threads. Default 1. */
  threads?: number;
  /** onnxruntime execution provider. Default auto. */
  provider?: EngineProvider;
  /** The round's preprocessing (ExtractionRound.preprocessing); absent = the model's own. */
  preprocessing?: string;
  /** `--engine-precision` (ExtractionRound.precision). Default fp32. */
  precision?: EnginePrecision;
  /** int8: the job's calibration images (core/models/feature_model.ts calibrationImages); one extractor per data set then. */
  calibration?: { dataset: string; images: () => Promise<Uint8Array[]> };
}

export class ExtractorCache {
  private readonly sources = new Map<string, Promise<ModelSource>>();
  private readonly extractors = new Map<string, Promise<FeatureExtractor>>();
  private readonly datasets = new Map<string, Promise<Dataset>>();
  /** Extractors built so far (a test checks the model is loaded once). */
  builds = 0;

  extractor(k: ExtractorKey): Promise<FeatureExtractor> {
    const key = JSON.stringify([k.model, k.inputSize, k.featureLayer, k.pooling, k.preprocessing ?? "", k.engine ?? "auto", k.threads ?? 1, k.provider ?? "auto", k.precision ?? "fp32", k.calibration?.dataset ?? ""]);
    let p = this.extractors.get(key);
    if (!p) {
      let src = this.sources.get(k.model);
      if (!src) {
        src = loadModelSource(k.model);
        this.sources.set(k.model, src);
        src.catch(() => this.sources.delete(k.model));
      }
      p = src.then((s) => {
        this.builds++;
        if (k.preprocessing !== undefined && !(PREPROCESSINGS as readonly string[]).includes(k.preprocessing))
          throw new Error(`the job asks for preprocessing ${JSON.stringify(k.preprocessing)}, which this worker does not know (${PREPROCESSINGS.join(", ")}): run the same ctrain version as the coordinator`);
        const source = !k.preprocessing ? s : isOnnxSource(s) ? { ...s, preprocessing: k.preprocessing as Preprocessing } : withPreprocessing(s, k.preprocessing as Preprocessing);
        return buildFeatureExtractor(source, { inputSize: k.inputSize, featureLayer: k.featureLayer, pooling: k.pooling, engine: k.engine, threads: k.threads, provider: k.provider, precision: k.precision, calibration: k.calibration?.images });
      });
      this.extractors.set(key, p);
      p.catch(() => this.extractors.delete(key));
    }
    return p;
  }

  dataset(spec: string, o: OpenOptions): Promise<Dataset> {
    const key = JSON.stringify([spec, o.seed, o.valSplit, o.testSplit, o.limit, o.maxPixels]);
    let p = this.datasets.get(key);
    if (!p) {
      p = openDataset(spec, o);
      this.datasets.set(key, p);
      p.catch(() => this.datasets.delete(key));
    }
    return p;
  }

  dispose(): void {
    for (const p of this.extractors.values()) void p.then((e) => e.dispose(), () => undefined);
    this.extractors.clear();
  }
}

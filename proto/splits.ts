/**
 * The one mapping between a data set's split names (core/datasets/types.ts: `train`, `val`, `test`)
 * and the wire's Split enum (`train`, `validation`, `test`). Everything that puts a split on the wire
 * or reads one goes through these two functions.
 */
import type { Split as DataSplit } from "../core/datasets/types.js";
import type { Split as WireSplit } from "./codec.js";

const TO_WIRE: Readonly<Record<DataSplit, WireSplit>> = { train: "train", val: "validation", test: "test" };
const FROM_WIRE: Readonly<Record<WireSplit, DataSplit>> = { train: "train", validation: "val", test: "test" };

/** A data set split as the wire names it. */
export function toWireSplit(s: DataSplit): WireSplit {
  return TO_WIRE[s];
}

/** A wire split as the data set names it. */
export function fromWireSplit(s: WireSplit): DataSplit {
  return FROM_WIRE[s];
}

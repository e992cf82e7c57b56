/**
 * Bytes this process holds for data, by kind, for the `ctrain_memory_bytes{kind}` gauge
 * (core/runtime/metrics.ts) next to the process RSS. A holder reports what it allocates; when it
 * passes the buffer as `owner`, the bytes are released when the buffer is garbage collected, so a
 * forgotten release never leaves a gauge climbing.
 */

/** What the bytes hold: feature rows (cache blocks, splits in memory) or decoded images. */
export const MEMORY_KINDS = ["features", "images"] as const;
export type MemoryKind = (typeof MEMORY_KINDS)[number];

const held: Record<MemoryKind, number> = { features: 0, images: 0 };
const peak: Record<MemoryKind, number> = { features: 0, images: 0 };
const released = new FinalizationRegistry<{ kind: MemoryKind; bytes: number }>(({ kind, bytes }) => release(kind, bytes));

/** Counts `bytes` as held for `kind`; with `owner`, they are released when `owner` is collected. */
export function heldBytes(kind: MemoryKind, bytes: number, owner?: object): void {
  held[kind] += bytes;
  peak[kind] = Math.max(peak[kind], held[kind]);
  if (owner) released.register(owner, { kind, bytes });
}

/** Stops counting `bytes` of `kind` (for holders that free explicitly and passed no owner). */
export function release(kind: MemoryKind, bytes: number): void {
  held[kind] = Math.max(0, held[kind] - bytes);
}

/** Bytes held now, by kind. */
export function memoryHeld(): Record<MemoryKind, number> {
  return { ...held };
}

/** Most bytes held at once since the process started, by kind. */
export function memoryPeak(): Record<MemoryKind, number> {
  return { ...peak };
}

/**
 * CRC-32 (IEEE 802.3, the zlib/PNG polynomial) of message payloads: chunks of tensors carry it so a
 * receiver can tell a corrupted payload from a valid one. Uses `zlib.crc32` where the runtime has it
 * (Node >= 20.15) and a table-driven fallback otherwise; both give the same value.
 */
import * as zlib from "node:zlib";

type Crc32Fn = (data: Uint8Array, initial?: number) => number;
const native: Crc32Fn | undefined = (zlib as unknown as { crc32?: Crc32Fn }).crc32;

let table: Uint32Array | undefined;
function crcTable(): Uint32Array {
  if (table) return table;
  table = new Uint32Array(256);
  for (let n = 0; n < 256; n++) {
    let c = n;
    for (let k = 0; k < 8; k++) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1;
    table[n] = c >>> 0;
  }
  return table;
}

/** CRC-32 in plain TypeScript (the fallback; exported so tests can check it against the native one). */
export function crc32Portable(data: Uint8Array, initial = 0): number {
  const t = crcTable();
  let c = (initial ^ 0xffffffff) >>> 0;
  for (let i = 0; i < data.length; i++) c = t[(c ^ data[i]!) & 0xff]! ^ (c >>> 8);
  return (c ^ 0xffffffff) >>> 0;
}

/** CRC-32 of `data` as an unsigned 32-bit integer; `initial` continues a previous CRC. */
export function crc32(data: Uint8Array, initial = 0): number {
  return native ? native(data, initial) >>> 0 : crc32Portable(data, initial);
}

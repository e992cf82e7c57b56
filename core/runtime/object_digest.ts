/**
 * SHA-256 of NATS object-store transfers on node:crypto instead of nats.js' bundled pure-JS js-sha256.
 *
 * Every feature shard, activation object, checkpoint and training object travels through a JetStream
 * object store, and nats.js hashes each one on put and again on get (the object's digest, checked on
 * read). Its js-sha256 hashes 21x slower than node:crypto here, and object put/get run 4.7x/4.2x
 * faster with node:crypto (`node dist/bench/object_digest.js`, bench/results/object_digest.json); a
 * profile of the coordinator of a `--data synthetic:20000 --pooling none` job (276 MB of features)
 * found 20 s of its 93 s of CPU in js-sha256.
 *
 * nats.js' object store calls `sha256.create()` of its js-sha256 module at every put and get, so
 * swapping that one factory changes nothing else: the same digest (SHA-256, base64url in the object
 * info), the same check on read. Installed once per process by {@link useNativeObjectDigests}, which
 * the one NATS connect function calls; a nats.js without that module keeps its own hashing.
 */
import { createHash, type Hash } from "node:crypto";
import { createRequire } from "node:module";

/** What nats.js' object store uses of a js-sha256 hasher. */
export interface Sha256Hasher {
  update(data: Uint8Array | string): Sha256Hasher;
  digest(): Uint8Array;
}

/** nats.js' js-sha256 module: its `sha256.create` is the factory the object store calls at every put and get. */
export interface JsSha256Module {
  sha256: { create: () => Sha256Hasher };
}

const MODULE = "nats/lib/nats-base-client/js-sha256";

/** The installed nats.js' js-sha256 module, or undefined when it has none (a nats.js that hashes otherwise). */
export function natsSha256Module(): JsSha256Module | undefined {
  try {
    const mod = createRequire(import.meta.url)(MODULE) as Partial<JsSha256Module>;
    return typeof mod.sha256?.create === "function" ? (mod as JsSha256Module) : undefined;
  } catch {
    return undefined;
  }
}

/** A node:crypto SHA-256 with js-sha256's `update`/`digest` (digest may be read more than once, as js-sha256 allows). */
export function nativeSha256(): Sha256Hasher {
  const hash: Hash = createHash("sha256");
  let digest: Uint8Array | undefined;
  const hasher: Sha256Hasher = {
    update(data) {
      if (digest) throw new Error("sha256: update after digest");
      hash.update(data);
      return hasher;
    },
    digest() {
      digest ??= new Uint8Array(hash.digest());
      return digest;
    },
  };
  return hasher;
}

/**
 * Makes nats.js' object store hash with node:crypto. Idempotent; returns false (and changes nothing)
 * when the installed nats.js has no such module.
 */
export function useNativeObjectDigests(): boolean {
  const mod = natsSha256Module();
  if (!mod) return false;
  mod.sha256.create = nativeSha256;
  return true;
}

/** Whether nats.js' object store hashes with node:crypto now. */
export function nativeObjectDigests(): boolean {
  return natsSha256Module()?.sha256.create === nativeSha256;
}

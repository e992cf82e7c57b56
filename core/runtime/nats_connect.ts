/**
 * The one place a ctrain process connects to NATS: URL(s) plus credentials from flags or the
 * environment, so coordinator, worker and `ctrain run` authenticate the same way.
 *
 *   --nats-user / CTRAIN_NATS_USER        user name (with a password)
 *   --nats-pass / CTRAIN_NATS_PASS        password (prefer the env var: flags show in `ps`)
 *   --nats-token / CTRAIN_NATS_TOKEN      token authentication
 *   --nats-creds / CTRAIN_NATS_CREDS      a .creds file (JWT + nkey seed, decentralized auth)
 *   --nats-nkey / CTRAIN_NATS_NKEY        a file holding an nkey seed (SU...)
 *   --nats-tls-ca / CTRAIN_NATS_TLS_CA    CA bundle to verify the server (turns TLS on)
 *   --nats-tls-cert, --nats-tls-key       client certificate and key (mutual TLS)
 *
 * Connections reconnect forever, backing off from 250 ms to 4 s between rounds: a restarted or
 * failed-over server is waited for, never a reason to exit. Passwords and tokens (from flags, the
 * environment or a URL's userinfo) are registered with the logger, which masks them in every line. A first connection that is refused for credentials fails at once with a ConfigError that
 * says which flags to set; one that finds no server retries for `firstConnectTimeoutMs`.
 */
import { readFileSync } from "node:fs";
import { connect, credsAuthenticator, nkeyAuthenticator, type Authenticator, type ConnectionOptions, type NatsConnection } from "nats";
import { ConfigError } from "./errors.js";
import { useNativeObjectDigests } from "./object_digest.js";
import { redactSecrets, registerSecret } from "./log.js";

/** Credentials and TLS files of a NATS connection. Every field is optional. */
export interface NatsAuth {
  user?: string;
  pass?: string;
  token?: string;
  /** Path of a .creds file. */
  creds?: string;
  /** Path of a file holding an nkey seed. */
  nkey?: string;
  /** Path of the CA bundle; any TLS field turns TLS on. */
  tlsCa?: string;
  tlsCert?: string;
  tlsKey?: string;
}

/** Flag names (without dashes) of {@link NatsAuth}, for `parseArgs(argv, NATS_AUTH_FLAGS)`. */
export const NATS_AUTH_FLAGS = ["nats-user", "nats-pass", "nats-token", "nats-creds", "nats-nkey", "nats-tls-ca", "nats-tls-cert", "nats-tls-key"] as const;

const FIELD_OF: Record<(typeof NATS_AUTH_FLAGS)[number], keyof NatsAuth> = {
  "nats-user": "user",
  "nats-pass": "pass",
  "nats-token": "token",
  "nats-creds": "creds",
  "nats-nkey": "nkey",
  "nats-tls-ca": "tlsCa",
  "nats-tls-cert": "tlsCert",
  "nats-tls-key": "tlsKey",
};

/** Environment variable of a flag: `nats-pass` -> `CTRAIN_NATS_PASS`. */
export function envName(flag: (typeof NATS_AUTH_FLAGS)[number]): string {
  return `CTRAIN_${flag.replace(/-/g, "_").toUpperCase()}`;
}

/** Credentials from parsed extra flags, falling back to the environment. Flags win. */
export function natsAuthFrom(extra: Record<string, string | true>, env: NodeJS.ProcessEnv = process.env): NatsAuth {
  const auth: NatsAuth = {};
  for (const flag of NATS_AUTH_FLAGS) {
    const v = extra[flag];
    const value = typeof v === "string" ? v : env[envName(flag)];
    if (value !== undefined && value !== "") auth[FIELD_OF[flag]] = value;
  }
  if ((auth.user === undefined) !== (auth.pass === undefined))
    throw new ConfigError(`--nats-user and --nats-pass (or CTRAIN_NATS_PASS) go together; got only ${auth.user !== undefined ? "the user" : "the password"}.`);
  const kinds = [auth.user !== undefined, auth.token !== undefined, auth.creds !== undefined, auth.nkey !== undefined].filter(Boolean).length;
  if (kinds > 1) throw new ConfigError(`give one NATS authentication method: user/password, token, creds file or nkey seed (got ${kinds}).`);
  if ((auth.tlsCert === undefined) !== (auth.tlsKey === undefined)) throw new ConfigError(`--nats-tls-cert and --nats-tls-key go together.`);
  return auth;
}

/** The auth as environment variables, to hand to a child process (keeps secrets out of its argv). */
export function natsAuthEnv(auth: NatsAuth): Record<string, string> {
  const env: Record<string, string> = {};
  for (const flag of NATS_AUTH_FLAGS) {
    const v = auth[FIELD_OF[flag]];
    if (v !== undefined) env[envName(flag)] = v;
  }
  return env;
}

function readSecret(path: string, what: string): Uint8Array {
  try {
    return new Uint8Array(readFileSync(path));
  } catch (cause) {
    throw new ConfigError(`cannot read the NATS ${what} file ${path}: ${(cause as Error).message}`, { cause });
  }
}

/** Registers the password or token of `auth` and of every `user:pass@` / `token@` in `servers` with the logger. */
export function registerNatsSecrets(servers: string, auth: NatsAuth): void {
  registerSecret(auth.pass);
  registerSecret(auth.token);
  for (const s of servers.split(",")) {
    const m = /^[a-z][a-z0-9+.-]*:\/\/([^/?#@]+)@/i.exec(s.trim());
    if (!m) continue;
    const colon = m[1].indexOf(":");
    const secret = colon >= 0 ? m[1].slice(colon + 1) : m[1];
    registerSecret(secret);
    registerSecret(decodeURIComponent(secret));
  }
}

/**
 * Moves credentials out of URLs: `nats://user:pass@host` -> `nats://host` and {user, pass}
 * (`nats://token@host` -> a token), so a child process gets them through its environment, not argv.
 */
export function splitUrlCredentials(servers: string): { servers: string; auth: NatsAuth } {
  const auth: NatsAuth = {};
  const plain = servers.split(",").map((s) => s.trim()).filter(Boolean).map((s) => {
    const m = /^([a-z][a-z0-9+.-]*:\/\/)([^/?#@]+)@(.*)$/i.exec(s);
    if (!m) return s;
    const colon = m[2].indexOf(":");
    if (colon >= 0) Object.assign(auth, { user: decodeURIComponent(m[2].slice(0, colon)), pass: decodeURIComponent(m[2].slice(colon + 1)) });
    else auth.token = decodeURIComponent(m[2]);
    return `${m[1]}${m[3]}`;
  });
  return { servers: plain.join(","), auth };
}

/** Wait before the next reconnect round: 250 ms growing with the outage's age to 4 s; a new outage starts over. */
function reconnectBackoff(): () => number {
  let since = 0;
  let last = 0;
  return () => {
    const now = Date.now();
    if (now - last > 10_000) since = now;
    last = now;
    return Math.min(4000, 250 + (now - since) / 4);
  };
}

/** nats.js connection options for `servers` (comma-separated) with `auth`. */
export function natsConnectionOptions(servers: string, auth: NatsAuth, name: string): ConnectionOptions {
  registerNatsSecrets(servers, auth);
  const o: ConnectionOptions = {
    servers: servers.split(",").map((s) => s.trim()).filter(Boolean),
    name,
    maxReconnectAttempts: -1,
    reconnectTimeWait: 250,
    reconnectDelayHandler: reconnectBackoff(),
    pingInterval: 10_000,
  };
  if (auth.user !== undefined) {
    o.user = auth.user;
    o.pass = auth.pass;
  }
  if (auth.token !== undefined) o.token = auth.token;
  const authenticators: Authenticator[] = [];
  if (auth.creds !== undefined) authenticators.push(credsAuthenticator(readSecret(auth.creds, "creds")));
  if (auth.nkey !== undefined) {
    const seed = new TextDecoder().decode(readSecret(auth.nkey, "nkey seed")).trim();
    authenticators.push(nkeyAuthenticator(new TextEncoder().encode(seed)));
  }
  if (authenticators.length) o.authenticator = authenticators[0];
  if (auth.tlsCa !== undefined || auth.tlsCert !== undefined) {
    // Read here rather than by nats.js at handshake time, so a wrong path is a ConfigError naming it.
    const text = (file: string, what: string): string => new TextDecoder().decode(readSecret(file, what));
    o.tls = {};
    if (auth.tlsCa !== undefined) o.tls.ca = text(auth.tlsCa, "TLS CA");
    if (auth.tlsCert !== undefined) {
      o.tls.cert = text(auth.tlsCert, "TLS certificate");
      o.tls.key = text(auth.tlsKey!, "TLS key");
    }
  }
  return o;
}

/** Connecting to NATS failed; `reason` says whether credentials or the server are at fault. */
export class NatsConnectError extends ConfigError {
  override name = "NatsConnectError";
  readonly reason: "auth" | "unreachable" | "tls" | "other";
  constructor(reason: NatsConnectError["reason"], message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.reason = reason;
  }
}

export interface ConnectOptions {
  /** Connection name shown by the server (`ctrain-worker-<id>`). */
  name: string;
  /** How long to keep retrying a server that is not there yet, milliseconds. Default 30000. */
  firstConnectTimeoutMs?: number;
  /** Called once per failed first attempt (for the log). */
  onRetry?: (err: Error) => void;
}

function classify(err: unknown, url: string, tls: boolean): NatsConnectError {
  const servers = redactSecrets(url);
  const e = err as { code?: string; message?: string };
  const msg = String(e?.message ?? err);
  if (/authoriz|authenticat|permissions/i.test(msg) || e?.code === "AUTHORIZATION_VIOLATION" || e?.code === "BAD_AUTHENTICATION")
    return new NatsConnectError("auth", `NATS at ${servers} refused the credentials (${msg}): set --nats-user with CTRAIN_NATS_PASS, --nats-token, --nats-creds or --nats-nkey.`, { cause: err });
  if (/tls|certificate|ssl/i.test(msg) || /^(ERR_TLS_|ERR_SSL_|CERT_|UNABLE_TO_|DEPTH_ZERO_|SELF_SIGNED_)/.test(e?.code ?? ""))
    return new NatsConnectError("tls", `TLS to NATS at ${servers} failed (${msg}): check --nats-tls-ca/--nats-tls-cert/--nats-tls-key.`, { cause: err });
  // A server that refuses the client's certificate closes the connection after the handshake, which
  // nats.js reports as a timeout. With TLS on, an open port that never completes is that, not an absent server.
  if (tls && (e?.code === "TIMEOUT" || /^timeout$/i.test(msg)))
    return new NatsConnectError("tls", `TLS to NATS at ${servers} failed (the server closed the connection during the handshake or never completed it): does it require a client certificate (--nats-tls-cert/--nats-tls-key) that it trusts? check --nats-tls-ca/--nats-tls-cert/--nats-tls-key.`, { cause: err });
  if (/CONNECTION_REFUSED|ECONNREFUSED|timeout|ENOTFOUND|EHOSTUNREACH/i.test(msg) || e?.code === "CONNECTION_REFUSED")
    return new NatsConnectError("unreachable", `no NATS server answers at ${servers} (${msg}): start one, or fix --nats.`, { cause: err });
  return new NatsConnectError("other", `cannot connect to NATS at ${servers}: ${msg}`, { cause: err });
}

/**
 * Connects with reconnect-forever settings. Refused credentials fail at once; an unreachable
 * server is retried until `firstConnectTimeoutMs`. Object-store digests are computed by node:crypto
 * from here on (core/runtime/object_digest.ts).
 */
export async function connectNats(servers: string, auth: NatsAuth, opts: ConnectOptions): Promise<NatsConnection> {
  useNativeObjectDigests();
  const o = natsConnectionOptions(servers, auth, opts.name);
  const deadline = Date.now() + (opts.firstConnectTimeoutMs ?? 30_000);
  for (let wait = 500; ; wait = Math.min(wait * 2, 8000)) {
    try {
      return await connect(o);
    } catch (err) {
      const c = classify(err, servers, o.tls !== undefined || /(^|,)\s*tls:\/\//.test(servers));
      if (c.reason !== "unreachable" || Date.now() > deadline) throw c;
      opts.onRetry?.(c);
      await new Promise((r) => setTimeout(r, Math.min(wait, Math.max(0, deadline - Date.now()) + 1)));
    }
  }
}

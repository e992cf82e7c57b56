/**
 * NATS security through ctrain's own connection code (core/runtime/nats_connect.ts, which every coordinator,
 * worker and `ctrain run` process uses) against real nats-servers: mutual TLS with certificates made
 * here by openssl, nkey authentication with a key pair made by nats.js' nkeys, a .creds file in
 * operator (JWT) mode with JWTs signed here, and a token. Each
 * shows the right credentials work end to end (a message goes round) and the wrong ones are refused
 * with an error that says which flag to fix, quickly (no 30 s retry as for an absent server). Last,
 * `ctrain worker` itself joins a job over mutual TLS from its flags.
 */
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, test } from "node:test";
import { nkeys, type NatsConnection } from "nats";
import { connectNats, NatsConnectError, type NatsAuth } from "../core/runtime/nats_connect.js";
import { Cluster } from "./helpers/cluster.js";
import { startNatsServer } from "./helpers/nats_server.js";

let dir: string;

before(() => {
  dir = mkdtempSync(join(tmpdir(), "ctrain-natssec-"));
});
after(() => rmSync(dir, { recursive: true, force: true }));

const path = (name: string): string => join(dir, name);

function openssl(args: string[]): void {
  execFileSync("openssl", args, { cwd: dir, stdio: ["ignore", "ignore", "pipe"] });
}

/** A CA, a server certificate for 127.0.0.1/localhost and a client certificate, all signed by the CA. */
function makeCertificates(): void {
  const ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"];
  openssl(["req", "-x509", ...ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=ctrain test CA"]);
  const leaf = (name: string, ext: string): void => {
    openssl(["req", ...ec, "-keyout", `${name}.key`, "-out", `${name}.csr`, "-subj", `/CN=ctrain ${name}`]);
    writeFileSync(path(`${name}.ext`), ext);
    openssl(["x509", "-req", "-in", `${name}.csr`, "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial", "-out", `${name}.pem`, "-days", "2", "-extfile", `${name}.ext`]);
  };
  leaf("server", "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n");
  leaf("client", "extendedKeyUsage=clientAuth\n");
}

/** A message goes round on the connection. */
async function roundTrip(nc: NatsConnection): Promise<void> {
  const sub = nc.subscribe("ctrain.sec.echo", { max: 1 });
  nc.publish("ctrain.sec.echo", new TextEncoder().encode("hello"));
  for await (const m of sub) assert.equal(new TextDecoder().decode(m.data), "hello");
  await nc.close();
}

/**
 * Connecting fails with `reason` and a message naming `flag`, without the retries an absent server gets
 * (they would last `firstConnectTimeoutMs` more). `withinMs`: nats.js' own connect timeout is 20 s.
 */
async function refused(url: string, auth: NatsAuth, reason: NatsConnectError["reason"], flag: RegExp, withinMs = 10_000): Promise<void> {
  const t0 = Date.now();
  await assert.rejects(connectNats(url, auth, { name: "ctrain-test", firstConnectTimeoutMs: 60_000 }), (err: unknown) => {
    assert.ok(err instanceof NatsConnectError, String(err));
    assert.equal(err.reason, reason, err.message);
    assert.match(err.message, flag);
    return true;
  });
  assert.ok(Date.now() - t0 < withinMs, `refused in ${Date.now() - t0} ms, not after retrying`);
}

test("nats security - mutual TLS: the client certificate signed by the CA connects; without the certificate or the CA it is refused", async () => {
  makeCertificates();
  await using server = await startNatsServer({
    jetstream: false,
    config: `tls { cert_file: ${JSON.stringify(path("server.pem"))}, key_file: ${JSON.stringify(path("server.key"))}, ca_file: ${JSON.stringify(path("ca.pem"))}, verify: true, timeout: 2 }`,
  });
  const url = `tls://127.0.0.1:${server.port}`;
  const good: NatsAuth = { tlsCa: path("ca.pem"), tlsCert: path("client.pem"), tlsKey: path("client.key") };
  await roundTrip(await connectNats(url, good, { name: "ctrain-test" }));
  // The server asks for a client certificate: without one it hangs up after the handshake, which
  // nats.js sees only at its 20 s connect timeout.
  await refused(url, { tlsCa: path("ca.pem") }, "tls", /client certificate/, 40_000);
  // The client does not trust the server's certificate without the CA.
  await refused(url, { tlsCert: path("client.pem"), tlsKey: path("client.key") }, "tls", /--nats-tls/);
  // A missing file is named before any connection.
  await assert.rejects(connectNats(url, { ...good, tlsCa: path("nope.pem") }, { name: "x" }), /cannot read the NATS TLS CA file .*nope\.pem/);
  await assert.rejects(connectNats(url, { ...good, tlsKey: path("nope.key") }, { name: "x" }), /cannot read the NATS TLS key file .*nope\.key/);
});

test("nats security - nkey: the seed file signs the server's challenge; another key or none is refused", async () => {
  const user = nkeys.createUser();
  const other = nkeys.createUser();
  writeFileSync(path("user.nk"), `${new TextDecoder().decode(user.getSeed())}\n`, { mode: 0o600 });
  writeFileSync(path("other.nk"), new TextDecoder().decode(other.getSeed()), { mode: 0o600 });
  await using server = await startNatsServer({ jetstream: false, config: `authorization { users: [ { nkey: ${JSON.stringify(user.getPublicKey())} } ] }` });
  await roundTrip(await connectNats(server.url, { nkey: path("user.nk") }, { name: "ctrain-test" }));
  await refused(server.url, { nkey: path("other.nk") }, "auth", /--nats-nkey/);
  await refused(server.url, {}, "auth", /--nats-user .*--nats-nkey/);
  await assert.rejects(connectNats(server.url, { nkey: path("missing.nk") }, { name: "x" }), /cannot read the NATS nkey seed file .*missing\.nk/);
});

/** A NATS JWT (header.claims.signature, ed25519 by the issuer's nkey), as nsc would write it. */
function natsJwt(issuer: ReturnType<typeof nkeys.createAccount>, claims: Record<string, unknown>): string {
  const b64u = (b: Uint8Array | string): string => Buffer.from(b).toString("base64url");
  const signed = `${b64u(JSON.stringify({ typ: "JWT", alg: "ed25519-nkey" }))}.${b64u(JSON.stringify({ iat: Math.floor(Date.now() / 1000), iss: issuer.getPublicKey(), ...claims }))}`;
  return `${signed}.${b64u(issuer.sign(new TextEncoder().encode(signed)))}`;
}

/** A .creds file: a user JWT issued by `account`, and the user's seed. */
function credsFile(name: string, account: ReturnType<typeof nkeys.createAccount>): string {
  const user = nkeys.createUser();
  const jwt = natsJwt(account, { jti: `${name}-user`, name, sub: user.getPublicKey(), nats: { pub: {}, sub: {}, subs: -1, data: -1, payload: -1, type: "user", version: 2 } });
  const seed = new TextDecoder().decode(user.getSeed());
  writeFileSync(path(name), `-----BEGIN NATS USER JWT-----\n${jwt}\n------END NATS USER JWT------\n\n-----BEGIN USER NKEY SEED-----\n${seed}\n------END USER NKEY SEED------\n`, { mode: 0o600 });
  return path(name);
}

test("nats security - creds file (operator/JWT mode): a user of a trusted account connects; one of an unknown account is refused", async () => {
  const operator = nkeys.createOperator();
  const account = nkeys.createAccount();
  const system = nkeys.createAccount();
  const stranger = nkeys.createAccount(); // signs users, but the operator never issued it
  const limits = { subs: -1, data: -1, payload: -1, imports: -1, exports: -1, wildcards: true, conn: -1, leaf: -1 };
  const accountJwt = (kp: typeof account, name: string): string =>
    natsJwt(operator, { jti: name, name, sub: kp.getPublicKey(), nats: { limits, type: "account", version: 2 } });
  writeFileSync(path("operator.jwt"), natsJwt(operator, { jti: "op", name: "ctrain-test-operator", sub: operator.getPublicKey(), nats: { type: "operator", version: 2 } }));
  await using server = await startNatsServer({
    jetstream: false,
    config: [
      `operator: ${JSON.stringify(path("operator.jwt"))}`,
      `system_account: ${system.getPublicKey()}`,
      "resolver: MEMORY",
      `resolver_preload: { ${account.getPublicKey()}: ${JSON.stringify(accountJwt(account, "ctrain"))}, ${system.getPublicKey()}: ${JSON.stringify(accountJwt(system, "SYS"))} }`,
    ].join("\n"),
  });
  await roundTrip(await connectNats(server.url, { creds: credsFile("ctrain.creds", account) }, { name: "ctrain-test" }));
  await refused(server.url, { creds: credsFile("stranger.creds", stranger) }, "auth", /--nats-creds/);
  await refused(server.url, {}, "auth", /--nats-creds/);
  await assert.rejects(connectNats(server.url, { creds: path("missing.creds") }, { name: "x" }), /cannot read the NATS creds file .*missing\.creds/);
});

test("nats security - token: the right token connects, a wrong one is refused", async () => {
  await using server = await startNatsServer({ jetstream: false, auth: { token: "s3cret-t0ken" } });
  await roundTrip(await connectNats(server.url, { token: "s3cret-t0ken" }, { name: "ctrain-test" }));
  await refused(server.url, { token: "wrong" }, "auth", /--nats-token/);
});

test("nats security - ctrain worker joins a job over mutual TLS from its flags; without the client certificate it exits with the TLS error", async () => {
  await using server = await startNatsServer({
    config: `tls { cert_file: ${JSON.stringify(path("server.pem"))}, key_file: ${JSON.stringify(path("server.key"))}, ca_file: ${JSON.stringify(path("ca.pem"))}, verify: true, timeout: 2 }`,
  });
  const url = `tls://127.0.0.1:${server.port}`;
  const cluster = new Cluster({ dir, jobArgs: [] });
  const tls = ["--nats-tls-ca", path("ca.pem"), "--nats-tls-cert", path("client.pem"), "--nats-tls-key", path("client.key")];
  const w = await cluster.worker(url, "tls-job", "tls-w0", tls);
  try {
    await w.waitFor("waiting for a job's task queue", 60_000);
  } finally {
    w.proc.kill("SIGKILL");
    await w.exited;
  }
  const bad = await cluster.worker(url, "tls-job", "tls-w1", ["--nats-tls-ca", path("ca.pem")]);
  assert.equal(await bad.exited, 2, bad.tail());
  assert.match(bad.stderr, /TLS to NATS at .* failed .*--nats-tls-ca\/--nats-tls-cert\/--nats-tls-key/);
});

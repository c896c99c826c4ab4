'use strict';
// 18. EDGE_JWT_SECRET: the edge mints its own service token for its relay stream (byte for byte
//     what `presence token --service edge` prints) and renews it, instead of a static
//     EDGE_SERVICE_TOKEN that stops working within PRESENCE_JWT_MAX_TTL_S (a day by default).
//     Settings errors; the token each (re)open presents; a stream the service ends because its
//     token expired is reopened at once with a fresh one (stand-in service, in-band refresh off);
//     and end to end against the real service: a socket.io client served in token mode by `npm
//     start` (two workers), minted tokens accepted for unary calls and for the relay, the iss/aud
//     settings, and renewal across a service restart that happens after the first token expired.
//     The in-band refresh of the open stream's token (RelayRefresh) is test 19.
const { test, after } = require('node:test');
const assert = require('node:assert/strict');
const { execFileSync } = require('node:child_process');
const grpc = require('@grpc/grpc-js');
const jwt = require('jsonwebtoken');
const { mintServiceToken, ServiceTokenSource, secretProblem } = require('../src/service-token');
const { readSettings } = require('../src/settings');
const { startPresenceServer, serviceClients, freePort, PRESENCE_BIN } = require('./helpers/presence-server');
const { startFakePresence } = require('./helpers/fake-presence');
const { connect, startTestEdge, eventually } = require('./helpers/clients');
const { runIndex, listeningPort, stopIndex } = require('./helpers/edge-process');

const SECRET = 'edge-service-token-secret-0123456789';
const ALICE = 1801;
const BOB = 1802;
const userToken = (id, o = {}) => jwt.sign({ sub: String(id), ...o }, SECRET, { algorithm: 'HS256', expiresIn: '1h' });
const decode = (token) => token.split('.').slice(0, 2).map((part) => JSON.parse(Buffer.from(part, 'base64url')));
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/** What `presence token` prints with these arguments and PRESENCE_JWT_* settings. */
function cliToken(args, env = {}) {
  const clean = Object.fromEntries(Object.entries(process.env).filter(([k]) => !k.startsWith('PRESENCE_')));
  return execFileSync(PRESENCE_BIN, ['token', ...args], { env: { ...clean, PRESENCE_JWT_SECRET: SECRET, ...env }, encoding: 'utf8' }).trim();
}

const cleanups = [];
after(async () => {
  for (const f of cleanups.reverse()) await f();
});

test('a minted token is byte for byte what `presence token --service edge --ttl 15m` prints', () => {
  for (const env of [{}, { PRESENCE_JWT_ISSUER: 'presence-test', PRESENCE_JWT_AUDIENCE: 'presence-api' }]) {
    const printed = cliToken(['--service', 'edge', '--ttl', '15m'], env);
    const [header, claims] = decode(printed);
    assert.deepEqual(header, { typ: 'JWT', alg: 'HS256' });
    assert.equal(claims.exp - claims.iat, 900);
    // Same second, same settings: the same token.
    const minted = mintServiceToken({
      secret: SECRET,
      ttlS: 900,
      issuer: env.PRESENCE_JWT_ISSUER,
      audience: env.PRESENCE_JWT_AUDIENCE,
      now: claims.iat * 1000 + 999,
    });
    assert.equal(minted.token, printed, JSON.stringify(claims));
    assert.deepEqual(jwt.verify(minted.token, SECRET, { algorithms: ['HS256'] }), claims);
  }
});

test('the token source reuses a token while a third of its life is left, then renews it', () => {
  let now = 1_800_000_000_000;
  const source = new ServiceTokenSource({ secret: SECRET, ttlS: 900, clock: () => now });
  const first = source.current();
  assert.equal(first.exp - first.iat, 900);
  now += 599_000; // 301 s left
  assert.equal(source.current(), first);
  now += 2_000; // 299 s left
  const second = source.current();
  assert.notEqual(second.token, first.token);
  assert.equal(second.exp, first.exp + 601);
  assert.deepEqual(source.stats(), { source: 'EDGE_JWT_SECRET', minted: 2, expires_at: new Date(second.exp * 1000).toISOString() });
});

test('secrets the service would refuse are refused, as it refuses them', () => {
  assert.equal(secretProblem(SECRET), null);
  assert.match(secretProblem('short-secret-0123456789'), /at least 32 bytes long \(got 23\)/);
  assert.match(secretProblem('a'.repeat(40)), /one character repeated/);
  assert.match(secretProblem('abababababababababababababababab'), /only 2 distinct characters/);
  // Bytes, not characters: 11 three-byte characters are 33 bytes.
  assert.equal(secretProblem('€'.repeat(3) + 'abcdefghijklmnopqrstuvwx'), null);
});

test('settings: EDGE_JWT_SECRET or EDGE_SERVICE_TOKEN; bad ones exit 2 naming the setting, never echoing the secret', async () => {
  const cases = [
    [{}, /EDGE_IDENTITY=token needs EDGE_JWT_SECRET or EDGE_SERVICE_TOKEN/],
    [{ EDGE_JWT_SECRET: SECRET, EDGE_SERVICE_TOKEN: 'svc' }, /EDGE_JWT_SECRET and EDGE_SERVICE_TOKEN are both set/],
    [{ EDGE_JWT_SECRET: 'too-short-0123456789' }, /EDGE_JWT_SECRET must be at least 32 bytes long \(got 20\)/],
    [{ EDGE_JWT_SECRET: 'x'.repeat(32) }, /EDGE_JWT_SECRET is one character repeated/],
    [{ EDGE_JWT_SECRET: SECRET, EDGE_SERVICE_TOKEN_TTL_S: '10' }, /EDGE_SERVICE_TOKEN_TTL_S must be a whole number of seconds from 30 to 86400/],
    [{ EDGE_JWT_SECRET: SECRET, EDGE_SERVICE_TOKEN_TTL_S: '90000' }, /EDGE_SERVICE_TOKEN_TTL_S must be a whole number of seconds from 30 to 86400/],
    [{ EDGE_JWT_SECRET: SECRET, EDGE_SERVICE_TOKEN_TTL_S: '15m' }, /EDGE_SERVICE_TOKEN_TTL_S must be/],
    [{ EDGE_SERVICE_TOKEN: 'svc', EDGE_JWT_ISSUER: 'x' }, /EDGE_JWT_ISSUER: only used with EDGE_JWT_SECRET/],
    [{ EDGE_SERVICE_TOKEN: 'svc', EDGE_JWT_AUDIENCE: 'x', EDGE_SERVICE_TOKEN_TTL_S: '60' }, /EDGE_JWT_AUDIENCE, EDGE_SERVICE_TOKEN_TTL_S: only used with EDGE_JWT_SECRET/],
  ];
  const runs = cases.map(([env]) => runIndex({ EDGE_PORT: '0', EDGE_WORKERS: '1', ...env }));
  for (const [i, [env, message]] of cases.entries()) {
    assert.equal((await runs[i].exit).code, 2, JSON.stringify(env));
    assert.match(runs[i].err(), message);
    assert.equal(runs[i].out(), '', 'nothing listened');
    if (env.EDGE_JWT_SECRET) assert.ok(!runs[i].err().includes(env.EDGE_JWT_SECRET), 'the secret is not echoed');
  }
  const s = readSettings({ EDGE_JWT_SECRET: SECRET, EDGE_JWT_ISSUER: 'i', EDGE_JWT_AUDIENCE: 'a', EDGE_SERVICE_TOKEN_TTL_S: '30', EDGE_LOG_LEVEL: 'silent' });
  assert.deepEqual([s.jwtSecret, s.jwtIssuer, s.jwtAudience, s.serviceTokenTtlS, s.serviceToken], [SECRET, 'i', 'a', 30, undefined]);
  assert.equal(readSettings({ EDGE_JWT_SECRET: SECRET, EDGE_LOG_LEVEL: 'silent' }).serviceTokenTtlS, undefined, 'default: 900 s');
  assert.equal(readSettings({ EDGE_SERVICE_TOKEN: 'svc', EDGE_LOG_LEVEL: 'silent' }).jwtSecret, undefined, 'EDGE_SERVICE_TOKEN still works');
});

test('stand-in service: each (re)open presents a fresh enough token; a stream ended because its token expired is reopened at once', async (t) => {
  const fake = await startFakePresence();
  cleanups.push(() => fake.stop());
  // A refusal waits 2.5-5 s (the longest backoff): an expired token must not. No in-band refresh
  // (test 19): the stream runs on the token it opened with until the service ends it.
  const edge = await startTestEdge({
    target: fake.target,
    jwtSecret: SECRET,
    serviceTokenTtlS: 1,
    refreshServiceToken: false,
    backoff: { initialMs: 20, maxMs: 5000 },
  });
  cleanups.push(() => edge.close());
  const alice = await connect(edge.url, { name: 'alice', auth: { token: userToken(ALICE) } });
  t.after(() => alice.close());
  alice.socket.emit('user_authenticated', ALICE);
  await eventually(() => edge.stats().ready === 1, { what: 'the session' });
  const [header, claims] = decode(fake.authorizations[0].replace(/^Bearer /, ''));
  assert.deepEqual(header, { typ: 'JWT', alg: 'HS256' });
  assert.deepEqual(Object.keys(claims), ['sub', 'exp', 'role', 'iat']);
  assert.equal(claims.sub, 'edge');
  assert.equal(claims.role, 'service');
  assert.equal(claims.exp - claims.iat, 1);
  jwt.verify(fake.authorizations[0].replace(/^Bearer /, ''), SECRET, { algorithms: ['HS256'], clockTolerance: 2 });

  // The service ends the stream once the token expired (as the real one does when it was not refreshed).
  await sleep(Math.max(0, claims.exp * 1000 - Date.now()) + 50);
  const ended = Date.now();
  fake.endStream(grpc.status.UNAUTHENTICATED, 'the token of this stream expired');
  await eventually(() => fake.streams() === 2 && edge.stats().ready === 1, { what: 'the stream and session reopened' });
  const took = Date.now() - ended;
  t.diagnostic(`reopened in ${took} ms`);
  assert.ok(took < 2000, `reopened at once, not at the longest backoff (${took} ms)`);
  const renewed = decode(fake.authorizations[1].replace(/^Bearer /, ''))[1];
  assert.ok(renewed.exp > claims.exp && renewed.exp * 1000 > Date.now(), 'the reopen presented a fresh token');
  assert.ok(edge.log.entries.some((e) => e.msg === 'relay stream ended: the service token it ran on expired; reopening with a fresh one'));
  assert.deepEqual(fake.refreshes, [], 'refresh is off');
  assert.deepEqual(edge.log.entries.filter((e) => e.level === 'error'), []);
  assert.deepEqual(alice.received('presence_error'), [], 'the socket is not told about the edge\'s credential');
  assert.equal(edge.stats().service_credential.source, 'EDGE_JWT_SECRET');
  assert.ok(edge.stats().service_credential.minted >= 2);

});

test('stand-in service: a stream ended UNAUTHENTICATED while its token is valid is a refusal naming the settings', async (t) => {
  const fake = await startFakePresence();
  cleanups.push(() => fake.stop());
  const edge = await startTestEdge({ target: fake.target, jwtSecret: SECRET, backoff: { initialMs: 20, maxMs: 200 } });
  cleanups.push(() => edge.close());
  const alice = await connect(edge.url, { name: 'alice', auth: { token: userToken(ALICE) } });
  t.after(() => alice.close());
  alice.socket.emit('user_authenticated', ALICE);
  await eventually(() => edge.stats().ready === 1, { what: 'the session' });
  fake.endStream(grpc.status.UNAUTHENTICATED, 'invalid token: InvalidSignature');
  await eventually(() => edge.log.entries.some((e) => e.level === 'error'), { what: 'the refusal' });
  const refusal = edge.log.entries.find((e) => e.level === 'error');
  assert.match(refusal.msg, /^relay stream refused: .*EDGE_JWT_SECRET.*PRESENCE_JWT_SECRET/);
  assert.ok(!JSON.stringify(edge.log.entries).includes(SECRET));
  const told = await alice.waitFor('presence_error', (e) => e.event === 'user_authenticated');
  assert.equal(told.code, 'UNAUTHENTICATED');
  assert.doesNotMatch(JSON.stringify(told), /EDGE_/, 'browsers are not told about the edge\'s settings');
});

test('real service: npm start (two workers) with EDGE_JWT_SECRET serves a socket.io client in token mode', async (t) => {
  const server = await startPresenceServer({ jwtSecret: SECRET });
  cleanups.push(() => server.destroy());
  // A minted token is accepted by the service for a service call.
  const svc = serviceClients(server.target, { serviceToken: mintServiceToken({ secret: SECRET, ttlS: 900 }).token });
  cleanups.push(() => svc.close());
  await svc.addContacts([[ALICE, BOB]]);

  const run = runIndex({ EDGE_PORT: '0', EDGE_WORKERS: '2', PRESENCE_TARGET: server.target, EDGE_JWT_SECRET: SECRET });
  t.after(() => stopIndex(run));
  const port = await listeningPort(run, 20000);
  const url = `http://127.0.0.1:${port}`;
  const alice = await connect(url, { name: 'alice', auth: { token: userToken(ALICE) }, transports: ['websocket'] });
  t.after(() => alice.close());
  alice.socket.emit('user_authenticated', ALICE);
  await alice.presence(BOB, 'offline');
  const bob = await connect(url, { name: 'bob', auth: { token: userToken(BOB) }, transports: ['websocket'] });
  t.after(() => bob.close());
  bob.socket.emit('user_authenticated', BOB);
  await alice.presence(BOB, 'online');
  bob.socket.emit('update_status', 'busy');
  await alice.presence(BOB, 'busy');
  const health = await (await fetch(`${url}/healthz`)).json();
  assert.equal(health.relay_streams, 2, 'each worker opened its relay stream');
  for (const p of health.processes.filter((x) => x.worker)) {
    assert.equal(p.service_credential.source, 'EDGE_JWT_SECRET');
    assert.ok(Date.parse(p.service_credential.expires_at) > Date.now() + 10 * 60 * 1000, 'a 15-minute token');
  }
  assert.doesNotMatch(run.err(), /relay stream refused|"level":"error"/);
  assert.ok(!run.err().includes(SECRET), 'the secret is in no log line');
});

test('real service with PRESENCE_JWT_ISSUER/AUDIENCE: EDGE_JWT_ISSUER/AUDIENCE make the minted token acceptable', async (t) => {
  const env = { PRESENCE_JWT_ISSUER: 'presence-test', PRESENCE_JWT_AUDIENCE: 'presence-api' };
  const server = await startPresenceServer({ jwtSecret: SECRET, env });
  cleanups.push(() => server.destroy());
  const token = (o) => userToken(ALICE, { iss: env.PRESENCE_JWT_ISSUER, aud: env.PRESENCE_JWT_AUDIENCE, ...o });

  const without = await startTestEdge({ target: server.target, jwtSecret: SECRET, backoff: { initialMs: 20, maxMs: 200 } });
  cleanups.push(() => without.close());
  await eventually(() => without.log.entries.some((e) => e.level === 'error'), { what: 'the refusal' });
  const refusal = without.log.entries.find((e) => e.level === 'error');
  assert.match(refusal.msg, /relay stream refused: .*EDGE_JWT_ISSUER/);
  assert.equal(refusal.code, 'UNAUTHENTICATED');
  await without.close();

  const edge = await startTestEdge({ target: server.target, jwtSecret: SECRET, jwtIssuer: env.PRESENCE_JWT_ISSUER, jwtAudience: env.PRESENCE_JWT_AUDIENCE });
  cleanups.push(() => edge.close());
  const alice = await connect(edge.url, { name: 'alice', auth: { token: token() } });
  t.after(() => alice.close());
  alice.socket.emit('user_authenticated', ALICE);
  await eventually(() => edge.stats().ready === 1, { what: 'the session welcomed' });
  assert.deepEqual(edge.log.entries.filter((e) => e.level === 'error'), []);
  assert.deepEqual(alice.received('presence_error'), []);
});

test('real service: the token is renewed; a restart after the first one expired reopens the stream with a fresh one', async (t) => {
  const port = await freePort();
  let server = await startPresenceServer({ jwtSecret: SECRET, listen: `127.0.0.1:${port}` });
  cleanups.push(() => server.destroy());
  const svc = serviceClients(server.target, { serviceToken: mintServiceToken({ secret: SECRET, ttlS: 60 }).token });
  await svc.addContacts([[ALICE, BOB]]);
  svc.close();
  const TTL_S = 2;
  const edge = await startTestEdge({ target: server.target, jwtSecret: SECRET, serviceTokenTtlS: TTL_S, backoff: { initialMs: 50, maxMs: 500 } });
  cleanups.push(() => edge.close());
  const alice = await connect(edge.url, { name: 'alice', auth: { token: userToken(ALICE) } });
  const bob = await connect(edge.url, { name: 'bob', auth: { token: userToken(BOB) } });
  t.after(() => alice.close());
  t.after(() => bob.close());
  alice.socket.emit('user_authenticated', ALICE);
  bob.socket.emit('user_authenticated', BOB);
  await alice.presence(BOB, 'online');
  const first = edge.stats().service_credential;
  assert.equal(first.minted, 1);

  // Past the first token's expiry: presence still flows on the same stream (its token was
  // refreshed in-band, test 19).
  await sleep(Math.max(0, Date.parse(first.expires_at) - Date.now()) + 1100);
  bob.socket.emit('update_status', 'away');
  await alice.presence(BOB, 'away');
  assert.equal(edge.stats().relay.opened, 1, 'the stream outlived its first token');
  assert.ok(edge.stats().relay.refreshes >= 1);

  // Restart the service: the reopen must present a token that is valid now.
  const { dir } = server;
  await server.stop();
  await eventually(() => edge.stats().relay.streams === 0, { what: 'the stream to end' });
  server = await startPresenceServer({ jwtSecret: SECRET, listen: `127.0.0.1:${port}`, dir });
  await eventually(() => edge.stats().ready === 2, { timeout: 20000, what: 'both sessions reopened' });
  const since = alice.mark();
  bob.socket.emit('update_status', 'online');
  await alice.presence(BOB, 'online', { since });
  const renewed = edge.stats().service_credential;
  t.diagnostic(`service token: first ${JSON.stringify(first)}, now ${JSON.stringify(renewed)}`);
  assert.ok(renewed.minted >= 2, 'a new token was minted');
  assert.ok(Date.parse(renewed.expires_at) > Date.parse(first.expires_at));
  assert.deepEqual(edge.log.entries.filter((e) => e.level === 'error'), [], 'no refusal');
  assert.deepEqual(alice.received('presence_error'), []);
});

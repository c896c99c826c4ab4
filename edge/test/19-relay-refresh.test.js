'use strict';
// 19. The relay stream's own service token is refreshed in-band: the service ends a relay stream
//     (UNAUTHENTICATED) when the token it runs on expires, unless it got RelayRequest.refresh with
//     a new token of the same service before. With EDGE_JWT_SECRET the edge sends one, newly
//     minted, once a third of the current token's life is left; a refused refresh is tried again,
//     then the stream is reopened before the token expires; an unanswered one (an older service)
//     is left alone. Stand-in service: when and what the edge sends, and what it does with each
//     answer. Real service: a socket.io client stays served by the same stream and session for
//     three token lifetimes; the same edge with refresh off sees its stream ended at the token's
//     expiry (so the first test can fail); a refresh the service refuses; and a static
//     EDGE_SERVICE_TOKEN, which cannot be refreshed, expiring under an open stream.
const { test, after } = require('node:test');
const assert = require('node:assert/strict');
const grpc = require('@grpc/grpc-js');
const jwt = require('jsonwebtoken');
const { mintServiceToken } = require('../src/service-token');
const { RelayClient } = require('../src/relay');
const { loadPresenceProto } = require('../src/proto');
const { startPresenceServer, serviceClients } = require('./helpers/presence-server');
const { startFakePresence } = require('./helpers/fake-presence');
const { connect, startTestEdge, captureLogger, eventually } = require('./helpers/clients');

const SECRET = 'edge-relay-refresh-secret-0123456789';
const ALICE = 1901;
const BOB = 1902;
const userToken = (id) => jwt.sign({ sub: String(id) }, SECRET, { algorithm: 'HS256', expiresIn: '1h' });
const claimsOf = (token) => JSON.parse(Buffer.from(token.replace(/^Bearer /, '').split('.')[1], 'base64url'));
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
const problems = (edge) => edge.log.entries.filter((e) => e.level === 'warn' || e.level === 'error');
const welcomes = (edge) => edge.log.entries.filter((e) => e.msg === 'presence session open');

const cleanups = [];
after(async () => {
  for (const f of cleanups.reverse()) await f();
});

/** An edge (in-process) with one socket of ALICE welcomed on it. */
async function edgeWithAlice(t, options) {
  const edge = await startTestEdge({ jwtSecret: SECRET, backoff: { initialMs: 20, maxMs: 400 }, ...options });
  cleanups.push(() => edge.close());
  const alice = await connect(edge.url, { name: 'alice', auth: { token: userToken(ALICE) } });
  t.after(() => alice.close());
  alice.socket.emit('user_authenticated', ALICE);
  await eventually(() => edge.stats().ready === 1, { what: 'the session' });
  return { edge, alice };
}

test('stand-in service: a newly minted token is sent as refresh when a third of its life is left; each accepted one is tracked', async (t) => {
  const fake = await startFakePresence();
  cleanups.push(() => fake.stop());
  const TTL_S = 3;
  const { edge, alice } = await edgeWithAlice(t, { target: fake.target, serviceTokenTtlS: TTL_S });
  const opened = claimsOf(fake.authorizations[0]);
  assert.equal(edge.stats().relay.credential_expires_at, new Date(opened.exp * 1000).toISOString());

  await eventually(() => fake.refreshes.length >= 2, { timeout: 10000, what: 'two refreshes' });
  const [first, second] = fake.refreshes;
  // Sent with about a third (1 s) of the opening token's life left.
  const left = opened.exp * 1000 - first.at;
  t.diagnostic(`first refresh with ${left} ms of the opening token left`);
  assert.ok(left > 300 && left <= 1100, `a third of the life left: ${left} ms`);
  for (const r of [first, second]) {
    assert.equal(r.stream, 1);
    const claims = jwt.verify(r.service_token, SECRET, { algorithms: ['HS256'], clockTolerance: 2 });
    assert.equal(claims.sub, 'edge');
    assert.equal(claims.role, 'service');
    assert.equal(claims.exp - claims.iat, TTL_S);
  }
  assert.ok(claimsOf(first.service_token).exp > opened.exp, 'a newer token');
  assert.notEqual(first.request_id, second.request_id);
  // The second refresh is timed by the first (accepted) one's token, not the opening one.
  const secondLeft = claimsOf(first.service_token).exp * 1000 - second.at;
  assert.ok(secondLeft > 300 && secondLeft <= 1100, `timed by the refreshed token: ${secondLeft} ms left`);
  await eventually(() => edge.stats().relay.refreshes >= 2, { what: 'the answers handled' });
  assert.ok(Date.parse(edge.stats().relay.credential_expires_at) >= claimsOf(second.service_token).exp * 1000);
  assert.equal(fake.streams(), 1, 'one stream all along');
  assert.deepEqual(problems(edge), []);
  assert.deepEqual(alice.received('presence_error'), []);
  const tokens = [...fake.authorizations, ...fake.refreshes.map((r) => r.service_token)];
  assert.ok(!tokens.some((tok) => JSON.stringify(edge.log.entries).includes(tok.replace(/^Bearer /, ''))), 'no token in the log');
});

test('stand-in service: a refused refresh is tried again, then the stream is reopened before its token expires, saying why', async (t) => {
  const fake = await startFakePresence({ refresh: grpc.status.UNAVAILABLE });
  cleanups.push(() => fake.stop());
  const { edge, alice } = await edgeWithAlice(t, { target: fake.target, serviceTokenTtlS: 3 });
  const opened = claimsOf(fake.authorizations[0]);
  await eventually(() => fake.streams() === 2 && edge.stats().ready === 1, { timeout: 10000, what: 'the stream and session reopened' });
  assert.equal(fake.refreshes.filter((r) => r.stream === 1).length, 3, 'three attempts on the first stream');
  assert.ok(fake.openedAt[1] < opened.exp * 1000, `reopened before the token expired (${opened.exp * 1000 - fake.openedAt[1]} ms before)`);
  const retries = edge.log.entries.filter((e) => e.msg === "the presence service refused to refresh the relay stream's service token; trying again");
  assert.deepEqual(retries.map((e) => [e.attempt, e.code, e.details]), [[1, 'UNAVAILABLE', 'scripted UNAVAILABLE'], [2, 'UNAVAILABLE', 'scripted UNAVAILABLE']]);
  const lastResort = edge.log.entries.find((e) => /refused to refresh .* 3 times in a row; as a last resort/.test(e.msg));
  assert.ok(lastResort, 'the reopen says why');
  assert.equal(lastResort.level, 'warn');
  const ended = edge.log.entries.find((e) => e.msg === 'relay stream ended; reopening');
  assert.equal(ended.reason, 'refresh refused');
  assert.equal(edge.stats().relay.sessions_opened, 2, 'the session reopened on the new stream');
  assert.equal(welcomes(edge).length, 2);
  assert.deepEqual(edge.log.entries.filter((e) => e.level === 'error'), []);
  assert.deepEqual(alice.received('presence_error'), [], 'the socket is not told about the edge\'s credential');

  // The new stream's token is refreshed as usual once the service accepts again.
  fake.setRefresh('accept');
  await eventually(() => edge.stats().relay.refreshes >= 1, { timeout: 10000, what: 'a refresh accepted on the new stream' });
  assert.equal(fake.refreshes.at(-1).stream, 2);
  assert.equal(fake.streams(), 2);
});

test('stand-in service: a refresh never answered (an older service) is tried three times, then left alone', async (t) => {
  const fake = await startFakePresence({ refresh: 'silent' });
  cleanups.push(() => fake.stop());
  const { edge } = await edgeWithAlice(t, { target: fake.target, serviceTokenTtlS: 3 });
  const opened = claimsOf(fake.authorizations[0]);
  await eventually(() => edge.log.entries.some((e) => /never answered the refresh/.test(e.msg)), { timeout: 10000, what: 'the edge to give up' });
  assert.equal(fake.refreshes.length, 3);
  assert.equal(edge.log.entries.filter((e) => e.msg === "no answer to the refresh of the relay stream's service token; trying again").length, 2);
  // Past the token's expiry: no more refreshes, and the stream is kept (this service does not end it).
  await sleep(Math.max(0, opened.exp * 1000 - Date.now()) + 300);
  assert.equal(fake.refreshes.length, 3);
  assert.equal(fake.streams(), 1);
  assert.equal(edge.stats().ready, 1);
  // Should it end it after all, the stream is reopened at once with a fresh token.
  fake.endStream(grpc.status.UNAUTHENTICATED, 'the token of this stream expired');
  await eventually(() => fake.streams() === 2 && edge.stats().ready === 1, { what: 'the stream reopened' });
  assert.ok(claimsOf(fake.authorizations[1]).exp * 1000 > Date.now());
  assert.ok(edge.log.entries.some((e) => e.msg === 'relay stream ended: the service token it ran on expired; reopening with a fresh one'));
  assert.deepEqual(edge.log.entries.filter((e) => e.level === 'error'), []);
});

/** A JWT-mode service with ALICE and BOB as contacts. */
async function realService() {
  const server = await startPresenceServer({ jwtSecret: SECRET });
  cleanups.push(() => server.destroy());
  const svc = serviceClients(server.target, { serviceToken: mintServiceToken({ secret: SECRET, ttlS: 60 }).token });
  await svc.addContacts([[ALICE, BOB]]);
  svc.close();
  return server;
}

test('real service: with 5-second tokens a socket stays served by one stream and one session for three lifetimes', async (t) => {
  const server = await realService();
  const TTL_S = 5;
  const edge = await startTestEdge({ target: server.target, jwtSecret: SECRET, serviceTokenTtlS: TTL_S });
  cleanups.push(() => edge.close());
  const alice = await connect(edge.url, { name: 'alice', auth: { token: userToken(ALICE) } });
  const bob = await connect(edge.url, { name: 'bob', auth: { token: userToken(BOB) } });
  t.after(() => alice.close());
  t.after(() => bob.close());
  alice.socket.emit('user_authenticated', ALICE);
  bob.socket.emit('user_authenticated', BOB);
  await alice.presence(BOB, 'online');
  const firstExpiry = Date.parse(edge.stats().relay.credential_expires_at);
  let disconnects = 0;
  alice.socket.on('disconnect', () => { disconnects += 1; });

  // 15 s = three lifetimes: bob changes status every 1.5 s, alice must see every change.
  const started = Date.now();
  const statuses = ['away', 'busy', 'online'];
  let changes = 0;
  while (Date.now() - started < 3 * TTL_S * 1000) {
    const status = statuses[changes % statuses.length];
    const since = alice.mark();
    bob.socket.emit('update_status', status);
    await alice.presence(BOB, status, { since, timeout: 3000 });
    changes += 1;
    await sleep(1500);
  }
  const relay = edge.stats().relay;
  t.diagnostic(`${changes} changes seen over ${Date.now() - started} ms; relay ${JSON.stringify(relay)}`);
  assert.ok(Date.now() > firstExpiry + 2 * TTL_S * 1000, 'well past the first token\'s expiry');
  assert.equal(relay.opened, 1, 'the service kept the stream: one stream opened');
  assert.equal(relay.streams, 1);
  assert.equal(relay.sessions_opened, 2, 'no session reopened');
  assert.equal(welcomes(edge).length, 2, 'one welcome per socket');
  assert.ok(relay.refreshes >= 3, `the service accepted the refreshes (${relay.refreshes})`);
  assert.ok(Date.parse(relay.credential_expires_at) > firstExpiry + 2 * TTL_S * 1000, 'the stream runs on a refreshed token');
  const health = await (await fetch(`${edge.url}/healthz`)).json();
  assert.equal(health.relay_streams, 1);
  assert.equal(health.processes[0].relay.opened, 1);
  assert.equal(health.ready, 2);
  assert.ok(alice.socket.connected && bob.socket.connected);
  assert.equal(disconnects, 0);
  assert.deepEqual(alice.received('presence_error'), []);
  assert.deepEqual(bob.received('presence_error'), []);
  assert.deepEqual(problems(edge), []);
});

test('real service: with refresh off the same edge sees its stream ended at the token\'s expiry (and reopens it)', async (t) => {
  const server = await realService();
  const { edge, alice } = await edgeWithAlice(t, { target: server.target, serviceTokenTtlS: 5, refreshServiceToken: false });
  const expiry = Date.parse(edge.stats().relay.credential_expires_at);
  await eventually(() => edge.stats().relay.opened === 2 && edge.stats().ready === 1, { timeout: 12000, what: 'the stream ended and reopened' });
  const ended = edge.log.entries.find((e) => e.msg === 'relay stream ended: the service token it ran on expired; reopening with a fresh one');
  assert.ok(ended, JSON.stringify(edge.log.entries.filter((e) => e.level !== 'debug')));
  t.diagnostic(`ended: ${JSON.stringify(ended)}; ${Date.now() - expiry} ms after the token's expiry`);
  assert.equal(ended.code, 'UNAUTHENTICATED');
  assert.match(ended.details, /service token expired/);
  assert.equal(ended.refresh, 'off');
  assert.equal(edge.stats().relay.refreshes, 0);
  assert.equal(edge.stats().relay.sessions_opened, 2, 'the session was reopened');
  assert.equal(welcomes(edge).length, 2, 'a second welcome');
  assert.ok(alice.socket.connected, 'the socket stays');
  assert.deepEqual(edge.log.entries.filter((e) => e.level === 'error'), []);
});

test('real service: a refresh the service refuses (another service\'s token) is tried again, then the stream is reopened', async (t) => {
  const server = await realService();
  const log = captureLogger();
  const TTL_S = 6;
  const credential = {
    open() {
      const { token, iat, exp } = mintServiceToken({ secret: SECRET, ttlS: TTL_S });
      const md = new grpc.Metadata();
      md.set('authorization', `Bearer ${token}`);
      return { metadata: md, issuedAt: iat * 1000, expiresAt: exp * 1000 };
    },
    refresh() {
      const { token, iat, exp } = mintServiceToken({ secret: SECRET, ttlS: TTL_S, subject: 'not-the-edge' });
      return { token, issuedAt: iat * 1000, expiresAt: exp * 1000 };
    },
  };
  const relay = new RelayClient({ Client: loadPresenceProto().RelayService, target: server.target, credential, log, onDelivery() {} });
  cleanups.push(() => relay.close());
  relay.start();
  await eventually(() => relay.stats().state === 'open', { what: 'the stream' });
  const expiry = Date.parse(relay.stats().credential_expires_at);
  await eventually(() => relay.stats().opened === 2, { timeout: 10000, what: 'the reopen' });
  const refusals = log.entries.filter((e) => /refused to refresh/.test(e.msg));
  t.diagnostic(JSON.stringify(refusals[0]));
  assert.equal(refusals.length, 3);
  for (const e of refusals) {
    assert.equal(e.code, 'PERMISSION_DENIED');
    assert.match(e.details, /not-the-edge.*"edge"/);
  }
  assert.ok(Date.now() < expiry, 'reopened before the first token expired');
  assert.equal(relay.stats().refreshes, 0);
  assert.deepEqual(log.entries.filter((e) => e.level === 'error'), []);
});

test('real service: a static EDGE_SERVICE_TOKEN expiring under the open stream is logged as such, naming EDGE_JWT_SECRET', async (t) => {
  const server = await realService();
  const { token, exp } = mintServiceToken({ secret: SECRET, ttlS: 3 });
  const edge = await startTestEdge({ target: server.target, serviceToken: token, backoff: { initialMs: 20, maxMs: 400 } });
  cleanups.push(() => edge.close());
  const alice = await connect(edge.url, { name: 'alice', auth: { token: userToken(ALICE) } });
  t.after(() => alice.close());
  alice.socket.emit('user_authenticated', ALICE);
  await eventually(() => edge.stats().ready === 1, { what: 'the session' });
  assert.ok(edge.log.entries.some((e) => e.level === 'warn' && /^EDGE_SERVICE_TOKEN expires at .*EDGE_JWT_SECRET/.test(e.msg)), 'warned at start');
  const expired = await eventually(() => edge.log.entries.find((e) => e.level === 'error' && /^relay stream ended: EDGE_SERVICE_TOKEN expired/.test(e.msg)), {
    timeout: 10000,
    what: 'the expiry logged',
  });
  t.diagnostic(expired.msg);
  assert.match(expired.msg, new RegExp(`expired at ${new Date(exp * 1000).toISOString()}`));
  assert.match(expired.msg, /cannot renew a static token.*Set EDGE_JWT_SECRET/);
  assert.equal(expired.code, 'UNAUTHENTICATED');
  assert.equal(edge.stats().relay.refreshes, 0);
  // The reopen is refused (retried at the longest backoff only), and the socket told once.
  await eventually(() => edge.log.entries.some((e) => /^relay stream refused: .*EDGE_SERVICE_TOKEN/.test(e.msg)), { what: 'the reopen refused' });
  await alice.waitFor('presence_error', (e) => e.event === 'user_authenticated' && e.code === 'UNAUTHENTICATED');
  assert.ok(!JSON.stringify(edge.log.entries).includes(token), 'the token is in no log line');
});

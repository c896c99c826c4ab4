'use strict';
// 6. EDGE_IDENTITY=token against a service with PRESENCE_JWT_SECRET: browsers present user JWTs
//    in the socket.io handshake (auth.token); the edge forwards them, so a socket that claims
//    another user id in user_authenticated stays the token's user.
const { test } = require('node:test');
const assert = require('node:assert/strict');
const jwt = require('jsonwebtoken');
const { connect, useServiceAndEdge } = require('./helpers/clients');

const SECRET = 'edge-test-secret-0123456789abcdef';
const MALLORY = 601; // holds a valid token for 601, claims to be 602
const VICTIM = 602;
const WITNESS = 603; // contact of both

const userToken = (id, secret = SECRET) => jwt.sign({ sub: String(id) }, secret, { algorithm: 'HS256', expiresIn: '1h' });
const serviceToken = (name) => jwt.sign({ sub: name, role: 'service' }, SECRET, { algorithm: 'HS256', expiresIn: '1h' });

const ctx = useServiceAndEdge({
  server: { jwtSecret: SECRET },
  serviceToken: serviceToken('test'),
  contacts: [[MALLORY, WITNESS], [VICTIM, WITNESS]],
  edge: { identity: 'token', serviceToken: serviceToken('edge') },
});

test('a socket claiming another user id stays the token user', async (t) => {
  const witness = await connect(ctx.edge.url, { name: 'witness', auth: { token: userToken(WITNESS) } });
  t.after(() => witness.close());
  witness.socket.emit('user_authenticated', WITNESS);
  await witness.presence(MALLORY, 'offline');
  await witness.presence(VICTIM, 'offline');

  const mallory = await connect(ctx.edge.url, { name: 'mallory', auth: { token: userToken(MALLORY) } });
  t.after(() => mallory.close());
  mallory.socket.emit('user_authenticated', VICTIM);
  // Positive control: the witness learns that the token's user came online…
  await witness.presence(MALLORY, 'online');
  mallory.socket.emit('update_status', 'busy');
  await witness.presence(MALLORY, 'busy');
  // …and nothing about the claimed user.
  assert.deepEqual(witness.received('presence_updated').filter((d) => d.user_id === VICTIM).map((d) => d.status), ['offline']);
  const since = witness.mark();
  witness.socket.emit('get_presence', [VICTIM, MALLORY]);
  const info = await witness.waitFor('presence_info', () => true, { since });
  assert.deepEqual(info.map((u) => [u.user_id, u.status]), [[VICTIM, 'offline'], [MALLORY, 'busy']]);
  // Mallory's own view is the token user's: the Welcome snapshot of 601's contacts.
  await mallory.presence(WITNESS, 'online');
  assert.ok(
    ctx.edge.log.entries.some((e) => e.level === 'warn' && /another user than the token/.test(e.msg) && e.token_user_id === String(MALLORY)),
    'the mismatch is logged',
  );
});

test('handshake without a user token is refused', async () => {
  await assert.rejects(connect(ctx.edge.url, { name: 'anonymous' }), /unauthorized/);
  await assert.rejects(connect(ctx.edge.url, { name: 'garbage', auth: { token: 'not-a-jwt' } }), /unauthorized/);
  await assert.rejects(
    connect(ctx.edge.url, { name: 'service-token', auth: { token: serviceToken('edge') } }),
    /unauthorized/,
  );
});

test('a forged token (wrong signature) is refused by the service, not trusted by the edge', async (t) => {
  const witness = await connect(ctx.edge.url, { name: 'witness2', auth: { token: userToken(WITNESS) } });
  t.after(() => witness.close());
  witness.socket.emit('user_authenticated', WITNESS);
  await witness.presence(VICTIM, 'offline');

  const forger = await connect(ctx.edge.url, { name: 'forger', auth: { token: userToken(VICTIM, 'wrong-secret') } });
  t.after(() => forger.close());
  const disconnected = new Promise((resolve) => forger.socket.once('disconnect', resolve));
  forger.socket.emit('user_authenticated', VICTIM);
  const err = await forger.waitFor('presence_error', (e) => e.event === 'user_authenticated');
  assert.equal(err.code, 'UNAUTHENTICATED');
  assert.equal(await disconnected, 'io server disconnect');
  // The forged identity never came online.
  const since = witness.mark();
  witness.socket.emit('get_presence', [VICTIM]);
  assert.deepEqual(await witness.waitFor('presence_info', () => true, { since }), [
    { user_id: VICTIM, status: 'offline', last_seen: null },
  ]);
  assert.deepEqual(witness.received('presence_updated').filter((d) => d.user_id === VICTIM && d.status !== 'offline'), []);
});

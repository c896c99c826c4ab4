'use strict';
// Finding 3 of "Hostile and broken clients cannot hurt anyone else": the edge must never log a
// token (nor a whole authorization value), at any level, not even inside the errors and details
// it logs. The edge's real JSON logger at debug level writes into a buffer while token-mode
// sockets go through every path that handles a token: a valid one, a token sent as the user id,
// a forged one, an expired one, one that expires while its session is open, and one with
// characters a gRPC header cannot carry; the edge's own service token travels on its relay stream.
const { test } = require('node:test');
const assert = require('node:assert/strict');
const jwt = require('jsonwebtoken');
const { connect, useServiceAndEdge } = require('./helpers/clients');
const { createLogger } = require('../src/log');

const SECRET = 'edge-log-test-secret-0123456789abcdef';
const ALICE = 1101;
const BOB = 1102;

const userToken = (id, opts = {}, secret = SECRET) => jwt.sign({ sub: String(id) }, secret, { algorithm: 'HS256', expiresIn: '1h', ...opts });
const serviceToken = jwt.sign({ sub: 'edge', role: 'service' }, SECRET, { algorithm: 'HS256', expiresIn: '1h' });

const lines = [];
const tokens = [serviceToken];
const ctx = useServiceAndEdge({
  server: { jwtSecret: SECRET },
  serviceToken: jwt.sign({ sub: 'test', role: 'service' }, SECRET, { algorithm: 'HS256', expiresIn: '1h' }),
  contacts: [[ALICE, BOB]],
  edge: {
    identity: 'token',
    serviceToken,
    log: createLogger({ level: 'debug', stream: { write: (line) => lines.push(line) } }),
  },
});

/** Pieces of a token that must never show: its payload and signature, and any 16 characters of them. */
function fragments(token) {
  const [, payload, signature] = token.split('.');
  const out = [];
  for (const part of [payload, signature]) {
    for (let i = 0; i + 16 <= part.length; i += 8) out.push(part.slice(i, i + 16));
  }
  return out;
}

test('no token reaches the log, whatever the socket does with it', async (t) => {
  // A valid token, also sent (by mistake) as the user id: logged as a mismatch, without the value.
  const alice = userToken(ALICE);
  tokens.push(alice);
  const a = await connect(ctx.edge.url, { name: 'alice', auth: { token: alice } });
  t.after(() => a.close());
  a.socket.emit('user_authenticated', alice);
  await a.presence(BOB, 'offline');
  // A forged token and an expired one: the service refuses them; the edge logs the refusal.
  for (const [name, token] of [
    ['forged', userToken(BOB, {}, 'not-the-secret-0123456789abcdef')],
    ['expired', userToken(BOB, { expiresIn: -60 })],
  ]) {
    tokens.push(token);
    const c = await connect(ctx.edge.url, { name, auth: { token } });
    t.after(() => c.close());
    c.socket.emit('user_authenticated', BOB);
    const err = await c.waitFor('presence_error', (e) => e.event === 'user_authenticated');
    assert.equal(err.code, 'UNAUTHENTICATED', name);
  }
  // A token a gRPC header cannot carry is refused at the handshake, never sent (nor quoted) later.
  const unsendable = `${userToken(BOB)}\u00e9`;
  tokens.push(unsendable);
  const handshake = await connect(ctx.edge.url, { name: 'unsendable', auth: { token: unsendable } }).then(
    (c) => {
      c.close();
      return 'connected';
    },
    (err) => err.message,
  );
  // A token that expires while its session is open: the service ends the session, the edge says
  // so and closes the socket.
  const shortLived = userToken(BOB, { expiresIn: 2 });
  tokens.push(shortLived);
  const s = await connect(ctx.edge.url, { name: 'short-lived', auth: { token: shortLived } });
  t.after(() => s.close());
  const closed = new Promise((resolve) => s.socket.once('disconnect', resolve));
  s.socket.emit('user_authenticated', BOB);
  await s.presence(ALICE, 'online');
  const expired = await s.waitFor('presence_error', (e) => e.event === 'user_authenticated', { timeout: 6000 });
  assert.equal(expired.code, 'UNAUTHENTICATED');
  assert.match(expired.message, /expired/);
  assert.equal(await closed, 'io server disconnect');

  const out = lines.join('');
  // Positive control: every path above did log.
  for (const msg of ['another user than the token', 'presence session refused', 'relay stream open', 'connection refused: auth.token is not a user JWT']) {
    assert.ok(out.includes(msg), `expected a log line about "${msg}"`);
  }
  assert.doesNotMatch(out, /Bearer (?!\[redacted\])/);
  for (const token of tokens) {
    for (const piece of fragments(token)) assert.ok(!out.includes(piece), `a token fragment was logged: ${piece}`);
  }
  assert.match(handshake, /unauthorized/, 'the unsendable token was refused at the handshake');
});

'use strict';
// Finding 3 of "Hostile and broken clients cannot hurt anyone else": the edge must never log a
// token (nor a whole authorization value), at any level, not even inside the errors and details
// it logs. The edge's real JSON logger at debug level writes into a buffer while token-mode
// sockets go through every path that handles a token: a valid one, a token sent as the user id,
// a forged one, an expired one, one with characters a gRPC header cannot carry, and a call whose
// metadata grpc-js refuses (its error message quotes the value).
const { test } = require('node:test');
const assert = require('node:assert/strict');
const grpc = require('@grpc/grpc-js');
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
  // A token a gRPC header cannot carry is refused at the handshake, not sent (nor quoted) later.
  const unsendable = `${userToken(BOB)}\u00e9`;
  tokens.push(unsendable);
  const handshake = await connect(ctx.edge.url, { name: 'unsendable', auth: { token: unsendable } }).then(
    (c) => {
      c.close();
      return 'connected';
    },
    (err) => err.message,
  );
  // grpc-js refusing the authorization value: its error quotes `Bearer <token>`.
  const realSet = grpc.Metadata.prototype.set;
  grpc.Metadata.prototype.set = function set(key, value) {
    if (key === 'authorization' && value === `Bearer ${alice}`) throw new Error(`Metadata string value "${value}" contains illegal characters`);
    return realSet.call(this, key, value);
  };
  try {
    const since = a.mark();
    a.socket.emit('get_presence', [BOB]);
    const err = await a.waitFor('presence_error', (e) => e.event === 'get_presence', { since });
    assert.ok(!err.message.includes(alice), 'not even the socket is told its token back');
  } finally {
    grpc.Metadata.prototype.set = realSet;
  }

  const out = lines.join('');
  // Positive control: every path above did log.
  for (const msg of ['another user than the token', 'presence stream refused', 'get_presence ignored']) {
    assert.ok(out.includes(msg), `expected a log line about "${msg}"`);
  }
  assert.doesNotMatch(out, /Bearer (?!\[redacted\])/);
  for (const token of tokens) {
    for (const piece of fragments(token)) assert.ok(!out.includes(piece), `a token fragment was logged: ${piece}`);
  }
  assert.match(handshake, /unauthorized/, 'the unsendable token was refused at the handshake');
});

'use strict';
// Finding 1 of "Hostile and broken clients cannot hurt anyone else": trust-client mode used to
// listen on every interface and answer CORS `*`, so any web page on any host could claim to be any
// user. Now trust-client listens on loopback only, and every socket.io handshake's Origin is
// checked (CORS headers alone do not stop a cross-site WebSocket). No presence service is needed:
// the handshake is refused before any gRPC call.
const { test } = require('node:test');
const assert = require('node:assert/strict');
const http = require('node:http');
const { startEdge } = require('../src/server');
const { connect, startTestEdge, captureLogger } = require('./helpers/clients');

const NOWHERE = '127.0.0.1:9'; // the service is never called in these tests
const EVIL = 'http://evil.example';
const DEV_SERVER = 'http://localhost:5173'; // a frontend dev server on the developer's machine
const SERVICE_TOKEN = 'not-checked-by-anyone-here'; // token mode needs one; nothing is called

/** The engine.io handshake a browser starts with (polling), with the given headers. */
function handshake(port, headers) {
  return new Promise((resolve, reject) => {
    const req = http.get({ host: '127.0.0.1', port, path: '/socket.io/?EIO=4&transport=polling', headers }, (res) => {
      let body = '';
      res.setEncoding('utf8').on('data', (c) => { body += c; });
      res.on('end', () => resolve({ status: res.statusCode, headers: res.headers, body }));
    });
    req.setTimeout(5000, () => req.destroy(new Error('handshake timed out')));
    req.on('error', reject);
  });
}

/** A socket.io client claiming to run in a page of `origin` (undefined: no Origin, like curl or an app). */
function connectFrom(url, origin, transport, extra = {}) {
  return connect(url, {
    name: `${origin || 'no origin'} over ${transport}`,
    transports: [transport],
    extraHeaders: origin ? { origin } : {},
    timeout: 5000,
    ...extra,
  });
}

test('trust-client refuses a non-loopback listen address and listens on 127.0.0.1 by default', async () => {
  const log = captureLogger();
  for (const host of ['0.0.0.0', '::']) {
    await assert.rejects(
      startEdge({ port: 0, host, target: NOWHERE, identity: 'trust-client', log }),
      (err) => /EDGE_HOST=.* is not a loopback address/.test(err.message) && /EDGE_IDENTITY=trust-client/.test(err.message),
      host,
    );
  }
  const edge = await startEdge({ port: 0, target: NOWHERE, identity: 'trust-client', log });
  try {
    assert.equal(edge.host, '127.0.0.1');
  } finally {
    await edge.close();
  }
});

test('trust-client: pages on other sites can open neither a WebSocket nor a polling socket', async (t) => {
  const edge = await startTestEdge({ target: NOWHERE, identity: 'trust-client' });
  t.after(() => edge.close());
  for (const transport of ['websocket', 'polling']) {
    await assert.rejects(connectFrom(edge.url, EVIL, transport), /websocket error|xhr poll error|Forbidden|403/i, transport);
    // Positive controls: a local dev page and a non-browser client get in.
    (await connectFrom(edge.url, DEV_SERVER, transport)).close();
    (await connectFrom(edge.url, undefined, transport)).close();
  }
  assert.ok(edge.log.entries.some((e) => e.msg === 'handshake refused: origin not allowed' && /evil\.example/.test(e.origin)));

  // CORS: the allowed origin is echoed, the other is refused outright (no `*` anywhere).
  const dev = await handshake(edge.port, { origin: DEV_SERVER });
  assert.equal(dev.status, 200);
  assert.equal(dev.headers['access-control-allow-origin'], DEV_SERVER);
  const evil = await handshake(edge.port, { origin: EVIL });
  assert.equal(evil.status, 403);
  assert.equal(evil.headers['access-control-allow-origin'], undefined);
  // DNS rebinding: a hostile name resolving to 127.0.0.1 is "same origin" by its Host header, but
  // not a loopback name, so it gets nothing.
  const rebound = await handshake(edge.port, { host: `rebind.example:${edge.port}`, origin: `http://rebind.example:${edge.port}` });
  assert.equal(rebound.status, 403);
  const own = await handshake(edge.port, { host: `127.0.0.1:${edge.port}`, origin: edge.url });
  assert.equal(own.status, 200);
});

test('trust-client: EDGE_CORS_ORIGINS replaces the loopback default', async (t) => {
  const edge = await startTestEdge({ target: NOWHERE, identity: 'trust-client', corsOrigins: 'http://localhost:8080' });
  t.after(() => edge.close());
  assert.equal((await handshake(edge.port, { origin: 'http://localhost:8080' })).status, 200);
  assert.equal((await handshake(edge.port, { origin: DEV_SERVER })).status, 403);
  assert.equal((await handshake(edge.port, { origin: EVIL })).status, 403);
});

test('token mode: same origin only by default; EDGE_CORS_ORIGINS lists more', async (t) => {
  const sameOnly = await startTestEdge({ target: NOWHERE, identity: 'token', serviceToken: SERVICE_TOKEN });
  t.after(() => sameOnly.close());
  const host = `127.0.0.1:${sameOnly.port}`;
  assert.equal((await handshake(sameOnly.port, { host, origin: sameOnly.url })).status, 200);
  assert.equal((await handshake(sameOnly.port, { host: 'chat.example.com', origin: 'https://chat.example.com' })).status, 200);
  assert.equal((await handshake(sameOnly.port, {})).status, 200, 'no Origin: not a browser page');
  for (const origin of [DEV_SERVER, EVIL, 'null']) {
    assert.equal((await handshake(sameOnly.port, { host, origin })).status, 403, origin);
  }
  const anyToken = { auth: { token: 'eyJhbGciOiJub25lIn0.eyJzdWIiOiI5MDEifQ.' } }; // decoded, never verified here
  await assert.rejects(connectFrom(sameOnly.url, EVIL, 'websocket', anyToken), /websocket error|Forbidden|403/i);
  (await connectFrom(sameOnly.url, sameOnly.url, 'websocket', anyToken)).close();

  const listed = await startTestEdge({ target: NOWHERE, identity: 'token', serviceToken: SERVICE_TOKEN, corsOrigins: ['https://chat.example.com'] });
  t.after(() => listed.close());
  const ok = await handshake(listed.port, { origin: 'https://chat.example.com' });
  assert.equal(ok.status, 200);
  assert.equal(ok.headers['access-control-allow-origin'], 'https://chat.example.com');
  assert.equal((await handshake(listed.port, { origin: EVIL })).status, 403);
});

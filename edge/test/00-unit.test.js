'use strict';
// Pure parts of the edge and its process wrapper; no presence service needed.
const { test } = require('node:test');
const assert = require('node:assert/strict');
const path = require('node:path');
const protoLoader = require('@grpc/proto-loader');
const {
  seedStatusToEnum,
  enumToSeedStatus,
  timestampToIso,
  parseUserId,
  sanitizeDeviceLabel,
  toSeedPresence,
  versionOf,
  decodeJwtPayload,
} = require('../src/convert');
const { createLogger, redact } = require('../src/log');
const { bindHost, isLoopbackHost, parseOrigins, normalizeOrigin } = require('../src/access');
const { runIndex, listeningPort, stopIndex } = require('./helpers/edge-process');
const { PROTO_FILE, LOADER_OPTIONS, loadPresenceProto } = require('../src/proto');
const { startEdge } = require('../src/server');

const EDGE_DIR = path.resolve(__dirname, '..');

test('the contract is loaded from the repo proto, with google.protobuf.Timestamp', () => {
  assert.equal(PROTO_FILE, path.resolve(EDGE_DIR, '..', 'proto', 'presence', 'v1', 'presence.proto'));
  const pkg = loadPresenceProto();
  for (const m of ['Authenticate', 'GetPresence', 'UpdateStatus']) assert.ok(pkg.Presence.service[m], m);
  assert.ok(pkg.Contacts.service.AddContacts);
  const def = protoLoader.loadSync(PROTO_FILE, LOADER_OPTIONS);
  const ServerMessage = def['presence.v1.ServerMessage'];
  const decoded = ServerMessage.deserialize(
    ServerMessage.serialize({
      welcome: {
        connection_id: 'c',
        self: { user_id: '1', status: 'STATUS_ONLINE', version: '3' },
        contacts: [{ user_id: '2', status: 'STATUS_OFFLINE', last_seen: { seconds: '1762785000', nanos: 123999999 }, version: '9' }],
      },
    }),
  );
  assert.equal(decoded.kind, 'welcome');
  assert.equal(decoded.welcome.self.last_seen, null);
  assert.deepEqual(toSeedPresence(decoded.welcome.contacts[0]), {
    user_id: 2,
    status: 'offline',
    last_seen: '2025-11-10T14:30:00.123Z',
  });
  assert.deepEqual(toSeedPresence(decoded.welcome.self), { user_id: 1, status: 'online', last_seen: null });
});

test('seed status strings map to the enum; anything else is refused', () => {
  assert.equal(seedStatusToEnum('online'), 'STATUS_ONLINE');
  assert.equal(seedStatusToEnum('away'), 'STATUS_AWAY');
  assert.equal(seedStatusToEnum('busy'), 'STATUS_BUSY');
  assert.equal(seedStatusToEnum('offline'), 'STATUS_OFFLINE');
  assert.equal(seedStatusToEnum(' Away '), 'STATUS_AWAY');
  for (const bad of ['dancing', '', null, undefined, 2, {}, ['away'], 'constructor', '__proto__']) {
    assert.equal(seedStatusToEnum(bad), null, String(bad));
  }
  assert.equal(enumToSeedStatus('STATUS_BUSY'), 'busy');
  assert.equal(enumToSeedStatus('STATUS_UNSPECIFIED'), 'offline');
  assert.equal(enumToSeedStatus(2), 'away');
  assert.equal(enumToSeedStatus('???'), 'offline');
});

test('timestamps become ISO-8601 strings with milliseconds', () => {
  assert.equal(timestampToIso({ seconds: '1762785000', nanos: 0 }), '2025-11-10T14:30:00.000Z');
  assert.equal(timestampToIso({ seconds: 1762785000, nanos: 999999999 }), '2025-11-10T14:30:00.999Z');
  assert.equal(timestampToIso({ seconds: '0', nanos: 0 }), '1970-01-01T00:00:00.000Z');
  assert.equal(timestampToIso(null), null);
  assert.equal(timestampToIso(undefined), null);
  assert.equal(timestampToIso({ seconds: '99999999999999999', nanos: 0 }), null);
});

test('user ids: positive integers below 2^63 (the service stores signed 64-bit ids), as Number or decimal string', () => {
  assert.equal(parseUserId(42), '42');
  assert.equal(parseUserId('42'), '42');
  assert.equal(parseUserId(' 7 '), '7');
  assert.equal(parseUserId('9223372036854775807'), '9223372036854775807');
  assert.equal(parseUserId(9223372036854775807n), '9223372036854775807');
  const tooBig = ['9223372036854775808', 9223372036854775808n, '18446744073709551615', '18446744073709551616'];
  for (const bad of [0, -1, 1.5, NaN, '', '042', '1e3', ...tooBig, null, {}, [1], true]) {
    assert.equal(parseUserId(bad), null, String(bad));
  }
  assert.equal(versionOf({ version: '18446744073709551615' }), 18446744073709551615n);
  assert.equal(versionOf({}), 0n);
});

test('JWT payloads are decoded (not verified)', () => {
  const part = (o) => Buffer.from(JSON.stringify(o)).toString('base64url');
  assert.deepEqual(decodeJwtPayload(`${part({ alg: 'HS256' })}.${part({ sub: '42', exp: 1 })}.sig`), { sub: '42', exp: 1 });
  assert.equal(decodeJwtPayload('nope'), null);
  assert.equal(decodeJwtPayload('a.%%%.c'), null);
  assert.equal(decodeJwtPayload(`a.${part([1])}.c`), null);
  assert.equal(decodeJwtPayload(undefined), null);
});

test('startEdge refuses an unknown identity mode', async () => {
  await assert.rejects(startEdge({ port: 0, identity: 'trust-everyone' }), /identity must be one of/);
});

test('npm start: EDGE_PORT=0 prints `edge listening on PORT`, SIGTERM stops it cleanly', async () => {
  const run = runIndex({ EDGE_PORT: '0', PRESENCE_TARGET: '127.0.0.1:9', EDGE_IDENTITY: 'trust-client' });
  const port = await listeningPort(run);
  assert.ok(port > 0);
  const res = await fetch(`http://127.0.0.1:${port}/healthz`);
  assert.equal(res.status, 200);
  assert.equal((await res.json()).status, 'ok');
  assert.match(run.err(), /trust-client/); // the start-up warning
  run.child.kill('SIGTERM');
  assert.deepEqual(await run.exit, { code: 0, signal: null });
  assert.equal(run.out().trim().split('\n').length, 1, 'stdout carries only the listening line');
});

test('npm start: bad settings exit with a message', async () => {
  const run = runIndex({ EDGE_IDENTITY: 'whatever', EDGE_PORT: '0' });
  assert.equal((await run.exit).code, 2);
  assert.match(run.err(), /EDGE_IDENTITY must be one of token, trust-client/);
  const run2 = runIndex({ EDGE_PORT: 'abc' });
  assert.equal((await run2.exit).code, 2);
  assert.match(run2.err(), /EDGE_PORT/);
});

test('device labels are made printable and cut to 64 characters before they reach the wire', () => {
  assert.equal(sanitizeDeviceLabel('  phone  '), 'phone');
  assert.equal(sanitizeDeviceLabel('lap\uD800top'), 'laptop', 'lone surrogate removed');
  assert.equal(sanitizeDeviceLabel('tab\uDC00\uD83D\uDE00'), 'tab\uD83D\uDE00', 'a real pair stays');
  assert.equal(sanitizeDeviceLabel('a\u0000b\u0007c\u200bd'), 'abcd', 'controls and format characters removed');
  assert.equal(sanitizeDeviceLabel('line\u2028break'), 'line break', 'line separators are whitespace');
  assert.equal(sanitizeDeviceLabel('two\t\n words'), 'two words');
  assert.equal(Array.from(sanitizeDeviceLabel('é'.repeat(200))).length, 64);
  assert.equal(sanitizeDeviceLabel('\uD800\u0007'), '');
  assert.equal(sanitizeDeviceLabel(42), '');
});

test('the logger never writes a credential, wherever it hides', () => {
  const lines = [];
  const log = createLogger({ level: 'debug', stream: { write: (l) => lines.push(l) } });
  const part = (o) => Buffer.from(JSON.stringify(o)).toString('base64url');
  const jwt = `${part({ alg: 'HS256', typ: 'JWT' })}.${part({ sub: '42', exp: 1 })}.c2lnbmF0dXJlLW9mLXRoZS10b2tlbg`;
  const grpcError = new Error(`Metadata string value "Bearer ${jwt}\u00e9" contains illegal characters`);
  log.debug('a', { error: grpcError });
  log.info(`b Bearer ${jwt}`, { authorization: `Bearer ${jwt}`, nested: { token: 'opaque-secret', list: [jwt] } });
  log.warn('c', { value: JSON.stringify(jwt).slice(0, 60), stack: String(grpcError.stack) });
  log.error('d', { details: `authorization: Bearer opaque\nsecond line` });
  const out = lines.join('');
  for (const secret of [jwt.split('.')[1], jwt.split('.')[2], 'opaque-secret', 'opaque\\nsecond', part({ sub: '42', exp: 1 }).slice(0, 12)]) {
    assert.ok(!out.includes(secret), `${secret} leaked:\n${out}`);
  }
  assert.equal(lines.length, 4);
  assert.match(out, /\[redacted\]/);
  // What is not a credential stays readable.
  assert.equal(redact('target presence-service.production-cluster.local:50051'), 'target presence-service.production-cluster.local:50051');
  assert.equal(redact('at SocketBinding.onGetPresence (/edge/src/server.js:1:2)'), 'at SocketBinding.onGetPresence (/edge/src/server.js:1:2)');
});

test('listen address: trust-client mode is loopback only', () => {
  assert.equal(bindHost('trust-client', undefined), '127.0.0.1');
  assert.equal(bindHost('trust-client', ''), '127.0.0.1');
  for (const ok of ['127.0.0.1', '127.1.2.3', 'localhost', '::1', '[::1]']) assert.equal(bindHost('trust-client', ok), ok);
  for (const bad of ['0.0.0.0', '::', '10.0.0.5', 'edge.example.com', '::ffff:10.0.0.1']) {
    assert.throws(() => bindHost('trust-client', bad), (err) => /EDGE_HOST/.test(err.message) && /EDGE_IDENTITY/.test(err.message), bad);
  }
  assert.equal(bindHost('token', undefined), undefined, 'token mode: all interfaces by default');
  assert.equal(bindHost('token', '0.0.0.0'), '0.0.0.0');
  assert.ok(isLoopbackHost('::ffff:127.0.0.1'));
});

test('EDGE_CORS_ORIGINS: a list of http(s) origins; bad entries are named', () => {
  assert.equal(parseOrigins(undefined, 'token'), null);
  assert.deepEqual([...parseOrigins('https://Chat.Example.com, http://localhost:5173/ ,', 'token').list], [
    'https://chat.example.com',
    'http://localhost:5173',
  ]);
  assert.equal(parseOrigins('*', 'token').any, true);
  assert.throws(() => parseOrigins('*', 'trust-client'), /EDGE_CORS_ORIGINS='\*' is refused with EDGE_IDENTITY=trust-client/);
  for (const bad of ['chat.example.com', 'ftp://x.example', 'https://x.example/app', 'https://u:p@x.example', 'null']) {
    assert.throws(() => parseOrigins(`https://ok.example,${bad}`, 'token'), new RegExp(`EDGE_CORS_ORIGINS: "${bad.replace(/[.*+?^${}()|[\]\\/]/g, '\\$&')}" is not an origin`));
  }
  assert.equal(normalizeOrigin('https://x.example:443'), 'https://x.example');
  assert.equal(normalizeOrigin('null'), null);
});

test('npm start: unsafe or broken access settings exit with a message naming them', async () => {
  const cases = [
    [{ EDGE_IDENTITY: 'trust-client', EDGE_HOST: '0.0.0.0' }, /EDGE_HOST=0\.0\.0\.0 is not a loopback address.*EDGE_IDENTITY=trust-client/],
    [{ EDGE_IDENTITY: 'trust-client', EDGE_CORS_ORIGINS: '*' }, /EDGE_CORS_ORIGINS='\*'/],
    [{ EDGE_CORS_ORIGINS: 'example.com' }, /EDGE_CORS_ORIGINS: "example\.com" is not an origin/],
    [{ EDGE_IDENTITY: 'trust-client', EDGE_SERVICE_TOKEN: 'abc\u00e9' }, /EDGE_SERVICE_TOKEN must be printable ASCII/],
    [{ EDGE_DEMO: 'maybe' }, /EDGE_DEMO must be 1 or 0/],
  ];
  for (const [env, message] of cases) {
    const run = runIndex({ EDGE_PORT: '0', ...env });
    assert.equal((await run.exit).code, 2, JSON.stringify(env));
    assert.match(run.err(), message);
    assert.equal(run.out(), '', 'nothing listened');
  }
});

test('npm start: EDGE_CORS_ORIGIN still works as a deprecated alias of EDGE_CORS_ORIGINS', async (t) => {
  const run = runIndex({ EDGE_PORT: '0', PRESENCE_TARGET: '127.0.0.1:9', EDGE_CORS_ORIGIN: 'https://app.example.com' });
  t.after(() => stopIndex(run));
  const port = await listeningPort(run);
  const handshake = (origin) => fetch(`http://127.0.0.1:${port}/socket.io/?EIO=4&transport=polling`, { headers: { origin } });
  assert.equal((await handshake('https://app.example.com')).status, 200);
  assert.equal((await handshake('https://other.example.com')).status, 403);
  assert.match(run.err(), /EDGE_CORS_ORIGIN is deprecated; use EDGE_CORS_ORIGINS/);
});

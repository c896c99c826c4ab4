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
  samePayload,
  clientPlatformToEnum,
  clientActivityToEnum,
  parseCustomStatus,
  versionOf,
  decodeJwtPayload,
} = require('../src/convert');
const { TokenBucket, Backoff } = require('../src/limits');
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
  assert.equal(versionOf({ version: '9007199254740993' }), 9007199254740993n, 'above 2^53: exact, as a BigInt');
  assert.equal(versionOf({ version: '42' }), 42, 'small versions are plain Numbers');
  assert.ok(versionOf({ version: '9007199254740993' }) > versionOf({ version: '9007199254740991' }));
  assert.equal(versionOf({}), 0);
  assert.equal(versionOf({ version: 'x' }), 0);
});

test('JWT payloads are decoded (not verified)', () => {
  const part = (o) => Buffer.from(JSON.stringify(o)).toString('base64url');
  assert.deepEqual(decodeJwtPayload(`${part({ alg: 'HS256' })}.${part({ sub: '42', exp: 1 })}.sig`), { sub: '42', exp: 1 });
  assert.equal(decodeJwtPayload('nope'), null);
  assert.equal(decodeJwtPayload('a.%%%.c'), null);
  assert.equal(decodeJwtPayload(`a.${part([1])}.c`), null);
  assert.equal(decodeJwtPayload(undefined), null);
});

test('payloads: the seed fields exactly as before, the new ones only when the service set them', () => {
  const bare = toSeedPresence({ user_id: '7', status: 'STATUS_ONLINE', last_seen: null, platforms: [], idle_since: null, custom_status: null, last_seen_approx: 'LAST_SEEN_APPROX_UNSPECIFIED' });
  assert.deepEqual(bare, { user_id: 7, status: 'online', last_seen: null });
  assert.deepEqual(Object.keys(bare), ['user_id', 'status', 'last_seen'], 'seed clients see nothing new');
  const rich = toSeedPresence({
    user_id: '8',
    status: 'STATUS_AWAY',
    last_seen: { seconds: '1762785000', nanos: 0 },
    platforms: ['PLATFORM_DESKTOP', 'PLATFORM_WEB', 'PLATFORM_UNSPECIFIED'],
    idle_since: { seconds: '1762785060', nanos: 5000000 },
    custom_status: { text: 'In a meeting', emoji: '📅', expires_at: { seconds: '1762788600', nanos: 0 } },
    last_seen_approx: 'LAST_SEEN_APPROX_WITHIN_WEEK',
  });
  assert.deepEqual(rich, {
    user_id: 8,
    status: 'away',
    last_seen: '2025-11-10T14:30:00.000Z',
    platforms: ['desktop', 'web'],
    idle_since: '2025-11-10T14:31:00.005Z',
    custom_status: { text: 'In a meeting', emoji: '📅', expires_at: '2025-11-10T15:30:00.000Z' },
    last_seen_approx: 'within_week',
  });
  const noExpiry = toSeedPresence({ user_id: '9', status: 'STATUS_OFFLINE', custom_status: { text: '', emoji: ':palm_tree:', expires_at: null } });
  assert.deepEqual(noExpiry.custom_status, { text: '', emoji: ':palm_tree:', expires_at: null });
  assert.ok(samePayload(rich, structuredClone(rich)));
  for (const change of [{ status: 'busy' }, { platforms: ['web'] }, { idle_since: undefined }, { custom_status: { ...rich.custom_status, text: 'x' } }, { last_seen_approx: 'recently' }]) {
    assert.ok(!samePayload(rich, { ...rich, ...change }), JSON.stringify(change));
  }
});

test('client words for platform and activity; anything else is refused', () => {
  assert.equal(clientPlatformToEnum('mobile'), 'PLATFORM_MOBILE');
  assert.equal(clientActivityToEnum('background'), 'ACTIVITY_BACKGROUND');
  for (const bad of ['Mobile', 'phone', '', null, 3, {}, 'toString', '__proto__']) {
    assert.equal(clientPlatformToEnum(bad), null, String(bad));
    assert.equal(clientActivityToEnum(bad), null, String(bad));
  }
});

test('set_custom_status input: null clears, fields are checked and named, expires_at as ISO or milliseconds', () => {
  assert.deepEqual(parseCustomStatus(null), { custom_status: null });
  assert.deepEqual(parseCustomStatus(undefined), { custom_status: null });
  assert.deepEqual(parseCustomStatus({ text: 'Lunch' }), { custom_status: { text: 'Lunch', emoji: '' } });
  assert.deepEqual(parseCustomStatus({ emoji: '🍕', expires_at: 1762788600123 }), {
    custom_status: { text: '', emoji: '🍕', expires_at: { seconds: 1762788600, nanos: 123000000 } },
  });
  assert.deepEqual(parseCustomStatus({ text: 'x', expires_at: '2025-11-10T15:30:00Z' }).custom_status.expires_at, { seconds: 1762788600, nanos: 0 });
  const cases = [
    ['busy', /expected \{ text, emoji, expires_at \}/],
    [[1], /expected/],
    [{ text: 5 }, /^text must be a string/],
    [{ emoji: {} }, /^emoji must be a string/],
    [{ text: 'x'.repeat(5000) }, /^text is too long/],
    [{ expires_at: 'tomorrow' }, /^expires_at must be an ISO-8601 date-time/],
    [{ expires_at: '1700000000' }, /^expires_at/],
    [{ expires_at: Infinity }, /^expires_at/],
    [{ expires_at: 1e20 }, /^expires_at/],
    [{ expires_at: true }, /^expires_at/],
  ];
  for (const [value, message] of cases) assert.match(parseCustomStatus(value).error || '', message, JSON.stringify(value));
});

test('token bucket and backoff', () => {
  const bucket = new TokenBucket({ burst: 2, refillMs: 60000 });
  assert.equal(bucket.take(), true);
  assert.equal(bucket.take(), true);
  assert.equal(bucket.take(), false);
  assert.ok(bucket.wait() > 59000);
  const b = new Backoff({ initialMs: 100, maxMs: 1000 });
  const delays = Array.from({ length: 8 }, () => b.next(null));
  assert.ok(delays[0] >= 50 && delays[0] <= 100, String(delays));
  assert.ok(delays.every((d) => d <= 1000), String(delays));
  assert.ok(delays[7] >= 500, String(delays));
});

test('startEdge refuses an unknown identity mode, and token mode without a service credential', async () => {
  await assert.rejects(startEdge({ port: 0, identity: 'trust-everyone' }), /identity must be one of/);
  await assert.rejects(startEdge({ port: 0, identity: 'token' }), /EDGE_IDENTITY=token needs EDGE_JWT_SECRET or EDGE_SERVICE_TOKEN/);
});

test('npm start: EDGE_PORT=0 prints `edge listening on PORT`, SIGTERM stops it cleanly', async () => {
  const run = runIndex({ EDGE_PORT: '0', EDGE_WORKERS: '1', PRESENCE_TARGET: '127.0.0.1:9', EDGE_IDENTITY: 'trust-client' });
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
    [{ EDGE_CORS_ORIGINS: 'example.com', EDGE_SERVICE_TOKEN: 'svc' }, /EDGE_CORS_ORIGINS: "example\.com" is not an origin/],
    [{ EDGE_IDENTITY: 'token' }, /EDGE_IDENTITY=token needs EDGE_JWT_SECRET or EDGE_SERVICE_TOKEN/],
    [{}, /EDGE_IDENTITY=token needs EDGE_JWT_SECRET or EDGE_SERVICE_TOKEN/],
    [{ EDGE_IDENTITY: 'trust-client', EDGE_WORKERS: '0' }, /EDGE_WORKERS must be a whole number from 1 to 64/],
    [{ EDGE_IDENTITY: 'trust-client', EDGE_WORKERS: 'many' }, /EDGE_WORKERS must be a whole number/],
    [{ EDGE_IDENTITY: 'trust-client', EDGE_WORKER_SEMI_SPACE_MB: '-1' }, /EDGE_WORKER_SEMI_SPACE_MB must be a whole number of megabytes/],
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
  const run = runIndex({
    EDGE_PORT: '0',
    EDGE_WORKERS: '1',
    PRESENCE_TARGET: '127.0.0.1:9',
    EDGE_SERVICE_TOKEN: 'svc',
    EDGE_CORS_ORIGIN: 'https://app.example.com',
  });
  t.after(() => stopIndex(run));
  const port = await listeningPort(run);
  const handshake = (origin) => fetch(`http://127.0.0.1:${port}/socket.io/?EIO=4&transport=polling`, { headers: { origin } });
  assert.equal((await handshake('https://app.example.com')).status, 200);
  assert.equal((await handshake('https://other.example.com')).status, 403);
  assert.match(run.err(), /EDGE_CORS_ORIGIN is deprecated; use EDGE_CORS_ORIGINS/);
});

'use strict';
// Pure parts of the edge and its process wrapper; no presence service needed.
const { test } = require('node:test');
const assert = require('node:assert/strict');
const { spawn } = require('node:child_process');
const path = require('node:path');
const protoLoader = require('@grpc/proto-loader');
const {
  seedStatusToEnum,
  enumToSeedStatus,
  timestampToIso,
  parseUserId,
  toSeedPresence,
  versionOf,
  decodeJwtPayload,
} = require('../src/convert');
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

test('user ids: positive integers as Number or decimal string', () => {
  assert.equal(parseUserId(42), '42');
  assert.equal(parseUserId('42'), '42');
  assert.equal(parseUserId(' 7 '), '7');
  assert.equal(parseUserId('18446744073709551615'), '18446744073709551615');
  for (const bad of [0, -1, 1.5, NaN, '', '042', '1e3', '18446744073709551616', null, {}, [1], true]) {
    assert.equal(parseUserId(bad), null, JSON.stringify(bad));
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

function runIndex(env) {
  const child = spawn(process.execPath, [path.join(EDGE_DIR, 'src', 'index.js')], {
    env: { PATH: process.env.PATH, ...env },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  let stdout = '';
  let stderr = '';
  child.stdout.setEncoding('utf8').on('data', (c) => { stdout += c; });
  child.stderr.setEncoding('utf8').on('data', (c) => { stderr += c; });
  const exit = new Promise((resolve) => child.once('exit', (code, signal) => resolve({ code, signal })));
  return { child, exit, out: () => stdout, err: () => stderr };
}

test('npm start: EDGE_PORT=0 prints `edge listening on PORT`, SIGTERM stops it cleanly', async () => {
  const run = runIndex({ EDGE_PORT: '0', PRESENCE_TARGET: '127.0.0.1:9', EDGE_IDENTITY: 'trust-client' });
  const port = await new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`no listening line: ${run.out()} ${run.err()}`)), 10000);
    run.child.stdout.on('data', () => {
      const m = /^edge listening on (\d+)$/m.exec(run.out());
      if (m) {
        clearTimeout(timer);
        resolve(Number(m[1]));
      }
    });
  });
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

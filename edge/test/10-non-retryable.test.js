'use strict';
// Finding 2 of "Hostile and broken clients cannot hurt anyone else": the edge reopened streams
// for failures no retry can fix (INVALID_ARGUMENT, OUT_OF_RANGE…, a device label the service
// cannot decode), forever. Now such a failure of a socket's session reaches the socket once as
// presence_error { event: 'user_authenticated', code } and the session stays closed; device
// labels are sanitized before they are sent; and ids of 2^63 or more are refused as input. The
// relay stream itself, refused for such a reason (the edge's service identity), is retried only
// at the longest backoff, and each socket is told once.
const { test, before, after } = require('node:test');
const assert = require('node:assert/strict');
const grpc = require('@grpc/grpc-js');
const { startFakePresence } = require('./helpers/fake-presence');
const { connect, startTestEdge, useServiceAndEdge, eventually } = require('./helpers/clients');

const REFUSED = ['UNAUTHENTICATED', 'PERMISSION_DENIED', 'INVALID_ARGUMENT', 'OUT_OF_RANGE', 'FAILED_PRECONDITION', 'UNIMPLEMENTED'];
const FAST_BACKOFF = { initialMs: 20, maxMs: 100 }; // a retry loop shows at once
const CONTACT = 1001;
const ODD_LABEL = 1002;

const ctx = useServiceAndEdge({ contacts: [[ODD_LABEL, CONTACT]], edge: { backoff: FAST_BACKOFF } });
let fake;
let fakeEdge;

before(async () => {
  // Users 1..6 are refused with one code each; user 14 is refused once with UNAVAILABLE, then welcomed.
  const sessions = Object.fromEntries(REFUSED.map((name, i) => [String(i + 1), [grpc.status[name]]]));
  sessions['14'] = [grpc.status.UNAVAILABLE, 'welcome'];
  fake = await startFakePresence({ sessions });
  fakeEdge = await startTestEdge({ target: fake.target, identity: 'trust-client', backoff: FAST_BACKOFF });
});

after(async () => {
  if (fakeEdge) await fakeEdge.close();
  if (fake) await fake.stop();
});

test('a session refused with a non-retryable code is reported once and not reopened', async (t) => {
  const messages = [];
  for (const [i, name] of REFUSED.entries()) {
    const userId = i + 1;
    const c = await connect(fakeEdge.url, { name });
    t.after(() => c.close());
    const disconnected = new Promise((resolve) => c.socket.once('disconnect', resolve));
    c.socket.emit('user_authenticated', userId);
    const err = await c.waitFor('presence_error', (e) => e.event === 'user_authenticated');
    assert.equal(err.code, name);
    // The socket wants no session any more: no reopen timer, nothing to retry.
    await eventually(() => fakeEdge.stats().sessions === 0, { what: `${name}: no session left` });
    await new Promise((r) => setTimeout(r, 150)); // longer than any retry of FAST_BACKOFF
    assert.equal(fake.opens(userId), 1, `${name}: one open`);
    assert.equal(c.received('presence_error').length, 1, `${name}: reported once`);
    if (name === 'UNAUTHENTICATED' || name === 'PERMISSION_DENIED') {
      assert.equal(await disconnected, 'io server disconnect', `${name}: a refused credential closes the socket`);
    } else {
      assert.ok(c.socket.connected, `${name}: the socket stays`);
    }
    messages.push([name, err.message]);
  }
  for (const [name, message] of messages) assert.equal(message, `presence session refused, not retried: ${name} (scripted ${name})`);
  assert.deepEqual(fakeEdge.log.entries.filter((e) => e.msg === 'presence session ended; reopening'), []);
  assert.equal(fake.streams(), 1, 'the relay stream itself was never touched');
});

test('positive control: UNAVAILABLE is retried, and the reopened session is welcomed', async (t) => {
  const c = await connect(fakeEdge.url, { name: 'unavailable-once' });
  t.after(() => c.close());
  c.socket.emit('user_authenticated', 14);
  await eventually(() => fakeEdge.stats().ready === 1, { what: 'the reopened session' });
  assert.equal(fake.opens(14), 2);
  assert.deepEqual(c.received('presence_error'), []);
  assert.ok(fakeEdge.log.entries.some((e) => e.msg === 'presence session ended; reopening' && e.code === 'UNAVAILABLE'));
});

test("a relay stream refused for the edge's identity is logged naming the setting, told once, retried slowly", async (t) => {
  const refusing = await startFakePresence({ refuseStream: grpc.status.PERMISSION_DENIED });
  t.after(() => refusing.stop());
  const edge = await startTestEdge({ target: refusing.target, identity: 'trust-client', backoff: { initialMs: 20, maxMs: 400 } });
  t.after(() => edge.close());
  const c = await connect(edge.url, { name: 'waiting' });
  t.after(() => c.close());
  c.socket.emit('user_authenticated', 7);
  const err = await c.waitFor('presence_error', (e) => e.event === 'user_authenticated');
  assert.equal(err.code, 'PERMISSION_DENIED');
  assert.match(err.message, /refused this edge/);
  assert.doesNotMatch(err.message, /EDGE_SERVICE_TOKEN/, 'browsers are not told about the edge\'s settings');
  await eventually(() => refusing.streams() >= 3, { what: 'three attempts' });
  const refusals = edge.log.entries.filter((e) => e.level === 'error' && /^relay stream refused/.test(e.msg));
  assert.ok(refusals.length >= 2);
  assert.match(refusals[0].msg, /EDGE_SERVICE_TOKEN/);
  assert.ok(refusals.every((e) => e.delay_ms >= 200), `only the longest backoff: ${refusals.map((e) => e.delay_ms)}`);
  assert.equal(c.received('presence_error').length, 1, 'told once');
  assert.ok(c.socket.connected);
  assert.equal(edge.stats().sessions, 1, 'the socket still wants its session');
});

test('a device label with lone surrogates and control characters is cleaned, and the device comes online', async (t) => {
  const contact = await connect(ctx.edge.url, { name: 'contact' });
  t.after(() => contact.close());
  contact.socket.emit('user_authenticated', CONTACT);
  await contact.presence(ODD_LABEL, 'offline');
  // A lone surrogate cannot be encoded as UTF-8: the service cannot even decode such a Hello.
  const device = await connect(ctx.edge.url, { name: 'odd-label', auth: { device: 'phone \uD800\u0007\u200b\uDFFF' } });
  t.after(() => device.close());
  device.socket.emit('user_authenticated', ODD_LABEL);
  await contact.presence(ODD_LABEL, 'online');
  assert.deepEqual(device.received('presence_error'), []);
  assert.deepEqual(ctx.edge.log.entries.filter((e) => /(presence session|relay stream) (ended|refused)/.test(e.msg)), []);
});

test('user_authenticated with an id of 2^63 or more is refused as input, not retried against the service', async (t) => {
  const c = await connect(ctx.edge.url, { name: 'huge-id' });
  t.after(() => c.close());
  c.socket.emit('user_authenticated', '9223372036854775808');
  const err = await c.waitFor('presence_error', (e) => e.event === 'user_authenticated');
  assert.match(err.message, /positive integer below 2\^63/);
  assert.equal(ctx.edge.stats().sessions, 0);
  c.socket.emit('user_authenticated', '9223372036854775807'); // the largest id the service can store
  await eventually(() => ctx.edge.stats().ready === 1, { what: 'a stream for the largest id' });
});

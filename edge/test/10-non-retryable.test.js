'use strict';
// Finding 2 of "Hostile and broken clients cannot hurt anyone else": the edge reopened streams
// for failures no retry can fix (INVALID_ARGUMENT, OUT_OF_RANGE…, a device label the service
// cannot decode, call metadata that cannot be built), forever. Now such a failure reaches the
// socket once as presence_error { event: 'user_authenticated', code } and the stream stays closed;
// device labels are sanitized before they are sent; and ids of 2^63 or more are refused as input.
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
  const script = Object.fromEntries(REFUSED.map((name, i) => [String(i + 1), [grpc.status[name]]]));
  script['14'] = [grpc.status.UNAVAILABLE, 'welcome'];
  fake = await startFakePresence(script);
  fakeEdge = await startTestEdge({ target: fake.target, identity: 'trust-client', backoff: FAST_BACKOFF });
});

after(async () => {
  if (fakeEdge) await fakeEdge.close();
  if (fake) await fake.stop();
});

test('a stream refused with a non-retryable code is reported once and not reopened', async (t) => {
  const messages = [];
  for (const [i, name] of REFUSED.entries()) {
    const userId = i + 1;
    const c = await connect(fakeEdge.url, { name });
    t.after(() => c.close());
    c.socket.emit('user_authenticated', userId);
    const err = await c.waitFor('presence_error', (e) => e.event === 'user_authenticated');
    assert.equal(err.code, name);
    // The socket has no session left: no reopen timer, nothing to retry.
    await eventually(() => fakeEdge.stats().sessions === 0, { what: `${name}: no session left` });
    assert.equal(fake.calls(userId), 1, `${name}: one Authenticate call`);
    assert.equal(c.received('presence_error').length, 1, `${name}: reported once`);
    messages.push([name, err.message]);
  }
  for (const [name, message] of messages) assert.equal(message, `presence stream refused, not retried: ${name} (scripted ${name})`);
  assert.deepEqual(fakeEdge.log.entries.filter((e) => e.msg === 'presence stream ended; reopening'), []);
});

test('positive control: UNAVAILABLE is retried, and the reopened stream is welcomed', async (t) => {
  const c = await connect(fakeEdge.url, { name: 'unavailable-once' });
  t.after(() => c.close());
  c.socket.emit('user_authenticated', 14);
  await eventually(() => fakeEdge.stats().ready === 1, { what: 'the reopened stream' });
  assert.equal(fake.calls(14), 2);
  assert.deepEqual(c.received('presence_error'), []);
});

test('call metadata that cannot be built is reported once, not retried', async (t) => {
  // grpc-js refuses some header values by throwing; the edge validates what it sends, so force it.
  const realSet = grpc.Metadata.prototype.set;
  let attempts = 0;
  grpc.Metadata.prototype.set = function set(key, value) {
    if (key === 'x-presence-user-id' && value === '15') {
      attempts += 1;
      throw new Error('Metadata string value "15" contains illegal characters');
    }
    return realSet.call(this, key, value);
  };
  t.after(() => { grpc.Metadata.prototype.set = realSet; });
  const c = await connect(fakeEdge.url, { name: 'metadata-throws' });
  t.after(() => c.close());
  c.socket.emit('user_authenticated', 15);
  const err = await c.waitFor('presence_error', (e) => e.event === 'user_authenticated');
  assert.equal(err.code, 'INVALID_ARGUMENT');
  assert.match(err.message, /cannot build the call metadata/);
  await eventually(() => fakeEdge.stats().sessions === 0, { what: 'no session left' });
  assert.equal(attempts, 1);
  assert.equal(fake.calls(15), 0);
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
  assert.deepEqual(ctx.edge.log.entries.filter((e) => /presence stream (ended|refused)/.test(e.msg)), []);
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

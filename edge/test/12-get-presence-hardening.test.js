'use strict';
// Findings 4 and 5 of "Hostile and broken clients cannot hurt anyone else":
// 4. get_presence's in-flight counter leaked when building the call metadata threw; after four
//    throws the socket's get_presence was refused for good.
// 5. An id that is a valid uint64 but 2^63 or more (the service stores signed 64-bit ids) failed
//    the whole request (UNAVAILABLE from the service's storage); it is now skipped like any
//    other invalid id, with the warning.
const { test } = require('node:test');
const assert = require('node:assert/strict');
const grpc = require('@grpc/grpc-js');
const { connect, useServiceAndEdge } = require('./helpers/clients');

const ASKER = 1201;
const CONTACT = 1202;

const ctx = useServiceAndEdge({ contacts: [[ASKER, CONTACT]] });

async function asker(t, name) {
  const c = await connect(ctx.edge.url, { name });
  t.after(() => c.close());
  c.socket.emit('user_authenticated', ASKER);
  await c.presence(CONTACT, 'offline'); // the stream is up (Welcome snapshot)
  return c;
}

test('get_presence keeps working after building its metadata failed, more often than the in-flight limit', async (t) => {
  const c = await asker(t, 'asker');
  const realSet = grpc.Metadata.prototype.set;
  let failures = 0;
  grpc.Metadata.prototype.set = function set(key, value) {
    if (key === 'x-presence-user-id' && value === String(ASKER)) {
      failures += 1;
      throw new Error(`Metadata string value "${value}" contains illegal characters`);
    }
    return realSet.call(this, key, value);
  };
  try {
    const since = c.mark();
    for (let i = 0; i < 6; i += 1) c.socket.emit('get_presence', [CONTACT]);
    await c.waitFor('presence_error', () => c.received('presence_error', since).length === 6, { since });
    for (const e of c.received('presence_error', since)) {
      assert.equal(e.event, 'get_presence');
      assert.match(e.message, /cannot call the presence service: the x-presence-user-id metadata value/);
    }
    assert.equal(failures, 6);
  } finally {
    grpc.Metadata.prototype.set = realSet;
  }
  const since = c.mark();
  c.socket.emit('get_presence', [CONTACT]);
  assert.deepEqual(await c.waitFor('presence_info', () => true, { since }), [{ user_id: CONTACT, status: 'offline', last_seen: null }]);
});

test('ids of 2^63 or more are skipped with a warning; the rest of the request is answered', async (t) => {
  const c = await asker(t, 'asker2');
  const since = c.mark();
  const warnings = ctx.edge.log.entries.length;
  c.socket.emit('get_presence', ['9223372036854775808', CONTACT, '18446744073709551615', 'x']);
  const info = await c.waitFor('presence_info', () => true, { since });
  assert.deepEqual(info, [{ user_id: CONTACT, status: 'offline', last_seen: null }]);
  assert.deepEqual(c.received('presence_error', since), []);
  const warning = ctx.edge.log.entries.slice(warnings).find((e) => e.msg === 'get_presence: skipped invalid user ids');
  assert.equal(warning && warning.invalid, 3);
});

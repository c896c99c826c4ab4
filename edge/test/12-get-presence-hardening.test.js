'use strict';
// Findings 4 and 5 of "Hostile and broken clients cannot hurt anyone else":
// 4. get_presence's in-flight counter leaked on a failure path, and the socket's get_presence was
//    refused for good after four of them. Now every request leaves the socket's table on every
//    path (answer, refusal, timeout, session end), at most four wait at once, and a service that
//    never answers costs a presence_error after the deadline, nothing more.
// 5. An id that is a valid uint64 but 2^63 or more (the service stores signed 64-bit ids) failed
//    the whole request (UNAVAILABLE from the service's storage); it is now skipped like any
//    other invalid id, with the warning.
// And what a browser sends cannot make the edge (or its relay stream) carry without bound.
const { test } = require('node:test');
const assert = require('node:assert/strict');
const { startFakePresence } = require('./helpers/fake-presence');
const { connect, useServiceAndEdge, startTestEdge, eventually } = require('./helpers/clients');

const ASKER = 1201;
const CONTACT = 1202;

const ctx = useServiceAndEdge({ contacts: [[ASKER, CONTACT]] });

async function asker(t, name) {
  const c = await connect(ctx.edge.url, { name });
  t.after(() => c.close());
  c.socket.emit('user_authenticated', ASKER);
  await c.presence(CONTACT, 'offline'); // the session is up (Welcome snapshot)
  return c;
}

test('get_presence: at most four wait, a silent service times them out, and the socket keeps working', async (t) => {
  const fake = await startFakePresence({ answer: false });
  t.after(() => fake.stop());
  const edge = await startTestEdge({ target: fake.target, identity: 'trust-client', requestTimeoutMs: 300 });
  t.after(() => edge.close());
  const c = await connect(edge.url, { name: 'asker' });
  t.after(() => c.close());
  c.socket.emit('user_authenticated', ASKER);
  await eventually(() => edge.stats().ready === 1, { what: 'the session' });

  const since = c.mark();
  for (let i = 0; i < 6; i += 1) c.socket.emit('get_presence', [CONTACT]);
  await c.waitFor('presence_error', () => c.received('presence_error', since).length === 6, { since });
  const messages = c.received('presence_error', since).map((e) => `${e.event}: ${e.message}`);
  assert.deepEqual(messages, [
    'get_presence: too many get_presence requests in flight',
    'get_presence: too many get_presence requests in flight',
    ...Array(4).fill('get_presence: no answer from the presence service within 0.3 s'),
  ]);
  const asked = () => fake.commands.filter((m) => m.kind === 'get_presence').length;
  await eventually(() => asked() >= 4, { what: 'four get_presence at the service' });
  await new Promise((r) => setTimeout(r, 100));
  assert.equal(asked(), 4, 'four reached the service, not six');

  fake.setAnswer(true);
  const again = c.mark();
  c.socket.emit('get_presence', [CONTACT]);
  assert.deepEqual(await c.waitFor('presence_info', () => true, { since: again }), [{ user_id: CONTACT, status: 'offline', last_seen: null }]);
  assert.deepEqual(c.received('presence_error', again), []);
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

test('a browser cannot make the edge carry without bound: huge id lists, floods of opens and commands', async (t) => {
  const fake = await startFakePresence();
  t.after(() => fake.stop());
  const edge = await startTestEdge({ target: fake.target, identity: 'trust-client' });
  t.after(() => edge.close());
  const c = await connect(edge.url, { name: 'flooder' });
  t.after(() => c.close());

  // Switching users again and again (trust-client): each switch is a session opened on the
  // service; beyond the socket's command budget (burst 20) they are refused.
  for (let user = 1; user <= 40; user += 1) c.socket.emit('user_authenticated', user);
  await c.waitFor('presence_error', (e) => e.event === 'user_authenticated' && /too many requests/.test(e.message));
  await eventually(() => edge.stats().ready === 1, { what: 'the last admitted session' });
  const opens = fake.commands.filter((m) => m.kind === 'open').length;
  // 20 at once, plus the refill (four per second) while the 40 arrive.
  assert.ok(opens >= 20 && opens < 35, `${opens} sessions opened for 40 switches`);

  // Commands share that budget, refilled four per second: wait for it, then flood activity.
  await new Promise((r) => setTimeout(r, 2000));
  const since = c.mark();
  for (let i = 0; i < 40; i += 1) c.socket.emit('activity', i % 2 ? 'active' : 'idle');
  await c.waitFor('presence_error', (e) => e.event === 'activity' && /too many requests/.test(e.message), { since });
  await new Promise((r) => setTimeout(r, 200));
  const activities = fake.commands.filter((m) => m.kind === 'set_activity').length;
  assert.ok(activities >= 8 && activities < 35, `${activities} activity changes reached the service`);

  const huge = c.mark();
  c.socket.emit('get_presence', Array.from({ length: 10001 }, (_, i) => i + 1));
  const err = await c.waitFor('presence_error', (e) => e.event === 'get_presence', { since: huge });
  assert.match(err.message, /at most 10000 user ids per get_presence/);
  assert.equal(fake.commands.filter((m) => m.kind === 'get_presence').length, 0);
});

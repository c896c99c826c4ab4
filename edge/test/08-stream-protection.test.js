'use strict';
// The edge keeps a browser's session working against its own excesses: an update_status flood is
// coalesced under the service's status rate limit (over which the service refuses the change),
// and over-long device labels are trimmed to what the service accepts.
const { test } = require('node:test');
const assert = require('node:assert/strict');
const { connect, useServiceAndEdge, startTestEdge, eventually } = require('./helpers/clients');

const FLOODER = 801;
const CONTACT = 802;
const LONG_LABEL = 803;

const ctx = useServiceAndEdge({ contacts: [[FLOODER, CONTACT], [LONG_LABEL, CONTACT]] });

test('an update_status flood is coalesced; nothing is refused and the last status wins', async (t) => {
  const contact = await connect(ctx.edge.url, { name: 'contact' });
  const flooder = await connect(ctx.edge.url, { name: 'flooder' });
  t.after(() => {
    contact.close();
    flooder.close();
  });
  contact.socket.emit('user_authenticated', CONTACT);
  await contact.presence(FLOODER, 'offline');
  flooder.socket.emit('user_authenticated', FLOODER);
  await contact.presence(FLOODER, 'online');

  const since = contact.mark();
  for (let i = 0; i < 59; i += 1) flooder.socket.emit('update_status', i % 2 ? 'online' : 'away');
  flooder.socket.emit('update_status', 'busy');
  await contact.presence(FLOODER, 'busy', { since, timeout: 10000 });

  const statuses = contact.received('presence_updated', since).filter((d) => d.user_id === FLOODER).map((d) => d.status);
  t.diagnostic(`the contact saw ${statuses.length} changes: ${statuses.join(',')}`);
  assert.equal(statuses.at(-1), 'busy');
  assert.ok(!statuses.includes('offline'), 'the flooder never dropped offline');
  assert.ok(statuses.length <= 12, `${statuses.length} changes reached the service`);
  assert.deepEqual(
    ctx.edge.log.entries.filter((e) => /(presence session|relay stream) (ended|refused)/.test(e.msg)),
    [],
    'the flooder session was never ended',
  );
  assert.deepEqual(flooder.received('presence_error'), [], 'the service refused none of the changes that reached it');
  assert.equal(ctx.edge.stats().ready, 2);
});

test('a device label longer than the service accepts is trimmed, not refused', async (t) => {
  const contact = await connect(ctx.edge.url, { name: 'contact2' });
  t.after(() => contact.close());
  contact.socket.emit('user_authenticated', CONTACT);
  await contact.presence(LONG_LABEL, 'offline');
  const device = await connect(ctx.edge.url, { name: 'long-label', auth: { device: `tablet ${'é'.repeat(200)}` } });
  t.after(() => device.close());
  device.socket.emit('user_authenticated', LONG_LABEL);
  await contact.presence(LONG_LABEL, 'online');
});

test('one relay stream carries every socket\'s session, and each socket gets its own view', async (t) => {
  const small = await startTestEdge({ target: ctx.server.target, identity: 'trust-client' });
  t.after(() => small.close());
  const contact = await connect(small.url, { name: 'contact3' });
  const a = await connect(small.url, { name: 'flooder3' });
  const b = await connect(small.url, { name: 'long-label3' });
  t.after(() => {
    contact.close();
    a.close();
    b.close();
  });
  contact.socket.emit('user_authenticated', CONTACT);
  await contact.presence(FLOODER, 'offline');
  a.socket.emit('user_authenticated', FLOODER);
  b.socket.emit('user_authenticated', LONG_LABEL);
  // FLOODER's chosen status is still 'busy' from the first test: the service persists it.
  await contact.presence(FLOODER, 'busy');
  await contact.presence(LONG_LABEL, 'online');
  // A contact can learn of a device before that device's own Welcome reaches the edge.
  await eventually(() => small.stats().ready === 3, { what: 'three welcomed sessions' });
  const stats = small.stats();
  assert.deepEqual([stats.sockets, stats.sessions, stats.ready], [3, 3, 3]);
  assert.deepEqual([stats.relay.streams, stats.relay.sessions, stats.relay.opened], [1, 3, 1], 'one stream, opened once, three sessions');
  // FLOODER and LONG_LABEL are not contacts: neither heard of the other.
  assert.deepEqual(a.received('presence_updated').filter((d) => d.user_id === LONG_LABEL), []);
  assert.deepEqual(b.received('presence_updated').filter((d) => d.user_id === FLOODER), []);
});

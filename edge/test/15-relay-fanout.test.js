'use strict';
// The relay's fan-out (issue "The edge must beat the system it replaces"): the service delivers a
// change once per relay stream with the sessions that see it; the edge builds the payload once,
// socket.io encodes it once (io.to([...]).emit), and each socket still drops what is older than
// what it has. With the real service: one change seen by several sockets is one group.
const { test } = require('node:test');
const assert = require('node:assert/strict');
const { startFakePresence } = require('./helpers/fake-presence');
const { connect, startTestEdge, useServiceAndEdge, eventually } = require('./helpers/clients');

const ctx = useServiceAndEdge({ contacts: [[1501, 1511], [1501, 1512], [1501, 1513]] });

/** Counts socket.io packet encodings (one per emit, broadcast or not) of `event` on `edge`. */
function countEncodes(t, edge, event) {
  const { encoder } = edge.io.of('/').adapter;
  const real = encoder.encode;
  const counter = { n: 0 };
  encoder.encode = function encode(packet) {
    if (Array.isArray(packet.data) && packet.data[0] === event) counter.n += 1;
    return real.call(this, packet);
  };
  t.after(() => {
    encoder.encode = real;
  });
  return counter;
}

test('a group is encoded once for all its sockets; each socket drops what is stale for it', async (t) => {
  const fake = await startFakePresence();
  t.after(() => fake.stop());
  const edge = await startTestEdge({ target: fake.target, identity: 'trust-client' });
  t.after(() => edge.close());
  const clients = {};
  for (const user of [31, 32, 33, 40]) {
    clients[user] = await connect(edge.url, { name: `user ${user}` });
    t.after(() => clients[user].close());
    clients[user].socket.emit('user_authenticated', user);
  }
  await eventually(() => edge.stats().ready === 4, { what: 'four sessions' });
  const encodes = countEncodes(t, edge, 'presence_updated');
  const presence = (version, status) => ({ user_id: '40', status, version: String(version), last_seen: null });
  const sid = (u) => fake.session(u);

  // 40's own session is in the group (the service tells a user's devices about the user): the
  // edge does not send it (the seed never told a user about themselves). 999999 is no session.
  fake.send({ delivery: { groups: [{ presence: presence(5, 'STATUS_BUSY'), session_ids: [sid(31), sid(32), sid(33), sid(40), '999999'] }] } });
  for (const user of [31, 32, 33]) await clients[user].presence(40, 'busy');
  assert.equal(encodes.n, 1, 'one encode for three sockets');

  // Stale for 31 (it has version 5), new for 32; 33 is not in the delivery.
  fake.send({
    delivery: {
      groups: [
        { presence: presence(4, 'STATUS_AWAY'), session_ids: [sid(31)] },
        { presence: presence(6, 'STATUS_ONLINE'), session_ids: [sid(32)] },
      ],
    },
  });
  await clients[32].presence(40, 'online');
  // A marker delivery after them, so everything before it has been handled.
  fake.send({ delivery: { groups: [{ presence: presence(7, 'STATUS_OFFLINE'), session_ids: [sid(31), sid(33)] }] } });
  await clients[31].presence(40, 'offline');
  await clients[33].presence(40, 'offline');
  assert.deepEqual(clients[31].received('presence_updated').map((d) => d.status), ['busy', 'offline'], 'the stale away was dropped');
  assert.deepEqual(clients[32].received('presence_updated').map((d) => d.status), ['busy', 'online']);
  assert.deepEqual(clients[33].received('presence_updated').map((d) => d.status), ['busy', 'offline']);
  assert.equal(encodes.n, 3, 'the stale group was not encoded at all');
  assert.deepEqual(clients[40].received('presence_updated'), [], 'nothing about oneself');
  const stats = edge.stats();
  assert.equal(stats.dropped, 3, 'oneself, the unknown session, the stale one');
  assert.equal(stats.emitted, 6);
});

test('with the real service, a change seen by three sockets arrives as one group', async (t) => {
  const watchers = [];
  for (const user of [1511, 1512, 1513]) {
    const w = await connect(ctx.edge.url, { name: `watcher ${user}` });
    t.after(() => w.close());
    w.socket.emit('user_authenticated', user);
    await w.presence(1501, 'offline');
    watchers.push(w);
  }
  const subject = await connect(ctx.edge.url, { name: 'subject' });
  t.after(() => subject.close());
  subject.socket.emit('user_authenticated', 1501);
  for (const w of watchers) await w.presence(1501, 'online');
  await eventually(() => ctx.edge.stats().ready === 4, { what: 'four sessions' });

  const encodes = countEncodes(t, ctx.edge, 'presence_updated');
  const before = ctx.edge.stats().relay;
  subject.socket.emit('update_status', 'busy');
  for (const w of watchers) await w.presence(1501, 'busy');
  const after = ctx.edge.stats().relay;
  assert.deepEqual(subject.received('presence_updated').filter((d) => d.user_id === 1501), [], 'nothing about oneself');
  t.diagnostic(`deliveries ${after.deliveries - before.deliveries}, groups ${after.groups - before.groups}, encodes ${encodes.n}`);
  assert.ok(after.groups - before.groups <= 2, `the three watchers share one group (the subject's own view may be another): ${after.groups - before.groups}`);
  assert.ok(encodes.n <= 2, `at most one encode per group: ${encodes.n}`);
});

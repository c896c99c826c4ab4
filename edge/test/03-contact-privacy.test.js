'use strict';
// 3. A contact receives presence_updated in the seed's exact shape; a non-contact receives nothing.
const { test } = require('node:test');
const assert = require('node:assert/strict');
const { connect, useServiceAndEdge, ISO_MS } = require('./helpers/clients');

const USER = 301;
const CONTACT = 302;
const STRANGER = 303;

const ctx = useServiceAndEdge({ contacts: [[USER, CONTACT]] });

function assertSeedShape(d) {
  assert.deepEqual(Object.keys(d).sort(), ['last_seen', 'status', 'user_id']);
  assert.equal(typeof d.user_id, 'number');
  assert.ok(['online', 'offline', 'away', 'busy'].includes(d.status), d.status);
  assert.ok(d.last_seen === null || ISO_MS.test(d.last_seen), `last_seen ${d.last_seen}`);
}

test('contacts get presence_updated in the seed shape; strangers get nothing', async (t) => {
  const contact = await connect(ctx.edge.url, { name: 'contact' });
  const stranger = await connect(ctx.edge.url, { name: 'stranger' });
  t.after(() => {
    contact.close();
    stranger.close();
  });
  contact.socket.emit('user_authenticated', CONTACT);
  stranger.socket.emit('user_authenticated', STRANGER);
  const snapshot = await contact.presence(USER, 'offline');
  assertSeedShape(snapshot);
  assert.deepEqual(snapshot, { user_id: USER, status: 'offline', last_seen: null });
  await ctx.svc.waitForConnections(2); // the stranger's stream is live too

  const user = await connect(ctx.edge.url, { name: 'user' });
  t.after(() => user.close());
  user.socket.emit('user_authenticated', USER);
  const online = await contact.presence(USER, 'online');
  assertSeedShape(online);
  assert.equal(online.user_id, USER);

  user.socket.emit('update_status', 'busy');
  assertSeedShape(await contact.presence(USER, 'busy'));
  user.socket.emit('update_status', 'away');
  assertSeedShape(await contact.presence(USER, 'away'));

  // The user sees their contact through their own Welcome snapshot, in the same shape.
  assertSeedShape(await user.presence(CONTACT, 'online'));

  // The contact got every change above; the stranger, whose stream is just as live, got none.
  assert.deepEqual(stranger.received('presence_updated'), []);
  assert.deepEqual(
    contact.received('presence_updated').filter((d) => d.user_id === USER).map((d) => d.status),
    ['offline', 'online', 'busy', 'away'],
  );
  assert.deepEqual(user.received('presence_updated').filter((d) => d.user_id === STRANGER), []);
});

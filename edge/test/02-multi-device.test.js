'use strict';
// 2. The seed's multi-device table, through two socket.io clients of one user, as seen by a
//    contact:
//    | Open app on phone   | [socket1]          | Online                     |
//    | Open app on laptop  | [socket1, socket2] | Online (no event)          |
//    | Close phone app     | [socket2]          | Online (no event)          |
//    | Close laptop app    | []                 | Offline (last_seen saved)  |
// "No event" is asserted after a positive control: another contact's status change reaches the
// watcher, and only then do we check that nothing about the user arrived meanwhile.
const { test } = require('node:test');
const assert = require('node:assert/strict');
const { connect, useServiceAndEdge, ISO_MS } = require('./helpers/clients');

const USER = 201;
const WATCHER = 202; // contact of USER
const CONTROL = 203; // another contact of WATCHER, for positive controls

const ctx = useServiceAndEdge({ contacts: [[USER, WATCHER], [CONTROL, WATCHER]] });

async function openDevice(userId, name) {
  const c = await connect(ctx.edge.url, { name });
  c.socket.emit('user_authenticated', userId);
  return c;
}

test('multi-device: online with the first device, offline only when the last one leaves', async (t) => {
  const started = Date.now();
  const watcher = await openDevice(WATCHER, 'watcher');
  t.after(() => watcher.close());
  // Welcome snapshot: both contacts, never seen.
  await watcher.presence(USER, 'offline');
  await watcher.presence(CONTROL, 'offline');
  const control = await openDevice(CONTROL, 'control');
  t.after(() => control.close());
  await watcher.presence(CONTROL, 'online');

  let controlStatuses = ['busy', 'away', 'busy', 'away'];
  /** Positive control: a status change of CONTROL reaches the watcher. */
  async function controlEventArrives() {
    const status = controlStatuses.shift();
    const since = watcher.mark();
    control.socket.emit('update_status', status);
    await watcher.presence(CONTROL, status, { since });
  }
  const aboutUser = (since) => watcher.received('presence_updated', since).filter((d) => d.user_id === USER);

  // 1. Open app on phone → contact sees Online.
  let since = watcher.mark();
  const phone = await openDevice(USER, 'phone');
  t.after(() => phone.close());
  const online = await watcher.presence(USER, 'online', { since });
  assert.deepEqual(Object.keys(online).sort(), ['last_seen', 'status', 'user_id']);
  await ctx.svc.waitForConnections(3);

  // 2. Open app on laptop → no event.
  since = watcher.mark();
  const laptop = await openDevice(USER, 'laptop');
  t.after(() => laptop.close());
  await laptop.presence(WATCHER, 'online'); // the laptop's own Welcome: its stream is live
  await ctx.svc.waitForConnections(4);
  await controlEventArrives();
  assert.deepEqual(aboutUser(since), [], 'the watcher got an event when the second device opened');

  // 3. Close phone app → still online, no event.
  since = watcher.mark();
  phone.close();
  await ctx.svc.waitForConnections(3); // the service saw the phone leave
  await controlEventArrives();
  assert.deepEqual(aboutUser(since), [], 'the watcher got an event when one of two devices closed');

  // 4. Close laptop app → Offline with last_seen.
  since = watcher.mark();
  laptop.close();
  const offline = await watcher.presence(USER, 'offline', { since });
  assert.deepEqual(Object.keys(offline).sort(), ['last_seen', 'status', 'user_id']);
  assert.equal(offline.user_id, USER);
  assert.equal(typeof offline.last_seen, 'string');
  assert.match(offline.last_seen, ISO_MS);
  const lastSeen = Date.parse(offline.last_seen);
  assert.ok(lastSeen >= started - 1000 && lastSeen <= Date.now() + 1000, `last_seen ${offline.last_seen} is not now`);
  await ctx.svc.waitForConnections(2);
  assert.deepEqual(aboutUser(since).map((d) => d.status), ['offline']);
});

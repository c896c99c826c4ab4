'use strict';
// 4. get_presence → presence_info in the seed's shape:
//    [{ user_id, status: 'online'|'offline'|'away'|'busy', last_seen: ISO string or null }]
const { test } = require('node:test');
const assert = require('node:assert/strict');
const { connect, useServiceAndEdge, ISO_MS } = require('./helpers/clients');

const ASKER = 401;
const AWAY = 402; // contact, online then away
const NEVER = 403; // contact, never seen
const GONE = 404; // contact, was online, now offline
const STRANGER = 405; // not a contact, online

const ctx = useServiceAndEdge({ contacts: [[ASKER, AWAY], [ASKER, NEVER], [ASKER, GONE]] });

async function openDevice(userId, name) {
  const c = await connect(ctx.edge.url, { name });
  c.socket.emit('user_authenticated', userId);
  return c;
}

test('get_presence answers presence_info in the seed shape, one per id, in request order', async (t) => {
  const asker = await openDevice(ASKER, 'asker');
  t.after(() => asker.close());
  await asker.presence(GONE, 'offline'); // Welcome snapshot

  const away = await openDevice(AWAY, 'away');
  const gone = await openDevice(GONE, 'gone');
  const stranger = await openDevice(STRANGER, 'stranger');
  t.after(() => {
    away.close();
    stranger.close();
  });
  await asker.presence(AWAY, 'online');
  await asker.presence(GONE, 'online');
  away.socket.emit('update_status', 'away');
  await asker.presence(AWAY, 'away');
  const beforeGone = asker.mark();
  gone.close();
  await asker.presence(GONE, 'offline', { since: beforeGone });
  await ctx.svc.waitForConnections(3);

  const since = asker.mark();
  asker.socket.emit('get_presence', [AWAY, NEVER, GONE, STRANGER, AWAY]);
  const info = await asker.waitFor('presence_info', () => true, { since });
  t.diagnostic(`presence_info: ${JSON.stringify(info)}`);
  assert.ok(Array.isArray(info));
  for (const u of info) {
    assert.deepEqual(Object.keys(u).sort(), ['last_seen', 'status', 'user_id']);
    assert.equal(typeof u.user_id, 'number');
  }
  assert.deepEqual(info.map((u) => u.user_id), [AWAY, NEVER, GONE, STRANGER]);
  assert.equal(info[0].status, 'away');
  assert.ok(info[0].last_seen === null || ISO_MS.test(info[0].last_seen));
  assert.deepEqual(info[1], { user_id: NEVER, status: 'offline', last_seen: null });
  assert.equal(info[2].status, 'offline');
  assert.match(info[2].last_seen, ISO_MS);
  // Not a contact: the default privacy (contacts only) hides both online status and last_seen.
  assert.deepEqual(info[3], { user_id: STRANGER, status: 'offline', last_seen: null });

  // What the asker's contacts see of the asker, through the same event.
  const back = away.mark();
  away.socket.emit('get_presence', [ASKER]);
  const [me] = await away.waitFor('presence_info', () => true, { since: back });
  assert.equal(me.user_id, ASKER);
  assert.equal(me.status, 'online');
});

test('bad input is refused with presence_error, never crashes the edge', async (t) => {
  const c = await openDevice(ASKER, 'asker2');
  t.after(() => c.close());
  let since = c.mark();
  c.socket.emit('get_presence', 'not-an-array');
  const e1 = await c.waitFor('presence_error', (e) => e.event === 'get_presence', { since });
  assert.match(e1.message, /array/);
  since = c.mark();
  c.socket.emit('update_status', 'dancing');
  await c.waitFor('presence_error', (e) => e.event === 'update_status', { since });
  assert.ok(ctx.edge.log.entries.some((e) => e.level === 'warn' && /update_status ignored/.test(e.msg)));
  // Invalid ids are skipped, the valid ones answered; an empty list answers [].
  since = c.mark();
  c.socket.emit('get_presence', [{}, -1, 'x', NEVER]);
  assert.deepEqual(await c.waitFor('presence_info', () => true, { since }), [
    { user_id: NEVER, status: 'offline', last_seen: null },
  ]);
  since = c.mark();
  c.socket.emit('get_presence', []);
  assert.deepEqual(await c.waitFor('presence_info', () => true, { since }), []);
  // Before user_authenticated there is no user to ask as.
  const anon = await connect(ctx.edge.url, { name: 'anon' });
  t.after(() => anon.close());
  anon.socket.emit('get_presence', [ASKER]);
  anon.socket.emit('update_status', 'away');
  await anon.waitFor('presence_error', (e) => e.event === 'get_presence');
  await anon.waitFor('presence_error', (e) => e.event === 'update_status');
  assert.deepEqual(anon.received('presence_info'), []);
  // Still serving.
  since = c.mark();
  c.socket.emit('get_presence', [ASKER]);
  assert.equal((await c.waitFor('presence_info', () => true, { since }))[0].status, 'online');
});

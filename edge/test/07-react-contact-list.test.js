'use strict';
// 7. The seed's "Complete React Example" (test/fixtures/seed-react-example.jsx): the ContactList
//    effect's event handling, copied into a plain Node harness. useState is emulated; the
//    handlers are the seed's, line for line (only the URL is the test edge's instead of
//    http://localhost:3000, and `io` is socket.io-client as in the seed's import).
const { test } = require('node:test');
const assert = require('node:assert/strict');
const { io } = require('socket.io-client');
const { connect, useServiceAndEdge, eventually, ISO_MS } = require('./helpers/clients');

const ME = 701;
const FRIEND = 702; // online, then away
const OLD_FRIEND = 703; // was online, now offline; comes back later
const NEW_FRIEND = 704; // never seen

const ctx = useServiceAndEdge({ contacts: [[ME, FRIEND], [ME, OLD_FRIEND], [ME, NEW_FRIEND]] });

/** The seed's useState, enough for the effect: a value plus a setter taking a value or an updater. */
function useStateHarness(initial) {
  const cell = { value: initial, renders: 0 };
  const set = (next) => {
    cell.value = typeof next === 'function' ? next(cell.value) : next;
    cell.renders += 1;
  };
  return [cell, set];
}

/** The seed's ContactList useEffect body, verbatim apart from the URL. */
function contactListEffect({ url, contacts, currentUserId, setSocket, setPresenceMap }) {
  // Initialize socket
  const newSocket = io(url);
  setSocket(newSocket);

  // Authenticate
  newSocket.emit('user_authenticated', currentUserId);

  // Listen for presence updates
  newSocket.on('presence_updated', (data) => {
    setPresenceMap(prev => ({
      ...prev,
      [data.user_id]: {
        status: data.status,
        lastSeen: data.last_seen
      }
    }));
  });

  // Request initial presence
  const contactIds = contacts.map(c => c.id);
  newSocket.emit('get_presence', contactIds);

  newSocket.on('presence_info', (users) => {
    const map = {};
    users.forEach(u => {
      map[u.user_id] = { status: u.status, lastSeen: u.last_seen };
    });
    setPresenceMap(map);
  });

  return () => newSocket.close();
}

// The seed's ContactItem display logic, as text instead of JSX.
function formatRelativeTime(timestamp) {
  const now = new Date();
  const then = new Date(timestamp);
  const diffMs = now - then;
  const diffMins = Math.floor(diffMs / 60000);
  if (diffMins < 1) return 'just now';
  if (diffMins < 60) return `${diffMins}m ago`;
  const diffHours = Math.floor(diffMins / 60);
  if (diffHours < 24) return `${diffHours}h ago`;
  const diffDays = Math.floor(diffHours / 24);
  return `${diffDays}d ago`;
}
function getStatusDisplay(presence) {
  if (!presence) return '';
  if (presence.status === 'online') return 'Online';
  const lastSeenText = formatRelativeTime(presence.lastSeen);
  return `Last seen ${lastSeenText}`;
}

test('the seed React ContactList effect fills and updates its presence map', async (t) => {
  // Before the component mounts: FRIEND is online, OLD_FRIEND came and went.
  const friend = await connect(ctx.edge.url, { name: 'friend' });
  t.after(() => friend.close());
  friend.socket.emit('user_authenticated', FRIEND);
  const old = await connect(ctx.edge.url, { name: 'old-friend' });
  old.socket.emit('user_authenticated', OLD_FRIEND);
  await ctx.svc.waitForConnections(2);
  old.close();
  await ctx.svc.waitForConnections(1);

  const contacts = [
    { id: FRIEND, name: 'Friend', profile_pic: '' },
    { id: OLD_FRIEND, name: 'Old friend', profile_pic: '' },
    { id: NEW_FRIEND, name: 'New friend', profile_pic: '' },
  ];
  const [socketCell, setSocket] = useStateHarness(null);
  const [presence, setPresenceMap] = useStateHarness({});
  const cleanup = contactListEffect({ url: ctx.edge.url, contacts, currentUserId: ME, setSocket, setPresenceMap });
  t.after(cleanup);
  assert.ok(socketCell.value);
  // Test instrumentation only: which events reached the component's socket.
  const seen = [];
  socketCell.value.onAny((event) => seen.push(event));

  // Initial render data: the presence_info answer and the Welcome snapshot (3 contacts).
  await eventually(
    () => seen.includes('presence_info') && seen.filter((e) => e === 'presence_updated').length >= 3,
    { what: 'presence_info and the Welcome snapshot to reach the component' },
  );
  const map = presence.value;
  t.diagnostic(`presenceMap: ${JSON.stringify(map)}`);
  assert.deepEqual(Object.keys(map).sort(), [String(FRIEND), String(OLD_FRIEND), String(NEW_FRIEND)]);
  assert.equal(map[OLD_FRIEND].status, 'offline');
  assert.match(map[OLD_FRIEND].lastSeen, ISO_MS);
  assert.deepEqual(map[NEW_FRIEND], { status: 'offline', lastSeen: null });
  assert.equal(getStatusDisplay(map[FRIEND]), 'Online');
  assert.equal(getStatusDisplay(map[OLD_FRIEND]), 'Last seen just now');

  // Live updates merge into the map.
  friend.socket.emit('update_status', 'away');
  await eventually(() => presence.value[FRIEND]?.status === 'away', { what: 'FRIEND away in the map' });
  const back = await connect(ctx.edge.url, { name: 'old-friend-back' });
  t.after(() => back.close());
  back.socket.emit('user_authenticated', OLD_FRIEND);
  await eventually(() => presence.value[OLD_FRIEND]?.status === 'online', { what: 'OLD_FRIEND online in the map' });
  assert.equal(getStatusDisplay(presence.value[OLD_FRIEND]), 'Online');
  assert.equal(presence.value[NEW_FRIEND].status, 'offline');
  assert.deepEqual(Object.keys(presence.value).sort(), [String(FRIEND), String(OLD_FRIEND), String(NEW_FRIEND)]);
});

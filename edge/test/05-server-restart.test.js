'use strict';
// 5. The Rust service restarts (SIGTERM, then again on the same database and port): the edge
//    reopens its relay stream with backoff and a session for each socket on it, browsers stay
//    connected, presence resumes.
const { test, after } = require('node:test');
const assert = require('node:assert/strict');
const { startPresenceServer, serviceClients, freePort } = require('./helpers/presence-server');
const { connect, startTestEdge, eventually } = require('./helpers/clients');

const USER = 501;
const CONTACT = 502;

let server;
let svc;
let edge;

after(async () => {
  if (edge) await edge.close();
  if (svc) svc.close();
  if (server) await server.destroy();
});

test('edge reconnects after a presence service restart and presence flows again', async (t) => {
  const port = await freePort();
  server = await startPresenceServer({ listen: `127.0.0.1:${port}` });
  assert.equal(server.port, port);
  svc = serviceClients(server.target);
  await svc.addContacts([[USER, CONTACT]]);
  edge = await startTestEdge({ target: server.target, identity: 'trust-client' });

  const contact = await connect(edge.url, { name: 'contact' });
  const user = await connect(edge.url, { name: 'user' });
  t.after(() => contact.close());
  contact.socket.emit('user_authenticated', CONTACT);
  await contact.presence(USER, 'offline');
  user.socket.emit('user_authenticated', USER);
  await contact.presence(USER, 'online');
  let disconnects = 0;
  contact.socket.on('disconnect', () => { disconnects += 1; });
  user.socket.on('disconnect', () => { disconnects += 1; });

  // Stop the service: the relay stream (and every session on it) ends with UNAVAILABLE.
  const stopped = await server.stop('SIGTERM');
  t.diagnostic(`server stopped: ${JSON.stringify(stopped)}`);
  // The service ends relay streams when it shuts down (UNAVAILABLE), and the edge ends its own
  // on GOAWAY anyway: either way the service does not wait for its whole shutdown deadline (and
  // get killed by stop()).
  assert.deepEqual(stopped, { code: 0, signal: null }, 'the service stopped cleanly, not at its deadline');
  await eventually(() => edge.stats().ready === 0 && edge.stats().relay.streams === 0, { what: 'the edge to notice the stream ended' });
  assert.equal(edge.stats().sessions, 2, 'sockets keep wanting their sessions');
  assert.ok(contact.socket.connected && user.socket.connected, 'browsers stay connected');
  // Stay down long enough that the stream fails to reopen a few times (backoff grows).
  const reopening = () => edge.log.entries.filter((e) => e.msg === 'relay stream ended; reopening');
  await eventually(() => reopening().some((e) => e.attempt >= 3), { timeout: 15000, what: 'three reopen attempts' });
  const delays = reopening().map((e) => e.delay_ms);
  t.diagnostic(`reopen delays while the service was down (ms): ${delays.join(', ')}`);
  assert.ok(delays.at(-1) > delays[0], `the backoff grows: ${delays.join(', ')}`);
  const restartMark = contact.mark();
  // A get_presence while the service is down waits for the next session (within its deadline).
  contact.socket.emit('get_presence', [USER]);

  // Start it again on the same database file and port.
  const dir = server.dir;
  server = await startPresenceServer({ listen: `127.0.0.1:${port}`, dir });
  svc.close();
  svc = serviceClients(server.target);
  await eventually(() => edge.stats().ready === 2, { timeout: 20000, what: 'the edge to reopen both sessions' });
  await svc.waitForConnections(2);
  assert.ok(edge.log.entries.some((e) => e.msg === 'relay stream reopened'));
  assert.equal(edge.stats().relay.streams, 1, 'one relay stream carries both sessions');

  t.diagnostic(`contact events across the restart: ${JSON.stringify(contact.received('presence_updated', restartMark))}`);
  // (Answered as things are when the contact's session reopens: the user's may reopen after it.)
  const early = await contact.waitFor('presence_info', () => true, { since: restartMark });
  assert.deepEqual(early.map((u) => u.user_id), [USER], 'the get_presence sent while the service was down was answered');
  assert.deepEqual(contact.received('presence_error', restartMark), []);
  // Presence resumes: the contact sees the user online again…
  let since = contact.mark();
  contact.socket.emit('get_presence', [USER]);
  const [seen] = await contact.waitFor('presence_info', () => true, { since });
  assert.equal(seen.status, 'online');
  // …and changes flow again, both ways.
  since = contact.mark();
  user.socket.emit('update_status', 'busy');
  await contact.presence(USER, 'busy', { since });
  since = user.mark();
  contact.socket.emit('update_status', 'away');
  await user.presence(CONTACT, 'away', { since });
  since = contact.mark();
  user.close();
  await contact.presence(USER, 'offline', { since });
  assert.equal(disconnects, 1, 'only the socket we closed disconnected'); // user.close() itself
});

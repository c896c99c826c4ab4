'use strict';
// 5. The Rust service restarts (SIGTERM, then again on the same database and port): the edge
//    reopens its streams with backoff, browsers stay connected, presence resumes.
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

  // Stop the service: every stream ends with UNAVAILABLE.
  const stopped = await server.stop('SIGTERM');
  t.diagnostic(`server stopped: ${JSON.stringify(stopped)}`);
  await eventually(() => edge.stats().ready === 0, { what: 'the edge to notice the streams ended' });
  assert.equal(edge.stats().sessions, 2, 'sessions stay while their sockets do');
  assert.ok(contact.socket.connected && user.socket.connected, 'browsers stay connected');
  // Stay down long enough that every stream fails to reopen a few times (backoff grows).
  const attempts = () =>
    edge.log.entries.filter((e) => e.msg === 'presence stream ended; reopening' && e.attempt >= 3).length;
  await eventually(() => attempts() >= 2, { timeout: 15000, what: 'three reopen attempts per stream' });
  const delays = edge.log.entries.filter((e) => e.msg === 'presence stream ended; reopening').map((e) => e.delay_ms);
  t.diagnostic(`reopen delays while the service was down (ms): ${delays.join(', ')}`);
  const restartMark = contact.mark();

  // Start it again on the same database file and port.
  const dir = server.dir;
  server = await startPresenceServer({ listen: `127.0.0.1:${port}`, dir });
  svc.close();
  svc = serviceClients(server.target);
  await eventually(() => edge.stats().ready === 2, { timeout: 20000, what: 'the edge to reopen both streams' });
  await svc.waitForConnections(2);
  assert.ok(edge.log.entries.some((e) => e.msg === 'presence stream reopened'));

  t.diagnostic(`contact events across the restart: ${JSON.stringify(contact.received('presence_updated', restartMark))}`);
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

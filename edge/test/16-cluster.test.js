'use strict';
// Several edge processes behind one port (EDGE_WORKERS=2, as `npm start` runs it): sticky
// sessions keep HTTP long-polling sockets on the worker that holds them, sockets on different
// workers see each other's presence (through the service: workers share nothing), each worker
// has one relay stream, /healthz sums the workers, a killed worker is replaced, and SIGTERM stops
// them all.
const { test, before, after } = require('node:test');
const assert = require('node:assert/strict');
const fs = require('node:fs');
const { startPresenceServer, serviceClients } = require('./helpers/presence-server');
const { runIndex, listeningPort, stopIndex } = require('./helpers/edge-process');
const { connect, eventually } = require('./helpers/clients');
const { rawConnect } = require('./helpers/raw-ws');

const A = 1601; // contact of B and C
const B = 1602;
const C = 1603;
const D = 1604; // contact of A, joins after a worker died

let server;
let svc;
let edge;
let url;

before(async () => {
  server = await startPresenceServer();
  svc = serviceClients(server.target);
  await svc.addContacts([[A, B], [A, C], [A, D]]);
  edge = runIndex({ EDGE_PORT: '0', EDGE_WORKERS: '2', EDGE_IDENTITY: 'trust-client', PRESENCE_TARGET: server.target, EDGE_LOG_LEVEL: 'debug' });
  url = `http://127.0.0.1:${await listeningPort(edge, 20000)}`;
});

after(async () => {
  if (edge) await stopIndex(edge);
  if (svc) svc.close();
  if (server) await server.destroy();
});

const health = async () => (await fetch(`${url}/healthz`)).json();
const alive = (pid) => {
  try {
    process.kill(pid, 0);
    return true;
  } catch {
    return false;
  }
};

test('two workers behind one port: sticky polling, presence across workers, one relay stream each', async (t) => {
  // Polling only (every poll a new request: the primary must route it to the same worker), the
  // seed's default (polling, then WebSocket), and WebSocket only.
  const a = await connect(url, { name: 'A polling', transports: ['polling'] });
  const b = await connect(url, { name: 'B default' });
  const c = await connect(url, { name: 'C websocket', transports: ['websocket'] });
  t.after(() => [a, b, c].forEach((x) => x.close()));
  a.socket.emit('user_authenticated', A);
  await a.presence(B, 'offline');
  b.socket.emit('user_authenticated', B);
  c.socket.emit('user_authenticated', C);
  await a.presence(B, 'online');
  await a.presence(C, 'online');

  const h = await health();
  t.diagnostic(JSON.stringify(h));
  assert.equal(h.status, 'ok');
  assert.equal(h.workers, 2);
  assert.equal(h.sockets, 3);
  assert.equal(h.relay_streams, 2, 'one relay stream per worker');
  const workers = h.processes.filter((p) => p.role !== 'primary');
  assert.equal(workers.length, 2);
  assert.ok(workers.every((w) => w.sockets >= 1), `both workers hold sockets: ${workers.map((w) => w.sockets)}`);
  assert.ok(workers.every((w) => w.relay.streams === 1 && w.relay.opened === 1));
  assert.ok(h.rss > 0);
  // Workers run with a smaller young generation (EDGE_WORKER_SEMI_SPACE_MB, default 4).
  for (const w of workers) {
    const cmdline = fs.readFileSync(`/proc/${w.pid}/cmdline`, 'utf8').split('\0');
    assert.ok(cmdline.includes('--max-semi-space-size=4'), cmdline.join(' '));
  }

  // Both ways, whichever worker each socket is on; the polling socket sends with POSTs.
  b.socket.emit('update_status', 'busy');
  await a.presence(B, 'busy');
  a.socket.emit('update_status', 'away');
  await b.presence(A, 'away');
  await c.presence(A, 'away');
  const polls = a.socket.io.engine.transport.name;
  assert.equal(polls, 'polling', 'A never upgraded');
  assert.equal(b.socket.io.engine.transport.name, 'websocket', 'B upgraded');
  assert.deepEqual([...a.received('presence_error'), ...b.received('presence_error'), ...c.received('presence_error')], []);
});

test('hundreds of WebSocket sockets connect one after the other, none lost in the hand-over to a worker', async () => {
  // Each client answers the worker's engine.io OPEN at once; the primary must not read (and lose)
  // that answer while it hands the connection over.
  for (let i = 0; i < 300; i += 1) (await rawConnect(url)).destroy();
});

test('hundreds of polling sessions post the moment their handshake is answered, each to the worker that holds it', async () => {
  // A polling client's first POST (its socket.io CONNECT) is a new request with the new sid: the
  // primary must already know which worker made that sid, or it goes to the other one, which
  // answers "Session ID unknown" (the client sees "xhr post error").
  const base = `${url}/socket.io/?EIO=4&transport=polling`;
  const failures = [];
  for (let i = 0; i < 200; i += 1) {
    const open = await (await fetch(base)).text();
    const { sid } = JSON.parse(open.slice(1));
    const post = await fetch(`${base}&sid=${sid}`, { method: 'POST', body: '40' });
    const answer = await post.text();
    if (post.status !== 200 || answer !== 'ok') failures.push(`${i}: ${post.status} ${answer}`);
    // Closed at once (engine.io CLOSE), so the workers do not keep 200 sessions.
    await (await fetch(`${base}&sid=${sid}`, { method: 'POST', body: '1' })).text();
  }
  assert.deepEqual(failures, []);
});

test('a killed worker is replaced; the other worker\'s sockets are untouched', async (t) => {
  const a = await connect(url, { name: 'A again', transports: ['websocket'] });
  t.after(() => a.close());
  a.socket.emit('user_authenticated', A);
  await a.presence(B);
  const h = await health();
  const mine = h.processes.find((p) => p.role !== 'primary' && p.sockets >= 1);
  const other = h.processes.find((p) => p.role !== 'primary' && p.pid !== mine.pid);
  process.kill(other.pid, 'SIGKILL');
  await eventually(
    async () => {
      const now = await health();
      const pids = now.processes.filter((p) => p.role !== 'primary' && p.pid).map((p) => p.pid);
      return now.workers === 2 && pids.length === 2 && !pids.includes(other.pid) && now.relay_streams === 2;
    },
    { timeout: 15000, what: 'a new worker with its relay stream' },
  );
  assert.ok(!alive(other.pid));
  assert.ok(a.socket.connected, 'the socket on the surviving worker stays');
  assert.match(edge.err(), /edge worker exited; starting another/);
  // New sockets land on either worker and work.
  const d = await connect(url, { name: 'D', transports: ['polling'] });
  const d2 = await connect(url, { name: 'D2', transports: ['polling'] });
  t.after(() => {
    d.close();
    d2.close();
  });
  const since = a.mark();
  d.socket.emit('user_authenticated', D);
  await a.presence(D, 'online', { since });
  d2.socket.emit('user_authenticated', D);
  await d2.presence(A, 'away'); // A chose away in the first test: the service keeps it
});

test('SIGTERM stops the primary and every worker, exit status 0, stdout only the listening line', async () => {
  const pids = (await health()).processes.map((p) => p.pid).filter(Boolean);
  assert.equal(pids.length, 3);
  edge.child.kill('SIGTERM');
  assert.deepEqual(await edge.exit, { code: 0, signal: null });
  await eventually(() => pids.every((pid) => !alive(pid)), { what: 'every worker gone' });
  assert.equal(edge.out().trim().split('\n').length, 1);
  await svc.waitForConnections(0);
  edge = null;
});

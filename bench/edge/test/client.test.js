'use strict';
// The lean client against a real socket.io 4 server: events both ways, heartbeats answered,
// long frames, server-side disconnects; and the official client through the same interface.
const test = require('node:test');
const assert = require('node:assert');
const http = require('node:http');
const { Server } = require('socket.io');
const { connect, CLIENTS } = require('../load/client');

async function startServer(t) {
  const httpServer = http.createServer();
  // Heartbeats every 50 ms: a client that does not answer is dropped within 150 ms.
  const io = new Server(httpServer, { pingInterval: 50, pingTimeout: 100 });
  io.on('connection', (socket) => {
    socket.on('echo', (arg) => socket.emit('echoed', arg));
    socket.on('kick', () => socket.disconnect(true));
  });
  await new Promise((r) => httpServer.listen(0, '127.0.0.1', r));
  t.after(() => new Promise((r) => io.close(() => r())));
  return `http://127.0.0.1:${httpServer.address().port}`;
}

function waitFor(predicate, ms = 3000) {
  const deadline = Date.now() + ms;
  return new Promise((resolve, reject) => {
    const poll = () => {
      if (predicate()) resolve();
      else if (Date.now() > deadline) reject(new Error('timed out'));
      else setTimeout(poll, 10);
    };
    poll();
  });
}

for (const kind of Object.keys(CLIENTS)) {
  test(`${kind}: events both ways, any frame length, heartbeats answered`, async (t) => {
    const url = await startServer(t);
    const got = [];
    let disconnected = false;
    const c = await connect(kind, url, {
      onEvent: (name, arg) => got.push([name, arg]),
      onDisconnect: () => (disconnected = true),
    });
    const small = { user_id: 7, status: 'away' };
    const medium = 'm'.repeat(300); // 16-bit length
    const large = 'l'.repeat(70000); // 64-bit length
    for (const v of [small, medium, large]) c.emit('echo', v);
    await waitFor(() => got.length === 3);
    assert.deepStrictEqual(got, [['echoed', small], ['echoed', medium], ['echoed', large]], 'every event, in order');
    await new Promise((r) => setTimeout(r, 400));
    assert.strictEqual(disconnected, false, 'pings are answered, so the server keeps the socket');
    c.emit('kick');
    await waitFor(() => disconnected);
  });
}

test('lean: a refused connection rejects', async () => {
  await assert.rejects(connect('lean', 'http://127.0.0.1:1', { onEvent() {}, onDisconnect() {} }));
});

'use strict';
// 1. The seed's "Manual Testing with Socket.io Client" snippet, unchanged
//    (test/fixtures/seed-manual-testing.js), against the edge on the seed's port 3000 in
//    trust-client mode. It prints what the seed documentation says it prints.
const { test } = require('node:test');
const assert = require('node:assert/strict');
const { spawn } = require('node:child_process');
const fs = require('node:fs');
const path = require('node:path');
const { EDGE_DIR } = require('./helpers/presence-server');
const { connect, useServiceAndEdge, ISO_MS } = require('./helpers/clients');

const SNIPPET = path.join(__dirname, 'fixtures', 'seed-manual-testing.js');
const SEED_DOC = process.env.SEED_DOC || path.resolve(EDGE_DIR, '..', '..', 'shared', 'seed', 'presence-system.md');

// User 1 has chatted with 2 and 3; 4 is a stranger. The snippet hard-codes http://localhost:3000,
// the seed's port (trust-client mode listens on 127.0.0.1 by default).
const ctx = useServiceAndEdge({ contacts: [[1, 2], [1, 3]], edge: { port: 3000, host: undefined } });

test('the fixture is the seed documentation snippet, byte for byte', (t) => {
  if (!fs.existsSync(SEED_DOC)) {
    t.skip(`seed documentation not found at ${SEED_DOC} (set SEED_DOC)`);
    return;
  }
  const doc = fs.readFileSync(SEED_DOC, 'utf8');
  const m = /### Manual Testing with Socket\.io Client\n\n```javascript\n([\s\S]*?)```/.exec(doc);
  assert.ok(m, 'snippet not found in the seed documentation');
  assert.equal(fs.readFileSync(SNIPPET, 'utf8'), m[1]);
});

test('seed manual-testing snippet runs unchanged and logs presence', async (t) => {
  assert.equal(ctx.edge.port, 3000);
  // User 2 is online (on another device) before the snippet starts.
  const two = await connect(ctx.edge.url, { name: 'user2' });
  t.after(() => two.close());
  two.socket.emit('user_authenticated', 2);
  await two.presence(1, 'offline'); // 2's Welcome snapshot: its contact 1, never seen yet

  const child = spawn(process.execPath, [SNIPPET], { cwd: EDGE_DIR, stdio: ['ignore', 'pipe', 'pipe'] });
  let out = '';
  let err = '';
  child.stdout.setEncoding('utf8').on('data', (c) => { out += c; });
  child.stderr.setEncoding('utf8').on('data', (c) => { err += c; });
  const exited = new Promise((resolve) => child.once('exit', resolve));
  t.after(async () => {
    child.kill('SIGTERM');
    await exited;
  });

  // The snippet never exits by itself (its socket stays open): wait for its output.
  const complete = () => /Presence info:[\s\S]*\]\s*$/m.test(out) && (out.match(/Presence update:/g) || []).length >= 2;
  await new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`snippet output incomplete after 8 s:\n${out}\nstderr:\n${err}`)), 8000);
    const check = () => {
      if (complete()) {
        clearTimeout(timer);
        resolve();
      }
    };
    child.stdout.on('data', check);
    check();
  });
  // 2 is 1's contact, so 2 sees 1 come online through the snippet's socket.
  const seen = await two.presence(1, 'online');
  assert.deepEqual(Object.keys(seen).sort(), ['last_seen', 'status', 'user_id']);

  t.diagnostic(`snippet printed:\n${out}`);
  assert.equal(err, '');
  // 'Presence update:' for each contact in the Welcome snapshot: 2 online, 3 never seen.
  assert.match(out, /Presence update: \{ user_id: 2, status: 'online', last_seen: '[^']+' \}/);
  assert.match(out, /Presence update: \{ user_id: 3, status: 'offline', last_seen: null \}/);
  // 'Presence info:' for [2, 3, 4] in request order; 4 is no contact and sees nothing of 1.
  const info = /Presence info: (\[[\s\S]*?\])\s*$/m.exec(out)[1];
  const users = Function(`"use strict"; return (${info});`)(); // node's util.inspect output of plain data
  assert.deepEqual(users.map((u) => u.user_id), [2, 3, 4]);
  assert.equal(users[0].status, 'online');
  assert.match(users[0].last_seen, ISO_MS);
  assert.deepEqual(users[1], { user_id: 3, status: 'offline', last_seen: null });
  assert.deepEqual(users[2], { user_id: 4, status: 'offline', last_seen: null });
});

'use strict';
// The demo page is served only with EDGE_DEMO=1 (startEdge({ demo: true })): the page, its script
// and style under a strict Content-Security-Policy, and socket.io's client script. Without it the
// edge serves none of them. (The page itself is exercised in a browser by 20-demo-browser.)
const { test } = require('node:test');
const assert = require('node:assert/strict');
const { startTestEdge } = require('./helpers/clients');

const NOWHERE = '127.0.0.1:9'; // serving files calls no service

test('EDGE_DEMO off: no demo page, no socket.io client script', async (t) => {
  const edge = await startTestEdge({ target: NOWHERE, identity: 'trust-client' });
  t.after(() => edge.close());
  for (const p of ['/demo/', '/demo/demo.js', '/demo']) assert.equal((await fetch(`${edge.url}${p}`, { redirect: 'manual' })).status, 404, p);
  const client = await fetch(`${edge.url}/socket.io/socket.io.min.js`);
  assert.notEqual(client.status, 200);
  assert.doesNotMatch(client.headers.get('content-type') || '', /javascript/);
  assert.equal((await fetch(`${edge.url}/healthz`)).status, 200);
});

test('EDGE_DEMO on: the page, its files and the socket.io client', async (t) => {
  const edge = await startTestEdge({ target: NOWHERE, identity: 'trust-client', demo: true });
  t.after(() => edge.close());
  const redirect = await fetch(`${edge.url}/demo?user=1`, { redirect: 'manual' });
  assert.equal(redirect.status, 308);
  assert.equal(redirect.headers.get('location'), '/demo/?user=1');

  const page = await fetch(`${edge.url}/demo/?user=1&contacts=2`);
  assert.equal(page.status, 200);
  assert.match(page.headers.get('content-type'), /^text\/html/);
  assert.match(page.headers.get('content-security-policy'), /script-src 'self'/);
  const html = await page.text();
  for (const src of ['/socket.io/socket.io.min.js', 'demo.js', 'demo.css']) assert.ok(html.includes(src), src);

  for (const [p, type] of [['/demo/demo.js', /javascript/], ['/demo/demo.css', /text\/css/], ['/socket.io/socket.io.min.js', /javascript/]]) {
    const res = await fetch(`${edge.url}${p}`);
    assert.equal(res.status, 200, p);
    assert.match(res.headers.get('content-type'), type, p);
  }
  const script = await (await fetch(`${edge.url}/demo/demo.js`)).text();
  // The seed's events, used as the seed's React ContactList uses them.
  for (const call of ["emit('user_authenticated'", "on('presence_updated'", "emit('get_presence'", "on('presence_info'", "emit('update_status'"]) {
    assert.ok(script.includes(call), call);
  }
  // And the edge's additions.
  for (const call of ["emit('set_custom_status'", "emit('activity'", "on('presence_resync'", "platform: 'web'"]) {
    assert.ok(script.includes(call), call);
  }
  assert.equal((await fetch(`${edge.url}/demo/`, { method: 'POST' })).status, 405);
  assert.equal((await fetch(`${edge.url}/demo/../src/server.js`)).status, 404);
});

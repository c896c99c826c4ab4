'use strict';
// tools/socket-memory.js, which measures the edge's RSS per idle socket (README: Memory), runs
// end to end on a small N: every socket welcomed, one relay stream per worker, a figure printed.
const { test } = require('node:test');
const assert = require('node:assert/strict');
const fs = require('node:fs');
const os = require('node:os');
const path = require('node:path');
const { spawn } = require('node:child_process');
const { PRESENCE_BIN } = require('./helpers/presence-server');

const TOOL = path.resolve(__dirname, '..', 'tools', 'socket-memory.js');

test('tools/socket-memory.js measures the edge over its workers', async (t) => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'edge-socket-memory-'));
  t.after(() => fs.rmSync(dir, { recursive: true, force: true }));
  const json = path.join(dir, 'out.json');
  const child = spawn(process.execPath, [TOOL, '--users', '200', '--contacts', '10', '--workers', '2', '--presence-bin', PRESENCE_BIN, '--json', json], {
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  let out = '';
  let err = '';
  child.stdout.setEncoding('utf8').on('data', (c) => { out += c; });
  child.stderr.setEncoding('utf8').on('data', (c) => { err += c; });
  const code = await new Promise((resolve) => child.once('exit', resolve));
  assert.equal(code, 0, `${out}\n${err}`);
  assert.match(out, /200 idle sockets \(K=10, 2 worker\(s\), 2 relay stream\(s\), 200 sessions welcomed, .*KB per idle socket/);
  const result = JSON.parse(fs.readFileSync(json, 'utf8'));
  assert.equal(result.ready, 200);
  assert.equal(result.processes.length, 3, 'the primary and two workers');
  assert.equal(result.processes.filter((p) => p.role.startsWith('worker')).reduce((n, p) => n + p.sockets, 0), 200);
  assert.ok(result.rss_after_kb > result.rss_before_kb);
  assert.ok(Number.isFinite(result.kb_per_idle_socket));
});

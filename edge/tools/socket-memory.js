#!/usr/bin/env node
'use strict';
// Memory per idle socket: starts a presence service (or uses --target), gives N users the ring
// contact graph (user i linked to i+1 … i+K/2, K contacts each, as bench/edge does), starts the
// edge as `npm start` does (trust-client, --workers processes), measures the resident memory of
// the edge's whole process tree (the primary and its workers, from /proc), connects N WebSocket
// sockets that each emit user_authenticated, waits until every session is welcomed and the
// welcome bursts are over, measures again, and prints the difference per socket. Nothing is
// forced: no GC, as in production.
//
//   node tools/socket-memory.js --users 10000 --workers 2 --presence-bin ../target/release/presence
//
// Options: --users N (2000), --contacts K (20), --workers W (the number of CPUs), --presence-bin
// PATH (default PRESENCE_BIN, else ../target/debug/presence), --target HOST:PORT (an existing
// development-mode service; the graph is added to it), --json FILE. The edge's own settings
// (EDGE_WORKER_SEMI_SPACE_MB…) pass through from the environment. Needs `ulimit -n` above 2N.
const fs = require('node:fs');
const path = require('node:path');
const { spawn } = require('node:child_process');
const { parseArgs } = require('node:util');

const EDGE_DIR = path.resolve(__dirname, '..');
const CONNECT_CONCURRENCY = 50;
const QUIET_MS = 2000;
const SETTLE_TIMEOUT_MS = 180000;

function fail(message) {
  process.stderr.write(`socket-memory: ${message}\n`);
  process.exit(2);
}

function options(argv) {
  const { values } = parseArgs({
    args: argv,
    options: {
      users: { type: 'string', default: '2000' },
      contacts: { type: 'string', default: '20' },
      workers: { type: 'string' },
      'presence-bin': { type: 'string' },
      target: { type: 'string' },
      json: { type: 'string' },
    },
  });
  const users = Number(values.users);
  const contacts = Number(values.contacts);
  if (!Number.isInteger(users) || users < 2) fail('--users must be a whole number, at least 2');
  if (!Number.isInteger(contacts) || contacts < 2 || contacts % 2 || contacts >= users) {
    fail('--contacts must be an even number, at least 2 and below --users');
  }
  if (values.workers !== undefined && !/^[1-9]\d*$/.test(values.workers)) fail('--workers must be a positive whole number');
  return { ...values, users, contacts };
}

/** { rssKb } of a process, or null once it is gone. */
function rssKb(pid) {
  try {
    return Number(/^VmRSS:\s+(\d+) kB/m.exec(fs.readFileSync(`/proc/${pid}/status`, 'utf8'))[1]);
  } catch {
    return null;
  }
}

/** The pid and its children (the edge's workers). */
function tree(pid) {
  const out = [pid];
  try {
    for (const tid of fs.readdirSync(`/proc/${pid}/task`)) {
      const text = fs.readFileSync(`/proc/${pid}/task/${tid}/children`, 'utf8').trim();
      if (text) out.push(...text.split(/\s+/).map(Number));
    }
  } catch {
    // gone
  }
  return out;
}

function measure(pid) {
  const processes = tree(pid).map((p) => ({ pid: p, rssKb: rssKb(p) || 0 }));
  return { processes, rssKb: processes.reduce((n, p) => n + p.rssKb, 0) };
}

function startEdge(target, workers) {
  const env = { PATH: process.env.PATH, EDGE_PORT: '0', EDGE_IDENTITY: 'trust-client', EDGE_LOG_LEVEL: 'warn', PRESENCE_TARGET: target };
  for (const [k, v] of Object.entries(process.env)) if (k.startsWith('EDGE_') && !(k in env)) env[k] = v;
  if (workers) env.EDGE_WORKERS = workers;
  const child = spawn(process.execPath, [path.join(EDGE_DIR, 'src', 'index.js')], { env, stdio: ['ignore', 'pipe', 'inherit'] });
  const port = new Promise((resolve, reject) => {
    let out = '';
    child.stdout.setEncoding('utf8').on('data', (c) => {
      out += c;
      const m = /^edge listening on (\d+)$/m.exec(out);
      if (m) resolve(Number(m[1]));
    });
    child.once('exit', (code) => reject(new Error(`the edge exited (code ${code}) before listening`)));
  });
  return { child, port };
}

async function main() {
  const o = options(process.argv.slice(2));
  if (o['presence-bin']) process.env.PRESENCE_BIN = o['presence-bin'];
  // Required after PRESENCE_BIN is set: the helper reads it when loaded.
  const { startPresenceServer, serviceClients } = require('../test/helpers/presence-server');
  const { rawConnect } = require('../test/helpers/raw-ws');
  const cleanup = [];
  const done = async () => {
    for (const f of cleanup.reverse()) await f();
  };
  process.on('SIGINT', () => done().then(() => process.exit(130)));
  try {
    let target = o.target;
    if (!target) {
      const server = await startPresenceServer();
      cleanup.push(() => server.destroy());
      target = server.target;
    }
    const svc = serviceClients(target);
    cleanup.push(() => svc.close());
    const pairs = [];
    for (let u = 1; u <= o.users; u += 1) {
      for (let j = 1; j <= o.contacts / 2; j += 1) pairs.push([u, ((u - 1 + j) % o.users) + 1]);
    }
    for (let i = 0; i < pairs.length; i += 5000) await svc.addContacts(pairs.slice(i, i + 5000));

    const edge = startEdge(target, o.workers);
    cleanup.push(
      () =>
        new Promise((resolve) => {
          if (edge.child.exitCode !== null) return resolve();
          edge.child.once('exit', resolve);
          edge.child.kill('SIGTERM');
        }),
    );
    const url = `http://127.0.0.1:${await edge.port}`;
    const health = async () => (await fetch(`${url}/healthz`)).json();
    await new Promise((r) => setTimeout(r, 1000));
    const before = measure(edge.child.pid);

    let lastEvent = Date.now();
    let received = 0;
    const clients = [];
    cleanup.push(() => clients.forEach((c) => c.destroy()));
    const started = Date.now();
    let next = 1;
    await Promise.all(
      Array.from({ length: CONNECT_CONCURRENCY }, async () => {
        while (next <= o.users) {
          const user = next;
          next += 1;
          const onEvent = () => {
            received += 1;
            lastEvent = Date.now();
          };
          const c = await rawConnect(url, { timeout: 30000, onEvent });
          c.emit('user_authenticated', user);
          clients.push(c);
        }
      }),
    );
    const connectedMs = Date.now() - started;
    const until = Date.now() + SETTLE_TIMEOUT_MS;
    for (;;) {
      const h = await health();
      if (h.ready === o.users && Date.now() - lastEvent >= QUIET_MS) break;
      if (Date.now() > until) throw new Error(`not settled within ${SETTLE_TIMEOUT_MS / 1000} s: ${JSON.stringify(h)}`);
      await new Promise((r) => setTimeout(r, 250));
    }
    const after = measure(edge.child.pid);
    const h = await health();
    const perSocketKb = (after.rssKb - before.rssKb) / o.users;
    const result = {
      users: o.users,
      contacts: o.contacts,
      workers: h.workers,
      connected_s: connectedMs / 1000,
      events_received: received,
      ready: h.ready,
      relay_streams: h.relay_streams,
      rss_before_kb: before.rssKb,
      rss_after_kb: after.rssKb,
      kb_per_idle_socket: Math.round(perSocketKb * 10) / 10,
      processes: after.processes.map((p) => {
        const b = before.processes.find((x) => x.pid === p.pid);
        const s = (h.processes || []).find((x) => x.pid === p.pid) || {};
        return { pid: p.pid, role: s.role || (s.worker ? `worker ${s.worker}` : 'edge'), sockets: s.sockets, rss_before_kb: b ? b.rssKb : null, rss_after_kb: p.rssKb, heap_used_kb: s.heap_used ? Math.round(s.heap_used / 1024) : null };
      }),
    };
    for (const p of result.processes) {
      process.stdout.write(
        `${p.role.padEnd(9)} pid ${p.pid}: ${p.sockets ?? '-'} sockets, RSS ${p.rss_before_kb} → ${p.rss_after_kb} kB, heap used ${p.heap_used_kb ?? '-'} kB\n`,
      );
    }
    process.stdout.write(
      `${o.users} idle sockets (K=${o.contacts}, ${h.workers} worker(s), ${h.relay_streams} relay stream(s), ${h.ready} sessions welcomed, ` +
        `${received} presence events, connected in ${result.connected_s} s): edge RSS ${before.rssKb} → ${after.rssKb} kB = ` +
        `${result.kb_per_idle_socket} KB per idle socket\n`,
    );
    if (o.json) fs.writeFileSync(o.json, `${JSON.stringify(result, null, 2)}\n`);
  } finally {
    await done();
  }
}

main().then(
  () => process.exit(0),
  (err) => {
    process.stderr.write(`socket-memory: ${err && err.stack}\n`);
    process.exit(1);
  },
);

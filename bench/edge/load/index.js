#!/usr/bin/env node
'use strict';
// The project's socket.io load scenario for presence targets that speak the seed's protocol
// (user_authenticated, update_status → presence_updated): the seed reference server or the edge.
//
//   node load/index.js --url http://127.0.0.1:3000 --rates 500,2000 --pid seed=1234 --pid db=99
//
// N users (1..N) connect, one websocket each, spread over --workers processes; they all stay
// online. The contact graph is the ring of lib/ring.js (set it up first: seed/setup.js or
// load/setup-presence.js). For each rate, the odd users (half of them) change status open-loop
// at that total rate: --warmup seconds, then --duration measured seconds. Every measured change
// is matched to every contact's `presence_updated` (see load/match.js) → latency from the
// scheduled time of the change to the receipt, and what was lost. Meanwhile the CPU and RSS of
// the --pid processes, of the generator itself and of the whole machine are sampled.
const path = require('node:path');
const fs = require('node:fs');
const os = require('node:os');
const { fork } = require('node:child_process');
const { parseArgs } = require('node:util');
const { Ring } = require('../lib/ring');
const { Sampler, cpuBetween } = require('../lib/procstat');
const { formatTable } = require('./report');

const USAGE = `usage: node load/index.js --url URL [options]
  --url URL              socket.io server speaking the seed protocol (seed server or edge)
  --users N              users 1..N, all online, one socket each (default 10000)
  --contacts K           contacts per user, ring graph (default 20)
  --rates R1,R2,...      total status changes per second, one phase each (default 500)
  --duration S           measured seconds per rate (default 15)
  --warmup S             seconds of the same load before measuring (default 3)
  --drain S              after the last change, wait at most this long for deliveries (default 10)
  --workers W            generator processes (default: cores, at least 2, at most 4)
  --connect-concurrency C  sockets connecting at once, over all workers (default 200)
  --client KIND          lean (the socket.io protocol over ws, default) or socket.io-client
  --pid NAME=PID[,PID]   a target process group to sample (repeatable), e.g. --pid edge=123
  --label TEXT           name of the target in the table and JSON
  --json FILE            write every figure as JSON
  --busy-above CORES     a rate measured while the rest of the machine used this much CPU or more
                         is marked busy (default 0.25) and run again, at most --retry-busy more
                         times (default 1); the attempt with the least other load is kept
  --settle-timeout S     after connecting, and between rates, wait at most this long for the
                         target to go quiet (default 120)`;

function parseCli(argv) {
  const { values } = parseArgs({
    args: argv,
    options: {
      url: { type: 'string' },
      users: { type: 'string', default: '10000' },
      contacts: { type: 'string', default: '20' },
      rates: { type: 'string', default: '500' },
      duration: { type: 'string', default: '15' },
      warmup: { type: 'string', default: '3' },
      drain: { type: 'string', default: '10' },
      workers: { type: 'string' },
      'connect-concurrency': { type: 'string', default: '200' },
      client: { type: 'string', default: 'lean' },
      pid: { type: 'string', multiple: true, default: [] },
      label: { type: 'string' },
      json: { type: 'string' },
      'settle-timeout': { type: 'string', default: '120' },
      'busy-above': { type: 'string', default: '0.25' },
      'retry-busy': { type: 'string', default: '1' },
      help: { type: 'boolean', short: 'h' },
    },
  });
  if (values.help || !values.url) {
    process.stderr.write(`${USAGE}\n`);
    process.exit(values.help ? 0 : 2);
  }
  const num = (name, min) => {
    const v = Number(values[name]);
    if (!Number.isFinite(v) || v < min) {
      process.stderr.write(`--${name} must be a number ≥ ${min}\n`);
      process.exit(2);
    }
    return v;
  };
  const pids = {};
  for (const spec of values.pid) {
    const m = /^([A-Za-z0-9_.-]+)=(\d+(?:,\d+)*)$/.exec(spec);
    if (!m) {
      process.stderr.write(`--pid wants NAME=PID[,PID...], got ${spec}\n`);
      process.exit(2);
    }
    pids[m[1]] = m[2].split(',').map(Number);
  }
  const cores = os.availableParallelism ? os.availableParallelism() : os.cpus().length;
  return {
    url: values.url,
    users: num('users', 2),
    contacts: num('contacts', 2),
    rates: values.rates.split(',').map((r) => Number(r.trim())).filter((r) => r > 0),
    duration: num('duration', 1),
    warmup: num('warmup', 0),
    drain: num('drain', 0),
    workers: values.workers ? num('workers', 1) : Math.max(2, Math.min(4, cores)),
    connectConcurrency: num('connect-concurrency', 1),
    client: values.client,
    pids,
    label: values.label || values.url,
    json: values.json,
    settleTimeout: num('settle-timeout', 1),
    busyAbove: num('busy-above', 0),
    retryBusy: num('retry-busy', 0),
  };
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
const log = (msg) => process.stderr.write(`load: ${msg}\n`);

/** A forked worker with "wait for the next message of this type". */
class Worker {
  constructor(index) {
    this.index = index;
    // LOAD_WORKER_NODE_ARGS: node flags for the workers, e.g. "--cpu-prof --cpu-prof-dir=/tmp/prof".
    const execArgv = (process.env.LOAD_WORKER_NODE_ARGS || '').split(' ').filter(Boolean);
    this.child = fork(path.join(__dirname, 'worker.js'), [], { serialization: 'advanced', stdio: 'inherit', execArgv });
    this.tick = { received: 0, outside: 0, lastEventAt: 0, sent: 0, disconnects: 0 };
    this.waiters = new Map();
    this.child.on('message', (m) => {
      if (m.type === 'tick') {
        this.tick = m;
        return;
      }
      if (m.type === 'error') {
        log(`worker ${index} failed: ${m.message}`);
        process.exitCode = 1;
      }
      const w = this.waiters.get(m.type);
      if (w) {
        this.waiters.delete(m.type);
        w(m);
      }
    });
    this.child.on('exit', (code) => {
      if (code && !this.closing) {
        log(`worker ${index} exited with ${code}`);
        process.exit(1);
      }
    });
  }

  next(type) {
    return new Promise((resolve) => this.waiters.set(type, resolve));
  }

  send(m) {
    this.child.send(m);
  }

  close() {
    this.closing = true;
    if (this.child.connected) this.child.send({ type: 'close' });
  }
}

function percentile(sorted, q) {
  if (sorted.length === 0) return null;
  return sorted[Math.min(sorted.length - 1, Math.max(0, Math.ceil(q * sorted.length) - 1))];
}

function concat(Type, parts) {
  const out = new Type(parts.reduce((n, p) => n + p.length, 0));
  let o = 0;
  for (const p of parts) {
    out.set(p, o);
    o += p.length;
  }
  return out;
}

/** Waits until no worker has received anything for `quietMs` (or `timeoutMs` passed). */
async function waitQuiet(workers, nowMs, quietMs, timeoutMs) {
  const start = nowMs();
  for (;;) {
    const last = Math.max(0, ...workers.map((w) => w.tick.lastEventAt));
    if (nowMs() - last >= quietMs) return true;
    if (nowMs() - start >= timeoutMs) return false;
    await sleep(100);
  }
}

async function run(cfg) {
  const ring = new Ring(cfg.users, cfg.contacts);
  const epoch = process.hrtime.bigint();
  const nowMs = () => Number(process.hrtime.bigint() - epoch) / 1e6;
  const totalTogglers = Math.ceil(cfg.users / 2);
  const perUserRate = cfg.rates.length ? Math.max(...cfg.rates) / totalTogglers : 0;
  log(
    `${cfg.label}: N=${cfg.users} K=${ring.degree} rates ${cfg.rates.join(',')}/s × ${cfg.duration} s ` +
      `(+${cfg.warmup} s warm-up), ${cfg.workers} workers (${cfg.client} clients); busiest toggling user changes ${perUserRate.toFixed(2)}/s`,
  );

  // Blocks of consecutive users, so every worker gets as many togglers (odd ids) as the others.
  const workers = [];
  for (let w = 0; w < cfg.workers; w += 1) workers.push(new Worker(w));
  const blocks = workers.map((w, i) => ({
    lo: Math.floor((i * cfg.users) / cfg.workers) + 1,
    hi: Math.floor(((i + 1) * cfg.users) / cfg.workers),
  }));
  const togglersIn = ({ lo, hi }) => Math.floor((hi + 1) / 2) - Math.floor(lo / 2);

  const groups = { ...cfg.pids, load: [process.pid, ...workers.map((w) => w.child.pid)] };
  const sampler = new Sampler(groups).start();
  await sleep(300);
  const before = sampler.snapshot();

  // Connect everyone.
  const connectStarted = nowMs();
  const connected = workers.map((w) => w.next('connected'));
  workers.forEach((w, i) =>
    w.send({
      type: 'init',
      epoch: epoch.toString(),
      url: cfg.url,
      client: cfg.client,
      users: cfg.users,
      contacts: cfg.contacts,
      concurrency: Math.ceil(cfg.connectConcurrency / cfg.workers),
      ...blocks[i],
    }),
  );
  const conn = await Promise.all(connected);
  const ok = conn.reduce((n, c) => n + c.ok, 0);
  const failed = conn.reduce((n, c) => n + c.failed, 0);
  const connectSeconds = (nowMs() - connectStarted) / 1000;
  const connectCpu = cpuBetween(before, sampler.snapshot());
  log(
    `connected ${ok}/${cfg.users} sockets in ${connectSeconds.toFixed(1)} s (${failed} failed; cores: ` +
      `${Object.entries(connectCpu.groups).map(([k, v]) => `${k} ${v.cores.toFixed(2)}`).join(', ')}, ` +
      `irq ${connectCpu.irqCores.toFixed(2)}, other ${connectCpu.otherCores.toFixed(2)}); waiting for the target to go quiet`,
  );
  const quiet = await waitQuiet(workers, nowMs, 2000, cfg.settleTimeout * 1000);
  if (!quiet) log(`the target still sends after ${cfg.settleTimeout} s; measuring anyway`);
  const settleSeconds = (nowMs() - connectStarted) / 1000;
  await sleep(1000);
  const idle = sampler.snapshot();
  const idleMemory = {};
  for (const name of Object.keys(cfg.pids)) {
    const delta = idle.groups[name].rssKb - before.groups[name].rssKb;
    idleMemory[name] = {
      beforeMb: before.groups[name].rssKb / 1024,
      afterMb: idle.groups[name].rssKb / 1024,
      kbPerSocket: ok ? delta / ok : null,
    };
  }
  const connectEvents = workers.reduce((n, w) => n + w.tick.outside, 0);

  /** One measured run of `rate`: warm-up, measure, drain, match. */
  const runPhase = async (rate) => {
    // An overloaded target may still be sending the previous rate's deliveries: they would count
    // in this one (as duplicates, or matched to the wrong change). Wait them out.
    const idleBefore = await waitQuiet(workers, nowMs, 1000, cfg.settleTimeout * 1000);
    if (!idleBefore) log(`${rate}/s: the target still sends after ${cfg.settleTimeout} s; measuring anyway`);
    const disconnectsBefore = workers.reduce((n, w) => n + w.tick.disconnects, 0);
    sampler.resetPeaks();
    const t0 = nowMs() + 300;
    const from = t0 + cfg.warmup * 1000;
    const to = from + cfg.duration * 1000;
    const sent = workers.map((w) => w.next('sent'));
    workers.forEach((w, i) =>
      w.send({ type: 'phase', rate: (rate * togglersIn(blocks[i])) / totalTogglers, t0, end: to }),
    );
    log(`${rate}/s: warm-up ${cfg.warmup} s, then ${cfg.duration} s measured`);
    await sleep(from - nowMs());
    const a = sampler.snapshot();
    await sleep(to - nowMs());
    const b = sampler.snapshot();
    const sentCounts = await Promise.all(sent);
    const expectedAll = sentCounts.reduce((n, s) => n + s.count, 0) * ring.degree;
    // Drain: wait for every delivery, or give up after --drain seconds without completing.
    const drainStart = nowMs();
    while (nowMs() - drainStart < cfg.drain * 1000) {
      const received = workers.reduce((n, w) => n + w.tick.received, 0);
      if (received >= expectedAll) break;
      await sleep(100);
    }
    // Deliveries a target sends twice or unasked also count above: a little longer for stragglers.
    await sleep(500);
    const drainSeconds = (nowMs() - drainStart) / 1000;

    // Gather every change, then let each worker match its receivers' receipts.
    const changesParts = await Promise.all(
      workers.map((w) => {
        const p = w.next('changes');
        w.send({ type: 'collect' });
        return p;
      }),
    );
    const changes = {
      sender: concat(Uint32Array, changesParts.map((c) => c.sender)),
      status: concat(Uint8Array, changesParts.map((c) => c.status)),
      t: concat(Float64Array, changesParts.map((c) => c.t)),
    };
    const matched = await Promise.all(
      workers.map((w) => {
        const p = w.next('matched');
        w.send({ type: 'match', changes, window: [from, to] });
        return p;
      }),
    );
    const lat = concat(Float64Array, matched.map((m) => m.latencies)).sort();
    const sum = (k) => matched.reduce((n, m) => n + m[k], 0);
    const maxOf = (k) => Math.max(...matched.map((m) => m[k] ?? 0));
    const cpu = cpuBetween(a, b);
    const delivered = sum('delivered');
    const measuredChanges = Array.from(changes.t).filter((t) => t >= from && t < to).length;
    const phase = {
      rate,
      startedQuiet: idleBefore,
      changes: measuredChanges,
      expected: sum('expected'),
      delivered,
      deliveriesPerSecond: delivered / cfg.duration,
      lost: sum('superseded') + sum('missing'),
      superseded: sum('superseded'),
      missing: sum('missing'),
      outOfOrder: sum('outOfOrder'),
      duplicates: sum('duplicates'),
      unexpected: sum('unexpected'),
      self: sum('self'),
      unexpectedSamples: matched.flatMap((m) => m.unexpectedSamples).slice(0, 5),
      disconnects: workers.reduce((n, w) => n + w.tick.disconnects, 0) - disconnectsBefore,
      latencyMs: {
        p50: percentile(lat, 0.5),
        p90: percentile(lat, 0.9),
        p99: percentile(lat, 0.99),
        p999: percentile(lat, 0.999),
        max: lat.length ? lat[lat.length - 1] : null,
      },
      sendLagMs: { p99: maxOf('sendLagP99'), max: maxOf('sendLagMax') },
      loadLoopDelayMs: { p99: maxOf('loopDelayP99'), max: maxOf('loopDelayMax') },
      drainSeconds,
      cpu: {
        seconds: cpu.seconds,
        cores: Object.fromEntries(Object.entries(cpu.groups).map(([k, v]) => [k, v.cores])),
        usPerDelivery: Object.fromEntries(
          Object.entries(cpu.groups).map(([k, v]) => [k, delivered ? (v.cpuSeconds * 1e6) / delivered : null]),
        ),
        machineCores: cpu.machineCores,
        irqCores: cpu.irqCores,
        otherCores: cpu.otherCores,
        stealCores: cpu.stealCores,
        iowaitCores: cpu.iowaitCores,
      },
      rssPeakMb: Object.fromEntries(Object.entries(sampler.peaks).map(([k, v]) => [k, v / 1024])),
    };
    log(
      `${rate}/s: p50 ${fmt(phase.latencyMs.p50)} p99 ${fmt(phase.latencyMs.p99)} max ${fmt(phase.latencyMs.max)} ms, ` +
        `${delivered}/${phase.expected} delivered, lost ${phase.lost}; rest of the machine ${fmt(cpu.otherCores, 2)} cores, ` +
        `iowait ${fmt(cpu.iowaitCores, 2)}`,
    );
    return phase;
  };

  // The machine is shared: a rate measured while something else took CPU is run again (at most
  // --retry-busy more times) and the attempt with the least other load is kept.
  const phases = [];
  for (const rate of cfg.rates) {
    const attempts = [await runPhase(rate)];
    while (attempts.at(-1).cpu.otherCores >= cfg.busyAbove && attempts.length <= cfg.retryBusy) {
      log(`${rate}/s: the rest of the machine took ${fmt(attempts.at(-1).cpu.otherCores, 2)} cores; again`);
      attempts.push(await runPhase(rate));
    }
    const best = attempts.reduce((a, b) => (b.cpu.otherCores < a.cpu.otherCores ? b : a));
    phases.push({ ...best, attempts: attempts.length, otherCoresOfAttempts: attempts.map((a) => a.cpu.otherCores) });
  }

  sampler.stop();
  for (const w of workers) w.close();
  const result = {
    label: cfg.label,
    url: cfg.url,
    config: {
      users: cfg.users,
      contacts: ring.degree,
      togglers: totalTogglers,
      duration: cfg.duration,
      warmup: cfg.warmup,
      drain: cfg.drain,
      busyAbove: cfg.busyAbove,
      workers: cfg.workers,
      client: cfg.client,
      pids: cfg.pids,
    },
    machine: { cpus: os.cpus().length, memGb: os.totalmem() / 2 ** 30, loadavg: os.loadavg() },
    connect: {
      sockets: ok,
      failed,
      seconds: connectSeconds,
      settleSeconds,
      quiet,
      events: connectEvents,
      cores: Object.fromEntries(Object.entries(connectCpu.groups).map(([k, v]) => [k, v.cores])),
      irqCores: connectCpu.irqCores,
      otherCores: connectCpu.otherCores,
    },
    idleMemory,
    phases,
  };
  return result;
}

function fmt(v, digits = 1) {
  return v === null || v === undefined ? '-' : v.toFixed(digits);
}

if (require.main === module) {
  const cfg = parseCli(process.argv.slice(2));
  run(cfg).then(
    (result) => {
      process.stdout.write(`${formatTable([result])}\n`);
      if (cfg.json) fs.writeFileSync(cfg.json, `${JSON.stringify(result, null, 2)}\n`);
      setTimeout(() => process.exit(process.exitCode || 0), 300);
    },
    (err) => {
      log(err && err.stack);
      process.exit(1);
    },
  );
}

module.exports = { run, parseCli };

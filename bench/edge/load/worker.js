'use strict';
// One load-generator worker process (forked by load/index.js): it holds the sockets of users
// lo..hi (one socket.io websocket each, load/client.js), makes its toggling users' status changes on schedule,
// records every `presence_updated` its sockets receive, and matches them to the changes of the
// whole run when asked. Talks to the parent over IPC (advanced serialization: typed arrays).
//
// Times are milliseconds since the parent's `epoch` on CLOCK_MONOTONIC (process.hrtime), which
// every process on the machine shares, so a change scheduled here and a receipt in another
// worker compare directly.
const { monitorEventLoopDelay } = require('node:perf_hooks');
const { connect } = require('./client');
const { Ring, isToggler } = require('../lib/ring');
const { STATUSES, STATUS_CODE, statusOfChange, Column, indexChanges, matchReceipts } = require('./match');

let epoch = 0n;
const now = () => Number(process.hrtime.bigint() - epoch) / 1e6;

const state = {
  ring: null,
  lo: 0,
  hi: -1,
  sockets: [],
  /** Changes made so far per local user (the status cycle continues across phases). */
  seq: null,
  recording: false,
  receivedPhase: 0,
  outside: 0,
  lastEventAt: 0,
  disconnects: 0,
  connectErrors: 0,
  receipts: null,
  changes: null,
  sendLag: null,
  sentPhase: 0,
  loopDelay: monitorEventLoopDelay({ resolution: 10 }),
};

function send(msg) {
  if (!process.connected) return;
  // With a callback a failed send (the parent is gone) does not throw an 'error' event;
  // 'disconnect' then ends this process.
  process.send(msg, () => {});
}

function onPresence(receiverIndex, data) {
  const t = now();
  state.lastEventAt = t;
  if (!state.recording) {
    state.outside += 1;
    return;
  }
  const st = data && STATUS_CODE[data.status];
  state.receipts.receiver.push(state.lo + receiverIndex);
  state.receipts.sender.push(data ? Number(data.user_id) >>> 0 : 0);
  state.receipts.status.push(st === undefined ? 255 : st);
  state.receipts.t.push(t);
  // What the drain waits for: receipts that can be a change of this phase (from a toggling
  // contact); others (unexpected) must not end it early.
  const sender = data ? Number(data.user_id) : 0;
  if (isToggler(sender) && state.ring.isContact(state.lo + receiverIndex, sender)) state.receivedPhase += 1;
}

async function connectOne(kind, url, u) {
  const i = u - state.lo;
  try {
    state.sockets[i] = await connect(kind, url, {
      onEvent: (name, arg) => {
        if (name === 'presence_updated') onPresence(i, arg);
      },
      onDisconnect: () => {
        state.disconnects += 1;
      },
    });
  } catch {
    state.connectErrors += 1;
    return false;
  }
  state.sockets[i].emit('user_authenticated', u);
  return true;
}

async function connectAll(kind, url, concurrency) {
  let next = state.lo;
  let ok = 0;
  const lane = async () => {
    while (next <= state.hi) {
      const u = next;
      next += 1;
      if (await connectOne(kind, url, u)) ok += 1;
    }
  };
  const started = now();
  await Promise.all(Array.from({ length: Math.max(1, concurrency) }, lane));
  return { ok, failed: state.connectErrors, ms: now() - started };
}

/** A fixed pseudo-random order (same every run) of this worker's toggling users. */
function togglerOrder() {
  const order = [];
  for (let u = state.lo; u <= state.hi; u += 1) if (isToggler(u)) order.push(u);
  let seed = 0x9e3779b9 ^ state.lo;
  const rand = () => {
    seed = (seed * 1664525 + 1013904223) >>> 0;
    return seed / 4294967296;
  };
  for (let i = order.length - 1; i > 0; i -= 1) {
    const j = Math.floor(rand() * (i + 1));
    [order[i], order[j]] = [order[j], order[i]];
  }
  return order;
}

/** Open loop: change i is scheduled at t0 + i / rate, made by togglers in turn, whatever the target does. */
function runSchedule({ rate, t0, end }) {
  const order = togglerOrder();
  const total = order.length === 0 || rate <= 0 ? 0 : Math.floor(((end - t0) * rate) / 1000);
  let i = 0;
  let made = 0;
  const tick = () => {
    const t = now();
    const due = Math.min(total, Math.floor(((t - t0) * rate) / 1000) + 1);
    for (; i < due; i += 1) {
      const u = order[i % order.length];
      const local = u - state.lo;
      if (!state.sockets[local]) continue; // never connected: counted in connect failures
      made += 1;
      const st = statusOfChange(state.seq[local]);
      state.seq[local] += 1;
      const scheduled = t0 + (i * 1000) / rate;
      state.sockets[local].emit('update_status', STATUSES[st]);
      state.changes.sender.push(u);
      state.changes.status.push(st);
      state.changes.t.push(scheduled);
      state.sendLag.push(now() - scheduled);
    }
    state.sentPhase = i;
    if (i < total) {
      setTimeout(tick, Math.max(0, Math.min(1, t0 + (i * 1000) / rate - now())));
    } else {
      send({ type: 'sent', count: made });
    }
  };
  setTimeout(tick, Math.max(0, t0 - now()));
}

function percentile(sorted, q) {
  if (sorted.length === 0) return null;
  return sorted[Math.min(sorted.length - 1, Math.max(0, Math.ceil(q * sorted.length) - 1))];
}

const handlers = {
  async init(m) {
    epoch = BigInt(m.epoch);
    state.ring = new Ring(m.users, m.contacts);
    state.lo = m.lo;
    state.hi = m.hi;
    state.seq = new Uint32Array(m.hi - m.lo + 1);
    state.sockets = new Array(m.hi - m.lo + 1);
    state.ticker = setInterval(() => {
      send({
        type: 'tick',
        received: state.receivedPhase,
        outside: state.outside,
        lastEventAt: state.lastEventAt,
        sent: state.sentPhase,
        disconnects: state.disconnects,
      });
    }, 200).unref();
    const r = await connectAll(m.client, m.url, m.concurrency);
    send({ type: 'connected', ...r });
  },

  phase(m) {
    state.receipts = {
      receiver: new Column(Uint32Array),
      sender: new Column(Uint32Array),
      status: new Column(Uint8Array),
      t: new Column(Float64Array),
    };
    state.changes = { sender: new Column(Uint32Array), status: new Column(Uint8Array), t: new Column(Float64Array) };
    state.sendLag = new Column(Float64Array);
    state.receivedPhase = 0;
    state.sentPhase = 0;
    state.recording = true;
    state.loopDelay.reset();
    state.loopDelay.enable();
    runSchedule(m);
  },

  collect() {
    const c = state.changes;
    send({ type: 'changes', sender: c.sender.view().slice(), status: c.status.view().slice(), t: c.t.view().slice() });
  },

  match(m) {
    state.recording = false;
    state.loopDelay.disable();
    const r = state.receipts;
    const receipts = { receiver: r.receiver.view(), sender: r.sender.view(), status: r.status.view(), t: r.t.view() };
    const receivers = [];
    for (let u = state.lo; u <= state.hi; u += 1) receivers.push(u);
    const result = matchReceipts({
      receipts,
      changes: indexChanges(m.changes),
      receivers,
      contactsOf: (u) => state.ring.contacts(u),
      window: m.window,
    });
    const lag = state.sendLag.view().slice().sort();
    const ld = state.loopDelay;
    send({
      type: 'matched',
      ...result,
      received: state.receivedPhase,
      sendLagP99: percentile(lag, 0.99),
      sendLagMax: lag.length ? lag[lag.length - 1] : null,
      loopDelayP99: ld.count ? ld.percentile(99) / 1e6 : null,
      loopDelayMax: ld.count ? ld.max / 1e6 : null,
    });
    state.receipts = null;
  },

  close() {
    clearInterval(state.ticker);
    for (const s of state.sockets) if (s) s.close();
    setTimeout(() => process.exit(0), 200);
  },
};

process.on('message', (m) => {
  Promise.resolve()
    .then(() => handlers[m.type](m))
    .catch((err) => {
      send({ type: 'error', message: String(err && err.stack) });
    });
});
process.on('disconnect', () => process.exit(0));

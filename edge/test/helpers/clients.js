'use strict';
// socket.io clients that record every event they receive, and wait for events with a timeout; the
// edge in-process, and the usual per-file fixture: a presence service plus an edge on it.
const { before, after } = require('node:test');
const { io } = require('socket.io-client');
const { startEdge } = require('../../src/server');
const { startPresenceServer, serviceClients } = require('./presence-server');

const DEFAULT_TIMEOUT_MS = 8000;

class Recorder {
  constructor(socket, name) {
    this.socket = socket;
    this.name = name;
    this.events = [];
    this.waiters = new Set();
    socket.onAny((event, ...args) => {
      const entry = { event, args, at: Date.now() };
      this.events.push(entry);
      for (const w of [...this.waiters]) w(entry);
    });
  }

  /** Index to pass as `since` to look only at later events. */
  mark() {
    return this.events.length;
  }

  /** Payloads (first argument) of `event` received since `since`. */
  received(event, since = 0) {
    return this.events.slice(since).filter((e) => e.event === event).map((e) => e.args[0]);
  }

  /**
   * Resolves with the first payload of `event` (received at index >= since) matching `predicate`;
   * rejects after `timeout` ms with what was received instead.
   */
  waitFor(event, predicate = () => true, { since = 0, timeout = DEFAULT_TIMEOUT_MS } = {}) {
    for (let i = since; i < this.events.length; i += 1) {
      const e = this.events[i];
      if (e.event === event && predicate(e.args[0])) return Promise.resolve(e.args[0]);
    }
    return new Promise((resolve, reject) => {
      const waiter = (e) => {
        if (e.event !== event || !predicate(e.args[0])) return;
        this.waiters.delete(waiter);
        clearTimeout(timer);
        resolve(e.args[0]);
      };
      const timer = setTimeout(() => {
        this.waiters.delete(waiter);
        const seen = this.events.slice(since).map((x) => `${x.event} ${JSON.stringify(x.args)}`);
        reject(new Error(`${this.name}: no matching '${event}' within ${timeout} ms; received:\n  ${seen.join('\n  ') || '(nothing)'}`));
      }, timeout);
      this.waiters.add(waiter);
    });
  }

  /** Waits for a presence_updated about `userId` (optionally with `status`). */
  presence(userId, status, opts) {
    return this.waitFor('presence_updated', (d) => d.user_id === userId && (!status || d.status === status), opts);
  }
}

/**
 * Connects a socket.io client; resolves once connected (rejects on connect_error). Other options
 * (extraHeaders, transports…) go to socket.io-client as they are.
 */
function connect(url, { name = 'client', auth, timeout = DEFAULT_TIMEOUT_MS, ...options } = {}) {
  const socket = io(url, { forceNew: true, reconnection: false, auth, timeout, ...options });
  const recorder = new Recorder(socket, name);
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`${name}: not connected within ${timeout} ms`)), timeout);
    socket.once('connect', () => {
      clearTimeout(timer);
      resolve(Object.assign(recorder, { close: () => socket.close() }));
    });
    socket.once('connect_error', (err) => {
      clearTimeout(timer);
      socket.close();
      reject(err);
    });
  });
}

/** A logger that keeps every entry (and prints them when EDGE_TEST_LOG is set). */
function captureLogger() {
  const entries = [];
  const make = (level) => (msg, fields) => {
    entries.push({ level, msg, ...fields });
    if (process.env.EDGE_TEST_LOG) process.stderr.write(`[edge ${level}] ${msg} ${JSON.stringify(fields || {})}\n`);
  };
  return { entries, debug: make('debug'), info: make('info'), warn: make('warn'), error: make('error') };
}

/** startEdge on an ephemeral port with a capturing logger; `url` is where clients connect. */
async function startTestEdge(options) {
  const log = captureLogger();
  const edge = await startEdge({ port: 0, host: '127.0.0.1', log, ...options });
  return { ...edge, log, url: `http://127.0.0.1:${edge.port}` };
}

/**
 * Registers this test file's before/after hooks: a presence service (`server` options, e.g.
 * jwtSecret), service clients (`serviceToken`), the `contacts` pairs added, and an edge on it
 * (trust-client unless `edge` says otherwise). The returned object is filled in by before().
 */
function useServiceAndEdge({ contacts = [], server: serverOptions, serviceToken, edge: edgeOptions } = {}) {
  const ctx = {};
  before(async () => {
    ctx.server = await startPresenceServer(serverOptions);
    ctx.svc = serviceClients(ctx.server.target, { serviceToken });
    if (contacts.length) await ctx.svc.addContacts(contacts);
    ctx.edge = await startTestEdge({ target: ctx.server.target, identity: 'trust-client', ...edgeOptions });
  });
  after(async () => {
    if (ctx.edge) await ctx.edge.close();
    if (ctx.svc) ctx.svc.close();
    if (ctx.server) await ctx.server.destroy();
  });
  return ctx;
}

/** Polls `check` until it returns a truthy value, or fails after `timeout` ms. */
async function eventually(check, { timeout = DEFAULT_TIMEOUT_MS, interval = 25, what = 'condition' } = {}) {
  const until = Date.now() + timeout;
  for (;;) {
    const value = await check();
    if (value) return value;
    if (Date.now() > until) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, interval));
  }
}

const ISO_MS = /^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z$/;

module.exports = { connect, Recorder, captureLogger, startTestEdge, useServiceAndEdge, eventually, ISO_MS, DEFAULT_TIMEOUT_MS };

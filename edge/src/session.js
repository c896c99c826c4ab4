'use strict';
// One Authenticate stream = one device connection of one user, for as long as the browser socket
// lives. If the stream ends or fails while the socket is still there (a server restart ends
// streams with UNAVAILABLE), it is reopened with exponential backoff and jitter — unless the
// failure is one that no retry can fix (a refused credential, a request the service rejects, call
// metadata that cannot even be built): that is reported once and the stream stays closed.
const grpc = require('@grpc/grpc-js');
const { sanitizeDeviceLabel } = require('./convert');

// Retrying these cannot help: the credential or the request is wrong.
const NON_RETRYABLE = new Set([
  grpc.status.UNAUTHENTICATED,
  grpc.status.PERMISSION_DENIED,
  grpc.status.INVALID_ARGUMENT,
  grpc.status.OUT_OF_RANGE,
  grpc.status.FAILED_PRECONDITION,
  grpc.status.UNIMPLEMENTED,
]);

const DEFAULT_BACKOFF = Object.freeze({
  initialMs: 250, // first retry after 125-250 ms
  maxMs: 10000, // never wait more than 5-10 s
  stableMs: 3000, // a stream that lived this long resets the backoff
});

// The service ends a device stream with RESOURCE_EXHAUSTED when a user changes status faster than
// its limit (default 30 per minute). A browser clicking or scripting update_status must not cost
// the user their connection, so each stream spends status changes from a token bucket; changes
// over it are coalesced (the latest wins) and sent when a token is back.
const DEFAULT_STATUS_RATE = Object.freeze({ burst: 10, refillMs: 2000 });

class DeviceSession {
  /**
   * @param {object} o
   * @param {import('./pool').ChannelPool} o.pool
   * @param {() => grpc.Metadata} o.metadata fresh call metadata (identity) for each (re)open; if
   *   it throws, the session ends for good (onFatal with INVALID_ARGUMENT and the error's message,
   *   which must therefore never carry a credential)
   * @param {string} o.device label sent in Hello (made printable and cut to 64 characters here)
   * @param {object} o.log
   * @param {object} [o.backoff]
   * @param {(welcome: object, info: {reopened: boolean}) => void} o.onWelcome
   * @param {(presence: object) => void} o.onPresence
   * @param {(status: {code: number, details: string}) => void} o.onFatal stream refused for good
   * @param {object} [o.logFields]
   */
  constructor(o) {
    this.pool = o.pool;
    this.metadata = o.metadata;
    this.device = sanitizeDeviceLabel(o.device) || 'web';
    this.log = o.log;
    this.backoff = { ...DEFAULT_BACKOFF, ...(o.backoff || {}) };
    this.statusRate = { ...DEFAULT_STATUS_RATE, ...(o.statusRate || {}) };
    this.onWelcome = o.onWelcome;
    this.onPresence = o.onPresence;
    this.onFatal = o.onFatal;
    this.logFields = o.logFields || {};

    this.closed = false;
    this.call = null;
    this.ready = false;
    this.readyAt = 0;
    this.attempt = 0;
    this.timer = null;
    this.opens = 0;
    this.connectionId = null;
    // The latest status chosen by the browser and not yet written: waits for a ready stream (sent
    // right after the next Welcome) or for a token of the status bucket.
    this.pendingStatus = null;
    this.tokens = this.statusRate.burst;
    this.refilledAt = Date.now();
    this.flushTimer = null;
  }

  start() {
    this._open();
    return this;
  }

  _open() {
    this.timer = null;
    if (this.closed) return;
    let metadata;
    try {
      metadata = this.metadata();
    } catch (err) {
      this._ended({ code: grpc.status.INVALID_ARGUMENT, details: `cannot build the call metadata: ${err && err.message}` }, false);
      return;
    }
    let lease;
    let call;
    try {
      lease = this.pool.acquire();
      call = lease.client.Authenticate(metadata);
    } catch (err) {
      if (lease) lease.release();
      this._ended({ code: grpc.status.INTERNAL, details: String(err && err.message) }, false);
      return;
    }
    this.call = call;
    this.ready = false;
    this.opens += 1;
    let finished = false;
    const finish = (status) => {
      if (finished) return;
      finished = true;
      lease.release();
      const wasReady = this.call === call && this.ready;
      if (this.call === call) {
        this.call = null;
        this.ready = false;
      }
      this._ended(status, wasReady);
    };
    call.on('data', (msg) => {
      if (finished || this.call !== call || this.closed) return;
      try {
        this._onMessage(call, msg);
      } catch (err) {
        this.log.error('failed to handle a message from the presence service', {
          ...this.logFields,
          error: String(err && err.stack),
        });
      }
    });
    call.on('error', (err) => finish({ code: err.code, details: err.details || err.message, metadata: err.metadata }));
    call.on('status', (status) => finish(status));
    call.write({ hello: { device: this.device } });
  }

  _onMessage(call, msg) {
    switch (msg.kind) {
      case 'welcome': {
        this.ready = true;
        this.readyAt = Date.now();
        this.connectionId = msg.welcome.connection_id;
        this.log.info(this.opens > 1 ? 'presence stream reopened' : 'presence stream open', {
          ...this.logFields,
          connection_id: this.connectionId,
        });
        this.onWelcome(msg.welcome, { reopened: this.opens > 1 });
        this._flushStatus();
        break;
      }
      case 'presence_updated':
        this.onPresence(msg.presence_updated);
        break;
      case 'pong':
        break;
      default:
        this.log.debug('ignoring unknown server message', { ...this.logFields, kind: msg.kind });
    }
  }

  _ended(status, wasReady) {
    if (this.closed) return;
    const code = status && typeof status.code === 'number' ? status.code : grpc.status.UNKNOWN;
    const details = (status && status.details) || '';
    if (NON_RETRYABLE.has(code)) {
      this.closed = true;
      this.log.warn('presence stream refused; not retrying', {
        ...this.logFields,
        code: grpc.status[code] || code,
        details,
      });
      this.onFatal({ code, details });
      return;
    }
    if (wasReady && Date.now() - this.readyAt >= this.backoff.stableMs) this.attempt = 0;
    const ceiling = Math.min(this.backoff.maxMs, this.backoff.initialMs * 2 ** Math.min(this.attempt, 30));
    let delay = Math.round(ceiling / 2 + Math.random() * (ceiling / 2)); // "equal jitter"
    // The service asks for a pause during reconnect waves (UNAVAILABLE + grpc-retry-pushback-ms).
    const pushback = Number(status && status.metadata && status.metadata.get('grpc-retry-pushback-ms')[0]);
    if (pushback > 0) delay = Math.max(delay, Math.round(pushback * (1 + Math.random() / 2)));
    this.attempt += 1;
    this.log.info('presence stream ended; reopening', {
      ...this.logFields,
      code: grpc.status[code] || code,
      details,
      attempt: this.attempt,
      delay_ms: delay,
    });
    this.timer = setTimeout(() => this._open(), delay);
  }

  /** Sets the chosen status ('STATUS_AWAY'…) on the live stream, or right after the next Welcome. */
  setStatus(status) {
    if (this.closed) return;
    this.pendingStatus = status;
    this._flushStatus();
  }

  _flushStatus() {
    if (this.closed || !this.pendingStatus || !this.ready || !this.call || this.flushTimer) return;
    const now = Date.now();
    const { burst, refillMs } = this.statusRate;
    this.tokens = Math.min(burst, this.tokens + (now - this.refilledAt) / refillMs);
    this.refilledAt = now;
    if (this.tokens >= 1) {
      this.tokens -= 1;
      const status = this.pendingStatus;
      this.pendingStatus = null;
      this.call.write({ update_status: { status } });
      return;
    }
    const wait = Math.ceil((1 - this.tokens) * refillMs);
    this.log.debug('update_status coalesced by the status rate limit', { ...this.logFields, wait_ms: wait });
    this.flushTimer = setTimeout(() => {
      this.flushTimer = null;
      this._flushStatus();
    }, wait);
  }

  /** The device leaves: ends the stream (half-close, then cancel) and stops reconnecting. */
  close() {
    if (this.closed && !this.call && !this.timer && !this.flushTimer) return;
    this.closed = true;
    if (this.timer) {
      clearTimeout(this.timer);
      this.timer = null;
    }
    if (this.flushTimer) {
      clearTimeout(this.flushTimer);
      this.flushTimer = null;
    }
    const call = this.call;
    this.call = null;
    this.ready = false;
    if (call) {
      try {
        call.end();
      } catch {
        // stream already over
      }
      try {
        call.cancel();
      } catch {
        // stream already over
      }
    }
  }
}

module.exports = { DeviceSession, DEFAULT_BACKOFF, DEFAULT_STATUS_RATE, NON_RETRYABLE };

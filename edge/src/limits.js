'use strict';
// Timing helpers shared by the relay stream and the sockets: reconnect backoff, and token buckets
// that keep a browser's commands within what the service allows.
const grpc = require('@grpc/grpc-js');

// Retrying these cannot help: the credential or the request is wrong.
const NON_RETRYABLE = new Set([
  grpc.status.UNAUTHENTICATED,
  grpc.status.PERMISSION_DENIED,
  grpc.status.INVALID_ARGUMENT,
  grpc.status.OUT_OF_RANGE,
  grpc.status.FAILED_PRECONDITION,
  grpc.status.UNIMPLEMENTED,
]);

/** A gRPC status code's name ('UNAVAILABLE'), or the number as a string. */
function codeName(code) {
  return grpc.status[code] || String(code);
}

const DEFAULT_BACKOFF = Object.freeze({
  initialMs: 250, // first retry after 125-250 ms
  maxMs: 10000, // never wait more than 5-10 s
  stableMs: 3000, // something that lived this long resets the backoff
});

/** Exponential backoff with "equal jitter", honouring the service's grpc-retry-pushback-ms. */
class Backoff {
  constructor(options) {
    this.o = { ...DEFAULT_BACKOFF, ...(options || {}) };
    this.attempt = 0;
    this.upAt = 0;
  }

  /** The thing came up (a stream answered, a session was welcomed). */
  up() {
    this.upAt = Date.now();
  }

  /** The delay before the next attempt, after a failure with `status` ({ code, metadata }). */
  next(status) {
    if (this.upAt && Date.now() - this.upAt >= this.o.stableMs) this.attempt = 0;
    this.upAt = 0;
    const ceiling = Math.min(this.o.maxMs, this.o.initialMs * 2 ** Math.min(this.attempt, 30));
    let delay = Math.round(ceiling / 2 + Math.random() * (ceiling / 2));
    // The service asks for a pause during reconnect waves (UNAVAILABLE + grpc-retry-pushback-ms).
    const md = status && status.metadata;
    const pushback = md && typeof md.get === 'function' ? Number(md.get('grpc-retry-pushback-ms')[0]) : NaN;
    if (pushback > 0) delay = Math.max(delay, Math.round(pushback * (1 + Math.random() / 2)));
    this.attempt += 1;
    return delay;
  }

  /** The longest wait, for failures that only a change elsewhere can fix. */
  max() {
    this.attempt += 1;
    return Math.round(this.o.maxMs / 2 + (Math.random() * this.o.maxMs) / 2);
  }
}

/** A token bucket: `burst` tokens, one more every `refillMs`. */
class TokenBucket {
  constructor({ burst, refillMs }) {
    this.burst = burst;
    this.refillMs = refillMs;
    this.tokens = burst;
    this.at = Date.now();
  }

  _refill() {
    const now = Date.now();
    this.tokens = Math.min(this.burst, this.tokens + (now - this.at) / this.refillMs);
    this.at = now;
  }

  /** Takes a token; false when there is none. */
  take() {
    this._refill();
    if (this.tokens < 1) return false;
    this.tokens -= 1;
    return true;
  }

  /** Milliseconds until a token is there (0: now). */
  wait() {
    this._refill();
    return this.tokens >= 1 ? 0 : Math.ceil((1 - this.tokens) * this.refillMs);
  }
}

module.exports = { NON_RETRYABLE, codeName, DEFAULT_BACKOFF, Backoff, TokenBucket };

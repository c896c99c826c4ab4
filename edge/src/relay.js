'use strict';
// One relay stream (presence.v1.RelayService/Relay) per edge process carries the device sessions
// of all of its browser sockets: the edge opens a session when a socket emits user_authenticated
// and closes it when the socket goes. The service delivers each change once per stream, grouped by
// identical view with the sessions that see it; `onDelivery` fans each group out to its sockets.
//
// If the stream ends or fails (a service restart ends it with UNAVAILABLE), every session ends
// with it (the service counts each as a device leaving, with the offline grace); the edge reopens
// the stream with exponential backoff and jitter and reopens a session for every socket that
// still wants one. The chosen status is not re-sent: the service persists it.
//
// When the connection the stream runs on is going away (the service sent HTTP/2 GOAWAY: it is
// shutting down, or recycling connections), the edge half-closes the stream itself so the service
// can finish: the service does not end relay streams when it shuts down, and would otherwise wait
// for its whole shutdown deadline. The stream's last messages are still handled; then it is
// reopened as after any end.
//
// A failure of the stream itself that no retry can fix (the service refuses the edge's service
// identity, or has no RelayService) is logged as an error naming the setting, and retried at the
// longest backoff only, so the edge recovers once the service is fixed.
//
// Each (re)open asks `credential.open()` for the service identity to send: with EDGE_JWT_SECRET a
// token the edge minted and renews (service-token.js), so a stream reopened after hours still
// presents a valid one. The service checks that token only when the stream opens; it does not end
// the stream when the token expires. Should it do so (UNAUTHENTICATED once the token the stream
// was opened with has expired), that is not a refusal: the stream is reopened at once with a
// fresh token, as after any end.
const grpc = require('@grpc/grpc-js');
const { Backoff, NON_RETRYABLE, codeName } = require('./limits');

const DEFAULT_CHANNEL_OPTIONS = Object.freeze({
  // Reconnect quickly after a server restart; grpc-js defaults are 1 s initial, 120 s max.
  'grpc.initial_reconnect_backoff_ms': 250,
  'grpc.max_reconnect_backoff_ms': 5000,
  // Find a dead connection (a server that vanished without FIN) within ~40 s.
  'grpc.keepalive_time_ms': 30000,
  'grpc.keepalive_timeout_ms': 10000,
  // Deliveries are cut at ~256 KiB by the service, welcome pages are bounded: 16 MiB is ample.
  'grpc.max_receive_message_length': 16 * 1024 * 1024,
});

/** Why the service may refuse the relay stream itself, and what to change. */
function refusalHint(code, identityHint) {
  if (code === grpc.status.UNIMPLEMENTED) {
    return 'the presence service has no presence.v1.RelayService: it is older than this edge; upgrade it';
  }
  if (code === grpc.status.UNAUTHENTICATED || code === grpc.status.PERMISSION_DENIED) {
    return (
      identityHint ||
      "the presence service refused the edge's service identity: set EDGE_SERVICE_TOKEN to a service JWT " +
        '(role: "service"); without it the edge names itself with x-presence-service: edge, which only a ' +
        'development-mode service accepts'
    );
  }
  return 'the presence service refused the relay stream';
}

/** How close to its expiry (ms, by this host's clock) a credential counts as expired: clocks differ. */
const EXPIRY_SLACK_MS = 5000;

/**
 * What a session holder (a socket binding) provides. The relay sets `sessionId` ('' when the
 * holder has no session on the current stream) and calls:
 *   openFields() → { user_id | user_token, device, platform } of RelayOpen
 *   onSessionStarted()            right after its open was written (commands may follow at once)
 *   onWelcome(welcome)            a page of the session's Welcome
 *   onResult(result)              RelayResult
 *   onResync(resync)              a page of a Resync
 *   onSessionEnded(code, message) the service ended the session (sessionId is already '')
 *   onRelayDown()                 the stream ended; its session with it (sessionId is already '')
 *   onRelayRefused(code, message) the stream was refused for a reason no retry fixes
 */
class RelayClient {
  /**
   * @param {object} o
   * @param {typeof grpc.Client} o.Client presence.v1.RelayService client constructor
   * @param {string} o.target
   * @param {object} o.credential the edge's service identity, asked at each (re)open:
   *   open() → { metadata: grpc.Metadata, expiresAt?: ms since 1970 }; hint: what to fix when the
   *   service refuses it
   * @param {(groups: object[], sessions: Map<string, object>) => void} o.onDelivery
   * @param {object} o.log
   * @param {object} [o.backoff]
   */
  constructor({ Client, target, credential, onDelivery, log, backoff, channelOptions }) {
    this.client = new Client(target, grpc.credentials.createInsecure(), { ...DEFAULT_CHANNEL_OPTIONS, ...channelOptions });
    this.credential = credential;
    this.onDelivery = onDelivery;
    this.log = log;
    this.backoff = new Backoff(backoff);
    this.members = new Set(); // holders that want a session
    this.sessions = new Map(); // session id on the current stream → holder
    this.nextId = 0;
    this.call = null;
    this.draining = null; // a stream half-closed because its connection is going away
    this.state = 'idle';
    this.timer = null;
    this.closing = null;
    this.counters = { streams: 0, deliveries: 0, groups: 0 };
  }

  start() {
    if (!this.call && !this.timer && !this.closing) this._connect();
    return this;
  }

  _connect() {
    this.timer = null;
    if (this.closing) return;
    const { metadata, expiresAt } = this.credential.open();
    const call = this.client.Relay(metadata);
    this.call = call;
    this.state = 'connecting';
    this.counters.streams += 1;
    let finished = false;
    const finish = (status) => {
      if (finished) return;
      finished = true;
      if (this.call === call || this.draining === call) {
        this.draining = null;
        this._ended(status, expiresAt);
      }
    };
    call.on('metadata', () => {
      if (this.call !== call) return;
      this.state = 'open';
      this.backoff.up();
      this.log.info(this.counters.streams > 1 ? 'relay stream reopened' : 'relay stream open', { sessions: this.sessions.size });
      this._watchConnection(call);
    });
    call.on('data', (msg) => {
      if (this.call !== call && this.draining !== call) return;
      try {
        this._dispatch(msg);
      } catch (err) {
        this.log.error('failed to handle a message of the relay stream', { kind: msg && msg.kind, error: String(err && err.stack) });
      }
    });
    call.on('error', (err) => finish({ code: err.code, details: err.details || err.message, metadata: err.metadata }));
    call.on('status', finish);
    // Every socket that wants a session gets one on this stream (writes wait for the connection).
    for (const holder of this.members) this._openSession(holder);
  }

  /** Half-closes `call` once the connection it runs on stops being READY (GOAWAY). */
  _watchConnection(call) {
    const channel = this.client.getChannel();
    let sawReady = false;
    const check = () => {
      if (this.call !== call) return;
      const state = channel.getConnectivityState(false);
      if (state === grpc.connectivityState.READY) sawReady = true;
      else if (sawReady && state !== grpc.connectivityState.SHUTDOWN) {
        this.log.info('the presence service is closing the connection (GOAWAY); ending the relay stream to reopen it', {
          state: grpc.connectivityState[state],
          sessions: this.sessions.size,
        });
        this.call = null; // nothing more is written to it; its last messages are still handled
        this.draining = call;
        this.state = 'draining';
        try {
          call.end();
        } catch {
          // already over
        }
        return;
      }
      channel.watchConnectivityState(state, Infinity, check);
    };
    check();
  }

  _dispatch(msg) {
    switch (msg.kind) {
      case 'delivery':
        this.counters.deliveries += 1;
        this.counters.groups += msg.delivery.groups.length;
        this.onDelivery(msg.delivery.groups, this.sessions);
        break;
      case 'welcome': {
        const holder = this.sessions.get(msg.welcome.session_id);
        if (holder && msg.welcome.welcome) holder.onWelcome(msg.welcome.welcome);
        break;
      }
      case 'result': {
        const holder = this.sessions.get(msg.result.session_id);
        if (holder) holder.onResult(msg.result);
        break;
      }
      case 'resync': {
        const holder = this.sessions.get(msg.resync.session_id);
        if (holder && msg.resync.resync) holder.onResync(msg.resync.resync);
        break;
      }
      case 'ended': {
        const id = msg.ended.session_id;
        const holder = this.sessions.get(id);
        if (!holder) break;
        this.sessions.delete(id);
        holder.sessionId = '';
        holder.onSessionEnded(msg.ended.code, msg.ended.message);
        break;
      }
      case 'pong':
        break;
      default:
        this.log.debug('ignoring an unknown relay message', { kind: msg.kind });
    }
  }

  /**
   * @param {object} status
   * @param {number} [expiresAt] when the credential the stream was opened with expires (ms)
   */
  _ended(status, expiresAt) {
    const wasOpen = this.state === 'open' || this.state === 'draining';
    this.call = null;
    this.state = this.closing ? 'closed' : 'down';
    this.sessions.clear();
    const code = status && typeof status.code === 'number' ? status.code : grpc.status.UNKNOWN;
    const details = (status && status.details) || '';
    const holders = [...this.members];
    for (const holder of holders) holder.sessionId = '';
    if (this.closing) return;
    // An open stream ended because the token it was opened with ran out: the next open carries a
    // fresh one (when the credential renews; a static EDGE_SERVICE_TOKEN is refused then).
    const expired =
      wasOpen && code === grpc.status.UNAUTHENTICATED && expiresAt !== undefined && Date.now() >= expiresAt - EXPIRY_SLACK_MS;
    const refused = NON_RETRYABLE.has(code) && !expired;
    const delay = refused ? this.backoff.max() : this.backoff.next(status);
    const fields = { code: codeName(code), details, sessions: holders.length, attempt: this.backoff.attempt, delay_ms: delay };
    const hint = refusalHint(code, this.credential.hint);
    if (refused) this.log.error(`relay stream refused: ${hint}; retrying slowly`, fields);
    else if (expired) this.log.info('relay stream ended: the service token it was opened with expired; reopening', fields);
    else this.log.warn('relay stream ended; reopening', fields);
    for (const holder of holders) {
      if (refused) holder.onRelayRefused(code, hint);
      else holder.onRelayDown();
    }
    this.timer = setTimeout(() => this._connect(), delay);
  }

  _openSession(holder) {
    const id = String(++this.nextId);
    this.sessions.set(id, holder);
    holder.sessionId = id;
    this.call.write({ open: { session_id: id, ...holder.openFields() } });
    holder.onSessionStarted();
  }

  /** `holder` wants a session: opened now if the stream is there, else as soon as it is. */
  join(holder) {
    this.members.add(holder);
    if (this.call && !holder.sessionId) this._openSession(holder);
  }

  /** A session again after the service ended the previous one (with a code worth retrying). */
  rejoin(holder) {
    if (this.members.has(holder) && this.call && !holder.sessionId) this._openSession(holder);
  }

  /** `holder` leaves: its session is closed (the device leaves) and it wants none any more. */
  leave(holder) {
    this.members.delete(holder);
    const id = holder.sessionId;
    if (!id) return;
    holder.sessionId = '';
    if (this.sessions.get(id) !== holder) return;
    this.sessions.delete(id);
    if (this.call) this.call.write({ close: { session_id: id } });
  }

  /** Writes a command of `holder`'s session; false when it has none (the stream is down). */
  send(holder, message) {
    if (!this.call || !holder.sessionId) return false;
    this.call.write(message);
    return true;
  }

  /** Messages written and not yet taken by HTTP/2 (the service reads slower than we write). */
  backlog() {
    return this.call ? this.call.writableLength : 0;
  }

  stats() {
    return {
      state: this.state,
      streams: this.call || this.draining ? 1 : 0,
      sessions: this.sessions.size,
      opened: this.counters.streams,
      deliveries: this.counters.deliveries,
      groups: this.counters.groups,
    };
  }

  /** Ends the stream (half-close: the service ends every session) and the channel. */
  close() {
    if (this.closing) return this.closing;
    this.closing = new Promise((resolve) => {
      if (this.timer) clearTimeout(this.timer);
      this.timer = null;
      const call = this.call || this.draining;
      const done = () => {
        clearTimeout(cut);
        try {
          if (call) call.cancel();
        } catch {
          // already over
        }
        this.client.close();
        this.state = 'closed';
        resolve();
      };
      // The service answers a half-close by ending the stream; do not wait for a stuck one.
      const cut = setTimeout(done, call ? 2000 : 0);
      if (!call) return;
      call.once('status', done);
      call.once('error', done);
      try {
        call.end();
      } catch {
        done();
      }
    });
    return this.closing;
  }
}

module.exports = { RelayClient, DEFAULT_CHANNEL_OPTIONS };

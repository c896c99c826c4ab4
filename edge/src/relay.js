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
// The service ends relay streams when it shuts down (UNAVAILABLE, once their sessions ended). The
// edge also watches the connection the stream runs on: when it is going away (the service sent
// HTTP/2 GOAWAY: it is shutting down, or recycling connections), the edge half-closes the stream
// itself, so a service that would keep it (one older than 2f7a567 did, until its shutdown
// deadline) can finish. The stream's last messages are still handled; then it is reopened as
// after any end.
//
// A failure of the stream itself that no retry can fix (the service refuses the edge's service
// identity, or has no RelayService) is logged as an error naming the setting, and retried at the
// longest backoff only, so the edge recovers once the service is fixed.
//
// Each (re)open asks `credential.open()` for the service identity to send: with EDGE_JWT_SECRET a
// token the edge minted and renews (service-token.js), so a stream reopened after hours still
// presents a valid one. The service ends the stream (UNAUTHENTICATED) when the credential it runs
// on expires, unless it got a new token of the same service on the stream before
// (RelayRequest.refresh; src/grpc/relay.rs). So, while a stream is open on a minted token, the
// edge tracks when the stream's credential expires (the token it opened with, then each refresh
// the service accepted) and, once a third of that token's life is left, sends `refresh` with a
// newly minted one; the service answers with a RelayResult (session 0, this request id, code 0 =
// accepted). A refused refresh is tried again, REFRESH_ATTEMPTS times in all; then, as a last
// resort before the token expires, the stream is half-closed and reopened with a fresh token (its
// sessions reopen with it), saying why. A refresh never answered (a service older than RelayRefresh
// ignores it, and does not end the stream at the token's expiry either) is tried as often, then
// left alone. A stream that ends UNAUTHENTICATED once its credential has expired anyway (by this
// host's clock, within EXPIRY_SLACK_MS) is not a refusal: it is reopened at once with a fresh
// token. A static EDGE_SERVICE_TOKEN cannot be refreshed: when the service ends the stream at its
// expiry, that is logged as an error saying so and naming EDGE_JWT_SECRET, and the stream is
// retried at the longest backoff only (the service refuses the expired token).
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
/** Refreshes of one stream's credential tried (refused or unanswered) before giving up on them. */
const REFRESH_ATTEMPTS = 3;
/**
 * How long a refresh waits for its answer, and a refused one before the next attempt: a twelfth of
 * the token's life (REFRESH_ATTEMPTS attempts then end well within the last third of it), between
 * these bounds.
 */
const REFRESH_WAIT_MS = Object.freeze({ min: 50, max: 10000 });

const iso = (ms) => (ms === undefined ? null : new Date(ms).toISOString());

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
   *   open() → { metadata: grpc.Metadata, issuedAt?, expiresAt?: ms since 1970 }; refresh() (when
   *   it can be renewed) → { token, issuedAt, expiresAt }: a new token to send on the open stream;
   *   hint: what to fix when the service refuses it; expired: what to say when a credential that
   *   cannot be refreshed expired
   * @param {(groups: object[], sessions: Map<string, object>) => void} o.onDelivery
   * @param {object} o.log
   * @param {object} [o.backoff]
   * @param {boolean} [o.refresh=true] refresh the stream's credential in-band (false: tests only)
   */
  constructor({ Client, target, credential, onDelivery, log, backoff, channelOptions, refresh = true }) {
    this.client = new Client(target, grpc.credentials.createInsecure(), { ...DEFAULT_CHANNEL_OPTIONS, ...channelOptions });
    this.credential = credential;
    this.refreshing = refresh !== false && typeof credential.refresh === 'function';
    this.onDelivery = onDelivery;
    this.log = log;
    this.backoff = new Backoff(backoff);
    this.members = new Set(); // holders that want a session
    this.sessions = new Map(); // session id on the current stream → holder
    this.nextId = 0;
    this.call = null;
    this.link = null; // the credential of the current (or draining) stream: see _connect
    this.refreshIds = 0;
    this.draining = null; // a stream half-closed (its connection is going away, or refresh failed)
    this.state = 'idle';
    this.timer = null;
    this.closing = null;
    this.counters = { streams: 0, sessions: 0, deliveries: 0, groups: 0, refreshes: 0 };
  }

  start() {
    if (!this.call && !this.timer && !this.closing) this._connect();
    return this;
  }

  _connect() {
    this.timer = null;
    if (this.closing) return;
    const { metadata, issuedAt, expiresAt } = this.credential.open();
    const call = this.client.Relay(metadata);
    // The credential the stream runs on: the one it opened with, then each refresh accepted.
    // pending: refresh request id → the token sent; refused/unanswered: failed attempts in a row.
    const link = { call, issuedAt, expiresAt, timer: null, pending: new Map(), refused: 0, unanswered: 0, reason: null };
    this.call = call;
    this.link = link;
    this.state = 'connecting';
    this.counters.streams += 1;
    let finished = false;
    const finish = (status) => {
      if (finished) return;
      finished = true;
      this._stopRefresh(link);
      if (this.call === call || this.draining === call) {
        this.draining = null;
        this._ended(status, link);
      }
    };
    call.on('metadata', () => {
      if (this.call !== call) return;
      this.state = 'open';
      this.backoff.up();
      this.log.info(this.counters.streams > 1 ? 'relay stream reopened' : 'relay stream open', { sessions: this.sessions.size });
      this._watchConnection(link);
    });
    call.on('data', (msg) => {
      if (this.call !== call && this.draining !== call) return;
      try {
        this._dispatch(msg, link);
      } catch (err) {
        this.log.error('failed to handle a message of the relay stream', { kind: msg && msg.kind, error: String(err && err.stack) });
      }
    });
    call.on('error', (err) => finish({ code: err.code, details: err.details || err.message, metadata: err.metadata }));
    call.on('status', finish);
    // Every socket that wants a session gets one on this stream (writes wait for the connection).
    for (const holder of this.members) this._openSession(holder);
    this._scheduleRefresh(link);
  }

  /** Half-closes the stream of `link` once the connection it runs on stops being READY (GOAWAY). */
  _watchConnection(link) {
    const { call } = link;
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
        this._drain(link, 'GOAWAY');
        return;
      }
      channel.watchConnectivityState(state, Infinity, check);
    };
    check();
  }

  /**
   * Half-closes the current stream (the service then ends it, and its sessions) to reopen it once it
   * ended: nothing more is written to it; its last messages are still handled.
   */
  _drain(link, reason) {
    this._stopRefresh(link);
    link.reason = reason;
    this.call = null;
    this.draining = link.call;
    this.state = 'draining';
    try {
      link.call.end();
    } catch {
      // already over
    }
  }

  // ---- in-band refresh of the stream's credential ----------------------------------------------

  /** Sends the next refresh when a third of the life of the stream's current token is left. */
  _scheduleRefresh(link) {
    this._stopRefresh(link);
    if (!this.refreshing || link.issuedAt === undefined || link.expiresAt === undefined) return;
    const life = Math.max(0, link.expiresAt - link.issuedAt);
    // (Never at once again: a token minted within the same second as the last one is the same.)
    const delay = Math.max(REFRESH_WAIT_MS.min, link.expiresAt - life / 3 - Date.now());
    link.timer = setTimeout(() => this._refresh(link), delay);
  }

  _stopRefresh(link) {
    clearTimeout(link.timer);
    link.timer = null;
  }

  _refreshWait(link) {
    const life = Math.max(0, link.expiresAt - link.issuedAt);
    return Math.round(Math.min(REFRESH_WAIT_MS.max, Math.max(REFRESH_WAIT_MS.min, life / 12)));
  }

  /** Sends `refresh` with a newly minted token on the stream of `link`. */
  _refresh(link) {
    link.timer = null;
    if (this.call !== link.call) return;
    let fresh;
    try {
      fresh = this.credential.refresh();
    } catch (err) {
      this._refreshFailed(link, null, { code: grpc.status.INTERNAL, details: `no token minted: ${err && err.message}` });
      return;
    }
    const id = String(++this.refreshIds);
    link.pending.set(id, fresh);
    link.call.write({ refresh: { service_token: fresh.token, request_id: id } });
    link.timer = setTimeout(() => this._refreshFailed(link, id, null), this._refreshWait(link));
  }

  /** The service's answer to a refresh (a RelayResult of session 0). */
  _refreshAnswered(link, result) {
    const id = String(result.request_id);
    const fresh = link.pending.get(id);
    if (!fresh) return;
    link.pending.delete(id);
    if (result.code) {
      // An attempt that timed out was counted already.
      if (!fresh.timedOut) this._refreshFailed(link, id, { code: result.code, details: result.message });
      return;
    }
    // The stream runs on this token now (even if it is being drained, or the answer came late).
    link.issuedAt = fresh.issuedAt;
    link.expiresAt = fresh.expiresAt;
    link.refused = 0;
    link.unanswered = 0;
    this.counters.refreshes += 1;
    this.log.debug("relay stream's service token refreshed", { expires_at: iso(fresh.expiresAt) });
    if (this.call === link.call) this._scheduleRefresh(link);
  }

  /** A refresh was refused (`refusal`: { code, details }) or not answered in time (null). */
  _refreshFailed(link, id, refusal) {
    if (this.call !== link.call) return;
    this._stopRefresh(link);
    if (refusal) link.refused += 1;
    else {
      link.unanswered += 1;
      const fresh = link.pending.get(id);
      if (fresh) fresh.timedOut = true; // still accepted should the answer come late
    }
    const attempt = link.refused + link.unanswered;
    const fields = {
      attempt,
      attempts: REFRESH_ATTEMPTS,
      ...(refusal ? { code: codeName(refusal.code), details: refusal.details } : { waited_ms: this._refreshWait(link) }),
      expires_at: iso(link.expiresAt),
      sessions: this.sessions.size,
    };
    if (attempt < REFRESH_ATTEMPTS) {
      this.log.warn(
        refusal
          ? "the presence service refused to refresh the relay stream's service token; trying again"
          : "no answer to the refresh of the relay stream's service token; trying again",
        fields,
      );
      link.timer = setTimeout(() => this._refresh(link), refusal ? this._refreshWait(link) : 0);
      return;
    }
    if (!link.refused) {
      this.log.warn(
        "the presence service never answered the refresh of the relay stream's service token (one older than " +
          'this edge ignores it, and does not end the stream when the token expires either); no more refreshes on ' +
          'this stream: should the service end it when its token expires, it is reopened at once with a fresh one',
        fields,
      );
      return;
    }
    this.log.warn(
      `the presence service refused to refresh the relay stream's service token ${attempt} times in a row; as a ` +
        'last resort, ending the stream before its token expires and reopening it with a fresh one (its sessions reopen with it)',
      fields,
    );
    this._drain(link, 'refresh refused');
  }

  _dispatch(msg, link) {
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
        // Session 0 stands for the stream itself: the answer to a refresh.
        if (String(msg.result.session_id) === '0') {
          this._refreshAnswered(link, msg.result);
          break;
        }
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
   * @param {object} link the stream's credential (expiresAt: when the one it ran on expires, ms)
   */
  _ended(status, link) {
    const { expiresAt } = link;
    const wasOpen = this.state === 'open' || this.state === 'draining';
    this.call = null;
    if (this.link === link) this.link = null;
    this.state = this.closing ? 'closed' : 'down';
    this.sessions.clear();
    const code = status && typeof status.code === 'number' ? status.code : grpc.status.UNKNOWN;
    const details = (status && status.details) || '';
    const holders = [...this.members];
    for (const holder of holders) holder.sessionId = '';
    if (this.closing) return;
    // An open stream ended because the token it ran on ran out (not refreshed in time, or no
    // refresh at all): the next open carries a fresh one when the credential renews. A static
    // EDGE_SERVICE_TOKEN does not: the service refuses it from now on.
    const expired =
      wasOpen && code === grpc.status.UNAUTHENTICATED && expiresAt !== undefined && Date.now() >= expiresAt - EXPIRY_SLACK_MS;
    const renewable = typeof this.credential.refresh === 'function';
    const staticExpired = expired && !renewable;
    const refused = (NON_RETRYABLE.has(code) && !expired) || staticExpired;
    const delay = refused ? this.backoff.max() : this.backoff.next(status);
    const fields = { code: codeName(code), details, sessions: holders.length, attempt: this.backoff.attempt, delay_ms: delay };
    if (link.reason) fields.reason = link.reason;
    if (expiresAt !== undefined) fields.expires_at = iso(expiresAt);
    const hint = refusalHint(code, this.credential.hint);
    if (staticExpired) {
      this.log.error(`relay stream ended: ${this.credential.expired || 'its service token expired and cannot be renewed'}; retrying slowly`, fields);
    } else if (refused) this.log.error(`relay stream refused: ${hint}; retrying slowly`, fields);
    else if (expired) {
      // With refresh this should not happen (refresh failed, or the service is far behind our clock).
      this.log[this.refreshing ? 'warn' : 'info']('relay stream ended: the service token it ran on expired; reopening with a fresh one', {
        ...fields,
        refresh: this.refreshing ? 'on' : 'off',
      });
    } else this.log.warn('relay stream ended; reopening', fields);
    for (const holder of holders) {
      if (refused) holder.onRelayRefused(code, hint);
      else holder.onRelayDown();
    }
    this.timer = setTimeout(() => this._connect(), delay);
  }

  _openSession(holder) {
    const id = String(++this.nextId);
    this.sessions.set(id, holder);
    this.counters.sessions += 1;
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
      sessions_opened: this.counters.sessions,
      deliveries: this.counters.deliveries,
      groups: this.counters.groups,
      refreshes: this.counters.refreshes,
      // When the credential the stream runs on expires (null: no stream, or one that never expires).
      credential_expires_at: this.link ? iso(this.link.expiresAt) : null,
    };
  }

  /** Ends the stream (half-close: the service ends every session) and the channel. */
  close() {
    if (this.closing) return this.closing;
    this.closing = new Promise((resolve) => {
      if (this.timer) clearTimeout(this.timer);
      this.timer = null;
      if (this.link) this._stopRefresh(this.link);
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

'use strict';
// One browser socket: the seed's socket.io events (and the additive ones) on one side, one device
// session of the edge's relay stream on the other. The edge keeps no presence state; per socket
// only the user, its session and the last version sent for each user, so a stale or duplicate
// update is dropped and a presence_info never moves the client back in time.
const grpc = require('@grpc/grpc-js');
const { NON_RETRYABLE, codeName, Backoff, TokenBucket } = require('./limits');
const { describe } = require('./settings');
const {
  seedStatusToEnum,
  parseUserId,
  sanitizeDeviceLabel,
  toSeedPresence,
  samePayload,
  versionOf,
  clientPlatformToEnum,
  clientActivityToEnum,
  parseCustomStatus,
} = require('./convert');

// Socket.io event for problems the seed protocol has no word for (bad input, refused credential).
// Seed clients do not listen to it, so it changes nothing for them.
const ERROR_EVENT = 'presence_error';
const REQUEST_DEADLINE_MS = 10000;
const MAX_INFLIGHT = Object.freeze({ get_presence: 4, set_custom_status: 2 });
// The service ends nothing over its status limit (PRESENCE_RATE_STATUS_PER_MIN, default 30 per
// user) but refuses the change; each socket spends update_status from this bucket, and changes
// over it are coalesced (the latest wins) and sent when a token is back.
const DEFAULT_STATUS_RATE = Object.freeze({ burst: 10, refillMs: 2000 });
// Every other command (activity, get_presence, set_custom_status): what a person can do, far less
// than what a script can; over it the command is refused with presence_error.
const DEFAULT_COMMAND_RATE = Object.freeze({ burst: 20, refillMs: 250 });
// Commands queued on the relay stream (not yet taken by HTTP/2) past which optional commands are
// refused instead of queued: a slow service must not make the edge buffer without bound.
const MAX_RELAY_BACKLOG = 20000;
// The service's rate-limit refusals of activity changes are reported at most this often.
const LIMIT_REPORT_MS = 60000;
// Far above what the service answers (PRESENCE_MAX_IDS, default 1,000: it refuses more, naming
// the setting); the edge only stops a browser from making it carry megabytes.
const MAX_GET_PRESENCE_IDS = 10000;
// A resync longer than this reaches the browser in several presence_resync events.
const MAX_RESYNC_BATCH = 1000;
// Request ids carry the command in their low bits, so a refusal names the right event.
const KIND = Object.freeze({ update_status: 1, activity: 2, get_presence: 3, set_custom_status: 4 });
const KIND_EVENT = Object.freeze(['', 'update_status', 'activity', 'get_presence', 'set_custom_status']);

/**
 * A user id as a Map key: a Number while it is exact (every realistic id: no string per entry), the
 * decimal string above 2^53. The same id always gets the same key.
 */
function userKey(id) {
  return typeof id === 'string' && id.length <= 15 ? Number(id) : String(id);
}

// Views are immutable once built, so sockets that were told the same thing share one: a user's
// presence in the Welcome of each of their contacts is one object, not one per contact. Bounded:
// the table is emptied when it is full (sharing then starts again).
const VIEW_CACHE_MAX = 100000;
const viewCache = new Map();

/** A UserPresence as the edge passes it on: its user key, version and client payload. */
function presenceView(p) {
  return { key: userKey(p.user_id), version: versionOf(p), payload: toSeedPresence(p) };
}

/** presenceView(p), shared with every other socket told exactly the same. */
function sharedView(p) {
  const view = presenceView(p);
  const id = `${view.key}/${view.version}`;
  const cached = viewCache.get(id);
  if (cached && samePayload(cached.payload, view.payload)) return cached;
  if (viewCache.size >= VIEW_CACHE_MAX) viewCache.clear();
  viewCache.set(id, view);
  return view;
}

/** handshake auth.device, else the User-Agent, else 'web'; printable and at most 64 characters. */
function deviceLabel(handshake) {
  const auth = handshake.auth || {};
  return sanitizeDeviceLabel(auth.device) || sanitizeDeviceLabel(handshake.headers['user-agent']) || 'web';
}

/** The socket's binding method `method`, as a listener shared by every socket. */
function listener(event, method) {
  return function onSocketEvent(...args) {
    const binding = this.data.binding;
    try {
      binding[method](...args);
    } catch (err) {
      binding.log.error('handler failed', { socket: binding.socketId, event, error: String(err && err.stack) });
    }
  };
}
const LISTENERS = Object.freeze(
  [
    ['user_authenticated', 'onUserAuthenticated'],
    ['update_status', 'onUpdateStatus'],
    ['get_presence', 'onGetPresence'],
    ['activity', 'onActivity'],
    ['set_custom_status', 'onSetCustomStatus'],
    ['disconnect', 'close'],
  ].map(([event, method]) => [event, listener(event, method)]),
);

class SocketBinding {
  /**
   * @param {object} edge { identity, relay, bindings, log, statusRate, commandRate, backoff, requestTimeoutMs }
   * @param {import('socket.io').Socket} socket
   */
  constructor(edge, socket) {
    this.edge = edge;
    this.socket = socket;
    this.socketId = socket.id;
    this.log = edge.log;
    this.sessionId = ''; // set by the relay
    this.userId = null; // decimal string once user_authenticated
    this.userKey = null; // the same as a Map key (userKey)
    this.joined = false; // wants a session (from user_authenticated until the socket goes)
    this.welcomed = false;
    this.closed = false;
    this.known = new Map(); // user id → view last sent to this socket
    const { handshake } = socket;
    const auth = handshake.auth || {};
    this.device = deviceLabel(handshake);
    this.platform = clientPlatformToEnum(auth.platform);
    this.badPlatform = auth.platform !== undefined && auth.platform !== null && !this.platform ? describe(auth.platform) : null;
    this.activity = 'ACTIVITY_ACTIVE'; // what the browser said last
    this.activitySent = null; // what the current session has (null: not known)
    // Created on first use: most sockets never need them.
    this.status = null; // { pending, bucket, timer }
    this.commands = null; // TokenBucket
    this.requests = null; // request id → request
    this.seq = 0;
    this.retry = null;
    this.retryTimer = null;
    this.resync = null;
    this.limitReportedAt = 0;
    this.relayRefused = false;

    // Shared listeners (socket.io calls them with the socket as `this`): no closures per socket.
    socket.data.binding = this;
    for (const [event, listener] of LISTENERS) socket.on(event, listener);
  }

  get fields() {
    return { socket: this.socketId, user_id: this.userId };
  }

  /** Tells the socket (and the log) that what it sent was not done. */
  refuse(event, message, extra = {}, code) {
    this.log.warn(`${event} ignored: ${message}`, { ...this.fields, ...extra });
    this.socket.emit(ERROR_EVENT, code ? { event, code, message } : { event, message });
  }

  // ---- browser events --------------------------------------------------------------------------

  onUserAuthenticated(claimed) {
    if (this.closed) return;
    let userId;
    if (this.edge.identity === 'token') {
      userId = this.socket.data.tokenUserId;
      // The token decides. Emitting user_authenticated with no id is fine in this mode.
      if (claimed !== undefined && claimed !== null && parseUserId(claimed) !== userId) {
        this.log.warn('user_authenticated names another user than the token; the socket stays the token user', {
          socket: this.socketId,
          claimed: describe(claimed),
          token_user_id: userId,
        });
      }
    } else {
      userId = parseUserId(claimed);
      if (!userId) {
        this.refuse('user_authenticated', 'userId must be a positive integer below 2^63', { value: describe(claimed) });
        return;
      }
    }
    if (this.joined && this.userId === userId) return; // already this user's device
    // Each open costs the service a device registration: a socket switching users (trust-client)
    // or reopening after a refusal, again and again, spends from the command budget.
    if (!this.admit('user_authenticated', null, { backlog: false })) return;
    if (this.joined) this.leave(); // trust-client: the socket switched users; the old user's device leaves
    if (this.badPlatform) {
      this.refuse('user_authenticated', "auth.platform must be 'desktop', 'mobile' or 'web'; the device is connected without a platform", {
        value: this.badPlatform,
      });
      this.badPlatform = null;
    }
    this.userId = userId;
    this.userKey = userKey(userId);
    this.joined = true;
    this.edge.relay.join(this);
  }

  onUpdateStatus(value) {
    if (this.closed) return;
    const status = seedStatusToEnum(value);
    if (!status) {
      this.refuse('update_status', "status must be one of 'online', 'offline', 'away', 'busy'", { value: describe(value) });
      return;
    }
    if (!this.joined) {
      this.refuse('update_status', 'emit user_authenticated first');
      return;
    }
    if (!this.status) this.status = { pending: null, bucket: new TokenBucket(this.edge.statusRate), timer: null };
    this.status.pending = status;
    this.flushStatus();
  }

  onActivity(value) {
    if (this.closed) return;
    const activity = clientActivityToEnum(value);
    if (!activity) {
      this.refuse('activity', "activity must be one of 'active', 'idle', 'background'", { value: describe(value) });
      return;
    }
    this.activity = activity; // before user_authenticated: the session starts with it
    if (!this.sessionId || this.activitySent === activity) return;
    if (!this.admit('activity')) return;
    this.sendActivity();
  }

  onGetPresence(ids) {
    if (this.closed) return;
    if (!Array.isArray(ids)) {
      this.refuse('get_presence', 'expected an array of user ids', { value: describe(ids) });
      return;
    }
    if (!this.joined) {
      this.refuse('get_presence', 'emit user_authenticated first');
      return;
    }
    if (ids.length > MAX_GET_PRESENCE_IDS) {
      this.refuse('get_presence', `at most ${MAX_GET_PRESENCE_IDS} user ids per get_presence`, { ids: ids.length });
      return;
    }
    const userIds = this.validIds(ids);
    if (userIds.length === 0) {
      this.socket.emit('presence_info', []);
      return;
    }
    if (!this.admit('get_presence')) return;
    this.request('get_presence', { user_ids: userIds }, null);
  }

  onSetCustomStatus(value, ack) {
    if (this.closed) return;
    if (typeof value === 'function' && ack === undefined) {
      ack = value; // emit('set_custom_status', callback): clear
      value = undefined;
    }
    const reply = typeof ack === 'function' ? ack : null;
    const parsed = parseCustomStatus(value);
    const fail = (message) => {
      this.refuse('set_custom_status', message, { value: describe(value) });
      if (reply) reply({ ok: false, message });
    };
    if (parsed.error) return fail(parsed.error);
    if (!this.joined) return fail('emit user_authenticated first');
    if (!this.admit('set_custom_status', reply)) return undefined;
    this.request('set_custom_status', { custom_status: parsed.custom_status }, reply);
    return undefined;
  }

  /** The ids the service can answer for (positive, below 2^63); the others are skipped with a warning. */
  validIds(ids) {
    const valid = [];
    for (const id of ids) {
      const parsed = parseUserId(id);
      if (parsed) valid.push(parsed);
    }
    const invalid = ids.length - valid.length;
    if (invalid) this.log.warn('get_presence: skipped invalid user ids', { ...this.fields, invalid });
    return valid;
  }

  /**
   * A command may go: within this socket's budget and (unless `backlog` is false) the relay
   * stream not backed up.
   */
  admit(event, reply, { backlog = true } = {}) {
    const refuse = (message) => {
      this.refuse(event, message);
      if (reply) reply({ ok: false, message });
      return false;
    };
    const inflight = MAX_INFLIGHT[event];
    if (inflight && this.requests) {
      let n = 0;
      for (const r of this.requests.values()) if (r.event === event) n += 1;
      if (n >= inflight) return refuse(`too many ${event} requests in flight`);
    }
    if (!this.commands) this.commands = new TokenBucket(this.edge.commandRate);
    if (!this.commands.take()) return refuse('too many requests from this socket; slow down');
    if (backlog && this.edge.relay.backlog() > MAX_RELAY_BACKLOG) return refuse('the presence service is busy; try again shortly');
    return true;
  }

  // ---- commands --------------------------------------------------------------------------------

  requestId(event) {
    this.seq += 1;
    return this.seq * 8 + KIND[event];
  }

  /** A command the service answers (get_presence, set_custom_status): waits for its RelayResult. */
  request(event, body, reply) {
    if (!this.requests) this.requests = new Map();
    const req = { id: this.requestId(event), event, body, reply, session: '', timer: null };
    const deadline = this.edge.requestTimeoutMs || REQUEST_DEADLINE_MS;
    req.timer = setTimeout(() => {
      this.requests.delete(req.id);
      this.failRequest(req, `no answer from the presence service within ${deadline / 1000} s`);
    }, deadline);
    this.requests.set(req.id, req);
    this.sendRequest(req);
  }

  sendRequest(req) {
    const message = { [req.event]: { ...req.body, session_id: this.sessionId, request_id: req.id } };
    if (this.edge.relay.send(this, message)) req.session = this.sessionId;
  }

  failRequest(req, message, code) {
    clearTimeout(req.timer);
    this.refuse(req.event, message, {}, code);
    if (req.reply) req.reply({ ok: false, message, ...(code ? { code } : {}) });
  }

  /** Requests the ended session took with it: reads are asked again, writes are reported. */
  sessionLost(retry) {
    if (!this.requests) return;
    for (const req of [...this.requests.values()]) {
      if (retry && (req.event === 'get_presence' || !req.session)) {
        req.session = '';
        continue;
      }
      this.requests.delete(req.id);
      this.failRequest(
        req,
        req.session
          ? 'the presence session ended before the service answered; it may or may not have been done, emit it again'
          : 'the presence session ended',
      );
    }
  }

  flushStatus() {
    const st = this.status;
    if (this.closed || !st || !st.pending || !this.sessionId || st.timer) return;
    const wait = st.bucket.wait();
    if (wait > 0) {
      this.log.debug('update_status coalesced by the status rate limit', { ...this.fields, wait_ms: wait });
      st.timer = setTimeout(() => {
        st.timer = null;
        this.flushStatus();
      }, wait);
      return;
    }
    st.bucket.take();
    const status = st.pending;
    if (this.edge.relay.send(this, { update_status: { session_id: this.sessionId, status, request_id: this.requestId('update_status') } })) {
      st.pending = null;
    }
  }

  sendActivity() {
    const activity = this.activity;
    const message = { set_activity: { session_id: this.sessionId, activity, request_id: this.requestId('activity') } };
    if (this.edge.relay.send(this, message)) this.activitySent = activity;
  }

  // ---- the relay -------------------------------------------------------------------------------

  openFields() {
    const fields = { device: this.device, platform: this.platform || 'PLATFORM_UNSPECIFIED' };
    if (this.edge.identity === 'token') fields.user_token = this.socket.data.token;
    else fields.user_id = this.userId;
    return fields;
  }

  onSessionStarted() {
    this.welcomed = false;
    // A new session starts active (the service does not keep a device's activity).
    this.activitySent = 'ACTIVITY_ACTIVE';
    if (this.activity !== 'ACTIVITY_ACTIVE') this.sendActivity();
    this.flushStatus();
    if (this.requests) for (const req of this.requests.values()) if (!req.session) this.sendRequest(req);
  }

  /** Welcome: every contact, so the client's map is filled at once (skipping what it already has). */
  onWelcome(welcome) {
    if (this.closed) return;
    if (welcome.self) {
      // Never sent to the browser (the seed never told a user about themselves), but remembered
      // so a get_presence of oneself is never older than what the service said.
      const self = presenceView(welcome.self);
      this.known.set(self.key, self);
    }
    for (const p of welcome.contacts) {
      const view = sharedView(p);
      const had = this.known.get(view.key);
      // A snapshot is authoritative for a new session (after a service restart versions may even
      // restart), so it replaces what we had; it is only re-sent when it differs.
      this.known.set(view.key, view);
      if (had && had.version === view.version && samePayload(had.payload, view.payload)) continue;
      this.socket.emit('presence_updated', view.payload);
    }
    if (welcome.last_page) {
      this.welcomed = true;
      this.relayRefused = false;
      if (this.retry) this.retry.up();
      this.log.debug('presence session open', { ...this.fields, session: this.sessionId, connection_id: welcome.connection_id });
    }
  }

  /**
   * A delivery for this socket: true (and remembered) unless older than what it already has, or
   * about the socket's own user (remembered, not sent: the seed never told a user about themselves).
   */
  accept(view) {
    if (this.closed) return false;
    const had = this.known.get(view.key);
    if (had !== undefined && view.version <= had.version) return false;
    this.known.set(view.key, view);
    return view.key !== this.userKey;
  }

  /** A get_presence entry; never older than what this socket was already told. */
  fromQuery(p) {
    const view = presenceView(p);
    const had = this.known.get(view.key);
    if (had && had.version > view.version) return had.payload;
    if (had) this.known.set(view.key, view);
    return view.payload;
  }

  onResult(result) {
    if (this.closed) return;
    const id = Number(result.request_id);
    const event = KIND_EVENT[id % 8] || 'unknown';
    const code = result.code ? codeName(result.code) : null;
    if (event === 'get_presence' || event === 'set_custom_status') {
      const req = this.requests && this.requests.get(id);
      if (!req) return; // timed out meanwhile
      this.requests.delete(id);
      if (code) return this.failRequest(req, result.message, code);
      clearTimeout(req.timer);
      if (event === 'get_presence') {
        this.socket.emit('presence_info', result.users.map((p) => this.fromQuery(p)));
        return undefined;
      }
      const view = result.presence ? presenceView(result.presence) : null;
      if (view) this.accept(view);
      if (req.reply) req.reply({ ok: true, presence: view ? view.payload : null });
      return undefined;
    }
    if (!code) return undefined;
    if (event === 'activity') {
      this.activitySent = null;
      if (result.code === grpc.status.RESOURCE_EXHAUSTED) {
        const now = Date.now();
        if (now - this.limitReportedAt < LIMIT_REPORT_MS) {
          this.log.debug('activity refused again by the rate limit; reported already', this.fields);
          return undefined;
        }
        this.limitReportedAt = now;
      }
    }
    this.refuse(event, result.message, {}, code);
    return undefined;
  }

  onResync(resync) {
    if (this.closed) return;
    if (!this.resync) this.resync = [];
    for (const p of resync.users) {
      const view = presenceView(p);
      if (this.accept(view)) this.resync.push(view.payload);
    }
    if (resync.last_page || this.resync.length >= MAX_RESYNC_BATCH) {
      const list = this.resync;
      this.resync = null;
      this.socket.emit('presence_resync', list);
    }
  }

  onSessionEnded(code, message) {
    if (this.closed) return;
    this.welcomed = false;
    this.resync = null;
    const name = codeName(code);
    if (NON_RETRYABLE.has(code)) {
      this.log.warn('presence session refused; not retrying', { ...this.fields, code: name, details: message });
      this.leave();
      this.socket.emit(ERROR_EVENT, {
        event: 'user_authenticated',
        code: name,
        message: `presence session refused, not retried: ${name}${message ? ` (${message})` : ''}`,
      });
      if (code === grpc.status.UNAUTHENTICATED || code === grpc.status.PERMISSION_DENIED) {
        // The credential is bad (expired token…): tell the client clearly by closing the socket; it
        // reconnects with a fresh token.
        this.socket.disconnect(true);
      }
      return;
    }
    this.sessionLost(true);
    if (!this.retry) this.retry = new Backoff(this.edge.backoff);
    const delay = this.retry.next(null);
    this.log.info('presence session ended; reopening', { ...this.fields, code: name, details: message, attempt: this.retry.attempt, delay_ms: delay });
    clearTimeout(this.retryTimer);
    this.retryTimer = setTimeout(() => {
      this.retryTimer = null;
      if (!this.closed && this.joined) this.edge.relay.rejoin(this);
    }, delay);
  }

  onRelayDown() {
    if (this.closed) return;
    this.welcomed = false;
    this.resync = null;
    this.sessionLost(true);
  }

  onRelayRefused(code) {
    this.onRelayDown();
    if (this.closed || this.relayRefused) return;
    this.relayRefused = true; // once, until a session is welcomed again
    const name = codeName(code);
    this.socket.emit(ERROR_EVENT, {
      event: 'user_authenticated',
      code: name,
      message: `the presence service refused this edge (${name}); presence is unavailable until that is fixed`,
    });
  }

  /** The socket's device leaves (the socket switched users, or its session was refused for good). */
  leave() {
    this.edge.relay.leave(this);
    this.joined = false;
    this.welcomed = false;
    this.known.clear();
    this.resync = null;
    clearTimeout(this.retryTimer);
    this.retryTimer = null;
    if (this.status) {
      clearTimeout(this.status.timer);
      this.status = null;
    }
    if (this.requests) {
      for (const req of this.requests.values()) this.failRequest(req, 'the presence session ended');
      this.requests = null;
    }
  }

  close(reason) {
    if (this.closed) return;
    this.closed = true;
    this.edge.bindings.delete(this);
    this.edge.relay.leave(this);
    this.joined = false;
    clearTimeout(this.retryTimer);
    if (this.status) clearTimeout(this.status.timer);
    if (this.requests) for (const req of this.requests.values()) clearTimeout(req.timer);
    this.requests = null;
    this.known.clear();
    this.log.debug('socket closed', { ...this.fields, reason });
  }
}

module.exports = {
  SocketBinding,
  presenceView,
  ERROR_EVENT,
  DEFAULT_STATUS_RATE,
  DEFAULT_COMMAND_RATE,
  REQUEST_DEADLINE_MS,
};

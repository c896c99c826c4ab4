'use strict';
// The edge: a socket.io 4 server speaking the seed's presence protocol to browsers and mobile
// apps, backed by the Rust presence service (presence.v1 over gRPC). It keeps no presence state
// of its own: each browser socket maps to one Authenticate stream, plus the last version seen per
// user on that socket so stale or duplicate updates are dropped.
const http = require('node:http');
const grpc = require('@grpc/grpc-js');
const { Server } = require('socket.io');

const { loadPresenceProto } = require('./proto');
const { ChannelPool } = require('./pool');
const { DeviceSession } = require('./session');
const { createLogger } = require('./log');
const {
  seedStatusToEnum,
  parseUserId,
  toSeedPresence,
  versionOf,
  decodeJwtPayload,
} = require('./convert');

const IDENTITY_MODES = Object.freeze(['token', 'trust-client']);
const GET_PRESENCE_DEADLINE_MS = 10000;
const MAX_INFLIGHT_GET_PRESENCE = 4;
// Socket.io event for problems the seed protocol has no word for (bad input, refused credential).
// Seed clients do not listen to it, so it changes nothing for them.
const ERROR_EVENT = 'presence_error';

function describe(value) {
  try {
    const text = typeof value === 'string' ? JSON.stringify(value) : JSON.stringify(value) ?? String(value);
    return text.length > 80 ? `${text.slice(0, 77)}...` : text;
  } catch {
    return typeof value;
  }
}

function deviceLabel(socket) {
  const auth = socket.handshake.auth || {};
  const fromAuth = typeof auth.device === 'string' ? auth.device.trim() : '';
  const ua = socket.handshake.headers['user-agent'];
  // The session trims it to the service's 64 characters.
  return fromAuth || (typeof ua === 'string' && ua.trim()) || 'web';
}

/** One browser socket. */
class SocketBinding {
  constructor(edge, socket) {
    this.edge = edge;
    this.socket = socket;
    this.log = edge.log;
    this.userId = null;
    this.session = null;
    this.closed = false;
    this.inflight = 0;
    // user id (decimal string) → { version: bigint, payload: seed payload } last sent to this socket
    this.known = new Map();

    const on = (event, handler) => {
      socket.on(event, (...args) => {
        try {
          handler.apply(this, args);
        } catch (err) {
          this.log.error('handler failed', { socket: socket.id, event, error: String(err && err.stack) });
        }
      });
    };
    on('user_authenticated', this.onUserAuthenticated);
    on('update_status', this.onUpdateStatus);
    on('get_presence', this.onGetPresence);
    socket.on('disconnect', (reason) => this.close(reason));
  }

  get fields() {
    return { socket: this.socket.id, user_id: this.userId };
  }

  refuse(event, message, extra = {}) {
    this.log.warn(`${event} ignored: ${message}`, { ...this.fields, ...extra });
    this.socket.emit(ERROR_EVENT, { event, message });
  }

  /** The user this socket acts as for unary calls, or null before it is known. */
  actingUser() {
    return this.edge.identity === 'token' ? this.socket.data.tokenUserId : this.userId;
  }

  metadataFor(userId) {
    const md = new grpc.Metadata();
    if (this.edge.identity === 'token') {
      // The user's own credential; the presence service verifies it.
      md.set('authorization', `Bearer ${this.socket.data.token}`);
    } else {
      this.edge.setServiceIdentity(md);
      md.set('x-presence-user-id', userId);
    }
    return md;
  }

  onUserAuthenticated(claimed) {
    if (this.closed) return;
    let userId;
    if (this.edge.identity === 'token') {
      userId = this.socket.data.tokenUserId;
      // The token decides. Emitting user_authenticated with no id is fine in this mode.
      if (claimed !== undefined && claimed !== null && parseUserId(claimed) !== userId) {
        this.log.warn('user_authenticated names another user than the token; the socket stays the token user', {
          socket: this.socket.id,
          claimed: describe(claimed),
          token_user_id: userId,
        });
      }
    } else {
      userId = parseUserId(claimed);
      if (!userId) {
        this.refuse('user_authenticated', 'userId must be a positive integer', { value: describe(claimed) });
        return;
      }
    }
    if (this.session && this.userId === userId) return; // already this user's device
    if (this.session) {
      // trust-client: the socket switched users; the old user's device leaves.
      this.session.close();
      this.session = null;
      this.known.clear();
    }
    this.userId = userId;
    const fields = this.fields;
    this.session = new DeviceSession({
      pool: this.edge.pool,
      metadata: () => this.metadataFor(userId),
      device: deviceLabel(this.socket),
      log: this.log,
      backoff: this.edge.backoff,
      statusRate: this.edge.statusRate,
      logFields: fields,
      onWelcome: (welcome) => this.applySnapshot(welcome),
      onPresence: (presence) => this.deliver(presence),
      onFatal: (status) => this.onSessionRefused(status),
    }).start();
  }

  onUpdateStatus(value) {
    if (this.closed) return;
    const status = seedStatusToEnum(value);
    if (!status) {
      this.refuse('update_status', "status must be one of 'online', 'offline', 'away', 'busy'", {
        value: describe(value),
      });
      return;
    }
    if (!this.session) {
      this.refuse('update_status', 'emit user_authenticated first');
      return;
    }
    this.session.setStatus(status);
  }

  onGetPresence(ids) {
    if (this.closed) return;
    if (!Array.isArray(ids)) {
      this.refuse('get_presence', 'expected an array of user ids', { value: describe(ids) });
      return;
    }
    const actingUser = this.actingUser();
    if (!actingUser) {
      this.refuse('get_presence', 'emit user_authenticated first');
      return;
    }
    const userIds = [];
    let invalid = 0;
    for (const id of ids) {
      const parsed = parseUserId(id);
      if (parsed) userIds.push(parsed);
      else invalid += 1;
    }
    if (invalid) this.log.warn('get_presence: skipped invalid user ids', { ...this.fields, invalid });
    if (userIds.length === 0) {
      this.socket.emit('presence_info', []);
      return;
    }
    if (this.inflight >= MAX_INFLIGHT_GET_PRESENCE) {
      this.refuse('get_presence', 'too many get_presence requests in flight');
      return;
    }
    this.inflight += 1;
    const md = this.metadataFor(actingUser);
    // Wait through a short gap (server restart) instead of failing at once.
    md.setOptions({ waitForReady: true });
    const deadline = Date.now() + GET_PRESENCE_DEADLINE_MS;
    let client;
    try {
      client = this.edge.pool.unary();
    } catch (err) {
      this.inflight -= 1;
      this.refuse('get_presence', 'edge is shutting down');
      return;
    }
    client.GetPresence({ user_ids: userIds }, md, { deadline }, (err, response) => {
      this.inflight -= 1;
      if (this.closed) return;
      if (err) {
        this.refuse('get_presence', `presence service error: ${grpc.status[err.code] || err.code}`, {
          details: err.details,
        });
        return;
      }
      const users = (response.users || []).map((p) => this.fromQuery(p));
      this.socket.emit('presence_info', users);
    });
  }

  emitPresence(payload) {
    this.socket.emit('presence_updated', payload);
  }

  /** Welcome: every contact, so the client's map is filled at once (skipping what it already has). */
  applySnapshot(welcome) {
    if (this.closed) return;
    if (welcome.self) {
      // Not sent to the browser (the seed never told a user about themselves), but remembered so
      // updates of the user's own presence from their other devices are ordered too.
      const self = welcome.self;
      this.known.set(String(self.user_id), { version: versionOf(self), payload: toSeedPresence(self) });
    }
    for (const p of welcome.contacts || []) {
      const key = String(p.user_id);
      const version = versionOf(p);
      const payload = toSeedPresence(p);
      const had = this.known.get(key);
      // A snapshot is authoritative for a fresh stream (after a server restart versions may even
      // restart), so it replaces what we had; it is only re-sent when it differs.
      this.known.set(key, { version, payload });
      if (had && had.version === version && samePayload(had.payload, payload)) continue;
      this.emitPresence(payload);
    }
  }

  /** presence_updated from the stream: dropped unless newer than what this socket already has. */
  deliver(p) {
    if (this.closed) return;
    const key = String(p.user_id);
    const version = versionOf(p);
    const had = this.known.get(key);
    if (had && version <= had.version) {
      this.log.debug('dropping stale presence', { ...this.fields, about: key, version: String(version) });
      return;
    }
    const payload = toSeedPresence(p);
    this.known.set(key, { version, payload });
    this.emitPresence(payload);
  }

  /** A GetPresence entry; never older than what this socket was already told. */
  fromQuery(p) {
    const key = String(p.user_id);
    const version = versionOf(p);
    const had = this.known.get(key);
    if (had && had.version > version) return had.payload;
    const payload = toSeedPresence(p);
    if (had) this.known.set(key, { version, payload });
    return payload;
  }

  onSessionRefused(status) {
    if (this.closed) return;
    const name = grpc.status[status.code] || String(status.code);
    this.session = null;
    this.known.clear();
    this.socket.emit(ERROR_EVENT, {
      event: 'user_authenticated',
      message: `presence service refused the connection: ${name}`,
      code: name,
    });
    if (status.code === grpc.status.UNAUTHENTICATED || status.code === grpc.status.PERMISSION_DENIED) {
      // The credential is bad (expired token…): tell the client clearly by closing the socket; it
      // reconnects with a fresh token.
      this.socket.disconnect(true);
    }
  }

  close(reason) {
    if (this.closed) return;
    this.closed = true;
    if (this.session) {
      this.session.close();
      this.session = null;
    }
    this.known.clear();
    this.log.debug('socket closed', { ...this.fields, reason });
  }
}

function samePayload(a, b) {
  return a.user_id === b.user_id && a.status === b.status && a.last_seen === b.last_seen;
}

function tokenMiddleware(log) {
  return (socket, next) => {
    const auth = socket.handshake.auth || {};
    let token = typeof auth.token === 'string' ? auth.token.trim() : '';
    if (token.toLowerCase().startsWith('bearer ')) token = token.slice(7).trim();
    if (!token) {
      log.warn('connection refused: no auth.token in the handshake', { socket: socket.id });
      next(new Error('unauthorized: auth.token required'));
      return;
    }
    const claims = decodeJwtPayload(token);
    const userId = claims ? parseUserId(claims.sub) : null;
    if (!userId || claims.role === 'service') {
      log.warn('connection refused: auth.token is not a user JWT', { socket: socket.id });
      next(new Error('unauthorized: auth.token is not a user token'));
      return;
    }
    // Not verified here: the presence service verifies the token on every call.
    socket.data.token = token;
    socket.data.tokenUserId = userId;
    next();
  };
}

/**
 * Starts the edge.
 * @param {object} [options]
 * @param {number} [options.port=3000] 0 = ephemeral
 * @param {string} [options.host] default: all interfaces
 * @param {string} [options.target='127.0.0.1:50051'] the presence service
 * @param {'token'|'trust-client'} [options.identity='token']
 * @param {string} [options.serviceToken] service JWT (trust-client mode); unset: `x-presence-service: edge`
 * @param {string|false} [options.corsOrigin='*']
 * @param {number} [options.streamsPerChannel=1000]
 * @param {object} [options.backoff] { initialMs, maxMs, stableMs } stream reopening
 * @param {object} [options.statusRate] { burst, refillMs } update_status budget per stream
 * @param {object} [options.log] { debug, info, warn, error }
 * @returns {Promise<{port: number, close: () => Promise<void>, stats: () => object}>}
 */
async function startEdge(options = {}) {
  const {
    port = 3000,
    host,
    target = '127.0.0.1:50051',
    identity = 'token',
    serviceToken,
    corsOrigin = '*',
    streamsPerChannel = 1000,
    backoff,
    statusRate,
    log = createLogger(),
  } = options;
  if (!IDENTITY_MODES.includes(identity)) {
    throw new Error(`identity must be one of ${IDENTITY_MODES.join(', ')}; got ${describe(identity)}`);
  }
  const proto = loadPresenceProto();
  const pool = new ChannelPool(proto.Presence, target, { streamsPerChannel });
  const bindings = new Set();

  const edge = {
    identity,
    log,
    pool,
    backoff,
    statusRate,
    setServiceIdentity(md) {
      if (serviceToken) md.set('authorization', `Bearer ${serviceToken}`);
      else md.set('x-presence-service', 'edge');
    },
  };

  if (identity === 'trust-client') {
    log.warn(
      'EDGE_IDENTITY=trust-client: any browser can claim any user id in user_authenticated. ' +
        'For development and migration only; use EDGE_IDENTITY=token in production.',
    );
  } else if (serviceToken) {
    log.info('EDGE_IDENTITY=token: calls carry the browser user\'s own token; the service token is not used');
  }

  const httpServer = http.createServer((req, res) => {
    if (req.url === '/healthz') {
      res.writeHead(200, { 'content-type': 'application/json' });
      res.end(JSON.stringify({ status: 'ok', sockets: bindings.size, ...pool.stats() }));
      return;
    }
    res.writeHead(404, { 'content-type': 'text/plain' });
    res.end('not found\n');
  });
  const io = new Server(httpServer, {
    serveClient: false,
    cors: corsOrigin ? { origin: corsOrigin } : undefined,
  });
  if (identity === 'token') io.use(tokenMiddleware(log));
  io.on('connection', (socket) => {
    const binding = new SocketBinding(edge, socket);
    bindings.add(binding);
    socket.on('disconnect', () => bindings.delete(binding));
  });

  await new Promise((resolve, reject) => {
    const onError = (err) => reject(err);
    httpServer.once('error', onError);
    httpServer.listen(port, host, () => {
      httpServer.off('error', onError);
      resolve();
    });
  });
  const actualPort = httpServer.address().port;
  log.info('edge started', { port: actualPort, target, identity, service_token: Boolean(serviceToken) });

  let closing = null;
  const close = () => {
    if (!closing) {
      closing = new Promise((resolve) => {
        // Disconnects every socket (each ends its stream), then closes the HTTP server.
        io.close(() => resolve());
        for (const b of bindings) b.close('edge shutdown');
        bindings.clear();
      }).then(() => {
        pool.close();
        log.info('edge stopped');
      });
    }
    return closing;
  };

  const stats = () => {
    let sessions = 0;
    let ready = 0;
    for (const b of bindings) {
      if (b.session) {
        sessions += 1;
        if (b.session.ready) ready += 1;
      }
    }
    return { sockets: bindings.size, sessions, ready, ...pool.stats() };
  };

  return { port: actualPort, close, stats };
}

module.exports = { startEdge, IDENTITY_MODES, ERROR_EVENT };

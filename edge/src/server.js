'use strict';
// The edge: a socket.io 4 server speaking the seed's presence protocol to browsers and mobile
// apps, backed by the Rust presence service (presence.v1 over gRPC). It keeps no presence state
// of its own: each browser socket maps to one Authenticate stream, plus the last version seen per
// user on that socket so stale or duplicate updates are dropped. Who may connect at all (listen
// address, browser origins) is decided in access.js; the optional demo page lives in demo.js.
const http = require('node:http');
const grpc = require('@grpc/grpc-js');
const { Server } = require('socket.io');

const { loadPresenceProto } = require('./proto');
const { ChannelPool } = require('./pool');
const { DeviceSession } = require('./session');
const { createLogger } = require('./log');
const { SettingsError, bindHost, createOriginPolicy } = require('./access');
const { createDemoHandler } = require('./demo');
const {
  seedStatusToEnum,
  parseUserId,
  sanitizeDeviceLabel,
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

/** handshake auth.device, else the User-Agent, else 'web'; printable and at most 64 characters. */
function deviceLabel(socket) {
  const auth = socket.handshake.auth || {};
  return sanitizeDeviceLabel(auth.device) || sanitizeDeviceLabel(socket.handshake.headers['user-agent']) || 'web';
}

// What a metadata value may hold (grpc-js refuses anything else, and its error quotes the value).
const HEADER_VALUE = /^[ -~]*$/;

/** md.set(key, value), failing with an error that names the header but never quotes the value. */
function setHeader(md, key, value) {
  const refused = () => new Error(`the ${key} metadata value has characters a gRPC header cannot carry`);
  if (typeof value !== 'string' || !HEADER_VALUE.test(value)) throw refused();
  try {
    md.set(key, value);
  } catch {
    throw refused(); // grpc-js' own message quotes the value: a token, for authorization
  }
}

/** A user JWT as it may travel in a header: three base64url segments, at most 8 KiB. */
const JWT_SHAPE = /^[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*$/;
const MAX_TOKEN_LENGTH = 8192;

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

  /** Call metadata acting as `userId`; throws (without quoting any value) when it cannot be built. */
  metadataFor(userId) {
    const md = new grpc.Metadata();
    if (this.edge.identity === 'token') {
      // The user's own credential; the presence service verifies it.
      setHeader(md, 'authorization', `Bearer ${this.socket.data.token}`);
    } else {
      this.edge.setServiceIdentity(md);
      setHeader(md, 'x-presence-user-id', userId);
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
        this.refuse('user_authenticated', 'userId must be a positive integer below 2^63', { value: describe(claimed) });
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
    });
    // Started once assigned: a refusal can come synchronously (metadata that cannot be built).
    this.session.start();
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
    const userIds = this.validIds(ids);
    if (userIds.length === 0) {
      this.socket.emit('presence_info', []);
      return;
    }
    if (this.inflight >= MAX_INFLIGHT_GET_PRESENCE) {
      this.refuse('get_presence', 'too many get_presence requests in flight');
      return;
    }
    let md;
    let client;
    try {
      md = this.metadataFor(actingUser);
      client = this.edge.pool.unary();
    } catch (err) {
      this.refuse('get_presence', `cannot call the presence service: ${err.message}`);
      return;
    }
    this.callGetPresence(client, userIds, md);
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

  /** One GetPresence, counted in flight until its callback (exactly once) or a synchronous throw. */
  callGetPresence(client, userIds, md) {
    // Wait through a short gap (server restart) instead of failing at once.
    md.setOptions({ waitForReady: true });
    const deadline = Date.now() + GET_PRESENCE_DEADLINE_MS;
    this.inflight += 1;
    try {
      client.GetPresence({ user_ids: userIds }, md, { deadline }, (err, response) => {
        this.inflight -= 1;
        if (this.closed) return;
        if (err) {
          this.refuse('get_presence', `presence service error: ${grpc.status[err.code] || err.code}`, {
            details: err.details,
          });
          return;
        }
        this.socket.emit('presence_info', (response.users || []).map((p) => this.fromQuery(p)));
      });
    } catch (err) {
      this.inflight -= 1;
      this.refuse('get_presence', `cannot call the presence service: ${err.message}`);
    }
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
      message: `presence stream refused, not retried: ${name}${status.details ? ` (${status.details})` : ''}`,
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
    const claims = token.length <= MAX_TOKEN_LENGTH && JWT_SHAPE.test(token) ? decodeJwtPayload(token) : null;
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

/** The options startEdge needs checked before it listens; throws SettingsError naming the setting. */
function checkOptions({ identity, host, serviceToken, corsOrigins }) {
  if (!IDENTITY_MODES.includes(identity)) {
    throw new SettingsError(`EDGE_IDENTITY: identity must be one of ${IDENTITY_MODES.join(', ')}; got ${describe(identity)}`);
  }
  if (serviceToken !== undefined && (typeof serviceToken !== 'string' || !HEADER_VALUE.test(serviceToken) || !serviceToken.trim())) {
    throw new SettingsError('EDGE_SERVICE_TOKEN must be printable ASCII (it is sent as a gRPC header)');
  }
  return { bind: bindHost(identity, host), origins: createOriginPolicy({ identity, origins: corsOrigins }) };
}

/** Plain HTTP: /healthz, the demo page when enabled, 404 for the rest (socket.io answers its own path). */
function createHttpHandler({ health, demo }) {
  return (req, res) => {
    if (req.url === '/healthz') {
      res.writeHead(200, { 'content-type': 'application/json' });
      res.end(JSON.stringify({ status: 'ok', ...health() }));
      return;
    }
    if (demo && demo(req, res)) return;
    res.writeHead(404, { 'content-type': 'text/plain' });
    res.end('not found\n');
  };
}

function listen(httpServer, port, host) {
  return new Promise((resolve, reject) => {
    const onError = (err) => reject(err);
    httpServer.once('error', onError);
    httpServer.listen(port, host, () => {
      httpServer.off('error', onError);
      resolve(httpServer.address());
    });
  });
}

/**
 * Starts the edge.
 * @param {object} [options]
 * @param {number} [options.port=3000] 0 = ephemeral
 * @param {string} [options.host] token mode: default all interfaces; trust-client mode: default
 *   127.0.0.1, and anything but a loopback address is refused
 * @param {string} [options.target='127.0.0.1:50051'] the presence service
 * @param {'token'|'trust-client'} [options.identity='token']
 * @param {string} [options.serviceToken] service JWT (trust-client mode); unset: `x-presence-service: edge`
 * @param {string|string[]} [options.corsOrigins] EDGE_CORS_ORIGINS: browser origins allowed besides
 *   the edge's own (see access.js for the defaults)
 * @param {boolean} [options.demo=false] serve the demo page at /demo/ (EDGE_DEMO=1)
 * @param {number} [options.streamsPerChannel=1000]
 * @param {object} [options.backoff] { initialMs, maxMs, stableMs } stream reopening
 * @param {object} [options.statusRate] { burst, refillMs } update_status budget per stream
 * @param {object} [options.log] { debug, info, warn, error }
 * @returns {Promise<{port: number, host: string, close: () => Promise<void>, stats: () => object}>}
 */
async function startEdge(options = {}) {
  const {
    port = 3000,
    host,
    target = '127.0.0.1:50051',
    identity = 'token',
    serviceToken,
    corsOrigins,
    demo = false,
    streamsPerChannel = 1000,
    backoff,
    statusRate,
    log = createLogger(),
  } = options;
  const { bind, origins } = checkOptions({ identity, host, serviceToken, corsOrigins });
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
      if (serviceToken) setHeader(md, 'authorization', `Bearer ${serviceToken}`);
      else md.set('x-presence-service', 'edge');
    },
  };

  if (identity === 'trust-client') {
    log.warn(
      'EDGE_IDENTITY=trust-client: any browser can claim any user id in user_authenticated. ' +
        'For development and migration only (loopback only); use EDGE_IDENTITY=token in production.',
    );
  } else if (serviceToken) {
    log.info('EDGE_IDENTITY=token: calls carry the browser user\'s own token; the service token is not used');
  }

  const httpServer = http.createServer(
    createHttpHandler({
      health: () => ({ sockets: bindings.size, ...pool.stats() }),
      demo: demo ? createDemoHandler() : null,
    }),
  );
  const io = new Server(httpServer, {
    serveClient: Boolean(demo), // the demo page loads /socket.io/socket.io.min.js
    cors: origins.cors,
    allowRequest: (req, callback) => {
      if (origins.allows(req)) return callback(null, true);
      log.warn('handshake refused: origin not allowed', { origin: describe(req.headers.origin), allowed: origins.summary });
      return callback('origin not allowed (EDGE_CORS_ORIGINS)', false);
    },
  });
  if (identity === 'token') io.use(tokenMiddleware(log));
  io.on('connection', (socket) => {
    const binding = new SocketBinding(edge, socket);
    bindings.add(binding);
    socket.on('disconnect', () => bindings.delete(binding));
  });

  const address = await listen(httpServer, port, bind);
  log.info('edge started', {
    port: address.port,
    host: address.address,
    target,
    identity,
    service_token: Boolean(serviceToken),
    origins: origins.summary,
    demo: Boolean(demo),
  });

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

  return { port: address.port, host: address.address, close, stats };
}

module.exports = { startEdge, checkOptions, IDENTITY_MODES, ERROR_EVENT, SettingsError };

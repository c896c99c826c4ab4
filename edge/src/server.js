'use strict';
// The edge: a socket.io 4 server speaking the seed's presence protocol to browsers and mobile
// apps, backed by the Rust presence service (presence.v1 over gRPC). All sockets of this process
// share one relay stream (relay.js): each socket that emits user_authenticated holds one device
// session on it (binding.js), and each change the service delivers once per group of sessions
// with the same view is encoded once and written to all of those sockets. Who may connect at all
// (listen address, browser origins) is decided in access.js; the optional demo page lives in
// demo.js; several processes behind one port in cluster.js.
const http = require('node:http');
const grpc = require('@grpc/grpc-js');
const { Server } = require('socket.io');

const { loadPresenceProto } = require('./proto');
const { RelayClient } = require('./relay');
const { SocketBinding, presenceView, ERROR_EVENT, DEFAULT_STATUS_RATE, DEFAULT_COMMAND_RATE, REQUEST_DEADLINE_MS } = require('./binding');
const { createLogger } = require('./log');
const { IDENTITY_MODES, SettingsError, checkOptions, describe } = require('./settings');
const { createDemoHandler } = require('./demo');
const { healthOf } = require('./health');
const { parseUserId, decodeJwtPayload } = require('./convert');
const { ServiceTokenSource } = require('./service-token');

/** A user JWT as a browser may present it: three base64url segments, at most 8 KiB. */
const JWT_SHAPE = /^[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*$/;
const MAX_TOKEN_LENGTH = 8192;

/**
 * The fan-out of a RelayDelivery: per group, the payload is built once, each session's socket
 * keeps it unless it already has something newer, and socket.io encodes it once for all of them.
 */
function createFanOut(io, counters) {
  return (groups, sessions) => {
    for (const group of groups) {
      if (!group.presence) continue;
      const view = presenceView(group.presence);
      const to = [];
      for (const id of group.session_ids) {
        const binding = sessions.get(id);
        if (binding !== undefined && binding.accept(view)) to.push(binding.socketId);
      }
      // Stale for that socket, about its own user, or a session that just ended.
      counters.dropped += group.session_ids.length - to.length;
      if (to.length === 0) continue;
      counters.emitted += to.length;
      io.to(to).emit('presence_updated', view.payload);
    }
  };
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

/** Plain HTTP: /healthz, the demo page when enabled, 404 for the rest (socket.io answers its own path). */
function createHttpHandler({ health, demo, log }) {
  return (req, res) => {
    if (req.url === '/healthz') {
      Promise.resolve()
        .then(health)
        .then(
          (body) => {
            res.writeHead(200, { 'content-type': 'application/json' });
            res.end(JSON.stringify({ status: 'ok', ...body }));
          },
          (err) => {
            log.error('health check failed', { error: String(err && err.message) });
            res.writeHead(500, { 'content-type': 'application/json' });
            res.end(JSON.stringify({ status: 'error' }));
          },
        );
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
 * The edge's service identity on its relay streams (see relay.js `credential`): a token it mints
 * and renews (jwtSecret; `refresh()` mints one to send on the open stream), a static token
 * (serviceToken; nothing to refresh: `expired` says what to do once it expires), or, against a
 * development-mode service, `x-presence-service: edge` (which never expires).
 */
function serviceCredential({ serviceToken, jwtSecret, jwtIssuer, jwtAudience, serviceTokenTtlS, log }) {
  const bearer = (token) => {
    const md = new grpc.Metadata();
    md.set('authorization', `Bearer ${token}`);
    return md;
  };
  if (jwtSecret !== undefined) {
    const source = new ServiceTokenSource({ secret: jwtSecret, issuer: jwtIssuer, audience: jwtAudience, ttlS: serviceTokenTtlS, log });
    return {
      kind: 'minted',
      open() {
        const { token, iat, exp } = source.current();
        return { metadata: bearer(token), issuedAt: iat * 1000, expiresAt: exp * 1000 };
      },
      refresh() {
        const { token, iat, exp } = source.renew();
        return { token, issuedAt: iat * 1000, expiresAt: exp * 1000 };
      },
      hint:
        'the presence service refused the service token the edge minted with EDGE_JWT_SECRET: it must be the ' +
        "service's PRESENCE_JWT_SECRET, EDGE_JWT_ISSUER and EDGE_JWT_AUDIENCE must match its PRESENCE_JWT_ISSUER and " +
        'PRESENCE_JWT_AUDIENCE, EDGE_SERVICE_TOKEN_TTL_S must not exceed its PRESENCE_JWT_MAX_TTL_S, and the clocks must agree',
      stats: () => source.stats(),
    };
  }
  if (serviceToken) {
    const claims = decodeJwtPayload(serviceToken);
    const exp = claims && Number.isSafeInteger(claims.exp) ? claims.exp * 1000 : undefined;
    const expiresAt = exp === undefined ? null : new Date(exp).toISOString();
    if (exp !== undefined) {
      log.warn(
        `EDGE_SERVICE_TOKEN ${exp > Date.now() ? 'expires' : 'expired'} at ${expiresAt}: the edge cannot renew it: the service ends the relay stream then, ` +
          'and refuses to reopen it. Set EDGE_JWT_SECRET (the service\'s PRESENCE_JWT_SECRET) instead: the edge then mints its own, and refreshes it on the open stream.',
        { expires_at: expiresAt },
      );
    }
    return {
      kind: 'static',
      open: () => ({ metadata: bearer(serviceToken), expiresAt: exp }),
      hint:
        'the presence service refused EDGE_SERVICE_TOKEN: it must be a service JWT (role: "service") signed with the ' +
        `service's key and not expired${expiresAt ? ` (it expires at ${expiresAt})` : ''}; a static token lives at most ` +
        "PRESENCE_JWT_MAX_TTL_S (24 h by default): set EDGE_JWT_SECRET (the service's PRESENCE_JWT_SECRET) instead, " +
        'and the edge mints and renews its own',
      expired:
        `EDGE_SERVICE_TOKEN expired${expiresAt ? ` at ${expiresAt}` : ''}: the presence service ended the relay stream (and every ` +
        'session on it) and refuses the token from now on; the edge cannot renew a static token. Set EDGE_JWT_SECRET ' +
        "(the service's PRESENCE_JWT_SECRET) instead of EDGE_SERVICE_TOKEN: the edge then mints its own service token and " +
        'refreshes it on the open stream before it expires',
      stats: () => ({ source: 'EDGE_SERVICE_TOKEN', expires_at: expiresAt }),
    };
  }
  return {
    kind: 'none',
    open() {
      const md = new grpc.Metadata();
      md.set('x-presence-service', 'edge');
      return { metadata: md };
    },
    hint:
      "the presence service refused the edge's service identity: set EDGE_JWT_SECRET to the service's " +
      'PRESENCE_JWT_SECRET (or EDGE_SERVICE_TOKEN to a service JWT, role: "service"); without either the edge names ' +
      'itself with x-presence-service: edge, which only a development-mode service accepts',
    stats: () => ({ source: 'none' }),
  };
}

/**
 * Starts the edge in this process: one HTTP server, one socket.io server, one relay stream.
 * @param {object} [options]
 * @param {number} [options.port=3000] 0 = ephemeral
 * @param {string} [options.host] token mode: default all interfaces; trust-client mode: default
 *   127.0.0.1, and anything but a loopback address is refused
 * @param {string} [options.target='127.0.0.1:50051'] the presence service
 * @param {'token'|'trust-client'} [options.identity='token']
 * @param {string} [options.jwtSecret] EDGE_JWT_SECRET: the service's PRESENCE_JWT_SECRET; the edge
 *   mints and renews its own service token (`sub: "edge"`, `role: "service"`) with it
 * @param {string} [options.jwtIssuer] EDGE_JWT_ISSUER: `iss` of the minted tokens
 * @param {string} [options.jwtAudience] EDGE_JWT_AUDIENCE: `aud` of the minted tokens
 * @param {number} [options.serviceTokenTtlS=900] lifetime of the minted tokens, seconds: 1 to 86400
 *   here (EDGE_SERVICE_TOKEN_TTL_S: 30 to 86400; shorter lifetimes are for tests)
 * @param {boolean} [options.refreshServiceToken=true] refresh the minted token on the open relay
 *   stream (RelayRefresh) before it expires; false only in tests, to watch the service end the
 *   stream at the token's expiry (no environment variable)
 * @param {string} [options.serviceToken] EDGE_SERVICE_TOKEN: a static service JWT, instead of
 *   jwtSecret (one of them is required in token mode); neither in trust-client mode:
 *   `x-presence-service: edge`
 * @param {string|string[]} [options.corsOrigins] EDGE_CORS_ORIGINS: browser origins allowed besides
 *   the edge's own (see access.js for the defaults)
 * @param {boolean} [options.demo=false] serve the demo page at /demo/ (EDGE_DEMO=1)
 * @param {object} [options.backoff] { initialMs, maxMs, stableMs } relay stream and session reopening
 * @param {object} [options.statusRate] { burst, refillMs } update_status budget per socket
 * @param {object} [options.commandRate] { burst, refillMs } budget of the other commands per socket
 * @param {number} [options.requestTimeoutMs=10000] how long get_presence and set_custom_status wait for the service
 * @param {object} [options.log] { debug, info, warn, error }
 * @param {object} [options.cluster] set by cluster.js in a worker: { attach(io), health() }; the
 *   worker does not listen itself, the primary hands it connections
 * @returns {Promise<{port: number, host: string, close: () => Promise<void>, stats: () => object}>}
 */
async function startEdge(options = {}) {
  const {
    port = 3000,
    host,
    target = '127.0.0.1:50051',
    identity = 'token',
    serviceToken,
    jwtSecret,
    jwtIssuer,
    jwtAudience,
    serviceTokenTtlS,
    refreshServiceToken = true,
    corsOrigins,
    demo = false,
    backoff,
    statusRate = DEFAULT_STATUS_RATE,
    commandRate = DEFAULT_COMMAND_RATE,
    requestTimeoutMs = REQUEST_DEADLINE_MS,
    log = createLogger(),
    cluster,
  } = options;
  const { bind, origins } = checkOptions({ identity, host, serviceToken, jwtSecret, jwtIssuer, jwtAudience, serviceTokenTtlS, corsOrigins });
  const credential = serviceCredential({ serviceToken, jwtSecret, jwtIssuer, jwtAudience, serviceTokenTtlS, log });
  const proto = loadPresenceProto();
  const bindings = new Set();
  const counters = { emitted: 0, dropped: 0 };

  // Plain HTTP requests (set below); socket.io takes its own path before this handler sees it.
  let handle = null;
  const httpServer = http.createServer((req, res) => handle(req, res));
  const io = new Server(httpServer, {
    serveClient: Boolean(demo), // the demo page loads /socket.io/socket.io.min.js
    cors: origins.cors,
    allowRequest: (req, callback) => {
      if (origins.allows(req)) return callback(null, true);
      log.warn('handshake refused: origin not allowed', { origin: describe(req.headers.origin), allowed: origins.summary });
      return callback('origin not allowed (EDGE_CORS_ORIGINS)', false);
    },
  });
  const relay = new RelayClient({
    Client: proto.RelayService,
    target,
    log,
    backoff,
    onDelivery: createFanOut(io, counters),
    credential,
    refresh: refreshServiceToken,
  });
  const edge = { identity, log, relay, bindings, backoff, statusRate, commandRate, requestTimeoutMs };

  if (identity === 'trust-client') {
    log.warn(
      'EDGE_IDENTITY=trust-client: any browser can claim any user id in user_authenticated. ' +
        'For development and migration only (loopback only); use EDGE_IDENTITY=token in production.',
    );
  }

  const stats = () => {
    let sessions = 0;
    let ready = 0;
    for (const b of bindings) {
      if (b.joined) sessions += 1;
      if (b.welcomed) ready += 1;
    }
    return {
      pid: process.pid,
      sockets: bindings.size,
      sessions,
      ready,
      relay: relay.stats(),
      service_credential: credential.stats(),
      emitted: counters.emitted,
      dropped: counters.dropped,
      rss: process.memoryUsage.rss(),
      heap_used: process.memoryUsage().heapUsed,
    };
  };

  handle = createHttpHandler({
    health: cluster ? cluster.health : () => healthOf([stats()]),
    demo: demo ? createDemoHandler() : null,
    log,
  });
  if (identity === 'token') io.use(tokenMiddleware(log));
  io.on('connection', (socket) => {
    bindings.add(new SocketBinding(edge, socket)); // removed from the set when the socket closes
    // The handshake is built (socket.handshake keeps the headers): the edge needs nothing more of
    // the first HTTP request. engine.io keeps the WebSocket upgrade request until the socket
    // closes; its raw header list (every header name again) is dropped.
    const req = socket.conn.request;
    if (req && Array.isArray(req.rawHeaders)) req.rawHeaders = [];
    socket.conn.request = null;
  });

  relay.start();
  let address = { port: null, address: null };
  if (cluster) cluster.attach(io);
  else {
    try {
      address = await listen(httpServer, port, bind);
    } catch (err) {
      await relay.close();
      throw err;
    }
  }
  log.info('edge started', {
    port: address.port,
    host: address.address,
    target,
    identity,
    service_credential: credential.kind,
    origins: origins.summary,
    demo: Boolean(demo),
  });

  let closing = null;
  const close = () => {
    if (!closing) {
      closing = new Promise((resolve) => {
        // Disconnects every socket (each closes its session), then closes the HTTP server.
        io.close(() => resolve());
        for (const b of [...bindings]) b.close('edge shutdown');
      })
        .then(() => relay.close())
        .then(() => log.info('edge stopped'));
    }
    return closing;
  };

  return { port: address.port, host: address.address, close, stats, io };
}

module.exports = { startEdge, checkOptions, IDENTITY_MODES, ERROR_EVENT, SettingsError };

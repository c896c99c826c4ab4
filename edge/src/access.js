'use strict';
// Who may reach the edge at all, before any presence call: the address it listens on and the web
// origins whose pages may open a socket.
//
// - trust-client mode believes whatever user id a socket claims, so it only listens on loopback
//   (127.0.0.1 unless EDGE_HOST names another loopback address).
// - Browsers send an Origin header with every cross-site request and every WebSocket handshake.
//   CORS headers alone do not stop a page on another site from opening a WebSocket, so the
//   Origin of every socket.io handshake is checked too. No Origin (curl, mobile apps, Node
//   clients) passes: it is not a browser page acting behind its user's back.
//
// Allowed origins: the EDGE_CORS_ORIGINS list; when it is unset, in trust-client mode, any
// loopback page (http(s)://localhost|127.x.x.x|[::1], any port: local development). The edge's own
// origin (same-origin pages such as the demo) is always allowed — in trust-client mode only when
// it is a loopback name, so a DNS-rebound name pointing at 127.0.0.1 gets nothing.

/** A setting (or startEdge option) that cannot work; the message names it. */
class SettingsError extends Error {
  constructor(message) {
    super(message);
    this.name = 'SettingsError';
  }
}

/** 'localhost', 127.0.0.0/8, ::1 and its IPv4-mapped forms, with or without [brackets]. */
function isLoopbackHost(host) {
  const h = String(host).trim().toLowerCase().replace(/^\[(.*)\]$/, '$1');
  return (
    h === 'localhost' ||
    h === '::1' ||
    /^(::ffff:)?127\.\d{1,3}\.\d{1,3}\.\d{1,3}$/.test(h) ||
    h === '0:0:0:0:0:0:0:1'
  );
}

/** The address to listen on: `host` as given in token mode; loopback only in trust-client mode. */
function bindHost(identity, host) {
  const given = host === undefined || host === null ? '' : String(host).trim();
  if (identity !== 'trust-client') return given || undefined; // all interfaces
  if (!given) return '127.0.0.1';
  if (!isLoopbackHost(given)) {
    throw new SettingsError(
      `EDGE_HOST=${given} is not a loopback address, and EDGE_IDENTITY=trust-client believes any user id ` +
        'a socket claims: anyone who can reach it could act as any user. Leave EDGE_HOST unset ' +
        '(127.0.0.1), set a loopback address (127.0.0.1, ::1, localhost), or use EDGE_IDENTITY=token.',
    );
  }
  return given;
}

/** 'https://Chat.Example.com:443/' → 'https://chat.example.com'; null when it is not an http(s) origin. */
function normalizeOrigin(text) {
  let url;
  try {
    url = new URL(String(text).trim());
  } catch {
    return null;
  }
  if (url.protocol !== 'http:' && url.protocol !== 'https:') return null;
  if (url.username || url.password || url.search || url.hash || (url.pathname !== '/' && url.pathname !== '')) return null;
  return url.origin;
}

/**
 * EDGE_CORS_ORIGINS (a comma-separated string, or an array) → { any, list }; null when unset.
 * '*' (any origin) is refused in trust-client mode. A bad entry throws, naming it.
 */
function parseOrigins(value, identity) {
  if (value === undefined || value === null) return null;
  const entries = (Array.isArray(value) ? value : String(value).split(','))
    .map((e) => String(e).trim())
    .filter(Boolean);
  const parsed = { any: false, list: new Set() };
  for (const entry of entries) {
    if (entry === '*') {
      if (identity === 'trust-client') {
        throw new SettingsError(
          "EDGE_CORS_ORIGINS='*' is refused with EDGE_IDENTITY=trust-client: any web site could act as any user. List the origins.",
        );
      }
      parsed.any = true;
      continue;
    }
    const origin = normalizeOrigin(entry);
    if (!origin) {
      throw new SettingsError(
        `EDGE_CORS_ORIGINS: ${JSON.stringify(entry)} is not an origin; expected scheme://host[:port] ` +
          'with http or https and no path, e.g. https://chat.example.com',
      );
    }
    parsed.list.add(origin);
  }
  return parsed;
}

/**
 * @param {object} o
 * @param {'token'|'trust-client'} o.identity
 * @param {string|string[]} [o.origins] EDGE_CORS_ORIGINS
 * @returns {{ cors: object, allows: (req: import('http').IncomingMessage) => boolean, summary: string }}
 */
function createOriginPolicy({ identity, origins }) {
  const configured = parseOrigins(origins, identity);
  const loopbackByDefault = !configured && identity === 'trust-client';
  const listed = (origin) => {
    if (configured) return configured.any || configured.list.has(origin);
    return loopbackByDefault && isLoopbackHost(new URL(origin).hostname);
  };
  const sameOrigin = (origin, hostHeader) => {
    const { host, hostname } = new URL(origin);
    if (typeof hostHeader !== 'string' || host !== hostHeader.trim().toLowerCase()) return false;
    return identity !== 'trust-client' || isLoopbackHost(hostname);
  };
  const allows = (req) => {
    const raw = req.headers.origin;
    if (raw === undefined) return true; // not a browser page
    const origin = normalizeOrigin(raw); // 'null' (sandboxed frames, file://) is refused too
    return Boolean(origin) && (listed(origin) || sameOrigin(origin, req.headers.host));
  };
  let summary = 'same origin only';
  if (configured) summary = configured.any ? 'any origin' : `same origin and ${[...configured.list].join(', ') || 'nothing else'}`;
  else if (loopbackByDefault) summary = 'loopback origins (http(s)://localhost, 127.x.x.x, [::1], any port)';
  return {
    // CORS response headers for listed origins (same-origin requests need none).
    cors: {
      origin: (origin, callback) => {
        const normalized = origin ? normalizeOrigin(origin) : null;
        callback(null, normalized && listed(normalized) ? origin : false);
      },
    },
    allows,
    summary,
  };
}

module.exports = { SettingsError, isLoopbackHost, bindHost, normalizeOrigin, parseOrigins, createOriginPolicy };

'use strict';
// The edge's service credential for its relay streams, minted by the edge itself from the presence
// service's HS256 secret (EDGE_JWT_SECRET = the service's PRESENCE_JWT_SECRET), instead of a
// static EDGE_SERVICE_TOKEN that the service stops accepting once it expires (it refuses any
// token expiring more than PRESENCE_JWT_MAX_TTL_S, default 24 h, ahead).
//
// A minted token is byte for byte what `presence token --service edge --ttl 15m` prints (same
// header, same claims in the same order: src/auth/mod.rs `mint`): {"typ":"JWT","alg":"HS256"} .
// {"sub":"edge","exp":…,"role":"service"[,"iss":…][,"aud":…],"iat":…}. No `nbf`: the service
// checks `nbf` with no leeway, so an edge whose clock runs a second ahead of the service's would
// mint tokens refused as not yet valid, and a token minted now is valid now anyway.
//
// Renewal: the service checks the service token when a relay stream opens, and ends the stream
// (UNAUTHENTICATED) when the credential it runs on expires, unless the edge sent it a new token of
// the same service before (RelayRequest.refresh, src/grpc/relay.rs). Two uses, then:
// `current()` hands out the cached token for a (re)open while more than a third of its lifetime is
// left, and mints a new one otherwise; `renew()` always mints one, for relay.js to send as a
// refresh on the open stream once a third of the stream's current token's life is left (and it
// becomes the cached token, so a reopen presents it too).
const crypto = require('node:crypto');

/** The service name the edge signs as (`sub`); the service logs callers as `service:edge`. */
const SERVICE_NAME = 'edge';
const DEFAULT_TTL_S = 15 * 60;
/** EDGE_SERVICE_TOKEN_TTL_S bounds (startEdge in code accepts from 1 s, for tests). */
const MIN_TTL_S = 30;
const MAX_TTL_S = 24 * 3600;
/** The service's MIN_SECRET_BYTES (src/auth/mod.rs): a shorter secret cannot be the service's. */
const MIN_SECRET_BYTES = 32;

const HEADER = Buffer.from(JSON.stringify({ typ: 'JWT', alg: 'HS256' })).toString('base64url');

/**
 * Why `secret` cannot be the presence service's PRESENCE_JWT_SECRET (the service refuses to start
 * with it: src/auth/mod.rs check_secret), or null.
 */
function secretProblem(secret) {
  if (typeof secret !== 'string') return 'must be a string';
  const bytes = Buffer.byteLength(secret, 'utf8');
  if (bytes < MIN_SECRET_BYTES) return `must be at least ${MIN_SECRET_BYTES} bytes long (got ${bytes})`;
  const chars = [...secret];
  if (chars.every((c) => c === chars[0])) return 'is one character repeated';
  const distinct = new Set(chars).size;
  if (distinct < 8) return `has only ${distinct} distinct characters`;
  return null;
}

/**
 * An HS256 service token, as `presence token --service <subject>` signs it.
 * @param {object} o
 * @param {string} o.secret
 * @param {string} [o.subject='edge']
 * @param {number} o.ttlS lifetime in seconds
 * @param {string} [o.issuer] `iss` (the service's PRESENCE_JWT_ISSUER)
 * @param {string} [o.audience] `aud` (the service's PRESENCE_JWT_AUDIENCE)
 * @param {number} [o.now=Date.now()] milliseconds since 1970
 * @returns {{ token: string, iat: number, exp: number }} iat and exp in seconds
 */
function mintServiceToken({ secret, subject = SERVICE_NAME, ttlS, issuer, audience, now = Date.now() }) {
  const iat = Math.floor(now / 1000);
  const exp = iat + Math.max(1, Math.floor(ttlS));
  const claims = { sub: subject, exp, role: 'service' };
  if (issuer !== undefined) claims.iss = issuer;
  if (audience !== undefined) claims.aud = audience;
  claims.iat = iat;
  const signed = `${HEADER}.${Buffer.from(JSON.stringify(claims)).toString('base64url')}`;
  const signature = crypto.createHmac('sha256', secret).update(signed).digest('base64url');
  return { token: `${signed}.${signature}`, iat, exp };
}

/** Hands out a valid service token, minting a new one when less than a third of its life is left. */
class ServiceTokenSource {
  /**
   * @param {object} o
   * @param {string} o.secret
   * @param {number} [o.ttlS=900]
   * @param {string} [o.issuer]
   * @param {string} [o.audience]
   * @param {string} [o.subject='edge']
   * @param {() => number} [o.clock=Date.now]
   * @param {object} [o.log]
   */
  constructor({ secret, ttlS = DEFAULT_TTL_S, issuer, audience, subject = SERVICE_NAME, clock = Date.now, log }) {
    this.options = { secret, ttlS, issuer, audience, subject };
    this.clock = clock;
    this.log = log;
    this.token = null;
    this.minted = 0;
  }

  /** { token, iat, exp } valid for at least a third of its lifetime. */
  current() {
    const { ttlS } = this.options;
    if (!this.token || this.token.exp * 1000 - this.clock() < (ttlS * 1000) / 3) return this.renew();
    return this.token;
  }

  /** A newly minted { token, iat, exp } (the cached one from now on). */
  renew() {
    this.token = mintServiceToken({ ...this.options, now: this.clock() });
    this.minted += 1;
    if (this.log) {
      this.log.debug(this.minted > 1 ? 'service token renewed' : 'service token minted', {
        expires_at: new Date(this.token.exp * 1000).toISOString(),
      });
    }
    return this.token;
  }

  stats() {
    return {
      source: 'EDGE_JWT_SECRET',
      minted: this.minted,
      expires_at: this.token ? new Date(this.token.exp * 1000).toISOString() : null,
    };
  }
}

module.exports = { ServiceTokenSource, mintServiceToken, secretProblem, SERVICE_NAME, DEFAULT_TTL_S, MIN_TTL_S, MAX_TTL_S, MIN_SECRET_BYTES };

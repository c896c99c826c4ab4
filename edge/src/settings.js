'use strict';
// The edge's settings: environment variables (README: Settings) → startEdge options, checked
// before anything starts; a setting that cannot work throws a SettingsError naming it. Kept free
// of gRPC and socket.io so the cluster primary, which only hands connections to workers, stays
// small.
const os = require('node:os');
const { SettingsError, bindHost, createOriginPolicy } = require('./access');
const { createLogger, LEVELS } = require('./log');
const { secretProblem, DEFAULT_TTL_S, MIN_TTL_S, MAX_TTL_S } = require('./service-token');

const IDENTITY_MODES = Object.freeze(['token', 'trust-client']);
const FLAGS = Object.freeze({ '': false, 0: false, false: false, 1: true, true: true });
// What a metadata value may hold (grpc-js refuses anything else, and its error quotes the value).
const HEADER_VALUE = /^[ -~]*$/;
const MAX_WORKERS = 64;
// V8's young generation per worker (--max-semi-space-size): Node's default lets it grow to 16 MB
// per semi-space, resident once grown, in every worker; 4 MB keeps an idle socket's share of the
// RSS low at no measurable cost in CPU per delivery (README: Memory).
const DEFAULT_SEMI_SPACE_MB = 4;

function describe(value) {
  try {
    const text = JSON.stringify(value) ?? String(value);
    return text.length > 80 ? `${text.slice(0, 77)}...` : text;
  } catch {
    return typeof value;
  }
}

/**
 * The edge's service credential for its relay streams: EDGE_JWT_SECRET (the edge mints and renews
 * its own service token; EDGE_JWT_ISSUER, EDGE_JWT_AUDIENCE, EDGE_SERVICE_TOKEN_TTL_S go with it)
 * or EDGE_SERVICE_TOKEN (a static service JWT), never both; one of them in token mode.
 */
function checkCredential({ identity, serviceToken, jwtSecret, jwtIssuer, jwtAudience, serviceTokenTtlS }) {
  if (serviceToken !== undefined && (typeof serviceToken !== 'string' || !HEADER_VALUE.test(serviceToken) || !serviceToken.trim())) {
    throw new SettingsError('EDGE_SERVICE_TOKEN must be printable ASCII (it is sent as a gRPC header)');
  }
  if (jwtSecret !== undefined) {
    const problem = secretProblem(jwtSecret);
    if (problem) {
      throw new SettingsError(
        `EDGE_JWT_SECRET ${problem}: it must be the presence service's PRESENCE_JWT_SECRET, which the service ` +
          'only accepts with at least 32 bytes and 8 distinct characters',
      );
    }
    if (serviceToken) {
      throw new SettingsError(
        'EDGE_JWT_SECRET and EDGE_SERVICE_TOKEN are both set: set one (EDGE_JWT_SECRET: the edge mints and renews its own service token)',
      );
    }
  } else {
    const orphans = [
      ['EDGE_JWT_ISSUER', jwtIssuer],
      ['EDGE_JWT_AUDIENCE', jwtAudience],
      ['EDGE_SERVICE_TOKEN_TTL_S', serviceTokenTtlS],
    ].filter(([, v]) => v !== undefined);
    if (orphans.length) {
      throw new SettingsError(`${orphans.map(([name]) => name).join(', ')}: only used with EDGE_JWT_SECRET, which is not set`);
    }
  }
  for (const [name, value] of [
    ['EDGE_JWT_ISSUER', jwtIssuer],
    ['EDGE_JWT_AUDIENCE', jwtAudience],
  ]) {
    if (value !== undefined && (typeof value !== 'string' || !value)) throw new SettingsError(`${name} must be a non-empty string`);
  }
  // 1 s and up in code (tests); EDGE_SERVICE_TOKEN_TTL_S is checked against MIN_TTL_S in readSettings.
  if (serviceTokenTtlS !== undefined && !(Number.isInteger(serviceTokenTtlS) && serviceTokenTtlS >= 1 && serviceTokenTtlS <= MAX_TTL_S)) {
    throw new SettingsError(`EDGE_SERVICE_TOKEN_TTL_S must be a whole number of seconds up to ${MAX_TTL_S}; got ${describe(serviceTokenTtlS)}`);
  }
  if (identity === 'token' && !serviceToken && jwtSecret === undefined) {
    throw new SettingsError(
      'EDGE_IDENTITY=token needs EDGE_JWT_SECRET or EDGE_SERVICE_TOKEN for the edge\'s relay stream: EDGE_JWT_SECRET = the ' +
        "presence service's PRESENCE_JWT_SECRET (the edge mints and renews its own service token), or EDGE_SERVICE_TOKEN = " +
        'a service JWT (role: "service"), which the edge cannot renew. ' +
        "Each browser's own token is still verified by the presence service, per session.",
    );
  }
}

/** Checks what startEdge needs before it listens: { bind, origins }, or throws a SettingsError. */
function checkOptions({ identity, host, serviceToken, jwtSecret, jwtIssuer, jwtAudience, serviceTokenTtlS, corsOrigins }) {
  if (!IDENTITY_MODES.includes(identity)) {
    throw new SettingsError(`EDGE_IDENTITY: identity must be one of ${IDENTITY_MODES.join(', ')}; got ${describe(identity)}`);
  }
  checkCredential({ identity, serviceToken, jwtSecret, jwtIssuer, jwtAudience, serviceTokenTtlS });
  return { bind: bindHost(identity, host), origins: createOriginPolicy({ identity, origins: corsOrigins }) };
}

/** EDGE_SERVICE_TOKEN_TTL_S: MIN_TTL_S to MAX_TTL_S seconds; undefined when unset. */
function serviceTokenTtl(env, fail) {
  const text = (env.EDGE_SERVICE_TOKEN_TTL_S || '').trim();
  if (!text) return undefined;
  if (!(/^\d+$/.test(text) && Number(text) >= MIN_TTL_S && Number(text) <= MAX_TTL_S)) {
    fail(
      `EDGE_SERVICE_TOKEN_TTL_S must be a whole number of seconds from ${MIN_TTL_S} to ${MAX_TTL_S} ` +
        `(at most the service's PRESENCE_JWT_MAX_TTL_S; unset: ${DEFAULT_TTL_S}); got ${text}`,
    );
  }
  return Number(text);
}

/** EDGE_CORS_ORIGINS, or the deprecated EDGE_CORS_ORIGIN (same meaning) when only that is set. */
function corsOrigins(env, warnings) {
  if (env.EDGE_CORS_ORIGINS !== undefined) return env.EDGE_CORS_ORIGINS;
  if (env.EDGE_CORS_ORIGIN === undefined) return undefined;
  warnings.push('EDGE_CORS_ORIGIN is deprecated; use EDGE_CORS_ORIGINS (a comma-separated list)');
  return env.EDGE_CORS_ORIGIN;
}

/** The number of CPUs this process may use: EDGE_WORKERS' default. */
function cpuCount() {
  return typeof os.availableParallelism === 'function' ? os.availableParallelism() : os.cpus().length || 1;
}

/**
 * The edge's options from the environment: startEdge's options plus `workers`, `warnings` (to log
 * once a logger runs) and `logLevel`. Throws a SettingsError naming a bad setting.
 * @param {NodeJS.ProcessEnv} env
 * @param {object} [o]
 * @param {object} [o.logBase] fields on every log line (a worker's number)
 */
function readSettings(env, { logBase } = {}) {
  const fail = (message) => {
    throw new SettingsError(message);
  };
  const portText = env.EDGE_PORT === undefined || env.EDGE_PORT === '' ? '3000' : env.EDGE_PORT;
  if (!/^\d+$/.test(portText) || Number(portText) > 65535) fail(`EDGE_PORT must be 0-65535; got ${portText}`);
  const identity = env.EDGE_IDENTITY || 'token';
  if (!IDENTITY_MODES.includes(identity)) fail(`EDGE_IDENTITY must be one of ${IDENTITY_MODES.join(', ')}; got ${identity}`);
  const logLevel = env.EDGE_LOG_LEVEL || 'info';
  if (!(logLevel in LEVELS)) fail(`EDGE_LOG_LEVEL must be one of ${Object.keys(LEVELS).join(', ')}`);
  const demoText = (env.EDGE_DEMO || '').trim().toLowerCase();
  if (!(demoText in FLAGS)) fail(`EDGE_DEMO must be 1 or 0; got ${env.EDGE_DEMO}`);
  const workersText = (env.EDGE_WORKERS || '').trim();
  if (workersText && !(/^[1-9]\d*$/.test(workersText) && Number(workersText) <= MAX_WORKERS)) {
    fail(`EDGE_WORKERS must be a whole number from 1 to ${MAX_WORKERS} (unset: the number of CPUs); got ${workersText}`);
  }
  const semiText = (env.EDGE_WORKER_SEMI_SPACE_MB || '').trim();
  if (semiText && !(/^\d+$/.test(semiText) && Number(semiText) <= 1024)) {
    fail(`EDGE_WORKER_SEMI_SPACE_MB must be a whole number of megabytes from 0 (Node's default) to 1024; got ${semiText}`);
  }
  const warnings = [];
  if (env.EDGE_STREAMS_PER_CHANNEL !== undefined) {
    warnings.push('EDGE_STREAMS_PER_CHANNEL is no longer used: each edge worker has one relay stream to the presence service');
  }
  const settings = {
    port: Number(portText),
    host: env.EDGE_HOST || undefined,
    target: env.PRESENCE_TARGET || '127.0.0.1:50051',
    identity,
    serviceToken: env.EDGE_SERVICE_TOKEN || undefined,
    // Not trimmed: the secret is the service's byte for byte.
    jwtSecret: env.EDGE_JWT_SECRET || undefined,
    jwtIssuer: env.EDGE_JWT_ISSUER || undefined,
    jwtAudience: env.EDGE_JWT_AUDIENCE || undefined,
    serviceTokenTtlS: serviceTokenTtl(env, fail),
    corsOrigins: corsOrigins(env, warnings),
    demo: FLAGS[demoText],
    workers: workersText ? Number(workersText) : cpuCount(),
    semiSpaceMb: semiText ? Number(semiText) : DEFAULT_SEMI_SPACE_MB,
    logLevel,
    log: createLogger({ level: logLevel, base: logBase }),
    warnings,
  };
  // Listen address, origins, service token: fail before anything starts.
  const { bind } = checkOptions(settings);
  settings.bind = bind;
  return settings;
}

module.exports = { IDENTITY_MODES, HEADER_VALUE, SettingsError, checkOptions, checkCredential, readSettings, cpuCount, describe };

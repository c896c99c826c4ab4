'use strict';
// The edge's settings: environment variables (README: Settings) → startEdge options, checked
// before anything starts; a setting that cannot work throws a SettingsError naming it. Kept free
// of gRPC and socket.io so the cluster primary, which only hands connections to workers, stays
// small.
const os = require('node:os');
const { SettingsError, bindHost, createOriginPolicy } = require('./access');
const { createLogger, LEVELS } = require('./log');

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

/** Checks what startEdge needs before it listens: { bind, origins }, or throws a SettingsError. */
function checkOptions({ identity, host, serviceToken, corsOrigins }) {
  if (!IDENTITY_MODES.includes(identity)) {
    throw new SettingsError(`EDGE_IDENTITY: identity must be one of ${IDENTITY_MODES.join(', ')}; got ${describe(identity)}`);
  }
  if (serviceToken !== undefined && (typeof serviceToken !== 'string' || !HEADER_VALUE.test(serviceToken) || !serviceToken.trim())) {
    throw new SettingsError('EDGE_SERVICE_TOKEN must be printable ASCII (it is sent as a gRPC header)');
  }
  if (identity === 'token' && !serviceToken) {
    throw new SettingsError(
      'EDGE_IDENTITY=token needs EDGE_SERVICE_TOKEN: a service JWT (role: "service") for the edge\'s relay stream. ' +
        "Each browser's own token is still verified by the presence service, per session.",
    );
  }
  return { bind: bindHost(identity, host), origins: createOriginPolicy({ identity, origins: corsOrigins }) };
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

module.exports = { IDENTITY_MODES, HEADER_VALUE, SettingsError, checkOptions, readSettings, cpuCount, describe };

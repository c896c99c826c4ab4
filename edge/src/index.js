'use strict';
// `npm start`: reads the settings from the environment (README: Settings) and runs the edge until
// SIGTERM/SIGINT. A bad setting exits with status 2 and a message naming it.
const { startEdge, checkOptions, IDENTITY_MODES, SettingsError } = require('./server');
const { createLogger, LEVELS, redact } = require('./log');

function fail(message) {
  process.stderr.write(`presence-edge: ${message}\n`);
  process.exit(2);
}

const FLAGS = Object.freeze({ '': false, 0: false, false: false, 1: true, true: true });

/** EDGE_CORS_ORIGINS, or the deprecated EDGE_CORS_ORIGIN (same meaning) when only that is set. */
function corsOrigins(env, warnings) {
  if (env.EDGE_CORS_ORIGINS !== undefined) return env.EDGE_CORS_ORIGINS;
  if (env.EDGE_CORS_ORIGIN === undefined) return undefined;
  warnings.push('EDGE_CORS_ORIGIN is deprecated; use EDGE_CORS_ORIGINS (a comma-separated list)');
  return env.EDGE_CORS_ORIGIN;
}

/** The edge's options from the environment; exits with a message naming a bad setting. */
function readSettings(env) {
  const portText = env.EDGE_PORT === undefined || env.EDGE_PORT === '' ? '3000' : env.EDGE_PORT;
  if (!/^\d+$/.test(portText) || Number(portText) > 65535) fail(`EDGE_PORT must be 0-65535; got ${portText}`);
  const identity = env.EDGE_IDENTITY || 'token';
  if (!IDENTITY_MODES.includes(identity)) fail(`EDGE_IDENTITY must be one of ${IDENTITY_MODES.join(', ')}; got ${identity}`);
  const logLevel = env.EDGE_LOG_LEVEL || 'info';
  if (!(logLevel in LEVELS)) fail(`EDGE_LOG_LEVEL must be one of ${Object.keys(LEVELS).join(', ')}`);
  const streamsText = env.EDGE_STREAMS_PER_CHANNEL || '1000';
  if (!/^[1-9]\d*$/.test(streamsText)) fail('EDGE_STREAMS_PER_CHANNEL must be a positive integer');
  const demoText = (env.EDGE_DEMO || '').trim().toLowerCase();
  if (!(demoText in FLAGS)) fail(`EDGE_DEMO must be 1 or 0; got ${env.EDGE_DEMO}`);
  const warnings = [];
  const settings = {
    port: Number(portText),
    host: env.EDGE_HOST || undefined,
    target: env.PRESENCE_TARGET || '127.0.0.1:50051',
    identity,
    serviceToken: env.EDGE_SERVICE_TOKEN || undefined,
    corsOrigins: corsOrigins(env, warnings),
    demo: FLAGS[demoText],
    streamsPerChannel: Number(streamsText),
    log: createLogger({ level: logLevel }),
  };
  try {
    checkOptions(settings); // listen address, origins, service token: fail before anything starts
  } catch (err) {
    if (err instanceof SettingsError) fail(err.message);
    throw err;
  }
  for (const w of warnings) settings.log.warn(w);
  return settings;
}

async function main() {
  const settings = readSettings(process.env);
  const { log } = settings;
  process.on('unhandledRejection', (err) => log.error('unhandled rejection', { error: String(err && err.stack) }));
  process.on('uncaughtException', (err) => log.error('uncaught exception', { error: String(err && err.stack) }));

  const edge = await startEdge(settings);
  process.stdout.write(`edge listening on ${edge.port}\n`);
  if (settings.demo) log.info(`demo page: http://${hostForUrl(edge.host)}:${edge.port}/demo/?user=1&contacts=2,3`);

  let stopping = false;
  const stop = (signal) => {
    if (stopping) return;
    stopping = true;
    log.info('stopping', { signal });
    const force = setTimeout(() => process.exit(1), 10000);
    force.unref();
    edge.close().then(() => process.exit(0), () => process.exit(1));
  };
  process.on('SIGTERM', () => stop('SIGTERM'));
  process.on('SIGINT', () => stop('SIGINT'));
}

function hostForUrl(address) {
  if (address === '::' || address === '0.0.0.0') return 'localhost';
  return address.includes(':') ? `[${address}]` : address;
}

main().catch((err) => {
  process.stderr.write(`presence-edge: ${redact(err && err.stack)}\n`);
  process.exit(1);
});

'use strict';
// `npm start`: reads the settings from the environment and runs the edge until SIGTERM/SIGINT.
const { startEdge, IDENTITY_MODES } = require('./server');
const { createLogger, LEVELS } = require('./log');

function fail(message) {
  process.stderr.write(`presence-edge: ${message}\n`);
  process.exit(2);
}

function readSettings(env) {
  const portText = env.EDGE_PORT === undefined || env.EDGE_PORT === '' ? '3000' : env.EDGE_PORT;
  if (!/^\d+$/.test(portText) || Number(portText) > 65535) fail(`EDGE_PORT must be 0-65535; got ${portText}`);
  const identity = env.EDGE_IDENTITY || 'token';
  if (!IDENTITY_MODES.includes(identity)) fail(`EDGE_IDENTITY must be one of ${IDENTITY_MODES.join(', ')}; got ${identity}`);
  const logLevel = env.EDGE_LOG_LEVEL || 'info';
  if (!(logLevel in LEVELS)) fail(`EDGE_LOG_LEVEL must be one of ${Object.keys(LEVELS).join(', ')}`);
  const streamsText = env.EDGE_STREAMS_PER_CHANNEL || '1000';
  if (!/^[1-9]\d*$/.test(streamsText)) fail('EDGE_STREAMS_PER_CHANNEL must be a positive integer');
  return {
    port: Number(portText),
    host: env.EDGE_HOST || undefined,
    target: env.PRESENCE_TARGET || '127.0.0.1:50051',
    identity,
    serviceToken: env.EDGE_SERVICE_TOKEN || undefined,
    corsOrigin: env.EDGE_CORS_ORIGIN === undefined ? '*' : env.EDGE_CORS_ORIGIN || false,
    streamsPerChannel: Number(streamsText),
    log: createLogger({ level: logLevel }),
  };
}

async function main() {
  const settings = readSettings(process.env);
  const { log } = settings;
  process.on('unhandledRejection', (err) => log.error('unhandled rejection', { error: String(err && err.stack) }));
  process.on('uncaughtException', (err) => log.error('uncaught exception', { error: String(err && err.stack) }));

  const edge = await startEdge(settings);
  process.stdout.write(`edge listening on ${edge.port}\n`);

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

main().catch((err) => {
  process.stderr.write(`presence-edge: ${err && err.stack}\n`);
  process.exit(1);
});

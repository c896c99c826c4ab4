'use strict';
// `npm start`: reads the settings from the environment (README: Settings) and runs the edge until
// SIGTERM/SIGINT: in this process with EDGE_WORKERS=1, else as a cluster primary with that many
// worker processes behind one port (cluster.js). A bad setting exits with status 2 and a message
// naming it.
const cluster = require('node:cluster');
const { readSettings, SettingsError } = require('./settings');
const { redact } = require('./log');

function fail(message) {
  process.stderr.write(`presence-edge: ${message}\n`);
  process.exit(2);
}

function load(env, options) {
  try {
    return readSettings(env, options);
  } catch (err) {
    if (err instanceof SettingsError) fail(err.message);
    throw err;
  }
}

function hostForUrl(address) {
  if (address === '::' || address === '0.0.0.0') return 'localhost';
  return address.includes(':') ? `[${address}]` : address;
}

async function main() {
  const settings = load(process.env, cluster.isWorker ? { logBase: { worker: cluster.worker.id } } : {});
  const { log } = settings;
  process.on('unhandledRejection', (err) => log.error('unhandled rejection', { error: String(err && err.stack) }));
  process.on('uncaughtException', (err) => log.error('uncaught exception', { error: String(err && err.stack) }));
  if (cluster.isWorker) {
    const { startEdge } = require('./server');
    await require('./cluster').runWorker(settings, startEdge);
    return;
  }
  for (const w of settings.warnings) log.warn(w);

  let listening;
  if (settings.workers > 1) {
    listening = await require('./cluster').runPrimary(settings);
  } else {
    const { startEdge } = require('./server');
    const edge = await startEdge(settings);
    listening = edge;
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
  process.stdout.write(`edge listening on ${listening.port}\n`);
  if (settings.demo) log.info(`demo page: http://${hostForUrl(listening.host)}:${listening.port}/demo/?user=1&contacts=2,3`);
}

main().catch((err) => {
  process.stderr.write(`presence-edge: ${redact(err && err.stack)}\n`);
  process.exit(1);
});

'use strict';
// Runs the edge as `npm start` does (node src/index.js) with a given environment, and waits for its
// `edge listening on PORT` line.
const { spawn } = require('node:child_process');
const path = require('node:path');

const INDEX = path.resolve(__dirname, '..', '..', 'src', 'index.js');

/** Spawns src/index.js with `env` (plus PATH only). */
function runIndex(env) {
  const child = spawn(process.execPath, [INDEX], {
    env: { PATH: process.env.PATH, ...env },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  let stdout = '';
  let stderr = '';
  child.stdout.setEncoding('utf8').on('data', (c) => { stdout += c; });
  child.stderr.setEncoding('utf8').on('data', (c) => {
    stderr += c;
    if (process.env.EDGE_TEST_LOG) process.stderr.write(c);
  });
  const exit = new Promise((resolve) => child.once('exit', (code, signal) => resolve({ code, signal })));
  return { child, exit, out: () => stdout, err: () => stderr };
}

/** Resolves with the port of the `edge listening on PORT` line; rejects after `timeout` ms or on exit. */
function listeningPort(run, timeout = 10000) {
  return new Promise((resolve, reject) => {
    const check = () => {
      const m = /^edge listening on (\d+)$/m.exec(run.out());
      if (!m) return;
      clearTimeout(timer);
      resolve(Number(m[1]));
    };
    const timer = setTimeout(() => reject(new Error(`no listening line within ${timeout} ms: ${run.out()} ${run.err()}`)), timeout);
    run.child.stdout.on('data', check);
    run.exit.then(({ code, signal }) => {
      clearTimeout(timer);
      reject(new Error(`the edge exited (code ${code}, signal ${signal}): ${run.err()}`));
    });
    check();
  });
}

/** SIGTERM and wait for the exit. */
async function stopIndex(run) {
  run.child.kill('SIGTERM');
  return run.exit;
}

module.exports = { runIndex, listeningPort, stopIndex };

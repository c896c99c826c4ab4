'use strict';
// Spawns the real Rust presence service for a test: a temporary SQLite database, no offline
// grace, metrics off. Parses its one stdout line `listening on 127.0.0.1:PORT`.
const { spawn } = require('node:child_process');
const fs = require('node:fs');
const net = require('node:net');
const os = require('node:os');
const path = require('node:path');
const grpc = require('@grpc/grpc-js');
const { loadPresenceProto } = require('../../src/proto');

const EDGE_DIR = path.resolve(__dirname, '..', '..');
const PRESENCE_BIN = process.env.PRESENCE_BIN
  ? path.resolve(process.env.PRESENCE_BIN)
  : path.resolve(EDGE_DIR, '..', 'target', 'debug', 'presence');
const STARTUP_TIMEOUT_MS = 30000;
const STOP_TIMEOUT_MS = 10000;

function makeTempDir() {
  return fs.mkdtempSync(path.join(os.tmpdir(), 'presence-edge-test-'));
}

/** A port that was free a moment ago (for tests that must restart the server on the same port). */
function freePort() {
  return new Promise((resolve, reject) => {
    const srv = net.createServer();
    srv.once('error', reject);
    srv.listen(0, '127.0.0.1', () => {
      const { port } = srv.address();
      srv.close(() => resolve(port));
    });
  });
}

/**
 * @param {object} [o]
 * @param {string} [o.listen='127.0.0.1:0']
 * @param {string} [o.dir] directory holding p.db (reuse it to restart on the same database)
 * @param {string} [o.jwtSecret] sets PRESENCE_JWT_SECRET (otherwise development mode)
 * @param {Record<string, string>} [o.env] more PRESENCE_* settings (PRESENCE_RATE_ACTIVITY_PER_MIN…)
 */
function startPresenceServer(o = {}) {
  if (!fs.existsSync(PRESENCE_BIN)) {
    return Promise.reject(
      new Error(
        `presence server binary not found at ${PRESENCE_BIN}: run \`cargo build --bin presence\` in the repo root, ` +
          'or point PRESENCE_BIN at the binary',
      ),
    );
  }
  const dir = o.dir || makeTempDir();
  const env = { ...process.env };
  for (const key of Object.keys(env)) {
    if (key.startsWith('PRESENCE_') && key !== 'PRESENCE_BIN') delete env[key];
  }
  delete env.DATABASE_URL;
  Object.assign(env, {
    DATABASE_URL: `sqlite://${path.join(dir, 'p.db')}`,
    PRESENCE_OFFLINE_GRACE_MS: '0',
    PRESENCE_METRICS_LISTEN: '',
  });
  if (o.jwtSecret) env.PRESENCE_JWT_SECRET = o.jwtSecret;
  Object.assign(env, o.env);

  const child = spawn(PRESENCE_BIN, ['serve', '--listen', o.listen || '127.0.0.1:0'], {
    env,
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  let stdout = '';
  let stderr = '';
  let exited = null;
  const exitPromise = new Promise((resolve) => {
    child.once('exit', (code, signal) => {
      exited = { code, signal };
      resolve(exited);
    });
  });
  child.stderr.setEncoding('utf8');
  child.stderr.on('data', (chunk) => {
    stderr += chunk;
    if (stderr.length > 200000) stderr = stderr.slice(-100000);
    if (process.env.PRESENCE_TEST_LOG) process.stderr.write(chunk);
  });
  child.stdout.setEncoding('utf8');

  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => {
      child.kill('SIGKILL');
      reject(new Error(`presence server did not print "listening on" within ${STARTUP_TIMEOUT_MS} ms\nstderr:\n${stderr.slice(-4000)}`));
    }, STARTUP_TIMEOUT_MS);
    child.once('error', (err) => {
      clearTimeout(timer);
      reject(err);
    });
    exitPromise.then(({ code, signal }) => {
      clearTimeout(timer);
      reject(new Error(`presence server exited early (code ${code}, signal ${signal})\nstdout:\n${stdout}\nstderr:\n${stderr.slice(-4000)}`));
    });
    child.stdout.on('data', (chunk) => {
      stdout += chunk;
      const m = /^listening on (\S+):(\d+)\s*$/m.exec(stdout);
      if (!m) return;
      clearTimeout(timer);
      const port = Number(m[2]);
      resolve({
        port,
        target: `127.0.0.1:${port}`,
        dir,
        child,
        stdout: () => stdout,
        stderr: () => stderr,
        /** SIGTERM, wait for exit (SIGKILL after 10 s). Resolves {code, signal}. */
        async stop(signal = 'SIGTERM') {
          if (exited) return exited;
          child.kill(signal);
          const timeout = setTimeout(() => child.kill('SIGKILL'), STOP_TIMEOUT_MS);
          const result = await exitPromise;
          clearTimeout(timeout);
          return result;
        },
        /** stop() and remove the database directory. */
        async destroy() {
          await this.stop();
          fs.rmSync(dir, { recursive: true, force: true });
        },
      });
    });
  });
}

/** gRPC clients for the tests themselves (contacts, stats), identified as a service. */
function serviceClients(target, { serviceToken } = {}) {
  const pkg = loadPresenceProto();
  const creds = grpc.credentials.createInsecure();
  const contacts = new pkg.Contacts(target, creds);
  const presence = new pkg.Presence(target, creds);
  const md = (actingFor) => {
    const m = new grpc.Metadata();
    if (serviceToken) m.set('authorization', `Bearer ${serviceToken}`);
    else m.set('x-presence-service', 'test');
    if (actingFor) m.set('x-presence-user-id', String(actingFor));
    return m;
  };
  const unary = (client, method, request, actingFor) =>
    new Promise((resolve, reject) => {
      client[method](request, md(actingFor), { deadline: Date.now() + 10000 }, (err, res) => (err ? reject(err) : resolve(res)));
    });
  return {
    addContacts: (pairs) =>
      unary(contacts, 'AddContacts', { pairs: pairs.map(([user_id, contact_id]) => ({ user_id, contact_id })) }),
    getStats: () => unary(presence, 'GetStats', {}),
    /** SetPrivacy as `userId` (a service acting for the user). */
    setPrivacy: (userId, settings) => unary(presence, 'SetPrivacy', { settings }, userId),
    /** Resolves once the server counts exactly `n` live Authenticate streams. */
    async waitForConnections(n, timeoutMs = 10000) {
      const until = Date.now() + timeoutMs;
      let last;
      for (;;) {
        try {
          last = await unary(presence, 'GetStats', {});
          if (Number(last.connections) === n) return last;
        } catch (err) {
          last = err;
        }
        if (Date.now() > until) {
          throw new Error(`server never reached ${n} connections; last GetStats: ${JSON.stringify(last && (last.message || last))}`);
        }
        await new Promise((r) => setTimeout(r, 50));
      }
    },
    close() {
      contacts.close();
      presence.close();
    },
  };
}

module.exports = { startPresenceServer, serviceClients, freePort, PRESENCE_BIN, EDGE_DIR };

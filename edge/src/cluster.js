'use strict';
// Several edge processes behind one port (EDGE_WORKERS, default: the number of CPUs), with Node's
// cluster module and socket.io's sticky sessions (@socket.io/sticky):
//
// - The primary listens. It reads the first bytes of each new TCP connection and hands the
//   connection (its file descriptor) to a worker: a request naming a socket.io session (`sid=`)
//   to the worker that holds that session — HTTP long-polling sends each poll as a new request,
//   and engine.io only knows its own sessions — anything else to the worker with the fewest
//   sockets. A WebSocket stays with its worker for its whole life: the primary is out of the data
//   path once it has handed the connection over. (A polling request with a body is relayed by the
//   primary over IPC; clients upgrade to WebSocket within a round trip or two.) Workers answer
//   with `Connection: close`, so no keep-alive connection carries requests of two sessions.
// - Each worker is a whole edge (startEdge) with its own relay stream to the presence service.
//   Workers share nothing: a socket's session, its deliveries and its emits all live in the
//   worker that holds the socket, so no socket.io adapter is needed (the cluster adapter would
//   send every emit to every other worker over IPC, for nothing).
// - /healthz, answered by any worker, sums every worker's figures (asked over IPC) and lists
//   each process (pid, sockets, relay stream, RSS).
// - A worker that dies is replaced (its sockets reconnect, to the other workers meanwhile);
//   SIGTERM/SIGINT stop the workers (each closes its sockets and its relay stream) then the primary.
const cluster = require('node:cluster');
const net = require('node:net');
const v8 = require('node:v8');
const { setupPrimary, setupWorker } = require('@socket.io/sticky');
const { healthOf } = require('./health');

const STATS_TIMEOUT_MS = 1000;
const STOP_TIMEOUT_MS = 10000;
const RESTART_DELAY_MS = Object.freeze({ initial: 500, max: 30000 });

/**
 * @socket.io/sticky reads the first bytes of a connection and hands the connection (its handle) to
 * a worker, but does not stop reading first: what the client sends next, while the hand-over is
 * under way, is read by the primary and dropped (Node detaches a handle it sends from the
 * socket, and drops what that handle still reads until the send completes). A WebSocket client
 * answers the worker's engine.io OPEN at once, so its socket.io CONNECT was lost now and then
 * (about one connection in a hundred, sequentially, here) and the client hung. Runs after
 * sticky's own listener: the first chunk is passed to sticky with the socket no longer reading,
 * so the next bytes wait in the kernel for the worker. A request that may have a body is left
 * alone: sticky relays those chunk by chunk (HTTP long-polling POSTs).
 */
function stopReadingBeforeHandOver(socket) {
  // A connection reset while the primary holds it is not worth a crash.
  socket.on('error', () => socket.destroy());
  const handOver = socket.listeners('data')[0];
  if (!handOver) return;
  socket.removeListener('data', handOver);
  socket.once('data', function first(chunk) {
    const end = chunk.indexOf('\r\n\r\n');
    const head = chunk.subarray(0, end).toString().toLowerCase();
    const mayHaveBody = head.includes('content-length:') || head.includes('transfer-encoding:');
    if (mayHaveBody) socket.on('data', handOver);
    else if (socket._handle && typeof socket._handle.readStop === 'function') {
      socket._handle.reading = false;
      socket._handle.readStop();
    }
    handOver.call(this, chunk);
  });
}

/**
 * @socket.io/sticky tells the primary which worker holds a session when engine.io emits
 * `connection`, after the handshake's answer is written: an HTTP long-polling client that POSTs
 * the moment that answer arrives (its socket.io CONNECT, on a new connection) could reach the
 * primary before the news did, and be sent to the other worker, which answers "Session ID
 * unknown" (the client sees "xhr post error"; 6 in 200 here, in test/16-cluster.test.js). The
 * session is bound when its id is made instead, before anything is answered; an id whose
 * handshake then fails is unbound after HANDSHAKE_GRACE_MS, so the primary's map stays bounded.
 */
const HANDSHAKE_GRACE_MS = 10000;
function bindSessionsBeforeAnswering(io, send) {
  const engine = io.engine;
  const generate = engine.generateId.bind(engine);
  const pending = new Map(); // id → timer, until its connection
  engine.generateId = async (req) => {
    const id = await generate(req);
    send({ type: 'sticky:connection', data: id });
    const timer = setTimeout(() => {
      pending.delete(id);
      send({ type: 'sticky:disconnection', data: id });
    }, HANDSHAKE_GRACE_MS);
    timer.unref();
    pending.set(id, timer);
    return id;
  };
  engine.on('connection', (socket) => {
    clearTimeout(pending.get(socket.id));
    pending.delete(socket.id);
  });
}

/** The workers' node flags: the primary's, plus the young generation size unless already given. */
function workerExecArgv(semiSpaceMb) {
  const given = [...process.execArgv, process.env.NODE_OPTIONS || ''].some((a) => a.includes('--max-semi-space-size'));
  return semiSpaceMb && !given ? [...process.execArgv, `--max-semi-space-size=${semiSpaceMb}`] : process.execArgv;
}

/**
 * The primary: forks `settings.workers` workers, listens once they are all up, prints
 * `edge listening on PORT` (stdout) and supervises them. Resolves once listening.
 */
async function runPrimary(settings) {
  const { log, workers: count, port, bind } = settings;
  // The primary only hands connections over, but each hand-over leaves a few kilobytes of garbage,
  // and V8 grows the young generation to its maximum (tens of megabytes, resident for good) under
  // that churn. Node cannot restart itself with --max-semi-space-size; keeping the young
  // generation at its initial size has the same effect here.
  v8.setFlagsFromString('--semi-space-growth-factor=1');
  const server = net.createServer();
  setupPrimary(server, { loadBalancingMethod: 'round-robin' });
  server.on('connection', stopReadingBeforeHandOver);
  let stopping = false;
  let starting = true;
  let crashes = 0;
  let seq = 0;
  const gathers = new Map(); // stats round id → collect(worker, stats)

  const ready = new Set();
  let startupDone;
  let startupFailed;
  const startup = new Promise((resolve, reject) => {
    startupDone = resolve;
    startupFailed = reject;
  });

  const gather = () =>
    new Promise((resolve) => {
      const id = ++seq;
      const workers = Object.values(cluster.workers).filter(Boolean);
      const replies = new Map();
      const finish = () => {
        clearTimeout(timer);
        gathers.delete(id);
        const { rss, heapUsed } = process.memoryUsage();
        resolve(healthOf(workers.map((w) => replies.get(w.id) || null), { rss, heap_used: heapUsed }));
      };
      const timer = setTimeout(finish, STATS_TIMEOUT_MS);
      gathers.set(id, (worker, stats) => {
        replies.set(worker.id, stats ? { worker: worker.id, ...stats } : null);
        if (replies.size === workers.length) finish();
      });
      for (const w of workers) {
        try {
          w.send({ type: 'edge:stats', id });
        } catch {
          // exiting; it counts as no answer
        }
      }
      if (workers.length === 0) finish();
    });

  cluster.on('message', (worker, msg) => {
    if (!msg || typeof msg.type !== 'string' || !msg.type.startsWith('edge:')) return;
    if (msg.type === 'edge:ready') {
      ready.add(worker.id);
      if (starting && ready.size >= count) startupDone();
    } else if (msg.type === 'edge:stats') {
      const collect = gathers.get(msg.id);
      if (collect) collect(worker, msg.stats);
    } else if (msg.type === 'edge:health') {
      gather().then((body) => {
        if (worker.isConnected()) worker.send({ type: 'edge:health-reply', id: msg.id, body });
      });
    }
  });

  cluster.on('exit', (worker, code, signal) => {
    ready.delete(worker.id);
    if (stopping) {
      if (Object.keys(cluster.workers).length === 0) {
        log.info('edge stopped');
        process.exit(0);
      }
      return;
    }
    if (starting) {
      startupFailed(new Error(`edge worker ${worker.id} exited while starting (code ${code}, signal ${signal})`));
      return;
    }
    crashes += 1;
    const delay = Math.min(RESTART_DELAY_MS.max, RESTART_DELAY_MS.initial * 2 ** Math.min(crashes - 1, 10));
    log.error('edge worker exited; starting another', { worker: worker.id, pid: worker.process.pid, code, signal, delay_ms: delay });
    setTimeout(() => {
      if (!stopping) cluster.fork();
    }, delay).unref();
  });

  const stop = (signal) => {
    if (stopping) return;
    stopping = true;
    log.info('stopping', { signal });
    server.close();
    const workers = Object.values(cluster.workers).filter(Boolean);
    if (workers.length === 0) process.exit(0);
    for (const w of workers) {
      try {
        w.send({ type: 'edge:stop' });
      } catch {
        // already gone
      }
    }
    setTimeout(() => {
      log.error('edge workers did not stop in time; killing them');
      for (const w of Object.values(cluster.workers)) if (w) w.process.kill('SIGKILL');
      process.exit(1);
    }, STOP_TIMEOUT_MS).unref();
  };
  process.on('SIGTERM', () => stop('SIGTERM'));
  process.on('SIGINT', () => stop('SIGINT'));

  // Structured clone over IPC: the first bytes of a connection reach the worker as bytes (with the
  // default JSON serialization a Buffer arrives as { type, data } and the request is lost).
  cluster.setupPrimary({ serialization: 'advanced', execArgv: workerExecArgv(settings.semiSpaceMb) });
  log.info('starting edge workers', { workers: count });
  for (let i = 0; i < count; i += 1) cluster.fork();
  try {
    await startup;
  } catch (err) {
    stopping = true;
    for (const w of Object.values(cluster.workers)) if (w) w.process.kill('SIGTERM');
    throw err;
  }
  starting = false;
  const address = await new Promise((resolve, reject) => {
    server.once('error', reject);
    server.listen(port, bind, () => {
      server.off('error', reject);
      resolve(server.address());
    });
  }).catch((err) => {
    stop('listen failed');
    throw err;
  });
  log.info('edge listening', { port: address.port, host: address.address, workers: count });
  return { port: address.port, host: address.address };
}

/**
 * A worker: a whole edge on connections handed over by the primary. Resolves once it is up (and
 * has told the primary so).
 */
async function runWorker(settings, startEdge) {
  const { log } = settings;
  let edge = null;
  let seq = 0;
  const asked = new Map(); // health request id → resolve
  let stopping = false;

  const send = (msg) => {
    if (process.connected) process.send(msg);
  };
  const stop = (why) => {
    if (stopping) return;
    stopping = true;
    log.info('stopping', { reason: why });
    const done = () => process.exit(0);
    if (edge) edge.close().then(done, done);
    else done();
  };
  process.on('message', (msg) => {
    if (!msg || typeof msg.type !== 'string') return;
    if (msg.type === 'edge:stats') send({ type: 'edge:stats', id: msg.id, stats: edge ? edge.stats() : null });
    else if (msg.type === 'edge:health-reply') {
      const resolve = asked.get(msg.id);
      if (resolve) resolve(msg.body);
    } else if (msg.type === 'edge:stop') stop('the primary stops');
  });
  process.on('SIGTERM', () => stop('SIGTERM'));
  process.on('SIGINT', () => stop('SIGINT'));
  process.on('disconnect', () => stop('the primary is gone'));

  const health = () =>
    new Promise((resolve, reject) => {
      const id = ++seq;
      const timer = setTimeout(() => {
        asked.delete(id);
        reject(new Error('the edge primary did not answer'));
      }, STATS_TIMEOUT_MS * 2);
      asked.set(id, (body) => {
        clearTimeout(timer);
        asked.delete(id);
        resolve(body);
      });
      send({ type: 'edge:health', id });
    });

  const attach = (io) => {
    setupWorker(io);
    bindSessionsBeforeAnswering(io, send);
  };
  edge = await startEdge({ ...settings, cluster: { attach, health } });
  send({ type: 'edge:ready' });
  return edge;
}

module.exports = { runPrimary, runWorker };

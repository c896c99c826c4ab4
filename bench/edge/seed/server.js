'use strict';
// The seed presence system as its documentation describes it (shared/seed/presence-system.md):
// Node + socket.io 4 + MariaDB (mysql2). A reference to measure the edge against, not a product.
//
//   SEED_PORT=3000 SEED_DATABASE_URL=mysql://root@127.0.0.1:3306/seed_bench node seed/server.js
//
// Prints `seed listening on PORT` on stdout once it listens (SEED_PORT=0 picks a port).
// GET /healthz answers { status, sockets, users } (socket.io connections, users online).
const http = require('node:http');
const { Server } = require('socket.io');
const { attachPresence } = require('./src/sockets/presence.socket');
const { getPool, closePool } = require('./src/config/db');

async function main() {
  const port = Number(process.env.SEED_PORT ?? 3000);
  // Fail early when the database is unreachable.
  await getPool().query('SELECT 1');

  let io = null;
  const httpServer = http.createServer((req, res) => {
    if (req.url === '/healthz') {
      res.writeHead(200, { 'content-type': 'application/json' });
      res.end(JSON.stringify({ status: 'ok', sockets: io.engine.clientsCount, users: io.getActiveUsersCount() }));
      return;
    }
    res.writeHead(404);
    res.end();
  });
  // The doc's heartbeat settings ("User stuck as online after disconnect").
  io = new Server(httpServer, { cors: { origin: '*' }, pingTimeout: 30000, pingInterval: 10000 });
  attachPresence(io);

  await new Promise((resolve) => httpServer.listen(port, process.env.SEED_HOST || undefined, resolve));
  process.stdout.write(`seed listening on ${httpServer.address().port}\n`);

  const stop = () => {
    io.close();
    closePool().finally(() => process.exit(0));
    setTimeout(() => process.exit(0), 3000).unref();
  };
  process.on('SIGTERM', stop);
  process.on('SIGINT', stop);
}

main().catch((err) => {
  process.stderr.write(`seed: ${err && err.stack}\n`);
  process.exit(1);
});

#!/usr/bin/env node
'use strict';
// The cheapest server that speaks the seed protocol: socket.io with the ring graph in memory, no
// database, no gRPC. Not a presence system: it calibrates the load generator (how many
// deliveries per second it can check on this machine, and what socket.io alone costs).
//
//   NULL_PORT=3999 node load/null-target.js --users 10000 --contacts 20
const http = require('node:http');
const { parseArgs } = require('node:util');
const { Server } = require('socket.io');
const { Ring } = require('../lib/ring');

const STATUSES = new Set(['online', 'offline', 'away', 'busy']);

const { values } = parseArgs({
  options: { users: { type: 'string', default: '10000' }, contacts: { type: 'string', default: '20' } },
});
const ring = new Ring(Number(values.users), Number(values.contacts));
const httpServer = http.createServer();
const io = new Server(httpServer);

function broadcast(userId, status) {
  const data = { user_id: userId, status, last_seen: new Date().toISOString() };
  for (const c of ring.contacts(userId)) io.to(`user:${c}`).emit('presence_updated', data);
}

io.on('connection', (socket) => {
  socket.on('user_authenticated', (id) => {
    const userId = Number(id);
    if (!Number.isSafeInteger(userId) || userId < 1 || userId > ring.n) return;
    socket.data.userId = userId;
    socket.join(`user:${userId}`);
    broadcast(userId, 'online');
  });
  socket.on('update_status', (status) => {
    if (socket.data.userId && STATUSES.has(status)) broadcast(socket.data.userId, status);
  });
});

httpServer.listen(Number(process.env.NULL_PORT || 0), '127.0.0.1', () => {
  process.stdout.write(`null-target listening on ${httpServer.address().port}\n`);
});

'use strict';
// presence.socket.js of the seed: the socket.io handlers, written from the seed documentation
// (shared/seed/presence-system.md): an in-memory userId → Set(socketId) map, the database
// updated on every connect, disconnect and status change, the user's contacts read from the
// database and `presence_updated` emitted to each contact's `user:<id>` room.
const presenceService = require('../services/presence.service');

function log(message, err) {
  process.stderr.write(`seed: ${message}${err ? `: ${err && err.message}` : ''}\n`);
}

/** Ids as the seed's clients send them: a Number (or a numeric string). */
function toUserId(value) {
  const id = typeof value === 'string' && value.trim() !== '' ? Number(value) : value;
  return Number.isSafeInteger(id) && id > 0 ? id : null;
}

function attachPresence(io) {
  // userId -> Set of socketIds: a user is online while they have at least one connection.
  const userConnections = new Map();

  io.isUserOnline = (userId) => userConnections.has(toUserId(userId));
  io.getActiveUsersCount = () => userConnections.size;

  // Server fetches contacts before broadcasting; only these users are notified.
  async function broadcastPresence(userId, status, lastSeen) {
    const contacts = await presenceService.getUserContacts(userId);
    const data = { user_id: userId, status, last_seen: lastSeen.toISOString() };
    contacts.forEach((contactId) => {
      io.to(`user:${contactId}`).emit('presence_updated', data);
    });
  }

  async function setStatus(userId, status) {
    const lastSeen = new Date();
    await presenceService.updateUserStatus(userId, status, lastSeen);
    await broadcastPresence(userId, status, lastSeen);
  }

  io.on('connection', (socket) => {
    socket.on('user_authenticated', async (value) => {
      const userId = toUserId(value);
      if (!userId) return;
      try {
        socket.userId = userId;
        socket.join(`user:${userId}`);
        if (!userConnections.has(userId)) userConnections.set(userId, new Set());
        userConnections.get(userId).add(socket.id);
        // Every authentication sets the user online and tells their contacts (the doc's flow has
        // no "first device only" condition; going offline has one).
        await setStatus(userId, 'online');
      } catch (err) {
        log('user_authenticated failed', err);
      }
    });

    socket.on('update_status', async (status) => {
      if (!socket.userId || !presenceService.STATUSES.includes(status)) return;
      try {
        await setStatus(socket.userId, status);
      } catch (err) {
        log('update_status failed', err);
      }
    });

    socket.on('get_presence', async (userIds) => {
      if (!Array.isArray(userIds)) return;
      try {
        const ids = userIds.map(toUserId).filter(Boolean);
        const users = await presenceService.getBulkUserStatus(ids);
        socket.emit('presence_info', users);
      } catch (err) {
        log('get_presence failed', err);
      }
    });

    socket.on('disconnect', async () => {
      const userId = socket.userId;
      if (!userId) return;
      const sockets = userConnections.get(userId);
      if (!sockets) return;
      sockets.delete(socket.id);
      // Offline only when all of the user's connections are closed.
      if (sockets.size > 0) return;
      userConnections.delete(userId);
      try {
        await setStatus(userId, 'offline');
      } catch (err) {
        log('disconnect handling failed', err);
      }
    });
  });

  return io;
}

module.exports = { attachPresence, toUserId };

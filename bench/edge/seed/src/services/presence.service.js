'use strict';
// presence.service.js of the seed: the database operations behind presence
// (shared/seed/presence-system.md, "API Reference" → "Service Methods").
const { getPool } = require('../config/db');

const STATUSES = Object.freeze(['online', 'offline', 'away', 'busy']);

/** Updates the user's status and last_seen (and the redundant is_online flag). */
async function updateUserStatus(userId, status, lastSeen = new Date()) {
  await getPool().execute('UPDATE users SET status = ?, last_seen = ?, is_online = ? WHERE id = ?', [
    status,
    lastSeen,
    status !== 'offline',
    userId,
  ]);
}

/** The ids of the people the user has chatted with. */
async function getUserContacts(userId) {
  const [rows] = await getPool().execute('SELECT contact_id FROM contacts WHERE user_id = ?', [userId]);
  return rows.map((r) => r.contact_id);
}

/** [{ user_id, status, last_seen }] for the given ids (those that exist). */
async function getBulkUserStatus(userIds) {
  if (userIds.length === 0) return [];
  const [rows] = await getPool().query('SELECT id AS user_id, status, last_seen FROM users WHERE id IN (?)', [userIds]);
  return rows;
}

module.exports = { STATUSES, updateUserStatus, getUserContacts, getBulkUserStatus };

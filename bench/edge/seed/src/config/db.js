'use strict';
// The MariaDB/MySQL pool (mysql2). SEED_DATABASE_URL names the server and database; the database
// is the bench's own (setup.js refuses names that do not start with `seed_`).
const mysql = require('mysql2/promise');

const DEFAULT_URL = 'mysql://root@127.0.0.1:3306/seed_bench';

function databaseUrl(env = process.env) {
  return env.SEED_DATABASE_URL || DEFAULT_URL;
}

/** { host, port, user, password, database } from a mysql:// URL. */
function parseUrl(text) {
  const url = new URL(text);
  if (url.protocol !== 'mysql:' && url.protocol !== 'mariadb:') throw new Error(`not a mysql:// URL: ${text}`);
  return {
    host: url.hostname || '127.0.0.1',
    port: Number(url.port || 3306),
    user: decodeURIComponent(url.username || 'root'),
    password: decodeURIComponent(url.password || ''),
    database: decodeURIComponent(url.pathname.replace(/^\//, '')) || 'seed_bench',
  };
}

let pool = null;

/** The process's pool, created on first use (mysql2's default of 10 connections, SEED_DB_POOL). */
function getPool(env = process.env) {
  if (!pool) {
    pool = mysql.createPool({
      ...parseUrl(databaseUrl(env)),
      connectionLimit: Number(env.SEED_DB_POOL || 10),
      waitForConnections: true,
      dateStrings: false,
    });
  }
  return pool;
}

async function closePool() {
  if (pool) {
    const p = pool;
    pool = null;
    await p.end();
  }
}

module.exports = { getPool, closePool, parseUrl, databaseUrl, DEFAULT_URL };

'use strict';
// Creates the seed's database for the bench: the schema (migrations/schema.sql), users 1..N
// (all offline) and the ring contact graph (lib/ring.js, the same one the presence target gets),
// each link stored in both directions. Only ever touches its own database, whose name must start
// with `seed_` (SEED_DATABASE_URL, default mysql://root@127.0.0.1:3306/seed_bench); its tables
// are dropped and re-created.
//
//   node seed/setup.js --users 10000 --contacts 20
const fs = require('node:fs');
const path = require('node:path');
const { parseArgs } = require('node:util');
const mysql = require('mysql2/promise');
const { parseUrl, databaseUrl } = require('./src/config/db');
const { Ring } = require('../lib/ring');

const ROWS_PER_INSERT = 5000;

async function insertBatched(conn, sql, rows) {
  for (let i = 0; i < rows.length; i += ROWS_PER_INSERT) {
    await conn.query(sql, [rows.slice(i, i + ROWS_PER_INSERT)]);
  }
}

async function setup({ users, contacts, url = databaseUrl() }) {
  const ring = new Ring(users, contacts);
  const { database, ...server } = parseUrl(url);
  if (!/^seed_[A-Za-z0-9_]*$/.test(database)) throw new Error(`refusing database ${database}: the bench's database name must start with seed_`);
  const conn = await mysql.createConnection({ ...server, multipleStatements: true });
  try {
    await conn.query(`CREATE DATABASE IF NOT EXISTS \`${database}\``);
    await conn.query(`USE \`${database}\``);
    await conn.query('DROP TABLE IF EXISTS contacts, users');
    await conn.query(fs.readFileSync(path.join(__dirname, 'migrations', 'schema.sql'), 'utf8'));
    const userRows = [];
    for (let u = 1; u <= users; u += 1) userRows.push([u, `user ${u}`, `+1555${String(u).padStart(7, '0')}`, 'offline', false]);
    await insertBatched(conn, 'INSERT INTO users (id, name, phone_number, status, is_online) VALUES ?', userRows);
    const contactRows = [];
    ring.forEachPair((u, c) => contactRows.push([u, c], [c, u]));
    await insertBatched(conn, 'INSERT INTO contacts (user_id, contact_id) VALUES ?', contactRows);
    return { database, users, contactsPerUser: ring.degree, rows: contactRows.length };
  } finally {
    await conn.end();
  }
}

if (require.main === module) {
  const { values } = parseArgs({
    options: { users: { type: 'string', default: '10000' }, contacts: { type: 'string', default: '20' } },
  });
  const started = Date.now();
  setup({ users: Number(values.users), contacts: Number(values.contacts) }).then(
    (r) => {
      process.stdout.write(
        `seed setup: database ${r.database}, ${r.users} users, ${r.contactsPerUser} contacts each (${r.rows} rows) in ${Date.now() - started} ms\n`,
      );
    },
    (err) => {
      process.stderr.write(`seed setup: ${err && err.stack}\n`);
      process.exit(1);
    },
  );
}

module.exports = { setup };

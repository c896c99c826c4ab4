#!/usr/bin/env node
'use strict';
// Creates the ring contact graph (lib/ring.js, the one seed/setup.js writes to MariaDB) in a
// presence service through `presence.v1.Contacts/AddContacts`, calling as a service. Against a
// development-mode service (no JWT key, loopback) the caller names itself with metadata
// `x-presence-service: bench`; with --service-token (or PRESENCE_SERVICE_TOKEN) it sends that
// service JWT instead.
//
//   node load/setup-presence.js --target 127.0.0.1:50051 --users 10000 --contacts 20
const path = require('node:path');
const { parseArgs } = require('node:util');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');
const { Ring } = require('../lib/ring');

const PROTO_ROOT = path.resolve(__dirname, '..', '..', '..', 'proto');
/** Pairs per call: half the service's default PRESENCE_MAX_PAIRS (10,000), as presence-bench does. */
const PAIRS_PER_CALL = 5000;
const CONCURRENT_CALLS = 4;

function contactsClient(target) {
  // Only AddContacts is called: snake_case fields as in the .proto, ids sent as decimal strings.
  const file = path.join(PROTO_ROOT, 'presence', 'v1', 'presence.proto');
  const def = protoLoader.loadSync(file, { keepCase: true, longs: String, includeDirs: [PROTO_ROOT] });
  const pkg = grpc.loadPackageDefinition(def).presence.v1;
  return new pkg.Contacts(target, grpc.credentials.createInsecure());
}

async function setupPresence({ target, users, contacts, serviceToken }) {
  const ring = new Ring(users, contacts);
  const client = contactsClient(target);
  const md = new grpc.Metadata();
  if (serviceToken) md.set('authorization', `Bearer ${serviceToken}`);
  else md.set('x-presence-service', 'bench');
  md.setOptions({ waitForReady: true });

  const batches = [];
  let batch = [];
  ring.forEachPair((u, c) => {
    batch.push({ user_id: String(u), contact_id: String(c) });
    if (batch.length === PAIRS_PER_CALL) {
      batches.push(batch);
      batch = [];
    }
  });
  if (batch.length) batches.push(batch);

  const call = (pairs) =>
    new Promise((resolve, reject) => {
      client.AddContacts({ pairs }, md, { deadline: Date.now() + 120000 }, (err) => (err ? reject(err) : resolve()));
    });
  let next = 0;
  const lane = async () => {
    while (next < batches.length) {
      const b = batches[next];
      next += 1;
      await call(b);
    }
  };
  try {
    await Promise.all(Array.from({ length: CONCURRENT_CALLS }, lane));
  } finally {
    client.close();
  }
  return { pairs: ring.pairCount, contactsPerUser: ring.degree, calls: batches.length };
}

if (require.main === module) {
  const { values } = parseArgs({
    options: {
      target: { type: 'string', default: '127.0.0.1:50051' },
      users: { type: 'string', default: '10000' },
      contacts: { type: 'string', default: '20' },
      'service-token': { type: 'string', default: process.env.PRESENCE_SERVICE_TOKEN || '' },
    },
  });
  const started = Date.now();
  setupPresence({
    target: values.target,
    users: Number(values.users),
    contacts: Number(values.contacts),
    serviceToken: values['service-token'] || undefined,
  }).then(
    (r) => {
      process.stdout.write(
        `presence setup: ${values.target}: ${r.pairs} pairs (${r.contactsPerUser} contacts per user) ` +
          `in ${r.calls} AddContacts calls, ${Date.now() - started} ms\n`,
      );
    },
    (err) => {
      process.stderr.write(`presence setup: ${err && (err.details || err.message)}\n`);
      process.exit(1);
    },
  );
}

module.exports = { setupPresence };

'use strict';
// Loads the Rust service's contract straight from the repo (no copy): ../proto/presence/v1/presence.proto
// relative to the edge package. google/protobuf/timestamp.proto comes from protobufjs' bundled
// well-known types.
const path = require('node:path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const PROTO_ROOT = path.resolve(__dirname, '..', '..', 'proto');
const PROTO_FILE = path.join(PROTO_ROOT, 'presence', 'v1', 'presence.proto');

// One convention everywhere in the edge: snake_case field names as in the .proto (keepCase),
// 64-bit integers as decimal strings (longs: String), enums as their names, unset message fields
// as null (defaults: true) and a virtual `kind` naming the member set in each oneof.
const LOADER_OPTIONS = Object.freeze({
  keepCase: true,
  longs: String,
  enums: String,
  defaults: true,
  oneofs: true,
  includeDirs: [PROTO_ROOT],
});

let cached = null;

/** @returns {{Presence: typeof grpc.Client, Contacts: typeof grpc.Client}} presence.v1 package */
function loadPresenceProto() {
  if (!cached) {
    const definition = protoLoader.loadSync(PROTO_FILE, LOADER_OPTIONS);
    cached = grpc.loadPackageDefinition(definition).presence.v1;
  }
  return cached;
}

module.exports = { loadPresenceProto, PROTO_FILE, PROTO_ROOT, LOADER_OPTIONS };

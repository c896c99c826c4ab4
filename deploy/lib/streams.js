'use strict';
// node deploy/lib/streams.js TARGET TOKEN...: one Authenticate stream per token (a device that
// stays connected: it never half-closes), through @grpc/grpc-js, the library the edge uses.
// Prints one line per event, with the time in milliseconds since the epoch:
//   welcome I MS       stream I was welcomed
//   end I CODE MS      stream I ended with gRPC status CODE (14 = UNAVAILABLE)
// Exits when every stream has ended (0), or after TIMEOUT_MS (default 120000) with status 1.
// Needs NODE_PATH=edge/node_modules (grpc-js and proto-loader are the edge's dependencies).
const path = require('node:path');
const grpc = require('@grpc/grpc-js');
const loader = require('@grpc/proto-loader');

const [target, ...tokens] = process.argv.slice(2);
if (!target || tokens.length === 0) {
  process.stderr.write('usage: node streams.js TARGET TOKEN...\n');
  process.exit(2);
}
const protoRoot = path.resolve(__dirname, '..', '..', 'proto');
const definition = loader.loadSync('presence/v1/presence.proto', {
  includeDirs: [protoRoot],
  longs: String,
  enums: String,
  oneofs: true,
});
const { Presence } = grpc.loadPackageDefinition(definition).presence.v1;
const client = new Presence(target, grpc.credentials.createInsecure());

let open = tokens.length;
tokens.forEach((token, i) => {
  const metadata = new grpc.Metadata();
  metadata.set('authorization', `Bearer ${token}`);
  const call = client.Authenticate(metadata);
  call.on('data', (message) => {
    if (message.welcome) console.log(`welcome ${i} ${Date.now()}`);
  });
  call.on('error', () => {}); // the status below says it
  call.on('status', (status) => {
    console.log(`end ${i} ${status.code} ${Date.now()}`);
    open -= 1;
    if (open === 0) process.exit(0);
  });
  call.write({ hello: { device: 'container-check' } });
});
setTimeout(() => {
  console.log(`timeout: ${open} stream(s) still open`);
  process.exit(1);
}, Number(process.env.TIMEOUT_MS || 120000));

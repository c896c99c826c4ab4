'use strict';
// A stand-in presence service (real gRPC, grpc-js) whose Authenticate answers each user as the
// test scripts it: end the stream with a given status, or welcome it. For failures the real
// service cannot be made to produce on demand (OUT_OF_RANGE, FAILED_PRECONDITION…).
const grpc = require('@grpc/grpc-js');
const { loadPresenceProto } = require('../../src/proto');

/**
 * @param {Record<string, Array<number|'welcome'>>} script user id → what each successive
 *   Authenticate call of that user gets: a grpc.status code to end with, or 'welcome'
 *   (the last entry repeats).
 * @returns {Promise<{target: string, calls: (userId: string) => number, stop: () => Promise<void>}>}
 */
async function startFakePresence(script) {
  const calls = new Map();
  const server = new grpc.Server();
  server.addService(loadPresenceProto().Presence.service, {
    Authenticate(call) {
      const user = String(call.metadata.get('x-presence-user-id')[0] || '');
      const n = calls.get(user) || 0;
      calls.set(user, n + 1);
      const plan = script[user] || [grpc.status.NOT_FOUND];
      const step = plan[Math.min(n, plan.length - 1)];
      call.once('data', () => {
        if (step === 'welcome') {
          call.write({ welcome: { connection_id: `fake-${user}-${n}`, self: { user_id: user, status: 'STATUS_ONLINE', version: '1' }, contacts: [] } });
        } else {
          call.emit('error', { code: step, details: `scripted ${grpc.status[step]}` });
        }
      });
      call.on('error', () => {}); // the edge cancelling is fine
    },
  });
  const port = await new Promise((resolve, reject) => {
    server.bindAsync('127.0.0.1:0', grpc.ServerCredentials.createInsecure(), (err, p) => (err ? reject(err) : resolve(p)));
  });
  return {
    target: `127.0.0.1:${port}`,
    calls: (userId) => calls.get(String(userId)) || 0,
    stop: () => new Promise((resolve) => server.tryShutdown(() => resolve())),
  };
}

module.exports = { startFakePresence };

'use strict';
// A stand-in presence service (real gRPC, grpc-js) whose RelayService answers as the test scripts
// it: for failures the real service cannot be made to produce on demand (OUT_OF_RANGE,
// FAILED_PRECONDITION on a session, a refused relay stream, a service that never answers), and for
// deliveries shaped exactly as a test needs (stale versions, groups), and refreshes of the stream's
// service token answered as scripted (the real service checks them; this one only records them).
const grpc = require('@grpc/grpc-js');
const { loadPresenceProto } = require('../../src/proto');

/**
 * @param {object} [o]
 * @param {Record<string, Array<number|'welcome'|'silent'>>} [o.sessions] user id → what each
 *   successive open of that user gets: a grpc.status code to end the session with
 *   (RelaySessionEnded), 'welcome', or 'silent' (nothing at all); the last entry repeats.
 *   Unscripted users are welcomed.
 * @param {number} [o.refuseStream] end every relay stream at once with this code
 * @param {boolean} [o.answer=true] answer get_presence (every id offline, version 1)
 * @param {'accept'|'silent'|number} [o.refresh='accept'] how a RelayRefresh is answered: accepted
 *   (code 0), not at all (a service older than RelayRefresh), or refused with this grpc.status code
 * @returns {Promise<object>} { target, opens(userId), streams(), authorizations, openedAt, refreshes, commands, session(userId), setAnswer(bool), setRefresh(how), send(msg), endStream(code), stop() }
 */
async function startFakePresence({ sessions: script = {}, refuseStream, answer = true, refresh = 'accept' } = {}) {
  const opens = new Map();
  const commands = [];
  const live = new Map(); // user id → latest session id
  let streams = 0;
  const authorizations = []; // each stream's authorization metadata (undefined: none)
  const openedAt = []; // when each stream arrived (ms)
  const refreshes = []; // { stream (1-based), service_token, request_id, at, answer }
  let current = null;
  const state = { answer, refresh };
  const server = new grpc.Server();
  server.addService(loadPresenceProto().RelayService.service, {
    Relay(call) {
      streams += 1;
      authorizations.push(call.metadata.get('authorization')[0]);
      openedAt.push(Date.now());
      call.on('error', () => {}); // the edge cancelling is fine
      if (refuseStream) {
        call.emit('error', { code: refuseStream, details: `scripted ${grpc.status[refuseStream]}` });
        return;
      }
      current = call;
      const stream = streams;
      call.on('data', (msg) => {
        commands.push(msg);
        if (msg.kind === 'refresh') {
          const { service_token: token, request_id: id } = msg.refresh;
          const how = state.refresh;
          refreshes.push({ stream, service_token: token, request_id: id, at: Date.now(), answer: how });
          if (how === 'accept') call.write({ result: { session_id: '0', request_id: id, code: 0 } });
          else if (typeof how === 'number') {
            call.write({ result: { session_id: '0', request_id: id, code: how, message: `scripted ${grpc.status[how]}` } });
          }
        } else if (msg.kind === 'open') {
          const { session_id: id, user_id: user } = msg.open;
          const n = opens.get(user) || 0;
          opens.set(user, n + 1);
          live.set(user, id);
          const plan = script[user] || ['welcome'];
          const step = plan[Math.min(n, plan.length - 1)];
          if (step === 'welcome') {
            call.write({
              welcome: {
                session_id: id,
                welcome: { connection_id: `fake-${user}-${n}`, self: { user_id: user, status: 'STATUS_ONLINE', version: '1' }, contacts: [], last_page: true },
              },
            });
          } else if (typeof step === 'number') {
            call.write({ ended: { session_id: id, code: step, message: `scripted ${grpc.status[step]}` } });
          }
        } else if (msg.kind === 'get_presence' && state.answer) {
          const g = msg.get_presence;
          call.write({
            result: {
              session_id: g.session_id,
              request_id: g.request_id,
              users: g.user_ids.map((u) => ({ user_id: u, status: 'STATUS_OFFLINE', version: '1' })),
            },
          });
        }
      });
      call.on('end', () => call.end());
    },
  });
  const port = await new Promise((resolve, reject) => {
    server.bindAsync('127.0.0.1:0', grpc.ServerCredentials.createInsecure(), (err, p) => (err ? reject(err) : resolve(p)));
  });
  return {
    target: `127.0.0.1:${port}`,
    opens: (userId) => opens.get(String(userId)) || 0,
    streams: () => streams,
    authorizations,
    openedAt,
    refreshes,
    commands,
    /** The session id of `userId`'s latest open. */
    session: (userId) => live.get(String(userId)),
    /** Whether get_presence is answered from now on. */
    setAnswer: (value) => {
      state.answer = value;
    },
    /** How refreshes are answered from now on (see o.refresh). */
    setRefresh: (how) => {
      state.refresh = how;
    },
    /** Writes a RelayResponse on the latest stream. */
    send: (msg) => current.write(msg),
    /** Ends the latest stream with `code` (as the service would, e.g. UNAUTHENTICATED). */
    endStream: (code, details = `scripted ${grpc.status[code]}`) => current.emit('error', { code, details }),
    stop: () => new Promise((resolve) => server.tryShutdown(() => resolve())),
  };
}

module.exports = { startFakePresence };

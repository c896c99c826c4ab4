'use strict';
// The body of GET /healthz, the same with one process or several: the sums over the edge's
// processes, and each process's own figures (stats() of server.js, plus the cluster primary).

/**
 * @param {Array<object|null>} list each worker's stats() (null: it did not answer)
 * @param {object} [primary] { rss, heap_used } of the cluster primary
 */
function healthOf(list, primary) {
  const live = list.filter(Boolean);
  const sum = (f) => live.reduce((n, s) => n + (f(s) || 0), 0);
  return {
    workers: list.length,
    sockets: sum((s) => s.sockets),
    sessions: sum((s) => s.sessions),
    ready: sum((s) => s.ready),
    relay_streams: sum((s) => s.relay.streams),
    emitted: sum((s) => s.emitted),
    rss: (primary ? primary.rss : 0) + sum((s) => s.rss),
    processes: [
      ...(primary ? [{ pid: process.pid, role: 'primary', ...primary }] : []),
      ...list.map((s) => s || { state: 'no answer' }),
    ],
  };
}

module.exports = { healthOf };

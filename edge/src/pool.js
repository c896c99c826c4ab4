'use strict';
// gRPC channels to the presence service. Every browser socket holds one long-lived
// Authenticate stream, and one HTTP/2 connection carries a bounded number of concurrent streams
// (the presence service allows PRESENCE_MAX_STREAMS_PER_CONN, default 10000), so the edge opens
// another channel (with its own connection) whenever every existing one carries
// `streamsPerChannel` streams. Several connections also spread the load over the service's cores.
const grpc = require('@grpc/grpc-js');

const DEFAULT_CHANNEL_OPTIONS = Object.freeze({
  // Reconnect quickly after a server restart; grpc-js defaults are 1 s initial, 120 s max.
  'grpc.initial_reconnect_backoff_ms': 250,
  'grpc.max_reconnect_backoff_ms': 5000,
  // Find dead connections (a server that vanished without FIN) within ~40 s.
  'grpc.keepalive_time_ms': 30000,
  'grpc.keepalive_timeout_ms': 10000,
  // Each channel gets its own connection instead of sharing grpc-js' global subchannel.
  'grpc.use_local_subchannel_pool': 1,
});

class ChannelPool {
  constructor(ClientCtor, target, { streamsPerChannel = 1000, channelOptions = {}, credentials } = {}) {
    this.ClientCtor = ClientCtor;
    this.target = target;
    this.limit = Math.max(1, streamsPerChannel | 0);
    this.options = { ...DEFAULT_CHANNEL_OPTIONS, ...channelOptions };
    this.credentials = credentials || grpc.credentials.createInsecure();
    this.entries = [];
    this.closed = false;
  }

  _create() {
    const client = new this.ClientCtor(this.target, this.credentials, this.options);
    const entry = { client, streams: 0 };
    this.entries.push(entry);
    return entry;
  }

  /** A client for one long-lived stream; call release() once the stream is over. */
  acquire() {
    if (this.closed) throw new Error('channel pool closed');
    const entry = this.entries.find((e) => e.streams < this.limit) || this._create();
    entry.streams += 1;
    let released = false;
    return {
      client: entry.client,
      release: () => {
        if (released) return;
        released = true;
        entry.streams -= 1;
      },
    };
  }

  /** A client for short unary calls. */
  unary() {
    if (this.closed) throw new Error('channel pool closed');
    return (this.entries[0] || this._create()).client;
  }

  stats() {
    return { channels: this.entries.length, streams: this.entries.reduce((n, e) => n + e.streams, 0) };
  }

  close() {
    this.closed = true;
    for (const e of this.entries) {
      try {
        e.client.close();
      } catch {
        // already closed
      }
    }
  }
}

module.exports = { ChannelPool, DEFAULT_CHANNEL_OPTIONS };

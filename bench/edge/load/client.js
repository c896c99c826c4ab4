'use strict';
// The generator's socket.io clients, one per user. Two implementations with one interface:
//
// - `lean` (default): the socket.io wire protocol (engine.io v4 + socket.io v5, websocket
//   transport, main namespace, text packets only) spoken directly over a TCP socket with a
//   minimal RFC 6455 client. The same bytes a browser's socket.io-client exchanges, without its
//   per-socket Manager, reconnection machinery, timers, event emitters and stream layers: the
//   generator shares two cores with the target and checks every delivery, so its cost per
//   message received matters (measured: about a third less CPU than socket.io-client).
// - `socket.io-client`: the official client, to cross-check the lean one.
//
// connect(kind, url, { onEvent(name, arg), onDisconnect() }) resolves to
// { emit(name, arg), close() } once the namespace is connected, or rejects.
const crypto = require('node:crypto');
const net = require('node:net');

const CONNECT_TIMEOUT_MS = 30000;

function wsUrl(url) {
  const u = new URL(url);
  u.protocol = u.protocol === 'https:' ? 'wss:' : 'ws:';
  u.pathname = `${u.pathname.replace(/\/$/, '')}/socket.io/`;
  u.search = '?EIO=4&transport=websocket';
  return u.toString();
}

// ---- lean: WebSocket (RFC 6455) over a bare TCP socket -------------------------------------
// Every delivery is one small frame in its own TCP segment, so the cost per read is what counts:
// `onread` hands each read to a callback in one buffer shared by every socket of the process
// (callbacks run one at a time), with no stream machinery and no allocation per read. The rare
// frame split over two reads is copied into the socket's `pending` buffer.
const SHARED_READ_BUFFER = Buffer.alloc(256 * 1024);
const OP_CONTINUATION = 0x0;
const OP_TEXT = 0x1;
const OP_CLOSE = 0x8;
const OP_PING = 0x9;

let maskState = crypto.randomBytes(4).readUInt32LE(0) || 1;
/** A masked client frame (clients must mask; xorshift keys are unpredictable enough for a bench). */
function clientFrame(opcode, payload) {
  const len = payload.length;
  const head = len < 126 ? 2 : len < 65536 ? 4 : 10;
  const frame = Buffer.allocUnsafe(head + 4 + len);
  frame[0] = 0x80 | opcode;
  if (len < 126) frame[1] = 0x80 | len;
  else if (len < 65536) {
    frame[1] = 0x80 | 126;
    frame.writeUInt16BE(len, 2);
  } else {
    frame[1] = 0x80 | 127;
    frame.writeBigUInt64BE(BigInt(len), 2);
  }
  maskState ^= maskState << 13;
  maskState ^= maskState >>> 17;
  maskState ^= maskState << 5;
  frame.writeInt32LE(maskState | 0, head);
  for (let i = 0; i < len; i += 1) frame[head + 4 + i] = payload[i] ^ frame[head + (i & 3)];
  return frame;
}

function connectLean(url, { onEvent, onDisconnect }) {
  const target = new URL(wsUrl(url));
  if (target.protocol !== 'ws:') throw new Error('the lean client speaks plain ws:// only');
  return new Promise((resolve, reject) => {
    let upgraded = false;
    let connected = false;
    let closed = false;
    let pending = null; // bytes of an incomplete frame (or of the HTTP response)
    let fragments = null; // payloads of a fragmented message
    const timer = setTimeout(() => fail(new Error('connect timeout')), CONNECT_TIMEOUT_MS);

    const socket = net.connect({
      host: target.hostname,
      port: Number(target.port || 80),
      onread: { buffer: SHARED_READ_BUFFER, callback: (n, buf) => onBytes(buf, n) },
    });
    socket.setNoDelay(true);
    const key = crypto.randomBytes(16).toString('base64');
    socket.on('connect', () => {
      socket.write(
        `GET ${target.pathname}${target.search} HTTP/1.1\r\nHost: ${target.host}\r\nUpgrade: websocket\r\n` +
          `Connection: Upgrade\r\nSec-WebSocket-Key: ${key}\r\nSec-WebSocket-Version: 13\r\n\r\n`,
      );
    });
    socket.on('error', (err) => fail(err));
    socket.on('close', () => {
      closed = true;
      if (connected) onDisconnect();
      else fail(new Error('closed before connecting'));
    });

    function fail(err) {
      clearTimeout(timer);
      if (!connected) reject(err);
      socket.destroy();
    }
    const sendText = (text) => {
      if (!closed) socket.write(clientFrame(OP_TEXT, Buffer.from(text)));
    };
    const api = {
      emit(name, arg) {
        sendText(`42${JSON.stringify([name, arg])}`);
      },
      close() {
        if (!closed) socket.end(clientFrame(OP_CLOSE, Buffer.alloc(0)));
      },
    };

    function onBytes(buf, n) {
      let data = buf.subarray(0, n);
      if (pending) {
        data = Buffer.concat([pending, data]);
        pending = null;
      }
      let o = 0;
      if (!upgraded) {
        const end = data.indexOf('\r\n\r\n');
        if (end < 0) {
          pending = Buffer.from(data);
          return;
        }
        if (!data.subarray(0, end).toString('latin1').startsWith('HTTP/1.1 101')) {
          fail(new Error(`upgrade refused: ${data.subarray(0, Math.min(end, 80)).toString('latin1')}`));
          return;
        }
        upgraded = true;
        o = end + 4;
      }
      while (data.length - o >= 2) {
        const b0 = data[o];
        let len = data[o + 1] & 0x7f;
        let head = 2;
        if (len === 126) {
          if (data.length - o < 4) break;
          len = data.readUInt16BE(o + 2);
          head = 4;
        } else if (len === 127) {
          if (data.length - o < 10) break;
          len = Number(data.readBigUInt64BE(o + 2));
          head = 10;
        }
        if (data.length - o < head + len) break;
        onFrame(b0 & 0x0f, (b0 & 0x80) !== 0, data.subarray(o + head, o + head + len));
        o += head + len;
      }
      if (o < data.length) pending = Buffer.from(data.subarray(o));
    }

    function onFrame(opcode, fin, payload) {
      if (opcode === OP_TEXT || opcode === OP_CONTINUATION) {
        if (!fin || fragments) {
          (fragments ||= []).push(Buffer.from(payload));
          if (!fin) return;
          payload = Buffer.concat(fragments);
          fragments = null;
        }
        onPacket(payload.toString('utf8'));
      } else if (opcode === OP_PING) {
        if (!closed) socket.write(clientFrame(0xa, payload));
      } else if (opcode === OP_CLOSE) {
        socket.end();
      }
    }

    // engine.io v4 packet → socket.io v5 packet (text only).
    function onPacket(text) {
      switch (text.charCodeAt(0)) {
        case 0x30: // '0' engine.io open: join the main namespace
          sendText('40');
          return;
        case 0x32: // '2' ping
          sendText('3');
          return;
        case 0x34: // '4' message
          break;
        default:
          return;
      }
      switch (text.charCodeAt(1)) {
        case 0x32: {
          // '2' EVENT ["name", arg]
          const [name, arg] = JSON.parse(text.slice(2));
          onEvent(name, arg);
          return;
        }
        case 0x30: // '0' CONNECT acknowledged
          connected = true;
          clearTimeout(timer);
          resolve(api);
          return;
        case 0x34: // '4' CONNECT_ERROR
          fail(new Error(`connect_error ${text.slice(2)}`));
          return;
        case 0x31: // '1' DISCONNECT by the server
          api.close();
          return;
        default:
      }
    }
  });
}

function connectOfficial(url, { onEvent, onDisconnect }) {
  // Required lazily: the lean client does not need it loaded.
  const { io } = require('socket.io-client');
  return new Promise((resolve, reject) => {
    const socket = io(url, { transports: ['websocket'], forceNew: true, reconnection: false, timeout: CONNECT_TIMEOUT_MS });
    let connected = false;
    socket.onAny((name, arg) => onEvent(name, arg));
    socket.on('connect', () => {
      connected = true;
      resolve({ emit: (name, arg) => socket.emit(name, arg), close: () => socket.disconnect() });
    });
    socket.on('connect_error', (err) => {
      if (!connected) reject(err);
    });
    socket.on('disconnect', () => {
      if (connected) onDisconnect();
    });
  });
}

const CLIENTS = Object.freeze({ lean: connectLean, 'socket.io-client': connectOfficial });

function connect(kind, url, handlers) {
  const fn = CLIENTS[kind];
  if (!fn) throw new Error(`unknown client ${kind}; one of ${Object.keys(CLIENTS).join(', ')}`);
  return fn(url, handlers);
}

module.exports = { connect, CLIENTS, wsUrl };

'use strict';
// A socket.io client over a bare TCP socket (WebSocket transport, text frames, main namespace),
// as fast and as small as a client can be: it sends the namespace CONNECT ('40') the moment
// engine.io's OPEN arrives, in the same read (socket.io-client answers a little later, after its
// own event loop turns, which hides races a load generator or a browser on a fast network hits),
// and thousands of them fit in one process (tools/socket-memory.js).
const crypto = require('node:crypto');
const net = require('node:net');

/** A masked client text frame. */
function textFrame(text) {
  const payload = Buffer.from(text);
  const len = payload.length;
  const head = len < 126 ? 2 : 4;
  const frame = Buffer.alloc(head + 4 + len);
  frame[0] = 0x81;
  if (len < 126) frame[1] = 0x80 | len;
  else {
    frame[1] = 0x80 | 126;
    frame.writeUInt16BE(len, 2);
  }
  const mask = crypto.randomBytes(4);
  mask.copy(frame, head);
  for (let i = 0; i < len; i += 1) frame[head + 4 + i] = payload[i] ^ mask[i & 3];
  return frame;
}

/**
 * Connects to `url`'s socket.io over a WebSocket; resolves once the namespace is connected
 * ('40{"sid":…}' received) with { emit(event, arg), close(), destroy() }; rejects after `timeout`
 * ms. `onEvent(name, arg)` gets every event; engine.io pings are answered.
 */
function rawConnect(url, { timeout = 3000, onEvent = () => {} } = {}) {
  const { hostname, port } = new URL(url);
  return new Promise((resolve, reject) => {
    const socket = net.connect({ host: hostname, port: Number(port) });
    socket.setNoDelay(true);
    let pending = null; // bytes of an incomplete frame (or of the HTTP response)
    let upgraded = false;
    let sentConnect = false;
    let connected = false;
    const client = {
      emit: (event, arg) => socket.write(textFrame(`42${JSON.stringify([event, arg])}`)),
      close: () => socket.end(),
      destroy: () => socket.destroy(),
    };
    const timer = setTimeout(() => {
      socket.destroy();
      reject(new Error(`socket.io CONNECT not answered within ${timeout} ms (upgraded: ${upgraded}, sent: ${sentConnect})`));
    }, timeout);
    socket.on('error', (err) => {
      clearTimeout(timer);
      if (!connected) reject(err);
    });
    socket.on('connect', () => {
      const key = crypto.randomBytes(16).toString('base64');
      socket.write(
        `GET /socket.io/?EIO=4&transport=websocket HTTP/1.1\r\nHost: ${hostname}:${port}\r\nUpgrade: websocket\r\n` +
          `Connection: Upgrade\r\nSec-WebSocket-Key: ${key}\r\nSec-WebSocket-Version: 13\r\n\r\n`,
      );
    });
    const onText = (text) => {
      if (text === '2') socket.write(textFrame('3')); // engine.io ping
      else if (text.startsWith('0{') && !sentConnect) {
        sentConnect = true;
        socket.write(textFrame('40'));
      } else if (text.startsWith('40{') && !connected) {
        connected = true;
        clearTimeout(timer);
        resolve(client);
      } else if (text.startsWith('42')) {
        const [name, arg] = JSON.parse(text.slice(2));
        onEvent(name, arg);
      }
    };
    socket.on('data', (chunk) => {
      let data = pending ? Buffer.concat([pending, chunk]) : chunk;
      pending = null;
      let o = 0;
      if (!upgraded) {
        const end = data.indexOf('\r\n\r\n');
        if (end < 0) {
          pending = data;
          return;
        }
        upgraded = true;
        o = end + 4;
      }
      while (data.length - o >= 2) {
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
        if ((data[o] & 0x0f) === 0x1) onText(data.subarray(o + head, o + head + len).toString());
        o += head + len;
      }
      if (o < data.length) pending = Buffer.from(data.subarray(o));
      data = null;
    });
  });
}

module.exports = { rawConnect };

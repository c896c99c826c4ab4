'use strict';
// The socket.io handshake over a bare TCP socket, as fast as a client can go: the upgrade
// request, then the namespace CONNECT ('40') the moment engine.io's OPEN arrives, in the same
// read. socket.io-client answers a little later (after its own event loop turns), which hides
// races in the server that a browser on a fast network, or a load generator, hits.
const crypto = require('node:crypto');
const net = require('node:net');

/** A masked client text frame (payloads under 126 bytes). */
function textFrame(text) {
  const payload = Buffer.from(text);
  const mask = crypto.randomBytes(4);
  const frame = Buffer.alloc(6 + payload.length);
  frame[0] = 0x81;
  frame[1] = 0x80 | payload.length;
  mask.copy(frame, 2);
  for (let i = 0; i < payload.length; i += 1) frame[6 + i] = payload[i] ^ mask[i & 3];
  return frame;
}

/** The text payloads of the complete unmasked server frames in `data` (small frames only). */
function serverTexts(data) {
  const texts = [];
  let o = 0;
  while (data.length - o >= 2) {
    let len = data[o + 1] & 0x7f;
    let head = 2;
    if (len === 126) {
      if (data.length - o < 4) break;
      len = data.readUInt16BE(o + 2);
      head = 4;
    }
    if (data.length - o < head + len) break;
    texts.push(data.subarray(o + head, o + head + len).toString());
    o += head + len;
  }
  return texts;
}

/**
 * Connects to `url`'s socket.io over a WebSocket; resolves once the namespace is connected
 * ('40{"sid":…}' received), with the TCP socket; rejects after `timeout` ms.
 */
function rawConnect(url, { timeout = 3000 } = {}) {
  const { hostname, port } = new URL(url);
  return new Promise((resolve, reject) => {
    const socket = net.connect({ host: hostname, port: Number(port) });
    socket.setNoDelay(true);
    let buffered = Buffer.alloc(0);
    let upgraded = false;
    let sentConnect = false;
    const timer = setTimeout(() => {
      socket.destroy();
      reject(new Error(`socket.io CONNECT not answered within ${timeout} ms (upgraded: ${upgraded}, sent: ${sentConnect})`));
    }, timeout);
    socket.on('error', (err) => {
      clearTimeout(timer);
      reject(err);
    });
    socket.on('connect', () => {
      const key = crypto.randomBytes(16).toString('base64');
      socket.write(
        `GET /socket.io/?EIO=4&transport=websocket HTTP/1.1\r\nHost: ${hostname}:${port}\r\nUpgrade: websocket\r\n` +
          `Connection: Upgrade\r\nSec-WebSocket-Key: ${key}\r\nSec-WebSocket-Version: 13\r\n\r\n`,
      );
    });
    socket.on('data', (chunk) => {
      buffered = Buffer.concat([buffered, chunk]);
      if (!upgraded) {
        const end = buffered.indexOf('\r\n\r\n');
        if (end < 0) return;
        upgraded = true;
        buffered = buffered.subarray(end + 4);
      }
      const texts = serverTexts(buffered);
      if (!sentConnect && texts.some((t) => t.startsWith('0{'))) {
        sentConnect = true;
        socket.write(textFrame('40'));
      }
      if (texts.some((t) => t.startsWith('40{'))) {
        clearTimeout(timer);
        resolve(socket);
      }
    });
  });
}

module.exports = { rawConnect };

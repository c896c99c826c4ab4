'use strict';
// The optional demo page (EDGE_DEMO=1): three static files from ../demo, served at /demo/ under a
// strict Content-Security-Policy (scripts, styles and connections to the edge itself only). The
// socket.io client script it loads is served by socket.io (/socket.io/socket.io.min.js), which
// the edge turns on only together with the demo. With EDGE_DEMO off none of this exists.
const fs = require('node:fs');
const path = require('node:path');

const DEMO_DIR = path.resolve(__dirname, '..', 'demo');
const FILES = Object.freeze({
  '/demo/': ['index.html', 'text/html; charset=utf-8'],
  '/demo/demo.js': ['demo.js', 'text/javascript; charset=utf-8'],
  '/demo/demo.css': ['demo.css', 'text/css; charset=utf-8'],
});
const HEADERS = Object.freeze({
  'content-security-policy':
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; " +
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
  'x-content-type-options': 'nosniff',
  'referrer-policy': 'no-referrer',
  'cache-control': 'no-cache',
});

/** (req, res) => true when it answered (a demo path), false otherwise. Files are read once. */
function createDemoHandler() {
  const pages = new Map(
    Object.entries(FILES).map(([route, [file, type]]) => [route, { body: fs.readFileSync(path.join(DEMO_DIR, file)), type }]),
  );
  return (req, res) => {
    const url = new URL(req.url, 'http://edge');
    if (url.pathname === '/demo') {
      res.writeHead(308, { location: `/demo/${url.search}` });
      res.end();
      return true;
    }
    const page = pages.get(url.pathname);
    if (!page) return false;
    if (req.method !== 'GET' && req.method !== 'HEAD') {
      res.writeHead(405, { allow: 'GET, HEAD', 'content-type': 'text/plain' });
      res.end('method not allowed\n');
      return true;
    }
    res.writeHead(200, { ...HEADERS, 'content-type': page.type, 'content-length': page.body.length });
    res.end(req.method === 'HEAD' ? undefined : page.body);
    return true;
  };
}

module.exports = { createDemoHandler, DEMO_DIR };

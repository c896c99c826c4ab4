'use strict';
// Minimal structured logger: one JSON object per line on stderr (stdout carries only the
// `edge listening on PORT` line). Credentials never reach the output: the edge does not put
// tokens in log fields, and as a second line of defence every line is scrubbed of what looks like
// one (an `authorization`/`token`/`secret` field, `Bearer …`, a JWT), wherever it sits — in a message,
// an error's stack or details, or a value a client sent.

const LEVELS = Object.freeze({ debug: 10, info: 20, warn: 30, error: 40, silent: 100 });

const REDACTED = '[redacted]';
// On the serialized JSON line, so nested fields and error texts are covered alike.
const SECRET_FIELD = /"(authorization|token|service_token|servicetoken|access_token|id_token|secret|jwt_secret|jwtsecret)":"(?:[^"\\]|\\.)*"/gi;
const BEARER = /\b(Bearer)(?:\s|\\[nrt])+(?:[^\s"\\]|\\.)+/gi;
// A JWT: three base64url segments (the signature may be empty); base64 of a JSON object starts
// with eyJ, so even a cut-off token is recognised by that. Dotted names (host names, stack
// frames) have lowercase segments or short ones, and are left alone.
const JWT_LIKE = /[A-Za-z0-9_-]{10,}\.[A-Za-z0-9_-]{10,}\.[A-Za-z0-9_-]*|eyJ[A-Za-z0-9_-]{6,}/g;

/** `text` with anything that looks like a credential replaced by [redacted]. */
function redact(text) {
  return String(text)
    .replace(SECRET_FIELD, `"$1":"${REDACTED}"`)
    .replace(BEARER, `$1 ${REDACTED}`)
    .replace(JWT_LIKE, (m) => (/[A-Z]/.test(m) ? REDACTED : m));
}

// Errors serialize as {} by default; keep what helps, BigInts as decimal strings.
function jsonValue(_key, value) {
  if (value instanceof Error) {
    return { name: value.name, message: value.message, code: value.code, details: value.details, stack: value.stack };
  }
  return typeof value === 'bigint' ? String(value) : value;
}

/**
 * @param {object} [o]
 * @param {string} [o.level='info']
 * @param {{write: (line: string) => void}} [o.stream=process.stderr]
 * @param {object} [o.base] fields on every line (a worker's number)
 */
function createLogger({ level = 'info', stream = process.stderr, base } = {}) {
  const min = LEVELS[level] ?? LEVELS.info;
  const write = (lvl, msg, fields) => {
    if (LEVELS[lvl] < min) return;
    const time = new Date().toISOString();
    let line;
    try {
      line = JSON.stringify({ time, level: lvl, msg, ...base, ...fields }, jsonValue);
    } catch {
      line = JSON.stringify({ time, level: lvl, msg });
    }
    stream.write(`${redact(line)}\n`);
  };
  return {
    debug: (msg, fields) => write('debug', msg, fields),
    info: (msg, fields) => write('info', msg, fields),
    warn: (msg, fields) => write('warn', msg, fields),
    error: (msg, fields) => write('error', msg, fields),
  };
}

module.exports = { createLogger, LEVELS, redact };

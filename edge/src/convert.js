'use strict';
// Pure conversions between the seed's socket.io payloads and presence.v1 messages.

const STATUS_TO_SEED = Object.freeze({
  STATUS_ONLINE: 'online',
  STATUS_AWAY: 'away',
  STATUS_BUSY: 'busy',
  STATUS_OFFLINE: 'offline',
  STATUS_UNSPECIFIED: 'offline',
});

const SEED_TO_STATUS = Object.freeze({
  online: 'STATUS_ONLINE',
  away: 'STATUS_AWAY',
  busy: 'STATUS_BUSY',
  offline: 'STATUS_OFFLINE',
});

/** 'away' → 'STATUS_AWAY'; anything that is not one of the seed's four strings → null. */
function seedStatusToEnum(value) {
  if (typeof value !== 'string') return null;
  const key = value.trim().toLowerCase();
  return Object.prototype.hasOwnProperty.call(SEED_TO_STATUS, key) ? SEED_TO_STATUS[key] : null;
}

/** Enum name (or number) → seed string; unknown values read as 'offline'. */
function enumToSeedStatus(value) {
  if (typeof value === 'string' && Object.prototype.hasOwnProperty.call(STATUS_TO_SEED, value)) {
    return STATUS_TO_SEED[value];
  }
  switch (value) {
    case 1: return 'online';
    case 2: return 'away';
    case 3: return 'busy';
    default: return 'offline';
  }
}

/**
 * google.protobuf.Timestamp {seconds, nanos} → ISO-8601 with millisecond precision
 * ('2025-11-10T14:30:00.000Z'); unset or out of range → null.
 */
function timestampToIso(ts) {
  if (ts === null || ts === undefined) return null;
  const seconds = Number(ts.seconds ?? 0);
  const nanos = Number(ts.nanos ?? 0);
  if (!Number.isFinite(seconds) || !Number.isFinite(nanos)) return null;
  const ms = seconds * 1000 + Math.floor(nanos / 1e6);
  const date = new Date(ms);
  if (Number.isNaN(date.getTime())) return null;
  return date.toISOString();
}

const DECIMAL = /^[1-9][0-9]{0,19}$/;
// The contract says uint64, but the service stores ids as signed 64-bit integers: an id of 2^63 or
// more is refused by its storage with UNAVAILABLE, which fails a whole GetPresence and makes a
// stream retry forever. The edge treats such ids as the invalid input they are.
const MAX_USER_ID = 2n ** 63n - 1n;

/**
 * A user id as the seed's clients send it (Number, or a decimal string) → canonical decimal string,
 * or null when it is not a positive integer below 2^63.
 */
function parseUserId(value) {
  let text;
  if (typeof value === 'number') {
    if (!Number.isSafeInteger(value) || value <= 0) return null;
    text = String(value);
  } else if (typeof value === 'bigint') {
    if (value <= 0n) return null;
    text = value.toString();
  } else if (typeof value === 'string') {
    text = value.trim();
  } else {
    return null;
  }
  if (!DECIMAL.test(text) || BigInt(text) > MAX_USER_ID) return null;
  return text;
}

/** Longest device label the service accepts (characters). */
const MAX_DEVICE_LABEL = 64;
// Not printable: controls, format characters, lone surrogates (not encodable as UTF-8: the service
// cannot even decode a Hello carrying one), private use, unassigned, line/paragraph separators.
const NOT_PRINTABLE = /[\p{Cc}\p{Cf}\p{Cs}\p{Co}\p{Cn}\p{Zl}\p{Zp}]/gu;

/**
 * A device label as the service accepts it: printable characters only (whitespace runs become one
 * space), at most 64 characters. '' when nothing printable is left (or it is not a string).
 */
function sanitizeDeviceLabel(value) {
  if (typeof value !== 'string') return '';
  const printable = value.replace(/\s+/gu, ' ').replace(NOT_PRINTABLE, '').trim();
  return Array.from(printable).slice(0, MAX_DEVICE_LABEL).join('').trim();
}

/** UserPresence → the seed's payload, exactly { user_id, status, last_seen }. */
function toSeedPresence(p) {
  return {
    user_id: Number(p.user_id),
    status: enumToSeedStatus(p.status),
    last_seen: timestampToIso(p.last_seen),
  };
}

/** version field (decimal string with longs: String) → BigInt; garbage → 0n. */
function versionOf(p) {
  try {
    return BigInt(p.version ?? 0);
  } catch {
    return 0n;
  }
}

/**
 * Decodes (does NOT verify) a JWT's payload. The Rust service verifies the signature; the edge
 * only needs `sub` to know which user a socket is. Returns null when it is not a JWT.
 */
function decodeJwtPayload(token) {
  if (typeof token !== 'string') return null;
  const parts = token.split('.');
  if (parts.length !== 3 || !parts[1]) return null;
  try {
    const json = Buffer.from(parts[1], 'base64url').toString('utf8');
    const payload = JSON.parse(json);
    return payload && typeof payload === 'object' && !Array.isArray(payload) ? payload : null;
  } catch {
    return null;
  }
}

module.exports = {
  STATUS_TO_SEED,
  SEED_TO_STATUS,
  seedStatusToEnum,
  enumToSeedStatus,
  timestampToIso,
  parseUserId,
  MAX_USER_ID,
  sanitizeDeviceLabel,
  MAX_DEVICE_LABEL,
  toSeedPresence,
  versionOf,
  decodeJwtPayload,
};

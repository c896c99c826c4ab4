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

const PLATFORM_TO_CLIENT = Object.freeze({ PLATFORM_DESKTOP: 'desktop', PLATFORM_MOBILE: 'mobile', PLATFORM_WEB: 'web' });
const CLIENT_TO_PLATFORM = Object.freeze({ desktop: 'PLATFORM_DESKTOP', mobile: 'PLATFORM_MOBILE', web: 'PLATFORM_WEB' });
const CLIENT_TO_ACTIVITY = Object.freeze({ active: 'ACTIVITY_ACTIVE', idle: 'ACTIVITY_IDLE', background: 'ACTIVITY_BACKGROUND' });
const APPROX_TO_CLIENT = Object.freeze({
  LAST_SEEN_APPROX_RECENTLY: 'recently',
  LAST_SEEN_APPROX_WITHIN_WEEK: 'within_week',
  LAST_SEEN_APPROX_WITHIN_MONTH: 'within_month',
  LAST_SEEN_APPROX_LONG_AGO: 'long_ago',
});

/** `table[value]` for a string naming one of its own keys, else null (no prototype keys). */
function lookup(table, value) {
  return typeof value === 'string' && Object.prototype.hasOwnProperty.call(table, value) ? table[value] : null;
}

/** 'web' → 'PLATFORM_WEB'; anything else → null. */
const clientPlatformToEnum = (value) => lookup(CLIENT_TO_PLATFORM, value);
/** 'idle' → 'ACTIVITY_IDLE'; anything else → null. */
const clientActivityToEnum = (value) => lookup(CLIENT_TO_ACTIVITY, value);

/**
 * UserPresence → the payload of presence_updated / presence_info: exactly the seed's
 * { user_id, status, last_seen }, plus, only when the service set them, `platforms`,
 * `idle_since`, `custom_status` and `last_seen_approx` (seed clients ignore fields they do not
 * know). A field that is absent is not set: each payload is the user's whole presence.
 */
function toSeedPresence(p) {
  const out = {
    user_id: Number(p.user_id),
    status: enumToSeedStatus(p.status),
    last_seen: timestampToIso(p.last_seen),
  };
  if (p.platforms && p.platforms.length) {
    const platforms = p.platforms.map((x) => lookup(PLATFORM_TO_CLIENT, x)).filter(Boolean);
    if (platforms.length) out.platforms = platforms;
  }
  const idleSince = timestampToIso(p.idle_since);
  if (idleSince) out.idle_since = idleSince;
  const custom = p.custom_status;
  if (custom && (custom.text || custom.emoji)) {
    out.custom_status = { text: custom.text || '', emoji: custom.emoji || '', expires_at: timestampToIso(custom.expires_at) };
  }
  const approx = lookup(APPROX_TO_CLIENT, p.last_seen_approx);
  if (approx) out.last_seen_approx = approx;
  return out;
}

/** Two payloads of toSeedPresence say the same. */
function samePayload(a, b) {
  if (a.user_id !== b.user_id || a.status !== b.status || a.last_seen !== b.last_seen) return false;
  if (a.idle_since !== b.idle_since || a.last_seen_approx !== b.last_seen_approx) return false;
  if (String(a.platforms) !== String(b.platforms)) return false;
  const x = a.custom_status;
  const y = b.custom_status;
  if (!x || !y) return x === y;
  return x.text === y.text && x.emoji === y.emoji && x.expires_at === y.expires_at;
}

// Far above what the service accepts (100 characters, one emoji): the service's own message names
// what is wrong; the edge only stops megabytes from travelling on.
const MAX_CUSTOM_TEXT = 1000;
// Timestamps the service can hold: years 0001-9999.
const MIN_TIMESTAMP_MS = -62135596800000;
const MAX_TIMESTAMP_MS = 253402300799999;

function msToTimestamp(ms) {
  const seconds = Math.floor(ms / 1000);
  return { seconds, nanos: Math.round(ms - seconds * 1000) * 1e6 };
}

/**
 * set_custom_status's argument → { custom_status } for RelaySetCustomStatus (null clears), or
 * { error } naming the field that is wrong. Accepts null/undefined (clear) or
 * { text, emoji, expires_at } with expires_at an ISO-8601 string, a number of milliseconds since
 * 1970, or absent/null (until cleared).
 */
function parseCustomStatus(value) {
  if (value === undefined || value === null) return { custom_status: null };
  if (typeof value !== 'object' || Array.isArray(value)) {
    return { error: 'expected { text, emoji, expires_at } (or null to clear)' };
  }
  const out = {};
  for (const field of ['text', 'emoji']) {
    const v = value[field];
    if (v === undefined || v === null) {
      out[field] = '';
    } else if (typeof v !== 'string') {
      return { error: `${field} must be a string` };
    } else if (v.length > MAX_CUSTOM_TEXT) {
      return { error: `${field} is too long (at most 100 characters)` };
    } else {
      out[field] = v;
    }
  }
  const at = value.expires_at;
  if (at !== undefined && at !== null) {
    let ms = NaN;
    if (typeof at === 'number') ms = at;
    else if (typeof at === 'string' && /^\d{4}-\d{2}-\d{2}T/.test(at.trim())) ms = Date.parse(at.trim());
    if (!Number.isFinite(ms) || ms < MIN_TIMESTAMP_MS || ms > MAX_TIMESTAMP_MS) {
      return { error: 'expires_at must be an ISO-8601 date-time (2025-11-10T15:00:00Z) or a number of milliseconds since 1970, or absent' };
    }
    out.expires_at = msToTimestamp(Math.trunc(ms));
  }
  return { custom_status: out };
}

/**
 * version field (decimal string with longs: String) → a Number while it is exact (up to 15
 * digits: no allocation, the common case), a BigInt above; garbage → 0. The same value always
 * gets the same type, and Numbers and BigInts compare correctly with < and <=.
 */
function versionOf(p) {
  const v = p.version;
  if (typeof v === 'string' && v.length <= 15 && /^\d+$/.test(v)) return Number(v);
  try {
    const big = BigInt(v ?? 0);
    return big <= BigInt(Number.MAX_SAFE_INTEGER) ? Number(big) : big;
  } catch {
    return 0;
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
  samePayload,
  clientPlatformToEnum,
  clientActivityToEnum,
  parseCustomStatus,
  versionOf,
  decodeJwtPayload,
};

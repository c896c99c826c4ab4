'use strict';
// Matching deliveries to changes without anything embedded in the payload.
//
// Every toggling user cycles through away → busy → online → away …, so two consecutive changes
// of a user always differ, and a `presence_updated { user_id, status }` seen by a contact names
// one change: the next change of that user with that status (per receiver, a target delivers a
// user's changes in order). For one (receiver, sender) pair the receipts are walked in arrival
// order against the sender's changes in order:
//   - a receipt matches the first unmatched change at or after the cursor with its status that
//     was scheduled no later than the receipt; changes jumped over are "superseded" (a newer
//     change of that user reached the receiver instead: a target that coalesces, or a loss);
//   - a receipt matching nothing ahead but an earlier skipped change arrived out of order;
//   - a receipt matching nothing is a duplicate (or a re-sent snapshot);
//   - a receipt from someone who is not the receiver's contact, or who made no change in the
//     phase, is unexpected ("self" when it is about the receiver themselves).
// Changes never received and with nothing newer received after them are "missing".

const STATUSES = Object.freeze(['online', 'away', 'busy', 'offline']);
const STATUS_CODE = Object.freeze({ online: 0, away: 1, busy: 2, offline: 3 });
/** The statuses a toggling user cycles through, starting from the 'online' every user connects with. */
const CYCLE = Object.freeze([STATUS_CODE.away, STATUS_CODE.busy, STATUS_CODE.online]);

/** Status code of a toggling user's change number `seq` (0-based, counted over the whole session). */
function statusOfChange(seq) {
  return CYCLE[seq % CYCLE.length];
}

/** A growable column of numbers (receipts arrive by the million: no per-receipt objects). */
class Column {
  constructor(Type, capacity = 1 << 16) {
    this.Type = Type;
    this.data = new Type(capacity);
    this.length = 0;
  }

  push(v) {
    if (this.length === this.data.length) {
      const bigger = new this.Type(this.data.length * 2);
      bigger.set(this.data);
      this.data = bigger;
    }
    this.data[this.length] = v;
    this.length += 1;
  }

  view() {
    return this.data.subarray(0, this.length);
  }

  clear() {
    this.length = 0;
  }
}

/**
 * Changes of one phase, as columns ordered by scheduled time: sender (user id), status code,
 * scheduled time (ms on the shared clock). Returns Map sender → { status: number[], t: number[] }.
 */
function indexChanges(changes) {
  const bySender = new Map();
  for (let i = 0; i < changes.sender.length; i += 1) {
    const s = changes.sender[i];
    let c = bySender.get(s);
    if (!c) {
      c = { status: [], t: [] };
      bySender.set(s, c);
    }
    c.status.push(changes.status[i]);
    c.t.push(changes.t[i]);
  }
  return bySender;
}

/**
 * Matches the receipts of one worker's receivers against a phase's changes.
 * @param {object} o
 * @param {{receiver: ArrayLike<number>, sender: ArrayLike<number>, status: ArrayLike<number>, t: ArrayLike<number>}} o.receipts in arrival order
 * @param {Map<number, {status: number[], t: number[]}>} o.changes indexChanges() of the phase
 * @param {Iterable<number>} o.receivers user ids whose receipts these are
 * @param {(u: number) => number[]} o.contactsOf
 * @param {[number, number]} o.window changes scheduled in [from, to) are counted; others only matched
 */
function matchReceipts({ receipts, changes, receivers, contactsOf, window }) {
  const [from, to] = window;
  const inWindow = (t) => t >= from && t < to;
  // (receiver, sender) → receipt indices in arrival order
  const groups = new Map();
  const key = (r, s) => r * 4294967296 + s;
  for (let i = 0; i < receipts.sender.length; i += 1) {
    const k = key(receipts.receiver[i], receipts.sender[i]);
    const g = groups.get(k);
    if (g) g.push(i);
    else groups.set(k, [i]);
  }

  const latencies = [];
  const out = { expected: 0, delivered: 0, superseded: 0, missing: 0, outOfOrder: 0, duplicates: 0, unexpected: 0, self: 0 };
  for (const r of receivers) {
    for (const s of contactsOf(r)) {
      const c = changes.get(s);
      if (!c) continue;
      const k = key(r, s);
      const idx = groups.get(k) || [];
      groups.delete(k);
      const n = c.status.length;
      const matched = new Uint8Array(n);
      let p = 0;
      for (const i of idx) {
        const st = receipts.status[i];
        const t = receipts.t[i];
        let j = -1;
        for (let q = p; q < n && c.t[q] <= t; q += 1) {
          if (!matched[q] && c.status[q] === st) {
            j = q;
            break;
          }
        }
        let late = false;
        if (j < 0) {
          for (let q = 0; q < p; q += 1) {
            if (!matched[q] && c.status[q] === st && c.t[q] <= t) {
              j = q;
              late = true;
              break;
            }
          }
        }
        if (j < 0) {
          out.duplicates += 1;
          continue;
        }
        matched[j] = 1;
        if (!late) p = j + 1;
        if (inWindow(c.t[j])) {
          latencies.push(t - c.t[j]);
          if (late) out.outOfOrder += 1;
        }
      }
      for (let j = 0; j < n; j += 1) {
        if (!inWindow(c.t[j])) continue;
        out.expected += 1;
        if (matched[j]) out.delivered += 1;
        else if (j < p) out.superseded += 1;
        else out.missing += 1;
      }
    }
  }
  // Receipts from users who are not the receiver's contacts or made no change in this phase.
  const unexpectedSamples = [];
  for (const [k, idx] of groups) {
    out.unexpected += idx.length;
    // About the receiver themselves: the seed never sends these.
    if (Math.floor(k / 4294967296) === k % 4294967296) out.self += idx.length;
    if (unexpectedSamples.length < 5) {
      const i = idx[0];
      unexpectedSamples.push({
        receiver: receipts.receiver[i],
        sender: receipts.sender[i],
        status: STATUSES[receipts.status[i]] || String(receipts.status[i]),
        t: receipts.t[i],
        count: idx.length,
      });
    }
  }
  return { latencies: Float64Array.from(latencies), ...out, unexpectedSamples };
}

module.exports = { STATUSES, STATUS_CODE, CYCLE, statusOfChange, Column, indexChanges, matchReceipts };

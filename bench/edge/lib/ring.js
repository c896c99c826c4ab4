'use strict';
// The contact graph both targets get, the same one `presence-bench` (src/bin/presence-bench/graph.rs)
// builds: users 1..N on a ring, user i linked to i+1 ..= i+K/2 (mod N). Links are symmetric, so
// every user has exactly 2*floor(K/2) contacts, K/2 on each side.

class Ring {
  constructor(users, contacts) {
    const half = Math.floor(contacts / 2);
    if (!Number.isSafeInteger(users) || users < 2) throw new Error('users must be an integer ≥ 2');
    if (!Number.isSafeInteger(contacts) || half < 1) throw new Error('contacts must be an integer ≥ 2');
    if (2 * half >= users) throw new Error(`contacts ${contacts} needs more than ${contacts} other users (users ${users})`);
    this.n = users;
    this.half = half;
  }

  /** Contacts per user: K rounded down to even. */
  get degree() {
    return 2 * this.half;
  }

  wrap(u, offset) {
    return ((((u - 1 + offset) % this.n) + this.n) % this.n) + 1;
  }

  /** The contacts of user u (unordered). */
  contacts(u) {
    const out = new Array(this.degree);
    for (let d = 1; d <= this.half; d += 1) {
      out[2 * d - 2] = this.wrap(u, -d);
      out[2 * d - 1] = this.wrap(u, d);
    }
    return out;
  }

  /** Whether u and v are contacts: at most K/2 apart on the ring. */
  isContact(u, v) {
    if (!Number.isSafeInteger(v) || v < 1 || v > this.n || u === v) return false;
    const d = Math.abs(u - v);
    return Math.min(d, this.n - d) <= this.half;
  }

  /** Symmetric pairs, each once. */
  get pairCount() {
    return this.n * this.half;
  }

  /** Calls fn(user, contact) for every symmetric pair once: user u with the half users after it. */
  forEachPair(fn) {
    for (let u = 1; u <= this.n; u += 1) {
      for (let d = 1; d <= this.half; d += 1) fn(u, this.wrap(u, d));
    }
  }
}

/** The users that change status in a run: every odd id, i.e. half of them. */
function isToggler(u) {
  return u % 2 === 1;
}

module.exports = { Ring, isToggler };

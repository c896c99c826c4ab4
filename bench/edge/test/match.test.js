'use strict';
const test = require('node:test');
const assert = require('node:assert');
const { Ring, isToggler } = require('../lib/ring');
const { CYCLE, statusOfChange, indexChanges, matchReceipts } = require('../load/match');

test('the ring gives every user K contacts, symmetric', () => {
  const ring = new Ring(50, 20);
  for (let u = 1; u <= 50; u += 1) {
    const c = ring.contacts(u);
    assert.strictEqual(new Set(c).size, 20, 'K distinct contacts');
    assert.ok(!c.includes(u), 'never oneself');
    for (const v of c) assert.ok(ring.contacts(v).includes(u), 'links are symmetric');
    for (let v = 0; v <= 51; v += 1) assert.strictEqual(ring.isContact(u, v), c.includes(v), `isContact(${u}, ${v})`);
  }
  let pairs = 0;
  ring.forEachPair(() => (pairs += 1));
  assert.strictEqual(pairs, ring.pairCount);
  assert.ok(isToggler(1) && !isToggler(2));
});

test('consecutive changes of a user always differ', () => {
  for (let s = 0; s < 10; s += 1) assert.notStrictEqual(statusOfChange(s), statusOfChange(s + 1));
  assert.notStrictEqual(CYCLE[0], 0, 'the first change is not the online every user starts with');
});

// One receiver (2) and one sender (1), changes at t = 0, 10, 20, 30 (statuses away busy online away).
function run(received, window = [0, 100]) {
  const changes = indexChanges({
    sender: [1, 1, 1, 1],
    status: [0, 1, 2, 3].map(statusOfChange),
    t: [0, 10, 20, 30],
  });
  const receipts = { receiver: [], sender: [], status: [], t: [] };
  for (const [seq, t] of received) {
    receipts.receiver.push(2);
    receipts.sender.push(1);
    receipts.status.push(statusOfChange(seq));
    receipts.t.push(t);
  }
  return matchReceipts({ receipts, changes, receivers: [2], contactsOf: () => [1], window });
}

test('in-order deliveries match with their latency', () => {
  const r = run([[0, 1], [1, 12], [2, 23], [3, 34]]);
  assert.deepStrictEqual(Array.from(r.latencies), [1, 2, 3, 4]);
  assert.strictEqual(r.delivered, 4);
  assert.strictEqual(r.superseded + r.missing + r.outOfOrder + r.duplicates, 0);
});

test('a skipped change is superseded, a missing tail is missing', () => {
  const r = run([[0, 1], [2, 23]]);
  assert.strictEqual(r.delivered, 2);
  assert.strictEqual(r.superseded, 1, 'change 1 was jumped over');
  assert.strictEqual(r.missing, 1, 'change 3 never came');
});

test('swapped deliveries count as out of order, a repeat as a duplicate', () => {
  const r = run([[1, 12], [0, 13], [0, 14], [2, 23], [3, 34]]);
  assert.strictEqual(r.delivered, 4);
  assert.strictEqual(r.outOfOrder, 1);
  assert.strictEqual(r.duplicates, 1);
});

test('a receipt cannot match a change scheduled after it', () => {
  const r = run([[0, 1], [3, 25]]);
  assert.strictEqual(r.delivered, 1);
  assert.strictEqual(r.duplicates, 1, 'status of change 3 received before change 3 was made');
});

test('only changes inside the window are counted', () => {
  const r = run([[0, 1], [1, 12], [2, 23], [3, 34]], [10, 30]);
  assert.strictEqual(r.expected, 2);
  assert.deepStrictEqual(Array.from(r.latencies), [2, 3]);
});

test('receipts about oneself or from non-contacts are unexpected', () => {
  const changes = indexChanges({ sender: [2], status: [statusOfChange(0)], t: [0] });
  const receipts = { receiver: [2, 2], sender: [2, 9], status: [statusOfChange(0), 0], t: [1, 2] };
  const r = matchReceipts({ receipts, changes, receivers: [2], contactsOf: () => [1, 3], window: [0, 10] });
  assert.strictEqual(r.unexpected, 2);
  assert.strictEqual(r.self, 1, 'user 2 told about user 2');
});

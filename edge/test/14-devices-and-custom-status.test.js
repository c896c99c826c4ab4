'use strict';
// Issues "Devices that come and go" and "Custom status", through the edge, additively: a socket
// names its platform in the handshake (auth.platform), says whether its person is using it
// (`activity`), learns what changed while it was in the background (`presence_resync`), and sets
// a custom status (`set_custom_status`). Payloads keep the seed's user_id/status/last_seen and gain
// platforms, idle_since, custom_status and last_seen_approx only when the service sets them.
const { test } = require('node:test');
const assert = require('node:assert/strict');
const { connect, useServiceAndEdge, eventually, ISO_MS } = require('./helpers/clients');

const ANA = 1401; // the subject
const WATCHER = 1402; // Ana's contact
const BO = 1403; // Watcher's other contact
const PRIVATE = 1404; // Watcher's contact who hides her exact last seen
const FLAPPER = 1405;
const CONTROL = 1406; // another contact of WATCHER, for positive controls

const ACTIVITY_PER_MIN = 6;
const ctx = useServiceAndEdge({
  contacts: [[ANA, WATCHER], [BO, WATCHER], [PRIVATE, WATCHER], [FLAPPER, WATCHER], [CONTROL, WATCHER]],
  server: { env: { PRESENCE_RATE_ACTIVITY_PER_MIN: String(ACTIVITY_PER_MIN) } },
});

async function device(userId, name, auth) {
  const c = await connect(ctx.edge.url, { name, auth });
  c.socket.emit('user_authenticated', userId);
  return c;
}

async function watcher(t, name) {
  const w = await device(WATCHER, name);
  t.after(() => w.close());
  await w.presence(ANA); // Welcome snapshot
  return w;
}

/** The seed's three fields as the seed sends them, whatever else the payload holds. */
function assertSeedFields(d) {
  assert.equal(typeof d.user_id, 'number');
  assert.ok(['online', 'offline', 'away', 'busy'].includes(d.status), d.status);
  assert.ok(d.last_seen === null || ISO_MS.test(d.last_seen), `last_seen ${d.last_seen}`);
  assert.deepEqual(Object.keys(d).slice(0, 3), ['user_id', 'status', 'last_seen']);
}

test('auth.platform: contacts see the platforms a user is on; seed clients still get the seed fields first', async (t) => {
  const w = await watcher(t, 'watcher-platforms');
  let since = w.mark();
  const phone = await device(ANA, 'ana-phone', { platform: 'mobile' });
  t.after(() => phone.close());
  const online = await w.waitFor('presence_updated', (d) => d.user_id === ANA && d.status === 'online', { since });
  assertSeedFields(online);
  assert.deepEqual(online.platforms, ['mobile']);
  assert.equal('idle_since' in online, false);

  since = w.mark();
  const laptop = await device(ANA, 'ana-laptop', { platform: 'desktop' });
  t.after(() => laptop.close());
  const both = await w.waitFor('presence_updated', (d) => d.user_id === ANA && String(d.platforms) === 'desktop,mobile', { since });
  assert.equal(both.status, 'online');
  // The same through get_presence.
  since = w.mark();
  w.socket.emit('get_presence', [ANA]);
  const [info] = await w.waitFor('presence_info', () => true, { since });
  assert.deepEqual(info.platforms, ['desktop', 'mobile']);
  assertSeedFields(info);

  since = w.mark();
  phone.close();
  await w.waitFor('presence_updated', (d) => d.user_id === ANA && String(d.platforms) === 'desktop', { since });
  laptop.close();
  const offline = await w.waitFor('presence_updated', (d) => d.user_id === ANA && d.status === 'offline', { since });
  assert.equal('platforms' in offline, false, 'no platforms while offline');
});

test('a bad auth.platform is reported, and the device connects without a platform', async (t) => {
  const w = await watcher(t, 'watcher-bad-platform');
  const since = w.mark();
  const odd = await device(ANA, 'ana-toaster', { platform: 'toaster' });
  t.after(() => odd.close());
  const err = await odd.waitFor('presence_error', (e) => e.event === 'user_authenticated');
  assert.match(err.message, /auth\.platform must be 'desktop', 'mobile' or 'web'/);
  const online = await w.waitFor('presence_updated', (d) => d.user_id === ANA && d.status === 'online', { since });
  assert.equal('platforms' in online, false);
});

test('activity: idle on every device is auto-away with idle_since; active again is online', async (t) => {
  const w = await watcher(t, 'watcher-idle');
  let since = w.mark();
  const ana = await device(ANA, 'ana-idle', { platform: 'web' });
  t.after(() => ana.close());
  await w.waitFor('presence_updated', (d) => d.user_id === ANA && d.status === 'online', { since });

  since = w.mark();
  const before = Date.now();
  ana.socket.emit('activity', 'idle');
  const away = await w.waitFor('presence_updated', (d) => d.user_id === ANA && d.status === 'away', { since });
  assertSeedFields(away);
  assert.match(away.idle_since, ISO_MS);
  assert.ok(Math.abs(Date.parse(away.idle_since) - before) < 5000, away.idle_since);
  assert.deepEqual(away.platforms, ['web']);

  since = w.mark();
  ana.socket.emit('activity', 'active');
  const back = await w.waitFor('presence_updated', (d) => d.user_id === ANA && d.status === 'online', { since });
  assert.equal('idle_since' in back, false);

  ana.socket.emit('activity', 'sleeping');
  const err = await ana.waitFor('presence_error', (e) => e.event === 'activity');
  assert.match(err.message, /activity must be one of 'active', 'idle', 'background'/);
});

test('background: no presence_updated meanwhile, then one presence_resync with what changed', async (t) => {
  const w = await watcher(t, 'watcher-background');
  const bo = await device(BO, 'bo');
  t.after(() => bo.close());
  await w.presence(BO, 'online');
  const control = await device(CONTROL, 'control-bg');
  t.after(() => control.close());
  await w.presence(CONTROL, 'online');

  w.socket.emit('activity', 'background');
  // Positive control for "the background took effect": another watcher socket of the same user
  // (active) sees BO's change, the background one does not.
  const w2 = await watcher(t, 'watcher-active');
  const since = w.mark();
  const since2 = w2.mark();
  bo.socket.emit('update_status', 'busy');
  await w2.presence(BO, 'busy', { since: since2 });
  control.socket.emit('update_status', 'away');
  await w2.presence(CONTROL, 'away', { since: since2 });
  await new Promise((r) => setTimeout(r, 200));
  assert.deepEqual(w.received('presence_updated', since), [], 'nothing while in the background');

  w.socket.emit('activity', 'active');
  const resync = await w.waitFor('presence_resync', () => true, { since });
  assert.ok(Array.isArray(resync));
  const byUser = Object.fromEntries(resync.map((d) => [d.user_id, d]));
  assert.equal(byUser[BO] && byUser[BO].status, 'busy', JSON.stringify(resync));
  assert.equal(byUser[CONTROL] && byUser[CONTROL].status, 'away', JSON.stringify(resync));
  for (const d of resync) assertSeedFields(d);
  // Live again.
  const live = w.mark();
  bo.socket.emit('update_status', 'online');
  await w.presence(BO, 'online', { since: live });
});

test('set_custom_status: contacts see it, get_presence returns it, null clears it; the ack answers', async (t) => {
  const w = await watcher(t, 'watcher-custom');
  const ana = await device(ANA, 'ana-custom');
  t.after(() => ana.close());
  await w.presence(ANA, 'online');

  let since = w.mark();
  const expires = new Date(Date.now() + 3600 * 1000);
  const ack = await new Promise((resolve) => {
    ana.socket.emit('set_custom_status', { text: 'In a meeting', emoji: '📅', expires_at: expires.toISOString() }, resolve);
  });
  assert.equal(ack.ok, true, JSON.stringify(ack));
  assert.deepEqual(ack.presence.custom_status, { text: 'In a meeting', emoji: '📅', expires_at: expires.toISOString() });
  const seen = await w.waitFor('presence_updated', (d) => d.user_id === ANA && d.custom_status, { since });
  assertSeedFields(seen);
  assert.deepEqual(seen.custom_status, { text: 'In a meeting', emoji: '📅', expires_at: expires.toISOString() });
  // As in the seed, a socket hears nothing about its own user (the ack and get_presence tell it).
  assert.deepEqual(ana.received('presence_updated').filter((d) => d.user_id === ANA), []);

  since = w.mark();
  w.socket.emit('get_presence', [ANA]);
  const [info] = await w.waitFor('presence_info', () => true, { since });
  assert.equal(info.custom_status.text, 'In a meeting');

  // Milliseconds work as well as ISO strings; without an ack too.
  since = w.mark();
  ana.socket.emit('set_custom_status', { emoji: ':palm_tree:', expires_at: expires.getTime() });
  const palm = await w.waitFor('presence_updated', (d) => d.user_id === ANA && d.custom_status && d.custom_status.emoji === ':palm_tree:', { since });
  assert.deepEqual(palm.custom_status, { text: '', emoji: ':palm_tree:', expires_at: expires.toISOString() });

  since = w.mark();
  ana.socket.emit('set_custom_status', null);
  const cleared = await w.waitFor('presence_updated', (d) => d.user_id === ANA && !d.custom_status, { since });
  assert.equal(cleared.status, 'online');
});

test('set_custom_status refusals name the field: the edge\'s own checks and the service\'s', async (t) => {
  const ana = await device(ANA, 'ana-refused');
  t.after(() => ana.close());
  await ana.presence(WATCHER);
  const refusal = async (value) => {
    const since = ana.mark();
    const ack = await new Promise((resolve) => ana.socket.emit('set_custom_status', value, resolve));
    const err = await ana.waitFor('presence_error', (e) => e.event === 'set_custom_status', { since });
    assert.equal(ack.ok, false);
    assert.equal(ack.message, err.message);
    return err;
  };
  assert.match((await refusal({ text: 5 })).message, /^text must be a string/);
  assert.match((await refusal({ text: 'x', expires_at: 'next tuesday' })).message, /^expires_at must be/);
  assert.match((await refusal('busy')).message, /expected \{ text, emoji, expires_at \}/);
  const long = await refusal({ text: 'x'.repeat(150) });
  assert.equal(long.code, 'INVALID_ARGUMENT');
  assert.match(long.message, /text/);
  const past = await refusal({ text: 'Lunch', expires_at: new Date(Date.now() - 60000).toISOString() });
  assert.equal(past.code, 'INVALID_ARGUMENT');
  assert.match(past.message, /expires_at/);
  const emoji = await refusal({ emoji: 'not an emoji' });
  assert.match(emoji.message, /emoji/);
  // Nothing was set.
  const since = ana.mark();
  ana.socket.emit('get_presence', [ANA]);
  const [me] = await ana.waitFor('presence_info', () => true, { since });
  assert.equal('custom_status' in me, false, JSON.stringify(me));
});

test('activity over the service\'s per-device limit: ignored, reported once', async (t) => {
  const w = await watcher(t, 'watcher-flapper');
  const f = await device(FLAPPER, 'flapper');
  t.after(() => f.close());
  await w.presence(FLAPPER, 'online');
  const since = f.mark();
  for (let i = 0; i < ACTIVITY_PER_MIN + 6; i += 1) f.socket.emit('activity', i % 2 === 0 ? 'idle' : 'active');
  const err = await f.waitFor('presence_error', (e) => e.event === 'activity', { since });
  assert.equal(err.code, 'RESOURCE_EXHAUSTED');
  assert.match(err.message, /activity changes per minute/);
  const quiet = () => ctx.edge.log.entries.filter((e) => e.msg === 'activity refused again by the rate limit; reported already' && e.user_id === String(FLAPPER));
  await eventually(() => quiet().length >= 3, { what: 'more refusals, not reported' });
  assert.equal(f.received('presence_error', since).length, 1, 'reported once');
  // The session survives the refusals: a status change still reaches the contact.
  f.socket.emit('update_status', 'busy');
  await w.presence(FLAPPER, 'busy');
});

test('last_seen_approx: a contact who may see the online status but not the exact time', async (t) => {
  await ctx.svc.setPrivacy(PRIVATE, { online: 'VISIBILITY_CONTACTS', last_seen: 'VISIBILITY_NOBODY', approximate_last_seen: true });
  const w = await watcher(t, 'watcher-approx');
  const p = await device(PRIVATE, 'private');
  await w.presence(PRIVATE, 'online');
  const since = w.mark();
  p.close();
  const gone = await w.presence(PRIVATE, 'offline', { since });
  assertSeedFields(gone);
  assert.equal(gone.last_seen, null);
  assert.equal(gone.last_seen_approx, 'recently');
});

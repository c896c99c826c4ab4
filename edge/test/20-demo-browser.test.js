'use strict';
// The demo page (EDGE_DEMO=1) in a real browser: Debian's Chromium driven by puppeteer-core,
// against the edge started as `npm start` does (trust-client, port 0, two workers) and the real
// presence service. Page 2 (user 2) watches its contact user 1: online "on web" when page 1 opens,
// away and idle when page 1 simulates an idle device, online again, with the custom status page 1
// sets, busy when page 1 picks busy in the status picker, offline with "Last seen just now" when
// page 1 closes. While page 2 simulates being in the background it misses a change of user 3,
// and shows it once it is active again (presence_resync).
//
// Without Chromium (apt-get install -y chromium) the test is skipped with the reason, except
// under CI=true, where it fails. CHROMIUM_PATH overrides /usr/bin/chromium; DEMO_SCREENSHOT=path
// saves page 2 as a PNG (npm run demo:screenshot writes docs/demo.png).
const { test } = require('node:test');
const assert = require('node:assert/strict');
const fs = require('node:fs');
const os = require('node:os');
const path = require('node:path');
const { startPresenceServer, serviceClients } = require('./helpers/presence-server');
const { runIndex, listeningPort, stopIndex } = require('./helpers/edge-process');
const { connect } = require('./helpers/clients');

const CHROMIUM = process.env.CHROMIUM_PATH || '/usr/bin/chromium';
const SCREENSHOT = process.env.DEMO_SCREENSHOT;
const WAIT_MS = 10000;
// The machine has no internet: nothing in the background, no QUIC, no component updates.
const CHROMIUM_ARGS = [
  '--headless',
  '--no-sandbox',
  '--disable-gpu',
  '--disable-quic',
  '--no-first-run',
  '--disable-background-networking',
  '--disable-component-update',
  '--disable-sync',
  '--hide-scrollbars',
  '--mute-audio',
];

/**
 * Waits until contact `userId` on `page` shows `status` (and, with `part`, its .contact-`part`
 * line containing `text`); resolves with its status text (or that line).
 */
async function contactState(page, userId, status, part, text) {
  try {
    const handle = await page.waitForFunction(
      (id, want, partName, partText) => {
        const item = document.querySelector(`li.contact[data-user-id="${id}"]`);
        if (!item || item.dataset.status !== want) return false;
        if (!partName) return item.querySelector('.contact-status').textContent;
        const line = item.querySelector(`.contact-${partName}`);
        return Boolean(line && line.textContent.includes(partText)) && line.textContent;
      },
      { timeout: WAIT_MS, polling: 100 }, // not requestAnimationFrame: background tabs get none
      userId,
      status,
      part || '',
      text || '',
    );
    return handle.jsonValue();
  } catch (err) {
    const shown = await page.$eval('#contacts', (ul) => ul.innerText).catch(() => '(no list)');
    const what = part ? `'${status}' with ${part} '${text}'` : `'${status}'`;
    throw new Error(`contact ${userId} never showed ${what} within ${WAIT_MS} ms; the page shows:\n${shown}\n${err.message}`);
  }
}

test('demo page: a contact comes online on web, idles, sets a custom status, goes busy and offline; a backgrounded page catches up', async (t) => {
  if (!fs.existsSync(CHROMIUM)) {
    const reason = `Chromium not found at ${CHROMIUM} (apt-get install -y chromium, or set CHROMIUM_PATH)`;
    if (process.env.CI === 'true') assert.fail(`${reason}: CI must run the browser test`);
    t.skip(reason);
    return;
  }
  const puppeteer = require('puppeteer-core');

  const server = await startPresenceServer();
  t.after(() => server.destroy());
  const svc = serviceClients(server.target);
  t.after(() => svc.close());
  // 2 sees 1 (the page under test), and 3 and 4 (online and away throughout, for the screenshot).
  await svc.addContacts([[1, 2], [3, 2], [4, 2]]);

  const edge = runIndex({ EDGE_PORT: '0', EDGE_WORKERS: '2', EDGE_IDENTITY: 'trust-client', EDGE_DEMO: '1', PRESENCE_TARGET: server.target });
  t.after(() => stopIndex(edge));
  const base = `http://127.0.0.1:${await listeningPort(edge)}`;

  const others = {};
  for (const [userId, status] of [[3, 'online'], [4, 'away']]) {
    const other = await connect(base, { name: `user ${userId}`, auth: { platform: 'mobile' } });
    t.after(() => other.close());
    other.socket.emit('user_authenticated', userId);
    other.socket.emit('update_status', status);
    others[userId] = other;
  }
  others[4].socket.emit('set_custom_status', { text: 'Back at 3', emoji: '🌴' });

  const profile = fs.mkdtempSync(path.join(os.tmpdir(), 'edge-demo-chromium-'));
  t.after(() => fs.rmSync(profile, { recursive: true, force: true }));
  const browser = await puppeteer.launch({
    executablePath: CHROMIUM,
    headless: false, // --headless is in the args, as Debian's Chromium takes it
    args: [...CHROMIUM_ARGS, `--user-data-dir=${profile}`],
    defaultViewport: { width: 520, height: 560, deviceScaleFactor: 2 },
    timeout: 30000,
  });
  t.after(() => browser.close());

  // The pages may reach the edge and nothing else; script errors fail the test.
  const offsite = [];
  const pageErrors = [];
  const open = async (query) => {
    const page = await browser.newPage();
    await page.setRequestInterception(true);
    page.on('request', (req) => {
      if (req.url().startsWith(`${base}/`) || req.url().startsWith('data:')) return req.continue();
      offsite.push(req.url());
      return req.abort();
    });
    page.on('pageerror', (err) => pageErrors.push(err.message));
    await page.goto(`${base}/demo/?${query}`, { waitUntil: 'load', timeout: WAIT_MS });
    return page;
  };

  const page2 = await open('user=2&contacts=1:Alice,3:Bruno,4:Chiara');
  assert.equal(await contactState(page2, 1, 'offline'), 'Offline', 'never seen: no last-seen text yet');
  assert.equal(await contactState(page2, 3, 'online'), 'Online');
  assert.equal(await contactState(page2, 4, 'away'), 'Away');

  assert.equal(await contactState(page2, 4, 'away', 'custom', 'Back at 3'), '🌴 Back at 3');
  assert.equal(await contactState(page2, 4, 'away', 'platforms', 'mobile'), 'on mobile');

  const page1 = await open('user=1&contacts=2:Dmitri');
  assert.equal(await contactState(page2, 1, 'online'), 'Online');
  assert.equal(await contactState(page2, 1, 'online', 'platforms', 'web'), 'on web', 'the page names its platform');
  assert.equal(await contactState(page1, 2, 'online'), 'Online', 'and page 1 sees page 2');

  // Page 1 simulates an idle device: its only device, so user 1 is auto-away.
  await page1.select('#activity', 'idle');
  assert.match(await contactState(page2, 1, 'away'), /^Away · idle/);
  assert.equal(await page2.$eval('li[data-user-id="1"]', (li) => li.dataset.idle), 'true');
  await page1.select('#activity', 'active');
  assert.equal(await contactState(page2, 1, 'online'), 'Online');

  // Page 1 sets a custom status; page 2 shows it, page 1 too.
  await page1.type('#custom-emoji', '📅');
  await page1.type('#custom-text', 'In a meeting');
  await page1.select('#custom-expiry', '60');
  await page1.click('#custom-set');
  assert.match(await contactState(page2, 1, 'online', 'custom', 'In a meeting'), /^📅 In a meeting · until \d/);
  await page1.waitForFunction(() => document.getElementById('my-custom').textContent.includes('📅 In a meeting'), { timeout: WAIT_MS, polling: 100 });

  // Page 2 in the background misses user 3 going busy, and catches up when active again.
  await page2.select('#activity', 'background');
  await new Promise((r) => setTimeout(r, 300)); // the activity change travels before user 3's
  others[3].socket.emit('update_status', 'busy');
  await new Promise((r) => setTimeout(r, 700));
  assert.equal(await contactState(page2, 3, 'online'), 'Online', 'no updates in the background');
  await page2.select('#activity', 'active');
  assert.equal(await contactState(page2, 3, 'busy'), 'Busy', 'presence_resync brought the change');
  others[3].socket.emit('update_status', 'online');
  assert.equal(await contactState(page2, 3, 'online'), 'Online');

  await page1.select('#status', 'busy');
  assert.equal(await contactState(page2, 1, 'busy'), 'Busy');

  await page1.close();
  assert.equal(await contactState(page2, 1, 'offline'), 'Last seen just now');
  const dot = await page2.$eval('li[data-user-id="1"] .dot', (d) => getComputedStyle(d).backgroundColor);
  assert.notEqual(dot, await page2.$eval('li[data-user-id="3"] .dot', (d) => getComputedStyle(d).backgroundColor));

  if (SCREENSHOT) {
    await page2.screenshot({ path: path.resolve(SCREENSHOT) });
    t.diagnostic(`screenshot of page 2 saved to ${SCREENSHOT}`);
  }
  assert.deepEqual(pageErrors, []);
  assert.deepEqual(offsite, [], 'the pages reached only the edge');
});

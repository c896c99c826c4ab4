// Presence demo page of the socket.io edge (served at /demo/ when EDGE_DEMO=1).
//
// It speaks the seed's socket.io protocol exactly as the seed's React ContactList does:
// io(url), emit('user_authenticated', userId), on('presence_updated'), emit('get_presence', ids),
// on('presence_info'), emit('update_status', status); and shows the seed's getStatusText /
// formatRelativeTime text ("Online", "Busy", "Last seen 5 minutes ago").
// On top of that, the edge's additions: the handshake names the platform (auth.platform: 'web'),
// contacts show their platforms, how long they have been idle and their custom status; you set
// your own custom status (emit('set_custom_status', { text, emoji, expires_at }, ack)) and can
// simulate this device being idle or in the background (emit('activity', …)), after which the
// edge sends what changed meanwhile (on('presence_resync')).
//
// Who am I, who are my contacts:  /demo/?user=1&contacts=2,3   (names: contacts=2:Ana,3:Bo)
// With EDGE_IDENTITY=token add the user's JWT in the fragment: /demo/?contacts=2,3#token=<JWT>
// (a fragment never leaves the browser, so the token is in no request line or log).
(function presenceDemo() {
  'use strict';

  const query = new URLSearchParams(window.location.search);
  const token = new URLSearchParams(window.location.hash.slice(1)).get('token');
  const currentUserId = positiveInt(query.get('user')) || userIdOfToken(token);
  const contacts = parseContacts(query.get('contacts') || '');
  const presenceMap = {}; // user id → { status, lastSeen, …the edge's additions }

  const $ = (id) => document.getElementById(id);
  const picker = $('status');

  if (!currentUserId) {
    showNotice('Open this page as a user: /demo/?user=1&contacts=2,3 (or, with EDGE_IDENTITY=token, /demo/?contacts=2,3#token=<user JWT>).');
    setConnection('refused', 'Not connected');
    for (const control of document.querySelectorAll('select, input, button')) control.disabled = true;
    return;
  }
  $('me').textContent = `User ${currentUserId}`;
  document.title = `Presence demo: user ${currentUserId}`;
  render();

  // Initialize socket (the seed: io('http://localhost:3000'); here the edge serving this page).
  const auth = token ? { token, platform: 'web' } : { platform: 'web' };
  const socket = io(window.location.origin, { auth });

  // The seed emits these once, right after io(); doing it on every 'connect' is the same on the
  // first connection and keeps the page right after a reconnect.
  socket.on('connect', () => {
    setConnection('connected', 'Connected');
    socket.emit('user_authenticated', currentUserId);
    // Request initial presence (plus my own, to show the status the service kept for me).
    socket.emit('get_presence', [...contacts.map((c) => c.id), currentUserId]);
  });
  socket.on('disconnect', () => setConnection('disconnected', 'Disconnected; reconnecting…'));
  socket.on('connect_error', (err) => setConnection('refused', `Connection refused: ${err.message}`));

  // Listen for presence updates
  socket.on('presence_updated', (data) => {
    presenceMap[data.user_id] = fromPayload(data);
    render();
  });
  socket.on('presence_info', (users) => {
    users.forEach((u) => {
      presenceMap[u.user_id] = fromPayload(u);
    });
    render();
  });
  // Not in the seed: what changed while this device was in the background.
  socket.on('presence_resync', (users) => {
    users.forEach((u) => {
      presenceMap[u.user_id] = fromPayload(u);
    });
    render();
  });
  // Not in the seed: the edge's word for refused input or a refused credential.
  socket.on('presence_error', (e) => showNotice(e.message));

  // When user selects a status
  picker.addEventListener('change', () => socket.emit('update_status', picker.value));

  // Custom status: set (with an optional expiry) or clear; the ack says whether it was taken.
  const customForm = $('custom');
  customForm.addEventListener('submit', (event) => {
    event.preventDefault();
    const minutes = Number($('custom-expiry').value);
    const custom = { text: $('custom-text').value.trim(), emoji: $('custom-emoji').value.trim() };
    if (minutes) custom.expires_at = new Date(Date.now() + minutes * 60000).toISOString();
    socket.emit('set_custom_status', custom, onCustomAck);
  });
  $('custom-clear').addEventListener('click', () => {
    $('custom-text').value = '';
    $('custom-emoji').value = '';
    socket.emit('set_custom_status', null, onCustomAck);
  });
  function onCustomAck(result) {
    if (!result.ok) return; // the presence_error handler shows why
    hideNotice();
    if (result.presence) presenceMap[currentUserId] = fromPayload(result.presence);
    render();
  }

  // Simulate this device: idle (auto-away once every device of yours is idle) or backgrounded
  // (no updates until it is active again, then one presence_resync).
  const activity = $('activity');
  activity.addEventListener('change', () => socket.emit('activity', activity.value));
  socket.on('connect', () => {
    if (activity.value !== 'active') socket.emit('activity', activity.value);
  });
  setInterval(render, 30000); // "Last seen 2 minutes ago" moves on

  /** A presence payload → what the page keeps of it (absent additions: not set). */
  function fromPayload(u) {
    return {
      status: u.status,
      lastSeen: u.last_seen,
      platforms: u.platforms || [],
      idleSince: u.idle_since || null,
      custom: u.custom_status || null,
      lastSeenApprox: u.last_seen_approx || null,
    };
  }

  function render() {
    const mine = presenceMap[currentUserId];
    // The status kept for me (not an auto-away of my idle devices, which I did not choose).
    if (mine && !mine.idleSince && document.activeElement !== picker) picker.value = mine.status;
    $('my-dot').dataset.status = picker.value;
    const myCustom = $('my-custom');
    myCustom.textContent = mine && mine.custom ? `Your status: ${customText(mine.custom)}` : '';
    myCustom.hidden = !(mine && mine.custom);
    const list = $('contacts');
    list.replaceChildren(...contacts.map((c) => contactItem(c, presenceMap[c.id])));
    if (contacts.length === 0) showNotice('No contacts: add contacts=2,3 to the address.');
  }

  function contactItem(contact, presence) {
    const status = presence ? presence.status : 'unknown';
    const item = el('li', 'contact');
    item.dataset.userId = String(contact.id);
    item.dataset.status = status;
    const avatar = el('span', 'avatar', initials(contact.name));
    const dot = el('span', 'dot');
    dot.dataset.status = status;
    avatar.append(dot);
    const text = el('div');
    text.append(el('div', 'contact-name', contact.name));
    if (presence && presence.custom) text.append(el('div', 'contact-custom', customText(presence.custom)));
    text.append(el('div', 'contact-status', presence ? getStatusText(presence.status, presence.lastSeen, presence) : '…'));
    if (presence && presence.platforms.length) text.append(el('div', 'contact-platforms', `on ${presence.platforms.join(', ')}`));
    if (presence && presence.idleSince) item.dataset.idle = 'true';
    item.append(avatar, text);
    return item;
  }

  /** '📅 In a meeting · until 15:00' */
  function customText(custom) {
    const words = [custom.emoji, custom.text].filter(Boolean).join(' ');
    if (!custom.expires_at) return words;
    const until = new Date(custom.expires_at).toLocaleTimeString([], { hour: '2-digit', minute: '2-digit' });
    return `${words} · until ${until}`;
  }

  // The seed's "Format Last Seen" helpers, unchanged but for three lines: the edge sends
  // last_seen null for "never seen" or "hidden from you", which the seed would print as 1970; it
  // may send an approximate last seen instead; and an auto-away user says since when.
  function getStatusText(status, lastSeenTimestamp, extra = {}) {
    if (status === 'online') {
      return 'Online';
    }
    if (status === 'away') {
      if (extra.idleSince) return `Away · idle ${formatRelativeTime(extra.idleSince).replace(/ ago$/, '')}`;
      return 'Away';
    }
    if (status === 'busy') {
      return 'Busy';
    }
    if (!lastSeenTimestamp && extra.lastSeenApprox) return `Last seen ${APPROX_TEXT[extra.lastSeenApprox] || 'a while ago'}`;
    if (!lastSeenTimestamp) return 'Offline';
    // For offline, show relative time
    return `Last seen ${formatRelativeTime(lastSeenTimestamp)}`;
  }

  function formatRelativeTime(timestamp) {
    const now = new Date();
    const then = new Date(timestamp);
    const diffMs = now - then;
    const diffMins = Math.floor(diffMs / 60000);

    if (diffMins < 1) return 'just now';
    if (diffMins < 60) return `${diffMins} minute${diffMins > 1 ? 's' : ''} ago`;

    const diffHours = Math.floor(diffMins / 60);
    if (diffHours < 24) return `${diffHours} hour${diffHours > 1 ? 's' : ''} ago`;

    const diffDays = Math.floor(diffHours / 24);
    if (diffDays < 7) return `${diffDays} day${diffDays > 1 ? 's' : ''} ago`;

    // For older timestamps, show actual date
    return then.toLocaleDateString();
  }

  const APPROX_TEXT = { recently: 'recently', within_week: 'within a week', within_month: 'within a month', long_ago: 'a long time ago' };

  function setConnection(state, text) {
    const footer = $('connection');
    footer.dataset.state = state;
    footer.textContent = text;
  }

  function showNotice(text) {
    const notice = $('notice');
    notice.textContent = text;
    notice.hidden = false;
  }

  function hideNotice() {
    $('notice').hidden = true;
  }

  function el(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function initials(name) {
    const words = name.trim().split(/\s+/);
    return Array.from(words.length > 1 ? words[0][0] + words[words.length - 1][0] : words[0])[0].toUpperCase();
  }

  function positiveInt(text) {
    return /^[1-9][0-9]{0,15}$/.test(text || '') ? Number(text) : null;
  }

  /** "2,3" or "2:Ana,3:Bo" → [{ id: 2, name: 'Ana' }, …]; bad entries are left out. */
  function parseContacts(text) {
    const seen = new Set();
    return text.split(',').flatMap((entry) => {
      const [idText, ...name] = entry.split(':');
      const id = positiveInt(idText.trim());
      if (!id || seen.has(id)) return [];
      seen.add(id);
      return [{ id, name: name.join(':').trim() || `User ${id}` }];
    });
  }

  /** The `sub` of a JWT (not verified: the presence service does that), or null. */
  function userIdOfToken(jwt) {
    try {
      const payload = jwt.split('.')[1].replace(/-/g, '+').replace(/_/g, '/');
      return positiveInt(String(JSON.parse(atob(payload)).sub));
    } catch {
      return null;
    }
  }
})();

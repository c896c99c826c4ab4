//! The registry: users' entries in shards, how they are loaded (backplane first, then the
//! store), and how a change is applied to one: the rules in memory (a single node, or a cluster
//! node that cannot reach the backplane) or the backplane's result, then the fan-out of what
//! each watcher may now see.
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, MutexGuard};

use crate::domain::{Millis, PresenceView, Privacy, Status, UserId, Visibility, now_millis};
use crate::rules::{self, Devices, Op, Outcome, Presence};
use crate::store::PresenceRow;

use super::subscriber::{Event, Subscriber};
use super::update::Update;
use super::view::{Relation, ViewerContext, above, change_for, project};
use super::{EPOCH_VERSION_GAP, Engine, EngineError, Result};

/// A user's contacts, shared between the entry cache and whoever asked.
pub(super) type ContactSet = Arc<super::contact_list::ContactList>;

/// What a user nobody has seen looks like.
static NEVER_SEEN: Presence = Presence {
    chosen: Status::Online,
    last_seen: None,
    last_offline: None,
    version: 0,
    offline_version: 0,
    privacy: Privacy {
        online: Visibility::Contacts,
        last_seen: Visibility::Contacts,
        approximate_last_seen: true,
    },
    custom: None,
    chosen_at: 0,
    inactive_since: None,
    nodes: Vec::new(),
    grace: None,
};

/// What a user nobody has seen looks like.
pub(super) fn never_seen() -> &'static Presence {
    &NEVER_SEEN
}

#[derive(Default)]
pub(super) struct Shard {
    pub users: HashMap<UserId, Entry>,
    /// Users whose entry changed since the last flush.
    pub dirty: Vec<UserId>,
    /// Users that may have become idle: the flusher evicts those that are.
    pub idle: Vec<UserId>,
    /// Grows with every eviction, so a loader can tell that a row it read may be stale.
    pub evictions: u64,
}

/// One user's live state on this node.
pub(super) struct Entry {
    /// None: never seen (what [`NEVER_SEEN`] says), so that the many users watched only by id
    /// cost little (48 bytes, plus their watchers).
    presence: Option<Box<Presence>>,
    /// Subscribers to notify of this user's changes.
    pub watchers: Vec<Watch>,
    /// Set while the user has devices or subscribers of their own on this node.
    pub audience: Option<Box<Audience>>,
    /// Changed since the last flush.
    pub dirty: bool,
    /// Cluster mode: holds a change decided with local rules while the backplane was away,
    /// which it has not confirmed yet (reconciled when it answers again).
    pub unsynced: bool,
}

/// A user's own devices and subscribers on this node.
#[derive(Default)]
pub(super) struct Audience {
    /// This node's devices of the user.
    pub local: Devices,
    /// "Still online at", written with the row.
    pub checkpoint_at: Option<Millis>,
    /// Those following the user's contacts (devices and contact watches): a contact added
    /// later is attached to each of them.
    pub followers: Vec<Arc<Subscriber>>,
    /// Every subscriber looking through this user's eyes (a superset of `followers`): they
    /// learn at once when the user's own privacy changes.
    pub viewers: Vec<Arc<Subscriber>>,
    /// The user's contacts, cached while followers exist.
    pub contacts: Option<ContactSet>,
    /// Open WatchContacts streams of the user.
    pub watches: u32,
}

/// One receiver of a user's changes.
pub(super) struct Watch {
    pub sub: Arc<Subscriber>,
    pub relation: Relation,
    /// The version this receiver last got of the user: what it gets next is always above.
    pub last: u64,
    /// The passive period of `sub` in which this watch last recorded a miss (0: none since
    /// the user was last taken out of the missed set); see [`Subscriber::miss_once`].
    pub missed_in: u32,
}

impl Entry {
    pub fn new(presence: Presence) -> Entry {
        Entry {
            presence: (presence != NEVER_SEEN).then(|| Box::new(presence)),
            watchers: Vec::new(),
            audience: None,
            dirty: false,
            unsynced: false,
        }
    }

    pub fn presence(&self) -> &Presence {
        self.presence.as_deref().unwrap_or(&NEVER_SEEN)
    }

    pub fn presence_mut(&mut self) -> &mut Presence {
        self.presence
            .get_or_insert_with(|| Box::new(NEVER_SEEN.clone()))
    }

    pub fn set_presence(&mut self, p: Presence) {
        self.presence = Some(Box::new(p));
    }

    pub fn audience(&mut self) -> &mut Audience {
        self.audience.get_or_insert_with(Default::default)
    }

    /// This node's devices of the user.
    pub fn local(&self) -> Devices {
        self.audience.as_ref().map(|a| a.local).unwrap_or_default()
    }

    pub fn local_mut(&mut self) -> &mut Devices {
        &mut self.audience().local
    }

    pub fn set_checkpoint(&mut self, at: Millis) {
        self.audience().checkpoint_at = Some(at);
    }

    /// Adds a watcher; a user's first one takes room for exactly one (most users watched by
    /// id have one watcher, and Vec's first growth would make room for four).
    pub fn add_watch(&mut self, watch: Watch) {
        push_tight(&mut self.watchers, watch);
    }

    pub fn view(&self, user: UserId, ctx: ViewerContext, now: Millis) -> PresenceView {
        project(user, self.presence(), ctx, now)
    }

    pub fn row(&self, user_id: UserId, epoch: u64) -> PresenceRow {
        let p = self.presence();
        PresenceRow {
            user_id,
            chosen: p.chosen,
            is_online: p.effective() != Status::Offline,
            last_seen: p.last_seen,
            version: p.version,
            offline_version: p.offline_version,
            epoch,
            privacy: p.privacy,
            checkpoint_at: self.audience.as_ref().and_then(|a| a.checkpoint_at),
            custom: p.custom.clone(),
        }
    }

    /// Nothing on this node needs the entry: no device, no grace, no receiver, nothing
    /// unwritten.
    pub fn is_idle(&self) -> bool {
        self.local().total == 0
            && self.presence().grace.is_none()
            && self.watchers.is_empty()
            && self.audience.is_none()
            && !self.dirty
            && !self.unsynced
    }

    /// Removes every trace of `sub` from this entry.
    pub fn detach(&mut self, sub: &Arc<Subscriber>) {
        self.watchers.retain(|w| !Arc::ptr_eq(&w.sub, sub));
        if let Some(a) = &mut self.audience {
            a.followers.retain(|f| !Arc::ptr_eq(f, sub));
            a.viewers.retain(|f| !Arc::ptr_eq(f, sub));
            if a.followers.is_empty() {
                a.contacts = None;
            }
        }
        self.tidy();
    }

    /// Drops the audience once it holds nothing: no device, no subscriber of the user's own.
    pub fn tidy(&mut self) {
        if self.audience.as_ref().is_some_and(|a| {
            a.viewers.is_empty() && a.followers.is_empty() && a.watches == 0 && a.local.total == 0
        }) {
            self.audience = None;
        }
    }

    /// The watch of `sub`, if it watches this user.
    pub fn watch_of(&mut self, sub: &Arc<Subscriber>) -> Option<&mut Watch> {
        self.watchers.iter_mut().find(|w| Arc::ptr_eq(&w.sub, sub))
    }
}

/// A user's presence as its stored row says, in this node's numbering: versions written in an
/// older epoch are raised above anything a crashed node may have sent since.
pub(super) fn presence_from_row(row: &PresenceRow, epoch: u64) -> Presence {
    let gap = epoch
        .saturating_sub(row.epoch)
        .saturating_mul(EPOCH_VERSION_GAP);
    Presence {
        chosen: row.chosen,
        last_seen: row.last_seen,
        // A loaded user has no device here: their last_seen is their last offline time.
        last_offline: row.last_seen,
        version: row.version.saturating_add(gap),
        offline_version: row.offline_version.saturating_add(gap),
        privacy: row.privacy,
        custom: row.custom.clone(),
        chosen_at: 0,
        inactive_since: None,
        nodes: Vec::new(),
        grace: None,
    }
}

impl Engine {
    pub(super) fn shard(&self, user: UserId) -> MutexGuard<'_, super::Shard> {
        self.shared.shards[self.shard_index(user)]
            .lock()
            .expect("shard lock poisoned: a panic while holding it")
    }

    pub(super) fn shard_index(&self, user: UserId) -> usize {
        (user.get() % self.shared.shards.len() as u64) as usize
    }

    pub(super) fn epoch(&self) -> u64 {
        self.shared.epoch.load(Ordering::Relaxed)
    }

    /// Makes sure every given user has an entry in memory: from the backplane (cluster mode),
    /// else from the store in one merged read; a user neither has seen gets a fresh entry.
    pub(super) async fn ensure_loaded(&self, users: &[UserId]) -> Result<()> {
        for attempt in 0..4 {
            let mut missing = Vec::new();
            let mut generations = HashMap::new();
            for &u in users {
                let shard = self.shard(u);
                if !shard.users.contains_key(&u) {
                    missing.push(u);
                    generations.insert(self.shard_index(u), shard.evictions);
                }
            }
            if missing.is_empty() {
                return Ok(());
            }
            missing.sort_unstable();
            missing.dedup();
            let mut loaded = self.read_presence(&missing).await?;
            let mut stale = false;
            for u in missing {
                let mut guard = self.shard(u);
                let shard = &mut *guard;
                if shard.users.contains_key(&u) {
                    continue;
                }
                // An eviction since we looked means the row we read may predate a flush of a
                // newer entry (loaded, changed, flushed and evicted meanwhile): read it again.
                if generations.get(&self.shard_index(u)) != Some(&shard.evictions) && attempt < 3 {
                    stale = true;
                    continue;
                }
                let presence = loaded.remove(&u).unwrap_or_else(|| NEVER_SEEN.clone());
                let expiry = presence.custom.as_ref().and_then(|c| c.expires_at);
                shard.users.insert(u, Entry::new(presence));
                shard.idle.push(u);
                drop(guard);
                if let Some(at) = expiry {
                    self.schedule_custom_expiry(u, at);
                }
            }
            if !stale {
                return Ok(());
            }
        }
        Err(EngineError::Unstable(users[0]))
    }

    /// The current presence of users not in memory: the backplane's (cluster mode) for those
    /// it has, the store's rows for the rest (absent: never seen).
    pub(super) async fn read_presence(
        &self,
        users: &[UserId],
    ) -> Result<HashMap<UserId, Presence>> {
        let mut out = HashMap::with_capacity(users.len());
        let mut from_store = users.to_vec();
        if let Some(bp) = &self.shared.backplane
            && let Ok(shared) = bp.load(users).await
        {
            for (u, p) in shared {
                out.insert(u, p);
            }
            from_store.retain(|u| !out.contains_key(u));
        }
        if !from_store.is_empty() {
            let rows = self.shared.reads.presence(&from_store).await?;
            let epoch = self.epoch();
            for u in from_store {
                if let Some(row) = rows.get(&u) {
                    out.insert(u, presence_from_row(row, epoch));
                }
            }
        }
        Ok(out)
    }

    /// Applies `op` with the rules in memory, and everything that follows: fan-out, the dirty
    /// mark. None when the user is not in memory.
    pub(super) fn apply_local(&self, user: UserId, op: &Op, now: Millis) -> Option<Outcome> {
        let mut guard = self.shard(user);
        self.apply_in(&mut guard, user, op, now)
    }

    /// [`Engine::apply_local`] on a shard the caller holds.
    pub(super) fn apply_in(
        &self,
        shard: &mut Shard,
        user: UserId,
        op: &Op,
        now: Millis,
    ) -> Option<Outcome> {
        let entry = shard.users.get_mut(&user)?;
        let before = entry.presence().clone();
        let before_row = entry.row(user, 0);
        let outcome = rules::apply(entry.presence_mut(), op, &self.shared.node, now);
        if self.is_cluster() {
            entry.unsynced = true;
        }
        if outcome.changed {
            self.shared.counters.changes.fetch_add(1, Ordering::Relaxed);
            self.fan_out(entry, user, &before, now);
        }
        if entry.row(user, 0) != before_row {
            mark_dirty(shard, user, &self.shared.counters.dirty_users);
        }
        Some(outcome)
    }

    /// Applies a presence decided by the backplane, if the user is in memory and it is not
    /// older than what the entry has; fans out what changed. `made`: this node ran the
    /// transition (Some, with whether it changed anything), so it writes the row; None: heard
    /// on the subscription. Returns whether the entry is in memory.
    pub(super) fn apply_shared(
        &self,
        user: UserId,
        presence: Presence,
        made: Option<bool>,
    ) -> bool {
        let own = made.is_some();
        let mut guard = self.shard(user);
        let shard = &mut *guard;
        let Some(entry) = shard.users.get_mut(&user) else {
            return false;
        };
        let current = entry.presence();
        if presence.version < current.version {
            return true;
        }
        if presence.version == current.version && presence.same_facets(current) {
            // The same state: a node's report, a grace started, or this node's own change
            // heard on the subscription before the transition's reply came back. Keep the
            // newest device reports without telling anyone; a change this node made is still
            // its row to write.
            entry.set_presence(presence);
            if own {
                entry.unsynced = false;
            }
            if made == Some(true) {
                self.shared.counters.changes.fetch_add(1, Ordering::Relaxed);
                mark_dirty(shard, user, &self.shared.counters.dirty_users);
            }
            return true;
        }
        let before = entry.presence().clone();
        let before_row = entry.row(user, 0);
        let expiry = presence
            .custom
            .as_ref()
            .and_then(|c| c.expires_at)
            .filter(|_| before.custom != presence.custom);
        entry.set_presence(presence);
        if own {
            entry.unsynced = false;
            self.shared.counters.changes.fetch_add(1, Ordering::Relaxed);
        }
        self.fan_out(entry, user, &before, now_millis());
        if own && entry.row(user, 0) != before_row {
            mark_dirty(shard, user, &self.shared.counters.dirty_users);
        }
        drop(guard);
        if let Some(at) = expiry {
            self.schedule_custom_expiry(user, at);
        }
        true
    }

    /// Pushes to each watcher what it may now see, if that changed; a passive (backgrounded)
    /// device only records that it missed something. Runs under the user's shard lock; pushes
    /// never wait. Closed watchers are pruned on the way.
    pub(super) fn fan_out(&self, entry: &mut Entry, user: UserId, before: &Presence, now: Millis) {
        let (mut deliveries, mut coalesced, mut skipped) = (0u64, 0usize, 0u64);
        let after = entry.presence.as_deref().unwrap_or(&NEVER_SEEN);
        let mut updates = Updates::new(user, before, after, now);
        entry.watchers.retain_mut(|w| {
            if w.sub.is_closed() {
                return false;
            }
            let Some(shared) = updates.for_viewer(w.sub.context(w.relation)) else {
                return true;
            };
            // Checked without the queue lock first: passive devices are most of the walk.
            if w.sub.is_passive() {
                w.sub.miss_once(user, &mut w.missed_in);
                skipped += 1;
                return true;
            }
            let update = if shared.view().version > w.last {
                shared.clone()
            } else {
                Update::new(above(shared.view().clone(), w.last))
            };
            let version = update.view().version;
            match w.sub.push_live(Event::Presence(update)) {
                Some(c) => {
                    w.last = version;
                    coalesced += c;
                    deliveries += 1;
                }
                None => {
                    w.sub.miss_once(user, &mut w.missed_in);
                    skipped += 1;
                }
            }
            true
        });
        if before.privacy.last_seen != after.privacy.last_seen
            && let Some(a) = &entry.audience
        {
            for v in &a.viewers {
                v.set_own_last_seen(after.privacy.last_seen);
            }
        }
        let c = &self.shared.counters;
        c.deliveries.fetch_add(deliveries, Ordering::Relaxed);
        if coalesced > 0 {
            c.coalesced.fetch_add(coalesced as u64, Ordering::Relaxed);
        }
        if skipped > 0 {
            c.passive_skipped.fetch_add(skipped, Ordering::Relaxed);
        }
    }

    /// This node's report of its devices of the user, as they are in `entry` now.
    pub(super) fn device_report(&self, entry: &Entry, grace: Option<u64>) -> Op {
        Op::Devices {
            seq: self.shared.next_report.fetch_add(1, Ordering::Relaxed),
            devices: entry.local(),
            grace,
        }
    }
}

/// The update each viewer context gets of one change, projected once per context: a change
/// reaches its watchers through a few distinct contexts (contacts, strangers, the user's own
/// devices), however many watchers there are.
struct Updates<'a> {
    user: UserId,
    before: &'a Presence,
    after: &'a Presence,
    now: Millis,
    seen: Vec<(ViewerContext, Option<Arc<Update>>)>,
}

impl<'a> Updates<'a> {
    fn new(user: UserId, before: &'a Presence, after: &'a Presence, now: Millis) -> Self {
        Updates {
            user,
            before,
            after,
            now,
            seen: Vec::new(),
        }
    }

    /// What receivers with this context are pushed, before each one's own floor; None when
    /// nothing they may see changed.
    fn for_viewer(&mut self, viewer: ViewerContext) -> Option<&Arc<Update>> {
        let i = match self.seen.iter().position(|(v, _)| *v == viewer) {
            Some(i) => i,
            None => {
                let change = change_for(self.user, self.before, self.after, viewer, self.now);
                self.seen.push((viewer, change.map(Update::new)));
                self.seen.len() - 1
            }
        };
        self.seen[i].1.as_ref()
    }
}

/// Pushes onto a list that lives as long as the streams in it: it grows by an eighth instead of
/// doubling. Watcher lists are the largest part of the engine's memory per stream (24 bytes a
/// watcher: a user with 50 watching contacts had room for 64), and a list of one (a user
/// watched only by id, a device's own audience) gets exactly one slot.
pub(super) fn push_tight<T>(list: &mut Vec<T>, item: T) {
    if list.len() == list.capacity() {
        list.reserve_exact((list.len() / 8).max(1));
    }
    list.push(item);
}

/// Marks the user's row for the next flush; the caller holds the user's shard lock.
pub(super) fn mark_dirty(
    shard: &mut Shard,
    user: UserId,
    dirty_users: &std::sync::atomic::AtomicU64,
) {
    if let Some(entry) = shard.users.get_mut(&user)
        && !entry.dirty
    {
        entry.dirty = true;
        shard.dirty.push(user);
        dirty_users.fetch_add(1, Ordering::Relaxed);
    }
}

/// The view of `user` that `viewer` has after attaching: the projected view, with the watch
/// remembering its version.
pub(super) fn attach_watch(
    entry: &mut Entry,
    user: UserId,
    sub: &Arc<Subscriber>,
    relation: Relation,
    now: Millis,
) -> PresenceView {
    let mut view = entry.view(user, sub.context(relation), now);
    let floor = sub.take_floor(user);
    if floor > 0 && view.version <= floor {
        view.version = floor + 1;
    }
    entry.add_watch(Watch {
        sub: sub.clone(),
        relation,
        last: view.version,
        missed_in: 0,
    });
    view
}

/// The context of the own-device viewer.
pub(super) const OWN: ViewerContext = ViewerContext::OWN;

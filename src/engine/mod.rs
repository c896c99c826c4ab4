//! The presence engine: the in-memory registry of users, devices and watchers; the rules that
//! turn devices and chosen statuses into an effective status; the privacy projection; the
//! fan-out of every change to the subscribers allowed to see it; and the write-behind of rows to
//! the store. It knows nothing of gRPC or SQL.
//!
//! State lives in shards, one `std::sync::Mutex` each, keyed by user id. A change of user X takes
//! X's shard lock, mutates X's entry, and pushes the projected update into each watcher's queue
//! while still holding the lock, so updates of X reach every receiver in version order. Pushing
//! never waits (see [`subscriber`]); no lock is ever held across `.await`, and no code path holds
//! two shard locks at once.
pub mod cluster;
mod flusher;
mod reads;
mod replica;
mod subscriber;
pub mod view;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::domain::{Millis, PresenceView, Privacy, Status, UserId, Viewer, now_millis};
use crate::store::{PresenceRow, Store, StoreError};

pub use subscriber::{EndReason, Event, EventStream, Subscriber};
use view::{Relation, UserState, ViewerContext, project, update_for};

/// Versions loaded from a row written in an older store epoch are raised by this much per epoch,
/// so that after a crash (which loses unflushed increments) every version handed out is above
/// any the crashed run may have sent.
pub const EPOCH_VERSION_GAP: u64 = 1 << 24;

/// The engine's knobs. Every timeout, interval and limit is here so tests can shrink them.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// How long a user whose last device left still counts as online (anti-flap). Zero announces
    /// "offline" at once.
    pub offline_grace: Duration,
    /// How often changed rows are written to the store.
    pub flush_interval: Duration,
    /// How often online users' rows are marked "still online at T".
    pub checkpoint_interval: Duration,
    /// Queue length at which a subscriber's queue is compacted to the newest presence per user.
    pub queue_capacity: usize,
    /// Most live devices per user.
    pub max_devices: u32,
    /// Number of registry shards.
    pub shards: usize,
    /// Most streams being set up at once (each may read the store); more are refused with a
    /// retry hint instead of queueing without bound, so a mass reconnect is paced.
    pub max_pending_setups: usize,
    /// Deliveries are released to the network in batches this often (zero: at once); see
    /// [`subscriber::WakeBatcher`].
    pub delivery_batch: Duration,
    /// Cluster mode through Redis; None runs a single node.
    pub cluster: Option<cluster::ClusterConfig>,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            offline_grace: Duration::from_millis(5000),
            flush_interval: Duration::from_millis(1000),
            checkpoint_interval: Duration::from_secs(30),
            queue_capacity: 1024,
            max_devices: 10,
            shards: 64,
            max_pending_setups: 512,
            delivery_batch: Duration::from_micros(5000),
            cluster: None,
        }
    }
}

/// What the engine can fail with. The gRPC adapter maps each to a status in one place.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("user {user} already has {limit} live devices (the limit)")]
    TooManyDevices { user: UserId, limit: u32 },
    #[error("the server is shutting down")]
    ShuttingDown,
    #[error("the stream was closed before it was set up")]
    Closed,
    #[error("too many streams are being set up right now")]
    Busy,
}

pub type Result<T> = std::result::Result<T, EngineError>;

/// Counters since start, as reported by GetStats and the metrics endpoint.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Stats {
    pub online_users: u64,
    pub connections: u64,
    pub watchers: u64,
    pub changes: u64,
    pub deliveries: u64,
    pub coalesced: u64,
    pub db_statements: u64,
    pub db_rows: u64,
    pub db_errors: u64,
    /// Users whose row changed and is not yet written.
    pub dirty_users: u64,
}

#[derive(Default)]
struct Counters {
    online_users: AtomicU64,
    connections: AtomicU64,
    watchers: AtomicU64,
    changes: AtomicU64,
    deliveries: AtomicU64,
    coalesced: AtomicU64,
    db_statements: AtomicU64,
    db_rows: AtomicU64,
    db_errors: AtomicU64,
    dirty_users: AtomicU64,
}

/// What a device gets when it connects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Welcome {
    pub connection_id: String,
    pub self_view: PresenceView,
    /// Every contact, ascending by id.
    pub contacts: Vec<PresenceView>,
}

/// A live device: its welcome and its stream of updates. Dropping the stream disconnects the
/// device.
pub struct DeviceSession {
    pub welcome: Welcome,
    pub stream: EventStream,
}

/// A cheap-to-clone handle on the engine.
#[derive(Clone)]
pub struct Engine {
    shared: Arc<Shared>,
}

struct Shared {
    shards: Box<[Mutex<Shard>]>,
    store: Arc<dyn Store>,
    config: EngineConfig,
    /// This run's store epoch; versions and rows are written with it.
    epoch: u64,
    /// Distinguishes this process's connection ids from other runs' and nodes'.
    instance: String,
    next_subscriber: AtomicU64,
    next_grace_token: AtomicU64,
    /// Every open subscriber, so shutdown can end them all.
    subscribers: Mutex<HashMap<u64, Weak<Subscriber>>>,
    shutting_down: AtomicBool,
    /// False while the last write to the store failed: health reports the degradation.
    store_ok: AtomicBool,
    counters: Counters,
    /// Tells the flusher to do its final flush and stop.
    stop_flusher: watch::Sender<bool>,
    /// Permits for streams being set up; see [`EngineConfig::max_pending_setups`].
    setups: Arc<tokio::sync::Semaphore>,
    flusher: Mutex<Option<JoinHandle<()>>>,
    /// Set in cluster mode.
    cluster: Option<Arc<cluster::Cluster>>,
    /// Set when deliveries are batched.
    batcher: Option<Arc<subscriber::WakeBatcher>>,
    /// Loads of rows and contact lists, merged while a query runs.
    reads: reads::Reads,
}

#[derive(Default)]
struct Shard {
    users: HashMap<UserId, Entry>,
    /// Users whose entry changed since the last flush.
    dirty: Vec<UserId>,
    /// Users that may have become idle: the flusher evicts those that are.
    idle: Vec<UserId>,
    /// Grows with every eviction, so a loader can tell that a row it read may be stale.
    evictions: u64,
}

/// One user's live state.
struct Entry {
    chosen: Status,
    /// Live devices of this user on this node.
    devices: u32,
    /// Set while the last device is gone but the grace has not run out.
    pending_offline: Option<PendingOffline>,
    last_seen: Option<Millis>,
    last_offline: Option<Millis>,
    version: u64,
    privacy: Privacy,
    checkpoint_at: Option<Millis>,
    /// Subscribers to notify of this user's changes.
    watchers: Vec<Watch>,
    /// This user's own subscribers that follow the user's contacts (devices and
    /// contact-watching streams): a contact added later is attached to each of them.
    followers: Vec<Arc<Subscriber>>,
    /// Every subscriber looking through this user's eyes (devices and watches of this user; a
    /// superset of `followers`): they learn at once when the user's own privacy changes.
    viewers: Vec<Arc<Subscriber>>,
    /// See [`UserState::offline_version`].
    offline_version: u64,
    /// The user's contacts, cached while followers exist.
    contacts: Option<Arc<HashSet<UserId>>>,
    /// Changed since the last flush.
    dirty: bool,
    /// Cluster mode: the effective status and connectedness decided across nodes (None in
    /// single-node mode, and while Redis is unreachable: local rules apply then).
    cluster_view: Option<(Status, bool)>,
}

#[derive(Clone, Copy)]
struct PendingOffline {
    since: Millis,
    token: u64,
}

struct Watch {
    sub: Arc<Subscriber>,
    relation: Relation,
}

impl Entry {
    fn from_row(row: &PresenceRow, epoch: u64) -> Self {
        let gap = epoch
            .saturating_sub(row.epoch)
            .saturating_mul(EPOCH_VERSION_GAP);
        Entry {
            chosen: row.chosen,
            devices: 0,
            pending_offline: None,
            last_seen: row.last_seen,
            // Loaded users are offline here, so their last_seen is their last offline time.
            last_offline: row.last_seen,
            version: row.version.saturating_add(gap),
            privacy: row.privacy,
            checkpoint_at: row.checkpoint_at,
            watchers: Vec::new(),
            followers: Vec::new(),
            viewers: Vec::new(),
            offline_version: row.version.saturating_add(gap),
            contacts: None,
            dirty: false,
            cluster_view: None,
        }
    }

    /// An entry from the shared (cluster) state.
    fn from_shared(s: &cluster::SharedState) -> Self {
        let mut e = Entry::from_row(&PresenceRow::new(s.user), 0);
        e.chosen = s.chosen;
        e.last_seen = s.last_seen;
        e.last_offline = s.last_offline;
        e.version = s.version;
        e.offline_version = s.offline_version;
        e.privacy = s.privacy;
        e.cluster_view = Some((s.effective, s.connected));
        e
    }

    fn effective(&self) -> Status {
        if let Some((effective, _)) = self.cluster_view {
            return effective;
        }
        if self.devices > 0 || self.pending_offline.is_some() {
            self.chosen
        } else {
            Status::Offline
        }
    }

    fn state(&self, user_id: UserId) -> UserState {
        UserState {
            user_id,
            effective: self.effective(),
            connected: self.cluster_view.map_or(self.devices > 0, |(_, c)| c),
            last_seen: self.last_seen,
            last_offline: self.last_offline,
            version: self.version,
            offline_version: self.offline_version,
            privacy: self.privacy,
        }
    }

    fn row(&self, user_id: UserId, epoch: u64) -> PresenceRow {
        PresenceRow {
            user_id,
            chosen: self.chosen,
            is_online: self.effective() != Status::Offline,
            last_seen: self.last_seen,
            version: self.version,
            epoch,
            privacy: self.privacy,
            checkpoint_at: self.checkpoint_at,
        }
    }

    fn is_idle(&self) -> bool {
        self.devices == 0
            && self.pending_offline.is_none()
            && self.watchers.is_empty()
            && self.viewers.is_empty()
            && !self.dirty
    }

    /// Removes every trace of `sub` from this entry.
    fn detach(&mut self, sub: &Arc<Subscriber>) {
        self.watchers.retain(|w| !Arc::ptr_eq(&w.sub, sub));
        self.followers.retain(|f| !Arc::ptr_eq(f, sub));
        self.viewers.retain(|f| !Arc::ptr_eq(f, sub));
        if self.followers.is_empty() {
            self.contacts = None;
        }
    }
}

impl Engine {
    /// Starts a run on the store (which must be migrated): records the epoch, recovers rows a
    /// crash left online, and spawns the write-behind flusher.
    pub async fn start(store: Arc<dyn Store>, config: EngineConfig) -> Result<Engine> {
        let epoch = store.begin_epoch().await?;
        if epoch.previous_run_crashed {
            tracing::warn!(
                epoch = epoch.number,
                "previous run did not shut down cleanly: users it left online were set offline at their last checkpoint"
            );
        }
        let setups = config.max_pending_setups.max(1);
        let shards = (0..config.shards.max(1))
            .map(|_| Mutex::new(Shard::default()))
            .collect();
        let (stop_flusher, stop_rx) = watch::channel(false);
        let batcher = (!config.delivery_batch.is_zero())
            .then(|| subscriber::WakeBatcher::start(config.delivery_batch));
        let cluster = match &config.cluster {
            None => None,
            Some(c) => Some(Arc::new(connect_cluster(c).await)),
        };
        let reads = reads::Reads::start(store.clone());
        let engine = Engine {
            shared: Arc::new(Shared {
                shards,
                store,
                config,
                epoch: epoch.number,
                instance: format!("{:08x}", rand::random::<u32>()),
                next_subscriber: AtomicU64::new(1),
                next_grace_token: AtomicU64::new(1),
                subscribers: Mutex::new(HashMap::new()),
                shutting_down: AtomicBool::new(false),
                store_ok: AtomicBool::new(true),
                counters: Counters::default(),
                stop_flusher,
                setups: Arc::new(tokio::sync::Semaphore::new(setups)),
                flusher: Mutex::new(None),
                cluster,
                batcher,
                reads,
            }),
        };
        let handle = tokio::spawn(flusher::run(engine.clone(), stop_rx));
        if let Some(c) = &engine.shared.cluster {
            tracing::info!(node = %c.node, "cluster mode: presence is shared through redis");
            tokio::spawn(engine.clone().run_lease());
            tokio::spawn(engine.clone().run_subscription());
        }
        *engine.shared.flusher.lock().expect("flusher lock poisoned") = Some(handle);
        Ok(engine)
    }

    pub fn config(&self) -> &EngineConfig {
        &self.shared.config
    }

    pub fn store(&self) -> &Arc<dyn Store> {
        &self.shared.store
    }

    fn shard(&self, user: UserId) -> MutexGuard<'_, Shard> {
        let i = (user.get() % self.shared.shards.len() as u64) as usize;
        self.shared.shards[i]
            .lock()
            .expect("shard lock poisoned: a panic while holding it")
    }

    fn shard_index(&self, user: UserId) -> usize {
        (user.get() % self.shared.shards.len() as u64) as usize
    }

    fn is_shutting_down(&self) -> bool {
        self.shared.shutting_down.load(Ordering::Acquire)
    }

    /// Whether the last write to the store succeeded. While it is false, presence is served
    /// from memory and unwritten rows wait, coalesced, for the store to come back.
    pub fn store_ok(&self) -> bool {
        self.shared.store_ok.load(Ordering::Relaxed)
    }

    pub fn stats(&self) -> Stats {
        let c = &self.shared.counters;
        Stats {
            online_users: c.online_users.load(Ordering::Relaxed),
            connections: c.connections.load(Ordering::Relaxed),
            watchers: c.watchers.load(Ordering::Relaxed),
            changes: c.changes.load(Ordering::Relaxed),
            deliveries: c.deliveries.load(Ordering::Relaxed),
            coalesced: c.coalesced.load(Ordering::Relaxed),
            db_statements: c.db_statements.load(Ordering::Relaxed),
            db_rows: c.db_rows.load(Ordering::Relaxed),
            db_errors: c.db_errors.load(Ordering::Relaxed),
            dirty_users: c.dirty_users.load(Ordering::Relaxed),
        }
    }

    /// Makes sure every given user has an entry in memory, reading the missing ones from the
    /// store in one query. A user the store has never seen gets a fresh entry.
    async fn ensure_loaded(&self, users: &[UserId]) -> Result<()> {
        for attempt in 0.. {
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
            // Cluster mode: the shared state (Redis) is the truth for anyone it knows.
            let (shared, from_store) = self.load_shared(&missing).await;
            let shared: HashMap<UserId, Entry> = shared
                .iter()
                .map(|s| (s.user, Self::entry_from_shared(s)))
                .collect();
            let rows = if from_store.is_empty() {
                Arc::default()
            } else {
                self.shared.reads.presence(&from_store).await?
            };
            let mut shared = shared;
            let mut stale = false;
            for u in missing {
                let mut shard = self.shard(u);
                if shard.users.contains_key(&u) {
                    continue;
                }
                // An eviction since we looked means the row we read may predate a flush of a
                // newer entry (loaded, changed, flushed and evicted meanwhile): read it again.
                if generations.get(&self.shard_index(u)) != Some(&shard.evictions) && attempt < 3 {
                    stale = true;
                    continue;
                }
                let entry = match shared.remove(&u) {
                    Some(e) => e,
                    None => {
                        let row = rows.get(&u).copied().unwrap_or_else(|| PresenceRow::new(u));
                        let mut e = Entry::from_row(&row, self.shared.epoch);
                        if self.is_cluster() {
                            // Unknown to Redis: nobody has a device anywhere.
                            e.cluster_view = Some((Status::Offline, false));
                        }
                        e
                    }
                };
                shard.users.insert(u, entry);
                shard.idle.push(u);
            }
            if !stale {
                return Ok(());
            }
        }
        unreachable!("the loop returns once attempts reach 3")
    }

    /// Applies `change` to the user's entry, then everything a change implies: the version, last_seen,
    /// the dirty mark, and the fan-out of what each watcher may see. Returns false when the entry
    /// is not in memory.
    fn mutate(&self, user: UserId, at: Millis, change: impl FnOnce(&mut Entry)) -> bool {
        let mut guard = self.shard(user);
        let shard = &mut *guard;
        let Some(entry) = shard.users.get_mut(&user) else {
            return false;
        };
        let before = entry.state(user);
        let before_row = entry.row(user, 0);
        change(entry);
        let mut after = entry.state(user);
        if before.effective != after.effective || before.privacy != after.privacy {
            entry.version += 1;
            let was_visible = before.effective != Status::Offline;
            let is_visible = after.effective != Status::Offline;
            if was_visible != is_visible {
                entry.last_seen = Some(entry.last_seen.map_or(at, |t| t.max(at)));
                if !is_visible {
                    entry.last_offline = entry.last_seen;
                    entry.offline_version = entry.version;
                }
            }
            after = entry.state(user);
            self.shared.counters.changes.fetch_add(1, Ordering::Relaxed);
            self.fan_out(entry, &before, &after);
        }
        if entry.row(user, 0) != before_row {
            self.mark_dirty_locked(shard, user);
        }
        true
    }

    /// Marks the user's row for the next flush; the caller holds the user's shard lock.
    fn mark_dirty_locked(&self, shard: &mut Shard, user: UserId) {
        if let Some(entry) = shard.users.get_mut(&user)
            && !entry.dirty
        {
            entry.dirty = true;
            shard.dirty.push(user);
            self.shared
                .counters
                .dirty_users
                .fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Pushes to each watcher what it may now see, if that changed. Runs under the user's shard
    /// lock; pushes never wait. Closed watchers are pruned on the way.
    fn fan_out(&self, entry: &mut Entry, before: &UserState, after: &UserState) {
        let mut deliveries = 0;
        let mut coalesced = 0;
        entry.watchers.retain(|w| {
            if w.sub.is_closed() {
                return false;
            }
            if let Some(v) = update_for(before, after, w.sub.context(w.relation)) {
                coalesced += w.sub.push(Event::Presence(v));
                deliveries += 1;
            }
            true
        });
        let c = &self.shared.counters;
        c.deliveries.fetch_add(deliveries, Ordering::Relaxed);
        if coalesced > 0 {
            c.coalesced.fetch_add(coalesced as u64, Ordering::Relaxed);
        }
    }

    /// The user's contacts: from the cache when a follower keeps it, else from the store.
    async fn contacts(&self, user: UserId) -> Result<Arc<HashSet<UserId>>> {
        if let Some(c) = self
            .shard(user)
            .users
            .get(&user)
            .and_then(|e| e.contacts.clone())
        {
            return Ok(c);
        }
        Ok(self.shared.reads.contacts(user).await?)
    }

    fn new_subscriber(&self) -> Arc<Subscriber> {
        let id = self.shared.next_subscriber.fetch_add(1, Ordering::Relaxed);
        let sub = Arc::new(Subscriber::new(
            id,
            Default::default(),
            self.shared.config.queue_capacity,
            self.shared.batcher.clone(),
        ));
        self.shared
            .subscribers
            .lock()
            .expect("subscribers lock poisoned")
            .insert(id, Arc::downgrade(&sub));
        sub
    }

    /// Registers `sub` as a watcher of each user (loading missing ones) and returns what it may
    /// see of each, in the given order.
    async fn attach(
        &self,
        sub: &Arc<Subscriber>,
        users: &[UserId],
        relation: impl Fn(UserId) -> Relation,
    ) -> Result<Vec<PresenceView>> {
        let mut views: Vec<Option<PresenceView>> = vec![None; users.len()];
        let mut pending: Vec<usize> = (0..users.len()).collect();
        for _ in 0..4 {
            let mut missing = Vec::new();
            for i in pending {
                let u = users[i];
                let mut shard = self.shard(u);
                let Some(entry) = shard.users.get_mut(&u) else {
                    missing.push(i);
                    continue;
                };
                let rel = relation(u);
                if !sub.track(u) {
                    return Err(EngineError::Closed);
                }
                entry.watchers.push(Watch {
                    sub: sub.clone(),
                    relation: rel,
                });
                views[i] = Some(project(&entry.state(u), sub.context(rel)));
            }
            if missing.is_empty() {
                return Ok(views
                    .into_iter()
                    .map(|v| v.expect("every view filled"))
                    .collect());
            }
            let ids: Vec<UserId> = missing.iter().map(|&i| users[i]).collect();
            self.ensure_loaded(&ids).await?;
            pending = missing;
        }
        Err(EngineError::Store(StoreError::Corrupt {
            user: 0,
            what: "entries kept being evicted while attaching a watcher".into(),
        }))
    }

    /// Registers `sub` as a follower of `user` and, for a device, counts one more device and
    /// makes the device a watcher of its own user. Returns the user's own view, or None when
    /// the entry is not in memory.
    fn attach_follower(
        &self,
        sub: &Arc<Subscriber>,
        user: UserId,
        contacts: &Arc<HashSet<UserId>>,
        device: bool,
    ) -> Result<Option<PresenceView>> {
        // In cluster mode the device's own change comes back from Redis after this returns; the
        // device starts watching itself only then (see `follow`).
        let own_watch_now = device && !self.is_cluster();
        if device {
            let limit = self.shared.config.max_devices;
            let (mut found, mut over, mut first) = (false, false, false);
            self.mutate(user, now_millis(), |e| {
                found = true;
                over = e.devices >= limit;
                if !over {
                    first = e.devices == 0;
                    e.devices += 1;
                    e.pending_offline = None;
                }
            });
            if !found {
                return Ok(None);
            }
            if over {
                return Err(EngineError::TooManyDevices { user, limit });
            }
            let c = &self.shared.counters;
            c.connections.fetch_add(1, Ordering::Relaxed);
            if first {
                c.online_users.fetch_add(1, Ordering::Relaxed);
            }
        }
        let mut shard = self.shard(user);
        // An entry with a live device is never evicted, so None is only seen before a device
        // was counted.
        let Some(entry) = shard.users.get_mut(&user) else {
            return Ok(None);
        };
        if !sub.track(user) {
            return Err(EngineError::Closed);
        }
        sub.set_own_last_seen(entry.privacy.last_seen);
        entry.followers.push(sub.clone());
        entry.viewers.push(sub.clone());
        if entry.contacts.is_none() {
            entry.contacts = Some(contacts.clone());
        }
        if own_watch_now {
            // Added after the change, so the device learns its own state once, from the welcome.
            entry.watchers.push(Watch {
                sub: sub.clone(),
                relation: Relation::Own,
            });
        }
        Ok(Some(project(&entry.state(user), ViewerContext::OWN)))
    }

    /// Registers `sub` as looking through `me`'s eyes, so it follows `me`'s own privacy.
    async fn attach_viewer(&self, sub: &Arc<Subscriber>, me: UserId) -> Result<()> {
        for _ in 0..4 {
            {
                let mut shard = self.shard(me);
                if let Some(entry) = shard.users.get_mut(&me) {
                    if !sub.track(me) {
                        return Err(EngineError::Closed);
                    }
                    sub.set_own_last_seen(entry.privacy.last_seen);
                    entry.viewers.push(sub.clone());
                    return Ok(());
                }
            }
            self.ensure_loaded(&[me]).await?;
        }
        Err(EngineError::Closed)
    }

    /// The id a device's welcome names its connection by, unique across runs and nodes.
    pub fn connection_id(&self, sub: &Subscriber) -> String {
        format!("{}-{}", self.shared.instance, sub.id())
    }

    /// Connects a device of `user`: the user is online from now until the returned stream is
    /// dropped.
    pub async fn connect_device(&self, user: UserId) -> Result<DeviceSession> {
        let _permit = self.admit()?;
        let (sub, self_view, contacts) = self.follow(user, true).await?;
        let engine = self.clone();
        let stream_sub = sub.clone();
        let stream = EventStream::new(
            sub.clone(),
            Box::new(move || engine.disconnect_device(&stream_sub, user)),
        );
        let mut ids: Vec<UserId> = contacts.iter().copied().filter(|c| *c != user).collect();
        ids.sort_unstable();
        let contacts = self.attach(&sub, &ids, |_| Relation::Contact).await?;
        Ok(DeviceSession {
            welcome: Welcome {
                connection_id: self.connection_id(&sub),
                self_view,
                contacts,
            },
            stream,
        })
    }

    /// Creates a following subscriber of `user` (a device, or a contacts watcher).
    async fn follow(
        &self,
        user: UserId,
        device: bool,
    ) -> Result<(Arc<Subscriber>, PresenceView, Arc<HashSet<UserId>>)> {
        if self.is_shutting_down() {
            return Err(EngineError::ShuttingDown);
        }
        let contacts = self.contacts(user).await?;
        let sub = self.new_subscriber();
        for _ in 0..4 {
            match self.attach_follower(&sub, user, &contacts, device) {
                Ok(Some(view)) if device && self.is_cluster() => {
                    let _ = view;
                    if !self.shared_transition(user, cluster::Op::Connect).await {
                        self.fall_back_local(user);
                    }
                    let mut shard = self.shard(user);
                    let Some(entry) = shard.users.get_mut(&user) else {
                        unreachable!("an entry with a live device is never evicted")
                    };
                    entry.watchers.push(Watch {
                        sub: sub.clone(),
                        relation: Relation::Own,
                    });
                    let view = project(&entry.state(user), ViewerContext::OWN);
                    return Ok((sub, view, contacts));
                }
                Ok(Some(view)) => return Ok((sub, view, contacts)),
                Ok(None) => self.ensure_loaded(&[user]).await?,
                Err(e) => {
                    self.forget_subscriber(&sub);
                    return Err(e);
                }
            }
        }
        self.forget_subscriber(&sub);
        Err(EngineError::Closed)
    }

    /// A permit to set up one stream, or Busy when too many are being set up.
    fn admit(&self) -> Result<tokio::sync::OwnedSemaphorePermit> {
        self.shared
            .setups
            .clone()
            .try_acquire_owned()
            .map_err(|_| EngineError::Busy)
    }

    fn forget_subscriber(&self, sub: &Arc<Subscriber>) {
        for u in sub.close() {
            let mut shard = self.shard(u);
            if let Some(e) = shard.users.get_mut(&u) {
                e.detach(sub);
                if e.is_idle() {
                    shard.idle.push(u);
                }
            }
        }
        self.shared
            .subscribers
            .lock()
            .expect("subscribers lock poisoned")
            .remove(&sub.id());
    }

    fn disconnect_device(&self, sub: &Arc<Subscriber>, user: UserId) {
        // Remove the device from the user first: that is the change contacts see.
        self.forget_subscriber(sub);
        self.shared
            .counters
            .connections
            .fetch_sub(1, Ordering::Relaxed);
        let grace = self.shared.config.offline_grace;
        let use_grace = !grace.is_zero() && !self.is_shutting_down();
        let token = self.shared.next_grace_token.fetch_add(1, Ordering::Relaxed);
        let now = now_millis();
        let mut last = false;
        self.mutate(user, now, |e| {
            e.devices = e.devices.saturating_sub(1);
            last = e.devices == 0;
            if last && use_grace {
                e.pending_offline = Some(PendingOffline { since: now, token });
            }
        });
        if last {
            // Its last device gone, the entry may be idle once written: let the flusher see it.
            self.shard(user).idle.push(user);
            self.shared
                .counters
                .online_users
                .fetch_sub(1, Ordering::Relaxed);
            if use_grace {
                self.schedule_grace_expiry(user, token, grace);
            }
        }
        if self.is_cluster()
            && let Ok(rt) = tokio::runtime::Handle::try_current()
        {
            let engine = self.clone();
            let grace_token = (last && use_grace).then_some(token);
            rt.spawn(async move {
                let op = cluster::Op::Disconnect { grace_token };
                if !engine.shared_transition(user, op).await {
                    engine.fall_back_local(user);
                }
            });
        }
    }

    fn schedule_grace_expiry(&self, user: UserId, token: u64, grace: Duration) {
        let engine = self.clone();
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                rt.spawn(async move {
                    tokio::time::sleep(grace).await;
                    engine.expire_grace(user, Some(token));
                    if engine.is_cluster() {
                        let op = cluster::Op::Expire { grace_token: token };
                        if !engine.shared_transition(user, op).await {
                            engine.fall_back_local(user);
                        }
                    }
                });
            }
            Err(_) => engine.expire_grace(user, Some(token)),
        }
    }

    /// Ends a user's grace: offline with last_seen = when the last device left. With `None`,
    /// ends whatever grace is pending (shutdown).
    fn expire_grace(&self, user: UserId, token: Option<u64>) {
        let since = {
            let shard = self.shard(user);
            match shard.users.get(&user).and_then(|e| e.pending_offline) {
                Some(p) if token.is_none_or(|t| t == p.token) => p.since,
                _ => return,
            }
        };
        self.mutate(user, since, |e| {
            if e.pending_offline
                .is_some_and(|p| token.is_none_or(|t| t == p.token))
            {
                e.pending_offline = None;
            }
        });
        let mut shard = self.shard(user);
        if shard.users.get(&user).is_some_and(Entry::is_idle) {
            shard.idle.push(user);
        }
    }

    /// Ends the stream of a subscriber (token expiry).
    pub fn end_subscriber(&self, sub: &Subscriber, reason: EndReason) {
        sub.end(reason);
    }

    /// Sets the user's chosen status and returns the user's own view.
    pub async fn update_status(&self, user: UserId, status: Status) -> Result<PresenceView> {
        self.ensure_loaded(&[user]).await?;
        if self.is_cluster()
            && self
                .shared_transition(user, cluster::Op::Status(status))
                .await
            && let Some(v) = self.own_view(user)
        {
            return Ok(v);
        }
        for _ in 0..4 {
            if self.mutate(user, now_millis(), |e| {
                e.chosen = status;
                e.cluster_view = None;
            }) && let Some(v) = self.own_view(user)
            {
                return Ok(v);
            }
            self.ensure_loaded(&[user]).await?;
        }
        Err(EngineError::Closed)
    }

    fn own_view(&self, user: UserId) -> Option<PresenceView> {
        let shard = self.shard(user);
        shard
            .users
            .get(&user)
            .map(|e| project(&e.state(user), ViewerContext::OWN))
    }

    /// The user's privacy settings.
    pub async fn privacy(&self, user: UserId) -> Result<Privacy> {
        if let Some(e) = self.shard(user).users.get(&user) {
            return Ok(e.privacy);
        }
        let rows = self.shared.store.load_presence(&[user]).await?;
        Ok(rows.first().map(|r| r.privacy).unwrap_or_default())
    }

    /// Changes the user's privacy settings; every watcher that gains or loses access is told at
    /// once.
    pub async fn set_privacy(&self, user: UserId, privacy: Privacy) -> Result<Privacy> {
        self.ensure_loaded(&[user]).await?;
        if self.is_cluster()
            && self
                .shared_transition(user, cluster::Op::Privacy(privacy))
                .await
        {
            return Ok(privacy);
        }
        for _ in 0..4 {
            self.ensure_loaded(&[user]).await?;
            if self.mutate(user, now_millis(), |e| {
                e.privacy = privacy;
                e.cluster_view = None;
            }) {
                let shard = self.shard(user);
                if let Some(e) = shard.users.get(&user) {
                    for v in &e.viewers {
                        v.set_own_last_seen(privacy.last_seen);
                    }
                }
                return Ok(privacy);
            }
        }
        Err(EngineError::Closed)
    }

    /// Presence of each distinct user, in request order, as `viewer` may see it. Users in memory
    /// are answered from memory; the rest with one store query.
    pub async fn get_presence(
        &self,
        viewer: Viewer,
        users: &[UserId],
    ) -> Result<Vec<PresenceView>> {
        let mut seen = HashSet::with_capacity(users.len());
        let ids: Vec<UserId> = users.iter().copied().filter(|u| seen.insert(*u)).collect();
        let ctx = self.viewer_contexts(viewer).await?;
        let mut out: Vec<Option<PresenceView>> = Vec::with_capacity(ids.len());
        let mut missing = Vec::new();
        for (i, &u) in ids.iter().enumerate() {
            let shard = self.shard(u);
            match shard.users.get(&u) {
                Some(e) => out.push(Some(project(&e.state(u), ctx.for_user(u)))),
                None => {
                    out.push(None);
                    missing.push(i);
                }
            }
        }
        if !missing.is_empty() {
            let want: Vec<UserId> = missing.iter().map(|&i| ids[i]).collect();
            let (shared, from_store) = self.load_shared(&want).await;
            let shared: HashMap<UserId, Entry> = shared
                .iter()
                .map(|s| (s.user, Self::entry_from_shared(s)))
                .collect();
            let rows = if from_store.is_empty() {
                Arc::default()
            } else {
                self.shared.reads.presence(&from_store).await?
            };
            for i in missing {
                let u = ids[i];
                let state = match shared.get(&u) {
                    Some(e) => e.state(u),
                    None => {
                        let row = rows.get(&u).copied().unwrap_or_else(|| PresenceRow::new(u));
                        Entry::from_row(&row, self.shared.epoch).state(u)
                    }
                };
                out[i] = Some(project(&state, ctx.for_user(u)));
            }
        }
        Ok(out
            .into_iter()
            .map(|v| v.expect("every view filled"))
            .collect())
    }

    /// How `viewer` relates to anyone: its contacts and own last_seen setting.
    async fn viewer_contexts(&self, viewer: Viewer) -> Result<ViewerContexts> {
        match viewer {
            Viewer::Service => Ok(ViewerContexts::Service),
            Viewer::User(me) => {
                let contacts = self.contacts(me).await?;
                let own_last_seen = self.privacy(me).await?.last_seen;
                Ok(ViewerContexts::User {
                    me,
                    contacts,
                    own_last_seen,
                })
            }
        }
    }

    /// Opens a watch: of the viewer's contacts when `users` is empty (following later contact
    /// changes), else of the listed users. Returns the stream and the snapshot. The watcher is
    /// not counted online.
    pub async fn watch(
        &self,
        viewer: Viewer,
        users: &[UserId],
    ) -> Result<(EventStream, Vec<PresenceView>)> {
        if self.is_shutting_down() {
            return Err(EngineError::ShuttingDown);
        }
        let _permit = self.admit()?;
        let mut seen = HashSet::new();
        let mut ids: Vec<UserId> = users.iter().copied().filter(|u| seen.insert(*u)).collect();
        let (sub, ctx) = match (viewer, ids.is_empty()) {
            (Viewer::User(me), true) => {
                let (sub, _, contacts) = self.follow(me, false).await?;
                ids = contacts.iter().copied().filter(|c| *c != me).collect();
                ids.sort_unstable();
                (sub, ViewerContexts::contacts_only())
            }
            _ => {
                let ctx = self.viewer_contexts(viewer).await?;
                let sub = self.new_subscriber();
                if let Viewer::User(me) = viewer
                    && let Err(e) = self.attach_viewer(&sub, me).await
                {
                    self.forget_subscriber(&sub);
                    return Err(e);
                }
                (sub, ctx)
            }
        };
        self.shared
            .counters
            .watchers
            .fetch_add(1, Ordering::Relaxed);
        let engine = self.clone();
        let stream_sub = sub.clone();
        let stream = EventStream::new(
            sub.clone(),
            Box::new(move || {
                engine.forget_subscriber(&stream_sub);
                engine
                    .shared
                    .counters
                    .watchers
                    .fetch_sub(1, Ordering::Relaxed);
            }),
        );
        let views = self.attach(&sub, &ids, |u| ctx.relation(u)).await?;
        Ok((stream, views))
    }

    /// Adds symmetric contact pairs; live streams of both users start receiving each other's
    /// changes at once, beginning with the other's current presence.
    pub async fn add_contacts(&self, pairs: &[(UserId, UserId)]) -> Result<()> {
        for chunk in pairs.chunks(crate::store::MAX_ROWS_PER_STATEMENT) {
            self.shared.store.add_contacts(chunk).await?;
        }
        for &(a, b) in pairs {
            self.link(a, b).await?;
            self.link(b, a).await?;
        }
        self.publish_contacts(true, pairs).await;
        Ok(())
    }

    async fn link(&self, user: UserId, contact: UserId) -> Result<()> {
        let followers = {
            let mut shard = self.shard(user);
            let Some(e) = shard.users.get_mut(&user) else {
                return Ok(());
            };
            let Some(contacts) = e.contacts.as_mut() else {
                return Ok(());
            };
            if !Arc::make_mut(contacts).insert(contact) {
                return Ok(());
            }
            e.followers.clone()
        };
        for f in followers {
            // A follower that closed meanwhile is skipped; attach reports it as Closed.
            if let Ok(views) = self.attach(&f, &[contact], |_| Relation::Contact).await {
                for v in views {
                    f.push(Event::Presence(v));
                }
            }
        }
        Ok(())
    }

    /// Removes symmetric contact pairs; the two users' streams stop receiving each other's
    /// changes.
    pub async fn remove_contacts(&self, pairs: &[(UserId, UserId)]) -> Result<()> {
        for chunk in pairs.chunks(crate::store::MAX_ROWS_PER_STATEMENT) {
            self.shared.store.remove_contacts(chunk).await?;
        }
        for &(a, b) in pairs {
            self.unlink(a, b);
            self.unlink(b, a);
        }
        self.publish_contacts(false, pairs).await;
        Ok(())
    }

    /// Makes `contact` a stranger to `user`'s subscribers. Those that follow `user`'s contacts
    /// stop watching `contact`; watches of listed ids keep watching it as a stranger. Each one
    /// whose view of `contact` changes (a contacts-only status) is told at once, with a new
    /// version of `contact`, so its last picture is not a stale "online".
    fn unlink(&self, user: UserId, contact: UserId) {
        let (viewers, followers) = {
            let mut shard = self.shard(user);
            let Some(e) = shard.users.get_mut(&user) else {
                return;
            };
            if let Some(c) = e.contacts.as_mut() {
                Arc::make_mut(c).remove(&contact);
            }
            (e.viewers.clone(), e.followers.clone())
        };
        if viewers.is_empty() {
            return;
        }
        let is_in =
            |list: &[Arc<Subscriber>], s: &Arc<Subscriber>| list.iter().any(|f| Arc::ptr_eq(f, s));
        let mut guard = self.shard(contact);
        let shard = &mut *guard;
        let Some(entry) = shard.users.get_mut(&contact) else {
            return;
        };
        let state = entry.state(contact);
        let mut told = Vec::new();
        entry.watchers.retain_mut(|w| {
            if w.relation != Relation::Contact || !is_in(&viewers, &w.sub) {
                return true;
            }
            let old = project(&state, w.sub.context(Relation::Contact));
            let new = project(&state, w.sub.context(Relation::Stranger));
            if (old.status, old.last_seen) != (new.status, new.last_seen) {
                told.push((w.sub.clone(), new));
            }
            if is_in(&followers, &w.sub) {
                w.sub.untrack(contact);
                false
            } else {
                w.relation = Relation::Stranger;
                true
            }
        });
        if !told.is_empty() {
            entry.version += 1;
            for (sub, mut view) in told {
                view.version = entry.version;
                sub.push(Event::Presence(view));
            }
            self.mark_dirty_locked(shard, contact);
        }
        if shard.users.get(&contact).is_some_and(Entry::is_idle) {
            shard.idle.push(contact);
        }
    }

    /// First step of shutdown: refuse new streams, end every open one (their users go offline
    /// as their streams are dropped), and end every pending grace now.
    pub fn begin_shutdown(&self) {
        if self.shared.shutting_down.swap(true, Ordering::AcqRel) {
            return;
        }
        let subs: Vec<Arc<Subscriber>> = self
            .shared
            .subscribers
            .lock()
            .expect("subscribers lock poisoned")
            .values()
            .filter_map(Weak::upgrade)
            .collect();
        for s in subs {
            s.end(EndReason::Shutdown);
        }
        self.expire_all_grace();
    }

    fn expire_all_grace(&self) {
        for i in 0..self.shared.shards.len() {
            let pending: Vec<UserId> = {
                let shard = self.shared.shards[i].lock().expect("shard lock poisoned");
                shard
                    .users
                    .iter()
                    .filter(|(_, e)| e.pending_offline.is_some())
                    .map(|(u, _)| *u)
                    .collect()
            };
            for u in pending {
                self.expire_grace(u, None);
            }
        }
    }

    /// Last step of shutdown: devices whose streams are still open are taken offline, every
    /// change is flushed, and the clean stop is recorded. Call after the server stopped.
    pub async fn finish_shutdown(&self) {
        self.begin_shutdown();
        self.leave_cluster().await;
        let now = now_millis();
        for i in 0..self.shared.shards.len() {
            let online: Vec<UserId> = {
                let shard = self.shared.shards[i].lock().expect("shard lock poisoned");
                shard
                    .users
                    .iter()
                    .filter(|(_, e)| e.devices > 0)
                    .map(|(u, _)| *u)
                    .collect()
            };
            for u in online {
                self.mutate(u, now, |e| e.devices = 0);
            }
        }
        self.expire_all_grace();
        let _ = self.shared.stop_flusher.send(true);
        let handle = self
            .shared
            .flusher
            .lock()
            .expect("flusher lock poisoned")
            .take();
        if let Some(h) = handle
            && let Err(e) = h.await
        {
            tracing::error!(error = %e, "the write-behind flusher panicked");
        }
    }
}

/// How one viewer relates to the users it looks at.
enum ViewerContexts {
    Service,
    User {
        me: UserId,
        contacts: Arc<HashSet<UserId>>,
        own_last_seen: crate::domain::Visibility,
    },
    /// Everyone looked at is a contact (a contacts watch).
    ContactsOnly,
}

impl ViewerContexts {
    fn contacts_only() -> Self {
        ViewerContexts::ContactsOnly
    }

    fn relation(&self, user: UserId) -> Relation {
        match self {
            ViewerContexts::Service => Relation::Service,
            ViewerContexts::ContactsOnly => Relation::Contact,
            ViewerContexts::User { me, contacts, .. } => {
                if *me == user {
                    Relation::Own
                } else if contacts.contains(&user) {
                    Relation::Contact
                } else {
                    Relation::Stranger
                }
            }
        }
    }

    fn for_user(&self, user: UserId) -> ViewerContext {
        match (self, self.relation(user)) {
            (_, Relation::Own) => ViewerContext::OWN,
            (_, Relation::Service) => ViewerContext::SERVICE,
            (ViewerContexts::User { own_last_seen, .. }, relation) => ViewerContext {
                relation,
                own_last_seen: *own_last_seen,
            },
            (_, relation) => ViewerContext {
                relation,
                own_last_seen: crate::domain::Visibility::Everyone,
            },
        }
    }
}

/// Connects to Redis, retrying (and saying so) while it does not answer.
async fn connect_cluster(config: &cluster::ClusterConfig) -> cluster::Cluster {
    let mut delay = Duration::from_millis(250);
    loop {
        match cluster::Cluster::connect(config).await {
            Ok(c) => return c,
            Err(e) => {
                tracing::warn!(error = %e, retry_in = ?delay, "redis unavailable at start-up; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
        }
    }
}

//! The presence engine: the in-memory registry of users, devices and watchers; the fan-out of
//! every change to the receivers allowed to see it, as they may see it; and the write-behind of
//! rows to the store. It knows nothing of gRPC or SQL. What a change *is* is decided by the
//! status rules ([`crate::rules`]): here in memory on a single node, once for the whole cluster
//! through the backplane ([`crate::cluster`]) otherwise.
//!
//! State lives in shards, one `std::sync::Mutex` each, keyed by user id. A change of user X takes
//! X's shard lock, applies the change to X's entry, and pushes the projected update into each
//! watcher's queue while still holding the lock, so updates of X reach every receiver in version
//! order. Pushing never waits (see [`subscriber`]); no lock is ever held across `.await`, and no
//! code path holds two shard locks at once.
//!
//! The rooms: [`registry`] (shards, entries, loading, applying a change and its fan-out),
//! [`devices`] (devices connect, change activity, leave; passive devices' resync), [`watch`]
//! (WatchContacts and GetPresence), [`status`] (status, privacy, custom status), [`contacts`]
//! (the contact graph and the watches it implies), [`replica`] (cluster mode: the backplane's
//! results, its subscription, leases and reaping), [`lifecycle`] (this node's record in the
//! store and crash recovery), [`timers`] (graces and custom status expiries), [`flusher`]
//! (write-behind), [`shutdown`].
mod contact_list;
mod contacts;
mod devices;
mod flusher;
mod lifecycle;
mod pending;
mod reads;
mod registry;
mod replica;
mod shutdown;
mod status;
mod subscriber;
mod timers;
mod update;
pub mod view;
mod watch;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use tokio::sync::watch as signal;
use tokio::task::JoinHandle;

use crate::cluster::Backplane;
use crate::domain::{PresenceView, UserId};
use crate::rules::NodeId;
use crate::store::{Store, StoreError};

pub use devices::DeviceSession;
use registry::Shard;
pub use subscriber::{EndReason, Event, EventStream, RelayQueue, Subscriber};
pub use update::Update;

/// Versions loaded from a row written in an older store epoch are raised by this much per epoch,
/// so that after a crash (which loses unflushed increments) every version handed out is above
/// any the crashed node may have sent.
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
    /// Queue length at which a receiver's queue is compacted to the newest presence per user.
    pub queue_capacity: usize,
    /// The same for a relay stream's queue (all its sessions together).
    pub relay_queue_capacity: usize,
    /// Most live devices per user (on this node).
    pub max_devices: u32,
    /// Most open WatchContacts streams per user (on this node).
    pub max_watches: u32,
    /// Number of registry shards.
    pub shards: usize,
    /// Most streams being set up at once (each may read the store); more are refused with a
    /// retry hint instead of queueing without bound, so a mass reconnect is paced.
    pub max_pending_setups: usize,
    /// Most of those set-ups one user may hold, so one user cannot take every slot.
    pub max_pending_setups_per_user: u32,
    /// Deliveries are released to the network in batches this often (zero: at once); see
    /// [`subscriber::WakeBatcher`].
    pub delivery_batch: Duration,
    /// A node silent this long is dead: its devices are dropped (cluster) and its rows
    /// recovered (store).
    pub node_ttl: Duration,
    /// Users per batch when a dead node's devices are dropped (one pipelined round trip each).
    pub reap_batch: usize,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            offline_grace: Duration::from_millis(5000),
            flush_interval: Duration::from_millis(1000),
            checkpoint_interval: Duration::from_secs(30),
            queue_capacity: 1024,
            relay_queue_capacity: 65_536,
            max_devices: 10,
            max_watches: 10,
            shards: 64,
            max_pending_setups: 512,
            max_pending_setups_per_user: 16,
            delivery_batch: Duration::from_micros(5000),
            node_ttl: Duration::from_secs(10),
            reap_batch: 500,
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
    #[error("user {user} already has {limit} open watches (the limit)")]
    TooManyWatches { user: UserId, limit: u32 },
    #[error("the server is shutting down")]
    ShuttingDown,
    #[error("the stream was closed before it was set up")]
    Closed,
    #[error("too many streams are being set up right now")]
    Busy,
    #[error("user {user} has {limit} streams being set up already")]
    UserBusy { user: UserId, limit: u32 },
    /// The user's entry kept being evicted while loaded (a store answering with stale rows).
    #[error("user {0} could not be loaded: it kept being evicted meanwhile")]
    Unstable(UserId),
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
    pub passive_skipped: u64,
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
    passive_skipped: AtomicU64,
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

/// A cheap-to-clone handle on the engine.
#[derive(Clone)]
pub struct Engine {
    shared: Arc<Shared>,
}

struct Shared {
    shards: Box<[Mutex<Shard>]>,
    store: Arc<dyn Store>,
    config: EngineConfig,
    /// This node's id: in the store's node records, in the backplane, in connection ids.
    node: NodeId,
    /// The store epoch this node writes rows with and raises loaded versions to (refreshed by
    /// heartbeats, so a crash recovered by another node is seen).
    epoch: AtomicU64,
    next_subscriber: AtomicU64,
    /// Names graces, so an expiry of an older one does nothing.
    next_grace_token: AtomicU64,
    /// Orders this node's device reports: the backplane ignores one older than the last.
    next_report: AtomicU64,
    /// Every open subscriber, so shutdown can end them all.
    subscribers: Mutex<HashMap<u64, Weak<Subscriber>>>,
    /// Every relay stream's queue, so shutdown can end those streams too.
    relay_queues: Mutex<Vec<Weak<RelayQueue>>>,
    shutting_down: AtomicBool,
    /// False while the last write to the store failed: health reports the degradation.
    store_ok: AtomicBool,
    counters: Counters,
    /// Tells the flusher and the background tasks to stop (the flusher after a final flush).
    stop: signal::Sender<bool>,
    /// Permits for streams being set up; see [`EngineConfig::max_pending_setups`].
    setups: Arc<tokio::sync::Semaphore>,
    /// Set-ups in progress per user; see [`EngineConfig::max_pending_setups_per_user`].
    setups_per_user: Mutex<HashMap<UserId, u32>>,
    flusher: Mutex<Option<JoinHandle<()>>>,
    /// Set in cluster mode.
    backplane: Option<Arc<dyn Backplane>>,
    /// Set when deliveries are batched.
    batcher: Option<Arc<subscriber::WakeBatcher>>,
    /// Loads of rows and contact lists, merged while a query runs.
    reads: reads::Reads,
    timers: timers::Timers,
    /// Rows to write for users not in memory (a dead node's users, reaped here).
    loose_rows: Mutex<HashMap<UserId, crate::store::PresenceRow>>,
}

impl Engine {
    /// Starts the engine on a migrated store: registers this node, recovers crashed nodes'
    /// rows (all of them on a single node, before serving; those whose heartbeat stopped, in a
    /// cluster), and spawns the write-behind flusher and, in cluster mode, the backplane tasks.
    pub async fn start(
        store: Arc<dyn Store>,
        config: EngineConfig,
        node: NodeId,
        backplane: Option<Arc<dyn Backplane>>,
    ) -> Result<Engine> {
        let epoch = store
            .register_node(&node, crate::domain::now_millis())
            .await?;
        let setups = config.max_pending_setups.max(1);
        let shards = (0..config.shards.max(1))
            .map(|_| Mutex::new(Shard::default()))
            .collect();
        let (stop, stop_rx) = signal::channel(false);
        let batcher = (!config.delivery_batch.is_zero())
            .then(|| subscriber::WakeBatcher::start(config.delivery_batch));
        let reads = reads::Reads::start(store.clone());
        let engine = Engine {
            shared: Arc::new(Shared {
                shards,
                store,
                config,
                node,
                epoch: AtomicU64::new(epoch),
                next_subscriber: AtomicU64::new(1),
                next_grace_token: AtomicU64::new(1),
                next_report: AtomicU64::new(1),
                subscribers: Mutex::new(HashMap::new()),
                relay_queues: Mutex::new(Vec::new()),
                shutting_down: AtomicBool::new(false),
                store_ok: AtomicBool::new(true),
                counters: Counters::default(),
                stop,
                setups: Arc::new(tokio::sync::Semaphore::new(setups)),
                setups_per_user: Mutex::new(HashMap::new()),
                flusher: Mutex::new(None),
                backplane,
                batcher,
                reads,
                timers: timers::Timers::default(),
                loose_rows: Mutex::new(HashMap::new()),
            }),
        };
        if !engine.is_cluster() {
            // A single node is the only one: any node record still open is a crash.
            engine.recover_crashed_nodes(true).await?;
        }
        let handle = tokio::spawn(flusher::run(engine.clone(), stop_rx.clone()));
        *engine.shared.flusher.lock().expect("flusher lock poisoned") = Some(handle);
        tokio::spawn(engine.clone().run_timers(stop_rx.clone()));
        tokio::spawn(engine.clone().run_heartbeat(stop_rx.clone()));
        tokio::spawn(engine.clone().run_custom_sweep(stop_rx.clone()));
        if engine.is_cluster() {
            tracing::info!(node = %engine.shared.node, "cluster mode: presence is shared through the backplane");
            tokio::spawn(engine.clone().run_lease(stop_rx.clone()));
            tokio::spawn(engine.clone().run_subscription(stop_rx));
        }
        Ok(engine)
    }

    pub fn config(&self) -> &EngineConfig {
        &self.shared.config
    }

    /// This node's id.
    pub fn node(&self) -> &NodeId {
        &self.shared.node
    }

    fn is_shutting_down(&self) -> bool {
        self.shared.shutting_down.load(Ordering::Acquire)
    }

    /// Whether the last write to the store succeeded. While it is false, presence is served
    /// from memory and unwritten rows wait, coalesced, for the store to come back.
    pub fn store_ok(&self) -> bool {
        self.shared.store_ok.load(Ordering::Relaxed)
    }

    /// Whether this node runs in cluster mode.
    pub fn is_cluster(&self) -> bool {
        self.shared.backplane.is_some()
    }

    /// Whether the backplane answers (always true on a single node).
    pub fn cluster_ok(&self) -> bool {
        self.shared.backplane.as_ref().is_none_or(|b| b.is_up())
    }

    pub fn stats(&self) -> Stats {
        let c = &self.shared.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        Stats {
            online_users: get(&c.online_users),
            connections: get(&c.connections),
            watchers: get(&c.watchers),
            changes: get(&c.changes),
            deliveries: get(&c.deliveries),
            coalesced: get(&c.coalesced),
            passive_skipped: get(&c.passive_skipped),
            db_statements: get(&c.db_statements),
            db_rows: get(&c.db_rows),
            db_errors: get(&c.db_errors),
            dirty_users: get(&c.dirty_users),
        }
    }

    /// A new relay stream's shared queue (ended at once when the server is shutting down).
    pub fn relay_queue(&self) -> Arc<RelayQueue> {
        let queue = RelayQueue::new(
            self.shared.config.relay_queue_capacity,
            self.shared.batcher.clone(),
        );
        let mut all = self
            .shared
            .relay_queues
            .lock()
            .expect("relay queues lock poisoned");
        all.retain(|q| q.strong_count() > 0);
        all.push(Arc::downgrade(&queue));
        drop(all);
        if self.is_shutting_down() {
            queue.close_for_shutdown();
        }
        queue
    }

    /// The id a device's welcome names its connection by, unique across runs and nodes.
    pub fn connection_id(&self, sub: &Subscriber) -> String {
        let node = &self.shared.node;
        format!("{}-{}", &node[..node.len().min(8)], sub.id())
    }

    /// A permit to set up one stream of `user`, or Busy when too many are being set up (by
    /// everyone, or by this user). Dropping it gives the slot back.
    fn admit(&self, user: Option<UserId>) -> Result<SetupPermit> {
        let global = self
            .shared
            .setups
            .clone()
            .try_acquire_owned()
            .map_err(|_| EngineError::Busy)?;
        if let Some(user) = user {
            let limit = self.shared.config.max_pending_setups_per_user.max(1);
            let mut per_user = self
                .shared
                .setups_per_user
                .lock()
                .expect("setups lock poisoned");
            let n = per_user.entry(user).or_default();
            if *n >= limit {
                return Err(EngineError::UserBusy { user, limit });
            }
            *n += 1;
        }
        Ok(SetupPermit {
            engine: self.clone(),
            user,
            _global: global,
        })
    }
}

/// A stream being set up; see [`Engine::admit`].
struct SetupPermit {
    engine: Engine,
    user: Option<UserId>,
    _global: tokio::sync::OwnedSemaphorePermit,
}

impl Drop for SetupPermit {
    fn drop(&mut self) {
        if let Some(user) = self.user {
            let mut per_user = self
                .engine
                .shared
                .setups_per_user
                .lock()
                .expect("setups lock poisoned");
            if let Some(n) = per_user.get_mut(&user) {
                *n -= 1;
                if *n == 0 {
                    per_user.remove(&user);
                }
            }
        }
    }
}

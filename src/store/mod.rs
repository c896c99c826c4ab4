//! The presence store: where chosen statuses, last_seen, versions, privacy settings, custom
//! statuses, the contact graph and the nodes' lifecycle live between restarts. One trait, one
//! SQL implementation ([`sql`]) generic over the database, and a small dialect per backend
//! (SQLite embedded by default, MySQL/MariaDB in production). All SQL lives in this room; its
//! errors leave it without any database type in them.
//!
//! The engine never waits on the store on its delivery path: it reads rows when a user is first
//! needed and writes them back in batches from its write-behind flusher.
use std::sync::Arc;

use async_trait::async_trait;

use crate::domain::{CustomStatus, Millis, Privacy, Status, UserId};

mod mysql;
mod sql;
mod sqlite;

pub use mysql::MySqlStore;
pub use sqlite::SqliteStore;

/// Most rows in one multi-row statement.
pub const MAX_ROWS_PER_STATEMENT: usize = 500;

/// Everything the store can fail with. The cause is kept as text for the logs; clients never
/// see it.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// A statement failed. `transient`: retrying may succeed (lost connection, deadlock, busy).
    #[error("database error: {message}")]
    Database { message: String, transient: bool },
    #[error("migration failed: {0}")]
    Migrate(String),
    #[error("unsupported DATABASE_URL {0:?}: expected sqlite://… or mysql://…")]
    UnsupportedUrl(String),
    #[error("corrupt row for user {user}: {what}")]
    Corrupt { user: u64, what: String },
}

impl StoreError {
    /// The database did not answer (for wrappers and tests that simulate an outage).
    pub fn unavailable(message: impl Into<String>) -> StoreError {
        StoreError::Database {
            message: message.into(),
            transient: true,
        }
    }

    /// Whether retrying the same statement may succeed (deadlock, lock wait timeout, busy
    /// database, lost connection). Constraint violations, bad SQL and corrupt rows are not.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            StoreError::Database {
                transient: true,
                ..
            }
        )
    }
}

pub type Result<T> = std::result::Result<T, StoreError>;

/// One user's persisted presence row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PresenceRow {
    pub user_id: UserId,
    /// The status the user chose; survives reconnects and restarts.
    pub chosen: Status,
    /// Whether the user was visibly online when the row was written (the seed's `is_online`).
    pub is_online: bool,
    /// When the user last became visibly online or offline.
    pub last_seen: Option<Millis>,
    /// Grows with every change of the user's presence.
    pub version: u64,
    /// Grows with every offline transition: the numbering of viewers who may see last_seen only.
    pub offline_version: u64,
    /// The store epoch `version` counts in; see [`Store::bump_epoch`].
    pub epoch: u64,
    pub privacy: Privacy,
    /// "Still online at": refreshed for online users every checkpoint interval, so that a crash
    /// leaves an honest last_seen behind.
    pub checkpoint_at: Option<Millis>,
    pub custom: Option<Arc<CustomStatus>>,
}

impl PresenceRow {
    /// The row of a user the store has never seen.
    pub fn new(user_id: UserId) -> Self {
        PresenceRow {
            user_id,
            chosen: Status::Online,
            is_online: false,
            last_seen: None,
            version: 0,
            offline_version: 0,
            epoch: 0,
            privacy: Privacy::default(),
            checkpoint_at: None,
            custom: None,
        }
    }
}

/// One node's lifecycle record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeRecord {
    pub node: String,
    pub heartbeat_ms: Millis,
    /// Set at a clean stop.
    pub stopped_ms: Option<Millis>,
    /// The node recovering it after a crash (it may itself have died meanwhile).
    pub recovered_by: Option<String>,
}

#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Creates or upgrades the schema. Idempotent; processes starting together take turns.
    async fn migrate(&self) -> Result<()>;

    /// Records a node's start. Returns the current epoch.
    async fn register_node(&self, node: &str, now: Millis) -> Result<u64>;

    /// Records that a node is alive at `now` (re-registering it if its record is gone).
    /// Returns the current epoch.
    async fn heartbeat(&self, node: &str, now: Millis) -> Result<u64>;

    /// Records a node's clean stop: every change it made is written.
    async fn stop_node(&self, node: &str, now: Millis) -> Result<()>;

    /// Nodes neither stopped cleanly nor fully recovered (the live ones and the crashed ones).
    async fn open_nodes(&self) -> Result<Vec<NodeRecord>>;

    /// Claims the recovery of a crashed node for `claimer`: true for exactly one caller. A
    /// recovery claimed by a node that died itself can be taken over by naming it in
    /// `take_over`.
    async fn claim_recovery(
        &self,
        dead: &str,
        claimer: &str,
        take_over: Option<&str>,
    ) -> Result<bool>;

    /// Users whose rows a node left online, ascending, after `after`.
    async fn left_online_by(
        &self,
        node: &str,
        after: Option<UserId>,
        limit: u32,
    ) -> Result<Vec<UserId>>;

    /// Sets the given users' rows that `node` left online offline: last_seen = their last
    /// checkpoint if later, one version (and one offline version) up.
    async fn recover_rows(&self, node: &str, users: &[UserId]) -> Result<()>;

    /// Marks a crashed node's recovery finished.
    async fn finish_recovery(&self, dead: &str, now: Millis) -> Result<()>;

    /// Raises the epoch by one (after a crash, so versions loaded from rows written before it
    /// are raised above anything the crashed node may have sent) and returns it.
    async fn bump_epoch(&self) -> Result<u64>;

    /// Rows of the given users that exist, in any order. Missing users have no row.
    async fn load_presence(&self, users: &[UserId]) -> Result<Vec<PresenceRow>>;

    /// Idempotent multi-row upsert, written by `node`. A row never replaces a stored row with a
    /// higher version (an equal version does replace it), and last_seen and checkpoint_at never
    /// move backwards (nor to `None`).
    async fn upsert_presence_batch(&self, rows: &[PresenceRow], node: &str) -> Result<()>;

    /// Sets `checkpoint_at = at` on the rows of the given users (still online at `at`).
    async fn checkpoint_online(&self, users: &[UserId], at: Millis) -> Result<()>;

    /// Users with a custom status that expires at or before `before`, soonest first.
    async fn custom_expiring(&self, before: Millis, limit: u32) -> Result<Vec<(UserId, Millis)>>;

    /// All contacts of a user, ascending.
    async fn contacts_of(&self, user: UserId) -> Result<Vec<UserId>> {
        let pairs = self.contacts_of_many(&[user]).await?;
        Ok(pairs.into_iter().map(|(_, contact)| contact).collect())
    }

    /// The contacts of several users (any number, in any order), as (user, contact) pairs
    /// ascending.
    async fn contacts_of_many(&self, users: &[UserId]) -> Result<Vec<(UserId, UserId)>>;

    /// Adds symmetric pairs; already present pairs are left alone.
    async fn add_contacts(&self, pairs: &[(UserId, UserId)]) -> Result<()>;

    /// Removes symmetric pairs; absent pairs are ignored.
    async fn remove_contacts(&self, pairs: &[(UserId, UserId)]) -> Result<()>;

    /// Up to `limit` contacts of `user` with ids above `after`, ascending.
    async fn list_contacts(
        &self,
        user: UserId,
        after: Option<UserId>,
        limit: u32,
    ) -> Result<Vec<UserId>>;
}

/// Opens the backend named by the URL (`sqlite://path` or `mysql://…`), creating a SQLite file
/// when missing. Does not migrate.
pub async fn connect(url: &str) -> Result<Arc<dyn Store>> {
    if url.starts_with("sqlite:") {
        Ok(Arc::new(SqliteStore::connect(url).await?))
    } else if url.starts_with("mysql:") || url.starts_with("mariadb:") {
        Ok(Arc::new(MySqlStore::connect(url).await?))
    } else {
        Err(StoreError::UnsupportedUrl(url.to_string()))
    }
}

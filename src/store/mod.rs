//! The presence store: where chosen statuses, last_seen, versions, privacy settings and the
//! contact graph live between restarts. One trait, one module per backend (SQLite embedded by
//! default, MySQL/MariaDB in production). All SQL lives in the backend modules.
//!
//! The engine never waits on the store on its delivery path: it reads rows when a user is first
//! needed and writes them back in batches from its write-behind flusher.
use std::sync::Arc;

use async_trait::async_trait;

use crate::domain::{Millis, Privacy, Status, UserId, Visibility};

mod mysql;
mod sqlite;

pub use mysql::MySqlStore;
pub use sqlite::SqliteStore;

/// Most rows in one multi-row statement.
pub const MAX_ROWS_PER_STATEMENT: usize = 500;

/// Everything the store can fail with. The cause is kept for the logs; clients never see it.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    #[error("migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("unsupported DATABASE_URL {0:?}: expected sqlite://… or mysql://…")]
    UnsupportedUrl(String),
    #[error("corrupt row for user {user}: {what}")]
    Corrupt { user: u64, what: String },
}

impl StoreError {
    /// Whether retrying the same statement may succeed (deadlock, lock wait timeout, busy
    /// database, lost connection). Used by the flusher to decide how loudly to complain.
    /// Constraint violations, bad SQL and corrupt rows are not transient.
    pub fn is_transient(&self) -> bool {
        match self {
            StoreError::Database(err) => is_transient_sqlx(err),
            _ => false,
        }
    }
}

fn is_transient_sqlx(err: &sqlx::Error) -> bool {
    match err {
        sqlx::Error::Database(db) => {
            if let Some(my) = db.try_downcast_ref::<sqlx::mysql::MySqlDatabaseError>() {
                // 1205 lock wait timeout, 1213 deadlock, 1053 server shutting down,
                // 1927 connection killed (MariaDB), 4031 idle client disconnected (MySQL 8),
                // 2006/2013 server gone away / lost connection.
                matches!(my.number(), 1205 | 1213 | 1053 | 1927 | 4031 | 2006 | 2013)
            } else if db.try_downcast_ref::<sqlx::sqlite::SqliteError>().is_some() {
                // SQLite reports extended result codes; the low byte is the primary code:
                // SQLITE_BUSY (5, "database is locked") and SQLITE_LOCKED (6).
                db.code()
                    .and_then(|code| code.parse::<i32>().ok())
                    .is_some_and(|code| matches!(code & 0xff, 5 | 6))
            } else {
                false
            }
        }
        // The connection broke or the pool had none to give: a later attempt may get one.
        sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut | sqlx::Error::WorkerCrashed => true,
        _ => false,
    }
}

pub type Result<T> = std::result::Result<T, StoreError>;

/// One user's persisted presence row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PresenceRow {
    pub user_id: UserId,
    /// The status the user chose; survives reconnects and restarts.
    pub chosen: Status,
    /// Whether the user was visibly online when the row was written (the seed's `is_online`).
    pub is_online: bool,
    /// When the user last became visibly online or offline.
    pub last_seen: Option<Millis>,
    /// Grows with every change of the user's effective presence.
    pub version: u64,
    /// The store epoch in which `version` was written; see [`Store::begin_epoch`].
    pub epoch: u64,
    pub privacy: Privacy,
    /// "Still online at": refreshed for online users every checkpoint interval, so that a crash
    /// leaves an honest last_seen behind.
    pub checkpoint_at: Option<Millis>,
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
            epoch: 0,
            privacy: Privacy::default(),
            checkpoint_at: None,
        }
    }
}

/// The start of a run, as recorded by [`Store::begin_epoch`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Epoch {
    /// Grows by one at every start after an unclean stop.
    pub number: u64,
    /// Whether the previous run stopped without [`Store::mark_clean_shutdown`].
    pub previous_run_crashed: bool,
}

#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Creates or upgrades the schema. Idempotent.
    async fn migrate(&self) -> Result<()>;

    /// Starts a run: if the previous run did not mark a clean shutdown, the epoch number grows
    /// (so versions handed out now are above any the crashed run may have sent) and rows left
    /// online are set offline with last_seen = their last checkpoint (if later) and version + 1;
    /// their `epoch` column is left as it was (the epoch the version counts in), so that a
    /// loader can tell how far behind the crashed run's versions may be. Marks this run unclean
    /// until [`Store::mark_clean_shutdown`].
    async fn begin_epoch(&self) -> Result<Epoch>;

    /// Records that every change of this run has been flushed.
    async fn mark_clean_shutdown(&self) -> Result<()>;

    /// Rows of the given users that exist, in any order. Missing users have no row.
    async fn load_presence(&self, users: &[UserId]) -> Result<Vec<PresenceRow>>;

    /// Idempotent multi-row upsert of at most [`MAX_ROWS_PER_STATEMENT`] rows, sorted by user id.
    /// A row never replaces a stored row with a higher version (an equal version does replace
    /// it), and last_seen and checkpoint_at never move backwards (nor to `None`).
    async fn upsert_presence_batch(&self, rows: &[PresenceRow]) -> Result<()>;

    /// Sets `checkpoint_at = at` on the rows of the given users (still online at `at`).
    async fn checkpoint_online(&self, users: &[UserId], at: Millis) -> Result<()>;

    /// All contacts of a user, ascending.
    async fn contacts_of(&self, user: UserId) -> Result<Vec<UserId>> {
        let pairs = self.contacts_of_many(&[user]).await?;
        Ok(pairs.into_iter().map(|(_, contact)| contact).collect())
    }

    /// The contacts of several users (any number, in any order: read in statements of at most
    /// [`MAX_ROWS_PER_STATEMENT`] users), as (user, contact) pairs ascending.
    async fn contacts_of_many(&self, users: &[UserId]) -> Result<Vec<(UserId, UserId)>>;

    /// Whether `a` and `b` are contacts.
    async fn are_contacts(&self, a: UserId, b: UserId) -> Result<bool>;

    /// Adds symmetric pairs; already present pairs are left alone. At most
    /// [`MAX_ROWS_PER_STATEMENT`] pairs per call.
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

/// A `presence` row as both backends return it, before its strings are checked. One struct
/// serves both: SQLite decodes its INTEGER columns into `u64` as well (it only cannot encode one).
#[derive(sqlx::FromRow)]
struct StoredPresence {
    user_id: u64,
    status: String,
    is_online: bool,
    last_seen_ms: Option<i64>,
    version: u64,
    epoch: u64,
    online_visibility: String,
    last_seen_visibility: String,
    checkpoint_ms: Option<i64>,
}

/// The column list [`StoredPresence`] is read from, in both backends.
const PRESENCE_COLUMNS: &str = "user_id, status, is_online, last_seen_ms, version, epoch, \
     online_visibility, last_seen_visibility, checkpoint_ms";

impl StoredPresence {
    fn into_row(self) -> Result<PresenceRow> {
        let user = self.user_id;
        let corrupt = |what: String| StoreError::Corrupt { user, what };
        Ok(PresenceRow {
            user_id: UserId::parse(user).map_err(|e| corrupt(e.0))?,
            chosen: Status::parse_str(&self.status).map_err(|e| corrupt(e.0))?,
            is_online: self.is_online,
            last_seen: self.last_seen_ms,
            version: self.version,
            epoch: self.epoch,
            privacy: Privacy {
                online: Visibility::parse_str(&self.online_visibility)
                    .map_err(|e| corrupt(format!("online_visibility: {}", e.0)))?,
                last_seen: Visibility::parse_str(&self.last_seen_visibility)
                    .map_err(|e| corrupt(format!("last_seen_visibility: {}", e.0)))?,
            },
            checkpoint_at: self.checkpoint_ms,
        })
    }
}

/// The `contacts` rows for symmetric pairs: both directions, never `(a, a)`, without
/// duplicates, sorted by `(user_id, contact_id)` so that concurrent writers on MySQL take their
/// row locks in the same order.
fn contact_rows(pairs: &[(UserId, UserId)]) -> Vec<(UserId, UserId)> {
    let mut rows: Vec<(UserId, UserId)> = pairs
        .iter()
        .filter(|(a, b)| a != b)
        .flat_map(|&(a, b)| [(a, b), (b, a)])
        .collect();
    rows.sort_unstable();
    rows.dedup();
    rows
}

/// Stored contact ids of `user` as user ids; a zero is a corrupt row of `user`.
fn contact_ids(user: UserId, ids: Vec<u64>) -> Result<Vec<UserId>> {
    ids.into_iter()
        .map(|id| {
            UserId::parse(id).map_err(|e| StoreError::Corrupt {
                user: user.get(),
                what: format!("contact id: {}", e.0),
            })
        })
        .collect()
}

/// Contact rows as read, checked.
fn contact_pairs(rows: Vec<(u64, u64)>) -> Result<Vec<(UserId, UserId)>> {
    rows.into_iter()
        .map(|(user, contact)| {
            let corrupt = |what: String| StoreError::Corrupt { user, what };
            Ok((
                UserId::parse(user).map_err(|e| corrupt(format!("user id: {}", e.0)))?,
                UserId::parse(contact).map_err(|e| corrupt(format!("contact id: {}", e.0)))?,
            ))
        })
        .collect()
}

/// `rows` sorted by user id: borrowed when the caller already sorted them (the contract),
/// sorted into a copy otherwise, so that lock order on MySQL stays stable either way.
fn sorted_by_user(rows: &[PresenceRow]) -> std::borrow::Cow<'_, [PresenceRow]> {
    if rows.is_sorted_by_key(|row| row.user_id) {
        std::borrow::Cow::Borrowed(rows)
    } else {
        let mut owned = rows.to_vec();
        owned.sort_by_key(|row| row.user_id);
        std::borrow::Cow::Owned(owned)
    }
}

/// The names of the `presence_meta` rows.
const META_EPOCH: &str = "epoch";
const META_CLEAN_SHUTDOWN: &str = "clean_shutdown";

/// What [`Store::begin_epoch`] decides from the `presence_meta` rows it read (name, value). A
/// database without a clean-shutdown flag is fresh, and a fresh database did not crash.
fn next_epoch(meta: &[(String, i64)]) -> Result<Epoch> {
    let value = |name: &str| meta.iter().find(|(n, _)| n == name).map(|&(_, v)| v);
    let stored = value(META_EPOCH).unwrap_or(0);
    let stored = u64::try_from(stored).map_err(|_| {
        sqlx::Error::Decode(format!("presence_meta.{META_EPOCH} is negative: {stored}").into())
    })?;
    let crashed = value(META_CLEAN_SHUTDOWN) == Some(0);
    Ok(Epoch {
        number: if crashed { stored + 1 } else { stored },
        previous_run_crashed: crashed,
    })
}

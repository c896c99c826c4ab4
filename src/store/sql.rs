//! The one SQL implementation of [`Store`], generic over the database: every statement is
//! written once, here. A [`Dialect`] supplies what really differs between SQLite and MySQL
//! (the upsert clause, the larger-of-two function, binding a value, running a statement,
//! which errors are worth retrying, migrations).
//!
//! Values are bound as `i64` everywhere (SQLite has no unsigned integer; MySQL converts into its
//! unsigned columns) and decoded as `u64` (both backends decode their integers into it): ids are
//! at most `i64::MAX` by construction ([`crate::domain::MAX_USER_ID`]).
use std::marker::PhantomData;
use std::sync::Arc;

use async_trait::async_trait;
use sqlx::{Database, FromRow, Pool, QueryBuilder};

use super::{MAX_ROWS_PER_STATEMENT, NodeRecord, PresenceRow, Result, Store, StoreError};
use crate::domain::{CustomStatus, Millis, Privacy, Status, UserId, Visibility};

/// A value to bind.
pub enum Arg<'a> {
    Int(i64),
    OptInt(Option<i64>),
    Text(&'a str),
    OptText(Option<&'a str>),
    Bool(bool),
}

/// What differs between the backends.
#[async_trait]
pub trait Dialect: Send + Sync + 'static {
    type DB: Database;
    /// The larger of two non-null values (`max` / `GREATEST`; NULL when either is).
    const MAX: &'static str;
    /// `INSERT` that skips rows whose key exists.
    const INSERT_IGNORE: &'static str;
    /// What follows the VALUES list of a presence upsert: a stored row with a higher version
    /// wins entirely; timestamps only move forwards.
    const UPSERT_PRESENCE: &'static str;
    /// Appended to the SET list of UPDATEs of `presence` (SQLite has no ON UPDATE clause).
    const TOUCH: &'static str;
    /// An aggregate joining a user's contact ids into one text (one row per user instead of
    /// one per pair), when the backend can do it without a length limit.
    const CONTACT_LIST: Option<&'static str>;

    fn bind(q: &mut QueryBuilder<Self::DB>, arg: Arg<'_>);

    /// Runs a statement; returns the rows it affected.
    async fn execute(pool: &Pool<Self::DB>, q: &mut QueryBuilder<Self::DB>) -> sqlx::Result<u64>;

    async fn fetch<T>(
        pool: &Pool<Self::DB>,
        q: &mut QueryBuilder<Self::DB>,
    ) -> sqlx::Result<Vec<T>>
    where
        T: for<'r> FromRow<'r, <Self::DB as Database>::Row> + Send + Unpin;

    /// Whether retrying may succeed (deadlock, busy, lost connection).
    fn is_transient(e: &sqlx::Error) -> bool;

    async fn migrate(pool: &Pool<Self::DB>) -> Result<()>;
}

/// A store on one database pool.
pub struct SqlStore<D: Dialect> {
    /// Cheap to clone; every method takes its connection from here.
    pub(super) pool: Pool<D::DB>,
    dialect: PhantomData<D>,
}

impl<D: Dialect> SqlStore<D> {
    pub(super) fn new(pool: Pool<D::DB>) -> Self {
        SqlStore {
            pool,
            dialect: PhantomData,
        }
    }

    /// A database error as this backend's store reports it (whether it is worth retrying is
    /// the backend's call).
    pub fn map_error(e: sqlx::Error) -> StoreError {
        db_error::<D>(e)
    }
}

impl<D: Dialect> SqlStore<D>
where
    for<'r> i64: sqlx::Decode<'r, D::DB> + sqlx::Type<D::DB>,
    for<'r> u64: sqlx::Decode<'r, D::DB> + sqlx::Type<D::DB>,
    for<'r> bool: sqlx::Decode<'r, D::DB> + sqlx::Type<D::DB>,
    for<'r> String: sqlx::Decode<'r, D::DB> + sqlx::Type<D::DB>,
    usize: sqlx::ColumnIndex<<D::DB as Database>::Row>,
    for<'a> &'a str: sqlx::ColumnIndex<<D::DB as Database>::Row>,
{
    async fn execute(&self, q: &mut QueryBuilder<D::DB>) -> Result<u64> {
        D::execute(&self.pool, q).await.map_err(db_error::<D>)
    }

    async fn fetch<T>(&self, q: &mut QueryBuilder<D::DB>) -> Result<Vec<T>>
    where
        T: for<'r> FromRow<'r, <D::DB as Database>::Row> + Send + Unpin,
    {
        D::fetch(&self.pool, q).await.map_err(db_error::<D>)
    }

    /// A statement starting with `sql`.
    fn query(sql: &str) -> QueryBuilder<D::DB> {
        let mut q = QueryBuilder::default();
        q.push(sql);
        q
    }

    async fn epoch(&self) -> Result<u64> {
        let mut q = Self::query("SELECT value FROM presence_meta WHERE name = ");
        D::bind(&mut q, Arg::Text(META_EPOCH));
        let rows: Vec<(i64,)> = self.fetch(&mut q).await?;
        let value = rows.first().map_or(0, |r| r.0);
        u64::try_from(value).map_err(|_| StoreError::Database {
            message: format!("presence_meta.{META_EPOCH} is negative: {value}"),
            transient: false,
        })
    }
}

/// Maps a database error, keeping its text for the logs and whether a retry may help.
pub fn db_error<D: Dialect>(e: sqlx::Error) -> StoreError {
    StoreError::Database {
        transient: D::is_transient(&e),
        message: e.to_string(),
    }
}

/// `value` as a bound integer, or an error naming what did not fit.
fn int(value: u64, what: &str) -> Result<i64> {
    i64::try_from(value).map_err(|_| StoreError::Database {
        message: format!("{what} {value} does not fit a signed 64-bit column"),
        transient: false,
    })
}

fn user(id: UserId) -> i64 {
    // UserId is at most i64::MAX by construction.
    id.get() as i64
}

/// Pushes `(?, ?, …)` binding each user id.
fn push_ids<D: Dialect>(q: &mut QueryBuilder<D::DB>, ids: impl IntoIterator<Item = UserId>) {
    q.push("(");
    for (i, id) in ids.into_iter().enumerate() {
        if i > 0 {
            q.push(", ");
        }
        D::bind(q, Arg::Int(user(id)));
    }
    q.push(")");
}

/// The name of the epoch in `presence_meta`.
const META_EPOCH: &str = "epoch";

/// A `presence` row as both backends return it, before its strings are checked.
#[derive(sqlx::FromRow)]
struct StoredPresence {
    user_id: u64,
    status: String,
    is_online: bool,
    last_seen_ms: Option<i64>,
    version: u64,
    offline_version: u64,
    epoch: u64,
    online_visibility: String,
    last_seen_visibility: String,
    approx_last_seen: bool,
    checkpoint_ms: Option<i64>,
    custom_text: Option<String>,
    custom_emoji: Option<String>,
    custom_expires_ms: Option<i64>,
}

/// The column list [`StoredPresence`] is read from, and rows are written to (plus `node`).
const PRESENCE_COLUMNS: &str = "user_id, status, is_online, last_seen_ms, version, \
     offline_version, epoch, online_visibility, last_seen_visibility, approx_last_seen, \
     checkpoint_ms, custom_text, custom_emoji, custom_expires_ms";

impl StoredPresence {
    fn into_row(self) -> Result<PresenceRow> {
        let user = self.user_id;
        let corrupt = |what: String| StoreError::Corrupt { user, what };
        let custom = match (self.custom_text, self.custom_emoji) {
            (None, None) => None,
            (text, emoji) => Some(Arc::new(CustomStatus {
                text: text.unwrap_or_default(),
                emoji: emoji.unwrap_or_default(),
                expires_at: self.custom_expires_ms,
            })),
        };
        Ok(PresenceRow {
            user_id: UserId::parse(user).map_err(|e| corrupt(e.0))?,
            chosen: Status::parse_str(&self.status).map_err(|e| corrupt(e.0))?,
            is_online: self.is_online,
            last_seen: self.last_seen_ms,
            version: self.version,
            offline_version: self.offline_version,
            epoch: self.epoch,
            privacy: Privacy {
                online: Visibility::parse_str(&self.online_visibility)
                    .map_err(|e| corrupt(format!("online_visibility: {}", e.0)))?,
                last_seen: Visibility::parse_str(&self.last_seen_visibility)
                    .map_err(|e| corrupt(format!("last_seen_visibility: {}", e.0)))?,
                approximate_last_seen: self.approx_last_seen,
            },
            checkpoint_at: self.checkpoint_ms,
            custom,
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

/// A stored id as a user id; zero (or anything out of range) is a corrupt row of `owner`.
fn stored_id(owner: u64, id: u64, what: &str) -> Result<UserId> {
    UserId::parse(id).map_err(|e| StoreError::Corrupt {
        user: owner,
        what: format!("{what}: {}", e.0),
    })
}

#[async_trait]
impl<D: Dialect> Store for SqlStore<D>
where
    for<'r> i64: sqlx::Decode<'r, D::DB> + sqlx::Type<D::DB>,
    for<'r> u64: sqlx::Decode<'r, D::DB> + sqlx::Type<D::DB>,
    for<'r> bool: sqlx::Decode<'r, D::DB> + sqlx::Type<D::DB>,
    for<'r> String: sqlx::Decode<'r, D::DB> + sqlx::Type<D::DB>,
    usize: sqlx::ColumnIndex<<D::DB as Database>::Row>,
    for<'a> &'a str: sqlx::ColumnIndex<<D::DB as Database>::Row>,
{
    async fn migrate(&self) -> Result<()> {
        D::migrate(&self.pool).await
    }

    async fn register_node(&self, node: &str, now: Millis) -> Result<u64> {
        let mut q =
            Self::query("INSERT INTO presence_nodes (node_id, started_ms, heartbeat_ms) VALUES (");
        D::bind(&mut q, Arg::Text(node));
        q.push(", ");
        D::bind(&mut q, Arg::Int(now));
        q.push(", ");
        D::bind(&mut q, Arg::Int(now));
        q.push(")");
        self.execute(&mut q).await?;
        self.epoch().await
    }

    async fn heartbeat(&self, node: &str, now: Millis) -> Result<u64> {
        let mut q = Self::query("UPDATE presence_nodes SET heartbeat_ms = ");
        D::bind(&mut q, Arg::Int(now));
        q.push(" WHERE node_id = ");
        D::bind(&mut q, Arg::Text(node));
        if self.execute(&mut q).await? == 0 {
            // Our record is gone (deleted by hand, or a restored database): register again.
            let mut q = Self::query(D::INSERT_IGNORE);
            q.push(" INTO presence_nodes (node_id, started_ms, heartbeat_ms) VALUES (");
            D::bind(&mut q, Arg::Text(node));
            q.push(", ");
            D::bind(&mut q, Arg::Int(now));
            q.push(", ");
            D::bind(&mut q, Arg::Int(now));
            q.push(")");
            self.execute(&mut q).await?;
        }
        // Records of nodes long gone (stopped or recovered more than a week ago) are forgotten.
        let week_ago = now - 7 * 24 * 3600 * 1000;
        let mut q = Self::query("DELETE FROM presence_nodes WHERE stopped_ms < ");
        D::bind(&mut q, Arg::Int(week_ago));
        q.push(" OR recovered_ms < ");
        D::bind(&mut q, Arg::Int(week_ago));
        self.execute(&mut q).await?;
        self.epoch().await
    }

    async fn stop_node(&self, node: &str, now: Millis) -> Result<()> {
        let mut q = Self::query("UPDATE presence_nodes SET stopped_ms = ");
        D::bind(&mut q, Arg::Int(now));
        q.push(", heartbeat_ms = ");
        D::bind(&mut q, Arg::Int(now));
        q.push(" WHERE node_id = ");
        D::bind(&mut q, Arg::Text(node));
        self.execute(&mut q).await?;
        Ok(())
    }

    async fn open_nodes(&self) -> Result<Vec<NodeRecord>> {
        let mut q = Self::query(
            "SELECT node_id, heartbeat_ms, stopped_ms, recovered_by FROM presence_nodes \
             WHERE stopped_ms IS NULL AND recovered_ms IS NULL",
        );
        let rows: Vec<(String, i64, Option<i64>, Option<String>)> = self.fetch(&mut q).await?;
        Ok(rows
            .into_iter()
            .map(
                |(node, heartbeat_ms, stopped_ms, recovered_by)| NodeRecord {
                    node,
                    heartbeat_ms,
                    stopped_ms,
                    recovered_by,
                },
            )
            .collect())
    }

    async fn claim_recovery(
        &self,
        dead: &str,
        claimer: &str,
        take_over: Option<&str>,
    ) -> Result<bool> {
        let mut q = Self::query("UPDATE presence_nodes SET recovered_by = ");
        D::bind(&mut q, Arg::Text(claimer));
        q.push(" WHERE node_id = ");
        D::bind(&mut q, Arg::Text(dead));
        q.push(" AND stopped_ms IS NULL AND recovered_ms IS NULL AND ");
        match take_over {
            None => {
                q.push("recovered_by IS NULL");
            }
            Some(previous) => {
                q.push("recovered_by = ");
                D::bind(&mut q, Arg::Text(previous));
            }
        }
        Ok(self.execute(&mut q).await? == 1)
    }

    async fn left_online_by(
        &self,
        node: &str,
        after: Option<UserId>,
        limit: u32,
    ) -> Result<Vec<UserId>> {
        let mut q = Self::query("SELECT user_id FROM presence WHERE is_online = TRUE AND node = ");
        D::bind(&mut q, Arg::Text(node));
        q.push(" AND user_id > ");
        // Ids are positive, so "after 0" is "from the start".
        D::bind(&mut q, Arg::Int(after.map_or(0, user)));
        q.push(" ORDER BY user_id LIMIT ");
        D::bind(&mut q, Arg::Int(i64::from(limit)));
        let ids: Vec<(u64,)> = self.fetch(&mut q).await?;
        ids.into_iter()
            .map(|(id,)| stored_id(id, id, "user id"))
            .collect()
    }

    async fn recover_rows(&self, node: &str, users: &[UserId]) -> Result<()> {
        for chunk in users.chunks(MAX_ROWS_PER_STATEMENT) {
            // The node never wrote these users' disconnects: they went offline no earlier than
            // their last checkpoint (and last_seen never moves backwards; the larger of two is
            // NULL when either is, hence the COALESCE). MySQL assigns left to right, each
            // seeing the columns already assigned: last_seen_ms first.
            let mut q = Self::query("UPDATE presence SET last_seen_ms = COALESCE(");
            q.push(D::MAX);
            q.push(
                "(checkpoint_ms, last_seen_ms), checkpoint_ms, last_seen_ms), \
                 is_online = FALSE, version = version + 1, \
                 offline_version = offline_version + 1",
            );
            q.push(D::TOUCH);
            q.push(" WHERE is_online = TRUE AND node = ");
            D::bind(&mut q, Arg::Text(node));
            q.push(" AND user_id IN ");
            push_ids::<D>(&mut q, chunk.iter().copied());
            self.execute(&mut q).await?;
        }
        Ok(())
    }

    async fn finish_recovery(&self, dead: &str, now: Millis) -> Result<()> {
        let mut q = Self::query("UPDATE presence_nodes SET recovered_ms = ");
        D::bind(&mut q, Arg::Int(now));
        q.push(" WHERE node_id = ");
        D::bind(&mut q, Arg::Text(dead));
        self.execute(&mut q).await?;
        Ok(())
    }

    async fn bump_epoch(&self) -> Result<u64> {
        let mut q = Self::query(D::INSERT_IGNORE);
        q.push(" INTO presence_meta (name, value) VALUES (");
        D::bind(&mut q, Arg::Text(META_EPOCH));
        q.push(", 0)");
        self.execute(&mut q).await?;
        let mut q = Self::query("UPDATE presence_meta SET value = value + 1 WHERE name = ");
        D::bind(&mut q, Arg::Text(META_EPOCH));
        self.execute(&mut q).await?;
        self.epoch().await
    }

    async fn load_presence(&self, users: &[UserId]) -> Result<Vec<PresenceRow>> {
        let mut rows = Vec::with_capacity(users.len());
        for chunk in users.chunks(MAX_ROWS_PER_STATEMENT) {
            let mut q = Self::query("SELECT ");
            q.push(PRESENCE_COLUMNS);
            q.push(" FROM presence WHERE user_id IN ");
            push_ids::<D>(&mut q, chunk.iter().copied());
            let stored: Vec<StoredPresence> = self.fetch(&mut q).await?;
            for row in stored {
                rows.push(row.into_row()?);
            }
        }
        Ok(rows)
    }

    async fn upsert_presence_batch(&self, rows: &[PresenceRow], node: &str) -> Result<()> {
        let mut sorted: Vec<&PresenceRow> = rows.iter().collect();
        // Sorted by key, so that concurrent writers on MySQL take row locks in the same order.
        sorted.sort_by_key(|r| r.user_id);
        for chunk in sorted.chunks(MAX_ROWS_PER_STATEMENT) {
            let mut q = Self::query("INSERT INTO presence (");
            q.push(PRESENCE_COLUMNS);
            q.push(", node) VALUES ");
            for (i, row) in chunk.iter().enumerate() {
                if i > 0 {
                    q.push(", ");
                }
                let custom = row.custom.as_deref();
                let args = [
                    Arg::Int(user(row.user_id)),
                    Arg::Text(row.chosen.as_str()),
                    Arg::Bool(row.is_online),
                    Arg::OptInt(row.last_seen),
                    Arg::Int(int(row.version, "version")?),
                    Arg::Int(int(row.offline_version, "offline version")?),
                    Arg::Int(int(row.epoch, "epoch")?),
                    Arg::Text(row.privacy.online.as_str()),
                    Arg::Text(row.privacy.last_seen.as_str()),
                    Arg::Bool(row.privacy.approximate_last_seen),
                    Arg::OptInt(row.checkpoint_at),
                    Arg::OptText(custom.map(|c| c.text.as_str())),
                    Arg::OptText(custom.map(|c| c.emoji.as_str())),
                    Arg::OptInt(custom.and_then(|c| c.expires_at)),
                    Arg::Text(node),
                ];
                q.push("(");
                for (j, arg) in args.into_iter().enumerate() {
                    if j > 0 {
                        q.push(", ");
                    }
                    D::bind(&mut q, arg);
                }
                q.push(")");
            }
            q.push(D::UPSERT_PRESENCE);
            self.execute(&mut q).await?;
        }
        Ok(())
    }

    async fn checkpoint_online(&self, users: &[UserId], at: Millis) -> Result<()> {
        for chunk in users.chunks(MAX_ROWS_PER_STATEMENT) {
            let mut q = Self::query("UPDATE presence SET checkpoint_ms = ");
            D::bind(&mut q, Arg::Int(at));
            q.push(D::TOUCH);
            q.push(" WHERE user_id IN ");
            push_ids::<D>(&mut q, chunk.iter().copied());
            self.execute(&mut q).await?;
        }
        Ok(())
    }

    async fn custom_expiring(&self, before: Millis, limit: u32) -> Result<Vec<(UserId, Millis)>> {
        let mut q = Self::query(
            "SELECT user_id, custom_expires_ms FROM presence WHERE custom_expires_ms <= ",
        );
        D::bind(&mut q, Arg::Int(before));
        q.push(" ORDER BY custom_expires_ms LIMIT ");
        D::bind(&mut q, Arg::Int(i64::from(limit)));
        let rows: Vec<(u64, i64)> = self.fetch(&mut q).await?;
        rows.into_iter()
            .map(|(id, at)| Ok((stored_id(id, id, "user id")?, at)))
            .collect()
    }

    async fn contacts_of_many(&self, users: &[UserId]) -> Result<Vec<(UserId, UserId)>> {
        let mut users = users.to_vec();
        users.sort_unstable();
        users.dedup();
        let mut pairs = Vec::new();
        for chunk in users.chunks(MAX_ROWS_PER_STATEMENT) {
            match D::CONTACT_LIST {
                // One row per user, its contacts joined: every row costs a hand-off from the
                // connection's thread and a decode, and row by row this read was two fifths of
                // the server's CPU in a wave of connects (SQLite).
                Some(aggregate) => {
                    let mut q = Self::query("SELECT user_id, ");
                    q.push(aggregate);
                    q.push(" FROM contacts WHERE user_id IN ");
                    push_ids::<D>(&mut q, chunk.iter().copied());
                    q.push(" GROUP BY user_id ORDER BY user_id");
                    let rows: Vec<(u64, String)> = self.fetch(&mut q).await?;
                    for (owner, joined) in rows {
                        let me = stored_id(owner, owner, "user id")?;
                        let mut ids = joined
                            .split(',')
                            .map(|c| c.parse::<u64>())
                            .collect::<std::result::Result<Vec<_>, _>>()
                            .map_err(|e| StoreError::Corrupt {
                                user: owner,
                                what: format!("contact list: {e}"),
                            })?;
                        ids.sort_unstable();
                        for id in ids {
                            pairs.push((me, stored_id(owner, id, "contact id")?));
                        }
                    }
                }
                None => {
                    let mut q =
                        Self::query("SELECT user_id, contact_id FROM contacts WHERE user_id IN ");
                    push_ids::<D>(&mut q, chunk.iter().copied());
                    q.push(" ORDER BY user_id, contact_id");
                    let rows: Vec<(u64, u64)> = self.fetch(&mut q).await?;
                    for (owner, contact) in rows {
                        pairs.push((
                            stored_id(owner, owner, "user id")?,
                            stored_id(owner, contact, "contact id")?,
                        ));
                    }
                }
            }
        }
        Ok(pairs)
    }

    async fn add_contacts(&self, pairs: &[(UserId, UserId)]) -> Result<()> {
        // Two rows per pair: MAX_ROWS_PER_STATEMENT pairs fit one statement.
        for chunk in contact_rows(pairs).chunks(2 * MAX_ROWS_PER_STATEMENT) {
            let mut q = Self::query(D::INSERT_IGNORE);
            q.push(" INTO contacts (user_id, contact_id) VALUES ");
            for (i, &(a, b)) in chunk.iter().enumerate() {
                q.push(if i == 0 { "(" } else { ", (" });
                D::bind(&mut q, Arg::Int(user(a)));
                q.push(", ");
                D::bind(&mut q, Arg::Int(user(b)));
                q.push(")");
            }
            self.execute(&mut q).await?;
        }
        Ok(())
    }

    async fn remove_contacts(&self, pairs: &[(UserId, UserId)]) -> Result<()> {
        for chunk in contact_rows(pairs).chunks(2 * MAX_ROWS_PER_STATEMENT) {
            let mut q = Self::query("DELETE FROM contacts WHERE ");
            for (i, &(a, b)) in chunk.iter().enumerate() {
                q.push(if i == 0 {
                    "(user_id = "
                } else {
                    " OR (user_id = "
                });
                D::bind(&mut q, Arg::Int(user(a)));
                q.push(" AND contact_id = ");
                D::bind(&mut q, Arg::Int(user(b)));
                q.push(")");
            }
            self.execute(&mut q).await?;
        }
        Ok(())
    }

    async fn list_contacts(
        &self,
        owner: UserId,
        after: Option<UserId>,
        limit: u32,
    ) -> Result<Vec<UserId>> {
        let mut q = Self::query("SELECT contact_id FROM contacts WHERE user_id = ");
        D::bind(&mut q, Arg::Int(user(owner)));
        q.push(" AND contact_id > ");
        // Ids are positive, so "after 0" is "from the start".
        D::bind(&mut q, Arg::Int(after.map_or(0, user)));
        q.push(" ORDER BY contact_id LIMIT ");
        D::bind(&mut q, Arg::Int(i64::from(limit)));
        let ids: Vec<(u64,)> = self.fetch(&mut q).await?;
        ids.into_iter()
            .map(|(id,)| stored_id(owner.get(), id, "contact id"))
            .collect()
    }
}

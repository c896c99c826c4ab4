//! The SQLite backend: the embedded default, one file next to the service (or `sqlite::memory:`
//! in tests). Talks only to its own pool; the schema is in `migrations/sqlite`.
//!
//! SQLite has no unsigned 64-bit integer: ids, versions and epochs are bound as `i64` and refused
//! with an encode error if they do not fit (they are far below 2^63 in practice).
use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::{QueryBuilder, Sqlite};

use super::{
    Epoch, MAX_ROWS_PER_STATEMENT, META_CLEAN_SHUTDOWN, META_EPOCH, PRESENCE_COLUMNS, PresenceRow,
    Result, Store, StoreError, StoredPresence, contact_ids, contact_pairs, contact_rows,
    next_epoch, sorted_by_user,
};
use crate::domain::{Millis, UserId};

/// Connections of a file database. Writers take turns on SQLite's single write lock anyway; a
/// few connections let reads proceed next to a write (WAL).
const FILE_POOL_SIZE: u32 = 4;

/// Extra attempts at opening or migrating a new file that another process is setting up at the
/// same time.
const SETUP_RETRIES: u32 = 8;

/// Rows a connection's worker thread may read ahead of the task consuming them. Each time the
/// buffer fills, the worker blocks until the task has drained it: with sqlx's 50, a wave of
/// connects (tens of thousands of rows, merged into a few queries) spent a third of the
/// server's CPU switching threads.
const ROW_BUFFER: usize = 4096;

/// How long a statement waits for another connection's write lock before failing with
/// "database is locked" (a transient error).
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// The store on a SQLite database.
#[derive(Debug, Clone)]
pub struct SqliteStore {
    /// Cheap to clone; every method takes its connection from here.
    pool: SqlitePool,
}

impl SqliteStore {
    /// Opens `sqlite://path` (creating the file if missing) or `sqlite::memory:`. Does not
    /// migrate.
    pub async fn connect(url: &str) -> Result<Self> {
        let in_memory = url.contains(":memory:") || url.contains("mode=memory");
        let mut options = SqliteConnectOptions::from_str(url)?
            .create_if_missing(true)
            .busy_timeout(BUSY_TIMEOUT)
            .row_buffer_size(ROW_BUFFER);
        let pool_options = if in_memory {
            // A memory database lives as long as one of its connections: keep exactly one, for
            // ever. Several connections sharing its cache would fail with SQLITE_LOCKED instead
            // of waiting on the busy timeout.
            SqlitePoolOptions::new()
                .max_connections(1)
                .min_connections(1)
                .idle_timeout(None)
                .max_lifetime(None)
        } else {
            // WAL lets readers run beside the writer; NORMAL is durable enough in WAL mode
            // (a power cut may lose the last commits, never corrupt the file).
            options = options
                .journal_mode(SqliteJournalMode::Wal)
                .synchronous(SqliteSynchronous::Normal);
            SqlitePoolOptions::new().max_connections(FILE_POOL_SIZE)
        };
        // Processes opening a new file together race to set it up (WAL mode needs the file to
        // themselves for a moment), and the loser is told "database is locked" at once rather
        // than after the busy timeout.
        let pool = beside_other_processes(
            "opening",
            || async { Ok(pool_options.clone().connect_with(options.clone()).await?) },
            StoreError::is_transient,
        )
        .await?;
        Ok(SqliteStore { pool })
    }
}

/// Runs a step of setting up a file that another process may be setting up at the same time,
/// trying again (after a short, growing pause) while its error is one `retry` accepts.
async fn beside_other_processes<T, Fut>(
    step: &str,
    mut run: impl FnMut() -> Fut,
    retry: impl Fn(&StoreError) -> bool,
) -> Result<T>
where
    Fut: std::future::Future<Output = Result<T>>,
{
    let mut attempt = 0;
    loop {
        match run().await {
            Err(e) if attempt < SETUP_RETRIES && retry(&e) => {
                attempt += 1;
                tracing::debug!(error = %e, attempt, "{step} beside another process; retrying");
                tokio::time::sleep(Duration::from_millis(50 * u64::from(attempt))).await;
            }
            done => return done,
        }
    }
}

/// `value` as SQLite's INTEGER, or an encode error naming what did not fit.
fn int(value: u64, what: &str) -> Result<i64> {
    i64::try_from(value).map_err(|_| {
        sqlx::Error::Encode(format!("{what} {value} does not fit a SQLite INTEGER").into()).into()
    })
}

fn user_ids(users: &[UserId]) -> Result<Vec<i64>> {
    users.iter().map(|u| int(u.get(), "user id")).collect()
}

/// A presence row with every value already converted for binding.
struct BoundRow {
    user_id: i64,
    row: PresenceRow,
    version: i64,
    epoch: i64,
}

impl BoundRow {
    fn new(row: PresenceRow) -> Result<Self> {
        Ok(BoundRow {
            user_id: int(row.user_id.get(), "user id")?,
            row,
            version: int(row.version, "version")?,
            epoch: int(row.epoch, "epoch")?,
        })
    }
}

#[async_trait]
impl Store for SqliteStore {
    async fn migrate(&self) -> Result<()> {
        // SQLite has no migration lock (sqlx's is a no-op there): when processes open a new
        // file together, one's migration fails ("table presence already exists") while
        // another's commits. Each migration is one transaction, so the loser rolled back
        // cleanly: whatever it failed with, it tries again and finds the schema applied.
        beside_other_processes(
            "migrating",
            || async {
                Ok(sqlx::migrate!("./migrations/sqlite")
                    .run(&self.pool)
                    .await?)
            },
            |_| true,
        )
        .await
    }

    async fn begin_epoch(&self) -> Result<Epoch> {
        // IMMEDIATE takes the write lock up front: a deferred transaction that reads and then
        // writes could fail with SQLITE_BUSY without waiting on the busy timeout.
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        let meta: Vec<(String, i64)> =
            sqlx::query_as("SELECT name, value FROM presence_meta WHERE name IN (?, ?)")
                .bind(META_EPOCH)
                .bind(META_CLEAN_SHUTDOWN)
                .fetch_all(&mut *tx)
                .await?;
        let epoch = next_epoch(&meta)?;
        let number = int(epoch.number, "epoch")?;
        if epoch.previous_run_crashed {
            // The crashed run never wrote these users' disconnects: they went offline no
            // earlier than their last checkpoint (and last_seen never moves backwards). The
            // epoch column stays: it says which run's numbering the version is in.
            sqlx::query(
                "UPDATE presence SET \
                     last_seen_ms = COALESCE(max(checkpoint_ms, last_seen_ms), \
                                             checkpoint_ms, last_seen_ms), \
                     is_online = 0, \
                     version = version + 1, \
                     updated_at = strftime('%Y-%m-%d %H:%M:%f', 'now') \
                 WHERE is_online = 1",
            )
            .execute(&mut *tx)
            .await?;
        }
        sqlx::query(
            "INSERT INTO presence_meta (name, value) VALUES (?, ?), (?, 0) \
             ON CONFLICT (name) DO UPDATE SET value = excluded.value",
        )
        .bind(META_EPOCH)
        .bind(number)
        .bind(META_CLEAN_SHUTDOWN)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(epoch)
    }

    async fn mark_clean_shutdown(&self) -> Result<()> {
        sqlx::query(
            "INSERT INTO presence_meta (name, value) VALUES (?, 1) \
             ON CONFLICT (name) DO UPDATE SET value = excluded.value",
        )
        .bind(META_CLEAN_SHUTDOWN)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn load_presence(&self, users: &[UserId]) -> Result<Vec<PresenceRow>> {
        let ids = user_ids(users)?;
        let mut rows = Vec::with_capacity(ids.len());
        for chunk in ids.chunks(MAX_ROWS_PER_STATEMENT) {
            let mut query = QueryBuilder::<Sqlite>::new("SELECT ");
            query.push(PRESENCE_COLUMNS);
            query.push(" FROM presence WHERE user_id IN (");
            let mut list = query.separated(", ");
            for &id in chunk {
                list.push_bind(id);
            }
            query.push(")");
            let stored: Vec<StoredPresence> = query.build_query_as().fetch_all(&self.pool).await?;
            for row in stored {
                rows.push(row.into_row()?);
            }
        }
        Ok(rows)
    }

    async fn upsert_presence_batch(&self, rows: &[PresenceRow]) -> Result<()> {
        let rows = sorted_by_user(rows);
        // Callers send at most MAX_ROWS_PER_STATEMENT rows; more are split rather than refused.
        for chunk in rows.chunks(MAX_ROWS_PER_STATEMENT) {
            let bound = chunk
                .iter()
                .map(|&row| BoundRow::new(row))
                .collect::<Result<Vec<_>>>()?;
            let mut query = QueryBuilder::<Sqlite>::new("INSERT INTO presence (");
            query.push(PRESENCE_COLUMNS);
            query.push(") ");
            query.push_values(&bound, |mut values, b| {
                values
                    .push_bind(b.user_id)
                    .push_bind(b.row.chosen.as_str())
                    .push_bind(b.row.is_online)
                    .push_bind(b.row.last_seen)
                    .push_bind(b.version)
                    .push_bind(b.epoch)
                    .push_bind(b.row.privacy.online.as_str())
                    .push_bind(b.row.privacy.last_seen.as_str())
                    .push_bind(b.row.checkpoint_at);
            });
            // A stored row with a higher version wins entirely; timestamps only move forwards
            // (max() is NULL when either side is, hence the COALESCE).
            query.push(
                " ON CONFLICT (user_id) DO UPDATE SET \
                     status = excluded.status, \
                     is_online = excluded.is_online, \
                     last_seen_ms = COALESCE(max(presence.last_seen_ms, excluded.last_seen_ms), \
                                             presence.last_seen_ms, excluded.last_seen_ms), \
                     version = excluded.version, \
                     epoch = excluded.epoch, \
                     online_visibility = excluded.online_visibility, \
                     last_seen_visibility = excluded.last_seen_visibility, \
                     checkpoint_ms = COALESCE(max(presence.checkpoint_ms, excluded.checkpoint_ms), \
                                              presence.checkpoint_ms, excluded.checkpoint_ms), \
                     updated_at = strftime('%Y-%m-%d %H:%M:%f', 'now') \
                 WHERE excluded.version >= presence.version",
            );
            query.build().execute(&self.pool).await?;
        }
        Ok(())
    }

    async fn checkpoint_online(&self, users: &[UserId], at: Millis) -> Result<()> {
        let ids = user_ids(users)?;
        for chunk in ids.chunks(MAX_ROWS_PER_STATEMENT) {
            let mut query = QueryBuilder::<Sqlite>::new("UPDATE presence SET checkpoint_ms = ");
            query.push_bind(at);
            query.push(", updated_at = strftime('%Y-%m-%d %H:%M:%f', 'now') WHERE user_id IN (");
            let mut list = query.separated(", ");
            for &id in chunk {
                list.push_bind(id);
            }
            query.push(")");
            query.build().execute(&self.pool).await?;
        }
        Ok(())
    }

    async fn contacts_of_many(&self, users: &[UserId]) -> Result<Vec<(UserId, UserId)>> {
        let mut ids = user_ids(users)?;
        ids.sort_unstable();
        ids.dedup();
        let mut pairs = Vec::new();
        for chunk in ids.chunks(MAX_ROWS_PER_STATEMENT) {
            // One row per user, its contacts joined: every row costs a hand-off from the
            // connection's thread and a decode, and row by row this read was two fifths of
            // the server's CPU in a wave of connects. (SQLite's group_concat has no length
            // limit short of a gigabyte; MySQL's would truncate, so its backend reads rows.)
            let mut query = QueryBuilder::<Sqlite>::new(
                "SELECT user_id, group_concat(contact_id) FROM contacts WHERE user_id IN (",
            );
            let mut list = query.separated(", ");
            for &id in chunk {
                list.push_bind(id);
            }
            query.push(") GROUP BY user_id ORDER BY user_id");
            let rows: Vec<(u64, String)> = query.build_query_as().fetch_all(&self.pool).await?;
            for (user, joined) in rows {
                let mut contacts = joined
                    .split(',')
                    .map(|c| c.parse::<u64>().map(|c| (user, c)))
                    .collect::<std::result::Result<Vec<_>, _>>()
                    .map_err(|e| StoreError::Corrupt {
                        user,
                        what: format!("contact list {joined:?}: {e}"),
                    })?;
                contacts.sort_unstable();
                pairs.extend(contact_pairs(contacts)?);
            }
        }
        Ok(pairs)
    }

    async fn are_contacts(&self, a: UserId, b: UserId) -> Result<bool> {
        let found = sqlx::query("SELECT 1 FROM contacts WHERE user_id = ? AND contact_id = ?")
            .bind(int(a.get(), "user id")?)
            .bind(int(b.get(), "user id")?)
            .fetch_optional(&self.pool)
            .await?;
        Ok(found.is_some())
    }

    async fn add_contacts(&self, pairs: &[(UserId, UserId)]) -> Result<()> {
        let rows = contact_rows(pairs)
            .into_iter()
            .map(|(a, b)| Ok((int(a.get(), "user id")?, int(b.get(), "user id")?)))
            .collect::<Result<Vec<_>>>()?;
        // Two rows per pair: MAX_ROWS_PER_STATEMENT pairs fit one statement.
        for chunk in rows.chunks(2 * MAX_ROWS_PER_STATEMENT) {
            let mut query = QueryBuilder::<Sqlite>::new(
                "INSERT OR IGNORE INTO contacts (user_id, contact_id) ",
            );
            query.push_values(chunk, |mut values, &(a, b)| {
                values.push_bind(a).push_bind(b);
            });
            query.build().execute(&self.pool).await?;
        }
        Ok(())
    }

    async fn remove_contacts(&self, pairs: &[(UserId, UserId)]) -> Result<()> {
        let rows = contact_rows(pairs)
            .into_iter()
            .map(|(a, b)| Ok((int(a.get(), "user id")?, int(b.get(), "user id")?)))
            .collect::<Result<Vec<_>>>()?;
        for chunk in rows.chunks(2 * MAX_ROWS_PER_STATEMENT) {
            let mut query = QueryBuilder::<Sqlite>::new("DELETE FROM contacts WHERE ");
            let mut any = query.separated(" OR ");
            for &(a, b) in chunk {
                any.push("(user_id = ")
                    .push_bind_unseparated(a)
                    .push_unseparated(" AND contact_id = ")
                    .push_bind_unseparated(b)
                    .push_unseparated(")");
            }
            query.build().execute(&self.pool).await?;
        }
        Ok(())
    }

    async fn list_contacts(
        &self,
        user: UserId,
        after: Option<UserId>,
        limit: u32,
    ) -> Result<Vec<UserId>> {
        let ids: Vec<u64> = sqlx::query_scalar(
            "SELECT contact_id FROM contacts WHERE user_id = ? AND contact_id > ? \
             ORDER BY contact_id LIMIT ?",
        )
        .bind(int(user.get(), "user id")?)
        // Ids are positive, so "after 0" is "from the start".
        .bind(int(after.map_or(0, UserId::get), "user id")?)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        contact_ids(user, ids)
    }
}

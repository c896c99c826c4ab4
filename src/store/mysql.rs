//! The MySQL backend, for production: MySQL 8 and MariaDB 10.11 alike, so no syntax only one of
//! them knows (no `INSERT … AS new` row alias: `VALUES(col)` in `ON DUPLICATE KEY UPDATE`, which
//! MySQL 8 still accepts with a deprecation note). Talks only to its own pool; the schema is in
//! `migrations/mysql`.
//!
//! Multi-row writes send their rows sorted by key so that concurrent writers take InnoDB row
//! locks in the same order; a deadlock that still happens is a transient error for the caller
//! to retry.
use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::mysql::{MySqlConnectOptions, MySqlPool, MySqlPoolOptions};
use sqlx::{MySql, QueryBuilder};

use super::{
    Epoch, MAX_ROWS_PER_STATEMENT, META_CLEAN_SHUTDOWN, META_EPOCH, PRESENCE_COLUMNS, PresenceRow,
    Result, Store, StoreError, StoredPresence, contact_ids, contact_pairs, contact_rows,
    next_epoch, sorted_by_user,
};
use crate::domain::{Millis, UserId};

/// Connections to the server: the write-behind flusher, lazy loads and contact RPCs share them.
const POOL_SIZE: u32 = 10;

/// How long a starting process waits for another one's migrations to finish.
const MIGRATE_LOCK_WAIT: Duration = Duration::from_secs(120);

/// The name of the migration lock: one per database (lock names are server-wide, at most 64
/// characters).
macro_rules! lock_name {
    () => {
        "LEFT(CONCAT('presence-migrate:', DATABASE()), 64)"
    };
}

/// The store on a MySQL or MariaDB database.
#[derive(Debug, Clone)]
pub struct MySqlStore {
    /// Cheap to clone; every method takes its connection from here.
    pool: MySqlPool,
}

impl MySqlStore {
    /// Opens `mysql://user:password@host:port/database` (`mariadb://` is read the same way).
    /// Does not migrate.
    pub async fn connect(url: &str) -> Result<Self> {
        let options = MySqlConnectOptions::from_str(url)?;
        let pool = MySqlPoolOptions::new()
            .max_connections(POOL_SIZE)
            // sqlx's 30 s default would stall start-up, flushes and loads for half a minute
            // per attempt during an outage; fail fast and let the callers retry and say so.
            .acquire_timeout(std::time::Duration::from_secs(3))
            .connect_with(options)
            .await?;
        Ok(MySqlStore { pool })
    }
}

#[async_trait]
impl Store for MySqlStore {
    async fn migrate(&self) -> Result<()> {
        // sqlx's own migration lock is GET_LOCK(name, -1): MySQL waits for ever, but MariaDB
        // answers NULL at once without the lock, and nodes starting together on a fresh
        // database raced ("migration 1 is partially applied"). Hold our own lock, with a real
        // timeout, on the connection that migrates.
        let mut conn = self.pool.acquire().await?;
        let locked: Option<i64> =
            sqlx::query_scalar(concat!("SELECT GET_LOCK(", lock_name!(), ", ?)"))
                .bind(MIGRATE_LOCK_WAIT.as_secs())
                .fetch_one(&mut *conn)
                .await?;
        if locked != Some(1) {
            return Err(StoreError::Database(sqlx::Error::Protocol(format!(
                "another process held the migration lock of this database for {} s",
                MIGRATE_LOCK_WAIT.as_secs()
            ))));
        }
        // `run_direct` takes the connection itself (`run(&mut *conn)` trips sqlx's "Acquire is
        // not general enough" inside an async trait method; sqlx keeps this entry for that).
        let migrated = sqlx::migrate!("./migrations/mysql")
            .run_direct(None, &mut *conn, false)
            .await;
        // Also released when the connection closes; a failure here changes nothing.
        let _ = sqlx::query(concat!("SELECT RELEASE_LOCK(", lock_name!(), ")"))
            .execute(&mut *conn)
            .await;
        Ok(migrated?)
    }

    async fn begin_epoch(&self) -> Result<Epoch> {
        let mut tx = self.pool.begin().await?;
        // FOR UPDATE: two processes starting on one database must not both bump the epoch.
        let meta: Vec<(String, i64)> =
            sqlx::query_as("SELECT name, value FROM presence_meta WHERE name IN (?, ?) FOR UPDATE")
                .bind(META_EPOCH)
                .bind(META_CLEAN_SHUTDOWN)
                .fetch_all(&mut *tx)
                .await?;
        let epoch = next_epoch(&meta)?;
        if epoch.previous_run_crashed {
            // The crashed run never wrote these users' disconnects: they went offline no
            // earlier than their last checkpoint (and last_seen never moves backwards; GREATEST
            // is NULL when either side is, hence the COALESCE). The epoch column stays: it
            // says which run's numbering the version is in.
            sqlx::query(
                "UPDATE presence SET \
                     last_seen_ms = COALESCE(GREATEST(checkpoint_ms, last_seen_ms), \
                                             checkpoint_ms, last_seen_ms), \
                     is_online = FALSE, \
                     version = version + 1 \
                 WHERE is_online = TRUE",
            )
            .execute(&mut *tx)
            .await?;
        }
        sqlx::query(
            "INSERT INTO presence_meta (name, value) VALUES (?, ?), (?, 0) \
             ON DUPLICATE KEY UPDATE value = VALUES(value)",
        )
        .bind(META_EPOCH)
        .bind(epoch.number)
        .bind(META_CLEAN_SHUTDOWN)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(epoch)
    }

    async fn mark_clean_shutdown(&self) -> Result<()> {
        sqlx::query(
            "INSERT INTO presence_meta (name, value) VALUES (?, 1) \
             ON DUPLICATE KEY UPDATE value = VALUES(value)",
        )
        .bind(META_CLEAN_SHUTDOWN)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn load_presence(&self, users: &[UserId]) -> Result<Vec<PresenceRow>> {
        let mut rows = Vec::with_capacity(users.len());
        for chunk in users.chunks(MAX_ROWS_PER_STATEMENT) {
            let mut query = QueryBuilder::<MySql>::new("SELECT ");
            query.push(PRESENCE_COLUMNS);
            query.push(" FROM presence WHERE user_id IN (");
            let mut list = query.separated(", ");
            for user in chunk {
                list.push_bind(user.get());
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
            let mut query = QueryBuilder::<MySql>::new("INSERT INTO presence (");
            query.push(PRESENCE_COLUMNS);
            query.push(") ");
            query.push_values(chunk, |mut values, row| {
                values
                    .push_bind(row.user_id.get())
                    .push_bind(row.chosen.as_str())
                    .push_bind(row.is_online)
                    .push_bind(row.last_seen)
                    .push_bind(row.version)
                    .push_bind(row.epoch)
                    .push_bind(row.privacy.online.as_str())
                    .push_bind(row.privacy.last_seen.as_str())
                    .push_bind(row.checkpoint_at);
            });
            // A stored row with a higher version wins entirely; timestamps only move forwards.
            // MySQL applies these assignments left to right, each seeing the columns already
            // assigned: `version` must come last, or the guards after it would compare against
            // the new version.
            query.push(
                " ON DUPLICATE KEY UPDATE \
                     status = IF(VALUES(version) >= version, VALUES(status), status), \
                     is_online = IF(VALUES(version) >= version, VALUES(is_online), is_online), \
                     last_seen_ms = IF(VALUES(version) >= version, \
                         COALESCE(GREATEST(last_seen_ms, VALUES(last_seen_ms)), \
                                  last_seen_ms, VALUES(last_seen_ms)), \
                         last_seen_ms), \
                     epoch = IF(VALUES(version) >= version, VALUES(epoch), epoch), \
                     online_visibility = IF(VALUES(version) >= version, \
                         VALUES(online_visibility), online_visibility), \
                     last_seen_visibility = IF(VALUES(version) >= version, \
                         VALUES(last_seen_visibility), last_seen_visibility), \
                     checkpoint_ms = IF(VALUES(version) >= version, \
                         COALESCE(GREATEST(checkpoint_ms, VALUES(checkpoint_ms)), \
                                  checkpoint_ms, VALUES(checkpoint_ms)), \
                         checkpoint_ms), \
                     version = GREATEST(version, VALUES(version))",
            );
            query.build().execute(&self.pool).await?;
        }
        Ok(())
    }

    async fn checkpoint_online(&self, users: &[UserId], at: Millis) -> Result<()> {
        for chunk in users.chunks(MAX_ROWS_PER_STATEMENT) {
            let mut query = QueryBuilder::<MySql>::new("UPDATE presence SET checkpoint_ms = ");
            query.push_bind(at);
            query.push(" WHERE user_id IN (");
            let mut list = query.separated(", ");
            for user in chunk {
                list.push_bind(user.get());
            }
            query.push(")");
            query.build().execute(&self.pool).await?;
        }
        Ok(())
    }

    async fn contacts_of_many(&self, users: &[UserId]) -> Result<Vec<(UserId, UserId)>> {
        let mut users = users.to_vec();
        users.sort_unstable();
        users.dedup();
        let mut pairs = Vec::new();
        for chunk in users.chunks(MAX_ROWS_PER_STATEMENT) {
            let mut query = QueryBuilder::<MySql>::new(
                "SELECT user_id, contact_id FROM contacts WHERE user_id IN (",
            );
            let mut list = query.separated(", ");
            for user in chunk {
                list.push_bind(user.get());
            }
            query.push(") ORDER BY user_id, contact_id");
            let rows: Vec<(u64, u64)> = query.build_query_as().fetch_all(&self.pool).await?;
            pairs.extend(contact_pairs(rows)?);
        }
        Ok(pairs)
    }

    async fn are_contacts(&self, a: UserId, b: UserId) -> Result<bool> {
        let found = sqlx::query("SELECT 1 FROM contacts WHERE user_id = ? AND contact_id = ?")
            .bind(a.get())
            .bind(b.get())
            .fetch_optional(&self.pool)
            .await?;
        Ok(found.is_some())
    }

    async fn add_contacts(&self, pairs: &[(UserId, UserId)]) -> Result<()> {
        let rows = contact_rows(pairs);
        // Two rows per pair: MAX_ROWS_PER_STATEMENT pairs fit one statement.
        for chunk in rows.chunks(2 * MAX_ROWS_PER_STATEMENT) {
            let mut query =
                QueryBuilder::<MySql>::new("INSERT IGNORE INTO contacts (user_id, contact_id) ");
            query.push_values(chunk, |mut values, &(a, b)| {
                values.push_bind(a.get()).push_bind(b.get());
            });
            query.build().execute(&self.pool).await?;
        }
        Ok(())
    }

    async fn remove_contacts(&self, pairs: &[(UserId, UserId)]) -> Result<()> {
        let rows = contact_rows(pairs);
        for chunk in rows.chunks(2 * MAX_ROWS_PER_STATEMENT) {
            let mut query = QueryBuilder::<MySql>::new("DELETE FROM contacts WHERE ");
            let mut any = query.separated(" OR ");
            for &(a, b) in chunk {
                any.push("(user_id = ")
                    .push_bind_unseparated(a.get())
                    .push_unseparated(" AND contact_id = ")
                    .push_bind_unseparated(b.get())
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
        .bind(user.get())
        // Ids are positive, so "after 0" is "from the start".
        .bind(after.map_or(0, UserId::get))
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        contact_ids(user, ids)
    }
}

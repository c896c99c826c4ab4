//! The MySQL backend, for production: MySQL 8 and MariaDB 10.11 alike, so no syntax only one of
//! them knows (no `INSERT … AS new` row alias: `VALUES(col)` in `ON DUPLICATE KEY UPDATE`, which
//! MySQL 8 still accepts with a deprecation note). Its dialect and how its pool is opened; the
//! statements are in [`super::sql`], the schema in `migrations/mysql`.
//!
//! Multi-row writes send their rows sorted by key so that concurrent writers take InnoDB row
//! locks in the same order; a deadlock that still happens is a transient error for the caller
//! to retry.
use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::mysql::{MySqlConnectOptions, MySqlPoolOptions};
use sqlx::{Database, FromRow, MySql, QueryBuilder};

use super::sql::{Arg, Dialect, SqlStore, db_error};
use super::{Result, StoreError};

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
pub type MySqlStore = SqlStore<MySqlDialect>;

/// What MySQL does its own way.
pub struct MySqlDialect;

impl SqlStore<MySqlDialect> {
    /// Opens `mysql://user:password@host:port/database` (`mariadb://` is read the same way).
    /// Does not migrate.
    pub async fn connect(url: &str) -> Result<Self> {
        let options = MySqlConnectOptions::from_str(url).map_err(db_error::<MySqlDialect>)?;
        let pool = MySqlPoolOptions::new()
            .max_connections(POOL_SIZE)
            // sqlx's 30 s default would stall start-up, flushes and loads for half a minute
            // per attempt during an outage; fail fast and let the callers retry and say so.
            .acquire_timeout(Duration::from_secs(3))
            .connect_with(options)
            .await
            .map_err(db_error::<MySqlDialect>)?;
        Ok(SqlStore::new(pool))
    }
}

#[async_trait]
impl Dialect for MySqlDialect {
    type DB = MySql;
    const MAX: &'static str = "GREATEST";
    const INSERT_IGNORE: &'static str = "INSERT IGNORE";
    // MySQL applies these assignments left to right, each seeing the columns already
    // assigned: `version` must come last, or the guards after it would compare against the new
    // version.
    const UPSERT_PRESENCE: &'static str = " ON DUPLICATE KEY UPDATE \
         status = IF(VALUES(version) >= version, VALUES(status), status), \
         is_online = IF(VALUES(version) >= version, VALUES(is_online), is_online), \
         last_seen_ms = IF(VALUES(version) >= version, \
             COALESCE(GREATEST(last_seen_ms, VALUES(last_seen_ms)), \
                      last_seen_ms, VALUES(last_seen_ms)), \
             last_seen_ms), \
         offline_version = IF(VALUES(version) >= version, VALUES(offline_version), offline_version), \
         epoch = IF(VALUES(version) >= version, VALUES(epoch), epoch), \
         online_visibility = IF(VALUES(version) >= version, \
             VALUES(online_visibility), online_visibility), \
         last_seen_visibility = IF(VALUES(version) >= version, \
             VALUES(last_seen_visibility), last_seen_visibility), \
         approx_last_seen = IF(VALUES(version) >= version, VALUES(approx_last_seen), approx_last_seen), \
         checkpoint_ms = IF(VALUES(version) >= version, \
             COALESCE(GREATEST(checkpoint_ms, VALUES(checkpoint_ms)), \
                      checkpoint_ms, VALUES(checkpoint_ms)), \
             checkpoint_ms), \
         custom_text = IF(VALUES(version) >= version, VALUES(custom_text), custom_text), \
         custom_emoji = IF(VALUES(version) >= version, VALUES(custom_emoji), custom_emoji), \
         custom_expires_ms = IF(VALUES(version) >= version, VALUES(custom_expires_ms), custom_expires_ms), \
         node = IF(VALUES(version) >= version, VALUES(node), node), \
         version = GREATEST(version, VALUES(version))";
    // updated_at has ON UPDATE CURRENT_TIMESTAMP.
    const TOUCH: &'static str = "";
    // GROUP_CONCAT truncates at group_concat_max_len (1 KiB by default): read rows.
    const CONTACT_LIST: Option<&'static str> = None;

    fn bind(q: &mut QueryBuilder<MySql>, arg: Arg<'_>) {
        match arg {
            Arg::Int(v) => q.push_bind(v),
            Arg::OptInt(v) => q.push_bind(v),
            Arg::Text(v) => q.push_bind(v.to_owned()),
            Arg::OptText(v) => q.push_bind(v.map(str::to_owned)),
            Arg::Bool(v) => q.push_bind(v),
        };
    }

    async fn execute(pool: &sqlx::Pool<MySql>, q: &mut QueryBuilder<MySql>) -> sqlx::Result<u64> {
        Ok(q.build().execute(pool).await?.rows_affected())
    }

    async fn fetch<T>(pool: &sqlx::Pool<MySql>, q: &mut QueryBuilder<MySql>) -> sqlx::Result<Vec<T>>
    where
        T: for<'r> FromRow<'r, <MySql as Database>::Row> + Send + Unpin,
    {
        q.build_query_as::<T>().fetch_all(pool).await
    }

    fn is_transient(err: &sqlx::Error) -> bool {
        match err {
            // 1205 lock wait timeout, 1213 deadlock, 1053 server shutting down, 1927 connection
            // killed (MariaDB), 4031 idle client disconnected (MySQL 8), 2006/2013 server gone
            // away / lost connection.
            sqlx::Error::Database(db) => db
                .try_downcast_ref::<sqlx::mysql::MySqlDatabaseError>()
                .is_some_and(|my| {
                    matches!(my.number(), 1205 | 1213 | 1053 | 1927 | 4031 | 2006 | 2013)
                }),
            sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut | sqlx::Error::WorkerCrashed => true,
            _ => false,
        }
    }

    async fn migrate(pool: &sqlx::Pool<MySql>) -> Result<()> {
        // sqlx's own migration lock is GET_LOCK(name, -1): MySQL waits for ever, but MariaDB
        // answers NULL at once without the lock, and nodes starting together on a fresh
        // database raced ("migration 1 is partially applied"). Hold our own lock, with a real
        // timeout, on the connection that migrates.
        let mut conn = pool.acquire().await.map_err(db_error::<MySqlDialect>)?;
        let locked: Option<i64> =
            sqlx::query_scalar(concat!("SELECT GET_LOCK(", lock_name!(), ", ?)"))
                .bind(MIGRATE_LOCK_WAIT.as_secs())
                .fetch_one(&mut *conn)
                .await
                .map_err(db_error::<MySqlDialect>)?;
        if locked != Some(1) {
            return Err(StoreError::Migrate(format!(
                "another process held the migration lock of this database for {} s",
                MIGRATE_LOCK_WAIT.as_secs()
            )));
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
        migrated.map_err(|e| StoreError::Migrate(e.to_string()))
    }
}

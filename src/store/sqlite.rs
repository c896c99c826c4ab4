//! The SQLite backend: the embedded default, one file next to the service (or `sqlite::memory:`
//! in tests). Its dialect and how its pool is opened; the statements are in [`super::sql`], the
//! schema in `migrations/sqlite`.
use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::{Database, FromRow, QueryBuilder, Sqlite};

use super::sql::{Arg, Dialect, SqlStore, db_error};
use super::{Result, StoreError};

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
pub type SqliteStore = SqlStore<SqliteDialect>;

/// What SQLite does its own way.
pub struct SqliteDialect;

impl SqlStore<SqliteDialect> {
    /// Opens `sqlite://path` (creating the file if missing) or `sqlite::memory:`. Does not
    /// migrate.
    pub async fn connect(url: &str) -> Result<Self> {
        let in_memory = url.contains(":memory:") || url.contains("mode=memory");
        let mut options = SqliteConnectOptions::from_str(url)
            .map_err(db_error::<SqliteDialect>)?
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
        let pool: SqlitePool = beside_other_processes(
            "opening",
            || async {
                pool_options
                    .clone()
                    .connect_with(options.clone())
                    .await
                    .map_err(db_error::<SqliteDialect>)
            },
            StoreError::is_transient,
        )
        .await?;
        Ok(SqlStore::new(pool))
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

#[async_trait]
impl Dialect for SqliteDialect {
    type DB = Sqlite;
    const MAX: &'static str = "max";
    const INSERT_IGNORE: &'static str = "INSERT OR IGNORE";
    const UPSERT_PRESENCE: &'static str = " ON CONFLICT (user_id) DO UPDATE SET \
         status = excluded.status, \
         is_online = excluded.is_online, \
         last_seen_ms = COALESCE(max(presence.last_seen_ms, excluded.last_seen_ms), \
                                 presence.last_seen_ms, excluded.last_seen_ms), \
         version = excluded.version, \
         offline_version = excluded.offline_version, \
         epoch = excluded.epoch, \
         online_visibility = excluded.online_visibility, \
         last_seen_visibility = excluded.last_seen_visibility, \
         approx_last_seen = excluded.approx_last_seen, \
         checkpoint_ms = COALESCE(max(presence.checkpoint_ms, excluded.checkpoint_ms), \
                                  presence.checkpoint_ms, excluded.checkpoint_ms), \
         custom_text = excluded.custom_text, \
         custom_emoji = excluded.custom_emoji, \
         custom_expires_ms = excluded.custom_expires_ms, \
         node = excluded.node, \
         updated_at = strftime('%Y-%m-%d %H:%M:%f', 'now') \
         WHERE excluded.version >= presence.version";
    const TOUCH: &'static str = ", updated_at = strftime('%Y-%m-%d %H:%M:%f', 'now')";
    // SQLite's group_concat has no length limit short of a gigabyte.
    const CONTACT_LIST: Option<&'static str> = Some("group_concat(contact_id)");

    fn bind(q: &mut QueryBuilder<Sqlite>, arg: Arg<'_>) {
        match arg {
            Arg::Int(v) => q.push_bind(v),
            Arg::OptInt(v) => q.push_bind(v),
            Arg::Text(v) => q.push_bind(v.to_owned()),
            Arg::OptText(v) => q.push_bind(v.map(str::to_owned)),
            Arg::Bool(v) => q.push_bind(v),
        };
    }

    async fn execute(pool: &sqlx::Pool<Sqlite>, q: &mut QueryBuilder<Sqlite>) -> sqlx::Result<u64> {
        Ok(q.build().execute(pool).await?.rows_affected())
    }

    async fn fetch<T>(
        pool: &sqlx::Pool<Sqlite>,
        q: &mut QueryBuilder<Sqlite>,
    ) -> sqlx::Result<Vec<T>>
    where
        T: for<'r> FromRow<'r, <Sqlite as Database>::Row> + Send + Unpin,
    {
        q.build_query_as::<T>().fetch_all(pool).await
    }

    fn is_transient(err: &sqlx::Error) -> bool {
        match err {
            // SQLite reports extended result codes; the low byte is the primary code:
            // SQLITE_BUSY (5, "database is locked") and SQLITE_LOCKED (6).
            sqlx::Error::Database(db) => db
                .code()
                .and_then(|code| code.parse::<i32>().ok())
                .is_some_and(|code| matches!(code & 0xff, 5 | 6)),
            sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut | sqlx::Error::WorkerCrashed => true,
            _ => false,
        }
    }

    async fn migrate(pool: &sqlx::Pool<Sqlite>) -> Result<()> {
        // SQLite has no migration lock (sqlx's is a no-op there): when processes open a new
        // file together, one's migration fails ("table presence already exists") while
        // another's commits. Each migration is one transaction, so the loser rolled back
        // cleanly: whatever it failed with, it tries again and finds the schema applied.
        beside_other_processes(
            "migrating",
            || async {
                sqlx::migrate!("./migrations/sqlite")
                    .run(pool)
                    .await
                    .map_err(|e| StoreError::Migrate(e.to_string()))
            },
            |_| true,
        )
        .await
    }
}

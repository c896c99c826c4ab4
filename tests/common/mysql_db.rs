//! A MySQL database of its own for one test: created with a unique name on the server that
//! `PRESENCE_TEST_MYSQL_URL` points at, dropped when the value is dropped. Shared by the store,
//! fault and cluster suites (`#[path]`-included: each test binary compiles its own copy).
//!
//! The MySQL tests carry `#[cfg_attr(not(mysql_tests), ignore = …)]`: built without the
//! variable (see build.rs), libtest lists them as ignored, never as passed.
use std::sync::atomic::{AtomicU32, Ordering};

use sqlx::{AssertSqlSafe, Connection, Executor};

/// The server the MySQL tests create their databases on. The tests are only built to run when
/// it was set at build time; unset at run time is a failure, not a skip.
pub fn admin_url() -> String {
    match std::env::var("PRESENCE_TEST_MYSQL_URL") {
        Ok(url) if !url.trim().is_empty() => url,
        _ => panic!(
            "the MySQL tests were built with PRESENCE_TEST_MYSQL_URL set, but it is unset now: \
             set it again (e.g. mysql://root@127.0.0.1:3306/test)"
        ),
    }
}

/// A uniquely named database, dropped (best effort) when this value is, even after a failed
/// assertion.
pub struct MySqlDatabase {
    admin_url: String,
    name: String,
}

impl MySqlDatabase {
    /// Creates the database; panics (naming the server) when MySQL cannot be reached.
    pub async fn create(admin_url: String) -> Self {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "presence_t_{}_{}_{:08x}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed),
            rand::random::<u32>()
        );
        let mut admin = sqlx::MySqlConnection::connect(&admin_url)
            .await
            .unwrap_or_else(|e| panic!("MySQL at {admin_url} is unreachable: {e}"));
        // The name is made of [a-z0-9_] above, so it is safe to splice into the statement.
        admin
            .execute(AssertSqlSafe(format!("CREATE DATABASE `{name}`")))
            .await
            .unwrap_or_else(|e| panic!("the test user may create database {name}: {e}"));
        admin.close().await.ok();
        MySqlDatabase { admin_url, name }
    }

    /// The admin URL with its database replaced by this one.
    pub fn url(&self) -> String {
        let (base, params) = match self.admin_url.split_once('?') {
            Some((base, params)) => (base, Some(params)),
            None => (self.admin_url.as_str(), None),
        };
        let authority = base.find("://").map_or(0, |i| i + 3);
        let path = base[authority..]
            .find('/')
            .map_or(base.len(), |i| authority + i);
        let mut url = format!("{}/{}", &base[..path], self.name);
        if let Some(params) = params {
            url.push('?');
            url.push_str(params);
        }
        url
    }
}

impl Drop for MySqlDatabase {
    fn drop(&mut self) {
        let admin_url = self.admin_url.clone();
        let statement = format!("DROP DATABASE IF EXISTS `{}`", self.name);
        // Drop cannot await, and may run inside the test's runtime: use a thread of its own.
        let dropped = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| e.to_string())?;
            runtime.block_on(async {
                let mut admin = sqlx::MySqlConnection::connect(&admin_url)
                    .await
                    .map_err(|e| e.to_string())?;
                admin
                    .execute(AssertSqlSafe(statement))
                    .await
                    .map_err(|e| e.to_string())?;
                admin.close().await.ok();
                Ok::<_, String>(())
            })
        })
        .join();
        if let Ok(Err(e)) | Err(e) = dropped.map_err(|_| "panicked".to_string()) {
            eprintln!("could not drop test database {}: {e}", self.name);
        }
    }
}

//! Deadlock safety on MySQL: two servers on one database, flushing the same users all the time,
//! never fail a flush on InnoDB deadlocks (1213) or lock wait timeouts (1205), and the rows end
//! at the newest version either of them wrote.
//!
//! Runs when `PRESENCE_TEST_MYSQL_URL` is set (for example `mysql://root@127.0.0.1:3306/test`);
//! the test creates its own database through that URL and drops it afterwards. Without the
//! variable it is listed as ignored (see build.rs).
use std::time::{Duration, Instant};

use futures::future::join_all;
use presence::pb;

use crate::harness::{
    Device, TestServer, exclusive, open_store, presence_as_service, test_settings, uid,
    update_status, user,
};

/// Users with devices on both servers.
const USERS: u64 = 200;
/// How long both servers churn.
const CHURN: Duration = Duration::from_secs(4);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(mysql_tests),
    ignore = "set PRESENCE_TEST_MYSQL_URL to run the MySQL tests"
)]
async fn two_servers_flushing_the_same_users_on_mysql_never_fail_and_converge() {
    let database = MySqlDatabase::create(mysql_db::admin_url()).await;
    let _machine = exclusive().await;
    let configure = |s: &mut presence::settings::Settings| {
        s.flush_interval_ms = 5;
        s.checkpoint_interval_s = 1;
        // The churn below changes statuses far faster than people do.
        s.rate_status_per_min = 1_000_000;
    };
    let mut a = TestServer::start_with(test_settings(&database.url(), configure), None).await;
    let mut b = TestServer::start_with(test_settings(&database.url(), configure), None).await;

    // Each node churns every user in every round, all at once, so that each flush writes
    // many rows that the other node writes too: first as new rows (inserts of the same keys),
    // then as updates, next to the checkpoints of the online users.
    let until = Instant::now() + CHURN;
    let mut churners = tokio::task::JoinSet::new();
    for server in [&a, &b] {
        let channel = server.connection().await;
        churners.spawn(async move {
            let ids: Vec<u64> = (1..=USERS).collect();
            let mut devices = Vec::new();
            let mut rounds = 0u64;
            while Instant::now() < until {
                if rounds.is_multiple_of(3) {
                    devices.clear();
                    devices = join_all(ids.iter().map(|&u| {
                        let channel = channel.clone();
                        async move {
                            Device::connect(&channel, &user(u))
                                .await
                                .unwrap_or_else(|s| panic!("user {u} connects: {s:?}"))
                        }
                    }))
                    .await;
                } else {
                    let status = if rounds % 3 == 1 {
                        pb::Status::Busy
                    } else {
                        pb::Status::Online
                    };
                    join_all(ids.iter().map(|&u| {
                        let channel = channel.clone();
                        async move {
                            update_status(&channel, &user(u), status)
                                .await
                                .unwrap_or_else(|s| panic!("user {u} changes status: {s:?}"))
                        }
                    }))
                    .await;
                }
                rounds += 1;
            }
            drop(devices);
            rounds
        });
    }
    let mut rounds = Vec::new();
    while let Some(r) = churners.join_next().await {
        rounds.push(r.expect("a churner does not panic"));
    }

    // Every device is gone: both engines settle and write their last changes.
    let ids: Vec<u64> = (1..=USERS).collect();
    let settle = Instant::now();
    for server in [&a, &b] {
        loop {
            let s = server.engine.stats();
            if s.connections == 0 && s.dirty_users == 0 && server.engine.store_ok() {
                break;
            }
            assert!(
                settle.elapsed() < Duration::from_secs(15),
                "a server did not settle: {s:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let (stats_a, stats_b) = (a.engine.stats(), b.engine.stats());
    eprintln!(
        "MySQL, 2 servers x {USERS} shared users for {CHURN:?} (churn rounds {rounds:?}): \
         server A {} statements / {} rows / {} errors, server B {} statements / {} rows / \
         {} errors",
        stats_a.db_statements,
        stats_a.db_rows,
        stats_a.db_errors,
        stats_b.db_statements,
        stats_b.db_rows,
        stats_b.db_errors
    );
    for (name, s) in [("A", stats_a), ("B", stats_b)] {
        assert!(
            s.db_statements >= 10 && s.db_rows >= 3 * USERS,
            "precondition: server {name} flushed the shared users again and again: {s:?}"
        );
    }

    // Each row holds the final state one of the servers wrote, offline. (Two single-node
    // servers on one database each take the other's run for a crash, so the later one raises
    // the versions it loads by an epoch gap in memory; a user it never changed keeps that
    // raise unwritten, so the row may hold the other server's version.)
    let store = open_store(&database.url()).await;
    let seen_a = presence_as_service(&a.connection().await, &ids).await;
    let seen_b = presence_as_service(&b.connection().await, &ids).await;
    let rows = store
        .load_presence(&ids.iter().map(|&u| uid(u)).collect::<Vec<_>>())
        .await
        .expect("rows load");
    assert_eq!(rows.len(), USERS as usize, "every user has a row");
    for r in &rows {
        let u = r.user_id.get() as usize - 1;
        let (va, vb) = (seen_a[u].version, seen_b[u].version);
        assert!(
            (r.version == va || r.version == vb) && !r.is_online,
            "the row of user {} is one server's final state ({va} or {vb}), offline: {r:?}",
            r.user_id
        );
    }
    assert_eq!(
        (stats_a.db_errors, stats_b.db_errors),
        (0, 0),
        "no flush or checkpoint failed on MySQL under concurrent writers"
    );
    a.stop_within(Duration::from_secs(15)).await;
    b.stop_within(Duration::from_secs(15)).await;
}

#[path = "../common/mysql_db.rs"]
mod mysql_db;
use mysql_db::MySqlDatabase;

//! Database outages: while the store fails, streams, fan-out and GetPresence keep working from
//! memory, health and counters show the degradation, and once it is back every row converges
//! to the in-memory truth without any last_seen or version moving backwards. A server started
//! while its database is down keeps retrying, and says so.
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use presence::domain::Status;
use presence::pb;
use presence::store::{PresenceRow, Store};
use presence::telemetry::STORE_HEALTH;
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;

use crate::faulty_store::FaultyStore;
use crate::harness::{
    Device, Inbox, ServerProcess, TestServer, WAIT, Watcher, add_contacts, exclusive, get_presence,
    health, last_seen, open_store, presence_as_service, service, sqlite_dir, status_message,
    test_settings, uid, update_status, user, wait_for_health, wait_for_row,
};

/// How long the database stays down in the outage test: long enough for several failed
/// flushes and checkpoints, so the retry backoff has grown as in a real outage.
const OUTAGE: Duration = Duration::from_secs(3);

/// The highest version and last_seen any client saw, per user.
#[derive(Default)]
struct Seen {
    version: HashMap<u64, u64>,
    last_seen: HashMap<u64, i64>,
}

impl Seen {
    fn note(&mut self, p: &pb::UserPresence) {
        let v = self.version.entry(p.user_id).or_default();
        *v = (*v).max(p.version);
        if let Some(t) = last_seen(p) {
            let l = self.last_seen.entry(p.user_id).or_insert(t);
            *l = (*l).max(t);
        }
    }

    /// Waits for `user` to show `status` on `inbox`, noting every update on the way.
    async fn expect(
        &mut self,
        inbox: &mut Inbox,
        user: u64,
        status: pb::Status,
        why: &str,
    ) -> pb::UserPresence {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() {
                panic!("{why}: user {user} never showed {status:?}");
            }
            let p = inbox.next_update_within(left).await;
            self.note(&p);
            if p.user_id == user && p.status() == status {
                return p;
            }
        }
    }
}

fn domain_status(status: pb::Status) -> Status {
    match status {
        pb::Status::Online => Status::Online,
        pb::Status::Away => Status::Away,
        pb::Status::Busy => Status::Busy,
        pb::Status::Offline | pb::Status::Unspecified => Status::Offline,
    }
}

/// Whether the stored row says what the server's memory says (as a service sees it).
fn row_matches(row: &PresenceRow, truth: &pb::UserPresence) -> bool {
    let online = truth.status() != pb::Status::Offline;
    row.version == truth.version
        && row.last_seen == last_seen(truth)
        && row.is_online == online
        && (!online || row.chosen == domain_status(truth.status()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn during_a_database_outage_presence_is_served_from_memory_and_rows_converge_after() {
    let _machine = exclusive().await;
    let (dir, url) = sqlite_dir();
    let real = open_store(&url).await;
    real.migrate().await.expect("the test database migrates");
    let faulty = FaultyStore::new(real.clone());
    let settings = test_settings(&url, |s| s.checkpoint_interval_s = 1);
    let server = TestServer::start_with_store(settings, faulty.clone(), Some(dir)).await;
    let channel = server.connection().await;
    add_contacts(&channel, &[(1, 2), (1, 3), (2, 3)]).await;
    let users = [1, 2, 3];
    let mut seen = Seen::default();
    let mut watcher = Watcher::open(&channel, &service(), &users).await;
    watcher.snapshot.iter().for_each(|p| seen.note(p));

    let a1 = Device::connect(&channel, &user(1))
        .await
        .expect("user 1 connects");
    let mut b1 = Device::connect(&channel, &user(2))
        .await
        .expect("user 2 connects");
    let c1 = Device::connect(&channel, &user(3))
        .await
        .expect("user 3 connects");
    for u in users {
        wait_for_row(&real, u, "online", WAIT, |r| r.is_online).await;
    }
    watcher.drain().iter().for_each(|p| seen.note(p));
    b1.drain().iter().for_each(|p| seen.note(p));
    let before = server.engine.stats();

    faulty.set_down(true);
    let down_at = Instant::now();

    // A device of a user in memory connects, the user changes status: contacts are told.
    let a2 = Device::connect(&channel, &user(1))
        .await
        .expect("a second device of a user in memory connects during the outage");
    update_status(&channel, &user(1), pb::Status::Away)
        .await
        .expect("UpdateStatus works from memory during the outage");
    seen.expect(
        &mut b1,
        1,
        pb::Status::Away,
        "the contact is told of the new status",
    )
    .await;
    seen.expect(&mut watcher, 1, pb::Status::Away, "the watcher is told too")
        .await;
    let degraded_after = down_at.elapsed()
        + wait_for_health(
            &channel,
            STORE_HEALTH,
            ServingStatus::NotServing,
            Duration::from_secs(3),
        )
        .await;

    // Every device of user 1 leaves, then one comes back: offline, then online (still away).
    drop((a1, a2));
    seen.expect(
        &mut b1,
        1,
        pb::Status::Offline,
        "the contact sees user 1 leave",
    )
    .await;
    let _a3 = Device::connect(&channel, &user(1))
        .await
        .expect("user 1 reconnects during the outage");
    seen.expect(
        &mut b1,
        1,
        pb::Status::Away,
        "the contact sees user 1 back, still away",
    )
    .await;

    // User 3 flaps, user 2 changes status on its device stream.
    drop(c1);
    seen.expect(
        &mut b1,
        3,
        pb::Status::Offline,
        "the contact sees user 3 leave",
    )
    .await;
    let _c2 = Device::connect(&channel, &user(3))
        .await
        .expect("user 3 reconnects during the outage");
    seen.expect(
        &mut b1,
        3,
        pb::Status::Online,
        "the contact sees user 3 back",
    )
    .await;
    b1.send(status_message(pb::Status::Busy)).await;
    seen.expect(
        &mut watcher,
        2,
        pb::Status::Busy,
        "the watcher sees user 2 busy",
    )
    .await;
    // The watcher saw everything the contact saw, and more.
    watcher.drain().iter().for_each(|p| seen.note(p));

    // Reads of users in memory are answered from memory; others need the database.
    let read = get_presence(&channel, &service(), &users)
        .await
        .expect("GetPresence of users in memory works during the outage");
    for p in &read {
        assert_eq!(
            Some(&p.version),
            seen.version.get(&p.user_id),
            "GetPresence answers the latest state from memory: {p:?}"
        );
    }
    let status = get_presence(&channel, &service(), &[99])
        .await
        .expect_err("a user never loaded cannot be read without the database");
    assert_eq!(
        status.code(),
        Code::Unavailable,
        "a read that needs the database fails cleanly, retryably: {status:?}"
    );

    let during = server.engine.stats();
    assert!(
        during.db_errors > before.db_errors,
        "the failed writes are counted: {during:?}"
    );
    assert!(
        during.dirty_users > 0,
        "the unwritten rows wait in memory: {during:?}"
    );
    assert!(faulty.refused() > 0, "the server did try the database");
    let stale = real
        .load_presence(&users.map(uid))
        .await
        .expect("the real database reads");
    assert!(
        stale
            .iter()
            .any(|r| Some(&r.version) < seen.version.get(&r.user_id.get())),
        "precondition: the outage kept changes from the database: {stale:?}"
    );

    tokio::time::sleep_until((down_at + OUTAGE).into()).await;
    let errors_during_outage = server.engine.stats().db_errors - before.db_errors;
    faulty.set_down(false);
    let up_at = Instant::now();

    // Nothing changes any more: memory is the truth the rows must reach.
    let truth = presence_as_service(&channel, &users).await;
    let mut previous: HashMap<u64, PresenceRow> =
        stale.iter().map(|r| (r.user_id.get(), r.clone())).collect();
    let converged_after = loop {
        let rows = real
            .load_presence(&users.map(uid))
            .await
            .expect("the real database reads");
        for r in &rows {
            if let Some(p) = previous.get(&r.user_id.get()) {
                assert!(
                    r.version >= p.version && r.last_seen >= p.last_seen,
                    "a stored row moved backwards: {p:?} then {r:?}"
                );
            }
            previous.insert(r.user_id.get(), r.clone());
        }
        let all_match = truth.iter().all(|t| {
            rows.iter()
                .find(|r| r.user_id.get() == t.user_id)
                .is_some_and(|r| row_matches(r, t))
        });
        if all_match {
            break up_at.elapsed();
        }
        assert!(
            up_at.elapsed() < Duration::from_secs(15),
            "rows did not converge within 15 s of the database coming back: \
             rows {rows:?}, memory {truth:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let healthy_after = wait_for_health(
        &channel,
        STORE_HEALTH,
        ServingStatus::Serving,
        Duration::from_secs(3),
    )
    .await;
    eprintln!(
        "outage of {OUTAGE:?}: presence.store NOT_SERVING {degraded_after:?} after it began; \
         {errors_during_outage} failed writes; rows converged {converged_after:?} after the \
         database came back, health SERVING {healthy_after:?} after convergence"
    );
    for r in previous.values() {
        let u = r.user_id.get();
        assert!(
            Some(&r.version) >= seen.version.get(&u),
            "no stored version is below one a client saw: {r:?}, seen {:?}",
            seen.version.get(&u)
        );
        assert!(
            r.last_seen >= seen.last_seen.get(&u).copied(),
            "no stored last_seen is below one a client saw: {r:?}, seen {:?}",
            seen.last_seen.get(&u)
        );
    }
    assert_eq!(
        server.engine.stats().dirty_users,
        0,
        "nothing is left unwritten"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_store_health_is_serving_from_the_start() {
    let _machine = exclusive().await;
    let server = TestServer::start(|_| {}).await;
    let channel = server.connection().await;
    assert_eq!(
        health(&channel, STORE_HEALTH).await.ok(),
        Some(ServingStatus::Serving),
        "a health checker of {STORE_HEALTH:?} gets SERVING from a healthy server, not NOT_FOUND"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_without_pending_changes_still_shows_in_health() {
    let _machine = exclusive().await;
    let (dir, url) = sqlite_dir();
    let real: Arc<dyn Store> = open_store(&url).await;
    real.migrate().await.expect("the test database migrates");
    let faulty = FaultyStore::new(real.clone());
    let settings = test_settings(&url, |s| s.checkpoint_interval_s = 1);
    let server = TestServer::start_with_store(settings, faulty.clone(), Some(dir)).await;
    let channel = server.connection().await;
    let _device = Device::connect(&channel, &user(1))
        .await
        .expect("user 1 connects");
    wait_for_row(&real, 1, "online", WAIT, |r| r.is_online).await;

    // Nobody changes anything: only the checkpoints of the online user hit the database.
    faulty.set_down(true);
    let took = wait_for_health(
        &channel,
        STORE_HEALTH,
        ServingStatus::NotServing,
        Duration::from_secs(4),
    )
    .await;
    eprintln!("outage with only checkpoints failing: NOT_SERVING after {took:?}");
    assert!(
        server.engine.stats().db_errors > 0,
        "the failed checkpoints are counted"
    );
}

/// Nothing listens on port 1 of the loopback.
const DEAD_MYSQL: &str = "mysql://root@127.0.0.1:1/none";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_started_while_the_database_is_down_keeps_running() {
    let _machine = exclusive().await;
    let mut process = ServerProcess::start(DEAD_MYSQL, &[]);
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(3) {
        assert!(
            process.is_running(),
            "the server does not exit while its database is down; stderr:\n{}",
            process.stderr()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_started_while_the_database_is_down_says_it_retries() {
    let _machine = exclusive().await;
    let mut process = ServerProcess::start(DEAD_MYSQL, &[]);
    process
        .wait_for_log("retrying", Duration::from_secs(10))
        .await;
    assert!(
        process.is_running(),
        "the server keeps running after saying it retries"
    );
}

//! Anti-flap grace: a device that drops and comes back within the grace produces no event at
//! all for contacts; a departure that lasts announces "offline" once the grace is over, with
//! last_seen = the real disconnect time, not the grace expiry.
use std::time::{Duration, Instant};

use presence::pb;

use crate::harness::{
    Device, TestServer, WAIT, Watcher, add_contacts, exclusive, last_seen, now_ms, user,
    wait_for_stats,
};

/// How far a server timestamp may be from the moment the test saw the event happen.
const TOLERANCE_MS: i64 = 200;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconnect_within_the_grace_is_invisible_and_last_seen_is_the_real_disconnect() {
    let _machine = exclusive().await;
    let grace = Duration::from_millis(1500);
    let server = TestServer::start(|s| s.offline_grace_ms = grace.as_millis() as u64).await;
    let channel = server.connection().await;
    add_contacts(&channel, &[(1, 2)]).await;
    let mut contact = Watcher::open(&channel, &user(2), &[]).await;

    let device = Device::connect(&server.connection().await, &user(1))
        .await
        .expect("user 1 connects");
    let online = contact.next_update_of(1, WAIT).await;
    assert_eq!(
        online.status(),
        pb::Status::Online,
        "positive control: the contact is told when user 1 comes online"
    );

    // The flap: the device goes, the server processes the departure (no device left: the
    // grace is running), and a device comes back well within the grace.
    let left = Instant::now();
    drop(device);
    wait_for_stats(&channel, "the device to be gone", WAIT, |s| {
        s.connections == 0
    })
    .await;
    let device = Device::connect(&server.connection().await, &user(1))
        .await
        .expect("user 1 reconnects");
    let back_after = left.elapsed();
    assert!(
        back_after < grace,
        "the reconnect must land within the grace to test it (took {back_after:?})"
    );
    assert_eq!(
        device.me().status(),
        pb::Status::Online,
        "the reconnected device sees itself online"
    );
    // Listen past the moment the grace would have run out.
    contact
        .expect_nothing(
            grace + Duration::from_millis(500),
            "a reconnect within the grace is no event at all for contacts",
        )
        .await;

    // The real departure: the offline announcement comes after the grace, and says when the
    // device really left.
    let before_drop = now_ms();
    let dropped = Instant::now();
    drop(device);
    wait_for_stats(&channel, "the device to be gone", WAIT, |s| {
        s.connections == 0
    })
    .await;
    let after_drop = now_ms();
    let offline = contact.next_update_of(1, grace + WAIT).await;
    let announced_after = dropped.elapsed();
    eprintln!(
        "grace: offline announced {announced_after:?} after the disconnect (grace {grace:?})"
    );
    assert_eq!(
        offline.status(),
        pb::Status::Offline,
        "user 1 is gone for good"
    );
    assert!(
        announced_after + Duration::from_millis(TOLERANCE_MS as u64) >= grace,
        "offline is announced only once the grace is over, not after {announced_after:?}"
    );
    let seen = last_seen(&offline).expect("the contact may see last_seen");
    assert!(
        seen >= before_drop - TOLERANCE_MS && seen <= after_drop + TOLERANCE_MS,
        "last_seen is the real disconnect time ({before_drop}..={after_drop} ms), not the \
         grace expiry (~{} ms): got {seen}",
        before_drop + grace.as_millis() as i64
    );
    assert!(
        offline.version > online.version,
        "the announcement is a new version"
    );
}

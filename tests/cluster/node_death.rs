//! kill -9 of a node: the only way to learn it died is its lease. Its users go offline on the
//! other nodes within TTL + 5 s, once, at its last renewal; a new process in its place brings
//! none of them back.
use std::time::{Duration, Instant};

use presence::pb::Status;

use crate::clients::{
    add_contacts, converge, device, last_seen, now_ms, presence_on, set_status, stats, status_of,
};
use crate::harness::{Cluster, LEASE_TTL_S, WAIT, exclusive, shared_redis};

const X: u64 = 1;
/// X's contact, on node C.
const W: u64 = 2;
/// Another contact of W, on node B: its changes prove nothing about X came in between.
const Y: u64 = 3;

#[tokio::test]
#[cfg_attr(
    redis_tests_off,
    ignore = "built with PRESENCE_TEST_REDIS=off: the Redis tests are not run"
)]
async fn a_killed_node_s_users_go_offline_once_and_stay_offline_after_a_restart() {
    let _turn = exclusive().await;
    let redis = shared_redis();
    let mut cluster = Cluster::start(&redis, 3).await;
    add_contacts(&cluster.nodes, &[(W, X), (W, Y)]).await;
    let mut contact = device(cluster.node(2), W).await;
    let _y = device(cluster.node(1), Y).await;
    contact.expect(Y, Status::Online, WAIT, "Y connected").await;
    let connected_at = now_ms();
    let x = device(cluster.node(0), X).await;
    let online = contact
        .expect(X, Status::Online, WAIT, "X connected on node A")
        .await;
    // Node A renews its lease once more after X connected, so X's last_seen at A's death is
    // that renewal and not the connect time.
    let a_id = cluster.node(0).cluster_id().await;
    cluster
        .wait_until("node A to renew its lease after X connected", WAIT, |c| {
            c.registrations()
                .get(&a_id)
                .is_some_and(|&t| t > connected_at)
        })
        .await;
    let before_kill = cluster.registrations();
    assert_eq!(
        before_kill.len(),
        3,
        "three nodes registered: {before_kill:?}"
    );

    let ttl = Duration::from_secs(LEASE_TTL_S);
    let killed_at = now_ms();
    let started = Instant::now();
    cluster.nodes[0].kill9();
    drop(x);
    let last_renewal = cluster.registrations()[&a_id];
    let offline = contact
        .expect(
            X,
            Status::Offline,
            ttl + Duration::from_secs(5),
            "node A died",
        )
        .await;
    let detection = started.elapsed();
    let detected_at = now_ms();
    eprintln!(
        "node_death: X seen offline on node C {} ms after kill -9 of node A (lease TTL {} s)",
        detection.as_millis(),
        LEASE_TTL_S
    );
    assert!(offline.version > online.version, "a newer version");
    let seen = last_seen(&offline).expect("a contact sees X's last_seen");
    eprintln!(
        "node_death: X's last_seen is {} ms after node A's last renewal, {} ms before the kill",
        seen - last_renewal,
        killed_at - seen
    );
    assert!(
        (last_renewal..=killed_at).contains(&seen),
        "last_seen {seen} is node A's last lease renewal ({last_renewal}), before the kill at {killed_at}"
    );

    // Exactly one survivor claimed node A. Let every survivor run two more lease rounds (each
    // looks for expired leases): a second claim would show up before Y's change.
    let after = cluster.registrations();
    assert_eq!(
        after.len(),
        2,
        "node A's registration was claimed: {after:?}"
    );
    let period = (ttl / 3).as_millis() as i64;
    cluster
        .wait_until("two more lease rounds on both survivors", WAIT, |c| {
            let r = c.registrations();
            r.len() == 2 && r.values().all(|&t| t > detected_at + period)
        })
        .await;
    set_status(cluster.node(1), Y, Status::Away).await;
    contact
        .expect(
            Y,
            Status::Away,
            WAIT,
            "X went offline once, not once per survivor",
        )
        .await;

    // A new process in node A's place, on the same database: no ghosts.
    cluster.restart(0).await;
    cluster
        .wait_until("the new node A to register", WAIT, |c| {
            c.registrations().len() == 3
        })
        .await;
    let now = cluster.registrations();
    let new_ids: Vec<&String> = now
        .keys()
        .filter(|k| !before_kill.contains_key(*k))
        .collect();
    assert_eq!(
        new_ids.len(),
        1,
        "the restart registers under a new id: {now:?}"
    );
    let (answer, _) = converge(&cluster.nodes, &[X], WAIT, |_| true).await;
    assert_eq!(
        (
            status_of(&answer[0]),
            answer[0].version,
            last_seen(&answer[0]),
            answer[0].connected
        ),
        (Status::Offline, offline.version, Some(seen), Some(false)),
        "every node, the new one too, has X offline as the claim left it"
    );
    let online_users = [
        stats(cluster.node(0)).await.online_users,
        stats(cluster.node(1)).await.online_users,
        stats(cluster.node(2)).await.online_users,
    ];
    assert_eq!(
        online_users,
        [0, 1, 1],
        "online users per node: none on the new node A, Y on B, W on C"
    );
    let everyone = presence_on(cluster.node(0), &[X, W, Y]).await;
    let connected: Vec<_> = everyone.iter().map(|p| (p.user_id, p.connected)).collect();
    assert_eq!(
        connected,
        [(X, Some(false)), (W, Some(true)), (Y, Some(true))],
        "only users with a live device are connected"
    );
    set_status(cluster.node(1), Y, Status::Busy).await;
    contact
        .expect(Y, Status::Busy, WAIT, "the restart changed nothing about X")
        .await;

    // X comes back on the new node: online again, with a newer version.
    let _x = device(cluster.node(0), X).await;
    let back = contact
        .expect(X, Status::Online, WAIT, "X reconnected on the new node A")
        .await;
    assert!(back.version > offline.version, "versions go on increasing");
    contact.drain();
}

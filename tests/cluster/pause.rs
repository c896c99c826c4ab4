//! A node frozen past its lease (SIGSTOP, like a long stall) is declared dead; when it runs
//! again (SIGCONT) it notices, registers its live devices again, and the cluster converges.
use std::time::{Duration, Instant};

use presence::pb::Status;

use crate::clients::{add_contacts, converge, device, last_seen, now_ms, stats, status_of};
use crate::harness::{Cluster, LEASE_TTL_S, WAIT, exclusive, shared_redis};

const X: u64 = 1;
/// X's contact, on node C.
const W: u64 = 2;

#[tokio::test]
#[cfg_attr(
    redis_tests_off,
    ignore = "built with PRESENCE_TEST_REDIS=off: the Redis tests are not run"
)]
async fn a_node_paused_past_its_lease_comes_back_and_the_cluster_converges() {
    let _turn = exclusive().await;
    let redis = shared_redis();
    let cluster = Cluster::start(&redis, 3).await;
    let [a, c] = [cluster.node(0), cluster.node(2)];
    add_contacts(&cluster.nodes, &[(W, X)]).await;
    let mut contact = device(c, W).await;
    let connected_at = now_ms();
    let mut x = device(a, X).await;
    let online = contact
        .expect(X, Status::Online, WAIT, "X connected on node A")
        .await;
    // Node A renews once after X connected: X's last_seen when A is declared dead is then A's
    // last renewal.
    let a_id = a.cluster_id().await;
    cluster
        .wait_until("node A to renew its lease after X connected", WAIT, |c| {
            c.registrations()
                .get(&a_id)
                .is_some_and(|&t| t > connected_at)
        })
        .await;

    let ttl = Duration::from_secs(LEASE_TTL_S);
    let paused_at = now_ms();
    let started = Instant::now();
    a.pause();
    let last_renewal = cluster.registrations()[&a_id];
    let offline = contact
        .expect(
            X,
            Status::Offline,
            ttl + Duration::from_secs(5),
            "node A froze past its lease",
        )
        .await;
    eprintln!(
        "pause: X seen offline on node C {} ms after SIGSTOP of node A (lease TTL {} s)",
        started.elapsed().as_millis(),
        LEASE_TTL_S
    );
    assert!(offline.version > online.version, "a newer version");
    let seen = last_seen(&offline).expect("a contact sees X's last_seen");
    assert!(
        (last_renewal..=paused_at).contains(&seen),
        "last_seen {seen} is node A's last renewal ({last_renewal}), before it froze at {paused_at}"
    );

    let resumed = Instant::now();
    a.resume();
    let back = contact
        .expect(X, Status::Online, WAIT, "node A runs again with X's device")
        .await;
    eprintln!(
        "pause: X seen online again on node C {} ms after SIGCONT",
        resumed.elapsed().as_millis()
    );
    assert!(back.version > offline.version, "a newer version again");
    let (answer, _) = converge(&cluster.nodes, &[X], WAIT, |p| {
        status_of(&p[0]) == Status::Online
    })
    .await;
    eprintln!(
        "pause: GetPresence agreed on every node {} ms after SIGCONT",
        resumed.elapsed().as_millis()
    );
    assert_eq!(answer[0].connected, Some(true), "X's device is live again");
    assert_eq!(
        answer[0].version, back.version,
        "the contact's last update is what every node answers"
    );

    // X's device saw its own presence follow the cluster's; its stream still works.
    x.barrier(1).await;
    let own = x.wait_for(X, Status::Online, WAIT).await;
    assert_eq!(own.version, back.version, "X's device converged too");
    let s = stats(a).await;
    assert_eq!(
        (s.online_users, s.connections),
        (1, 1),
        "node A still counts X's device"
    );
    x.drain();
    contact.drain();
}

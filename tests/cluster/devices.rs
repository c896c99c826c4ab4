//! A user with devices on two nodes is one presence: online once, offline once, and the
//! contacts on a third node see exactly that.
use presence::pb::Status;

use crate::clients::{
    add_contacts, device, last_seen, now_ms, set_status, status_of, user, watcher,
};
use crate::harness::{Cluster, WAIT, exclusive, shared_redis};

const X: u64 = 1;
/// X's contact, watching from node C.
const W: u64 = 2;
/// Another contact of W whose status changes prove that nothing about X came in between.
const Y: u64 = 3;

#[tokio::test]
#[cfg_attr(
    redis_tests_off,
    ignore = "built with PRESENCE_TEST_REDIS=off: the Redis tests are not run"
)]
async fn devices_on_two_nodes_are_one_presence_to_a_contact_on_a_third() {
    let _turn = exclusive().await;
    let redis = shared_redis();
    let cluster = Cluster::start(&redis, 3).await;
    let [a, b, c] = [cluster.node(0), cluster.node(1), cluster.node(2)];
    add_contacts(&cluster.nodes, &[(W, X), (W, Y)]).await;

    let mut phone = device(c, W).await;
    let mut watch = watcher(c, &user(W), &[]).await;
    assert!(
        watch
            .snapshot
            .iter()
            .all(|p| status_of(p) == Status::Offline),
        "nobody is online yet: {:?}",
        watch.snapshot
    );
    let _y = device(b, Y).await;
    for r in [&mut *phone, &mut *watch] {
        r.expect(Y, Status::Online, WAIT, "Y connected on node B")
            .await;
    }

    let x_on_a = device(a, X).await;
    for r in [&mut *phone, &mut *watch] {
        r.expect(X, Status::Online, WAIT, "X's first device, on node A")
            .await;
    }

    // A second device elsewhere changes nothing anyone can see. The control change arrives
    // after X's connect went through Redis (connect returns after the welcome, which follows the
    // shared transition), so an update of X would have come first.
    let x_on_b = device(b, X).await;
    set_status(b, Y, Status::Away).await;
    for r in [&mut *phone, &mut *watch] {
        r.expect(Y, Status::Away, WAIT, "X's second device is no news")
            .await;
    }

    // Closing one of the two devices: still online, no event. Redis shows when the disconnect
    // has been applied there (and published, if it were a change: same script).
    drop(x_on_a);
    cluster
        .wait_until("X's device on node A to leave Redis", WAIT, |c| {
            c.device_nodes(X) == 1
        })
        .await;
    set_status(b, Y, Status::Busy).await;
    for r in [&mut *phone, &mut *watch] {
        r.expect(Y, Status::Busy, WAIT, "X still has a device on node B")
            .await;
    }

    // Closing the last one: exactly one OFFLINE, with last_seen the time it closed.
    let closed_at = now_ms();
    drop(x_on_b);
    let mut offline_versions = Vec::new();
    for r in [&mut *phone, &mut *watch] {
        let p = r
            .expect(X, Status::Offline, WAIT, "X's last device closed")
            .await;
        let seen = last_seen(&p).expect("a contact sees X's last_seen");
        assert!(
            (closed_at - 50..=now_ms()).contains(&seen),
            "last_seen {seen} is when the last device closed (closed at {closed_at})"
        );
        offline_versions.push(p.version);
    }
    assert_eq!(
        offline_versions[0], offline_versions[1],
        "both receivers see the same version of one change"
    );
    cluster
        .wait_until("X's device on node B to leave Redis", WAIT, |c| {
            c.device_nodes(X) == 0
        })
        .await;
    set_status(b, Y, Status::Online).await;
    for r in [&mut *phone, &mut *watch] {
        r.expect(Y, Status::Online, WAIT, "X went offline once, not twice")
            .await;
        r.drain();
    }
}

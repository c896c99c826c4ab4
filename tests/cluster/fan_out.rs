//! Cross-node fan-out: a change on node A reaches a contact on node C once, in version order,
//! and every node answers GetPresence the same afterwards.
use presence::pb::Status;

use crate::clients::{
    add_contacts, converge, device, service, set_status, status_of, user, watcher,
};
use crate::harness::{Cluster, WAIT, exclusive, shared_redis};

const X: u64 = 1;
/// X's contact, on node C.
const W: u64 = 2;
/// Another contact of W, whose change closes the sequence.
const Y: u64 = 3;

#[tokio::test]
#[cfg_attr(
    redis_tests_off,
    ignore = "built with PRESENCE_TEST_REDIS=off: the Redis tests are not run"
)]
async fn a_contact_on_another_node_gets_each_update_once_in_version_order() {
    let _turn = exclusive().await;
    let redis = shared_redis();
    let cluster = Cluster::start(&redis, 3).await;
    let [a, b, c] = [cluster.node(0), cluster.node(1), cluster.node(2)];
    add_contacts(&cluster.nodes, &[(W, X), (W, Y)]).await;

    let mut contact = device(c, W).await;
    let mut contacts_watch = watcher(c, &user(W), &[]).await;
    let mut service_watch = watcher(b, &service(), &[X]).await;
    let mut own = device(a, X).await;
    for r in [&mut *contact, &mut *contacts_watch, &mut *service_watch] {
        r.expect(X, Status::Online, WAIT, "X connected on node A")
            .await;
    }
    let _y = device(b, Y).await;
    contact.expect(Y, Status::Online, WAIT, "Y connected").await;
    contacts_watch
        .expect(Y, Status::Online, WAIT, "Y connected")
        .await;

    // 20 changes, each answered by node A with the version it got.
    let mut sent = Vec::new();
    for i in 0..20 {
        let status = if i % 2 == 0 {
            Status::Away
        } else {
            Status::Busy
        };
        let p = set_status(a, X, status).await;
        assert_eq!(status_of(&p), status, "UpdateStatus answers the new status");
        sent.push((status, p.version));
    }
    assert!(
        sent.windows(2).all(|w| w[0].1 < w[1].1),
        "node A hands out increasing versions: {sent:?}"
    );

    // Each receiver gets exactly those 20, in that order, and then Y's change: nothing doubled,
    // nothing late.
    set_status(b, Y, Status::Away).await;
    for (name, r) in [
        ("X's contact on node C", &mut *contact),
        ("X's contact's watch on node C", &mut *contacts_watch),
        ("a service watch on node B", &mut *service_watch),
    ] {
        let mut got = Vec::new();
        for _ in 0..sent.len() {
            let p = r.next_update_of(X, WAIT).await;
            got.push((status_of(&p), p.version));
        }
        assert_eq!(got, sent, "{name} gets every update of X once, in order");
    }
    for r in [&mut *contact, &mut *contacts_watch] {
        r.expect(Y, Status::Away, WAIT, "no update of X after the 20th")
            .await;
    }
    // X's own device on node A sees its own 20 changes the same way.
    let mut got = Vec::new();
    for _ in 0..sent.len() {
        let p = own.next_update_of(X, WAIT).await;
        got.push((status_of(&p), p.version));
    }
    assert_eq!(got, sent, "X's own device gets each of its changes once");

    let last = *sent.last().expect("20 changes were sent");
    let (answer, took) = converge(&cluster.nodes, &[X], WAIT, |p| {
        (status_of(&p[0]), p[0].version) == last
    })
    .await;
    eprintln!(
        "fan_out: GetPresence agreed on every node {} ms after the last change was delivered",
        took.as_millis()
    );
    assert_eq!(
        answer[0].connected,
        Some(true),
        "a service sees X connected"
    );
    for r in [
        &mut *contact,
        &mut *contacts_watch,
        &mut *service_watch,
        &mut *own,
    ] {
        r.drain();
    }
}

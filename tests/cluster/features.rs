//! Issues 15 and 16 across nodes: a user's devices on several nodes are one aggregate (auto-away,
//! platforms) decided once; a backgrounded device misses changes made on other nodes and gets
//! one resync entry per user; a node dying with a passive device on it stops counting it; a
//! custom status expires exactly once, on the nodes that survive the one it was set on.
use std::time::{Duration, Instant};

use presence::pb::{self, Activity, Platform, Status, presence_client::PresenceClient};

use crate::clients::{
    add_contacts, device, device_as, now_ms, presence_on, set_status, status_of, user, watcher,
};
use crate::harness::{Cluster, LEASE_TTL_S, Node, WAIT, exclusive, shared_redis};

const X: u64 = 1;
/// X's contact, watching from another node.
const W: u64 = 2;
/// Another contact of W: its changes prove nothing about X came in between.
const Y: u64 = 3;

fn platforms(p: &pb::UserPresence) -> Vec<Platform> {
    p.platforms().collect()
}

fn idle_since_ms(p: &pb::UserPresence) -> Option<i64> {
    p.idle_since
        .as_ref()
        .map(|t| t.seconds * 1000 + i64::from(t.nanos) / 1_000_000)
}

/// Sets X's custom status through `node`, expiring at `expires_ms`.
async fn set_custom(node: &Node, id: u64, text: &str, expires_ms: i64) -> pb::UserPresence {
    let mut client = PresenceClient::new(node.channel.clone());
    let request = user(id).request(pb::SetCustomStatusRequest {
        custom_status: Some(pb::CustomStatus {
            text: text.into(),
            emoji: ":calendar:".into(),
            expires_at: Some(prost_types::Timestamp {
                seconds: expires_ms / 1000,
                nanos: ((expires_ms % 1000) * 1_000_000) as i32,
            }),
        }),
    });
    tokio::time::timeout(WAIT, client.set_custom_status(request))
        .await
        .expect("SetCustomStatus answers within the wait")
        .unwrap_or_else(|s| {
            panic!(
                "user {id} may set a custom status on node {}: {s:?}",
                node.name
            )
        })
        .into_inner()
}

#[tokio::test]
#[cfg_attr(
    redis_tests_off,
    ignore = "built with PRESENCE_TEST_REDIS=off: the Redis tests are not run"
)]
async fn devices_on_two_nodes_are_away_together_and_their_platforms_are_one_set() {
    let _turn = exclusive().await;
    let redis = shared_redis();
    let cluster = Cluster::start(&redis, 3).await;
    let [a, b, c] = [cluster.node(0), cluster.node(1), cluster.node(2)];
    add_contacts(&cluster.nodes, &[(W, X), (W, Y)]).await;
    let mut watch = watcher(c, &user(W), &[]).await;

    let desktop = device_as(a, X, Platform::Desktop).await;
    let first = watch
        .expect(X, Status::Online, WAIT, "X's desktop on node A")
        .await;
    assert_eq!(platforms(&first), [Platform::Desktop]);
    let phone = device_as(b, X, Platform::Mobile).await;
    let both = watch
        .expect(
            X,
            Status::Online,
            WAIT,
            "X's phone on node B: a new platform",
        )
        .await;
    assert_eq!(
        platforms(&both),
        [Platform::Desktop, Platform::Mobile],
        "distinct, ascending"
    );

    // One device idle of two: nothing anyone can see. The phone going to the background makes
    // every device inactive: away, since then.
    desktop.set_activity(Activity::Idle).await;
    let inactive_from = now_ms();
    phone.set_activity(Activity::Background).await;
    let away = watch
        .expect(X, Status::Away, WAIT, "both of X's devices are inactive")
        .await;
    let since = idle_since_ms(&away).expect("idle_since while auto-away");
    assert!(
        (inactive_from - 50..=now_ms()).contains(&since),
        "idle_since {since} is when the last device stopped being active (about {inactive_from})"
    );
    assert_eq!(
        platforms(&away),
        [Platform::Desktop, Platform::Mobile],
        "both still live"
    );
    // Everyone agrees: the aggregate was decided once.
    for node in [a, b, c] {
        let p = &presence_on(node, &[X]).await[0];
        assert_eq!(
            (status_of(p), p.version),
            (Status::Away, away.version),
            "node {}",
            node.name
        );
    }

    desktop.set_activity(Activity::Active).await;
    let back = watch
        .expect(X, Status::Online, WAIT, "one device active again")
        .await;
    assert_eq!(back.idle_since, None, "no idle_since once online");
    // A hand-picked BUSY is never changed by activity.
    set_status(b, X, Status::Busy).await;
    watch.expect(X, Status::Busy, WAIT, "X chose busy").await;
    desktop.set_activity(Activity::Idle).await;
    let _y = device(c, Y).await;
    watch
        .expect(
            Y,
            Status::Online,
            WAIT,
            "busy stays busy with every device inactive",
        )
        .await;
}

#[tokio::test]
#[cfg_attr(
    redis_tests_off,
    ignore = "built with PRESENCE_TEST_REDIS=off: the Redis tests are not run"
)]
async fn a_passive_device_misses_changes_made_on_another_node_and_gets_one_resync_entry() {
    let _turn = exclusive().await;
    let redis = shared_redis();
    let cluster = Cluster::start_with(&redis, 2, &[("PRESENCE_RATE_STATUS_PER_MIN", "100")]).await;
    let [a, b] = [cluster.node(0), cluster.node(1)];
    add_contacts(&cluster.nodes, &[(W, X)]).await;
    let _x = device(a, X).await;
    let mut passive = device(b, W).await;
    let mut active = device(b, W).await;
    passive.set_activity(Activity::Background).await;
    passive.barrier(1).await;
    passive.drain();

    let mut last = None;
    for i in 0..20 {
        last = Some(set_status(a, X, [Status::Away, Status::Busy][i % 2]).await);
    }
    let last = last.expect("20 changes");
    let deadline = Instant::now() + WAIT;
    let mut seen = 0;
    while seen < 20 {
        assert!(
            Instant::now() < deadline,
            "the active device got {seen} of 20 changes"
        );
        if active.next_update_of(X, WAIT).await.version <= last.version {
            seen += 1;
        }
    }
    passive.barrier(2).await;
    let missed = passive.drain();
    assert!(
        missed.is_empty(),
        "a backgrounded device gets no updates: {missed:?}"
    );

    passive.set_activity(Activity::Active).await;
    let resync = passive.expect_resync(WAIT, "the device woke").await.users;
    let of_x: Vec<u64> = resync
        .iter()
        .filter(|p| p.user_id == X)
        .map(|p| p.version)
        .collect();
    assert_eq!(
        of_x,
        [last.version],
        "one entry of X, the newest: {resync:?}"
    );
    assert!(
        resync.iter().all(|p| [X, W].contains(&p.user_id)),
        "only the contact and the user's own aggregate: {resync:?}"
    );
    set_status(a, X, Status::Online).await;
    let live = passive.next_update_of(X, WAIT).await;
    assert_eq!(live.version, last.version + 1, "live updates resume");
}

#[tokio::test]
#[cfg_attr(
    redis_tests_off,
    ignore = "built with PRESENCE_TEST_REDIS=off: the Redis tests are not run"
)]
async fn a_node_dying_with_a_passive_device_on_it_stops_counting_that_device() {
    let _turn = exclusive().await;
    let redis = shared_redis();
    let mut cluster = Cluster::start(&redis, 3).await;
    add_contacts(&cluster.nodes, &[(W, X), (W, Y)]).await;
    let mut watch = watcher(cluster.node(2), &user(W), &[]).await;
    let phone = device_as(cluster.node(0), X, Platform::Mobile).await;
    let desktop = device_as(cluster.node(1), X, Platform::Desktop).await;
    watch.wait_for(X, Status::Online, WAIT).await;
    let two = watch.next_update_of(X, WAIT).await;
    assert_eq!(platforms(&two), [Platform::Desktop, Platform::Mobile]);
    phone.set_activity(Activity::Background).await;
    desktop.set_activity(Activity::Idle).await;
    let away = watch
        .expect(X, Status::Away, WAIT, "both devices inactive")
        .await;

    let started = Instant::now();
    cluster.nodes[0].kill9();
    drop(phone);
    let after = watch
        .expect(
            X,
            Status::Away,
            Duration::from_secs(LEASE_TTL_S + 5),
            "the phone's node died: only the idle desktop counts",
        )
        .await;
    eprintln!(
        "features: the dead node's passive device stopped counting {} ms after kill -9",
        started.elapsed().as_millis()
    );
    assert_eq!(
        platforms(&after),
        [Platform::Desktop],
        "the dead node's platform is gone"
    );
    assert_eq!(after.version, away.version + 1);
    assert_eq!(
        idle_since_ms(&after),
        idle_since_ms(&away),
        "still idle since then"
    );

    desktop.set_activity(Activity::Active).await;
    let online = watch
        .expect(X, Status::Online, WAIT, "the surviving device is active")
        .await;
    assert_eq!(platforms(&online), [Platform::Desktop]);
    drop(desktop);
    watch
        .expect(X, Status::Offline, WAIT, "the last live device left")
        .await;
}

#[tokio::test]
#[cfg_attr(
    redis_tests_off,
    ignore = "built with PRESENCE_TEST_REDIS=off: the Redis tests are not run"
)]
async fn a_custom_status_expires_once_after_the_node_it_was_set_on_is_killed() {
    let _turn = exclusive().await;
    let redis = shared_redis();
    let mut cluster = Cluster::start(&redis, 3).await;
    add_contacts(&cluster.nodes, &[(W, X), (W, Y)]).await;
    let mut on_b = device(cluster.node(1), W).await;
    let mut on_c = watcher(cluster.node(2), &user(W), &[]).await;
    let x = device(cluster.node(0), X).await;
    for r in [&mut *on_b, &mut *on_c] {
        r.expect(X, Status::Online, WAIT, "X connected on node A")
            .await;
    }
    let expires_at = now_ms() + 6_000;
    let set = set_custom(cluster.node(0), X, "In a meeting", expires_at).await;
    for r in [&mut *on_b, &mut *on_c] {
        let p = r
            .expect(X, Status::Online, WAIT, "X set a custom status")
            .await;
        assert_eq!(
            p.custom_status.map(|c| c.text).as_deref(),
            Some("In a meeting")
        );
    }
    cluster.nodes[0].kill9();
    drop(x);
    for r in [&mut *on_b, &mut *on_c] {
        let p = r
            .expect(
                X,
                Status::Offline,
                Duration::from_secs(LEASE_TTL_S + 5),
                "node A died",
            )
            .await;
        assert!(
            p.custom_status.is_some(),
            "shown while offline, until it expires: {p:?}"
        );
        assert_eq!(p.version, set.version + 1);
    }
    let wait = Duration::from_millis((expires_at - now_ms()).max(0) as u64 + 1_000);
    for r in [&mut *on_b, &mut *on_c] {
        let p = r
            .expect(X, Status::Offline, wait, "X's custom status expired")
            .await;
        assert_eq!(p.custom_status, None, "cleared: {p:?}");
        assert!(
            now_ms() - expires_at < 1_000,
            "pushed within 1 s of its expiry"
        );
        assert_eq!(
            p.version,
            set.version + 2,
            "one clear, whichever node made it"
        );
    }
    // Exactly once: Y's change is the next thing both see.
    let _y = device(cluster.node(1), Y).await;
    for r in [&mut *on_b, &mut *on_c] {
        r.expect(Y, Status::Online, WAIT, "nothing more of X").await;
    }
    for node in &cluster.nodes[1..] {
        let p = &presence_on(node, &[X]).await[0];
        assert_eq!(
            (p.custom_status.as_ref(), p.version),
            (None, set.version + 2),
            "node {}",
            node.name
        );
    }
}

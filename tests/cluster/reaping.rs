//! A dead node's users, many of them (issue 13): 10,000 users whose devices were on a node
//! killed with SIGKILL go offline exactly once, within the lease TTL + 5 s, and leave nothing
//! behind in Redis; and when the node reaping them is killed halfway, another finishes the job.
use std::collections::HashMap;
use std::time::{Duration, Instant};

use presence::pb::Status;

use crate::clients::{Watcher, connect_many, service, status_of, watcher};
use crate::harness::{Cluster, LEASE_TTL_S, Node, WAIT, exclusive, shared_redis};

const USERS: u64 = 10_000;
const FIRST: u64 = 100_000;

fn ids() -> Vec<u64> {
    (FIRST..FIRST + USERS).collect()
}

/// Service watchers of `ids` on `node`, 1,000 ids each (the per-request limit).
async fn watchers_of(node: &Node, ids: &[u64]) -> Vec<Watcher> {
    let mut watchers = Vec::new();
    for chunk in ids.chunks(1000) {
        watchers.push(watcher(node, &service(), chunk).await);
    }
    watchers
}

/// Reads every watcher until each of `ids` was seen `want`; returns how many times each was
/// seen so, and how long it took. Panics after `within`.
async fn until_every(
    watchers: &mut [Watcher],
    ids: &[u64],
    want: Status,
    within: Duration,
) -> (HashMap<u64, usize>, Duration) {
    let started = Instant::now();
    let mut seen: HashMap<u64, usize> = HashMap::new();
    loop {
        for w in watchers.iter_mut() {
            for p in w.drain() {
                if status_of(&p) == want {
                    *seen.entry(p.user_id).or_default() += 1;
                }
            }
        }
        if ids.iter().all(|u| seen.contains_key(u)) {
            return (seen, started.elapsed());
        }
        assert!(
            started.elapsed() < within,
            "only {} of {} users were seen {want:?} within {within:?}",
            seen.len(),
            ids.len()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Keeps reading for `during`: any further `want` of a user is a duplicate.
async fn no_more(
    watchers: &mut [Watcher],
    seen: &mut HashMap<u64, usize>,
    want: Status,
    during: Duration,
) {
    let until = Instant::now() + during;
    while Instant::now() < until {
        for w in watchers.iter_mut() {
            for p in w.drain() {
                if status_of(&p) == want {
                    *seen.entry(p.user_id).or_default() += 1;
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
#[cfg_attr(
    redis_tests_off,
    ignore = "built with PRESENCE_TEST_REDIS=off: the Redis tests are not run"
)]
async fn ten_thousand_users_of_a_killed_node_go_offline_exactly_once_and_leave_nothing_in_redis() {
    let _turn = exclusive().await;
    let redis = shared_redis();
    let mut cluster = Cluster::start(&redis, 2).await;
    let ids = ids();
    let mut watchers = watchers_of(cluster.node(1), &ids).await;
    let opened = Instant::now();
    let devices = connect_many(cluster.node(0), &ids, 10).await;
    eprintln!(
        "reaping: {USERS} devices connected on node A in {} ms",
        opened.elapsed().as_millis()
    );
    until_every(&mut watchers, &ids, Status::Online, WAIT * 6).await;
    let a = cluster.node(0).cluster_id().await;

    let killed = Instant::now();
    cluster.nodes[0].kill9();
    drop(devices);
    let ttl = Duration::from_secs(LEASE_TTL_S);
    let (mut seen, took) = until_every(
        &mut watchers,
        &ids,
        Status::Offline,
        ttl + Duration::from_secs(5),
    )
    .await;
    eprintln!(
        "reaping: all {USERS} users of the killed node seen offline on node B {} ms after kill -9 (lease TTL {LEASE_TTL_S} s)",
        killed.elapsed().as_millis()
    );
    assert!(took <= ttl + Duration::from_secs(5));
    no_more(&mut watchers, &mut seen, Status::Offline, ttl).await;
    let twice: Vec<_> = seen.iter().filter(|(_, n)| **n != 1).collect();
    assert!(
        twice.is_empty(),
        "every user goes offline exactly once: {twice:?}"
    );

    let left = cluster
        .wait_until("the reaped users to leave Redis", WAIT * 2, |c| {
            c.users_known(&ids) == 0 && c.node_users(&a) == 0
        })
        .await;
    eprintln!(
        "reaping: no per-user state left in Redis {} ms after the last user went offline",
        left.as_millis()
    );
}

#[tokio::test]
#[cfg_attr(
    redis_tests_off,
    ignore = "built with PRESENCE_TEST_REDIS=off: the Redis tests are not run"
)]
async fn a_reaper_killed_halfway_is_taken_over_and_every_user_goes_offline_once() {
    let _turn = exclusive().await;
    let redis = shared_redis();
    // Small batches, so that the reap takes long enough to be interrupted; frequent flushes, so
    // that the reaper is likely killed with rows written and users half released (with a sleep
    // between the two steps of a flush, the reaper killed there left hashes nobody deleted).
    let cluster_env = [
        ("PRESENCE_REAP_BATCH", "50"),
        ("PRESENCE_FLUSH_INTERVAL_MS", "100"),
    ];
    let mut cluster = Cluster::start_with(&redis, 3, &cluster_env).await;
    let ids = ids();
    let mut on_b = watchers_of(cluster.node(1), &ids).await;
    let mut on_c = watchers_of(cluster.node(2), &ids).await;
    let devices = connect_many(cluster.node(0), &ids, 10).await;
    until_every(&mut on_b, &ids, Status::Online, WAIT * 6).await;
    until_every(&mut on_c, &ids, Status::Online, WAIT * 6).await;
    let a = cluster.node(0).cluster_id().await;
    let b = cluster.node(1).cluster_id().await;

    let killed = Instant::now();
    cluster.nodes[0].kill9();
    drop(devices);
    let claimer = {
        let started = Instant::now();
        loop {
            if let Some(c) = cluster.claimer_of(&a) {
                break c;
            }
            assert!(started.elapsed() < WAIT * 2, "nobody claimed the dead node");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    };
    let (reaper, survivor) = if claimer == b { (1, 2) } else { (2, 1) };
    cluster
        .wait_until("the reaper to be halfway", WAIT * 4, |c| {
            c.node_users(&a) as u64 <= USERS / 2
        })
        .await;
    let remaining = cluster.node_users(&a);
    cluster.nodes[reaper].kill9();
    eprintln!(
        "reaping: the reaper (node {}) killed {} ms after node A, with {remaining} of {USERS} users left to drop",
        cluster.nodes[reaper].name,
        killed.elapsed().as_millis()
    );
    let watchers = if survivor == 1 { &mut on_b } else { &mut on_c };
    let ttl = Duration::from_secs(LEASE_TTL_S);
    let (mut seen, _) = until_every(
        watchers,
        &ids,
        Status::Offline,
        2 * ttl + Duration::from_secs(5),
    )
    .await;
    eprintln!(
        "reaping: all {USERS} users seen offline on the survivor {} ms after node A's kill",
        killed.elapsed().as_millis()
    );
    no_more(watchers, &mut seen, Status::Offline, ttl).await;
    let twice: Vec<_> = seen.iter().filter(|(_, n)| **n != 1).collect();
    assert!(
        twice.is_empty(),
        "every user goes offline exactly once: {twice:?}"
    );
    let left = cluster
        .wait_until("every reaped user to leave Redis", WAIT * 3, |c| {
            c.users_known(&ids) == 0 && c.node_users(&a) == 0
        })
        .await;
    eprintln!(
        "reaping: no per-user state left in Redis {} ms later",
        left.as_millis()
    );
}

//! Nodes on ONE MySQL database and one Redis, as operators run them (issue 13): a node's start
//! or stop touches nobody else's users, versions grow by the changes made and nothing more, and
//! a node killed while others run is recovered for its own users only.
use presence::pb::Status;

use crate::clients::{add_contacts, converge, device, presence_on, set_status, status_of};
use crate::harness::{Cluster, Database, WAIT, exclusive, shared_redis};

const X: u64 = 1;
const W: u64 = 2;
const Y: u64 = 3;
const NEVER: u64 = 999;

#[tokio::test]
#[cfg_attr(
    any(not(mysql_tests), redis_tests_off),
    ignore = "needs PRESENCE_TEST_MYSQL_URL set (and not PRESENCE_TEST_REDIS=off) when built"
)]
async fn nodes_starting_and_stopping_in_turn_on_one_database_touch_nobody_elses_users() {
    let _turn = exclusive().await;
    let redis = shared_redis();
    let database = Database::mysql().await;
    let mut cluster = Cluster::start_on(database, &redis, 1, &[]).await;
    add_contacts(&cluster.nodes, &[(W, X)]).await;
    let _x = device(cluster.node(0), X).await;
    let (before, _) = converge(&cluster.nodes, &[X], WAIT, |p| {
        status_of(&p[0]) == Status::Online
    })
    .await;

    // Node B starts on the same database, then node C; B stops cleanly.
    let b = cluster.spawn(1, &[]).await;
    cluster.nodes.push(b);
    let c = cluster.spawn(2, &[]).await;
    cluster.nodes.push(c);
    let (after, _) = converge(&cluster.nodes, &[X, NEVER], WAIT, |_| true).await;
    assert_eq!(
        (status_of(&after[0]), after[0].version),
        (Status::Online, before[0].version),
        "starting nodes changed nothing about X, who is online on node A"
    );
    assert_eq!(
        (status_of(&after[1]), after[1].version),
        (Status::Offline, 0),
        "a never-seen user is version 0 on every node"
    );
    cluster.nodes.remove(1);
    let (after_stop, _) = converge(&cluster.nodes, &[X], WAIT, |_| true).await;
    assert_eq!(
        (status_of(&after_stop[0]), after_stop[0].version),
        (Status::Online, before[0].version),
        "a node's clean stop changes nothing about another node's users"
    );

    // A contact on node C sees X's changes made on node A, each exactly one version up.
    let mut w = device(cluster.node(1), W).await;
    assert_eq!(status_of(&w.contact(X)), Status::Online);
    let busy = set_status(cluster.node(0), X, Status::Busy).await;
    assert_eq!(
        busy.version,
        before[0].version + 1,
        "one change, one version"
    );
    w.expect(X, Status::Busy, WAIT, "X went busy on node A")
        .await;
}

#[tokio::test]
#[cfg_attr(
    any(not(mysql_tests), redis_tests_off),
    ignore = "needs PRESENCE_TEST_MYSQL_URL set (and not PRESENCE_TEST_REDIS=off) when built"
)]
async fn a_node_killed_while_others_run_is_recovered_for_its_own_users_only() {
    let _turn = exclusive().await;
    let redis = shared_redis();
    let database = Database::mysql().await;
    let mut cluster = Cluster::start_on(database, &redis, 3, &[]).await;
    add_contacts(&cluster.nodes, &[(W, X), (W, Y)]).await;
    let _x = device(cluster.node(0), X).await;
    let _y = device(cluster.node(1), Y).await;
    let mut w = device(cluster.node(2), W).await;
    let y_before = presence_on(cluster.node(2), &[Y]).await.remove(0);

    cluster.nodes[0].kill9();
    let offline = w.wait_for(X, Status::Offline, WAIT * 2).await;
    cluster.nodes.remove(0);
    let (now, _) = converge(&cluster.nodes, &[X, Y], WAIT, |p| {
        status_of(&p[0]) == Status::Offline
    })
    .await;
    assert_eq!(
        now[0].version, offline.version,
        "X offline once, everywhere"
    );
    assert_eq!(
        (status_of(&now[1]), now[1].version),
        (Status::Online, y_before.version),
        "Y, on a node that kept running, is untouched by the recovery"
    );
    set_status(cluster.node(0), Y, Status::Away).await;
    w.expect(
        Y,
        Status::Away,
        WAIT,
        "nothing more about X came in between",
    )
    .await;
}

/// The row of `user` as the shared database holds it, polled until `want` holds of it.
async fn row_until(
    cluster: &Cluster,
    user: u64,
    want: impl Fn(&presence::store::PresenceRow) -> bool,
) -> presence::store::PresenceRow {
    let store = presence::store::connect(&cluster.database.url())
        .await
        .expect("the test opens the shared database");
    let id = presence::domain::UserId::parse(user).expect("a valid id");
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let rows = store.load_presence(&[id]).await.expect("rows load");
        if let Some(row) = rows.into_iter().next()
            && want(&row)
        {
            return row;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "user {user}'s row did not reach the database within {WAIT:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

async fn changes_made_on_a_node_reach_the_database(database: Database) {
    let _turn = exclusive().await;
    let redis = shared_redis();
    let cluster = Cluster::start_on(database, &redis, 2, &[]).await;
    let _x = device(cluster.node(0), X).await;
    let busy = set_status(cluster.node(1), X, Status::Busy).await;
    let row = row_until(&cluster, X, |r| r.version >= busy.version).await;
    assert_eq!(
        (row.chosen, row.version),
        (presence::domain::Status::Busy, busy.version),
        "the node that made the change wrote its row"
    );
    let stats = crate::clients::stats(cluster.node(1)).await;
    assert!(stats.changes >= 1, "and counted it: {stats:?}");
}

#[tokio::test]
#[cfg_attr(
    redis_tests_off,
    ignore = "built with PRESENCE_TEST_REDIS=off: the Redis tests are not run"
)]
async fn changes_made_on_a_node_reach_the_shared_sqlite_database() {
    changes_made_on_a_node_reach_the_database(Database::sqlite()).await;
}

#[tokio::test]
#[cfg_attr(
    any(not(mysql_tests), redis_tests_off),
    ignore = "needs PRESENCE_TEST_MYSQL_URL set (and not PRESENCE_TEST_REDIS=off) when built"
)]
async fn changes_made_on_a_node_reach_the_shared_mysql_database() {
    changes_made_on_a_node_reach_the_database(Database::mysql().await).await;
}

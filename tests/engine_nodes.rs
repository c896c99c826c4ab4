//! Multi-node logic of the engine without Redis: engines in this process share an in-memory
//! backplane (`cluster::memory`) and one SQLite file, as nodes share Redis and a database. What
//! the Redis cluster suite checks with processes, here it is checked in milliseconds: a change
//! decided once and heard everywhere, an outage and its reconciliation, a dead node reaped.
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use presence::cluster::memory::MemoryHub;
use presence::cluster::{Backplane, Transition};
use presence::domain::{Platform, PresenceView, Status, UserId, Viewer};
use presence::engine::{Engine, EngineConfig, Event, EventStream};
use presence::rules::{Devices, Op, Presence};
use presence::store::{self, Store};

const WAIT: Duration = Duration::from_secs(5);
const TTL: Duration = Duration::from_millis(300);

fn uid(id: u64) -> UserId {
    UserId::parse(id).expect("positive")
}

fn config() -> EngineConfig {
    EngineConfig {
        offline_grace: Duration::ZERO,
        flush_interval: Duration::from_millis(50),
        delivery_batch: Duration::ZERO,
        node_ttl: TTL,
        ..EngineConfig::default()
    }
}

struct Nodes {
    hub: Arc<MemoryHub>,
    store: Arc<dyn Store>,
    engines: Vec<Engine>,
    _dir: tempfile::TempDir,
}

async fn nodes(n: usize) -> Nodes {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let url = format!("sqlite://{}", dir.path().join("p.db").display());
    let store = store::connect(&url).await.expect("SQLite opens");
    store.migrate().await.expect("it migrates");
    let hub = MemoryHub::new();
    let mut engines = Vec::new();
    for i in 0..n {
        let name = format!("node-{i}");
        let bp: Arc<dyn Backplane> = hub.backplane(&name, TTL);
        engines.push(
            Engine::start(store.clone(), config(), Arc::from(name.as_str()), Some(bp))
                .await
                .expect("the engine starts"),
        );
    }
    Nodes {
        hub,
        store,
        engines,
        _dir: dir,
    }
}

/// The next presence update of `user` on a stream, within [`WAIT`].
async fn next_of(stream: &mut EventStream, user: u64) -> PresenceView {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        match tokio::time::timeout_at(deadline, stream.next()).await {
            Ok(Some(Event::Presence(p))) if p.view().user_id == uid(user) => {
                return p.view().clone();
            }
            Ok(Some(_)) => continue,
            Ok(None) => panic!("the stream ended while waiting for user {user}"),
            Err(_) => panic!("no update of user {user} within {WAIT:?}"),
        }
    }
}

/// Polls every engine until they all answer `want` for `user` (as a service sees it).
async fn converge(
    engines: &[Engine],
    user: u64,
    want: impl Fn(&PresenceView) -> bool,
) -> Vec<PresenceView> {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let mut views = Vec::new();
        for e in engines {
            views.push(
                e.get_presence(Viewer::Service, &[uid(user)])
                    .await
                    .expect("reads")
                    .remove(0),
            );
        }
        let same = views
            .windows(2)
            .all(|w| w[0].same_content(&w[1]) && w[0].version == w[1].version);
        if same && want(&views[0]) {
            return views;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no agreement on user {user}: {views:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_on_one_node_is_seen_by_a_watcher_on_another_once_per_change() {
    let n = nodes(2).await;
    let (mut watch, snapshot) = n.engines[1]
        .watch(Viewer::Service, &[uid(1)])
        .await
        .expect("watch");
    assert_eq!(snapshot[0].status, Status::Offline);
    let device = n.engines[0]
        .connect_device(uid(1), Platform::Desktop)
        .await
        .expect("connects");
    let online = next_of(&mut watch, 1).await;
    assert_eq!((online.status, online.version), (Status::Online, 1));
    assert!(online.platforms.contains(Platform::Desktop), "{online:?}");
    n.engines[1]
        .update_status(uid(1), Status::Busy)
        .await
        .expect("status");
    let busy = next_of(&mut watch, 1).await;
    assert_eq!(
        (busy.status, busy.version),
        (Status::Busy, 2),
        "one change, one version, whichever node made it"
    );
    drop(device);
    let offline = next_of(&mut watch, 1).await;
    assert_eq!((offline.status, offline.version), (Status::Offline, 3));
    converge(&n.engines, 1, |p| p.status == Status::Offline).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_made_while_the_backplane_is_down_are_reconciled_when_it_returns_empty() {
    let n = nodes(2).await;
    let x = n.engines[0]
        .connect_device(uid(1), Platform::Mobile)
        .await
        .expect("connects");
    let _y = n.engines[1]
        .connect_device(uid(2), Platform::Web)
        .await
        .expect("connects");
    converge(&n.engines, 1, |p| p.status == Status::Online).await;
    converge(&n.engines, 2, |p| p.status == Status::Online).await;

    n.hub.set_down(true);
    drop(x);
    n.engines[1]
        .update_status(uid(2), Status::Busy)
        .await
        .expect("served from memory");
    // Each node decided its own change alone meanwhile.
    let local = n.engines[1]
        .get_presence(Viewer::Service, &[uid(2)])
        .await
        .expect("reads");
    assert_eq!(local[0].status, Status::Busy);

    n.hub.wipe();
    n.hub.set_down(false);
    converge(&n.engines, 1, |p| p.status == Status::Offline).await;
    converge(&n.engines, 2, |p| {
        p.status == Status::Busy && p.connected == Some(true)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_whose_lease_runs_out_is_reaped_and_its_users_go_offline() {
    let n = nodes(1).await;
    // A node that reports a device of user 5 and then falls silent.
    let ghost = n.hub.backplane("ghost", TTL);
    ghost.renew().await.expect("the ghost registers");
    ghost
        .transition(vec![Transition {
            user: uid(5),
            op: Op::Devices {
                seq: 1,
                devices: Devices::one(presence::domain::Activity::Active, Platform::Web),
                grace: None,
            },
            seed: Presence::default(),
            at: presence::domain::now_millis(),
        }])
        .await
        .expect("the ghost reports its device");
    let (mut watch, snapshot) = n.engines[0]
        .watch(Viewer::Service, &[uid(5)])
        .await
        .expect("watch");
    assert_eq!(
        snapshot[0].status,
        Status::Online,
        "user 5 is online through the ghost"
    );
    let offline = next_of(&mut watch, 5).await;
    assert_eq!(
        offline.status,
        Status::Offline,
        "the ghost's lease ran out: its device is gone"
    );
    let shared = n.hub.presence(uid(5));
    assert!(
        shared.as_ref().is_none_or(|p| p.live().total == 0),
        "no device left: {shared:?}"
    );
    // The reaper wrote the row the ghost owed.
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let rows = n.store.load_presence(&[uid(5)]).await.expect("rows load");
        if rows
            .first()
            .is_some_and(|r| !r.is_online && r.version == offline.version)
        {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the reaper writes the row: {rows:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

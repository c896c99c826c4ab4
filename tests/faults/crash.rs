//! kill -9 for real, on a `presence serve` process: what was online comes back offline with an
//! honest last_seen (its last checkpoint), and no client ever sees a version go backwards.
use std::time::Duration;

use presence::pb;

use crate::harness::{
    Device, ServerProcess, WAIT, Watcher, connect, exclusive, get_presence, last_seen, now_ms,
    open_store, row, service, sqlite_dir, status_message, update_status, user, wait_for_row,
};

/// Settings every process in this module shares: no grace, so that "offline" is immediate.
const BASE: [(&str, &str); 1] = [("PRESENCE_OFFLINE_GRACE_MS", "0")];

fn env<'a>(extra: &[(&'a str, &'a str)]) -> Vec<(&'a str, &'a str)> {
    BASE.iter().chain(extra).copied().collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_kill_9_users_who_were_online_are_offline_since_their_last_checkpoint() {
    let _machine = exclusive().await;
    let (_dir, url) = sqlite_dir();
    let settings = env(&[
        ("PRESENCE_CHECKPOINT_INTERVAL_S", "1"),
        ("PRESENCE_FLUSH_INTERVAL_MS", "50"),
    ]);
    let mut server = ServerProcess::serve(&url, &settings).await;
    let channel = connect(server.addr()).await;
    let device = Device::connect(&channel, &user(1))
        .await
        .expect("user 1 connects");
    let connected_at = last_seen(&device.me()).expect("an online user has a last_seen");

    // Wait for a checkpoint clearly later than the connect, so the three candidate answers
    // (connect time, last checkpoint, restart time) are far apart.
    let store = open_store(&url).await;
    wait_for_row(
        &store,
        1,
        "a checkpoint at least 1.5 s after the connect",
        Duration::from_secs(10),
        |r| r.checkpoint_at.is_some_and(|c| c >= connected_at + 1500),
    )
    .await;
    server.kill9();
    drop(device);
    let killed_at = now_ms();
    // The process is gone: what the database holds now is all a restart can know.
    let left = row(&store, 1).await.expect("user 1 has a row");
    assert!(
        left.is_online,
        "the crashed run left user 1 online: {left:?}"
    );
    let checkpoint = left.checkpoint_at.expect("the row carries its checkpoint");
    // The server stays down a second, so the restart time is far from the checkpoint too.
    let down_for = Duration::from_millis((checkpoint + 1000 - now_ms()).max(0) as u64);
    tokio::time::sleep(down_for).await;

    let restarted = ServerProcess::serve(&url, &settings).await;
    let restarted_at = now_ms();
    let channel = connect(restarted.addr()).await;
    let seen = get_presence(&channel, &service(), &[1])
        .await
        .expect("a service may read presence")
        .remove(0);
    eprintln!(
        "crash recovery: connected at {connected_at}, last checkpoint {checkpoint} \
         ({} ms later), killed at {killed_at}, restarted at {restarted_at}: last_seen {:?}",
        checkpoint - connected_at,
        last_seen(&seen)
    );
    assert_eq!(
        seen.status(),
        pb::Status::Offline,
        "a user whose device died with the server is offline after the restart"
    );
    assert_eq!(
        seen.connected,
        Some(false),
        "no device is connected after a restart"
    );
    assert_eq!(
        last_seen(&seen),
        Some(checkpoint),
        "last_seen is the last checkpoint ({checkpoint}), not the connect time \
         ({connected_at}) nor the restart time ({restarted_at})"
    );
    let recovered = row(&store, 1).await.expect("user 1 has a row");
    assert!(
        !recovered.is_online && recovered.last_seen == Some(checkpoint),
        "the row is recovered the same way: {recovered:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn versions_never_go_backwards_across_kill_9() {
    let _machine = exclusive().await;
    let (_dir, url) = sqlite_dir();
    let mut max_seen = 0u64;

    // Run 1 leaves a flushed row behind (clean shutdown), so the crashed run starts from a
    // stored version, as in production.
    let mut first = ServerProcess::serve(&url, &env(&[("PRESENCE_FLUSH_INTERVAL_MS", "50")])).await;
    {
        let channel = connect(first.addr()).await;
        let mut watcher = Watcher::open(&channel, &service(), &[1]).await;
        let device = Device::connect(&channel, &user(1))
            .await
            .expect("user 1 connects");
        note(&device.me(), &mut max_seen);
        update_status(&channel, &user(1), pb::Status::Away)
            .await
            .expect("user 1 may change status");
        drop(device);
        loop {
            let p = watcher.next_update_of(1, WAIT).await;
            note(&p, &mut max_seen);
            if p.status() == pb::Status::Offline {
                break;
            }
        }
    }
    first.terminate(Duration::from_secs(15)).await;
    let store = open_store(&url).await;
    let flushed = row(&store, 1).await.expect("run 1 flushed user 1");
    assert_eq!(
        flushed.version, max_seen,
        "run 1 flushed its last version on shutdown"
    );

    // Run 2: changes are seen by a watcher but never flushed, then the process dies.
    let mut crashing = ServerProcess::serve(
        &url,
        &env(&[
            ("PRESENCE_FLUSH_INTERVAL_MS", "60000"),
            ("PRESENCE_CHECKPOINT_INTERVAL_S", "3600"),
        ]),
    )
    .await;
    let channel = connect(crashing.addr()).await;
    let mut watcher = Watcher::open(&channel, &service(), &[1]).await;
    note(&watcher.snapshot[0], &mut max_seen);
    let device = Device::connect(&channel, &user(1))
        .await
        .expect("user 1 connects");
    note(&device.me(), &mut max_seen);
    note(&watcher.next_update_of(1, WAIT).await, &mut max_seen);
    for status in [
        pb::Status::Busy,
        pb::Status::Away,
        pb::Status::Online,
        pb::Status::Busy,
    ] {
        device.send(status_message(status)).await;
        let p = watcher.next_update_of(1, WAIT).await;
        assert_eq!(p.status(), status, "the watcher sees each change");
        note(&p, &mut max_seen);
    }
    let stored = row(&store, 1).await.expect("user 1 has a row");
    assert!(
        stored.version < max_seen,
        "precondition: the changes of run 2 are not flushed (stored {}, seen {max_seen})",
        stored.version
    );
    crashing.kill9();
    drop((device, watcher, channel));

    // Run 3: whatever any client sees first of user 1 is above everything seen before.
    let restarted = ServerProcess::serve(&url, &env(&[("PRESENCE_FLUSH_INTERVAL_MS", "50")])).await;
    let channel = connect(restarted.addr()).await;
    let mut watcher = Watcher::open(&channel, &service(), &[1]).await;
    let snapshot = watcher.snapshot[0].clone();
    let read = get_presence(&channel, &service(), &[1])
        .await
        .expect("a service may read presence")
        .remove(0);
    let device = Device::connect(&channel, &user(1))
        .await
        .expect("user 1 connects again");
    let update = watcher.next_update_of(1, WAIT).await;
    eprintln!(
        "versions across kill -9: highest seen before {max_seen}, flushed {}, after restart: \
         snapshot {}, GetPresence {}, own welcome {}, next update {}",
        stored.version,
        snapshot.version,
        read.version,
        device.me().version,
        update.version
    );
    for (what, version) in [
        ("the first snapshot", snapshot.version),
        ("GetPresence", read.version),
        ("the device's own welcome", device.me().version),
        ("the next update", update.version),
    ] {
        assert!(
            version > max_seen,
            "{what} after kill -9 shows version {version}, not above {max_seen} seen before"
        );
    }
    assert!(
        update.version > snapshot.version,
        "versions keep growing after the restart"
    );
}

/// Records a version some client saw.
fn note(p: &pb::UserPresence, max_seen: &mut u64) {
    assert_eq!(p.user_id, 1, "only user 1 is watched");
    *max_seen = (*max_seen).max(p.version);
}

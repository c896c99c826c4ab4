//! Who receives a change: contacts and the user's own other devices, nobody else; contact pairs
//! added and removed while streams are open; WatchContacts; a receiver that never reads.
use presence::pb::Status::{Away, Busy, Offline, Online};
use tonic::transport::Endpoint;

use crate::helpers::*;

#[tokio::test]
async fn only_contacts_and_own_other_devices_receive_a_change() {
    let app = spawn_app(|_| {}).await;
    app.add_contacts(&[(1, 2), (3, 4)]).await;
    let mut contact = app.device(&user(2)).await;
    let mut stranger = app.device(&user(3)).await;
    let mut stranger_watcher = app.watcher(&user(3), &[]).await;
    let mut phone = Device::connect(&app, &user(1), "phone").await.unwrap();
    let mut laptop = Device::connect(&app, &user(1), "laptop").await.unwrap();
    contact.next_update().await;

    app.update_status(&user(1), Away).await.unwrap();

    let seen = contact.next_update().await;
    assert_eq!(
        (seen.user_id, seen.status()),
        (1, Away),
        "a contact is told"
    );
    for (name, device) in [("phone", &mut phone), ("laptop", &mut laptop)] {
        let own = device.next_update().await;
        assert_eq!(
            (own.user_id, own.status(), own.version),
            (1, Away, seen.version),
            "the user's own {name} is told"
        );
    }
    stranger
        .expect_nothing_queued(91, "user 3 is no contact of user 1")
        .await;
    stranger_watcher
        .expect_nothing(QUIET, "user 3 is no contact of user 1")
        .await;
}

#[tokio::test]
async fn adding_a_pair_starts_both_streams_at_once_with_current_presence_and_removing_stops_them() {
    let app = spawn_app(|_| {}).await;
    app.add_contacts(&[(1, 2)]).await;
    let mut two = app.device(&user(2)).await;
    let mut one = app.device(&user(1)).await;
    two.next_update().await;
    let mut three = app.device(&user(3)).await;
    let mut three_watcher = app.watcher(&user(3), &[]).await;
    assert!(
        three_watcher.snapshot.is_empty(),
        "user 3 has no contacts yet"
    );
    app.update_status(&user(1), Busy).await.unwrap();
    let one_busy = two.next_update().await;
    one.next_update().await; // its own change

    app.add_contacts(&[(1, 3)]).await;

    let three_at_one = one.next_update().await;
    assert_eq!(
        (three_at_one.user_id, three_at_one.status()),
        (3, Online),
        "user 1's live device starts with user 3's current presence"
    );
    assert_eq!(three_at_one, app.presence_of(&user(1), 3).await);
    for (name, receiver) in [("device", &mut *three), ("watcher", &mut *three_watcher)] {
        let one_at_three = receiver.next_update().await;
        assert_eq!(
            one_at_three, one_busy,
            "user 3's {name} starts with user 1's current presence"
        );
    }

    app.update_status(&user(1), Away).await.unwrap();
    two.next_update().await; // user 2 follows user 1 all along
    for (name, receiver) in [("device", &mut *three), ("watcher", &mut *three_watcher)] {
        let p = receiver.next_update().await;
        assert_eq!(
            (p.user_id, p.status(), p.version),
            (1, Away, one_busy.version + 1),
            "user 3's {name} now follows user 1's changes"
        );
    }
    one.next_update().await; // its own change
    app.update_status(&user(3), Busy).await.unwrap();
    let p = one.next_update().await;
    assert_eq!(
        (p.user_id, p.status()),
        (3, Busy),
        "and user 1 follows user 3's"
    );
    three.next_update().await; // its own change

    app.remove_contacts(&[(3, 1)]).await;
    assert_eq!(app.contacts_of(1).await, vec![2], "the pair is gone");
    assert_eq!(app.contacts_of(3).await, Vec::<u64>::new(), "both ways");

    // Losing a contact is losing access: each side is told at once that the other is now a
    // stranger (contacts-only by default: OFFLINE without last_seen), then nothing more.
    for (receiver, other) in [(&mut *three, 1), (&mut *three_watcher, 1), (&mut *one, 3)] {
        let gone = receiver.next_update().await;
        assert_eq!(
            (gone.user_id, gone.status(), gone.last_seen),
            (other, Offline, None),
            "a removed contact is shown as a stranger at once"
        );
    }

    app.update_status(&user(1), Online).await.unwrap();
    let control = two.next_update().await;
    assert_eq!(
        (control.user_id, control.status()),
        (1, Online),
        "user 2 is still told"
    );
    three
        .expect_nothing_queued(92, "user 1 is no longer a contact of user 3")
        .await;
    three_watcher
        .expect_nothing(QUIET, "user 1 is no longer a contact of user 3")
        .await;

    one.next_update().await; // its own change
    app.update_status(&user(3), Away).await.unwrap();
    app.update_status(&user(2), Busy).await.unwrap();
    let next = one.next_update().await;
    assert_eq!(
        (next.user_id, next.status()),
        (2, Busy),
        "user 1's next event is user 2's change: user 3's was not sent to it"
    );
}

#[tokio::test]
async fn watch_contacts_sends_a_snapshot_then_every_change_and_the_watcher_is_not_online() {
    let app = spawn_app(|_| {}).await;
    app.add_contacts(&[(2, 1), (2, 3), (1, 3)]).await;
    let mut one = app.device(&user(1)).await;

    let mut watcher = app.watcher(&user(2), &[]).await;
    let mut snapshot = watcher.snapshot.clone();
    snapshot.sort_by_key(|p| p.user_id);
    assert_eq!(
        snapshot,
        vec![one.me(), never_seen(3)],
        "the snapshot has every contact, a never-seen one OFFLINE at version 0"
    );

    let watcher_user = app.presence_of(&service(), 2).await;
    assert_eq!(
        (watcher_user.status(), watcher_user.connected),
        (Offline, Some(false)),
        "watching does not make user 2 online"
    );
    let stats = app.stats().await;
    assert_eq!(
        (stats.online_users, stats.connections, stats.watchers),
        (1, 1, 1),
        "the watcher is counted as a watcher, not as a device"
    );

    let _three = app.device(&user(3)).await;
    let p = watcher.next_update().await;
    assert_eq!((p.user_id, p.status(), p.version), (3, Online, 1));
    let at_one = one.next_update().await;
    assert_eq!(
        at_one.user_id, 3,
        "user 1's first event is user 3 coming online: the watcher opening sent nothing"
    );
    app.update_status(&user(1), Away).await.unwrap();
    let p = watcher.next_update().await;
    assert_eq!(
        (p.user_id, p.status(), p.version),
        (1, Away, 2),
        "then every change"
    );
}

/// A device that never reads while its contact changes status 2000 times: the others get
/// every update, the server's queue for it stays bounded (updates are coalesced), and once it
/// reads it gets the final state, with versions strictly increasing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_never_reading_receiver_does_not_hold_up_others_and_finally_gets_the_final_state() {
    const CHANGES: u64 = 2000;
    let app = spawn_app(|s| {
        s.rate_status_per_min = 1_000_000;
        s.queue_capacity = 16;
    })
    .await;
    app.add_contacts(&[(1, 2), (1, 3)]).await;
    // A 1 KiB HTTP/2 window: the client stops accepting data after a few dozen updates, so the
    // rest piles up in the server's queue for this receiver.
    let narrow = Endpoint::from_shared(format!("http://{}", app.addr))
        .unwrap()
        .initial_stream_window_size(1024)
        .connect()
        .await
        .unwrap();
    let mut slow = Device::connect_on(narrow, &user(2), "never reads")
        .await
        .unwrap();
    let mut fast = app.device(&user(3)).await;
    let actor = app.device(&user(1)).await;
    let first = actor.me().version;
    let last = first + CHANGES;
    let final_status = if CHANGES.is_multiple_of(2) {
        Busy
    } else {
        Away
    };

    let reader = tokio::spawn(async move {
        let updates = fast
            .updates_until(|p| p.user_id == 1 && p.version == last)
            .await;
        (fast, updates)
    });
    for i in 1..=CHANGES {
        let status = if i.is_multiple_of(2) { Busy } else { Away };
        app.update_status(&user(1), status).await.unwrap();
    }
    let (_fast, updates) = reader.await.expect("the fast reader does not panic");
    let versions: Vec<u64> = updates
        .iter()
        .filter(|p| p.user_id == 1)
        .map(|p| p.version)
        .collect();
    assert_eq!(
        versions,
        (first..=last).collect::<Vec<_>>(),
        "the reading receiver gets every update, in order, despite the slow one"
    );

    let stats = app.stats().await;
    assert!(
        stats.coalesced > 0,
        "the never-reading receiver's queue was coalesced instead of growing: {stats:?}"
    );

    let backlog = slow
        .updates_until(|p| p.user_id == 1 && p.version == last)
        .await;
    let versions: Vec<u64> = backlog.iter().map(|p| p.version).collect();
    assert!(
        versions.windows(2).all(|w| w[0] < w[1]),
        "versions strictly increase even after coalescing: {versions:?}"
    );
    assert_eq!(
        backlog.last().unwrap().status(),
        final_status,
        "the final state arrives"
    );
    assert!(
        backlog.len() < 200,
        "the slow receiver got a bounded backlog, not all {CHANGES} updates: {}",
        backlog.len()
    );
    slow.expect_nothing_queued(93, "nothing after the final state")
        .await;
    drop(actor);
}

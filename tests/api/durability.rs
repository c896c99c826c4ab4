//! What outlives a moment: the write-behind to the database, a restart, a graceful shutdown,
//! and the page-reload race the seed design loses.
use std::collections::HashMap;

use presence::domain::Status as Chosen;
use presence::pb::Status::{Busy, Offline, Online};
use tonic::Code;

use crate::helpers::*;

#[tokio::test]
async fn changes_reach_the_database_through_the_write_behind() {
    let app = spawn_app(|_| {}).await;
    let phone = app.device(&user(1)).await;
    let row = app
        .wait_for_row(1, "online", |r| r.is_online && r.version == 1)
        .await;
    assert_eq!(
        row.last_seen,
        last_seen(&phone.me()),
        "the row holds the last_seen the user was given"
    );

    app.update_status(&user(1), Busy).await.unwrap();
    phone.close();
    let row = app
        .wait_for_row(1, "offline and busy", |r| !r.is_online && r.version == 3)
        .await;
    assert_eq!(row.chosen, Chosen::Busy, "the chosen status is stored");
}

#[tokio::test]
async fn presence_survives_a_restart_with_status_last_seen_and_version_intact() {
    let mut app = spawn_app(|_| {}).await;
    app.add_contacts(&[(1, 2)]).await;
    let phone = app.device(&user(1)).await;
    app.update_status(&user(1), Busy).await.unwrap();
    phone.close();
    app.wait_for_connections(0).await;
    let before = app.presence_of(&service(), 1).await;
    assert_eq!(
        (before.status(), before.version),
        (Offline, 3),
        "online, busy, offline: three changes"
    );

    app.restart().await;

    let after = app.presence_of(&service(), 1).await;
    assert_eq!(
        after, before,
        "status, last_seen and version are the same after a restart"
    );
    assert_eq!(
        app.presence_of(&user(2), 1).await,
        presence::pb::UserPresence {
            connected: None,
            ..before.clone()
        },
        "a contact sees the same, without the service-only `connected`"
    );
    assert_eq!(app.contacts_of(1).await, vec![2], "contacts are kept");

    let phone = app.device(&user(1)).await;
    let me = phone.me();
    assert_eq!(me.status(), Busy, "the chosen status survived the restart");
    assert_eq!(
        me.version,
        before.version + 1,
        "versions keep growing by one across a restart"
    );
    assert!(
        last_seen(&me) >= last_seen(&before),
        "last_seen does not move backwards"
    );
}

#[tokio::test]
async fn a_graceful_shutdown_ends_open_streams_as_unavailable_and_records_the_user_offline() {
    let mut app = spawn_app(|_| {}).await;
    let mut phone = app.device(&user(1)).await;
    let mut watcher = app.watcher(&user(2), &[]).await;

    let t0 = now_ms();
    let ((), ended, watch_ended) = tokio::join!(
        app.stop(),
        phone.ended_within(WAIT),
        watcher.ended_within(WAIT)
    );
    let t1 = now_ms();
    for (name, ended) in [("device", ended), ("watcher", watch_ended)] {
        let status = ended.unwrap_or_else(|| panic!("the {name} stream ends with a status"));
        assert_eq!(
            status.code(),
            Code::Unavailable,
            "a shutdown ends the {name} stream as UNAVAILABLE (reconnect elsewhere): {status:?}"
        );
    }

    let row = app.row(1).await.expect("the user's row was flushed");
    assert!(!row.is_online, "the user is offline in the database");
    let ls = row.last_seen.expect("going offline set last_seen");
    assert!(
        (t0..=t1).contains(&ls),
        "last_seen is the shutdown time: {ls} not in {t0}..={t1}"
    );

    app.restart().await;
    let p = app.presence_of(&service(), 1).await;
    assert_eq!(
        (p.status(), last_seen(&p), p.connected),
        (Offline, Some(ls), Some(false)),
        "after the restart the user is offline since the shutdown"
    );
}

/// 50 users each reload their page 3 times, all at once: the old stream closes while the new
/// one opens. Every user must end online in memory, in the database and at their contact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_page_reloads_leave_every_user_online_in_memory_in_the_database_and_at_contacts()
{
    const USERS: u64 = 50;
    const RELOADS: usize = 3;
    let app = spawn_app(|_| {}).await;
    let users: Vec<u64> = (1..=USERS).collect();
    let contact_of = |u: u64| 1000 + u;
    let pairs: Vec<(u64, u64)> = users.iter().map(|&u| (u, contact_of(u))).collect();
    app.add_contacts(&pairs).await;

    let mut watchers = HashMap::new();
    for &u in &users {
        let w = app.watcher(&user(contact_of(u)), &[]).await;
        assert_eq!(w.snapshot, vec![never_seen(u)]);
        watchers.insert(u, w);
    }
    let mut devices = Vec::new();
    for &u in &users {
        devices.push(app.device(&user(u)).await);
    }

    let app_ref = &app;
    let reloads = users.iter().zip(devices).map(|(&u, first)| async move {
        let mut current = first;
        for _ in 0..RELOADS {
            let channel = app_ref.connection().await;
            let opening =
                tokio::spawn(async move { Device::connect_on(channel, &user(u), "reload").await });
            tokio::task::yield_now().await;
            current.close();
            current = opening
                .await
                .expect("the connecting task does not panic")
                .expect("the reloaded page connects");
        }
        current
    });
    let _devices = futures::future::join_all(reloads).await;

    let in_memory = app.get_presence(&service(), &users).await.unwrap();
    for p in &in_memory {
        assert_eq!(
            (p.status(), p.connected),
            (Online, Some(true)),
            "user {} is online in memory after the reloads",
            p.user_id
        );
    }
    let stats = app.stats().await;
    assert_eq!(
        (stats.online_users, stats.connections),
        (USERS, USERS),
        "one live device per user"
    );

    let store = app.store().await;
    let ids: Vec<_> = users.iter().map(|&u| uid(u)).collect();
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let rows = store.load_presence(&ids).await.expect("rows load");
        let online = rows.iter().filter(|r| r.is_online).count();
        if online == users.len() {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "every user is online in the database after a flush; {online} of {USERS} are"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }

    for p in in_memory {
        let watcher = watchers.get_mut(&p.user_id).unwrap();
        let updates = watcher.updates_until(|u| u.version == p.version).await;
        assert!(
            updates.windows(2).all(|w| w[0].version < w[1].version),
            "user {}'s contact gets versions in order: {updates:?}",
            p.user_id
        );
        let last = updates.last().unwrap();
        assert_eq!(
            (last.user_id, last.status()),
            (p.user_id, Online),
            "the last update user {}'s contact received says online",
            p.user_id
        );
    }
}

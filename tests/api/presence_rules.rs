//! The rules of presence (issue 2): a device makes its user online, the welcome, the seed's
//! multi-device table, invisible, chosen statuses, last_seen and versions.
use presence::pb::Status::{Away, Busy, Offline, Online};

use crate::helpers::*;

#[tokio::test]
async fn a_connecting_device_makes_its_user_online_by_default() {
    let app = spawn_app(|_| {}).await;
    let before = now_ms();
    let phone = app.device(&user(1)).await;
    let after = now_ms();

    let me = phone.me();
    assert_eq!(me.user_id, 1, "the welcome is about the caller");
    assert_eq!(me.status(), Online, "ONLINE is the default chosen status");
    assert_eq!(
        me.version, 1,
        "coming online is the first change of a new user"
    );
    let ls = last_seen(&me).expect("becoming visibly online sets last_seen");
    assert!(
        (before..=after).contains(&ls),
        "last_seen is the connect time: {ls} not in {before}..={after}"
    );
    assert_eq!(me.connected, None, "users never get `connected`");
    assert!(
        !phone.welcome.connection_id.is_empty(),
        "the welcome names the connection"
    );

    let seen_by_service = app.presence_of(&service(), 1).await;
    assert_eq!(
        (seen_by_service.status(), seen_by_service.connected),
        (Online, Some(true)),
        "the server counts the device as live"
    );
}

#[tokio::test]
async fn the_welcome_holds_the_caller_and_every_contact_never_seen_ones_offline_at_version_zero() {
    let app = spawn_app(|_| {}).await;
    app.add_contacts(&[(1, 2), (1, 3), (4, 1)]).await;
    let two = app.device(&user(2)).await;
    let four = app.device(&user(4)).await;
    four.close();
    app.wait_for_connections(1).await;
    let two_now = app.presence_of(&user(1), 2).await;
    let four_now = app.presence_of(&user(1), 4).await;

    let one = app.device(&user(1)).await;

    assert_eq!(
        one.me().status(),
        Online,
        "the welcome has the caller's own presence"
    );
    let mut contacts = one.welcome.contacts.clone();
    contacts.sort_by_key(|p| p.user_id);
    assert_eq!(
        contacts.iter().map(|p| p.user_id).collect::<Vec<_>>(),
        vec![2, 3, 4],
        "every contact is in the welcome, whichever side added the pair"
    );
    assert_eq!(
        contacts[0], two_now,
        "an online contact as GetPresence shows it"
    );
    assert_eq!(contacts[0].status(), Online);
    assert_eq!(
        contacts[1],
        never_seen(3),
        "a never-seen contact is OFFLINE, without last_seen, at version 0"
    );
    assert_eq!(
        contacts[2], four_now,
        "an offline contact keeps its last_seen"
    );
    assert_eq!(contacts[2].status(), Offline);
    assert!(last_seen(&contacts[2]).is_some(), "user 4 was seen");
    drop(two);
}

#[tokio::test]
async fn the_seed_multi_device_table_holds_exactly() {
    let app = spawn_app(|_| {}).await;
    app.add_contacts(&[(1, 2)]).await;
    let mut contact = app.device(&user(2)).await;

    // Open app on phone: online.
    let phone = Device::connect(&app, &user(1), "phone").await.unwrap();
    let online = contact.next_update().await;
    assert_eq!(
        (online.user_id, online.status()),
        (1, Online),
        "the phone makes user 1 online"
    );

    // Open app on laptop: still online, no event.
    let laptop = Device::connect(&app, &user(1), "laptop").await.unwrap();
    assert_eq!(
        laptop.me().version,
        online.version,
        "a second device changes nothing visible"
    );

    // Close phone app: still online (on the laptop), no event.
    phone.close();
    app.wait_for_connections(2).await;
    assert_eq!(
        app.presence_of(&user(2), 1).await.status(),
        Online,
        "with the laptop still open the user stays online"
    );

    // Close laptop app: offline, last_seen saved.
    let before = now_ms();
    laptop.close();
    let offline = contact.next_update().await;
    let after = now_ms();
    assert_eq!(
        (offline.user_id, offline.status()),
        (1, Offline),
        "closing the last device makes the user offline, and it is the next event the contact \
         sees: opening the laptop and closing the phone sent nothing"
    );
    assert_eq!(
        offline.version,
        online.version + 1,
        "exactly one change between online and offline"
    );
    let ls = last_seen(&offline).expect("going offline sets last_seen");
    assert!(
        (before..=after).contains(&ls),
        "last_seen is when the laptop closed: {ls} not in {before}..={after}"
    );
}

#[tokio::test]
async fn choosing_offline_while_connected_is_invisible_and_online_again_shows_at_once() {
    let app = spawn_app(|_| {}).await;
    app.add_contacts(&[(1, 2)]).await;
    let mut contact = app.device(&user(2)).await;
    let _phone = app.device(&user(1)).await;
    let online = contact.next_update().await;
    assert_eq!(online.status(), Online);

    let own = app.update_status(&user(1), Offline).await.unwrap();
    assert_eq!(
        own.status(),
        Offline,
        "the user sees their own chosen OFFLINE"
    );
    let invisible = contact.next_update().await;
    assert_eq!(
        (invisible.user_id, invisible.status()),
        (1, Offline),
        "others see an invisible user as OFFLINE"
    );
    assert!(
        last_seen(&invisible).is_some(),
        "going invisible is going visibly offline: last_seen is set"
    );
    assert_eq!(
        app.presence_of(&user(2), 1).await.status(),
        Offline,
        "GetPresence agrees with the pushed update"
    );
    let svc = app.presence_of(&service(), 1).await;
    assert_eq!(
        svc.connected,
        Some(true),
        "the device is still live while invisible"
    );

    app.update_status(&user(1), Online).await.unwrap();
    let visible = contact.next_update().await;
    assert_eq!(
        (visible.status(), visible.version),
        (Online, invisible.version + 1),
        "choosing ONLINE again shows the user online at once"
    );
}

#[tokio::test]
async fn a_chosen_busy_survives_a_second_device_connecting() {
    let app = spawn_app(|_| {}).await;
    app.add_contacts(&[(1, 2)]).await;
    let mut contact = app.device(&user(2)).await;
    let _phone = app.device(&user(1)).await;
    contact.next_update().await;
    app.update_status(&user(1), Busy).await.unwrap();
    let busy = contact.next_update().await;
    assert_eq!(busy.status(), Busy);

    let laptop = Device::connect(&app, &user(1), "laptop").await.unwrap();
    assert_eq!(
        (laptop.me().status(), laptop.me().version),
        (Busy, busy.version),
        "a second device does not reset the chosen status"
    );
    assert_eq!(app.presence_of(&user(2), 1).await.status(), Busy);

    laptop.close();
    app.wait_for_connections(2).await;
    app.update_status(&user(1), Away).await.unwrap();
    let away = contact.next_update().await;
    assert_eq!(
        (away.status(), away.version),
        (Away, busy.version + 1),
        "the laptop coming and going sent nothing: the next event is the AWAY"
    );
}

#[tokio::test]
async fn last_seen_is_set_on_visible_transitions_only_and_never_moves_backwards() {
    let app = spawn_app(|_| {}).await;
    app.add_contacts(&[(1, 2)]).await;
    let mut contact = app.device(&user(2)).await;

    let t0 = now_ms();
    let phone = app.device(&user(1)).await;
    let online = contact.next_update().await;
    let t1 = now_ms();
    let ls_online = last_seen(&online).expect("coming online sets last_seen");
    assert!((t0..=t1).contains(&ls_online), "set when coming online");
    assert_eq!(
        online.last_seen.unwrap().nanos % 1_000_000,
        0,
        "last_seen has millisecond precision"
    );

    app.update_status(&user(1), Away).await.unwrap();
    let away = contact.next_update().await;
    assert_eq!(
        last_seen(&away),
        Some(ls_online),
        "ONLINE → AWAY is no visibility change: last_seen stays"
    );

    let t2 = now_ms();
    app.update_status(&user(1), Offline).await.unwrap();
    let invisible = contact.next_update().await;
    let t3 = now_ms();
    let ls_invisible = last_seen(&invisible).expect("going invisible sets last_seen");
    assert!(
        (t2..=t3).contains(&ls_invisible) && ls_invisible >= ls_online,
        "set when going invisible, not before the previous one"
    );

    let t4 = now_ms();
    app.update_status(&user(1), Busy).await.unwrap();
    let busy = contact.next_update().await;
    let ls_busy = last_seen(&busy).expect("visible again");
    assert!(
        (t4..=now_ms()).contains(&ls_busy) && ls_busy >= ls_invisible,
        "set when becoming visible again"
    );

    let t5 = now_ms();
    phone.close();
    let offline = contact.next_update().await;
    let ls_offline = last_seen(&offline).expect("going offline sets last_seen");
    assert!(
        (t5..=now_ms()).contains(&ls_offline) && ls_offline >= ls_busy,
        "set when the last device leaves"
    );
}

#[tokio::test]
async fn versions_grow_by_one_per_change_and_arrive_strictly_increasing_at_every_receiver() {
    let app = spawn_app(|_| {}).await;
    app.add_contacts(&[(1, 2)]).await;
    let mut contact_device = app.device(&user(2)).await;
    let mut contact_watcher = app.watcher(&user(2), &[]).await;
    let mut phone = Device::connect(&app, &user(1), "phone").await.unwrap();
    let mut laptop = Device::connect(&app, &user(1), "laptop").await.unwrap();
    let start = phone.me().version;
    contact_device.next_update().await;
    contact_watcher.next_update().await;

    let statuses = [Away, Busy, Busy, Offline, Online, Online, Away];
    for s in statuses {
        app.update_status(&user(1), s).await.unwrap();
    }
    // Busy → Busy and Online → Online change nothing: 5 changes out of 7 calls.
    let expected: Vec<(presence::pb::Status, u64)> = vec![
        (Away, start + 1),
        (Busy, start + 2),
        (Offline, start + 3),
        (Online, start + 4),
        (Away, start + 5),
    ];
    for (name, receiver, is_own) in [
        ("contact device", &mut *contact_device, false),
        ("contact watcher", &mut *contact_watcher, false),
        ("own phone", &mut *phone, true),
        ("own laptop", &mut *laptop, true),
    ] {
        let mut got = Vec::new();
        for _ in 0..expected.len() {
            let p = receiver.next_update().await;
            assert_eq!(p.user_id, 1, "{name} only hears about user 1");
            got.push((p.status(), p.version));
        }
        assert_eq!(
            got, expected,
            "{name}: one update per change, versions +1 each, none for a repeated status \
             (own device: {is_own})"
        );
    }
}

#[tokio::test]
async fn update_status_on_the_stream_behaves_like_the_rpc_and_a_ping_gets_its_pong() {
    let app = spawn_app(|_| {}).await;
    app.add_contacts(&[(1, 2)]).await;
    let mut contact = app.device(&user(2)).await;
    let mut phone = app.device(&user(1)).await;
    contact.next_update().await;

    phone.send(status_message(Busy as i32)).await;
    let busy = contact.next_update().await;
    assert_eq!(
        (busy.user_id, busy.status()),
        (1, Busy),
        "update_status on the stream is pushed to contacts"
    );
    let own = phone.next_update().await;
    assert_eq!(
        (own.status(), own.version),
        (Busy, busy.version),
        "the device that chose it hears it too"
    );
    phone.ping(42).await;
    assert_eq!(app.presence_of(&service(), 1).await.status(), Busy);
}

#[tokio::test]
async fn update_status_while_offline_is_stored_and_pushes_nothing_until_a_device_connects() {
    let app = spawn_app(|_| {}).await;
    app.add_contacts(&[(1, 2)]).await;
    let mut contact = app.device(&user(2)).await;

    let answer = app.update_status(&user(1), Busy).await.unwrap();
    assert_eq!(
        answer.user_id, 1,
        "UpdateStatus returns the caller's presence"
    );
    assert_eq!(
        (answer.status(), answer.version),
        (Offline, 0),
        "without a device the effective status stays OFFLINE and nothing visible changed"
    );
    assert_eq!(
        app.presence_of(&user(2), 1).await,
        never_seen(1),
        "contacts still see a never-seen user"
    );

    let phone = app.device(&user(1)).await;
    assert_eq!(
        phone.me().status(),
        Busy,
        "the stored choice shows once a device connects"
    );
    let first = contact.next_update().await;
    assert_eq!(
        (first.user_id, first.status(), first.version),
        (1, Busy, 1),
        "the contact's first event about user 1 is the connect, BUSY: nothing was pushed before"
    );
}

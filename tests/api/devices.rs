//! Devices that come and go (issue 15): auto-away from activity, platforms, passive
//! (backgrounded) devices and their resync, and the privacy of all of it.
use std::time::Duration;

use presence::pb::{
    self, Activity, Platform,
    Status::{Away, Busy, Online},
    Visibility::{Contacts, Everyone, Nobody},
};

use crate::helpers::*;

const X: u64 = 1;
const W: u64 = 2;

async fn device_on(app: &TestApp, id: u64, label: &str, platform: Platform) -> Device {
    Device::open_with(
        app.connection().await,
        &user(id),
        hello_on(label, platform),
        WAIT,
    )
    .await
    .unwrap_or_else(|s| panic!("user {id} connects: {s:?}"))
}

fn platforms(p: &pb::UserPresence) -> Vec<Platform> {
    p.platforms().collect()
}

#[tokio::test]
async fn a_user_whose_devices_are_all_idle_is_away_with_idle_since_and_one_active_device_is_enough()
{
    let app = spawn_app(|_| {}).await;
    app.add_contacts(&[(X, W)]).await;
    let mut w = app.device(&user(W)).await;
    let mut d1 = device_on(&app, X, "laptop", Platform::Desktop).await;
    let mut d2 = device_on(&app, X, "phone", Platform::Mobile).await;
    let d3 = device_on(&app, X, "browser", Platform::Web).await;
    let online = w
        .updates_until(|p| p.user_id == X && platforms(p).len() == 3)
        .await;
    let online = online.last().expect("updates came").clone();
    assert_eq!(online.status(), Online);

    d1.send(activity(Activity::Idle)).await;
    d2.send(activity(Activity::Idle)).await;
    d1.until_pong(1).await;
    d2.until_pong(2).await;
    w.expect_nothing_queued(91, "one device still active: nothing changed")
        .await;
    let before = now_ms();
    d3.send(activity(Activity::Background)).await;
    let away = w.next_update_of(X, WAIT).await;
    assert_eq!(
        away.status(),
        Away,
        "every device idle or backgrounded: auto-away"
    );
    assert_eq!(away.version, online.version + 1);
    let idle = away
        .idle_since
        .as_ref()
        .map(millis)
        .expect("idle_since is set while auto-away");
    assert!(
        idle >= before && idle <= now_ms(),
        "when the last device stopped being active"
    );
    let own = app.presence_of(&user(X), X).await;
    assert_eq!(
        own.status(),
        Away,
        "the user's own view shows the effective status too"
    );

    d2.send(activity(Activity::Active)).await;
    let back = w.next_update_of(X, WAIT).await;
    assert_eq!(
        (back.status(), back.idle_since),
        (Online, None),
        "one active device: online again"
    );
}

#[tokio::test]
async fn a_status_chosen_by_hand_is_never_changed_by_activity() {
    let app = spawn_app(|_| {}).await;
    app.add_contacts(&[(X, W)]).await;
    let mut w = app.device(&user(W)).await;
    let mut d = app.device(&user(X)).await;
    w.next_update_of(X, WAIT).await;
    app.update_status(&user(X), Busy).await.unwrap();
    let busy = w.next_update_of(X, WAIT).await;
    d.send(activity(Activity::Idle)).await;
    d.until_pong(1).await;
    w.expect_nothing_queued(92, "BUSY stays BUSY when the device idles")
        .await;
    assert_eq!(app.presence_of(&user(W), X).await.version, busy.version);
    app.update_status(&user(X), Online).await.unwrap();
    let away = w.next_update_of(X, WAIT).await;
    assert_eq!(
        away.status(),
        Away,
        "ONLINE chosen with every device idle is auto-away"
    );
}

#[tokio::test]
async fn a_new_platform_is_a_change_and_platforms_are_distinct_and_ascending() {
    let app = spawn_app(|_| {}).await;
    app.add_contacts(&[(X, W)]).await;
    let mut w = app.device(&user(W)).await;
    let _web = device_on(&app, X, "tab", Platform::Web).await;
    let first = w.next_update_of(X, WAIT).await;
    assert_eq!(platforms(&first), [Platform::Web]);
    let _desk = device_on(&app, X, "laptop", Platform::Desktop).await;
    let second = w.next_update_of(X, WAIT).await;
    assert_eq!(platforms(&second), [Platform::Desktop, Platform::Web]);
    assert_eq!(
        second.version,
        first.version + 1,
        "a change of the set is a change"
    );
    let _web2 = device_on(&app, X, "tab 2", Platform::Web).await;
    let _none = device_on(&app, X, "old client", Platform::Unspecified).await;
    app.update_status(&user(W), Busy).await.unwrap();
    let next = w.next_update().await;
    assert_eq!(
        next.user_id, W,
        "a second web device and a client without a platform change nothing"
    );
}

#[tokio::test]
async fn a_backgrounded_device_misses_changes_and_gets_one_resync_entry_with_the_newest() {
    let app = spawn_app(|s| s.rate_status_per_min = 100).await;
    app.add_contacts(&[(X, W)]).await;
    let _x = app.device(&user(X)).await;
    let mut passive = app.device(&user(W)).await;
    let mut active = app.device(&user(W)).await;
    passive.send(activity(Activity::Background)).await;
    passive.until_pong(1).await;

    let mut last = None;
    for i in 0..20 {
        let s = [Away, Busy][i % 2];
        last = Some(app.update_status(&user(X), s).await.unwrap());
    }
    let last = last.expect("20 changes were made");
    let got = active.updates_until(|p| p.version == last.version).await;
    assert_eq!(
        got.len(),
        20,
        "(control) an active device of the same user gets all 20"
    );
    let missed = passive.until_pong(2).await;
    assert!(
        missed.is_empty(),
        "a backgrounded device gets no presence_updated: {missed:?}"
    );
    assert_eq!(app.stats().await.passive_skipped, 20, "counted as skipped");

    passive.send(activity(Activity::Active)).await;
    let resync = match passive.next_incoming(WAIT).await {
        Incoming::Resync(r) => r,
        other => panic!("the first thing after waking is a resync, got {other:?}"),
    };
    assert!(resync.last_page);
    let entries: Vec<(u64, u64)> = resync
        .users
        .iter()
        .map(|p| (p.user_id, p.version))
        .collect();
    assert_eq!(
        entries,
        [(X, last.version)],
        "one entry per user, the newest"
    );
    app.update_status(&user(X), Online).await.unwrap();
    let live = passive.next_update_of(X, WAIT).await;
    assert_eq!(
        live.version,
        last.version + 1,
        "live updates resume, versions still increasing"
    );
}

#[tokio::test]
async fn platforms_and_idle_since_follow_the_online_status_privacy() {
    const STRANGER: u64 = 9;
    let app = spawn_app(|_| {}).await;
    app.add_contacts(&[(X, W)]).await;
    app.set_privacy(&user(STRANGER), Everyone, Everyone)
        .await
        .unwrap();
    let mut d = device_on(&app, X, "laptop", Platform::Desktop).await;
    d.send(activity(Activity::Idle)).await;
    d.until_pong(1).await;
    // Contacts may see X's online status (default); strangers may see only X's last_seen.
    app.set_privacy(&user(X), Contacts, Everyone).await.unwrap();
    let contact = app.presence_of(&user(W), X).await;
    assert_eq!(
        (contact.status(), platforms(&contact)),
        (Away, vec![Platform::Desktop])
    );
    assert!(contact.idle_since.is_some());
    let stranger = app.presence_of(&user(STRANGER), X).await;
    assert_eq!(
        (
            platforms(&stranger),
            stranger.idle_since,
            stranger.custom_status
        ),
        (vec![], None, None),
        "denied the online status: no platforms, no idle_since"
    );
    let service_view = app.presence_of(&service(), X).await;
    assert_eq!(
        platforms(&service_view),
        [Platform::Desktop],
        "services see them"
    );
    // Invisible: hidden from everyone who sees the status, too.
    app.update_status(&user(X), pb::Status::Offline)
        .await
        .unwrap();
    let invisible = app.presence_of(&user(W), X).await;
    assert_eq!(
        (platforms(&invisible), invisible.idle_since),
        (vec![], None)
    );
    app.set_privacy(&user(X), Nobody, Nobody).await.unwrap();
}

#[tokio::test]
async fn activity_changes_over_the_limit_are_ignored_and_end_nothing() {
    let app = spawn_app(|s| s.rate_activity_per_min = 2).await;
    app.add_contacts(&[(X, W)]).await;
    let mut w = app.device(&user(W)).await;
    let mut d = app.device(&user(X)).await;
    w.next_update_of(X, WAIT).await;
    d.send(activity(Activity::Idle)).await;
    assert_eq!(w.next_update_of(X, WAIT).await.status(), Away);
    d.send(activity(Activity::Active)).await;
    assert_eq!(w.next_update_of(X, WAIT).await.status(), Online);
    d.send(activity(Activity::Idle)).await;
    d.until_pong(3).await;
    w.expect_nothing_queued(93, "the third change in a minute is ignored")
        .await;
    d.until_pong(4).await;
    let _ = Duration::ZERO;
}

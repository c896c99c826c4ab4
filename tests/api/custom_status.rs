//! Custom status with expiry, and the approximate last_seen (issue 16).
use std::time::{Duration, Instant};

use presence::pb::{
    self, LastSeenApprox,
    Status::{Offline, Online},
    Visibility::{Contacts, Everyone, Nobody},
};
use presence::store::PresenceRow;
use tonic::Code;

use crate::helpers::*;

const X: u64 = 1;
const W: u64 = 2;
const DAY: i64 = 24 * 3600 * 1000;

fn custom(text: &str, emoji: &str, expires_at: Option<i64>) -> pb::CustomStatus {
    pb::CustomStatus {
        text: text.into(),
        emoji: emoji.into(),
        expires_at: expires_at.map(|ms| prost_types::Timestamp {
            seconds: ms.div_euclid(1000),
            nanos: (ms.rem_euclid(1000) * 1_000_000) as i32,
        }),
    }
}

async fn set_custom(
    app: &TestApp,
    caller: &Caller,
    c: Option<pb::CustomStatus>,
) -> Result<pb::UserPresence, tonic::Status> {
    Ok(app
        .presence()
        .set_custom_status(caller.request(pb::SetCustomStatusRequest { custom_status: c }))
        .await?
        .into_inner())
}

#[tokio::test]
async fn every_bad_custom_status_is_refused_naming_its_field_and_changes_nothing() {
    let app = spawn_app(|s| s.rate_status_per_min = 100).await;
    let now = now_ms();
    let cases: Vec<(pb::CustomStatus, &str)> = vec![
        (custom(&"a".repeat(101), "", None), "custom_status.text"),
        (custom("new\nline", "", None), "custom_status.text"),
        (
            custom("bidi \u{202e} override", "", None),
            "custom_status.text",
        ),
        (custom("zero\u{200b}width", "", None), "custom_status.text"),
        (custom("", "😀😀", None), "custom_status.emoji"),
        (custom("", "abc", None), "custom_status.emoji"),
        (custom("", ":Not Valid:", None), "custom_status.emoji"),
        (custom("", &"👍".repeat(9), None), "custom_status.emoji"),
        (
            custom("x", "", Some(now - 1_000)),
            "custom_status.expires_at",
        ),
        (
            custom("x", "", Some(now + 366 * DAY)),
            "custom_status.expires_at",
        ),
    ];
    for (c, field) in cases {
        let why = format!("{c:?}");
        assert_refused(
            set_custom(&app, &user(X), Some(c)).await,
            Code::InvalidArgument,
            &[field],
            &why,
        );
    }
    let me = app.presence_of(&user(X), X).await;
    assert_eq!((me.custom_status, me.version), (None, 0), "nothing changed");
    let ok = set_custom(
        &app,
        &user(X),
        Some(custom("In a meeting", "📅", Some(now + 3_600_000))),
    )
    .await
    .expect("a good one is taken");
    assert_eq!(
        ok.custom_status.as_ref().map(|c| c.text.as_str()),
        Some("In a meeting")
    );
    let service_only = set_custom(&app, &service(), Some(custom("x", "", None))).await;
    assert_refused(
        service_only,
        Code::FailedPrecondition,
        &["x-presence-user-id"],
        "a service must act for a user",
    );
}

#[tokio::test]
async fn the_custom_status_is_shown_exactly_to_those_who_see_the_online_status() {
    const STRANGER: u64 = 9;
    let app = spawn_app(|_| {}).await;
    app.add_contacts(&[(X, W)]).await;
    app.set_privacy(&user(STRANGER), Everyone, Everyone)
        .await
        .unwrap();
    app.set_privacy(&user(X), Contacts, Everyone).await.unwrap();
    let mut w = app.watcher(&user(W), &[]).await;
    set_custom(&app, &user(X), Some(custom("Lunch", "🍜", None)))
        .await
        .unwrap();
    let pushed = w.next_update_of(X, WAIT).await;
    assert_eq!(pushed.status(), Offline, "X is offline…");
    assert_eq!(
        pushed.custom_status.map(|c| c.text),
        Some("Lunch".into()),
        "…and a contact who may see X's online status sees the custom status"
    );
    let stranger = app.presence_of(&user(STRANGER), X).await;
    assert_eq!(
        stranger.custom_status, None,
        "a stranger denied the online status does not"
    );
    assert!(
        app.presence_of(&service(), X).await.custom_status.is_some(),
        "services do"
    );
    let _x = app.device(&user(X)).await;
    let online = w.next_update_of(X, WAIT).await;
    assert_eq!(
        (online.status(), online.custom_status.is_some()),
        (Online, true)
    );
}

#[tokio::test]
async fn an_expired_custom_status_is_cleared_and_pushed_once_within_a_second() {
    let app = spawn_app(|_| {}).await;
    app.add_contacts(&[(X, W)]).await;
    let mut w = app.watcher(&user(W), &[]).await;
    let expires = now_ms() + 1_500;
    set_custom(&app, &user(X), Some(custom("Brb", "", Some(expires))))
        .await
        .unwrap();
    let set = w.next_update_of(X, WAIT).await;
    assert!(set.custom_status.is_some());
    let cleared = w.next_update_of(X, WAIT).await;
    let late = now_ms() - expires;
    eprintln!("custom_status: cleared and pushed {late} ms after its expiry");
    assert!(cleared.custom_status.is_none() && cleared.version == set.version + 1);
    assert!(
        (0..1_000).contains(&late),
        "within 1 s of the expiry: {late} ms"
    );
    w.expect_nothing(Duration::from_millis(500), "cleared once")
        .await;
    assert_eq!(app.presence_of(&user(W), X).await.custom_status, None);
}

#[tokio::test]
async fn a_custom_status_expiring_across_a_restart_is_cleared_after_it() {
    let mut app = spawn_app(|_| {}).await;
    let expires = now_ms() + 2_500;
    set_custom(&app, &user(X), Some(custom("Flying", "✈️", Some(expires))))
        .await
        .unwrap();
    app.wait_for_row(X, "the custom status", |r| r.custom.is_some())
        .await;
    app.restart().await;
    let mut watch = app.watcher(&service(), &[X]).await;
    assert!(
        watch.snapshot[0].custom_status.is_some(),
        "restored with the row"
    );
    let cleared = watch.next_update_of(X, Duration::from_secs(5)).await;
    let late = now_ms() - expires;
    eprintln!("custom_status: after a restart, cleared {late} ms after its expiry");
    assert!(cleared.custom_status.is_none());
    assert!((0..1_000).contains(&late), "within 1 s: {late} ms");
    app.wait_for_row(X, "the cleared custom status", |r| r.custom.is_none())
        .await;
}

#[tokio::test]
async fn viewers_denied_the_exact_last_seen_get_an_approximate_one_at_each_boundary() {
    const MINUTE: i64 = 60_000;
    let app = spawn_app(|_| {}).await;
    // W shows its own last_seen to everyone (else reciprocity hides everyone's from it).
    app.set_privacy(&user(W), Everyone, Everyone).await.unwrap();
    let now = now_ms();
    // Users 101..=106, last seen around each bucket boundary, showing their online status to
    // everyone and their exact last_seen to nobody.
    let ages = [
        (3 * DAY - MINUTE, LastSeenApprox::Recently),
        (3 * DAY + MINUTE, LastSeenApprox::WithinWeek),
        (7 * DAY - MINUTE, LastSeenApprox::WithinWeek),
        (7 * DAY + MINUTE, LastSeenApprox::WithinMonth),
        (30 * DAY - MINUTE, LastSeenApprox::WithinMonth),
        (30 * DAY + MINUTE, LastSeenApprox::LongAgo),
    ];
    let store = app.store().await;
    let rows: Vec<PresenceRow> = ages
        .iter()
        .enumerate()
        .map(|(i, (age, _))| PresenceRow {
            last_seen: Some(now - age),
            version: 2,
            offline_version: 1,
            privacy: presence::domain::Privacy {
                online: presence::domain::Visibility::Everyone,
                last_seen: presence::domain::Visibility::Nobody,
                approximate_last_seen: true,
            },
            ..PresenceRow::new(uid(101 + i as u64))
        })
        .collect();
    store
        .upsert_presence_batch(&rows, "test")
        .await
        .expect("rows are written");
    let ids: Vec<u64> = (101..=106).collect();
    let answers = app.get_presence(&user(W), &ids).await.unwrap();
    for ((age, want), p) in ages.iter().zip(&answers) {
        assert_eq!(
            (p.last_seen.is_none(), p.last_seen_approx()),
            (true, *want),
            "last seen {} h ago",
            age / 3_600_000
        );
    }
    // The user decides: without the approximate form, nothing.
    app.set_privacy(&user(101), Everyone, Nobody).await.unwrap();
    let mut off = app
        .presence()
        .set_privacy(user(102).request(pb::SetPrivacyRequest {
            settings: Some(pb::PrivacySettings {
                online: Everyone as i32,
                last_seen: Nobody as i32,
                approximate_last_seen: Some(false),
            }),
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(off.approximate_last_seen.take(), Some(false));
    let p = app.presence_of(&user(W), 102).await;
    assert_eq!(
        (p.last_seen, p.last_seen_approx()),
        (None, LastSeenApprox::Unspecified)
    );
    // Never for viewers denied the online status: the never-seen shape.
    app.set_privacy(&user(103), Nobody, Nobody).await.unwrap();
    assert_eq!(app.presence_of(&user(W), 103).await, never_seen(103));
    // Those allowed the exact time get it, not the approximation.
    app.set_privacy(&user(104), Everyone, Everyone)
        .await
        .unwrap();
    let exact = app.presence_of(&user(W), 104).await;
    assert!(exact.last_seen.is_some() && exact.last_seen_approx() == LastSeenApprox::Unspecified);
}

#[tokio::test]
async fn a_viewer_who_sees_no_difference_sees_no_new_version() {
    const STRANGER: u64 = 9;
    let app = spawn_app(|s| s.rate_status_per_min = 100).await;
    app.set_privacy(&user(STRANGER), Everyone, Everyone)
        .await
        .unwrap();
    app.set_privacy(&user(X), Nobody, Everyone).await.unwrap();
    app.device(&user(X)).await.close();
    app.wait_for_connections(0).await;
    let before = app.presence_of(&user(STRANGER), X).await;
    assert!(
        last_seen(&before).is_some(),
        "(control) the stranger sees X's last_seen"
    );
    let started = Instant::now();
    set_custom(&app, &user(X), Some(custom("Secret plans", "", None)))
        .await
        .unwrap();
    set_custom(&app, &user(X), None).await.unwrap();
    set_custom(&app, &user(X), Some(custom("More", "🤫", None)))
        .await
        .unwrap();
    let after = app.presence_of(&user(STRANGER), X).await;
    assert_eq!(
        after, before,
        "custom statuses this viewer may not see move nothing it sees"
    );
    assert!(started.elapsed() < WAIT);
}

//! Hostile and broken clients (issue 12), the findings that an in-process server shows: each
//! test reproduces one finding and checks that it no longer happens. (Memory bounds under abuse
//! are measured on a real process in `tests/faults/hostile.rs`.)
use std::time::{Duration, Instant};

use jsonwebtoken::Algorithm;
use presence::pb::{
    self,
    Status::{Away, Busy, Offline, Online},
    Visibility::{Everyone, Nobody},
};
use tonic::Code;

use crate::helpers::*;

/// Finding 3: a WatchContacts stream ends, UNAUTHENTICATED, when its token expires, as device
/// streams do.
#[tokio::test]
async fn a_watch_stream_ends_when_its_token_expires() {
    let app = spawn_jwt_app(|_| {}).await;
    let mut claims = app.claims("1");
    claims["exp"] = (unix_now() + 2).into();
    let caller = bearer(&sign(&claims, Algorithm::HS256, SECRET));
    let mut watch = app.watcher(&caller, &[]).await;
    let started = Instant::now();
    let status = watch
        .ended_within(Duration::from_secs(5))
        .await
        .expect("the stream ends with a status");
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    assert!(status.message().contains("expired"), "{status:?}");
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "ended at expiry, not later: {:?}",
        started.elapsed()
    );
}

/// Finding 4: ids listed in WatchContacts count against the same per-user budget as
/// GetPresence.
#[tokio::test]
async fn watch_contacts_ids_spend_the_get_presence_budget() {
    let app = spawn_app(|s| {
        s.rate_ids_per_min = 1500;
        s.max_ids = 1000;
    })
    .await;
    let thousand: Vec<u64> = (100..1100).collect();
    let _first = app.watcher(&user(1), &thousand).await;
    let second = Watcher::open(&app, &user(1), &thousand[..600]).await;
    assert_refused(
        second.map(|w| w.snapshot.len()),
        Code::ResourceExhausted,
        &["PRESENCE_RATE_IDS_PER_MIN"],
        "1,600 ids in a minute is over a budget of 1,500",
    );
    assert_refused(
        app.get_presence(&user(1), &thousand[..600]).await,
        Code::ResourceExhausted,
        &["PRESENCE_RATE_IDS_PER_MIN"],
        "one budget for both",
    );
    app.get_presence(&user(2), &thousand[..600])
        .await
        .expect("another user has a budget of their own");
}

/// Finding 4: a user may hold only so many watch streams at once.
#[tokio::test]
async fn watch_streams_per_user_are_capped() {
    let app = spawn_app(|s| s.max_watches = 2).await;
    let _one = app.watcher(&user(1), &[]).await;
    let _two = app.watcher(&user(1), &[5]).await;
    let third = Watcher::open(&app, &user(1), &[6]).await;
    assert_refused(
        third.map(|w| w.snapshot.len()),
        Code::ResourceExhausted,
        &["PRESENCE_MAX_WATCHES"],
        "a third watch of user 1",
    );
    let _other_user = app.watcher(&user(2), &[]).await;
    drop(_one);
    app.wait_for_stats("the closed watch to be forgotten", |s| s.watchers == 2)
        .await;
    app.watcher(&user(1), &[7]).await;
}

/// Finding 4: streams that never send their hello count against their connection.
#[tokio::test]
async fn streams_waiting_for_their_hello_are_capped_per_connection() {
    let app = spawn_app(|s| s.max_hello_pending_per_conn = 5).await;
    let channel = app.connection().await;
    let mut waiting = Vec::new();
    for _ in 0..5 {
        let (tx, rx) = tokio::sync::mpsc::channel::<pb::ClientMessage>(1);
        let mut client = pb::presence_client::PresenceClient::new(channel.clone());
        let call = tokio::spawn(async move {
            client
                .authenticate(user(1).request(tokio_stream::wrappers::ReceiverStream::new(rx)))
                .await
        });
        waiting.push((tx, call));
    }
    // The five are waiting (their calls have not answered); a sixth on the same connection is
    // refused at once.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (sixth, _tx) = open_stream_on(channel.clone(), &user(2), vec![]).await;
    assert_refused(
        sixth.map(|_| ()),
        Code::ResourceExhausted,
        &["PRESENCE_MAX_HELLO_PENDING_PER_CONN"],
        "a sixth hello-less stream on one connection",
    );
    app.device(&user(3)).await.ping(1).await;
    drop(waiting);
}

/// Finding 6: ids the store cannot hold are INVALID_ARGUMENT naming the field, not a storage
/// outage.
#[tokio::test]
async fn ids_at_or_above_two_to_the_63_are_invalid_arguments() {
    let app = spawn_app(|_| {}).await;
    for bad in [1u64 << 63, u64::MAX] {
        assert_refused(
            app.get_presence(&user(1), &[5, bad]).await,
            Code::InvalidArgument,
            &["user_ids[1]", "at most"],
            "an id above the range",
        );
        let w = Watcher::open(&app, &service(), &[bad]).await;
        assert_refused(
            w.map(|w| w.snapshot.len()),
            Code::InvalidArgument,
            &["user_ids[0]"],
            "watching it too",
        );
        let r = app
            .contacts()
            .add_contacts(service().request(pb::AddContactsRequest {
                pairs: vec![pb::ContactPair {
                    user_id: 1,
                    contact_id: bad,
                }],
            }))
            .await;
        assert_refused(
            r,
            Code::InvalidArgument,
            &["pairs[0].contact_id"],
            "a pair with it",
        );
    }
}

/// Finding 7: a user with ~120,000 contacts connects; the welcome and the watch snapshot come
/// in pages, the last one marked.
#[tokio::test]
async fn a_user_with_120_000_contacts_connects_and_watches_in_pages() {
    const N: u64 = 120_000;
    let app = spawn_app(|_| {}).await;
    let pairs: Vec<(presence::domain::UserId, presence::domain::UserId)> =
        (2..=N + 1).map(|c| (uid(1), uid(c))).collect();
    let store = app.store().await;
    for chunk in pairs.chunks(500) {
        store
            .add_contacts(chunk)
            .await
            .expect("contacts are written");
    }
    let started = Instant::now();
    let device = Device::open(
        app.connection().await,
        &user(1),
        "phone",
        Duration::from_secs(60),
    )
    .await
    .expect("the user connects");
    eprintln!(
        "hardening: a user with {N} contacts got a welcome of {} contacts in {} ms",
        device.welcome.contacts.len(),
        started.elapsed().as_millis()
    );
    assert_eq!(
        device.welcome.contacts.len() as u64,
        N,
        "every contact, over several pages"
    );
    let watch = app.watcher(&user(1), &[]).await;
    assert_eq!(watch.snapshot.len() as u64, N, "the snapshot too");
}

/// Finding 8: a viewer who may see last_seen but not the online status sees a version that
/// moves only when what it sees moves: six hidden status changes between two offline
/// transitions leave no trace in it.
#[tokio::test]
async fn hidden_changes_do_not_show_in_the_version_of_a_last_seen_only_viewer() {
    const X: u64 = 1;
    const STRANGER: u64 = 9;
    let app = spawn_app(|s| s.rate_status_per_min = 100).await;
    app.set_privacy(&user(X), Nobody, Everyone).await.unwrap();
    // The stranger shows its own last_seen to everyone (else reciprocity hides X's from it).
    app.set_privacy(&user(STRANGER), Everyone, Everyone)
        .await
        .unwrap();
    let phone = app.device(&user(X)).await;
    phone.close();
    app.wait_for_connections(0).await;
    let first = app.presence_of(&user(STRANGER), X).await;
    assert_eq!(
        (first.status(), first.version),
        (Offline, 1),
        "one offline transition seen"
    );

    let phone = app.device(&user(X)).await;
    for s in [Away, Busy, Away, Busy, Online, Busy] {
        app.update_status(&user(X), s).await.unwrap();
    }
    phone.close();
    app.wait_for_connections(0).await;
    let second = app.presence_of(&user(STRANGER), X).await;
    assert_eq!(
        (second.status(), second.version),
        (Offline, 2),
        "the version moved once, with the one last_seen change this viewer can see"
    );
    let full = app.presence_of(&service(), X).await;
    assert!(
        full.version > 8,
        "(control) the user's own numbering moved with every change"
    );
}

/// Finding 9: device labels are bounded and printable before they reach a log.
#[tokio::test]
async fn device_labels_with_control_characters_are_refused() {
    let app = spawn_app(|_| {}).await;
    for label in ["evil\nINFO forged line", "bell\u{7}", "rtl\u{202e}override"] {
        let r = Device::connect(&app, &user(1), label).await;
        assert_refused(
            r.map(|d| d.welcome.connection_id),
            Code::InvalidArgument,
            &["hello.device", "printable"],
            "a label that would forge log lines",
        );
    }
    Device::connect(&app, &user(1), "Pixel 9 · 📱")
        .await
        .expect("a printable label with symbols is fine");
}

/// Finding 9: a token's `sub` must be the canonical decimal id; `aud` may be an array; a
/// token living longer than PRESENCE_JWT_MAX_TTL_S is refused.
#[tokio::test]
async fn token_subjects_audiences_and_lifetimes_follow_the_rules() {
    let app = spawn_jwt_app(|s| s.jwt_max_ttl_s = 3600).await;
    for sub in ["01", "+1", " 1 "] {
        let caller = bearer(&sign(&app.claims(sub), Algorithm::HS256, SECRET));
        assert_refused(
            app.get_presence(&caller, &[2]).await,
            Code::Unauthenticated,
            &["sub"],
            "a non-canonical spelling of user 1",
        );
    }
    let mut array_aud = app.claims("1");
    array_aud["aud"] = serde_json::json!(["chat", "presence"]);
    app.get_presence(&bearer(&sign(&array_aud, Algorithm::HS256, SECRET)), &[2])
        .await
        .expect("an aud array is valid JWT, and no audience is required here");
    let mut forever = app.claims("1");
    forever["exp"] = serde_json::json!(u64::MAX >> 1);
    assert_refused(
        app.get_presence(&bearer(&sign(&forever, Algorithm::HS256, SECRET)), &[2])
            .await,
        Code::Unauthenticated,
        &["PRESENCE_JWT_MAX_TTL_S"],
        "a token without a real end",
    );
}

/// Finding 9: a secret without real entropy stops the server at start, naming the setting.
#[tokio::test]
async fn weak_jwt_secrets_are_refused_at_start() {
    for weak in [" ".repeat(16), "x".repeat(40), "0123456789abcdef".into()] {
        let dir = tempfile::tempdir().expect("a directory");
        let settings = test_settings(&dir, |s| s.jwt_secret = Some(weak.as_str().into()));
        match presence::server::Application::build(settings).await {
            Ok(_) => panic!("the secret {weak:?} must be refused"),
            Err(e) => assert!(format!("{e:#}").contains("PRESENCE_JWT_SECRET"), "{e:#}"),
        }
    }
}

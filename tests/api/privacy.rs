//! Privacy settings (issue 3): who may see a user's online status and last_seen, on every read
//! and push path; reciprocity; losing access; nothing leaking; services seeing everything.
use presence::pb::{
    self,
    Status::{self, Away, Offline, Online},
    Visibility::{self, Contacts, Everyone, Nobody},
};

use crate::helpers::*;

#[tokio::test]
async fn privacy_defaults_to_contacts_and_a_setting_is_kept_across_a_restart() {
    let mut app = spawn_app(|_| {}).await;
    let get = |app: &TestApp| {
        let mut client = app.presence();
        async move {
            let p = client
                .get_privacy(user(1).request(pb::GetPrivacyRequest {}))
                .await
                .expect("a user reads their own privacy")
                .into_inner();
            (p.online(), p.last_seen())
        }
    };
    assert_eq!(get(&app).await, (Contacts, Contacts), "CONTACTS by default");

    let saved = app.set_privacy(&user(1), Everyone, Nobody).await.unwrap();
    assert_eq!(
        (saved.online(), saved.last_seen()),
        (Everyone, Nobody),
        "SetPrivacy answers with what was saved"
    );
    assert_eq!(get(&app).await, (Everyone, Nobody));

    app.restart().await;
    assert_eq!(
        get(&app).await,
        (Everyone, Nobody),
        "privacy is stored in the database"
    );
}

/// What a viewer may see of a user: (online status, last_seen).
type Sight = (bool, bool);

/// The matrix, written out by hand: X's (online, last_seen) settings → what a contact and a
/// stranger (whose own last_seen is EVERYONE, so reciprocity hides nothing) may see.
const MATRIX: [(Visibility, Visibility, Sight, Sight); 9] = [
    (Everyone, Everyone, (true, true), (true, true)),
    (Everyone, Contacts, (true, true), (true, false)),
    (Everyone, Nobody, (true, false), (true, false)),
    (Contacts, Everyone, (true, true), (false, true)),
    (Contacts, Contacts, (true, true), (false, false)),
    (Contacts, Nobody, (true, false), (false, false)),
    (Nobody, Everyone, (false, true), (false, true)),
    (Nobody, Contacts, (false, true), (false, false)),
    (Nobody, Nobody, (false, false), (false, false)),
];

/// One user's history in the matrix test, as a service saw it: version `base` before, then
/// online at `t1` (base+1), offline at `t2` (base+2), online again at `t3` (base+3).
#[derive(Debug, Clone, Copy)]
struct History {
    base: u64,
    t1: i64,
    t2: i64,
    t3: i64,
}

/// The updates a viewer with `sight` must be pushed for that history: (status, last_seen,
/// version), the version `None` where it is left to its own test.
fn expected_pushes(sight: Sight, h: History) -> Vec<(Status, Option<i64>, Option<u64>)> {
    match sight {
        (true, true) => vec![
            (Online, Some(h.t1), Some(h.base + 1)),
            (Offline, Some(h.t2), Some(h.base + 2)),
            (Online, Some(h.t3), Some(h.base + 3)),
        ],
        (true, false) => vec![
            (Online, None, Some(h.base + 1)),
            (Offline, None, Some(h.base + 2)),
            (Online, None, Some(h.base + 3)),
        ],
        // Coming online is hidden; going offline shows as a new last_seen. Which version it
        // carries is the subject of `a_hidden_online_status_does_not_leak_through_the_version`.
        (false, true) => vec![(Offline, Some(h.t2), None)],
        (false, false) => vec![],
    }
}

/// Checks what a viewer with `sight` reads of a user with history `h`, now online.
fn assert_read(p: &pb::UserPresence, sight: Sight, h: History, path: &str) {
    let case = format!("user {} via {path}, sight {sight:?}", p.user_id);
    assert_eq!(p.connected, None, "users never get `connected`: {case}");
    match sight {
        (true, true) => assert_eq!(seen(p), (Online, Some(h.t3), h.base + 3), "{case}"),
        (true, false) => assert_eq!(seen(p), (Online, None, h.base + 3), "{case}"),
        // The version of this case is the subject of its own test (it must not reveal the
        // hidden online status).
        (false, true) => assert_eq!(
            (p.status(), last_seen(p)),
            (Offline, Some(h.t2)),
            "a hidden online status reads as OFFLINE since the last visible offline: {case}"
        ),
        (false, false) => assert_eq!(
            *p,
            never_seen(p.user_id),
            "hidden entirely = never seen: {case}"
        ),
    }
}

/// Every (online, last_seen) setting × contact and stranger × every path: GetPresence, the
/// welcome, WatchContacts snapshots and updates, pushed device updates.
#[tokio::test]
async fn the_privacy_matrix_holds_on_every_read_and_push_path() {
    const CONTACT: u64 = 1;
    const STRANGER: u64 = 2;
    const SENTINEL: u64 = 3;
    let xs: Vec<u64> = (0..MATRIX.len() as u64).map(|k| 10 + k).collect();
    let app = spawn_app(|_| {}).await;

    let mut pairs: Vec<(u64, u64)> = xs.iter().map(|&x| (CONTACT, x)).collect();
    pairs.extend([(CONTACT, SENTINEL), (STRANGER, SENTINEL)]);
    app.add_contacts(&pairs).await;
    for u in [STRANGER, SENTINEL] {
        app.set_privacy(&user(u), Everyone, Everyone).await.unwrap();
    }
    for (&x, (online, last_seen, _, _)) in xs.iter().zip(MATRIX) {
        app.set_privacy(&user(x), online, last_seen).await.unwrap();
    }

    let mut contact_device = app.device(&user(CONTACT)).await;
    let mut contact_watcher = app.watcher(&user(CONTACT), &[]).await;
    let mut stranger_device = app.device(&user(STRANGER)).await;
    let mut watched = xs.clone();
    watched.push(SENTINEL);
    let mut stranger_watcher = app.watcher(&user(STRANGER), &watched).await;
    let mut service_watcher = app.watcher(&service(), &xs).await;

    // Each X: online, offline, online again, one after the other.
    let mut histories = Vec::new();
    let mut x_devices = Vec::new();
    for &x in &xs {
        let base = find(&service_watcher.snapshot, x).version;
        let first = app.device(&user(x)).await;
        let t1 = last_seen(&service_watcher.next_update().await).unwrap();
        first.close();
        let off = service_watcher.next_update().await;
        assert_eq!((off.user_id, off.status()), (x, Offline));
        let t2 = last_seen(&off).unwrap();
        x_devices.push(app.device(&user(x)).await);
        let on = service_watcher.next_update().await;
        assert_eq!(on.version, base + 3, "three changes of user {x}");
        let t3 = last_seen(&on).unwrap();
        histories.push(History { base, t1, t2, t3 });
    }
    // The sentinel's change comes after all of them: what a receiver got before it is all it
    // will ever get of them.
    let _sentinel = app.device(&user(SENTINEL)).await;

    let is_sentinel = |p: &pb::UserPresence| p.user_id == SENTINEL;
    let pushed = [
        (
            "contact device",
            contact_device.updates_until(is_sentinel).await,
            true,
        ),
        (
            "contact watcher",
            contact_watcher.updates_until(is_sentinel).await,
            true,
        ),
        (
            "stranger watcher",
            stranger_watcher.updates_until(is_sentinel).await,
            false,
        ),
    ];
    let at_stranger_device = stranger_device.next_update().await;
    assert_eq!(
        at_stranger_device.user_id, SENTINEL,
        "a stranger's device hears of no X at all"
    );
    for (path, updates, is_contact) in &pushed {
        for ((&x, (online, last_seen_setting, c, s)), h) in xs.iter().zip(MATRIX).zip(&histories) {
            let sight = if *is_contact { c } else { s };
            let expected = expected_pushes(sight, *h);
            let got: Vec<_> = updates
                .iter()
                .filter(|p| p.user_id == x)
                .enumerate()
                .map(|(i, p)| {
                    let version_checked = expected.get(i).is_none_or(|e| e.2.is_some());
                    (
                        p.status(),
                        last_seen(p),
                        version_checked.then_some(p.version),
                    )
                })
                .collect();
            assert_eq!(
                got, expected,
                "{path}: updates of user {x} with online {online:?}, last_seen {last_seen_setting:?}"
            );
            assert!(
                updates.iter().all(|p| p.connected.is_none()),
                "{path}: users never get `connected`"
            );
        }
    }

    // Reads, now that every X is online again.
    let by_contact = app.get_presence(&user(CONTACT), &xs).await.unwrap();
    let by_stranger = app.get_presence(&user(STRANGER), &xs).await.unwrap();
    let contact_welcome = app.device(&user(CONTACT)).await.welcome.contacts;
    let stranger_welcome = app.device(&user(STRANGER)).await.welcome.contacts;
    let contact_snapshot = app.watcher(&user(CONTACT), &[]).await.snapshot;
    let stranger_snapshot = app.watcher(&user(STRANGER), &xs).await.snapshot;
    assert_eq!(
        stranger_welcome
            .iter()
            .map(|p| p.user_id)
            .collect::<Vec<_>>(),
        vec![SENTINEL],
        "a stranger's welcome lists only its contacts"
    );
    for ((&x, (_, _, c, s)), h) in xs.iter().zip(MATRIX).zip(&histories) {
        assert_read(&find(&by_contact, x), c, *h, "GetPresence by a contact");
        assert_read(&find(&contact_welcome, x), c, *h, "a contact's welcome");
        assert_read(
            &find(&contact_snapshot, x),
            c,
            *h,
            "a contact's watch snapshot",
        );
        assert_read(&find(&by_stranger, x), s, *h, "GetPresence by a stranger");
        assert_read(
            &find(&stranger_snapshot, x),
            s,
            *h,
            "a stranger's watch snapshot",
        );
    }
    drop(x_devices);
}

#[tokio::test]
async fn reciprocity_hides_last_seen_from_viewers_who_hide_their_own() {
    const VIEWER: u64 = 1;
    const CONTACT: u64 = 2;
    const STRANGER: u64 = 3;
    let app = spawn_app(|_| {}).await;
    app.add_contacts(&[(VIEWER, CONTACT)]).await;
    for u in [CONTACT, STRANGER] {
        app.set_privacy(&user(u), Everyone, Everyone).await.unwrap();
        app.device(&user(u)).await.close();
    }
    app.wait_for_connections(0).await;
    let truth = app
        .get_presence(&service(), &[CONTACT, STRANGER])
        .await
        .unwrap();

    for (own, contact_visible, stranger_visible) in [
        (Nobody, false, false),
        (Contacts, true, false),
        (Everyone, true, true),
    ] {
        app.set_privacy(&user(VIEWER), Everyone, own).await.unwrap();
        let reads = [
            (
                "GetPresence",
                app.get_presence(&user(VIEWER), &[CONTACT, STRANGER])
                    .await
                    .unwrap(),
            ),
            (
                "watch snapshot",
                app.watcher(&user(VIEWER), &[CONTACT, STRANGER])
                    .await
                    .snapshot,
            ),
            ("welcome", app.device(&user(VIEWER)).await.welcome.contacts),
        ];
        for (path, views) in reads {
            for (id, visible) in [(CONTACT, contact_visible), (STRANGER, stranger_visible)] {
                let Some(view) = views.iter().find(|p| p.user_id == id) else {
                    assert_eq!(path, "welcome", "only the welcome leaves strangers out");
                    continue;
                };
                let expected = if visible {
                    last_seen(&find(&truth, id))
                } else {
                    None
                };
                assert_eq!(
                    last_seen(view),
                    expected,
                    "viewer's own last_seen {own:?}: user {id}'s last_seen via {path}"
                );
                assert_eq!(
                    view.status(),
                    Offline,
                    "reciprocity is about last_seen only"
                );
            }
        }
    }
}

/// The viewer's open streams when it switches its own last_seen from EVERYONE to NOBODY: a
/// device, a contacts watch and a watch of listed users (a contact and a stranger, both showing
/// everything to everyone).
struct ViewerStreams {
    app: TestApp,
    device: Device,
    contacts_watch: Watcher,
    listed_watch: Watcher,
}

const VIEWER: u64 = 1;
const ITS_CONTACT: u64 = 2;
const A_STRANGER: u64 = 3;

/// Opens the viewer's streams, hides the viewer's last_seen, then both others go offline.
async fn viewer_hides_its_last_seen_then_others_go_offline() -> ViewerStreams {
    let app = spawn_app(|_| {}).await;
    app.add_contacts(&[(VIEWER, ITS_CONTACT)]).await;
    for u in [VIEWER, ITS_CONTACT, A_STRANGER] {
        app.set_privacy(&user(u), Everyone, Everyone).await.unwrap();
    }
    let contact_phone = app.device(&user(ITS_CONTACT)).await;
    let stranger_phone = app.device(&user(A_STRANGER)).await;
    let device = app.device(&user(VIEWER)).await;
    let contacts_watch = app.watcher(&user(VIEWER), &[]).await;
    let listed_watch = app.watcher(&user(VIEWER), &[ITS_CONTACT, A_STRANGER]).await;

    app.set_privacy(&user(VIEWER), Everyone, Nobody)
        .await
        .unwrap();
    contact_phone.close();
    stranger_phone.close();
    ViewerStreams {
        app,
        device,
        contacts_watch,
        listed_watch,
    }
}

async fn assert_offline_without_last_seen(receiver: &mut Inbox, updates: usize, path: &str) {
    for _ in 0..updates {
        let p = receiver.next_update().await;
        assert_eq!(
            p.status(),
            Offline,
            "{path}: user {} went offline",
            p.user_id
        );
        assert_eq!(
            last_seen(&p),
            None,
            "{path}: a viewer who now hides their own last_seen is pushed none of user {}'s",
            p.user_id
        );
    }
}

#[tokio::test]
async fn reciprocity_applies_at_once_to_the_device_and_contacts_watch_of_a_viewer_hiding_its_last_seen()
 {
    let mut s = viewer_hides_its_last_seen_then_others_go_offline().await;
    assert_offline_without_last_seen(&mut s.device, 1, "device").await;
    assert_offline_without_last_seen(&mut s.contacts_watch, 1, "contacts watcher").await;
    drop(s.app);
}

#[tokio::test]
async fn reciprocity_applies_at_once_to_a_watch_of_listed_users_of_a_viewer_hiding_its_last_seen() {
    let mut s = viewer_hides_its_last_seen_then_others_go_offline().await;
    assert_offline_without_last_seen(&mut s.listed_watch, 2, "listed watcher").await;
    drop(s.app);
}

#[tokio::test]
async fn a_viewer_who_loses_access_gets_one_offline_update_at_once_then_nothing() {
    const X: u64 = 1;
    let app = spawn_app(|_| {}).await;
    app.add_contacts(&[(X, 2)]).await;
    // The stranger shows its own last_seen to everyone, so reciprocity hides nothing from it.
    for u in [X, 3] {
        app.set_privacy(&user(u), Everyone, Everyone).await.unwrap();
    }
    let mut contact_device = app.device(&user(2)).await;
    let mut contact_watcher = app.watcher(&user(2), &[]).await;
    let mut stranger_watcher = app.watcher(&user(3), &[X]).await;
    let mut service_watcher = app.watcher(&service(), &[X]).await;
    let phone = app.device(&user(X)).await;
    service_watcher.next_update().await;
    let mut viewers = [
        ("contact device", &mut *contact_device),
        ("contact watcher", &mut *contact_watcher),
        ("stranger watcher", &mut *stranger_watcher),
    ];
    for (path, receiver) in viewers.iter_mut() {
        let p = receiver.next_update().await;
        assert_eq!(p.status(), Online, "{path} sees X online before");
    }

    app.set_privacy(&user(X), Nobody, Nobody).await.unwrap();
    let current = app.presence_of(&service(), X).await;
    for (path, receiver) in viewers.iter_mut() {
        let p = receiver.next_update().await;
        assert_eq!(
            seen(&p),
            (Offline, None, current.version),
            "{path} is sent X as OFFLINE without last_seen, at the current version"
        );
    }

    app.update_status(&user(X), Away).await.unwrap();
    phone.close();
    let away = service_watcher.next_update().await;
    let off = service_watcher.next_update().await;
    assert_eq!(
        (away.status(), off.status()),
        (Away, Offline),
        "(control) X did change twice"
    );
    for (path, receiver) in viewers.iter_mut() {
        receiver
            .expect_nothing(QUIET, &format!("{path} may no longer see X"))
            .await;
    }
    for viewer in [2, 3] {
        assert_eq!(
            app.presence_of(&user(viewer), X).await,
            never_seen(X),
            "later reads by user {viewer} give the never-seen answer, version 0"
        );
    }

    app.set_privacy(&user(X), Everyone, Everyone).await.unwrap();
    let now = app.presence_of(&service(), X).await;
    for (path, receiver) in viewers.iter_mut() {
        let p = receiver.next_update().await;
        assert_eq!(
            seen(&p),
            (Offline, last_seen(&now), now.version),
            "{path} regains access and is sent the current presence at once"
        );
    }
}

#[tokio::test]
async fn an_invisible_or_hidden_user_coming_and_going_sends_no_event_to_those_it_hides_from() {
    const X: u64 = 1;
    const VIEWER: u64 = 2;
    const SENTINEL: u64 = 3;
    let app = spawn_app(|_| {}).await;
    app.add_contacts(&[(X, VIEWER), (VIEWER, SENTINEL)]).await;
    let mut viewer = app.device(&user(VIEWER)).await;
    let mut viewer_watch = app.watcher(&user(VIEWER), &[]).await;
    let mut service_watcher = app.watcher(&service(), &[X]).await;

    // Invisible: chosen OFFLINE, then a device comes and goes.
    app.update_status(&user(X), Offline).await.unwrap();
    let phone = app.device(&user(X)).await;
    let svc = app.presence_of(&service(), X).await;
    assert_eq!(
        (svc.status(), svc.connected, last_seen(&svc)),
        (Offline, Some(true), None),
        "(control) the invisible device is live, and never visibly online"
    );
    phone.close();
    app.wait_for_connections(1).await;

    // Hidden: online status and last_seen for nobody, then a device comes and goes.
    app.update_status(&user(X), Online).await.unwrap();
    app.set_privacy(&user(X), Nobody, Nobody).await.unwrap();
    let phone = app.device(&user(X)).await;
    assert_eq!(service_watcher.next_update().await.status(), Online);
    phone.close();
    assert_eq!(
        service_watcher.next_update().await.status(),
        Offline,
        "(control) the hidden user did come and go"
    );

    let _sentinel = app.device(&user(SENTINEL)).await;
    for (path, receiver) in [("device", &mut *viewer), ("watcher", &mut *viewer_watch)] {
        let first = receiver.next_update().await;
        assert_eq!(
            first.user_id, SENTINEL,
            "the viewer's {path} got no event of user {X} before the sentinel's: {first:?}"
        );
    }
}

/// A viewer may see X's last_seen but not X's online status. X coming online changes nothing
/// the viewer may see, so the answer must not change: a new version would reveal it.
#[tokio::test]
async fn a_hidden_online_status_does_not_leak_through_the_version() {
    const X: u64 = 1;
    let app = spawn_app(|_| {}).await;
    app.add_contacts(&[(X, 2)]).await;
    app.set_privacy(&user(X), Nobody, Everyone).await.unwrap();
    app.device(&user(X)).await.close();
    app.wait_for_connections(0).await;
    let before = app.presence_of(&user(2), X).await;
    assert_eq!(before.status(), Offline);
    assert!(last_seen(&before).is_some(), "the viewer may see last_seen");

    let _phone = app.device(&user(X)).await;
    let svc = app.presence_of(&service(), X).await;
    assert_eq!(svc.status(), Online, "(control) X is online now");
    let after = app.presence_of(&user(2), X).await;
    assert_eq!(
        after, before,
        "nothing the viewer may see changed, so neither may the version"
    );
}

/// A user watching a contact by id sees what a contact may see; once the pair is removed it is
/// a stranger, and a CONTACTS-only user must hide from it like from any stranger.
#[tokio::test]
async fn a_removed_contact_watching_by_id_stops_seeing_a_contacts_only_user() {
    const X: u64 = 1;
    const FORMER: u64 = 2;
    let app = spawn_app(|_| {}).await;
    app.add_contacts(&[(X, FORMER)]).await;
    let mut by_id = app.watcher(&user(FORMER), &[X]).await;
    let mut service_watcher = app.watcher(&service(), &[X]).await;
    let _phone = app.device(&user(X)).await;
    assert_eq!(
        by_id.next_update().await.status(),
        Online,
        "as a contact it sees X come online"
    );
    service_watcher.next_update().await;

    app.remove_contacts(&[(X, FORMER)]).await;
    assert_eq!(
        app.presence_of(&user(FORMER), X).await,
        never_seen(X),
        "(control) GetPresence already treats user 2 as a stranger"
    );
    app.update_status(&user(X), Away).await.unwrap();
    assert_eq!(
        service_watcher.next_update().await.status(),
        Away,
        "(control) X changed"
    );
    let mut leaked = Vec::new();
    while let Ok(p) = tokio::time::timeout(QUIET, async { by_id.next_update().await }).await {
        leaked.push(p);
    }
    assert!(
        leaked.iter().all(|p| p.status() != Away),
        "a former contact must not see X's contacts-only status change: {leaked:?}"
    );
}

#[tokio::test]
async fn a_service_sees_everything_with_connected_and_users_never_get_connected() {
    let app = spawn_app(|_| {}).await;
    app.add_contacts(&[(1, 4), (2, 4), (3, 4)]).await;
    app.set_privacy(&user(1), Nobody, Nobody).await.unwrap();
    let _hidden = app.device(&user(1)).await;
    app.update_status(&user(2), Offline).await.unwrap();
    let _invisible = app.device(&user(2)).await;
    let ids = [1, 2, 3];

    let svc = app.get_presence(&service(), &ids).await.unwrap();
    let expected = |p: &pb::UserPresence| (p.status(), last_seen(p).is_some(), p.connected);
    assert_eq!(
        svc.iter().map(expected).collect::<Vec<_>>(),
        vec![
            (Online, true, Some(true)),
            (Offline, false, Some(true)),
            (Offline, false, Some(false)),
        ],
        "a service sees through privacy; `connected` is true for the invisible device too"
    );
    let mut watch = app.watcher(&service(), &ids).await;
    assert_eq!(watch.snapshot, svc, "the service watch snapshot agrees");
    app.update_status(&user(1), Away).await.unwrap();
    let p = watch.next_update().await;
    assert_eq!(
        (p.user_id, p.status(), p.connected),
        (1, Away, Some(true)),
        "service updates carry `connected`"
    );

    for views in [
        app.get_presence(&user(4), &ids).await.unwrap(),
        app.get_presence(&service_for(4), &ids).await.unwrap(),
        app.watcher(&user(4), &[]).await.snapshot,
        app.device(&user(4)).await.welcome.contacts,
    ] {
        assert!(
            views.iter().all(|p| p.connected.is_none()),
            "users never get `connected`: {views:?}"
        );
    }
}

#[tokio::test]
async fn users_always_see_themselves_fully() {
    let app = spawn_app(|_| {}).await;
    app.set_privacy(&user(1), Nobody, Nobody).await.unwrap();
    let phone = app.device(&user(1)).await;
    let me = phone.me();
    assert_eq!(me.status(), Online, "own welcome shows the truth");
    assert!(last_seen(&me).is_some());
    let read = app.presence_of(&user(1), 1).await;
    assert_eq!(read, me, "own GetPresence shows the same");
    let svc = app.presence_of(&service(), 1).await;
    assert_eq!(
        (read.version, read.connected),
        (svc.version, None),
        "the real version, but no `connected`"
    );
}

//! Bad input gets a clear error and changes nothing. One table of refused calls, each checked
//! for its code and for the words its message must hold (what was wrong), then one check that
//! nothing changed: the next event a contact sees is a later, valid change (its version one
//! above the last), and contacts, privacy and streams are as they were. Bad messages on an open
//! device stream, which end that stream, have tests of their own.
use presence::pb::{
    self,
    Status::{Away, Busy},
};
use tonic::Code;

use crate::helpers::*;

/// One refused call: what it was, the code and the words its message must hold, and what the
/// server answered.
struct Refusal {
    why: &'static str,
    code: Code,
    words: &'static [&'static str],
    got: Result<(), tonic::Status>,
}

/// Awaits a call and records it as a row of the table.
macro_rules! row {
    ($rows:ident, $why:expr, $code:expr, $words:expr, $call:expr) => {
        $rows.push(Refusal {
            why: $why,
            code: $code,
            words: $words,
            got: $call.await.map(|_| ()),
        })
    };
}

fn pair(user_id: u64, contact_id: u64) -> pb::ContactPair {
    pb::ContactPair {
        user_id,
        contact_id,
    }
}

fn privacy(online: i32, last_seen: i32) -> pb::SetPrivacyRequest {
    pb::SetPrivacyRequest {
        settings: Some(pb::PrivacySettings {
            online,
            last_seen,
            approximate_last_seen: None,
        }),
    }
}

fn list(user_id: u64) -> pb::ListContactsRequest {
    pb::ListContactsRequest {
        user_id,
        page_size: 0,
        page_token: String::new(),
    }
}

#[tokio::test]
async fn every_bad_request_is_refused_naming_what_was_wrong_and_changes_nothing() {
    let app = spawn_app(|_| {}).await;
    app.add_contacts(&[(1, 2), (3, 4)]).await;
    let mut contact = app.device(&user(2)).await;
    let _phone = app.device(&user(1)).await;
    let online = contact.next_update().await;
    let (me, nobody, svc) = (user(1), anonymous(), service());
    let (presence, contacts) = (app.presence(), app.contacts());
    let open = |caller: &Caller, first: pb::ClientMessage| {
        let caller = caller.clone();
        let app = &app;
        async move { open_stream(app, &caller, vec![first]).await.0.map(|_| ()) }
    };
    let watch = |caller: &Caller, ids: &'static [u64]| {
        let caller = caller.clone();
        let app = &app;
        async move { Watcher::open(app, &caller, ids).await.map(|_| ()) }
    };
    let mut rows: Vec<Refusal> = Vec::new();

    // Values.
    row!(
        rows,
        "STATUS_UNSPECIFIED is no status",
        Code::InvalidArgument,
        &["STATUS_UNSPECIFIED"],
        app.update_status_raw(&me, pb::Status::Unspecified as i32)
    );
    row!(
        rows,
        "an unknown status value is named",
        Code::InvalidArgument,
        &["42"],
        app.update_status_raw(&me, 42)
    );
    row!(
        rows,
        "id 0 in GetPresence, naming the entry",
        Code::InvalidArgument,
        &["user_ids[1]"],
        app.get_presence(&me, &[1, 0])
    );
    row!(
        rows,
        "id 0 in WatchContacts",
        Code::InvalidArgument,
        &["user_ids"],
        watch(&svc, &[0])
    );
    row!(
        rows,
        "user 0 is no identity",
        Code::Unauthenticated,
        &[],
        app.update_status(&user(0), Busy)
    );
    row!(
        rows,
        "a pair with user 0",
        Code::InvalidArgument,
        &["pairs[0]"],
        contacts
            .clone()
            .add_contacts(svc.request(pb::AddContactsRequest {
                pairs: vec![pair(0, 5)]
            }))
    );
    row!(
        rows,
        "listing user 0",
        Code::InvalidArgument,
        &["user_id"],
        contacts.clone().list_contacts(svc.request(list(0)))
    );
    row!(
        rows,
        "a self pair, naming the entry (the valid pair of the request is not added)",
        Code::InvalidArgument,
        &["pairs[1]"],
        contacts
            .clone()
            .add_contacts(svc.request(pb::AddContactsRequest {
                pairs: vec![pair(5, 6), pair(7, 7)]
            }))
    );
    for (online_v, last_seen_v, word) in [
        (0, 1, "VISIBILITY_UNSPECIFIED"),
        (1, 0, "VISIBILITY_UNSPECIFIED"),
        (42, 1, "42"),
        (1, 42, "42"),
    ] {
        let why = match (online_v, word) {
            (0, _) => "an unspecified online visibility",
            (1, "42") => "an unknown last_seen visibility",
            (1, _) => "an unspecified last_seen visibility",
            _ => "an unknown online visibility",
        };
        let words: &'static [&'static str] = if word == "42" {
            &["42"]
        } else {
            &["VISIBILITY_UNSPECIFIED"]
        };
        row!(
            rows,
            why,
            Code::InvalidArgument,
            words,
            presence
                .clone()
                .set_privacy(me.request(privacy(online_v, last_seen_v)))
        );
    }
    row!(
        rows,
        "privacy settings are required",
        Code::InvalidArgument,
        &["settings"],
        presence
            .clone()
            .set_privacy(me.request(pb::SetPrivacyRequest { settings: None }))
    );

    // Streams that do not start with hello.
    row!(
        rows,
        "a ping before hello",
        Code::FailedPrecondition,
        &["hello"],
        open(&user(7), ping(1))
    );
    row!(
        rows,
        "a status before hello",
        Code::FailedPrecondition,
        &["hello"],
        open(&user(7), status_message(Busy as i32))
    );

    // Who may call what.
    row!(
        rows,
        "Authenticate without identity",
        Code::Unauthenticated,
        &[],
        open(&nobody, hello("phone"))
    );
    row!(
        rows,
        "UpdateStatus without identity",
        Code::Unauthenticated,
        &[],
        app.update_status(&nobody, Busy)
    );
    row!(
        rows,
        "GetPresence without identity",
        Code::Unauthenticated,
        &[],
        app.get_presence(&nobody, &[1])
    );
    row!(
        rows,
        "WatchContacts without identity",
        Code::Unauthenticated,
        &[],
        watch(&nobody, &[1])
    );
    row!(
        rows,
        "RemoveContacts without identity",
        Code::Unauthenticated,
        &[],
        contacts
            .clone()
            .remove_contacts(nobody.request(pb::RemoveContactsRequest {
                pairs: vec![pair(1, 2)]
            }))
    );
    row!(
        rows,
        "GetStats without identity",
        Code::Unauthenticated,
        &[],
        presence
            .clone()
            .get_stats(nobody.request(pb::GetStatsRequest {}))
    );
    row!(
        rows,
        "GetStats is for services",
        Code::PermissionDenied,
        &[],
        presence
            .clone()
            .get_stats(me.request(pb::GetStatsRequest {}))
    );
    row!(
        rows,
        "a user cannot add contacts, not even their own",
        Code::PermissionDenied,
        &[],
        contacts
            .clone()
            .add_contacts(me.request(pb::AddContactsRequest {
                pairs: vec![pair(1, 9)]
            }))
    );
    row!(
        rows,
        "a user cannot remove contacts",
        Code::PermissionDenied,
        &[],
        contacts
            .clone()
            .remove_contacts(me.request(pb::RemoveContactsRequest {
                pairs: vec![pair(3, 4)]
            }))
    );
    row!(
        rows,
        "a user cannot list anyone's contacts",
        Code::PermissionDenied,
        &[],
        contacts.clone().list_contacts(me.request(list(3)))
    );
    row!(
        rows,
        "UpdateStatus needs a user",
        Code::FailedPrecondition,
        &["x-presence-user-id"],
        app.update_status(&svc, Busy)
    );
    row!(
        rows,
        "Authenticate needs a user",
        Code::FailedPrecondition,
        &["x-presence-user-id"],
        open(&svc, hello("edge"))
    );
    row!(
        rows,
        "a service has no contacts to watch",
        Code::InvalidArgument,
        &["user_ids"],
        watch(&svc, &[])
    );

    for r in rows {
        assert_refused(r.got, r.code, r.words, r.why);
    }

    // Nothing changed.
    assert_eq!(
        app.contacts_of(1).await,
        vec![2],
        "(1, 2) is still there, (1, 9) was not added"
    );
    assert_eq!(app.contacts_of(3).await, vec![4], "(3, 4) was not removed");
    for id in [5, 6, 7, 9] {
        assert_eq!(
            app.contacts_of(id).await,
            Vec::<u64>::new(),
            "no pair of a refused request"
        );
    }
    let now = presence
        .clone()
        .get_privacy(me.request(pb::GetPrivacyRequest {}))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (now.online(), now.last_seen()),
        (pb::Visibility::Contacts, pb::Visibility::Contacts),
        "privacy is the default still"
    );
    let stats = app.stats().await;
    assert_eq!(
        (stats.connections, stats.watchers, stats.changes),
        (2, 0, 2),
        "no stream and no change came out of the refused calls (only the two devices)"
    );
    app.update_status(&me, Away).await.unwrap();
    let next = contact.next_update().await;
    assert_eq!(
        (next.user_id, next.status(), next.version),
        (1, Away, online.version + 1),
        "the contact's next event is the valid change"
    );
}

#[tokio::test]
async fn a_bad_message_on_a_device_stream_ends_that_stream_as_invalid_and_changes_nothing() {
    let app = spawn_app(|_| {}).await;
    app.add_contacts(&[(1, 2)]).await;
    let mut contact = app.device(&user(2)).await;
    let _phone = Device::connect(&app, &user(1), "phone").await.unwrap();
    let mut last = contact.next_update().await.version;
    let cases = [
        (status_message(42), "42", Busy, "an unknown status"),
        (hello("again"), "hello", Away, "a second hello"),
    ];
    for (bad, word, then, what) in cases {
        let mut laptop = Device::connect(&app, &user(1), "laptop").await.unwrap();
        laptop.send(bad).await;
        let status = laptop
            .ended_within(WAIT)
            .await
            .unwrap_or_else(|| panic!("{what} ends the stream with a status"));
        assert_eq!(status.code(), Code::InvalidArgument, "{what}: {status:?}");
        assert!(status.message().contains(word), "{what}: {status:?}");
        app.wait_for_connections(2).await;
        app.update_status(&user(1), then).await.unwrap();
        let next = contact.next_update().await;
        assert_eq!(
            (next.status(), next.version),
            (then, last + 1),
            "{what} changed nothing (and the phone keeps the user online)"
        );
        last = next.version;
    }
}

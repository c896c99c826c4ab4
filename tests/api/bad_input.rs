//! Bad input gets a clear error and changes nothing. Each test checks the code and then that
//! nothing changed: the next event a contact sees is the one of a later, valid change (its
//! version one above the last), or the state read back is the same.
use presence::pb::{
    self,
    Status::{Away, Busy, Online},
};
use tonic::Code;

use crate::helpers::*;

#[tokio::test]
async fn unspecified_and_unknown_statuses_are_refused_and_change_nothing() {
    let app = spawn_app(|_| {}).await;
    app.add_contacts(&[(1, 2)]).await;
    let mut contact = app.device(&user(2)).await;
    let _phone = app.device(&user(1)).await;
    let online = contact.next_update().await;

    let unspecified = app
        .update_status_raw(&user(1), pb::Status::Unspecified as i32)
        .await;
    assert_refused(
        unspecified,
        Code::InvalidArgument,
        &["STATUS_UNSPECIFIED"],
        "STATUS_UNSPECIFIED is no status",
    );
    let unknown = app.update_status_raw(&user(1), 42).await;
    assert_refused(
        unknown,
        Code::InvalidArgument,
        &["42"],
        "an unknown enum value is refused, naming it",
    );

    app.update_status(&user(1), Away).await.unwrap();
    let next = contact.next_update().await;
    assert_eq!(
        (next.status(), next.version),
        (Away, online.version + 1),
        "the refused calls changed nothing: the next event is the valid change"
    );
}

#[tokio::test]
async fn an_invalid_status_on_a_device_stream_ends_that_stream_as_invalid_and_changes_nothing() {
    let app = spawn_app(|_| {}).await;
    app.add_contacts(&[(1, 2)]).await;
    let mut contact = app.device(&user(2)).await;
    let _phone = Device::connect(&app, &user(1), "phone").await.unwrap();
    let online = contact.next_update().await;
    let mut laptop = Device::connect(&app, &user(1), "laptop").await.unwrap();

    laptop.send(status_message(42)).await;
    let ended = laptop.ended_within(WAIT).await;
    assert_eq!(
        ended.map(|s| s.code()),
        Some(Code::InvalidArgument),
        "an unknown status on the stream ends it as invalid"
    );
    app.wait_for_connections(2).await;
    app.update_status(&user(1), Busy).await.unwrap();
    let next = contact.next_update().await;
    assert_eq!(
        (next.status(), next.version),
        (Busy, online.version + 1),
        "the bad message changed no status (and the phone keeps the user online)"
    );
}

#[tokio::test]
async fn user_id_zero_is_refused_everywhere() {
    let app = spawn_app(|_| {}).await;

    let read = app.get_presence(&user(1), &[1, 0]).await;
    assert_refused(
        read,
        Code::InvalidArgument,
        &["user_ids[1]"],
        "id 0 in GetPresence is refused, naming the entry",
    );
    let watch = Watcher::open(&app, &service(), &[0]).await;
    assert_refused(
        watch.map(|w| w.snapshot),
        Code::InvalidArgument,
        &[],
        "id 0 in WatchContacts is refused",
    );
    let as_zero = app.update_status(&user(0), Busy).await;
    assert_refused(as_zero, Code::Unauthenticated, &[], "user 0 is no identity");
    let pair = app
        .contacts()
        .add_contacts(service().request(pb::AddContactsRequest {
            pairs: vec![pb::ContactPair {
                user_id: 0,
                contact_id: 5,
            }],
        }))
        .await;
    assert_refused(
        pair,
        Code::InvalidArgument,
        &[],
        "a pair with user 0 is refused",
    );
    let list = app
        .contacts()
        .list_contacts(service().request(pb::ListContactsRequest {
            user_id: 0,
            page_size: 0,
            page_token: String::new(),
        }))
        .await;
    assert_refused(
        list,
        Code::InvalidArgument,
        &[],
        "listing user 0 is refused",
    );

    assert_eq!(
        app.contacts_of(5).await,
        Vec::<u64>::new(),
        "nothing was added"
    );
    let stats = app.stats().await;
    assert_eq!(
        (stats.connections, stats.watchers, stats.changes),
        (0, 0, 0),
        "no stream and no change came out of the refused calls"
    );
}

#[tokio::test]
async fn a_contact_pair_of_a_user_with_themself_is_refused_and_no_pair_of_the_request_is_added() {
    let app = spawn_app(|_| {}).await;
    let result = app
        .contacts()
        .add_contacts(service().request(pb::AddContactsRequest {
            pairs: vec![
                pb::ContactPair {
                    user_id: 1,
                    contact_id: 2,
                },
                pb::ContactPair {
                    user_id: 3,
                    contact_id: 3,
                },
            ],
        }))
        .await;
    assert_refused(
        result,
        Code::InvalidArgument,
        &["pairs[1]"],
        "a self pair is refused, naming the entry",
    );
    assert_eq!(
        app.contacts_of(1).await,
        Vec::<u64>::new(),
        "the valid pair of the refused request was not added either"
    );
    assert_eq!(app.contacts_of(3).await, Vec::<u64>::new());
}

#[tokio::test]
async fn a_first_message_other_than_hello_fails_the_precondition_and_leaves_the_user_offline() {
    let app = spawn_app(|_| {}).await;
    app.add_contacts(&[(1, 2)]).await;
    let mut contact = app.device(&user(2)).await;

    for first in [ping(1), status_message(Busy as i32)] {
        let (response, _tx) = open_stream(&app, &user(1), vec![first.clone()]).await;
        assert_refused(
            response.map(|_| ()),
            Code::FailedPrecondition,
            &["hello"],
            &format!("{first:?} before hello"),
        );
    }
    assert_eq!(
        app.stats().await.connections,
        1,
        "only user 2's device is live"
    );

    let phone = app.device(&user(1)).await;
    assert_eq!(
        phone.me().status(),
        Online,
        "the status sent before hello was not applied"
    );
    let first = contact.next_update().await;
    assert_eq!(
        (first.user_id, first.status(), first.version),
        (1, Online, 1),
        "the contact's first event about user 1 is the real connect: the refused streams \
         changed nothing"
    );
}

#[tokio::test]
async fn a_second_hello_ends_the_stream_as_invalid_and_changes_nothing_else() {
    let app = spawn_app(|_| {}).await;
    app.add_contacts(&[(1, 2)]).await;
    let mut contact = app.device(&user(2)).await;
    let _phone = Device::connect(&app, &user(1), "phone").await.unwrap();
    let online = contact.next_update().await;
    let mut laptop = Device::connect(&app, &user(1), "laptop").await.unwrap();

    laptop.send(hello("again")).await;
    let ended = laptop.ended_within(WAIT).await;
    let status = ended.expect("the stream ends with a status");
    assert_eq!(
        status.code(),
        Code::InvalidArgument,
        "a second hello: {status:?}"
    );
    assert!(status.message().contains("hello"), "{status:?}");

    app.wait_for_connections(2).await;
    app.update_status(&user(1), Away).await.unwrap();
    let next = contact.next_update().await;
    assert_eq!(
        (next.status(), next.version),
        (Away, online.version + 1),
        "the laptop's refusal sent nothing; the phone keeps user 1 online"
    );
}

#[tokio::test]
async fn a_call_without_identity_is_unauthenticated_and_changes_nothing() {
    let app = spawn_app(|_| {}).await;
    app.add_contacts(&[(1, 2)]).await;
    let nobody = anonymous();

    let (stream, _tx) = open_stream(&app, &nobody, vec![hello("phone")]).await;
    assert_refused(
        stream.map(|_| ()),
        Code::Unauthenticated,
        &[],
        "Authenticate without identity",
    );
    assert_refused(
        app.update_status(&nobody, Busy).await,
        Code::Unauthenticated,
        &[],
        "UpdateStatus without identity",
    );
    assert_refused(
        app.get_presence(&nobody, &[1]).await,
        Code::Unauthenticated,
        &[],
        "GetPresence without identity",
    );
    assert_refused(
        Watcher::open(&app, &nobody, &[1]).await.map(|w| w.snapshot),
        Code::Unauthenticated,
        &[],
        "WatchContacts without identity",
    );
    let remove = app
        .contacts()
        .remove_contacts(nobody.request(pb::RemoveContactsRequest {
            pairs: vec![pb::ContactPair {
                user_id: 1,
                contact_id: 2,
            }],
        }))
        .await;
    assert_refused(
        remove,
        Code::Unauthenticated,
        &[],
        "RemoveContacts without identity",
    );
    assert_refused(
        app.presence()
            .get_stats(nobody.request(pb::GetStatsRequest {}))
            .await,
        Code::Unauthenticated,
        &[],
        "GetStats without identity",
    );

    assert_eq!(app.contacts_of(1).await, vec![2], "the pair is still there");
    let stats = app.stats().await;
    assert_eq!(
        (stats.connections, stats.watchers, stats.changes),
        (0, 0, 0),
        "no stream and no change"
    );
}

#[tokio::test]
async fn users_calling_service_only_rpcs_are_denied_and_change_nothing() {
    let app = spawn_app(|_| {}).await;
    app.add_contacts(&[(3, 4)]).await;
    let me = user(1);

    assert_refused(
        app.presence()
            .get_stats(me.request(pb::GetStatsRequest {}))
            .await,
        Code::PermissionDenied,
        &[],
        "GetStats is for services",
    );
    let pair = |a, b| pb::ContactPair {
        user_id: a,
        contact_id: b,
    };
    assert_refused(
        app.contacts()
            .add_contacts(me.request(pb::AddContactsRequest {
                pairs: vec![pair(1, 2)],
            }))
            .await,
        Code::PermissionDenied,
        &[],
        "a user cannot add contacts, not even their own",
    );
    assert_refused(
        app.contacts()
            .remove_contacts(me.request(pb::RemoveContactsRequest {
                pairs: vec![pair(3, 4)],
            }))
            .await,
        Code::PermissionDenied,
        &[],
        "a user cannot remove contacts",
    );
    assert_refused(
        app.contacts()
            .list_contacts(me.request(pb::ListContactsRequest {
                user_id: 3,
                page_size: 0,
                page_token: String::new(),
            }))
            .await,
        Code::PermissionDenied,
        &[],
        "a user cannot list anyone's contacts",
    );
    assert_eq!(
        app.contacts_of(1).await,
        Vec::<u64>::new(),
        "(1, 2) was not added"
    );
    assert_eq!(app.contacts_of(3).await, vec![4], "(3, 4) was not removed");
}

#[tokio::test]
async fn unknown_or_unspecified_visibility_is_refused_and_privacy_is_unchanged() {
    let app = spawn_app(|_| {}).await;
    let me = user(1);
    for (online, last_seen, word) in [
        (0, 1, "VISIBILITY_UNSPECIFIED"),
        (1, 0, "VISIBILITY_UNSPECIFIED"),
        (42, 1, "42"),
        (1, 42, "42"),
    ] {
        let r = app
            .presence()
            .set_privacy(me.request(pb::SetPrivacyRequest {
                settings: Some(pb::PrivacySettings {
                    online,
                    last_seen,
                    approximate_last_seen: None,
                }),
            }))
            .await;
        assert_refused(r, Code::InvalidArgument, &[word], "a bad visibility");
    }
    let missing = app
        .presence()
        .set_privacy(me.request(pb::SetPrivacyRequest { settings: None }))
        .await;
    assert_refused(
        missing,
        Code::InvalidArgument,
        &["settings"],
        "settings are required",
    );

    let now = app
        .presence()
        .get_privacy(me.request(pb::GetPrivacyRequest {}))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (now.online(), now.last_seen()),
        (pb::Visibility::Contacts, pb::Visibility::Contacts),
        "the defaults are untouched"
    );
}

#[tokio::test]
async fn a_service_that_acts_for_nobody_cannot_use_the_rpcs_of_a_user() {
    let app = spawn_app(|_| {}).await;
    assert_refused(
        app.update_status(&service(), Busy).await,
        Code::FailedPrecondition,
        &["x-presence-user-id"],
        "UpdateStatus needs a user",
    );
    let (stream, _tx) = open_stream(&app, &service(), vec![hello("edge")]).await;
    assert_refused(
        stream.map(|_| ()),
        Code::FailedPrecondition,
        &["x-presence-user-id"],
        "Authenticate needs a user",
    );
    assert_refused(
        Watcher::open(&app, &service(), &[])
            .await
            .map(|w| w.snapshot),
        Code::InvalidArgument,
        &["user_ids"],
        "a service has no contacts to watch",
    );
    assert_eq!(app.stats().await.changes, 0, "nothing changed");
}

//! Signed identities (issue 3). Tokens are signed here, by the tests, with `jsonwebtoken`:
//! nothing bypasses the server's verification.
//!
//! A refused credential must change nothing. Each rejection test tries every kind of call as
//! user 1 with the bad credential, then proves that none of it took effect: user 1 has no
//! stored row (checked after a later change of user 2 was flushed), and when user 1 finally
//! connects with a valid token, the contact's first event is that connect, ONLINE (not the
//! BUSY tried), at version 1, with last_seen visible (privacy untouched).
use jsonwebtoken::Algorithm;
use presence::pb::{
    self,
    Status::{Busy, Offline, Online},
    Visibility::Nobody,
};
use serde_json::json;
use tonic::Code;

use crate::helpers::*;

const ISSUER: &str = "presence-tests";
const AUDIENCE: &str = "presence-api";

/// A JWT-mode server that also expects an issuer and an audience, with users 1 and 2 as
/// contacts.
async fn strict_app() -> TestApp {
    let app = spawn_jwt_app(|s| {
        s.jwt_issuer = Some(ISSUER.into());
        s.jwt_audience = Some(AUDIENCE.into());
    })
    .await;
    app.add_contacts(&[(1, 2)]).await;
    app
}

/// Every kind of call as `caller` is refused with `code`.
async fn assert_every_call_refused(app: &TestApp, caller: &Caller, code: Code, case: &str) {
    let (stream, _tx) = open_stream(app, caller, vec![hello("phone")]).await;
    assert_refused(
        stream.map(|_| ()),
        code,
        &[],
        &format!("Authenticate, {case}"),
    );
    assert_refused(
        app.update_status(caller, Busy).await,
        code,
        &[],
        &format!("UpdateStatus, {case}"),
    );
    assert_refused(
        app.set_privacy(caller, Nobody, Nobody).await,
        code,
        &[],
        &format!("SetPrivacy, {case}"),
    );
    assert_refused(
        app.get_presence(caller, &[2]).await,
        code,
        &[],
        &format!("GetPresence, {case}"),
    );
    assert_refused(
        Watcher::open(app, caller, &[]).await.map(|w| w.snapshot),
        code,
        &[],
        &format!("WatchContacts, {case}"),
    );
    let add = app
        .contacts()
        .add_contacts(caller.request(pb::AddContactsRequest {
            pairs: vec![pb::ContactPair {
                user_id: 1,
                contact_id: 3,
            }],
        }))
        .await;
    assert_refused(add, code, &[], &format!("AddContacts, {case}"));
}

/// Nothing the refused calls tried took effect for user 1.
async fn assert_user_one_untouched(app: &TestApp) {
    let mut contact = app.device(&app.user_caller(2)).await;
    app.wait_for_row(2, "user 2 online", |r| r.is_online).await;
    assert_eq!(
        app.row(1).await,
        None,
        "no row was written for user 1 (a later change of user 2 was flushed already)"
    );
    assert_eq!(app.contacts_of(1).await, vec![2], "no pair was added");

    let _phone = app.device(&app.user_caller(1)).await;
    let first = contact.next_update().await;
    assert_eq!(
        (first.user_id, first.status(), first.version),
        (1, Online, 1),
        "the contact's first event about user 1 is its valid connect: no refused call changed \
         anything"
    );
    assert!(
        last_seen(&first).is_some(),
        "user 1's privacy was not changed to NOBODY"
    );
}

#[tokio::test]
async fn a_valid_user_token_identifies_the_user() {
    let app = strict_app().await;
    let phone = app.device(&app.user_caller(1)).await;
    assert_eq!(
        (phone.me().user_id, phone.me().status()),
        (1, Online),
        "the token's sub is the user"
    );
    let dev_metadata = app.get_presence(&user(1), &[1]).await;
    assert_refused(
        dev_metadata,
        Code::Unauthenticated,
        &[],
        "development metadata is no identity once a key is configured",
    );
}

#[tokio::test]
async fn calls_without_a_valid_signature_are_unauthenticated_before_any_state_changes() {
    let app = strict_app().await;
    let claims = app.claims("1");
    let header_none = base64url(br#"{"alg":"none","typ":"JWT"}"#);
    let payload = base64url(claims.to_string().as_bytes());
    let cases: Vec<(&str, Caller)> = vec![
        ("no token", anonymous()),
        ("development metadata only", user(1)),
        (
            "not a bearer token",
            authorization(&format!("Basic {}", app.user_token(1))),
        ),
        ("not a JWT", bearer("not-a-token")),
        (
            "signed with another secret",
            bearer(&sign(
                &claims,
                Algorithm::HS256,
                "another-secret-of-enough-bytes",
            )),
        ),
        ("alg none", bearer(&format!("{header_none}.{payload}."))),
        (
            "HS512, an algorithm not configured, with the right secret",
            bearer(&sign(&claims, Algorithm::HS512, SECRET)),
        ),
    ];
    for (case, caller) in &cases {
        assert_every_call_refused(&app, caller, Code::Unauthenticated, case).await;
    }
    assert_user_one_untouched(&app).await;
}

#[tokio::test]
async fn expired_and_not_yet_valid_tokens_are_unauthenticated_before_any_state_changes() {
    let app = strict_app().await;
    let now = unix_now();
    let mut expired = app.claims("1");
    expired["exp"] = json!(now - 60);
    let mut not_yet = app.claims("1");
    not_yet["nbf"] = json!(now + 3600);
    let mut no_exp = app.claims("1");
    no_exp.as_object_mut().unwrap().remove("exp");
    for (case, claims) in [
        ("expired", expired),
        ("nbf in the future", not_yet),
        ("no exp", no_exp),
    ] {
        let caller = bearer(&sign(&claims, Algorithm::HS256, SECRET));
        assert_every_call_refused(&app, &caller, Code::Unauthenticated, case).await;
    }
    assert_user_one_untouched(&app).await;
}

#[tokio::test]
async fn tokens_for_another_issuer_or_audience_are_unauthenticated_before_any_state_changes() {
    let app = strict_app().await;
    let mut wrong_iss = app.claims("1");
    wrong_iss["iss"] = json!("someone-else");
    let mut wrong_aud = app.claims("1");
    wrong_aud["aud"] = json!("another-api");
    for (case, claims) in [("wrong iss", wrong_iss), ("wrong aud", wrong_aud)] {
        let caller = bearer(&sign(&claims, Algorithm::HS256, SECRET));
        assert_every_call_refused(&app, &caller, Code::Unauthenticated, case).await;
    }
    assert_user_one_untouched(&app).await;
}

#[tokio::test]
async fn a_token_without_an_issuer_is_unauthenticated_when_one_is_expected() {
    let app = strict_app().await;
    let mut claims = app.claims("1");
    claims.as_object_mut().unwrap().remove("iss");
    let caller = bearer(&sign(&claims, Algorithm::HS256, SECRET));
    assert_every_call_refused(&app, &caller, Code::Unauthenticated, "no iss").await;
    assert_user_one_untouched(&app).await;
}

#[tokio::test]
async fn a_token_without_an_audience_is_unauthenticated_when_one_is_expected() {
    let app = strict_app().await;
    let mut claims = app.claims("1");
    claims.as_object_mut().unwrap().remove("aud");
    let caller = bearer(&sign(&claims, Algorithm::HS256, SECRET));
    assert_every_call_refused(&app, &caller, Code::Unauthenticated, "no aud").await;
    assert_user_one_untouched(&app).await;
}

#[tokio::test]
async fn a_subject_that_is_not_a_positive_integer_is_unauthenticated_before_any_state_changes() {
    let app = strict_app().await;
    for sub in ["0", "abc", "-1", "", "1.5"] {
        let caller = bearer(&sign(&app.claims(sub), Algorithm::HS256, SECRET));
        assert_every_call_refused(
            &app,
            &caller,
            Code::Unauthenticated,
            &format!("sub {sub:?}"),
        )
        .await;
    }
    assert_user_one_untouched(&app).await;
}

#[tokio::test]
async fn a_user_token_cannot_act_for_another_user() {
    let app = spawn_jwt_app(|_| {}).await;
    app.add_contacts(&[(1, 3), (2, 3)]).await;
    let mut three = app.device(&app.user_caller(3)).await;
    let _two = app.device(&app.user_caller(2)).await;
    let two_online = three.next_update().await;

    let impostor = app.user_caller(1).acting_for(2);
    assert_every_call_refused(
        &app,
        &impostor,
        Code::PermissionDenied,
        "user 1 acting for 2",
    )
    .await;
    assert_eq!(
        app.presence_of(&app.service_caller(), 2).await,
        pb::UserPresence {
            connected: Some(true),
            ..two_online
        },
        "user 2's presence is unchanged"
    );
    assert_eq!(app.contacts_of(1).await, vec![3], "no pair was added");

    let himself = app.user_caller(1).acting_for(1);
    app.update_status(&himself, Busy)
        .await
        .expect("naming oneself is allowed");
    let _one = app.device(&app.user_caller(1)).await;
    let next = three.next_update().await;
    assert_eq!(
        (next.user_id, next.status()),
        (1, Busy),
        "user 3's next event is user 1's own change: nothing of user 2 changed"
    );
}

#[tokio::test]
async fn a_service_token_acting_for_a_user_sees_exactly_what_that_user_sees() {
    let app = spawn_jwt_app(|_| {}).await;
    app.add_contacts(&[(1, 2), (1, 4)]).await;
    let _two = app.device(&app.user_caller(2)).await;
    let _three = app.device(&app.user_caller(3)).await;
    let _four = app.device(&app.user_caller(4)).await;
    app.set_privacy(&app.user_caller(3), pb::Visibility::Everyone, Nobody)
        .await
        .unwrap();
    app.set_privacy(&app.user_caller(4), Nobody, Nobody)
        .await
        .unwrap();
    let ids = [1, 2, 3, 4, 5];

    let as_user = app.get_presence(&app.user_caller(1), &ids).await.unwrap();
    let as_agent = app
        .get_presence(&app.service_caller().acting_for(1), &ids)
        .await
        .unwrap();
    assert_eq!(
        as_agent, as_user,
        "a service acting for user 1 sees exactly what user 1 sees"
    );
    assert!(
        as_agent.iter().all(|p| p.connected.is_none()),
        "and no `connected`, which is for services on their own"
    );
    assert_eq!(
        find(&as_agent, 4),
        never_seen(4),
        "user 4 hides everything from its contact"
    );
    let as_service = app.get_presence(&app.service_caller(), &ids).await.unwrap();
    assert_eq!(
        (
            find(&as_service, 4).status(),
            find(&as_service, 4).connected
        ),
        (Online, Some(true)),
        "(control) the service on its own sees user 4"
    );

    let user_watch = app.watcher(&app.user_caller(1), &[]).await;
    let agent_watch = app.watcher(&app.service_caller().acting_for(1), &[]).await;
    assert_eq!(
        agent_watch.snapshot, user_watch.snapshot,
        "the acting service watches user 1's contacts through user 1's eyes"
    );

    let answer = app
        .update_status(&app.service_caller().acting_for(1), Busy)
        .await
        .unwrap();
    assert_eq!(answer.user_id, 1, "the service changed user 1's status");
    let _one = app.device(&app.user_caller(1)).await;
    assert_eq!(
        app.presence_of(&app.user_caller(2), 1).await.status(),
        Busy,
        "user 1 shows the status the service chose for them"
    );
}

#[tokio::test]
async fn a_service_token_is_a_service_and_a_user_token_is_not() {
    let app = spawn_jwt_app(|_| {}).await;
    app.presence()
        .get_stats(app.service_caller().request(pb::GetStatsRequest {}))
        .await
        .expect("a service token may read the stats");
    assert_refused(
        app.presence()
            .get_stats(app.user_caller(1).request(pb::GetStatsRequest {}))
            .await,
        Code::PermissionDenied,
        &[],
        "a user token may not",
    );
    let mut user_with_role = app.claims("1");
    user_with_role["role"] = json!("user");
    assert_refused(
        app.presence()
            .get_stats(
                bearer(&sign(&user_with_role, Algorithm::HS256, SECRET))
                    .request(pb::GetStatsRequest {}),
            )
            .await,
        Code::PermissionDenied,
        &[],
        "only role \"service\" makes a service",
    );
    assert_refused(
        app.presence()
            .get_stats(
                app.user_caller(1)
                    .with("x-presence-service", SERVICE)
                    .request(pb::GetStatsRequest {}),
            )
            .await,
        Code::PermissionDenied,
        &[],
        "with a key configured, x-presence-service metadata makes nobody a service",
    );
}

#[tokio::test]
async fn a_device_stream_is_ended_when_its_token_expires_and_the_user_goes_offline() {
    let app = spawn_jwt_app(|_| {}).await;
    app.add_contacts(&[(1, 2)]).await;
    let mut contact = app.device(&app.user_caller(2)).await;
    let exp = unix_now() + 2;
    let mut claims = app.claims("1");
    claims["exp"] = json!(exp);
    let mut phone = app
        .device(&bearer(&sign(&claims, Algorithm::HS256, SECRET)))
        .await;
    phone.ping(1).await;
    assert_eq!(contact.next_update().await.status(), Online);

    let ended = phone.ended_within(std::time::Duration::from_secs(8)).await;
    let ended_at = unix_now();
    let status = ended.expect("the stream ends with a status");
    assert_eq!(
        status.code(),
        Code::Unauthenticated,
        "an expired token ends the stream: {status:?}"
    );
    assert!(
        ended_at <= exp + 3,
        "it ends within a few seconds of exp: ended at {ended_at}, exp {exp}"
    );
    let offline = contact.next_update().await;
    assert_eq!(
        (offline.user_id, offline.status()),
        (1, Offline),
        "the user goes offline as usual"
    );
    assert!(last_seen(&offline).is_some());
}

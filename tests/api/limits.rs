//! Abuse limits (issue 3): rate limits, device and request-size caps, the hello timeout, and
//! the refusal to run unauthenticated on a public address. Each limit is shrunk through its
//! setting; each refusal names the limit and changes nothing.
use std::time::{Duration, Instant};

use presence::pb::{
    self,
    Status::{Away, Busy, Offline, Online},
};
use presence::server::Application;
use tonic::Code;

use crate::helpers::*;

#[tokio::test]
async fn status_changes_beyond_the_rate_limit_are_refused_naming_it_and_nothing_is_fanned_out() {
    let app = spawn_app(|s| s.rate_status_per_min = 3).await;
    app.add_contacts(&[(1, 2)]).await;
    let mut contact = app.device(&user(2)).await;
    let phone = app.device(&user(1)).await;
    let mut last = contact.next_update().await;

    for s in [Away, Busy, Away] {
        app.update_status(&user(1), s).await.unwrap();
        let p = contact.next_update().await;
        assert_eq!((p.status(), p.version), (s, last.version + 1));
        last = p;
    }
    let fourth = app.update_status(&user(1), Online).await;
    assert_refused(
        fourth,
        Code::ResourceExhausted,
        &["3", "per minute"],
        "the 4th status change in a minute is over the limit, which the message names",
    );

    phone.close();
    let next = contact.next_update().await;
    assert_eq!(
        (next.status(), next.version),
        (Offline, last.version + 1),
        "the refused ONLINE was not fanned out: the next event is the disconnect"
    );
    app.update_status(&user(2), Busy)
        .await
        .expect("the limit is per user: user 2 still has its allowance");
}

#[tokio::test]
async fn presence_ids_beyond_the_rate_limit_are_refused_naming_it() {
    let app = spawn_app(|s| s.rate_ids_per_min = 10).await;
    let six: Vec<u64> = (1..=6).collect();
    assert_eq!(app.get_presence(&user(1), &six).await.unwrap().len(), 6);
    assert_refused(
        app.get_presence(&user(1), &six).await,
        Code::ResourceExhausted,
        &["10"],
        "12 ids in a minute is over a limit of 10, which the message names",
    );
    assert_eq!(
        app.get_presence(&user(2), &six).await.unwrap().len(),
        6,
        "the limit is per user"
    );
    assert_eq!(
        app.get_presence(&service(), &[six.clone(), six].concat())
            .await
            .unwrap()
            .len(),
        6,
        "services on their own are not limited"
    );
}

#[tokio::test]
async fn a_device_beyond_max_devices_is_refused_and_the_others_keep_working() {
    let app = spawn_app(|s| s.max_devices = 2).await;
    let mut phone = Device::connect(&app, &user(1), "phone").await.unwrap();
    let laptop = Device::connect(&app, &user(1), "laptop").await.unwrap();
    let before = app.presence_of(&service(), 1).await;

    let third = Device::connect(&app, &user(1), "tablet").await;
    assert_refused(
        third.map(|d| d.welcome),
        Code::ResourceExhausted,
        &["2"],
        "a third device is over max_devices = 2, which the message names",
    );
    assert_eq!(
        app.stats().await.connections,
        2,
        "the refused device is not counted"
    );
    assert_eq!(
        app.presence_of(&service(), 1).await,
        before,
        "the refusal changed nothing"
    );
    phone.ping(5).await;

    laptop.close();
    app.wait_for_connections(1).await;
    Device::connect(&app, &user(1), "tablet")
        .await
        .expect("with a device gone, another may connect");
    assert!(
        Device::connect(&app, &user(2), "phone").await.is_ok(),
        "the limit is per user"
    );
}

#[tokio::test]
async fn add_contacts_with_more_than_max_pairs_is_refused_naming_the_limit_and_adds_nothing() {
    let app = spawn_app(|s| s.max_pairs = 2).await;
    let pairs = |ps: &[(u64, u64)]| pb::AddContactsRequest {
        pairs: ps
            .iter()
            .map(|&(user_id, contact_id)| pb::ContactPair {
                user_id,
                contact_id,
            })
            .collect(),
    };
    let refused = app
        .contacts()
        .add_contacts(service().request(pairs(&[(1, 2), (1, 3), (1, 4)])))
        .await;
    let status = refused.expect_err("3 pairs are over max_pairs = 2");
    assert!(
        matches!(
            status.code(),
            Code::InvalidArgument | Code::ResourceExhausted
        ),
        "an oversize request: {status:?}"
    );
    assert!(
        status.message().contains('2'),
        "the message names the limit: {status:?}"
    );
    assert_eq!(
        app.contacts_of(1).await,
        Vec::<u64>::new(),
        "no pair of the refused request was added"
    );
    app.contacts()
        .add_contacts(service().request(pairs(&[(1, 2), (1, 3)])))
        .await
        .expect("max_pairs pairs are fine");
    assert_eq!(app.contacts_of(1).await, vec![2, 3]);
}

#[tokio::test]
async fn a_stream_that_sends_no_hello_is_closed_after_the_hello_timeout() {
    let app = spawn_app(|s| s.hello_timeout_s = 1).await;
    let started = Instant::now();
    let (response, _tx) = tokio::time::timeout(WAIT, open_stream(&app, &user(1), vec![]))
        .await
        .expect("the silent stream is closed within the wait");
    let elapsed = started.elapsed();
    let status = response.expect_err("a stream without hello is refused");
    assert!(
        status.message().contains("hello"),
        "the error says a hello was missing: {status:?}"
    );
    assert!(
        elapsed >= Duration::from_millis(900),
        "the client had the whole timeout to say hello: {elapsed:?}"
    );
    let svc = app.presence_of(&service(), 1).await;
    assert_eq!(
        (svc.status(), svc.connected, svc.version),
        (Offline, Some(false), 0),
        "the silent stream never made the user online"
    );
    assert_eq!(app.stats().await.connections, 0);
}

#[tokio::test]
async fn development_mode_is_refused_on_a_non_loopback_address_saying_why() {
    let dir = tempfile::tempdir().unwrap();
    let public = test_settings(&dir, |s| s.listen = "0.0.0.0:0".parse().unwrap());
    let error = match Application::build(public.clone()).await {
        Ok(_) => panic!("development mode must not listen on 0.0.0.0"),
        Err(e) => format!("{e:#}"),
    };
    for word in [
        "development mode",
        "0.0.0.0",
        "PRESENCE_JWT_SECRET",
        "loopback",
    ] {
        assert!(
            error.contains(word),
            "the refusal says why and how to fix it ({word:?}): {error}"
        );
    }

    let mut with_key = public;
    with_key.jwt_secret = Some(SECRET.into());
    assert!(
        Application::build(with_key).await.is_ok(),
        "(control) with a key the same address is fine"
    );
}

#[tokio::test]
async fn a_jwt_secret_shorter_than_32_bytes_is_refused_naming_the_setting() {
    let dir = tempfile::tempdir().unwrap();
    let settings = test_settings(&dir, |s| s.jwt_secret = Some("short".into()));
    match Application::build(settings).await {
        Ok(_) => panic!("a 5-byte secret must be refused"),
        Err(e) => assert!(
            format!("{e:#}").contains("PRESENCE_JWT_SECRET"),
            "the refusal names the setting: {e:#}"
        ),
    }
}

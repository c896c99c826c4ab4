//! Bulk reads: GetPresence, GetStats and ListContacts.
use presence::pb::{
    self,
    Status::{Offline, Online},
};
use tonic::Code;

use crate::helpers::*;

#[tokio::test]
async fn get_presence_answers_one_entry_per_distinct_id_in_request_order() {
    let app = spawn_app(|_| {}).await;
    let _five = app.device(&user(5)).await;
    let two = app.device(&user(2)).await;
    two.close();
    app.wait_for_connections(1).await;

    let answer = app
        .get_presence(&service(), &[5, 2, 5, 9, 2])
        .await
        .unwrap();
    assert_eq!(
        answer.iter().map(|p| p.user_id).collect::<Vec<_>>(),
        vec![5, 2, 9],
        "one entry per distinct id, in the order first asked"
    );
    assert_eq!(
        (answer[0].status(), answer[0].connected),
        (Online, Some(true))
    );
    assert_eq!(answer[1].status(), Offline);
    assert!(last_seen(&answer[1]).is_some(), "user 2 was seen");
    assert_eq!(
        answer[2],
        pb::UserPresence {
            connected: Some(false),
            ..never_seen(9)
        },
        "an unknown user is OFFLINE, without last_seen, at version 0"
    );

    let by_user = app.get_presence(&user(7), &[9]).await.unwrap();
    assert_eq!(
        by_user,
        vec![never_seen(9)],
        "a user gets the same for an unknown user, without `connected`"
    );
    assert_eq!(
        app.get_presence(&user(7), &[]).await.unwrap(),
        Vec::new(),
        "no ids, no answers"
    );
}

#[tokio::test]
async fn get_presence_refuses_more_than_max_ids_naming_the_limit() {
    let app = spawn_app(|s| s.max_ids = 3).await;
    let ok = app.get_presence(&user(1), &[1, 2, 3]).await;
    assert_eq!(ok.unwrap().len(), 3, "max_ids ids are fine");

    let too_many = app.get_presence(&user(1), &[1, 2, 3, 4]).await;
    assert_refused(
        too_many,
        Code::InvalidArgument,
        &["3"],
        "more ids than max_ids is invalid, and the message names the limit",
    );
    let as_service = app.get_presence(&service(), &[1, 2, 3, 4]).await;
    assert_refused(
        as_service,
        Code::InvalidArgument,
        &["3"],
        "the size limit holds for services too",
    );
    let watch = Watcher::open(&app, &service(), &[1, 2, 3, 4]).await;
    assert_refused(
        watch.map(|w| w.snapshot),
        Code::InvalidArgument,
        &["3"],
        "WatchContacts takes at most max_ids ids as well",
    );
}

#[tokio::test]
async fn get_stats_counts_online_users_connections_and_watchers_for_a_service() {
    let app = spawn_app(|_| {}).await;
    let empty = app.stats().await;
    assert_eq!(
        (empty.online_users, empty.connections, empty.watchers),
        (0, 0, 0),
        "a fresh server has nobody"
    );

    let _phone = Device::connect(&app, &user(1), "phone").await.unwrap();
    let laptop = Device::connect(&app, &user(1), "laptop").await.unwrap();
    let _two = app.device(&user(2)).await;
    let _watcher = app.watcher(&user(3), &[]).await;
    let _service_watcher = app.watcher(&service(), &[1, 2]).await;
    let stats = app.stats().await;
    assert_eq!(
        (stats.online_users, stats.connections, stats.watchers),
        (2, 3, 2),
        "two users online on three devices; two watchers, counted apart"
    );

    laptop.close();
    let stats = app
        .wait_for_stats("the laptop to be gone", |s| s.connections == 2)
        .await;
    assert_eq!(stats.online_users, 2, "user 1 is still online on the phone");
}

#[tokio::test]
async fn list_contacts_pages_through_contacts_in_order_and_adding_is_idempotent() {
    let app = spawn_app(|_| {}).await;
    app.add_contacts(&[(1, 6), (1, 2), (4, 1), (1, 3), (1, 5)])
        .await;
    app.add_contacts(&[(1, 2), (2, 1)]).await;

    let mut pages = Vec::new();
    let mut token = String::new();
    loop {
        let page = app
            .contacts()
            .list_contacts(service().request(pb::ListContactsRequest {
                user_id: 1,
                page_size: 2,
                page_token: token.clone(),
            }))
            .await
            .expect("a service may list contacts")
            .into_inner();
        pages.push(page.contact_ids);
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
        assert!(pages.len() < 10, "paging terminates");
    }
    assert_eq!(
        pages,
        vec![vec![2, 3], vec![4, 5], vec![6]],
        "pages of two, ascending, each pair once although added twice"
    );
    assert_eq!(app.contacts_of(2).await, vec![1], "pairs are symmetric");
}

#[tokio::test]
async fn the_health_service_answers_serving_for_the_server_and_each_service() {
    use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus};
    let app = spawn_app(|_| {}).await;
    let mut health = tonic_health::pb::health_client::HealthClient::new(app.connection().await);
    for service in ["", "presence.v1.Presence", "presence.v1.Contacts"] {
        let answer = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap_or_else(|s| panic!("health of {service:?} answers: {s:?}"))
            .into_inner();
        assert_eq!(
            answer.status(),
            ServingStatus::Serving,
            "{service:?} is SERVING once built (migrations done), without credentials"
        );
    }
}

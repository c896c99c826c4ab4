//! Contact changes across nodes (issue 13): a removal followed at once by a status change is
//! seen on every node (it used to be swallowed: removing bumped the version on each node
//! locally), and a contact added while the other changes status gets views in strictly
//! increasing versions (its first view used to be able to arrive after a newer one).
use presence::pb::contacts_client::ContactsClient;
use presence::pb::{self, Status};

use crate::clients::{
    add_contacts, converge, device, service, set_status, status_of, user, watcher,
};
use crate::harness::{Cluster, WAIT, exclusive, shared_redis};

const X: u64 = 1;
const W: u64 = 2;

async fn remove_contacts(node: &crate::harness::Node, pairs: &[(u64, u64)]) {
    let mut client = ContactsClient::new(node.channel.clone());
    client
        .remove_contacts(
            service().request(pb::RemoveContactsRequest {
                pairs: pairs
                    .iter()
                    .map(|&(user_id, contact_id)| pb::ContactPair {
                        user_id,
                        contact_id,
                    })
                    .collect(),
            }),
        )
        .await
        .expect("a service may remove contacts");
}

#[tokio::test]
#[cfg_attr(
    redis_tests_off,
    ignore = "built with PRESENCE_TEST_REDIS=off: the Redis tests are not run"
)]
async fn a_contact_removal_followed_at_once_by_a_status_change_is_seen_on_every_node() {
    let _turn = exclusive().await;
    let redis = shared_redis();
    let cluster = Cluster::start(&redis, 3).await;
    let [a, b, c] = [cluster.node(0), cluster.node(1), cluster.node(2)];
    add_contacts(&cluster.nodes, &[(W, X)]).await;
    let _x = device(a, X).await;
    // W watches X by id from node C: as a contact now, as a stranger after the removal (X lets
    // everyone see its online status, so the stranger still sees its changes).
    let mut presence = pb::presence_client::PresenceClient::new(a.channel.clone());
    presence
        .set_privacy(user(X).request(pb::SetPrivacyRequest {
            settings: Some(pb::PrivacySettings {
                online: pb::Visibility::Everyone as i32,
                last_seen: pb::Visibility::Everyone as i32,
                approximate_last_seen: None,
            }),
        }))
        .await
        .expect("X may set its privacy");
    let mut w = watcher(c, &user(W), &[X]).await;
    assert_eq!(
        status_of(&w.snapshot[0]),
        Status::Online,
        "W sees X online, as a contact"
    );

    remove_contacts(b, &[(W, X)]).await;
    let busy = set_status(b, X, Status::Busy).await;
    let p = w.wait_for(X, Status::Busy, WAIT).await;
    assert_eq!(
        p.version, busy.version,
        "the change after the removal reaches node C"
    );
    let (answer, _) = converge(&cluster.nodes, &[X], WAIT, |p| {
        status_of(&p[0]) == Status::Busy
    })
    .await;
    assert_eq!(
        answer[0].version, busy.version,
        "every node has the same version of X"
    );
}

#[tokio::test]
#[cfg_attr(
    redis_tests_off,
    ignore = "built with PRESENCE_TEST_REDIS=off: the Redis tests are not run"
)]
async fn a_contact_added_during_status_changes_gets_strictly_increasing_views() {
    let _turn = exclusive().await;
    let redis = shared_redis();
    let cluster = Cluster::start(&redis, 3).await;
    let [a, b, c] = [cluster.node(0), cluster.node(1), cluster.node(2)];
    let _x = device(a, X).await;
    let mut w = device(c, W).await;
    // X changes status as fast as it can on node A while the pair is added through node B;
    // W's inbox checks that every view of X it gets is newer than the one before.
    let changer = {
        let node_channel = a.channel.clone();
        tokio::spawn(async move {
            let mut client = pb::presence_client::PresenceClient::new(node_channel);
            let mut last = 0;
            for i in 0..40 {
                let status = [pb::Status::Busy, pb::Status::Away][i % 2];
                let r = client
                    .update_status(user(X).request(pb::UpdateStatusRequest {
                        status: status as i32,
                    }))
                    .await
                    .expect("X may change status");
                last = r.into_inner().presence.expect("a presence").version;
            }
            last
        })
    };
    add_contacts(std::slice::from_ref(b), &[(W, X)]).await;
    let last = changer.await.expect("the changer runs");
    // The inbox has checked every view on the way; the final one is the last change.
    loop {
        let p = w.next_update_of(X, WAIT).await;
        if p.version == last {
            break;
        }
    }
}

//! The clients of the cluster tests: callers named through development-mode metadata, unary
//! calls bounded in time, and receivers (devices and watchers) that check every update they get
//! against what they saw before: per receiver and per user, versions strictly increase for the
//! whole test (issue 6), whichever node produced the change.
use std::time::{Duration, Instant};

use presence::pb;
use presence::pb::{contacts_client::ContactsClient, presence_client::PresenceClient};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

use crate::harness::{Node, WAIT};

#[path = "../common/calls.rs"]
mod calls;
pub use calls::*;
#[path = "../common/streams.rs"]
mod streams;
pub use streams::{Device, Watcher};

/// Awaits a unary call, at most [`WAIT`]: a node that hangs fails the test instead of holding it.
async fn bounded<T>(
    what: &str,
    call: impl Future<Output = Result<tonic::Response<T>, tonic::Status>>,
) -> Result<T, tonic::Status> {
    match tokio::time::timeout(WAIT, call).await {
        Ok(reply) => reply.map(tonic::Response::into_inner),
        Err(_) => panic!("{what}: no answer within {WAIT:?}"),
    }
}

/// Adds symmetric contact pairs as a service, through the first node: the nodes share one
/// database, and the others hear of the change (they update the contacts they cache).
pub async fn add_contacts(nodes: &[Node], pairs: &[(u64, u64)]) {
    let pairs: Vec<pb::ContactPair> = pairs
        .iter()
        .map(|&(user_id, contact_id)| pb::ContactPair {
            user_id,
            contact_id,
        })
        .collect();
    let node = &nodes[0];
    let mut client = ContactsClient::new(node.channel.clone());
    bounded(
        "AddContacts",
        client.add_contacts(service().request(pb::AddContactsRequest { pairs })),
    )
    .await
    .unwrap_or_else(|s| panic!("a service may add contacts on node {}: {s:?}", node.name));
}

/// Presence of `ids` as a service sees it, from `node`.
pub async fn presence_on(node: &Node, ids: &[u64]) -> Vec<pb::UserPresence> {
    let mut client = PresenceClient::new(node.channel.clone());
    bounded(
        &format!("GetPresence on node {}", node.name),
        client.get_presence(service().request(pb::GetPresenceRequest {
            user_ids: ids.to_vec(),
        })),
    )
    .await
    .unwrap_or_else(|s| panic!("a service may read presence on node {}: {s:?}", node.name))
    .users
}

/// Sets `id`'s chosen status through `node`; returns the user's own presence after it.
pub async fn set_status(node: &Node, id: u64, status: pb::Status) -> pb::UserPresence {
    let mut client = PresenceClient::new(node.channel.clone());
    bounded(
        &format!("UpdateStatus on node {}", node.name),
        client.update_status(user(id).request(pb::UpdateStatusRequest {
            status: status as i32,
        })),
    )
    .await
    .unwrap_or_else(|s| panic!("user {id} may set a status on node {}: {s:?}", node.name))
    .presence
    .expect("UpdateStatus returns the presence")
}

pub async fn stats(node: &Node) -> pb::GetStatsResponse {
    let mut client = PresenceClient::new(node.channel.clone());
    bounded(
        &format!("GetStats on node {}", node.name),
        client.get_stats(service().request(pb::GetStatsRequest {})),
    )
    .await
    .expect("a service may read the stats")
}

/// The health of one component of `node` (None while it was never reported).
pub async fn health(node: &Node, component: &str) -> Option<ServingStatus> {
    let mut client = HealthClient::new(node.channel.clone());
    bounded(
        &format!("health of node {}", node.name),
        client.check(HealthCheckRequest {
            service: component.to_string(),
        }),
    )
    .await
    .ok()
    .map(|r| r.status())
}

/// Polls the health of `component` on every node until all report `want`; returns how long
/// it took.
pub async fn wait_for_health(
    nodes: &[Node],
    component: &str,
    want: ServingStatus,
    within: Duration,
) -> Duration {
    let started = Instant::now();
    loop {
        let mut now = Vec::new();
        for node in nodes {
            now.push(health(node, component).await);
        }
        if now.iter().all(|s| *s == Some(want)) {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < within,
            "health of {component:?} is not {want:?} on every node within {within:?}: {now:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// What GetPresence tells of a user, as compared across nodes.
pub type Answer = (u64, pb::Status, u64, Option<i64>, Option<bool>);

fn answer(p: &pb::UserPresence) -> Answer {
    (
        p.user_id,
        status_of(p),
        p.version,
        last_seen(p),
        p.connected,
    )
}

/// Polls GetPresence (as a service) on every node until all answer the same for each of `ids`
/// (status, version, last_seen, connected) and `want` holds of that common answer. Returns the
/// answer and how long it took.
pub async fn converge(
    nodes: &[Node],
    ids: &[u64],
    within: Duration,
    want: impl Fn(&[pb::UserPresence]) -> bool,
) -> (Vec<pb::UserPresence>, Duration) {
    let started = Instant::now();
    loop {
        let mut answers = Vec::new();
        for node in nodes {
            answers.push(presence_on(node, ids).await);
        }
        let first: Vec<Answer> = answers[0].iter().map(answer).collect();
        let agree = answers
            .iter()
            .all(|a| a.iter().map(answer).collect::<Vec<_>>() == first);
        if agree && want(&answers[0]) {
            return (answers.swap_remove(0), started.elapsed());
        }
        if started.elapsed() >= within {
            let table: Vec<String> = nodes
                .iter()
                .zip(&answers)
                .map(|(n, a)| {
                    format!(
                        "  node {}: {:?}",
                        n.name,
                        a.iter().map(answer).collect::<Vec<_>>()
                    )
                })
                .collect();
            panic!(
                "the nodes did not converge within {within:?} (agree: {agree}); (user, status, version, last_seen, connected):\n{}",
                table.join("\n")
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// ---------------------------------------------------------------------------------------------
// Values
// ---------------------------------------------------------------------------------------------

pub fn status_of(p: &pb::UserPresence) -> pb::Status {
    pb::Status::try_from(p.status).unwrap_or(pb::Status::Unspecified)
}

// ---------------------------------------------------------------------------------------------
// Receivers: the common devices and watchers (which check versions), opened on a node
// ---------------------------------------------------------------------------------------------

/// A device of `id` on `node` (label "phone"), its welcome read; panics on refusal.
pub async fn device(node: &Node, id: u64) -> Device {
    device_on(node.channel.clone(), &node.name, id, hello("phone")).await
}

/// A device of `id` on `node` that says it runs on `platform`.
pub async fn device_as(node: &Node, id: u64, platform: pb::Platform) -> Device {
    device_on(
        node.channel.clone(),
        &node.name,
        id,
        hello_on("phone", platform),
    )
    .await
}

async fn device_on(
    channel: tonic::transport::Channel,
    name: &str,
    id: u64,
    hello: pb::ClientMessage,
) -> Device {
    let mut d = Device::open_with(channel, &user(id), hello, WAIT)
        .await
        .unwrap_or_else(|s| panic!("user {id} may connect on node {name}: {s:?}"));
    d.rename(format!("device of user {id} on node {name}"));
    d
}

/// One device per id on `node`, over `connections` HTTP/2 connections of their own, set up
/// 100 at a time (the server admits a bounded number of set-ups at once).
pub async fn connect_many(node: &Node, ids: &[u64], connections: usize) -> Vec<Device> {
    use futures::StreamExt as _;
    let mut channels = Vec::new();
    for _ in 0..connections.max(1) {
        channels.push(
            tonic::transport::Endpoint::from_shared(format!("http://{}", node.addr))
                .expect("a valid URI")
                .connect()
                .await
                .unwrap_or_else(|e| panic!("node {} accepts connections: {e}", node.name)),
        );
    }
    futures::stream::iter(ids.iter().enumerate())
        .map(|(i, &id)| {
            device_on(
                channels[i % channels.len()].clone(),
                &node.name,
                id,
                hello("phone"),
            )
        })
        .buffered(100)
        .collect()
        .await
}

/// A WatchContacts stream of `caller` on `node` (its contacts when `ids` is empty, or, for a
/// service, the listed users); panics on refusal.
pub async fn watcher(node: &Node, caller: &Caller, ids: &[u64]) -> Watcher {
    let mut w = Watcher::open_on(node.channel.clone(), caller, ids)
        .await
        .unwrap_or_else(|s| panic!("{caller:?} may watch {ids:?} on node {}: {s:?}", node.name));
    w.rename(format!("watcher {caller:?} on node {}", node.name));
    w
}

// ---------------------------------------------------------------------------------------------
// Metrics
// ---------------------------------------------------------------------------------------------

/// The value of an unlabelled gauge on a node's `/metrics` (None when not there yet).
pub async fn metric(addr: &str, name: &str) -> Option<f64> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let fetch = async {
        let mut conn = tokio::net::TcpStream::connect(addr).await.ok()?;
        let request = format!("GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        conn.write_all(request.as_bytes()).await.ok()?;
        let mut body = String::new();
        conn.read_to_string(&mut body).await.ok()?;
        Some(body)
    };
    let body = tokio::time::timeout(WAIT, fetch).await.ok().flatten()?;
    body.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
}

/// Polls the gauge until it reads `want`, at most `within`.
pub async fn wait_for_metric(addr: &str, name: &str, want: f64, within: Duration) {
    let started = Instant::now();
    loop {
        let now = metric(addr, name).await;
        if now == Some(want) {
            return;
        }
        assert!(
            started.elapsed() < within,
            "{name} on {addr} is not {want} within {within:?}: {now:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

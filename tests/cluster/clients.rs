//! The clients of the cluster tests: callers named through development-mode metadata, unary
//! calls bounded in time, and receivers (devices and watchers) that check every update they get
//! against what they saw before: per receiver and per user, versions strictly increase for the
//! whole test (issue 6), whichever node produced the change.
use std::collections::{HashMap, VecDeque};
use std::pin::Pin;
use std::time::{Duration, Instant};

use futures::{Stream, StreamExt};
use presence::pb::{self, client_message, server_message, watch_contacts_response};
use presence::pb::{contacts_client::ContactsClient, presence_client::PresenceClient};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

use crate::harness::{Node, WAIT};

#[path = "../common/calls.rs"]
mod calls;
pub use calls::*;

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
// Receivers
// ---------------------------------------------------------------------------------------------

/// What a device or watcher stream yields after its first message.
#[derive(Debug)]
enum Incoming {
    Presence(pb::UserPresence),
    Pong(u64),
    /// A passive device's catch-up (its entries are checked like updates).
    Resync(Vec<pb::UserPresence>),
    Other(String),
}

type IncomingStream = Pin<Box<dyn Stream<Item = Result<Incoming, tonic::Status>> + Send>>;

/// The receiving end of a device or a watcher.
pub struct Inbox {
    /// Names the receiver in failure messages.
    name: String,
    stream: IncomingStream,
    /// Updates read while waiting for something else (a pong), not yet taken.
    backlog: VecDeque<pb::UserPresence>,
    /// The newest version this receiver has of each user, from its welcome or snapshot on.
    versions: HashMap<u64, u64>,
    /// Every update received, in order, for failure messages.
    history: Vec<(u64, pb::Status, u64)>,
}

impl Inbox {
    fn new(name: String, stream: IncomingStream, initial: &[pb::UserPresence]) -> Inbox {
        Inbox {
            name,
            stream,
            backlog: VecDeque::new(),
            versions: initial.iter().map(|p| (p.user_id, p.version)).collect(),
            history: Vec::new(),
        }
    }

    /// Records an update, after checking that it is newer than anything this receiver had of
    /// that user.
    fn check(&mut self, p: &pb::UserPresence) {
        let before = self.versions.get(&p.user_id).copied();
        assert!(
            before.is_none_or(|v| p.version > v),
            "{}: versions of user {} must strictly increase, got {} after {:?}; received so far (user, status, version): {:?}",
            self.name,
            p.user_id,
            p.version,
            before,
            self.history
        );
        self.versions.insert(p.user_id, p.version);
        self.history.push((p.user_id, status_of(p), p.version));
    }

    async fn next_incoming(&mut self, deadline: tokio::time::Instant, what: &str) -> Incoming {
        match tokio::time::timeout_at(deadline, self.stream.next()).await {
            Err(_) => panic!(
                "{}: nothing arrived while waiting for {what}; received so far (user, status, version): {:?}",
                self.name, self.history
            ),
            Ok(Some(Ok(incoming))) => incoming,
            Ok(Some(Err(status))) => panic!(
                "{}: the stream failed while waiting for {what}: {status:?}",
                self.name
            ),
            Ok(None) => panic!("{}: the stream ended while waiting for {what}", self.name),
        }
    }

    /// The next presence update, within `within`.
    pub async fn next_update(&mut self, within: Duration) -> pb::UserPresence {
        if let Some(p) = self.backlog.pop_front() {
            return p;
        }
        let deadline = tokio::time::Instant::now() + within;
        loop {
            match self.next_incoming(deadline, "an update").await {
                Incoming::Presence(p) => {
                    self.check(&p);
                    return p;
                }
                Incoming::Pong(_) => continue,
                Incoming::Resync(users) => {
                    panic!("{}: expected an update, got a resync: {users:?}", self.name)
                }
                Incoming::Other(what) => {
                    panic!("{}: expected an update, got {what}", self.name)
                }
            }
        }
    }

    /// Asserts that the very next update is `user` at `status`, within `within`: nothing else
    /// (no other user's update, no repeat) comes first.
    pub async fn expect(
        &mut self,
        user: u64,
        status: pb::Status,
        within: Duration,
        why: &str,
    ) -> pb::UserPresence {
        let p = self.next_update(within).await;
        assert_eq!(
            (p.user_id, status_of(&p)),
            (user, status),
            "{}: the next update must be user {user} {status:?} ({why}); got {p:?}; received so far: {:?}",
            self.name,
            self.history
        );
        p
    }

    /// The next update of `user`, skipping other users', within `within`.
    pub async fn next_update_of(&mut self, user: u64, within: Duration) -> pb::UserPresence {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let p = self.next_update(left).await;
            if p.user_id == user {
                return p;
            }
        }
    }

    /// Takes updates of `user` until one has `status`, within `within`.
    pub async fn wait_for(
        &mut self,
        user: u64,
        status: pb::Status,
        within: Duration,
    ) -> pb::UserPresence {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() {
                panic!(
                    "{}: user {user} did not become {status:?} within {within:?}; received so far: {:?}",
                    self.name, self.history
                );
            }
            let p = self.next_update_of(user, left).await;
            if status_of(&p) == status {
                return p;
            }
        }
    }

    /// The next message, which must be a resync, within `within`; its entries are checked
    /// like updates (each newer than what this receiver had).
    pub async fn expect_resync(&mut self, within: Duration, why: &str) -> Vec<pb::UserPresence> {
        assert!(
            self.backlog.is_empty(),
            "{}: updates came before the resync ({why}): {:?}",
            self.name,
            self.backlog
        );
        let deadline = tokio::time::Instant::now() + within;
        match self.next_incoming(deadline, "a resync").await {
            Incoming::Resync(users) => {
                for p in &users {
                    self.check(p);
                }
                users
            }
            other => panic!("{}: expected a resync ({why}), got {other:?}", self.name),
        }
    }

    /// Reads whatever has already arrived (checking versions), without waiting; stops quietly
    /// at the end of the stream (a node that was killed).
    pub fn drain(&mut self) -> Vec<pb::UserPresence> {
        let mut out: Vec<pb::UserPresence> = self.backlog.drain(..).collect();
        while let Some(Some(Ok(item))) = futures::FutureExt::now_or_never(self.stream.next()) {
            if let Incoming::Presence(p) = item {
                self.check(&p);
                out.push(p);
            }
        }
        out
    }
}

/// One device: a live Authenticate stream on one node.
pub struct Device {
    pub welcome: pb::Welcome,
    /// Feeds the client side of the stream; the stream stays open as long as this does.
    tx: mpsc::Sender<pb::ClientMessage>,
    inbox: Inbox,
}

impl Device {
    /// Opens a device of `id` on `node` and waits for its welcome.
    pub async fn connect(node: &Node, id: u64) -> Device {
        Self::connect_on(node.channel.clone(), &node.name, id).await
    }

    /// Opens a device of `id` on a given connection to node `name`.
    pub async fn connect_on(channel: tonic::transport::Channel, name: &str, id: u64) -> Device {
        Self::open(channel, name, id, pb::Platform::Unspecified).await
    }

    /// Opens a device of `id` on `node` that says it runs on `platform`.
    pub async fn connect_as(node: &Node, id: u64, platform: pb::Platform) -> Device {
        Self::open(node.channel.clone(), &node.name, id, platform).await
    }

    async fn open(
        channel: tonic::transport::Channel,
        name: &str,
        id: u64,
        platform: pb::Platform,
    ) -> Device {
        let opening = async {
            let (tx, rx) = mpsc::channel(16);
            let hello = pb::ClientMessage {
                kind: Some(client_message::Kind::Hello(pb::Hello {
                    device: "phone".into(),
                    platform: platform as i32,
                })),
            };
            tx.send(hello).await.expect("the outbound queue has room");
            let mut client = PresenceClient::new(channel);
            let mut stream = client
                .authenticate(user(id).request(ReceiverStream::new(rx)))
                .await?
                .into_inner();
            let first = stream.message().await?;
            Ok::<_, tonic::Status>((tx, stream, first))
        };
        let (tx, stream, first) = tokio::time::timeout(WAIT, opening)
            .await
            .unwrap_or_else(|_| panic!("user {id} on node {name}: no welcome within {WAIT:?}"))
            .unwrap_or_else(|s| panic!("user {id} may connect on node {name}: {s:?}"));
        let mut welcome = match first.and_then(|m| m.kind) {
            Some(server_message::Kind::Welcome(w)) => w,
            other => panic!("the first server message is a welcome, got {other:?}"),
        };
        let mut stream = stream;
        while !welcome.last_page {
            match stream.message().await.ok().flatten().and_then(|m| m.kind) {
                Some(server_message::Kind::Welcome(w)) => {
                    welcome.contacts.extend(w.contacts);
                    welcome.last_page = w.last_page;
                }
                other => panic!("a welcome's pages come together, got {other:?}"),
            }
        }
        let stream = stream.map(|m| {
            m.map(|m| match m.kind {
                Some(server_message::Kind::PresenceUpdated(p)) => Incoming::Presence(p),
                Some(server_message::Kind::Pong(p)) => Incoming::Pong(p.nonce),
                Some(server_message::Kind::Resync(r)) => Incoming::Resync(r.users),
                other => Incoming::Other(format!("{other:?}")),
            })
        });
        let mut initial = welcome.contacts.clone();
        initial.extend(welcome.self_.clone());
        Device {
            inbox: Inbox::new(
                format!("device of user {id} on node {name}"),
                Box::pin(stream),
                &initial,
            ),
            welcome,
            tx,
        }
    }

    /// The welcome's view of contact `id`.
    pub fn contact(&self, id: u64) -> pb::UserPresence {
        self.welcome
            .contacts
            .iter()
            .find(|c| c.user_id == id)
            .cloned()
            .unwrap_or_else(|| panic!("user {id} is in the welcome's contacts"))
    }

    /// Tells the server this device is now active, idle or in the background.
    pub async fn set_activity(&self, activity: pb::Activity) {
        let msg = pb::ClientMessage {
            kind: Some(client_message::Kind::SetActivity(pb::SetActivity {
                activity: activity as i32,
            })),
        };
        self.tx
            .send(msg)
            .await
            .unwrap_or_else(|_| panic!("{}: the stream is still open", self.inbox.name));
    }

    /// Pings over the stream and waits for the pong: proof the stream is alive end to end.
    /// Updates read on the way are kept for the next `next_update`.
    pub async fn ping(&mut self, nonce: u64) {
        let ping = pb::ClientMessage {
            kind: Some(client_message::Kind::Ping(pb::Ping { nonce })),
        };
        self.tx
            .send(ping)
            .await
            .unwrap_or_else(|_| panic!("{}: the stream is still open", self.inbox.name));
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            match self.inbox.next_incoming(deadline, "a pong").await {
                Incoming::Pong(n) if n == nonce => return,
                Incoming::Pong(_) => {}
                Incoming::Presence(p) => {
                    self.inbox.check(&p);
                    self.inbox.backlog.push_back(p);
                }
                Incoming::Resync(users) => {
                    panic!(
                        "{}: expected a pong, got a resync: {users:?}",
                        self.inbox.name
                    )
                }
                Incoming::Other(what) => {
                    panic!("{}: expected a pong, got {what}", self.inbox.name)
                }
            }
        }
    }
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
        .map(|(i, &id)| Device::connect_on(channels[i % channels.len()].clone(), &node.name, id))
        .buffered(100)
        .collect()
        .await
}

impl std::ops::Deref for Device {
    type Target = Inbox;
    fn deref(&self) -> &Inbox {
        &self.inbox
    }
}

impl std::ops::DerefMut for Device {
    fn deref_mut(&mut self) -> &mut Inbox {
        &mut self.inbox
    }
}

/// One WatchContacts stream on one node.
pub struct Watcher {
    pub snapshot: Vec<pb::UserPresence>,
    inbox: Inbox,
}

impl Watcher {
    /// Watches `caller`'s contacts (`ids` empty) or, for a service, the listed users.
    pub async fn open(node: &Node, caller: &Caller, ids: &[u64]) -> Watcher {
        let mut client = PresenceClient::new(node.channel.clone());
        let opening = async {
            let mut stream = client
                .watch_contacts(caller.request(pb::WatchContactsRequest {
                    user_ids: ids.to_vec(),
                }))
                .await?
                .into_inner();
            let first = stream.message().await?;
            Ok::<_, tonic::Status>((stream, first))
        };
        let (stream, first) = tokio::time::timeout(WAIT, opening)
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "WatchContacts on node {}: no snapshot within {WAIT:?}",
                    node.name
                )
            })
            .unwrap_or_else(|s| {
                panic!("{caller:?} may watch {ids:?} on node {}: {s:?}", node.name)
            });
        let snapshot = match first.and_then(|m| m.kind) {
            Some(watch_contacts_response::Kind::Snapshot(s)) => s.users,
            other => panic!("the first watch message is a snapshot, got {other:?}"),
        };
        let stream = stream.map(|m| {
            m.map(|m| match m.kind {
                Some(watch_contacts_response::Kind::PresenceUpdated(p)) => Incoming::Presence(p),
                other => Incoming::Other(format!("{other:?}")),
            })
        });
        Watcher {
            inbox: Inbox::new(
                format!("watcher {caller:?} on node {}", node.name),
                Box::pin(stream),
                &snapshot,
            ),
            snapshot,
        }
    }
}

impl std::ops::Deref for Watcher {
    type Target = Inbox;
    fn deref(&self) -> &Inbox {
        &self.inbox
    }
}

impl std::ops::DerefMut for Watcher {
    fn deref_mut(&mut self) -> &mut Inbox {
        &mut self.inbox
    }
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

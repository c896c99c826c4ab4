//! Test clients of the two streaming RPCs: a device (Authenticate) and a watcher
//! (WatchContacts), each with an inbox that waits for what a test expects, with a timeout, and
//! checks, for the whole test, that the versions it gets of each user strictly increase
//! (whichever node made the change). Shared by every suite (`#[path]`-included next to
//! `calls.rs`).
#![allow(dead_code)]

use std::collections::{HashMap, VecDeque};
use std::pin::Pin;
use std::time::Duration;

use futures::{Stream, StreamExt};
use presence::pb::{
    self, presence_client::PresenceClient, server_message, watch_contacts_response,
};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

use super::calls::{Caller, WAIT, activity, hello, ping};

/// What a stream delivered after its welcome or snapshot.
#[derive(Debug)]
pub enum Incoming {
    Presence(pb::UserPresence),
    Pong(u64),
    /// One page of a resync (a device back from the background).
    Resync(pb::Resync),
    /// Anything else, described.
    Other(String),
}

type IncomingStream = Pin<Box<dyn Stream<Item = Result<Incoming, tonic::Status>> + Send>>;

fn status_of(p: &pb::UserPresence) -> pb::Status {
    pb::Status::try_from(p.status).unwrap_or(pb::Status::Unspecified)
}

/// The receiving end of a device or a watcher.
pub struct Inbox {
    /// Names the receiver in failure messages.
    name: String,
    stream: IncomingStream,
    /// Updates read while waiting for something else (a pong), not yet taken.
    backlog: VecDeque<pb::UserPresence>,
    /// The newest version this receiver has of each user, from its welcome or snapshot on.
    versions: HashMap<u64, u64>,
    /// Every update received, in order, for failure messages: (user, status, version).
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

    /// Renames the receiver in failure messages (a node's name, say).
    pub fn rename(&mut self, name: impl Into<String>) {
        self.name = name.into();
    }

    /// Records an update after checking it is newer than anything this receiver had of that
    /// user. A version 0 is the never-seen shape (a viewer denied everything) and is exempt.
    fn check(&mut self, p: &pb::UserPresence) {
        let before = self.versions.get(&p.user_id).copied();
        assert!(
            p.version == 0 || before.is_none_or(|v| p.version > v),
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

    /// The next item of the stream before `deadline` (Err: the deadline passed), checked.
    async fn read(
        &mut self,
        deadline: Instant,
    ) -> Result<Option<Result<Incoming, tonic::Status>>, ()> {
        let item = tokio::time::timeout_at(deadline, self.stream.next())
            .await
            .map_err(|_| ())?;
        match &item {
            Some(Ok(Incoming::Presence(p))) => self.check(&p.clone()),
            Some(Ok(Incoming::Resync(r))) => {
                for p in r.users.clone() {
                    self.check(&p);
                }
            }
            _ => {}
        }
        Ok(item)
    }

    /// The next message before `deadline`, whatever it is (updates kept aside are not in it).
    async fn next_message(&mut self, deadline: Instant, what: &str) -> Incoming {
        match self.read(deadline).await {
            Err(()) => panic!(
                "{}: nothing arrived while waiting for {what}; received so far (user, status, version): {:?}",
                self.name, self.history
            ),
            Ok(Some(Ok(incoming))) => incoming,
            Ok(Some(Err(status))) => {
                panic!(
                    "{}: the stream failed while waiting for {what}: {status:?}",
                    self.name
                )
            }
            Ok(None) => panic!("{}: the stream ended while waiting for {what}", self.name),
        }
    }

    /// The next presence update, within [`WAIT`]. Panics on anything else (pongs are skipped).
    pub async fn next_update(&mut self) -> pb::UserPresence {
        self.next_update_within(WAIT).await
    }

    /// The next presence update, within `within`. Panics on anything else (pongs are skipped).
    pub async fn next_update_within(&mut self, within: Duration) -> pb::UserPresence {
        if let Some(p) = self.backlog.pop_front() {
            return p;
        }
        let deadline = Instant::now() + within;
        loop {
            match self.next_message(deadline, "an update").await {
                Incoming::Presence(p) => return p,
                Incoming::Pong(_) => continue,
                other => panic!("{}: expected an update, got {other:?}", self.name),
            }
        }
    }

    /// The next update of `user`, skipping other users' updates, within `within`.
    pub async fn next_update_of(&mut self, user: u64, within: Duration) -> pb::UserPresence {
        let deadline = Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let p = self.next_update_within(left).await;
            if p.user_id == user {
                return p;
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
        let p = self.next_update_within(within).await;
        assert_eq!(
            (p.user_id, status_of(&p)),
            (user, status),
            "{}: the next update must be user {user} {status:?} ({why}); got {p:?}; received so far: {:?}",
            self.name,
            self.history
        );
        p
    }

    /// Takes updates of `user` until one has `status`, within `within`.
    pub async fn wait_for(
        &mut self,
        user: u64,
        status: pb::Status,
        within: Duration,
    ) -> pb::UserPresence {
        let deadline = Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
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

    /// Updates up to and including the first one matching `last`, each within [`WAIT`].
    pub async fn updates_until(
        &mut self,
        last: impl Fn(&pb::UserPresence) -> bool,
    ) -> Vec<pb::UserPresence> {
        let mut out = Vec::new();
        loop {
            let p = self.next_update().await;
            let done = last(&p);
            out.push(p);
            if done {
                return out;
            }
        }
    }

    /// The next message, within `within`, whatever it is.
    pub async fn next_incoming(&mut self, within: Duration) -> Incoming {
        if let Some(p) = self.backlog.pop_front() {
            return Incoming::Presence(p);
        }
        self.next_message(Instant::now() + within, "a message")
            .await
    }

    /// The resync a device gets when it wakes (its pages merged), which must be the next
    /// message, within `within`.
    pub async fn expect_resync(&mut self, within: Duration, why: &str) -> pb::Resync {
        assert!(
            self.backlog.is_empty(),
            "{}: updates came before the resync ({why}): {:?}",
            self.name,
            self.backlog
        );
        let deadline = Instant::now() + within;
        let mut whole = pb::Resync::default();
        loop {
            match self.next_message(deadline, "a resync").await {
                Incoming::Resync(page) => {
                    whole.users.extend(page.users);
                    if page.last_page {
                        whole.last_page = true;
                        return whole;
                    }
                }
                other => panic!("{}: expected a resync ({why}), got {other:?}", self.name),
            }
        }
    }

    /// Asserts that nothing arrives within `within`. Prefer a barrier (a device's ping, or a
    /// control change the receiver must see next) where there is one: it is exact.
    pub async fn expect_nothing(&mut self, within: Duration, why: &str) {
        assert!(
            self.backlog.is_empty(),
            "{}: expected nothing ({why}), got {:?}",
            self.name,
            self.backlog
        );
        if let Ok(item) = self.read(Instant::now() + within).await {
            panic!("{}: expected nothing ({why}), got {item:?}", self.name);
        }
    }

    /// Every update that arrived so far, without waiting (pongs skipped). Stops quietly at the
    /// end of the stream (a node that was killed).
    pub fn drain(&mut self) -> Vec<pb::UserPresence> {
        let mut out: Vec<pb::UserPresence> = self.backlog.drain(..).collect();
        while let Some(Ok(item)) =
            futures::FutureExt::now_or_never(self.read(Instant::now() + WAIT))
        {
            match item {
                Some(Ok(Incoming::Presence(p))) => out.push(p),
                Some(Ok(Incoming::Pong(_))) => {}
                None | Some(Err(_)) => break,
                other => panic!("{}: expected updates, got {other:?}", self.name),
            }
        }
        out
    }

    /// Skips updates until the stream ends; returns the status it ended with (None for a
    /// clean end). Panics if it does not end within `within`.
    pub async fn ended_within(&mut self, within: Duration) -> Option<tonic::Status> {
        let deadline = Instant::now() + within;
        loop {
            match self.read(deadline).await {
                Err(()) => panic!("{}: the stream did not end within {within:?}", self.name),
                Ok(None) => return None,
                Ok(Some(Err(status))) => return Some(status),
                Ok(Some(Ok(_))) => continue,
            }
        }
    }
}

/// Opens Authenticate on `channel` and sends `first` before anything is read; returns the
/// server's response (an error when the server refuses the stream up front) and the sender.
pub async fn open_stream_on(
    channel: Channel,
    caller: &Caller,
    first: Vec<pb::ClientMessage>,
) -> (
    Result<tonic::Streaming<pb::ServerMessage>, tonic::Status>,
    mpsc::Sender<pb::ClientMessage>,
) {
    let (tx, rx) = mpsc::channel(64);
    for m in first {
        tx.send(m).await.expect("the outbound queue has room");
    }
    let mut client = PresenceClient::new(channel);
    let response = client
        .authenticate(caller.request(ReceiverStream::new(rx)))
        .await
        .map(tonic::Response::into_inner);
    (response, tx)
}

/// One device: a live Authenticate stream.
pub struct Device {
    pub welcome: pb::Welcome,
    /// Feeds the client side of the stream; dropping it half-closes the stream.
    tx: mpsc::Sender<pb::ClientMessage>,
    inbox: Inbox,
}

impl Device {
    /// Opens a device stream labelled `label` on `channel`: hello, then the welcome, within
    /// `within` (a test fails rather than hangs); the server's refusal comes back as the error.
    pub async fn open(
        channel: Channel,
        caller: &Caller,
        label: &str,
        within: Duration,
    ) -> Result<Device, tonic::Status> {
        Self::open_with(channel, caller, hello(label), within).await
    }

    /// Like [`Device::open`], with the hello given (a platform, say).
    pub async fn open_with(
        channel: Channel,
        caller: &Caller,
        hello: pb::ClientMessage,
        within: Duration,
    ) -> Result<Device, tonic::Status> {
        let opening = async {
            let (response, tx) = open_stream_on(channel, caller, vec![hello]).await;
            let mut stream = response?;
            let first = stream.message().await?;
            Ok::<_, tonic::Status>((tx, stream, first))
        };
        let (tx, mut stream, first) = tokio::time::timeout(within, opening)
            .await
            .unwrap_or_else(|_| panic!("{caller:?}: no welcome (nor refusal) within {within:?}"))?;
        let mut welcome = match first.and_then(|m| m.kind) {
            Some(server_message::Kind::Welcome(w)) => w,
            other => panic!("the first server message is a welcome, got {other:?}"),
        };
        // A long contact list comes in pages, each a welcome; the last one is marked.
        while !welcome.last_page {
            let next = tokio::time::timeout(within, stream.message())
                .await
                .unwrap_or_else(|_| {
                    panic!("{caller:?}: the welcome's next page within {within:?}")
                })?;
            match next.and_then(|m| m.kind) {
                Some(server_message::Kind::Welcome(w)) => {
                    welcome.contacts.extend(w.contacts);
                    welcome.last_page = w.last_page;
                }
                other => panic!("a welcome's pages come together, got {other:?}"),
            }
        }
        let user = welcome
            .self_
            .as_ref()
            .map(|p| p.user_id)
            .unwrap_or_default();
        let mut initial = welcome.contacts.clone();
        initial.extend(welcome.self_.clone());
        let stream = stream.map(|m| {
            m.map(|m| match m.kind {
                Some(server_message::Kind::PresenceUpdated(p)) => Incoming::Presence(p),
                Some(server_message::Kind::Pong(p)) => Incoming::Pong(p.nonce),
                Some(server_message::Kind::Resync(r)) => Incoming::Resync(r),
                other => Incoming::Other(format!("{other:?}")),
            })
        });
        Ok(Device {
            welcome,
            tx,
            inbox: Inbox::new(format!("device of user {user}"), Box::pin(stream), &initial),
        })
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

    /// The device's own presence, as the welcome gave it.
    pub fn me(&self) -> pb::UserPresence {
        self.welcome
            .self_
            .clone()
            .expect("the welcome has the caller's own presence")
    }

    pub async fn send(&self, message: pb::ClientMessage) {
        self.tx
            .send(message)
            .await
            .expect("the device stream is still open");
    }

    /// Sends a ping and collects everything that arrives before its pong: a barrier (a pong
    /// comes after whatever the server queued before it).
    pub async fn until_pong(&mut self, nonce: u64) -> Vec<Incoming> {
        self.send(ping(nonce)).await;
        let mut before = Vec::new();
        loop {
            match self.inbox.next_incoming(WAIT).await {
                Incoming::Pong(n) if n == nonce => return before,
                other => before.push(other),
            }
        }
    }

    /// Sends a ping and waits for its pong. Panics if anything else comes first.
    pub async fn ping(&mut self, nonce: u64) {
        self.send(ping(nonce)).await;
        match self.inbox.next_incoming(WAIT).await {
            Incoming::Pong(n) => assert_eq!(n, nonce, "the pong echoes the nonce"),
            other => panic!("{}: expected a pong, got {other:?}", self.inbox.name),
        }
    }

    /// Sends a ping and waits for its pong, keeping the updates that come first for the next
    /// `next_update`: proof the stream is alive end to end, and that everything the server
    /// queued before the ping has arrived.
    pub async fn barrier(&mut self, nonce: u64) {
        self.send(ping(nonce)).await;
        let deadline = Instant::now() + WAIT;
        loop {
            match self.inbox.next_message(deadline, "a pong").await {
                Incoming::Pong(n) if n == nonce => return,
                Incoming::Pong(_) => {}
                Incoming::Presence(p) => self.inbox.backlog.push_back(p),
                other => panic!("{}: expected a pong, got {other:?}", self.inbox.name),
            }
        }
    }

    /// Asserts that nothing reached this device before the pong of a ping sent now: exact where
    /// a timed wait would guess (the server answers a ping after everything queued before it).
    pub async fn expect_nothing_queued(&mut self, nonce: u64, why: &str) {
        assert!(
            self.inbox.backlog.is_empty(),
            "{}: expected nothing ({why}), got {:?}",
            self.inbox.name,
            self.inbox.backlog
        );
        let before = self.until_pong(nonce).await;
        assert!(
            before.is_empty(),
            "{}: expected nothing ({why}), got {before:?}",
            self.inbox.name
        );
    }

    /// Tells the server this device is now active, idle or in the background.
    pub async fn set_activity(&self, a: pb::Activity) {
        self.send(activity(a)).await;
    }

    /// Closes the device: the stream is dropped, as when an app is closed.
    pub fn close(self) {
        drop(self);
    }
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

/// One WatchContacts stream.
pub struct Watcher {
    pub snapshot: Vec<pb::UserPresence>,
    inbox: Inbox,
}

impl Watcher {
    /// Watches the caller's contacts (`ids` empty) or, for a service, the listed users, on
    /// `channel`; the snapshot arrives within [`WAIT`]. The server's refusal is the error.
    pub async fn open_on(
        channel: Channel,
        caller: &Caller,
        ids: &[u64],
    ) -> Result<Watcher, tonic::Status> {
        let mut client = PresenceClient::new(channel);
        let mut stream = tokio::time::timeout(
            WAIT,
            client.watch_contacts(caller.request(pb::WatchContactsRequest {
                user_ids: ids.to_vec(),
            })),
        )
        .await
        .expect("WatchContacts answers within the wait")?
        .into_inner();
        let mut snapshot = Vec::new();
        loop {
            let page = tokio::time::timeout(WAIT, stream.message())
                .await
                .expect("the snapshot arrives within the wait")?;
            match page.and_then(|m| m.kind) {
                Some(watch_contacts_response::Kind::Snapshot(s)) => {
                    snapshot.extend(s.users);
                    if s.last_page {
                        break;
                    }
                }
                other => panic!("a watch starts with its snapshot pages, got {other:?}"),
            }
        }
        let stream = stream.map(|m| {
            m.map(|m| match m.kind {
                Some(watch_contacts_response::Kind::PresenceUpdated(p)) => Incoming::Presence(p),
                other => Incoming::Other(format!("{other:?}")),
            })
        });
        let inbox = Inbox::new(format!("watcher {caller:?}"), Box::pin(stream), &snapshot);
        Ok(Watcher { snapshot, inbox })
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

//! Test clients of the two streaming RPCs: a device (Authenticate) and a watcher
//! (WatchContacts), each with an inbox that waits for what a test expects, with a timeout.
//! Shared by the API and fault suites (`#[path]`-included next to `calls.rs`). The cluster
//! suite has its own inbox, which also checks versions across nodes.
#![allow(dead_code)]

use std::pin::Pin;
use std::time::Duration;

use futures::{Stream, StreamExt};
use presence::pb::{
    self, presence_client::PresenceClient, server_message, watch_contacts_response,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

use super::calls::{Caller, WAIT, hello, ping};

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

/// The receiving end of a device or a watcher.
pub struct Inbox {
    /// Names the receiver in failure messages.
    name: String,
    stream: IncomingStream,
}

impl Inbox {
    /// The next presence update, within [`WAIT`]. Panics on anything else.
    pub async fn next_update(&mut self) -> pb::UserPresence {
        self.next_update_within(WAIT).await
    }

    /// The next presence update, within `within`. Panics on anything else.
    pub async fn next_update_within(&mut self, within: Duration) -> pb::UserPresence {
        match tokio::time::timeout(within, self.stream.next()).await {
            Err(_) => panic!("{}: no update within {within:?}", self.name),
            Ok(Some(Ok(Incoming::Presence(p)))) => p,
            Ok(Some(Ok(Incoming::Other(what)))) => {
                panic!("{}: expected an update, got {what}", self.name)
            }
            Ok(other) => panic!("{}: expected an update, got {other:?}", self.name),
        }
    }

    /// The next update of `user`, skipping other users' updates, within `within`.
    pub async fn next_update_of(&mut self, user: u64, within: Duration) -> pb::UserPresence {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let p = self.next_update_within(left).await;
            if p.user_id == user {
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
        match tokio::time::timeout(within, self.stream.next()).await {
            Err(_) => panic!("{}: nothing within {within:?}", self.name),
            Ok(Some(Ok(incoming))) => incoming,
            Ok(other) => panic!("{}: expected a message, got {other:?}", self.name),
        }
    }

    /// Asserts that nothing arrives within `within`.
    pub async fn expect_nothing(&mut self, within: Duration, why: &str) {
        if let Ok(item) = tokio::time::timeout(within, self.stream.next()).await {
            panic!("{}: expected nothing ({why}), got {item:?}", self.name);
        }
    }

    /// Everything that arrived so far without waiting (updates only; panics on an end).
    pub fn drain(&mut self) -> Vec<pb::UserPresence> {
        let mut out = Vec::new();
        while let Some(item) = futures::FutureExt::now_or_never(self.stream.next()) {
            match item {
                Some(Ok(Incoming::Presence(p))) => out.push(p),
                Some(Ok(Incoming::Pong(_))) => {}
                other => panic!("{}: expected updates, got {other:?}", self.name),
            }
        }
        out
    }

    /// Skips updates until the stream ends; returns the status it ended with (None for a
    /// clean end). Panics if it does not end within `within`.
    pub async fn ended_within(&mut self, within: Duration) -> Option<tonic::Status> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            match tokio::time::timeout_at(deadline, self.stream.next()).await {
                Err(_) => panic!("{}: the stream did not end within {within:?}", self.name),
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
            inbox: Inbox {
                name: format!("device of user {user}"),
                stream: Box::pin(stream),
            },
        })
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

    /// Sends a ping and waits for its pong. Panics if an update comes first.
    pub async fn ping(&mut self, nonce: u64) {
        self.send(ping(nonce)).await;
        match tokio::time::timeout(WAIT, self.inbox.stream.next()).await {
            Ok(Some(Ok(Incoming::Pong(n)))) => assert_eq!(n, nonce, "the pong echoes the nonce"),
            other => panic!("{}: expected a pong, got {other:?}", self.inbox.name),
        }
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
        Ok(Watcher {
            snapshot,
            inbox: Inbox {
                name: format!("watcher {caller:?}"),
                stream: Box::pin(stream),
            },
        })
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

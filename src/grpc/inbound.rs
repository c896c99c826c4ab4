//! What a device sends after its hello (pings, statuses, activity), read on the device
//! stream's own task: the stream's response body polls it before each event (see
//! [`super::device`]). A device costs one task, not a task to write and another to read: the
//! reader's task was about 1 KiB of a device's memory, for a stream that sends a few messages
//! an hour.
//!
//! Messages are handled one at a time, in order; an engine call that has to wait (a status
//! change, an activity change) is kept and polled until it is done before the next message is
//! read. The body is polled whenever its task wakes and it may send, so a client that does not
//! read its answers is not read either: HTTP/2 flow control holds it back.
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Weak};
use std::task::{Context, Poll, Wake, Waker};

use futures::Stream;
use futures::future::BoxFuture;
use tonic::Streaming;

use crate::domain::UserId;
use crate::engine::{EndReason, Engine, Subscriber};
use crate::pb::{self, client_message::Kind as ClientKind};

use super::convert;
use super::limits::RateLimits;

/// Most messages handled in one poll: a client that floods messages yields the task between
/// batches instead of holding it.
const BATCH: usize = 64;

pub(super) struct DeviceInbound {
    /// What the reader waits on wakes it with: the body polls the reader only then, not on
    /// every delivery (a poll of the request stream takes the connection's HTTP/2 lock).
    waker: Waker,
    engine: Engine,
    rates: Arc<RateLimits>,
    sub: Arc<Subscriber>,
    user: UserId,
    /// None once the client half-closed (it stays connected), its side broke, or a message
    /// ended the stream.
    messages: Option<Streaming<pb::ClientMessage>>,
    /// The engine call of the message being handled.
    handling: Option<BoxFuture<'static, ()>>,
    /// When the stream's token expires.
    expiry: Option<Pin<Box<tokio::time::Sleep>>>,
}

/// The reader's wake-up: recorded in the device's queue (see [`Subscriber::wake_reader`]).
struct ReaderWake(Weak<Subscriber>);

impl Wake for ReaderWake {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        if let Some(sub) = self.0.upgrade() {
            sub.wake_reader();
        }
    }
}

/// What one message asks for.
enum Handled {
    Done,
    /// An engine call to await before the next message.
    Later(BoxFuture<'static, ()>),
}

impl DeviceInbound {
    pub(super) fn new(
        engine: Engine,
        rates: Arc<RateLimits>,
        sub: Arc<Subscriber>,
        user: UserId,
        messages: Streaming<pb::ClientMessage>,
        expires_at: Option<u64>,
    ) -> Self {
        let expiry = super::expiry_timer(expires_at);
        // The first poll reads whatever followed the hello.
        sub.wake_reader();
        DeviceInbound {
            waker: Waker::from(Arc::new(ReaderWake(Arc::downgrade(&sub)))),
            engine,
            rates,
            sub,
            user,
            messages: Some(messages),
            handling: None,
            expiry,
        }
    }

    /// Reads and handles what has arrived. Never finishes: what it decides to end goes into
    /// the device's queue as an `End`, which the body sends as the stream's trailers.
    /// Called by the body when the reader was woken.
    pub(super) fn poll(&mut self) {
        let waker = self.waker.clone();
        let cx = &mut Context::from_waker(&waker);
        if let Some(expiry) = &mut self.expiry
            && expiry.as_mut().poll(cx).is_ready()
        {
            self.expiry = None;
            tracing::info!(
                user_id = %self.user,
                connection_id = %self.engine.connection_id(&self.sub),
                "token expired; ending the device stream"
            );
            self.end(EndReason::Expired);
            return;
        }
        for _ in 0..BATCH {
            if let Some(call) = &mut self.handling {
                if call.as_mut().poll(cx).is_pending() {
                    return;
                }
                self.handling = None;
            }
            let Some(messages) = self.messages.as_mut() else {
                return;
            };
            let msg = match Pin::new(messages).poll_next(cx) {
                Poll::Pending => return,
                Poll::Ready(Some(Ok(msg))) => msg,
                // Half-closed, the device stays connected; broken, its stream's end follows.
                Poll::Ready(None) | Poll::Ready(Some(Err(_))) => {
                    self.messages = None;
                    return;
                }
            };
            match self.handle(msg) {
                Ok(Handled::Done) => {}
                Ok(Handled::Later(call)) => self.handling = Some(call),
                Err(reason) => {
                    tracing::info!(
                        user_id = %self.user,
                        connection_id = %self.engine.connection_id(&self.sub),
                        ?reason,
                        "ending a device stream on a bad message"
                    );
                    self.end(reason);
                    return;
                }
            }
        }
        // More may be waiting: come back after the others had their turn.
        cx.waker().wake_by_ref();
    }

    fn end(&mut self, reason: EndReason) {
        self.messages = None;
        self.handling = None;
        self.sub.end(reason);
    }

    fn handle(&self, msg: pb::ClientMessage) -> Result<Handled, EndReason> {
        match msg.kind {
            Some(ClientKind::Ping(p)) => {
                self.sub.pong(p.nonce);
                Ok(Handled::Done)
            }
            Some(ClientKind::UpdateStatus(u)) => {
                let status = convert::status_from_proto(u.status, "update_status.status")
                    .map_err(|e| EndReason::InvalidInput(e.0))?;
                self.rates
                    .status_change(self.user)
                    .map_err(|e| EndReason::LimitExceeded(e.to_string()))?;
                let (engine, sub, user) = (self.engine.clone(), self.sub.clone(), self.user);
                Ok(Handled::Later(Box::pin(async move {
                    if let Err(e) = engine.update_status(user, status).await {
                        // A store failure must not end the device: the status is kept in
                        // memory whenever the entry is there; report and carry on.
                        tracing::warn!(
                            user_id = %user,
                            connection_id = %engine.connection_id(&sub),
                            error = %e,
                            "update_status on a device stream failed"
                        );
                    }
                })))
            }
            Some(ClientKind::SetActivity(a)) => {
                let activity = convert::activity_from_proto(a.activity, "set_activity.activity")
                    .map_err(|e| EndReason::InvalidInput(e.0))?;
                // Over the limit the change is ignored (and counted), the stream goes on.
                if self.rates.activity_change(self.sub.id()).is_err() {
                    return Ok(Handled::Done);
                }
                let (engine, sub, user) = (self.engine.clone(), self.sub.clone(), self.user);
                Ok(Handled::Later(Box::pin(async move {
                    engine.set_activity(&sub, user, activity).await;
                })))
            }
            Some(ClientKind::Hello(_)) => Err(EndReason::InvalidInput(
                "hello was already received on this stream".into(),
            )),
            None => Err(EndReason::InvalidInput(
                "empty ClientMessage: set one of hello, update_status, ping, set_activity".into(),
            )),
        }
    }
}

//! Receivers' streams on the wire: the responses of `Presence/Authenticate` (a device) and
//! `Presence/WatchContacts` (a watch) written frame by frame from the receiver's queue, instead
//! of through tonic's generated encoder.
//!
//! Fan-out is the hot path: every change reaches every watcher's stream. Through tonic, each
//! delivery was projected, converted and encoded once per receiver and then polled through
//! half a dozen boxed body layers, twice per delivery (h2 wakes a stream again when it assigns
//! it send capacity). Here the queue holds [`Update`]s shared by every receiver that sees the
//! change alike, the first stream to send one encodes it (a framed `presence_updated`), the
//! others send the same bytes (`presence_updated` is field 2 of both `ServerMessage` and
//! `WatchContactsResponse`: one encoding serves both), and the stream's body is one layer over
//! the queue.
//!
//! Requests are read with tonic's decoder; everything the handlers decide is
//! [`PresenceService::open_device`] and [`PresenceService::open_watch`].
//! A call refused before its stream starts is answered as tonic answers it (trailers only).
use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use futures::future::{BoxFuture, Either};
use http_body::Frame;
use std::future::Future as _;
use tonic::body::Body;
use tonic::codec::{BufferSettings, Codec, Streaming};
use tonic::{Code, Status};
use tonic_prost::ProstCodec;

use crate::auth::Verifier;
use crate::domain::PresenceView;
use crate::engine::{Event, EventStream, Update};
use crate::pb::{self, server_message::Kind as ServerKind};

use super::ApiError;
use super::codec::{CompactCodec, frame};
use super::convert::presence_to_proto;
use super::inbound::DeviceInbound;
use super::presence::{PresenceService, resync_pages};

/// A device stream's initial read buffer, kept for the stream's life (hours): a hello, a ping
/// or a status is a few tens of bytes.
const DEVICE_READ_BUFFER: usize = 64;

/// The paths this module serves.
pub const AUTHENTICATE: &str = "/presence.v1.Presence/Authenticate";
pub const WATCH_CONTACTS: &str = "/presence.v1.Presence/WatchContacts";

/// A presence update, framed: a `ServerMessage` with `presence_updated`, which is also the
/// encoding of a `WatchContactsResponse` with `presence_updated`.
fn presence_frame(view: &PresenceView) -> Bytes {
    frame(&pb::ServerMessage {
        kind: Some(ServerKind::PresenceUpdated(presence_to_proto(view))),
    })
}

/// The framed bytes of a queued update, encoded by the first stream that sends it.
pub(super) fn update_frame(update: &Update) -> Bytes {
    update.wire(presence_frame)
}

/// Answers `Authenticate` and `WatchContacts` itself and passes every other call to the
/// server's router `S`.
///
/// A layer of the whole server rather than a route among tonic's: whatever a router answers is
/// boxed once more on its way out, and every delivery polls through each box (a cache miss per
/// box per poll, a stream being polled twice per delivery). Verifies the caller the way
/// [`super::IdentityLayer`] does for the routed services.
#[derive(Clone)]
pub struct DeviceLayer {
    service: PresenceService,
    verifier: Arc<Verifier>,
    max_message: usize,
}

impl DeviceLayer {
    pub fn new(service: PresenceService, verifier: Arc<Verifier>, max_message: usize) -> Self {
        DeviceLayer {
            service,
            verifier,
            max_message,
        }
    }
}

impl<S> tower::Layer<S> for DeviceLayer {
    type Service = DeviceRoutes<S>;

    fn layer(&self, inner: S) -> DeviceRoutes<S> {
        DeviceRoutes {
            inner,
            layer: self.clone(),
        }
    }
}

#[derive(Clone)]
pub struct DeviceRoutes<S> {
    inner: S,
    layer: DeviceLayer,
}

impl<S, B> tower::Service<http::Request<Body>> for DeviceRoutes<S>
where
    S: tower::Service<http::Request<Body>, Response = http::Response<B>>,
    S::Future: Send + 'static,
{
    type Response = http::Response<Routed<B>>;
    type Error = S::Error;
    type Future = Either<
        BoxFuture<'static, Result<http::Response<Routed<B>>, S::Error>>,
        futures::future::MapOk<S::Future, fn(http::Response<B>) -> http::Response<Routed<B>>>,
    >;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<Body>) -> Self::Future {
        use futures::TryFutureExt;
        let path = req.uri().path();
        if path != AUTHENTICATE && path != WATCH_CONTACTS {
            let other: fn(http::Response<B>) -> http::Response<Routed<B>> =
                |r| r.map(Routed::Other);
            return Either::Right(self.inner.call(req).map_ok(other));
        }
        let verified = super::verify(&self.layer.verifier, &mut req);
        let layer = self.layer.clone();
        Either::Left(Box::pin(async move {
            if let Err(status) = verified.and_then(|()| uncompressed(&req)) {
                return Ok(status.into_http());
            }
            let opened = if req.uri().path() == AUTHENTICATE {
                authenticate(&layer, req).await
            } else {
                watch(&layer, req).await
            };
            Ok(match opened {
                Ok(body) => {
                    let mut response = http::Response::new(Routed::Device(body));
                    response.headers_mut().insert(
                        http::header::CONTENT_TYPE,
                        http::HeaderValue::from_static("application/grpc"),
                    );
                    response
                }
                Err(status) => status.into_http(),
            })
        }))
    }
}

/// A response body of the server: a device stream's, or whatever the router answered.
///
/// Unboxed on purpose: tonic boxes the whole body once, and a device's is the one that lives for
/// hours and is polled on every delivery; a unary answer's box is larger for a moment.
#[allow(clippy::large_enum_variant)]
pub enum Routed<B> {
    Device(DeviceBody),
    Other(B),
}

impl<B> Default for Routed<B> {
    /// Empty: the body of a trailers-only answer.
    fn default() -> Self {
        Routed::Device(DeviceBody::finished())
    }
}

impl<B> http_body::Body for Routed<B>
where
    B: http_body::Body<Data = Bytes> + Unpin,
    B::Error: Into<Status>,
{
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        match self.get_mut() {
            Routed::Device(d) => Pin::new(d).poll_frame(cx),
            Routed::Other(b) => Pin::new(b).poll_frame(cx).map_err(Into::into),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Routed::Device(d) => d.is_end_stream(),
            Routed::Other(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> http_body::SizeHint {
        match self {
            Routed::Device(d) => d.size_hint(),
            Routed::Other(b) => b.size_hint(),
        }
    }
}

async fn authenticate(layer: &DeviceLayer, req: http::Request<Body>) -> Result<DeviceBody, Status> {
    let max_message = layer.max_message;
    let req = req.map(|body| {
        // A device sends a few tens of bytes at a time; the buffer grows for a longer message.
        let settings = BufferSettings::new(DEVICE_READ_BUFFER, DEVICE_READ_BUFFER);
        let decoder = ProstCodec::<pb::ServerMessage, pb::ClientMessage>::raw_decoder(settings);
        Streaming::new_request(decoder, body, None, Some(max_message))
    });
    let (first, events, inbound) = layer
        .service
        .open_device(tonic::Request::from_http(req))
        .await?;
    let mut body = DeviceBody::new(Kind::Device, first, events, None, max_message);
    body.inbound = Some(inbound);
    Ok(body)
}

/// WatchContacts takes one request message (read as tonic reads a unary request).
async fn watch(layer: &DeviceLayer, req: http::Request<Body>) -> Result<DeviceBody, Status> {
    let max_message = layer.max_message;
    let (parts, body) = req.into_parts();
    let decoder =
        CompactCodec::<pb::WatchContactsResponse, pb::WatchContactsRequest>::default().decoder();
    let mut request = Streaming::new_request(decoder, body, None, Some(max_message));
    let message = request
        .message()
        .await?
        .ok_or_else(|| Status::internal("Missing request message."))?;
    let req = tonic::Request::from_http(http::Request::from_parts(parts, message));
    let (first, events, expires_at) = layer.service.open_watch(req).await?;
    Ok(DeviceBody::new(
        Kind::Watch,
        first,
        events,
        expires_at,
        max_message,
    ))
}

/// This server accepts no compressed requests (tonic's answer, as its generated code gives it).
fn uncompressed<B>(req: &http::Request<B>) -> Result<(), Status> {
    match req.headers().get("grpc-encoding") {
        None => Ok(()),
        Some(v) if v == "identity" => Ok(()),
        Some(v) => {
            let mut status = Status::unimplemented(format!(
                "Content is compressed with `{}` which isn't supported",
                String::from_utf8_lossy(v.as_bytes())
            ));
            status.metadata_mut().insert(
                "grpc-accept-encoding",
                tonic::metadata::MetadataValue::from_static("identity"),
            );
            Err(status)
        }
    }
}

/// What a receiver's stream is: which events it carries.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// Authenticate: updates, pongs, resyncs.
    Device,
    /// WatchContacts: updates only; ends when the caller's token expires.
    Watch,
}

/// The response body of a receiver's stream: its first frames (welcome or snapshot), then
/// whatever its queue yields, then the trailers (`grpc-status` of how the stream ended).
/// Dropping it (the client went away or reset the stream) drops the queue's stream, which
/// unregisters the receiver.
pub struct DeviceBody {
    kind: Kind,
    /// Frames to send before the next event: the welcome or snapshot, or a resync's pages.
    ready: VecDeque<Bytes>,
    /// None only in an empty body (a trailers-only answer).
    events: Option<EventStream>,
    /// A watch ends UNAUTHENTICATED when its token expires (a device's reader ends a device).
    expiry: Option<Pin<Box<tokio::time::Sleep>>>,
    /// A device's reader of what it sends, polled on this stream's task.
    inbound: Option<DeviceInbound>,
    /// How the stream ends, once the data taken before its end is out.
    ending: Option<Status>,
    /// The queue had more events behind the last one taken.
    more: bool,
    max_message: usize,
    /// The trailers went out.
    done: bool,
}

impl DeviceBody {
    fn new(
        kind: Kind,
        first: Vec<Bytes>,
        events: EventStream,
        expires_at: Option<u64>,
        max_message: usize,
    ) -> DeviceBody {
        let expiry = super::expiry_timer(expires_at);
        DeviceBody {
            kind,
            ready: first.into(),
            events: Some(events),
            expiry,
            inbound: None,
            ending: None,
            more: false,
            max_message,
            done: false,
        }
    }

    /// A body with nothing to send.
    fn finished() -> DeviceBody {
        DeviceBody {
            kind: Kind::Device,
            ready: VecDeque::new(),
            events: None,
            expiry: None,
            inbound: None,
            ending: None,
            more: false,
            max_message: 0,
            done: true,
        }
    }

    fn trailers(&mut self, status: Status) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        self.done = true;
        let mut trailers = http::HeaderMap::new();
        if let Err(unsendable) = status.add_header(&mut trailers) {
            trailers.clear();
            let _ = Status::new(Code::Internal, unsendable.message()).add_header(&mut trailers);
        }
        Poll::Ready(Some(Ok(Frame::trailers(trailers))))
    }

    /// The next frame to send, if one is ready: the next of `ready`, else what the queue
    /// yields (its end is the trailers).
    fn next(&mut self, cx: &mut Context<'_>) -> Poll<Next> {
        loop {
            if let Some(bytes) = self.ready.pop_front() {
                if self.ready.is_empty() {
                    // The welcome is out: its list's room is not kept for the stream's life.
                    self.ready = VecDeque::new();
                }
                return Poll::Ready(self.checked(bytes));
            }
            let Some(events) = self.events.as_mut() else {
                return Poll::Ready(Next::End(None));
            };
            let mut reader = false;
            let polled = events.poll_event(cx, &mut reader);
            if reader && let Some(inbound) = &mut self.inbound {
                inbound.poll();
                if polled.is_pending() {
                    // What the reader did (a pong, an end) is queued now.
                    continue;
                }
            }
            let event = match polled {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(None) => return Poll::Ready(Next::End(Some(Status::ok("")))),
                Poll::Ready(Some((event, more))) => {
                    self.more = more;
                    event
                }
            };
            match event {
                Event::Presence(update) => return Poll::Ready(self.checked(update_frame(&update))),
                Event::End(reason) => {
                    return Poll::Ready(Next::End(Some(ApiError::from(*reason).into())));
                }
                // A watch carries updates only.
                _ if self.kind == Kind::Watch => {}
                Event::Pong(nonce) => {
                    let pong = pb::ServerMessage {
                        kind: Some(ServerKind::Pong(pb::Pong { nonce })),
                    };
                    return Poll::Ready(self.checked(frame(&pong)));
                }
                Event::Resync(views) => {
                    let pages = resync_pages(&views).into_iter().map(|r| {
                        frame(&pb::ServerMessage {
                            kind: Some(ServerKind::Resync(r)),
                        })
                    });
                    self.ready.extend(pages);
                }
                // A direct stream sends its welcome itself (the first frames).
                Event::Welcome(_) => {}
            }
        }
    }

    /// A frame within the message size limit, or the end it causes (tonic's error for it).
    fn checked(&self, bytes: Bytes) -> Next {
        if bytes.len() - 5 > self.max_message {
            return Next::End(Some(Status::out_of_range(format!(
                "Error, encoded message length too large: found {} bytes, the limit is: {} bytes",
                bytes.len() - 5,
                self.max_message
            ))));
        }
        Next::Frame(bytes)
    }
}

/// What a receiver's stream sends next.
enum Next {
    Frame(Bytes),
    /// The trailers with this status; None: nothing (an empty body).
    End(Option<Status>),
}

/// Frames that are ready together go out as one chunk up to this size (one HTTP/2 DATA frame,
/// one poll of the stream), as tonic's encoder batches them: a receiver that fell behind
/// catches up in few frames instead of one per update.
const BATCH_BYTES: usize = 32 * 1024;

impl http_body::Body for DeviceBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        if self.done {
            return Poll::Ready(None);
        }
        if let Some(status) = self.ending.take() {
            return self.trailers(status);
        }
        if let Some(expiry) = &mut self.expiry
            && expiry.as_mut().poll(cx).is_ready()
        {
            let expired = ApiError::Expired("the token of this stream expired".into());
            return self.trailers(expired.into());
        }
        let first = match self.next(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(Next::End(None)) => return Poll::Ready(None),
            Poll::Ready(Next::End(Some(status))) => return self.trailers(status),
            Poll::Ready(Next::Frame(bytes)) => bytes,
        };
        let mut batch: Option<BytesMut> = None;
        while (self.more || !self.ready.is_empty())
            && batch.as_ref().map_or(first.len(), |b| b.len()) < BATCH_BYTES
        {
            match self.next(cx) {
                Poll::Ready(Next::Frame(bytes)) => {
                    let b = batch.get_or_insert_with(|| {
                        let mut b = BytesMut::with_capacity(first.len() + bytes.len());
                        b.extend_from_slice(&first);
                        b
                    });
                    b.extend_from_slice(&bytes);
                }
                // The data already taken goes first; the end with the next poll.
                Poll::Ready(Next::End(status)) => {
                    self.ending = status;
                    break;
                }
                Poll::Pending => break,
            }
        }
        let data = batch.map_or(first, BytesMut::freeze);
        Poll::Ready(Some(Ok(Frame::data(data))))
    }

    fn is_end_stream(&self) -> bool {
        self.done
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{Status as Presence, UserId};
    use prost::Message;

    fn view() -> PresenceView {
        PresenceView {
            status: Presence::Busy,
            version: 7,
            last_seen: Some(1_700_000_000_123),
            ..PresenceView::unknown(UserId::parse(42).unwrap())
        }
    }

    #[test]
    fn a_presence_frame_is_the_grpc_framing_of_the_server_message() {
        let bytes = presence_frame(&view());
        assert_eq!(bytes[0], 0, "not compressed");
        let len = u32::from_be_bytes(bytes[1..5].try_into().unwrap()) as usize;
        assert_eq!(len, bytes.len() - 5, "the length prefix");
        let decoded = pb::ServerMessage::decode(&bytes[5..]).unwrap();
        assert_eq!(
            decoded.kind,
            Some(ServerKind::PresenceUpdated(presence_to_proto(&view())))
        );
    }

    #[test]
    fn an_update_is_encoded_once_and_its_bytes_shared() {
        let update = Update::new(view());
        let a = update_frame(&update);
        let b = update_frame(&update);
        assert_eq!(
            a.as_ptr(),
            b.as_ptr(),
            "the second send reuses the first encoding"
        );
    }
}

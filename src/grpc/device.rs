//! Device streams on the wire: the response of `Presence/Authenticate` written frame by frame
//! from the device's queue, instead of through tonic's generated encoder.
//!
//! Fan-out is the hot path: every change reaches every watcher's stream. Through tonic, each
//! delivery was projected, converted and encoded once per receiver and then polled through
//! half a dozen boxed body layers, twice per delivery (h2 wakes a stream again when it assigns
//! it send capacity). Here the queue holds [`Update`]s shared by every receiver that sees the
//! change alike, the first stream to send one encodes it (a framed `presence_updated`), the
//! others send the same bytes, and the stream's body is one layer over the queue.
//!
//! Requests are read with tonic's decoder and the identity the identity layer put on the
//! request; everything the handler decides is [`PresenceService::open_device`], as before.
//! A call refused before its stream starts is answered as tonic answers it (trailers only).
use std::collections::VecDeque;
use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{BufMut, Bytes, BytesMut};
use futures::Stream;
use futures::future::{BoxFuture, Either};
use http_body::Frame;
use prost::Message;
use tonic::body::Body;
use tonic::codec::{Codec, Streaming};
use tonic::server::NamedService;
use tonic::{Code, Status};

use crate::domain::PresenceView;
use crate::engine::{Event, EventStream, Update};
use crate::pb::{self, server_message::Kind as ServerKind};

use super::ApiError;
use super::codec::CompactCodec;
use super::convert::presence_to_proto;
use super::presence::{PresenceService, resync_pages};

/// The path this module serves.
pub const AUTHENTICATE: &str = "/presence.v1.Presence/Authenticate";

/// A message as gRPC frames it: no compression, the length, the protobuf bytes.
pub(super) fn frame(msg: &impl Message) -> Bytes {
    let len = msg.encoded_len();
    let mut buf = BytesMut::with_capacity(5 + len);
    buf.put_u8(0);
    buf.put_u32(len as u32);
    msg.encode_raw(&mut buf);
    buf.freeze()
}

/// A presence update, framed: a `ServerMessage` with `presence_updated`.
fn presence_frame(view: &PresenceView) -> Bytes {
    frame(&pb::ServerMessage {
        kind: Some(ServerKind::PresenceUpdated(presence_to_proto(view))),
    })
}

/// The framed bytes of a queued update, encoded by the first stream that sends it.
pub(super) fn update_frame(update: &Update) -> Bytes {
    update.wire(presence_frame)
}

/// The presence service, with `Authenticate` answered here and every other method by tonic's
/// generated server `S`.
#[derive(Clone)]
pub struct DeviceRoutes<S> {
    inner: S,
    service: PresenceService,
    max_message: usize,
}

impl<S> DeviceRoutes<S> {
    pub fn new(inner: S, service: PresenceService, max_message: usize) -> Self {
        DeviceRoutes {
            inner,
            service,
            max_message,
        }
    }
}

impl<S: NamedService> NamedService for DeviceRoutes<S> {
    const NAME: &'static str = S::NAME;
}

impl<S> tower::Service<http::Request<Body>> for DeviceRoutes<S>
where
    S: tower::Service<http::Request<Body>, Response = http::Response<Body>, Error = Infallible>,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = Either<BoxFuture<'static, Result<http::Response<Body>, Infallible>>, S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        if req.uri().path() != AUTHENTICATE {
            return Either::Right(self.inner.call(req));
        }
        let service = self.service.clone();
        let max_message = self.max_message;
        Either::Left(Box::pin(async move {
            Ok(authenticate(service, req, max_message).await)
        }))
    }
}

async fn authenticate(
    service: PresenceService,
    req: http::Request<Body>,
    max_message: usize,
) -> http::Response<Body> {
    if let Err(status) = uncompressed(&req) {
        return status.into_http();
    }
    let req = req.map(|body| {
        let decoder = CompactCodec::<pb::ServerMessage, pb::ClientMessage>::default().decoder();
        Streaming::new_request(decoder, body, None, Some(max_message))
    });
    match service.open_device(tonic::Request::from_http(req)).await {
        Ok((first, events)) => {
            let body = DeviceBody {
                ready: first.into(),
                events,
                max_message,
                done: false,
            };
            let mut response = http::Response::new(Body::new(body));
            response.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("application/grpc"),
            );
            response
        }
        Err(status) => status.into_http(),
    }
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

/// The response body of a device stream: its welcome pages, then whatever its queue yields,
/// then the trailers (`grpc-status` of how the stream ended). Dropping it (the client went away
/// or reset the stream) drops the queue's stream, which unregisters the device.
struct DeviceBody {
    /// Frames to send before the next event: the welcome, or the pages of a resync.
    ready: VecDeque<Bytes>,
    events: EventStream,
    max_message: usize,
    /// The trailers went out.
    done: bool,
}

impl DeviceBody {
    fn trailers(&mut self, status: Status) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        self.done = true;
        let mut trailers = http::HeaderMap::new();
        if let Err(unsendable) = status.add_header(&mut trailers) {
            trailers.clear();
            let _ = Status::new(Code::Internal, unsendable.message()).add_header(&mut trailers);
        }
        Poll::Ready(Some(Ok(Frame::trailers(trailers))))
    }

    fn data(&mut self, bytes: Bytes) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        if bytes.len() - 5 > self.max_message {
            let status = Status::out_of_range(format!(
                "Error, encoded message length too large: found {} bytes, the limit is: {} bytes",
                bytes.len() - 5,
                self.max_message
            ));
            return self.trailers(status);
        }
        Poll::Ready(Some(Ok(Frame::data(bytes))))
    }
}

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
        loop {
            if let Some(bytes) = self.ready.pop_front() {
                return self.data(bytes);
            }
            let event = match Pin::new(&mut self.events).poll_next(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(None) => return self.trailers(Status::ok("")),
                Poll::Ready(Some(event)) => event,
            };
            match event {
                Event::Presence(update) => return self.data(update_frame(&update)),
                Event::Pong(nonce) => {
                    let pong = pb::ServerMessage {
                        kind: Some(ServerKind::Pong(pb::Pong { nonce })),
                    };
                    return self.data(frame(&pong));
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
                Event::End(reason) => return self.trailers(ApiError::from(reason).into()),
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{Status as Presence, UserId};

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

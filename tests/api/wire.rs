//! Authenticate on the wire, as a raw HTTP/2 client sees it: the device stream's response is
//! written by the server's own body (src/grpc/device.rs), not by tonic's encoder, so its
//! framing, headers and trailers are checked here byte for byte.
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use presence::pb::{self, client_message::Kind as ClientKind, server_message::Kind as ServerKind};
use prost::Message;

use crate::helpers::*;

const WAIT: Duration = Duration::from_secs(10);

fn frame(msg: &impl Message, compressed: bool) -> Bytes {
    let body = msg.encode_to_vec();
    let mut buf = BytesMut::with_capacity(5 + body.len());
    buf.put_u8(compressed as u8);
    buf.put_u32(body.len() as u32);
    buf.put_slice(&body);
    buf.freeze()
}

fn hello() -> pb::ClientMessage {
    pb::ClientMessage {
        kind: Some(ClientKind::Hello(pb::Hello {
            device: "raw".into(),
            ..Default::default()
        })),
    }
}

/// Opens a raw Authenticate stream of `user` with `extra` headers: the pending response (its
/// headers come once the server has read the hello, or at once for a refusal) and the sender of
/// the request body.
async fn open(
    app: &TestApp,
    user: u64,
    extra: &[(&str, &str)],
) -> (h2::client::ResponseFuture, h2::SendStream<Bytes>) {
    let tcp = tokio::net::TcpStream::connect(app.addr)
        .await
        .expect("the server accepts");
    let (client, connection) = h2::client::handshake(tcp).await.expect("a handshake");
    tokio::spawn(async move {
        let _ = connection.await;
    });
    let mut client = client.ready().await.expect("the connection is ready");
    let mut request = http::Request::builder()
        .method("POST")
        .uri(format!(
            "http://{}/presence.v1.Presence/Authenticate",
            app.addr
        ))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .header("x-presence-user-id", user.to_string());
    for (k, v) in extra {
        request = request.header(*k, *v);
    }
    client
        .send_request(request.body(()).expect("a valid request"), false)
        .expect("the stream opens")
}

async fn response(pending: h2::client::ResponseFuture) -> http::Response<h2::RecvStream> {
    tokio::time::timeout(WAIT, pending)
        .await
        .expect("an answer in time")
        .expect("a response")
}

/// Reads gRPC messages off a response body until `n` are in or the body ends; returns them
/// and whether the body ended.
async fn messages(body: &mut h2::RecvStream, n: usize) -> (Vec<pb::ServerMessage>, bool) {
    let mut buf = BytesMut::new();
    let mut out = Vec::new();
    loop {
        while buf.len() >= 5 {
            assert_eq!(buf[0], 0, "the server never compresses");
            let len = u32::from_be_bytes(buf[1..5].try_into().unwrap()) as usize;
            if buf.len() < 5 + len {
                break;
            }
            buf.advance(5);
            let msg = buf.split_to(len);
            out.push(pb::ServerMessage::decode(&msg[..]).expect("a ServerMessage"));
        }
        if out.len() >= n {
            return (out, false);
        }
        match tokio::time::timeout(WAIT, body.data())
            .await
            .expect("data in time")
        {
            Some(Ok(chunk)) => {
                let _ = body.flow_control().release_capacity(chunk.len());
                buf.put_slice(&chunk);
            }
            Some(Err(e)) => panic!("the body failed: {e}"),
            None => return (out, true),
        }
    }
}

async fn trailers(body: &mut h2::RecvStream) -> http::HeaderMap {
    tokio::time::timeout(WAIT, body.trailers())
        .await
        .expect("trailers in time")
        .expect("trailers, not an error")
        .expect("the stream ends with trailers")
}

#[tokio::test]
async fn a_raw_client_gets_framed_messages_a_pong_and_grpc_status_trailers() {
    let app = spawn_app(|_| {}).await;
    let (pending, mut send) = open(&app, 7, &[]).await;
    send.send_data(frame(&hello(), false), false).unwrap();
    let response = response(pending).await;
    assert_eq!(response.status(), 200);
    assert_eq!(
        response.headers().get("content-type").unwrap(),
        "application/grpc"
    );
    assert!(
        response.headers().get("grpc-status").is_none(),
        "a stream that starts has no status in its headers"
    );
    let mut body = response.into_body();
    let (first, _) = messages(&mut body, 1).await;
    let Some(ServerKind::Welcome(w)) = &first[0].kind else {
        panic!("a welcome first, got {:?}", first[0]);
    };
    assert!(w.last_page);
    assert_eq!(w.self_.as_ref().unwrap().user_id, 7);

    // A ping is answered in order.
    let ping = pb::ClientMessage {
        kind: Some(ClientKind::Ping(pb::Ping { nonce: 99 })),
    };
    send.send_data(frame(&ping, false), false).unwrap();
    let (pong, _) = messages(&mut body, 1).await;
    assert_eq!(pong[0].kind, Some(ServerKind::Pong(pb::Pong { nonce: 99 })));

    // An invalid message ends the stream with INVALID_ARGUMENT in the trailers.
    let empty = pb::ClientMessage { kind: None };
    send.send_data(frame(&empty, false), false).unwrap();
    let (rest, ended) = messages(&mut body, 1).await;
    assert!(
        rest.is_empty() && ended,
        "nothing more, then the end: {rest:?}"
    );
    let t = trailers(&mut body).await;
    assert_eq!(
        t.get("grpc-status").unwrap(),
        "3",
        "INVALID_ARGUMENT: {t:?}"
    );
    assert!(
        t.get("grpc-message")
            .unwrap()
            .to_str()
            .unwrap()
            .contains("empty%20ClientMessage"),
        "the message names the problem: {t:?}"
    );
}

#[tokio::test]
async fn a_compressed_request_is_refused_with_unimplemented_and_changes_nothing() {
    let app = spawn_app(|_| {}).await;
    let (pending, _send) = open(&app, 8, &[("grpc-encoding", "gzip")]).await;
    let response = response(pending).await;
    assert_eq!(
        response.headers().get("grpc-status").unwrap(),
        "12",
        "UNIMPLEMENTED, trailers only: {:?}",
        response.headers()
    );
    assert_eq!(
        response.headers().get("grpc-accept-encoding").unwrap(),
        "identity"
    );
    assert!(
        response
            .headers()
            .get("grpc-message")
            .unwrap()
            .to_str()
            .unwrap()
            .contains("gzip"),
        "names the encoding"
    );
    let stats = app.stats().await;
    assert_eq!(stats.connections, 0, "no device was connected");
}

#[tokio::test]
async fn a_message_with_the_compressed_flag_is_refused_and_connects_nothing() {
    let app = spawn_app(|_| {}).await;
    let (pending, mut send) = open(&app, 9, &[]).await;
    send.send_data(frame(&hello(), true), false).unwrap();
    let response = response(pending).await;
    let status = response
        .headers()
        .get("grpc-status")
        .map(|v| v.to_str().unwrap().to_string());
    let status = match status {
        Some(s) => s,
        None => trailers(&mut response.into_body())
            .await
            .get("grpc-status")
            .unwrap()
            .to_str()
            .unwrap()
            .to_string(),
    };
    assert_ne!(status, "0", "a compressed hello is not accepted");
    let stats = app.stats().await;
    assert_eq!(stats.connections, 0, "no device was connected");
}

#[tokio::test]
async fn a_raw_watch_gets_its_snapshot_then_updates_framed_as_watch_responses() {
    let app = spawn_app(|_| {}).await;
    let tcp = tokio::net::TcpStream::connect(app.addr).await.unwrap();
    let (client, connection) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(async move {
        let _ = connection.await;
    });
    let mut client = client.ready().await.unwrap();
    let request = http::Request::builder()
        .method("POST")
        .uri(format!(
            "http://{}/presence.v1.Presence/WatchContacts",
            app.addr
        ))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .header("x-presence-service", "raw-watcher")
        .body(())
        .unwrap();
    let (pending, mut send) = client.send_request(request, false).unwrap();
    let ask = pb::WatchContactsRequest {
        user_ids: vec![31, 32],
    };
    send.send_data(frame(&ask, false), true).unwrap();
    let mut body = response(pending).await.into_body();
    let read = |bytes: &[u8]| pb::WatchContactsResponse::decode(bytes).unwrap();
    let mut raw = BytesMut::new();
    let mut next = async || loop {
        if raw.len() >= 5 {
            let len = u32::from_be_bytes(raw[1..5].try_into().unwrap()) as usize;
            if raw.len() >= 5 + len {
                raw.advance(5);
                return raw.split_to(len).freeze();
            }
        }
        let chunk = tokio::time::timeout(WAIT, body.data())
            .await
            .expect("data in time")
            .expect("the watch goes on")
            .unwrap();
        let _ = body.flow_control().release_capacity(chunk.len());
        raw.put_slice(&chunk);
    };
    let snapshot = read(&next().await);
    let Some(pb::watch_contacts_response::Kind::Snapshot(s)) = snapshot.kind else {
        panic!("a snapshot first: {snapshot:?}");
    };
    assert!(s.last_page);
    assert_eq!(
        s.users.iter().map(|u| u.user_id).collect::<Vec<_>>(),
        vec![31, 32]
    );

    // A device of user 31 connects: the watch gets it as a WatchContactsResponse.
    let _device = app.device(&user(31)).await;
    let update = read(&next().await);
    let Some(pb::watch_contacts_response::Kind::PresenceUpdated(p)) = update.kind else {
        panic!("an update: {update:?}");
    };
    assert_eq!((p.user_id, p.status), (31, pb::Status::Online as i32));
    assert_eq!(p.connected, Some(true), "a service sees `connected`");
}

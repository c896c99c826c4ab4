//! Hostile clients against a real server process (issue 12): while each abuse runs, the
//! server's resident memory (read from /proc) stays under a bound set by the configuration,
//! and other users are not hurt. Each case reproduces a finding that grew the server without
//! limit or starved others.
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};
use futures::StreamExt;
use presence::pb;
use prost::Message;

use crate::harness::*;

const MIB: u64 = 1024 * 1024;

/// A gRPC length-prefixed frame of one message.
fn frame(msg: &impl Message) -> Bytes {
    let body = msg.encode_to_vec();
    let mut buf = BytesMut::with_capacity(5 + body.len());
    buf.put_u8(0);
    buf.put_u32(body.len() as u32);
    buf.put_slice(&body);
    buf.freeze()
}

fn random_text(len: usize) -> String {
    use rand::Rng;
    let mut rng = rand::rng();
    (0..len)
        .map(|_| char::from(b'a' + rng.random_range(0..26u8)))
        .collect()
}

/// The body of `GET /metrics` on `addr`.
async fn metrics_body(addr: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut conn = tokio::net::TcpStream::connect(addr)
        .await
        .expect("the metrics listener accepts");
    conn.write_all(
        format!("GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .expect("the request is sent");
    let mut body = String::new();
    conn.read_to_string(&mut body)
        .await
        .expect("the answer is read");
    body
}

/// Finding 1: thousands of calls, without any credential, to random 4,000-character paths.
#[tokio::test]
async fn calls_to_unknown_paths_grow_neither_the_metrics_nor_the_memory() {
    let _turn = exclusive().await;
    let (_dir, url) = sqlite_dir();
    let metrics = format!("127.0.0.1:{}", free_port());
    let server = ServerProcess::serve(&url, &[("PRESENCE_METRICS_LISTEN", &metrics)]).await;
    let channel = connect(server.addr()).await;
    let call = |path: String| {
        let channel = channel.clone();
        async move {
            let mut grpc = tonic::client::Grpc::new(channel);
            grpc.ready().await.expect("the connection is ready");
            let path = http::uri::PathAndQuery::from_maybe_shared(path).expect("a valid path");
            grpc.unary::<_, pb::GetStatsResponse, _>(
                tonic::Request::new(pb::GetStatsRequest {}),
                path,
                tonic_prost::ProstCodec::default(),
            )
            .await
            .err()
        }
    };
    // Warm up (allocator, first metrics), then measure from there.
    for _ in 0..50 {
        call(format!("/x.Y/{}", random_text(100))).await;
    }
    let before = server.rss();
    let paths: Vec<String> = (0..3000)
        .map(|_| format!("/{}.S/{}", random_text(2000), random_text(2000)))
        .collect();
    let refused: Vec<_> = futures::stream::iter(paths.clone())
        .map(call)
        .buffer_unordered(50)
        .collect()
        .await;
    assert!(
        refused.iter().all(Option::is_some),
        "every call to an unknown path is refused"
    );
    let grown = server.rss().saturating_sub(before);
    let body = metrics_body(&metrics).await;
    eprintln!(
        "hostile: 3,000 calls to random 4,000-character paths: RSS +{} KiB, /metrics {} bytes",
        grown / 1024,
        body.len()
    );
    assert!(
        body.contains(r#"method="unknown""#),
        "they are counted as unknown"
    );
    assert!(
        !paths.iter().take(100).any(|p| body.contains(&p[1..40])),
        "no path a client sent becomes a label"
    );
    assert!(
        body.len() < 256 * 1024,
        "/metrics stays small: {} bytes",
        body.len()
    );
    assert!(
        grown < 24 * MIB,
        "memory stays bounded: +{} MiB",
        grown / MIB
    );
}

/// Finding 2: a client says hello, then sets its receive window to 0 (it never reads) and
/// floods pings: at most one pong waits, and the server stops reading a stream that does not
/// read its answers, so memory stays flat.
#[tokio::test]
async fn a_ping_flood_on_a_stream_that_is_never_read_keeps_memory_flat() {
    let _turn = exclusive().await;
    let (_dir, url) = sqlite_dir();
    let server = ServerProcess::serve(&url, &[]).await;
    let tcp = tokio::net::TcpStream::connect(server.addr())
        .await
        .expect("the server accepts");
    let (client, connection) = h2::client::Builder::new()
        .initial_window_size(0)
        .handshake::<_, Bytes>(tcp)
        .await
        .expect("an HTTP/2 handshake");
    tokio::spawn(connection);
    let mut client = client.ready().await.expect("the connection is ready");
    let request = http::Request::builder()
        .method("POST")
        .uri(format!(
            "http://{}/presence.v1.Presence/Authenticate",
            server.addr()
        ))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .header("x-presence-user-id", "1")
        .body(())
        .expect("a valid request");
    let (_response, mut send) = client
        .send_request(request, false)
        .expect("the stream opens");
    send.send_data(
        frame(&pb::ClientMessage {
            kind: Some(pb::client_message::Kind::Hello(pb::Hello {
                device: "flooder".into(),
                ..Default::default()
            })),
        }),
        false,
    )
    .expect("hello is sent");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = server.rss();
    let ping = frame(&pb::ClientMessage {
        kind: Some(pb::client_message::Kind::Ping(pb::Ping { nonce: 7 })),
    });
    let started = Instant::now();
    let mut sent = 0u64;
    // Whether the server stopped taking pings: it reads a stream's messages on the stream's
    // own task, which waits for the client to read what it was sent (HTTP/2 flow control).
    let mut held_back = false;
    while started.elapsed() < Duration::from_secs(6) {
        let mut batch = BytesMut::new();
        for _ in 0..1000 {
            batch.put_slice(&ping);
        }
        let len = batch.len();
        send.reserve_capacity(len);
        // Sent as fast as the server takes them (its receive window), never faster.
        let waited = tokio::time::timeout(Duration::from_millis(500), async {
            while send.capacity() < len {
                match std::future::poll_fn(|cx| send.poll_capacity(cx)).await {
                    Some(Ok(_)) => {}
                    other => panic!("the stream was closed under the flood: {other:?}"),
                }
            }
        })
        .await;
        if waited.is_err() {
            held_back = true;
            continue;
        }
        send.send_data(batch.freeze(), false)
            .expect("pings are sent");
        sent += 1000;
    }
    let grown = server.rss().saturating_sub(before);
    eprintln!(
        "hostile: {sent} pings in 6 s on a stream whose window is 0 (server held the flood back: \
         {held_back}): RSS +{} KiB",
        grown / 1024
    );
    assert!(sent > 0, "the flood started");
    assert!(
        held_back || sent >= 100_000,
        "either the server stopped reading the flood, or it took it all: {sent} pings"
    );
    assert!(grown < 32 * MIB, "memory stays flat: +{} MiB", grown / MIB);
}

/// Finding 4: watches over ids nobody has seen cost a bounded, small amount per id.
#[tokio::test]
async fn watches_over_never_seen_ids_cost_little_per_id() {
    let _turn = exclusive().await;
    let (_dir, url) = sqlite_dir();
    let server = ServerProcess::serve(&url, &[("PRESENCE_RATE_IDS_PER_MIN", "100000000")]).await;
    let channels: Vec<_> = futures::future::join_all((0..10).map(|_| connect(server.addr()))).await;
    // Warm up with one watch, then measure 20 users × 10 watches × 1,000 ids.
    let _warm = Watcher::open_on(
        channels[0].clone(),
        &user(1),
        &(1_000_000..1_001_000).collect::<Vec<_>>(),
    )
    .await
    .expect("a watch opens");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = server.rss();
    let mut watches = Vec::new();
    let mut ids = 2_000_000u64;
    for u in 2..22u64 {
        for w in 0..10 {
            let list: Vec<u64> = (ids..ids + 1000).collect();
            ids += 1000;
            watches.push(
                Watcher::open_on(
                    channels[(u as usize + w) % channels.len()].clone(),
                    &user(u),
                    &list,
                )
                .await
                .expect("a watch opens"),
            );
        }
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let grown = server.rss().saturating_sub(before);
    let per_id = grown / 200_000;
    eprintln!(
        "hostile: 200 watches over 200,000 never-seen ids: RSS +{} KiB, {per_id} bytes per id",
        grown / 1024
    );
    // About 215-270 bytes here (RSS is noisy); the bound catches a per-id cost doubling.
    assert!(per_id < 400, "{per_id} bytes per watched never-seen id");
    let eleventh = Watcher::open_on(channels[0].clone(), &user(2), &[5]).await;
    assert_refused(
        eleventh.map(|w| w.snapshot.len()),
        tonic::Code::ResourceExhausted,
        &["PRESENCE_MAX_WATCHES"],
        "an 11th watch of one user: a user's cost is bounded",
    );
}

/// Finding 4: one user flooding stream set-ups does not take the set-up slots others need.
#[tokio::test]
async fn one_user_flooding_set_ups_does_not_starve_others() {
    let _turn = exclusive().await;
    let (_dir, url) = sqlite_dir();
    let server = ServerProcess::serve(&url, &[]).await;
    let channels: Vec<_> = futures::future::join_all((0..20).map(|_| connect(server.addr()))).await;
    let flood = {
        let channels = channels.clone();
        tokio::spawn(async move {
            futures::stream::iter(0..2000usize)
                .map(|i| {
                    let channel = channels[i % channels.len()].clone();
                    async move {
                        Device::open(channel, &user(1), "flood", WAIT * 4)
                            .await
                            .is_ok()
                    }
                })
                .buffer_unordered(2000)
                .collect::<Vec<bool>>()
                .await
        })
    };
    let others: Vec<_> = futures::future::join_all((100..130u64).map(|u| {
        let channel = channels[u as usize % channels.len()].clone();
        async move {
            Device::open(channel, &user(u), "phone", WAIT * 4)
                .await
                .map(|_| ())
        }
    }))
    .await;
    let flooded = flood.await.expect("the flood runs");
    let failed: Vec<_> = others.iter().filter(|r| r.is_err()).collect();
    eprintln!(
        "hostile: one user opened {} of 2,000 streams at once; {} of 30 other users failed to connect",
        flooded.iter().filter(|ok| **ok).count(),
        failed.len()
    );
    assert!(failed.is_empty(), "every other user connects: {failed:?}");
}

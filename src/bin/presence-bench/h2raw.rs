//! Device connections spoken by hand: HTTP/2 frames and gRPC messages for the bench's steady
//! devices, read by one task per connection that checks each message right there.
//!
//! The bench shares the machine with the server it loads. Through tonic and h2 every delivery
//! cost it about as much CPU as it cost the server (a stream lookup in h2's map, a task woken
//! per device, three body layers, the decoder), so on two cores the server only ever had half
//! the machine. A device of the bench needs little of HTTP/2: open a stream, send small
//! messages, read DATA frames and the trailers. This module does that and no more, correctly:
//! flow control both ways, SETTINGS and PING acknowledged, HPACK through the `hpack` crate
//! (whose decoder keeps the dynamic table in step with the server's encoder), CONTINUATION and
//! padding understood, GOAWAY and RST_STREAM ending what they end.
//!
//! Devices that flap (commanded devices) keep using tonic: a reconnect is rare.
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use anyhow::{Context, anyhow};
use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};

use presence::grpc::codec::frame;
use presence::pb;

use crate::device::Device;
use crate::wire::{Incoming, parse_server_message};

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

// Frame types and flags (RFC 9113, section 6).
const DATA: u8 = 0x0;
const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const SETTINGS: u8 = 0x4;
const PING: u8 = 0x6;
const GOAWAY: u8 = 0x7;
const WINDOW_UPDATE: u8 = 0x8;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const ACK: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;

const SETTINGS_ENABLE_PUSH: u16 = 0x2;
const SETTINGS_INITIAL_WINDOW_SIZE: u16 = 0x4;
const SETTINGS_MAX_FRAME_SIZE: u16 = 0x5;

/// The largest window HTTP/2 allows: streams never run out of credit in a run; the connection
/// is given credit back in large steps.
const MAX_WINDOW: u32 = (1 << 31) - 1;
/// Connection credit is returned once this much was received.
const CREDIT_STEP: u32 = 1 << 30;
/// The largest frame the server may send us, and we it (the protocol's default).
const MAX_FRAME: usize = 16_384;

/// Why an open failed: the server's gRPC status (UNAVAILABLE is retried) or the connection.
pub type OpenResult = Result<Opened, tonic::Status>;

/// What an open gives its caller; the device itself now lives in its connection's task.
pub struct Opened {
    pub welcome_self: Option<pb::UserPresence>,
    pub took_from: Instant,
    pub requests: RawRequests,
}

/// Sends a device's messages on its stream.
#[derive(Clone)]
pub struct RawRequests {
    conn: mpsc::UnboundedSender<Op>,
    stream: u32,
}

impl RawRequests {
    pub fn send(&self, msg: &pb::ClientMessage) -> bool {
        self.conn
            .send(Op::Send {
                stream: self.stream,
                data: frame(msg),
            })
            .is_ok()
    }
}

/// Builds the device once its welcome is complete (every page of it).
pub type MakeDevice = Box<dyn FnOnce(&pb::Welcome) -> Device + Send>;

enum Op {
    Open {
        headers: Vec<(Vec<u8>, Vec<u8>)>,
        hello: Bytes,
        make: MakeDevice,
        started: Instant,
        reply: oneshot::Sender<OpenResult>,
    },
    Send {
        stream: u32,
        data: Bytes,
    },
}

/// HTTP/2 connections to the server for raw devices; user `u` rides connection `(u - 1) % len`.
#[derive(Clone)]
pub struct RawPool {
    conns: Vec<mpsc::UnboundedSender<Op>>,
    authority: Arc<Vec<u8>>,
    /// Devices living in the connections' tasks.
    live: Arc<AtomicUsize>,
}

impl RawPool {
    pub async fn connect(addrs: &[SocketAddr], n: usize) -> anyhow::Result<RawPool> {
        let mut conns = Vec::with_capacity(n);
        let live = Arc::new(AtomicUsize::new(0));
        for i in 0..n.max(1) {
            let addr = addrs[i % addrs.len()];
            let tcp = TcpStream::connect(addr)
                .await
                .with_context(|| format!("connecting raw HTTP/2 connection {} to {addr}", i + 1))?;
            tcp.set_nodelay(true)?;
            let (tx, rx) = mpsc::unbounded_channel();
            tokio::spawn(Connection::new(tcp, tx.clone(), live.clone()).run(rx));
            conns.push(tx);
        }
        Ok(RawPool {
            conns,
            authority: Arc::new(addrs[0].to_string().into_bytes()),
            live,
        })
    }

    /// How many devices are still live (not yet closed or ended).
    pub fn live(&self) -> usize {
        self.live.load(Ordering::Acquire)
    }

    /// Opens an Authenticate stream for `user` with `metadata` (already lowercase names), sends
    /// `hello`, and resolves once the welcome is in; from then on `make`'s device reads it.
    pub async fn open(
        &self,
        user: u64,
        metadata: Vec<(Vec<u8>, Vec<u8>)>,
        hello: &pb::ClientMessage,
        make: MakeDevice,
        started: Instant,
    ) -> OpenResult {
        let conn = &self.conns[(user.saturating_sub(1) % self.conns.len() as u64) as usize];
        let mut headers: Vec<(Vec<u8>, Vec<u8>)> = vec![
            (b":method".to_vec(), b"POST".to_vec()),
            (b":scheme".to_vec(), b"http".to_vec()),
            (
                b":path".to_vec(),
                b"/presence.v1.Presence/Authenticate".to_vec(),
            ),
            (b":authority".to_vec(), self.authority.to_vec()),
            (b"content-type".to_vec(), b"application/grpc".to_vec()),
            (b"te".to_vec(), b"trailers".to_vec()),
        ];
        headers.extend(metadata);
        let (reply, answer) = oneshot::channel();
        conn.send(Op::Open {
            headers,
            hello: frame(hello),
            make,
            started,
            reply,
        })
        .map_err(|_| tonic::Status::unavailable("the raw connection is closed"))?;
        answer
            .await
            .unwrap_or_else(|_| Err(tonic::Status::unavailable("the raw connection closed")))
    }
}

fn put_frame_header(out: &mut BytesMut, len: usize, kind: u8, flags: u8, stream: u32) {
    out.put_uint(len as u64, 3);
    out.put_u8(kind);
    out.put_u8(flags);
    out.put_u32(stream & MAX_WINDOW);
}

/// One stream's state.
enum Slot {
    /// Waiting for its welcome's pages.
    Opening {
        make: MakeDevice,
        started: Instant,
        reply: oneshot::Sender<OpenResult>,
        welcome: Option<Box<pb::Welcome>>,
        buf: BytesMut,
    },
    Live {
        device: Box<Device>,
        buf: BytesMut,
    },
}

struct Connection {
    tcp: TcpStream,
    me: mpsc::UnboundedSender<Op>,
    live: Arc<AtomicUsize>,
    out: BytesMut,
    encoder: hpack::Encoder<'static>,
    decoder: hpack::Decoder<'static>,
    streams: HashMap<u32, Slot>,
    next_stream: u32,
    /// Credit the server gave us: the connection's and the initial one of each stream.
    send_window: i64,
    stream_initial: i64,
    stream_windows: HashMap<u32, i64>,
    /// Data waiting for credit, in order.
    blocked: std::collections::VecDeque<(u32, Bytes)>,
    /// Received DATA not yet given back to the connection's window.
    received: u32,
    /// A header block in CONTINUATION frames: its stream, end-of-stream flag and bytes so far.
    partial: Option<(u32, bool, BytesMut)>,
    /// Set when the server said GOAWAY or the connection broke.
    gone: Option<String>,
}

impl Connection {
    fn new(tcp: TcpStream, me: mpsc::UnboundedSender<Op>, live: Arc<AtomicUsize>) -> Connection {
        Connection {
            tcp,
            me,
            live,
            out: BytesMut::with_capacity(64 * 1024),
            encoder: hpack::Encoder::new(),
            decoder: hpack::Decoder::new(),
            streams: HashMap::new(),
            next_stream: 1,
            send_window: 65_535,
            stream_initial: 65_535,
            stream_windows: HashMap::new(),
            blocked: Default::default(),
            received: 0,
            partial: None,
            gone: None,
        }
    }

    async fn run(mut self, mut ops: mpsc::UnboundedReceiver<Op>) {
        self.out.put_slice(PREFACE);
        let settings = [
            (SETTINGS_ENABLE_PUSH, 0),
            (SETTINGS_INITIAL_WINDOW_SIZE, MAX_WINDOW),
            (SETTINGS_MAX_FRAME_SIZE, MAX_FRAME as u32),
        ];
        put_frame_header(&mut self.out, settings.len() * 6, SETTINGS, 0, 0);
        for (id, value) in settings {
            self.out.put_u16(id);
            self.out.put_u32(value);
        }
        put_frame_header(&mut self.out, 4, WINDOW_UPDATE, 0, 0);
        self.out.put_u32(MAX_WINDOW - 65_535);
        let mut input = BytesMut::with_capacity(256 * 1024);
        let mut ops_open = true;
        loop {
            if !self.out.is_empty() {
                let out = self.out.split();
                if let Err(e) = self.tcp.write_all(&out).await {
                    self.fail(format!("writing to the server: {e}"));
                    return;
                }
            }
            if self.gone.is_some() || (!ops_open && self.streams.is_empty()) {
                return;
            }
            tokio::select! {
                biased;
                read = self.tcp.read_buf(&mut input) => match read {
                    Ok(0) => {
                        self.fail("the server closed the connection".into());
                        return;
                    }
                    Ok(_) => {
                        if let Err(e) = self.on_input(&mut input) {
                            self.fail(format!("{e:#}"));
                            return;
                        }
                    }
                    Err(e) => {
                        self.fail(format!("reading from the server: {e}"));
                        return;
                    }
                },
                op = ops.recv(), if ops_open => match op {
                    Some(op) => {
                        self.on_op(op);
                        while let Ok(op) = ops.try_recv() {
                            self.on_op(op);
                        }
                    }
                    // The pool is gone; the live devices end on their closing pongs.
                    None => ops_open = false,
                },
            }
        }
    }

    /// Ends every stream with `why`.
    fn fail(&mut self, why: String) {
        for (_, slot) in self.streams.drain() {
            match slot {
                Slot::Opening { reply, .. } => {
                    let _ = reply.send(Err(tonic::Status::unavailable(why.clone())));
                }
                Slot::Live { device, .. } => {
                    device.failed(format_args!("{why}"));
                    device.finish();
                    self.live.fetch_sub(1, Ordering::AcqRel);
                }
            }
        }
        self.gone = Some(why);
    }

    fn on_op(&mut self, op: Op) {
        match op {
            Op::Open {
                headers,
                hello,
                make,
                started,
                reply,
            } => {
                if let Some(why) = &self.gone {
                    let _ = reply.send(Err(tonic::Status::unavailable(why.clone())));
                    return;
                }
                let stream = self.next_stream;
                self.next_stream += 2;
                let block = self
                    .encoder
                    .encode(headers.iter().map(|(k, v)| (&k[..], &v[..])));
                // One HEADERS frame, CONTINUATION for the rest of a long block.
                let mut rest = &block[..];
                let mut first = true;
                loop {
                    let n = rest.len().min(MAX_FRAME);
                    let last = n == rest.len();
                    let kind = if first { HEADERS } else { CONTINUATION };
                    let flags = if last { END_HEADERS } else { 0 };
                    put_frame_header(&mut self.out, n, kind, flags, stream);
                    self.out.put_slice(&rest[..n]);
                    rest = &rest[n..];
                    first = false;
                    if last {
                        break;
                    }
                }
                self.stream_windows.insert(stream, self.stream_initial);
                self.streams.insert(
                    stream,
                    Slot::Opening {
                        make,
                        started,
                        reply,
                        welcome: None,
                        buf: BytesMut::new(),
                    },
                );
                self.send_data(stream, hello);
            }
            Op::Send { stream, data } => self.send_data(stream, data),
        }
    }

    /// Queues DATA on `stream` within the server's credit; the rest waits for WINDOW_UPDATE.
    fn send_data(&mut self, stream: u32, data: Bytes) {
        if !self.stream_windows.contains_key(&stream) {
            return; // The stream is over.
        }
        self.blocked.push_back((stream, data));
        self.flush_blocked();
    }

    fn flush_blocked(&mut self) {
        while let Some((stream, data)) = self.blocked.front() {
            let (stream, len) = (*stream, data.len() as i64);
            let Some(window) = self.stream_windows.get_mut(&stream) else {
                self.blocked.pop_front();
                continue;
            };
            if len > self.send_window || len > *window {
                return;
            }
            *window -= len;
            self.send_window -= len;
            let (_, data) = self.blocked.pop_front().expect("looked at just above");
            put_frame_header(&mut self.out, data.len(), DATA, 0, stream);
            self.out.put_slice(&data);
        }
    }

    /// Handles every complete frame in `input`.
    fn on_input(&mut self, input: &mut BytesMut) -> anyhow::Result<()> {
        loop {
            if input.len() < 9 {
                return Ok(());
            }
            let len = (usize::from(input[0]) << 16)
                | (usize::from(input[1]) << 8)
                | usize::from(input[2]);
            if input.len() < 9 + len {
                input.reserve(9 + len - input.len());
                return Ok(());
            }
            let kind = input[3];
            let flags = input[4];
            let stream = u32::from_be_bytes([input[5], input[6], input[7], input[8]]) & MAX_WINDOW;
            input.advance(9);
            let payload = input.split_to(len);
            self.on_frame(kind, flags, stream, payload)?;
            if self.gone.is_some() {
                return Ok(());
            }
        }
    }

    fn on_frame(
        &mut self,
        kind: u8,
        flags: u8,
        stream: u32,
        mut p: BytesMut,
    ) -> anyhow::Result<()> {
        if let Some((partial, _, _)) = &self.partial
            && (kind != CONTINUATION || stream != *partial)
        {
            anyhow::bail!("protocol error: a header block interrupted by frame type {kind}");
        }
        match kind {
            DATA => {
                self.received += p.len() as u32;
                if self.received >= CREDIT_STEP {
                    put_frame_header(&mut self.out, 4, WINDOW_UPDATE, 0, 0);
                    self.out.put_u32(self.received);
                    self.received = 0;
                }
                let data = unpad(&mut p, flags)?;
                self.on_data(stream, data, flags & END_STREAM != 0);
            }
            HEADERS => {
                let mut block = unpad(&mut p, flags)?;
                if flags & PRIORITY != 0 {
                    block.advance(5.min(block.len()));
                }
                if flags & END_HEADERS != 0 {
                    self.on_headers(stream, &block, flags & END_STREAM != 0)?;
                } else {
                    self.partial = Some((stream, flags & END_STREAM != 0, block));
                }
            }
            CONTINUATION => {
                let Some((s, end, mut block)) = self.partial.take() else {
                    anyhow::bail!("protocol error: CONTINUATION without HEADERS");
                };
                block.extend_from_slice(&p);
                if flags & END_HEADERS != 0 {
                    self.on_headers(s, &block, end)?;
                } else {
                    self.partial = Some((s, end, block));
                }
            }
            RST_STREAM => {
                let code = if p.len() >= 4 { p.get_u32() } else { 0 };
                self.end_stream(
                    stream,
                    tonic::Code::Unavailable,
                    format!("RST_STREAM {code}"),
                );
            }
            SETTINGS if flags & ACK == 0 => {
                while p.len() >= 6 {
                    let (id, value) = (p.get_u16(), p.get_u32());
                    if id == SETTINGS_INITIAL_WINDOW_SIZE {
                        let delta = i64::from(value) - self.stream_initial;
                        self.stream_initial = i64::from(value);
                        for w in self.stream_windows.values_mut() {
                            *w += delta;
                        }
                    }
                }
                put_frame_header(&mut self.out, 0, SETTINGS, ACK, 0);
                self.flush_blocked();
            }
            PING if flags & ACK == 0 => {
                put_frame_header(&mut self.out, p.len(), PING, ACK, 0);
                self.out.put_slice(&p);
            }
            GOAWAY => {
                let code = if p.len() >= 8 {
                    (&p[4..8]).get_u32()
                } else {
                    0
                };
                self.fail(format!("the server sent GOAWAY {code}"));
            }
            WINDOW_UPDATE if p.len() >= 4 => {
                let inc = i64::from(p.get_u32() & MAX_WINDOW);
                if stream == 0 {
                    self.send_window += inc;
                } else if let Some(w) = self.stream_windows.get_mut(&stream) {
                    *w += inc;
                }
                self.flush_blocked();
            }
            // PRIORITY, PUSH_PROMISE (refused by our settings), acknowledgements, unknown types.
            _ => {}
        }
        Ok(())
    }

    fn on_data(&mut self, stream: u32, data: BytesMut, end: bool) {
        let Some(slot) = self.streams.get_mut(&stream) else {
            return;
        };
        let buf = match slot {
            Slot::Opening { buf, .. } | Slot::Live { buf, .. } => buf,
        };
        if buf.is_empty() {
            *buf = data;
        } else {
            buf.extend_from_slice(&data);
        }
        let mut done = false;
        while !done {
            let buf = match self.streams.get_mut(&stream) {
                Some(Slot::Opening { buf, .. } | Slot::Live { buf, .. }) => buf,
                None => return,
            };
            if buf.len() < 5 {
                break;
            }
            let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
            if buf.len() < 5 + len {
                break;
            }
            buf.advance(5);
            let msg = buf.split_to(len);
            match parse_server_message(&msg) {
                Some(m) => done = self.on_message(stream, m),
                None => {
                    self.end_stream(
                        stream,
                        tonic::Code::Internal,
                        "a malformed ServerMessage".into(),
                    );
                    return;
                }
            }
        }
        if end {
            self.end_stream(
                stream,
                tonic::Code::Internal,
                "the stream ended without trailers".into(),
            );
        }
    }

    /// One message on `stream`; true when the stream is done with (its device closed).
    fn on_message(&mut self, stream: u32, m: Incoming) -> bool {
        match self.streams.get_mut(&stream) {
            Some(Slot::Live { device, .. }) => {
                if device.on_message(m) {
                    self.close_stream(stream);
                    return true;
                }
                false
            }
            Some(Slot::Opening { welcome, .. }) => {
                let Incoming::Welcome(page) = m else {
                    self.end_stream(
                        stream,
                        tonic::Code::Internal,
                        format!("expected a welcome first, got {m:?}"),
                    );
                    return true;
                };
                let last = page.last_page;
                match welcome {
                    None => *welcome = Some(page),
                    Some(w) => w.contacts.extend(page.contacts),
                }
                if last {
                    let Some(Slot::Opening {
                        make,
                        started,
                        reply,
                        welcome,
                        buf,
                    }) = self.streams.remove(&stream)
                    else {
                        unreachable!("matched just above")
                    };
                    let welcome = welcome.expect("set above");
                    let device = Box::new(make(&welcome));
                    self.live.fetch_add(1, Ordering::AcqRel);
                    self.streams.insert(stream, Slot::Live { device, buf });
                    let _ = reply.send(Ok(Opened {
                        welcome_self: welcome.self_,
                        took_from: started,
                        requests: RawRequests {
                            conn: self.me.clone(),
                            stream,
                        },
                    }));
                }
                false
            }
            None => true,
        }
    }

    fn on_headers(&mut self, stream: u32, block: &[u8], end: bool) -> anyhow::Result<()> {
        let fields = self
            .decoder
            .decode(block)
            .map_err(|e| anyhow!("an HPACK block the bench cannot decode: {e:?}"))?;
        if !end {
            let status = fields.iter().find(|(k, _)| k == b":status");
            if status.is_some_and(|(_, v)| v != b"200") {
                self.end_stream(
                    stream,
                    tonic::Code::Unknown,
                    "HTTP status other than 200".into(),
                );
            }
            return Ok(());
        }
        let field = |name: &[u8]| {
            fields
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| String::from_utf8_lossy(v).to_string())
        };
        let code = field(b"grpc-status")
            .and_then(|s| s.parse::<i32>().ok())
            .map_or(tonic::Code::Unknown, tonic::Code::from_i32);
        let message = field(b"grpc-message").unwrap_or_default();
        self.end_stream(stream, code, message);
        Ok(())
    }

    /// The server ended `stream` (trailers, reset or a broken message).
    fn end_stream(&mut self, stream: u32, code: tonic::Code, message: String) {
        self.stream_windows.remove(&stream);
        match self.streams.remove(&stream) {
            Some(Slot::Opening { reply, .. }) => {
                let _ = reply.send(Err(tonic::Status::new(code, message)));
            }
            Some(Slot::Live { device, .. }) => {
                device.failed(format_args!("stream error {code:?}: {message}"));
                device.finish();
                self.live.fetch_sub(1, Ordering::AcqRel);
            }
            None => {}
        }
    }

    /// The bench is done with `stream`: its device accounts for what never came, and the
    /// stream is cancelled (the server sees the device leave).
    fn close_stream(&mut self, stream: u32) {
        self.stream_windows.remove(&stream);
        if let Some(Slot::Live { device, .. }) = self.streams.remove(&stream) {
            device.finish();
            self.live.fetch_sub(1, Ordering::AcqRel);
        }
        put_frame_header(&mut self.out, 4, RST_STREAM, 0, stream);
        self.out.put_u32(0x8); // CANCEL
    }
}

/// A frame's payload without its padding.
fn unpad(p: &mut BytesMut, flags: u8) -> anyhow::Result<BytesMut> {
    if flags & PADDED == 0 {
        return Ok(std::mem::take(p));
    }
    if p.is_empty() {
        anyhow::bail!("protocol error: a padded frame without its pad length");
    }
    let pad = usize::from(p[0]);
    p.advance(1);
    if pad > p.len() {
        anyhow::bail!("protocol error: padding longer than the frame");
    }
    let keep = p.len() - pad;
    Ok(p.split_to(keep))
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    #[test]
    fn a_frame_header_is_nine_bytes_in_network_order() {
        let mut out = BytesMut::new();
        put_frame_header(&mut out, 0x01_02_03, DATA, END_STREAM, 0x8000_0005);
        assert_eq!(
            &out[..],
            &[1, 2, 3, DATA, END_STREAM, 0, 0, 0, 5],
            "the R bit is cleared"
        );
    }

    #[test]
    fn padding_is_taken_off_and_bad_padding_refused() {
        let mut p = BytesMut::from(&[2u8, b'h', b'i', 0, 0][..]);
        assert_eq!(&unpad(&mut p, PADDED).unwrap()[..], b"hi");
        let mut plain = BytesMut::from(&b"hi"[..]);
        assert_eq!(&unpad(&mut plain, 0).unwrap()[..], b"hi");
        let mut bad = BytesMut::from(&[9u8, b'x'][..]);
        assert!(unpad(&mut bad, PADDED).is_err());
        assert!(unpad(&mut BytesMut::new(), PADDED).is_err());
    }

    #[test]
    fn a_message_is_framed_as_grpc_frames_it() {
        let ping = pb::ClientMessage {
            kind: Some(pb::client_message::Kind::Ping(pb::Ping { nonce: 7 })),
        };
        let f = frame(&ping);
        assert_eq!(f[0], 0);
        assert_eq!(
            u32::from_be_bytes(f[1..5].try_into().unwrap()) as usize,
            f.len() - 5
        );
        assert_eq!(pb::ClientMessage::decode(&f[5..]).unwrap(), ping);
    }
}

//! The device stream's messages, read by hand.
//!
//! A device of the bench needs three fields of each `presence_updated` (user id, version,
//! status), and the server sends hundreds of thousands of them a second to the bench, which
//! shares two cores with it. Decoding each into the generated `ServerMessage` builds a
//! `UserPresence` with its timestamps, platforms and custom status, and drops it again; this
//! module instead walks the protobuf fields of the frame tonic hands over, keeps those three,
//! and skips every other field whatever its number (so fields added to the contract later cost
//! nothing and break nothing). Nothing is allocated for a `presence_updated` or a `pong`. The
//! rare messages (a welcome, a resync) are read in full: the welcome with prost, the resync by
//! the same minimal reader into a vector.
//!
//! The encoder side is prost's: the bench sends few messages.
use prost::Message;
use prost::bytes::Buf;
use tonic::Status;
use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder};
use tonic_prost::{ProstCodec, ProstEncoder};

use presence::pb;

/// Initial buffer size per stream and direction (as the server's codec: messages are tens of
/// bytes, and 100,000 idle streams each holding 8 KiB would be most of the bench's memory).
const BUFFER: usize = 256;
const YIELD_THRESHOLD: usize = 32 * 1024;

/// Field numbers of `ServerMessage.kind` (proto/presence/v1/presence.proto).
const SM_WELCOME: u32 = 1;
const SM_PRESENCE_UPDATED: u32 = 2;
const SM_PONG: u32 = 3;
const SM_RESYNC: u32 = 4;
/// Of `UserPresence`.
const UP_USER_ID: u32 = 1;
const UP_STATUS: u32 = 2;
const UP_VERSION: u32 = 4;
/// Of `Pong`.
const PONG_NONCE: u32 = 1;
/// Of `Resync`.
const RS_USERS: u32 = 1;
const RS_LAST_PAGE: u32 = 2;

/// Protobuf wire types.
const VARINT: u8 = 0;
const I64: u8 = 1;
const LEN: u8 = 2;
const I32: u8 = 5;

/// What a device needs of a presence: who, which version, which status.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Presence {
    pub user: u64,
    pub version: u64,
    pub status: i32,
}

/// One page of a resync.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Resync {
    pub users: Vec<Presence>,
    pub last_page: bool,
}

/// A `ServerMessage` as the bench sees it.
#[derive(Debug)]
pub enum Incoming {
    Presence(Presence),
    Pong(u64),
    Resync(Resync),
    /// Boxed: rare, and large; the enum every delivery moves stays small.
    Welcome(Box<pb::Welcome>),
    /// A kind this bench does not know (a newer server), or none.
    Other,
}

/// The Authenticate call's codec: prost to send, [`IncomingDecoder`] to receive.
#[derive(Debug, Clone, Copy, Default)]
pub struct DeviceCodec;

impl Codec for DeviceCodec {
    type Encode = pb::ClientMessage;
    type Decode = Incoming;
    type Encoder = ProstEncoder<pb::ClientMessage>;
    type Decoder = IncomingDecoder;

    fn encoder(&mut self) -> Self::Encoder {
        ProstCodec::<pb::ClientMessage, pb::ServerMessage>::raw_encoder(BufferSettings::new(
            BUFFER,
            YIELD_THRESHOLD,
        ))
    }

    fn decoder(&mut self) -> Self::Decoder {
        IncomingDecoder
    }
}

#[derive(Debug, Clone, Copy, Default)]
pub struct IncomingDecoder;

impl Decoder for IncomingDecoder {
    type Item = Incoming;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Incoming>, Status> {
        let len = src.remaining();
        // tonic's decode buffer is one BytesMut: the whole message is one chunk. Copy only in
        // the unexpected case that it is not.
        let parsed = if src.chunk().len() >= len {
            parse_server_message(&src.chunk()[..len])
        } else {
            let mut whole = vec![0; len];
            src.copy_to_slice(&mut whole);
            return parse_server_message(&whole).map(Some).ok_or_else(malformed);
        };
        src.advance(len);
        parsed.map(Some).ok_or_else(malformed)
    }

    fn buffer_settings(&self) -> BufferSettings {
        BufferSettings::new(BUFFER, YIELD_THRESHOLD)
    }
}

fn malformed() -> Status {
    Status::internal("presence-bench: a malformed ServerMessage")
}

/// Reads a base-128 varint; None when it runs past the end or past ten bytes.
#[inline]
fn varint(b: &mut &[u8]) -> Option<u64> {
    let mut x = 0u64;
    for i in 0..10 {
        let byte = *b.get(i)?;
        x |= u64::from(byte & 0x7f) << (7 * i);
        if byte < 0x80 {
            *b = &b[i + 1..];
            return Some(x);
        }
    }
    None
}

/// Reads a field key: (field number, wire type).
#[inline]
fn key(b: &mut &[u8]) -> Option<(u32, u8)> {
    let k = varint(b)?;
    Some(((k >> 3) as u32, (k & 7) as u8))
}

/// Takes a length-delimited field's bytes.
#[inline]
fn bytes<'a>(b: &mut &'a [u8]) -> Option<&'a [u8]> {
    let n = usize::try_from(varint(b)?).ok()?;
    if n > b.len() {
        return None;
    }
    let (field, rest) = b.split_at(n);
    *b = rest;
    Some(field)
}

/// Skips a field's value of the given wire type (groups, long obsolete, are refused).
#[inline]
fn skip(b: &mut &[u8], wire: u8) -> Option<()> {
    let n = match wire {
        VARINT => return varint(b).map(drop),
        LEN => return bytes(b).map(drop),
        I64 => 8,
        I32 => 4,
        _ => return None,
    };
    *b = b.get(n..)?;
    Some(())
}

/// Parses one `ServerMessage`. The last occurrence of a oneof field wins, as in protobuf.
pub fn parse_server_message(mut b: &[u8]) -> Option<Incoming> {
    let mut out = Incoming::Other;
    while !b.is_empty() {
        let (field, wire) = key(&mut b)?;
        if wire != LEN {
            skip(&mut b, wire)?;
            continue;
        }
        let body = bytes(&mut b)?;
        out = match field {
            SM_PRESENCE_UPDATED => Incoming::Presence(parse_presence(body)?),
            SM_PONG => Incoming::Pong(parse_pong(body)?),
            SM_RESYNC => Incoming::Resync(parse_resync(body)?),
            SM_WELCOME => Incoming::Welcome(Box::new(pb::Welcome::decode(body).ok()?)),
            _ => out,
        };
    }
    Some(out)
}

/// The three fields of a `UserPresence` the bench uses; every other is skipped.
#[inline]
fn parse_presence(mut b: &[u8]) -> Option<Presence> {
    let mut p = Presence::default();
    while !b.is_empty() {
        let (field, wire) = key(&mut b)?;
        match (field, wire) {
            (UP_USER_ID, VARINT) => p.user = varint(&mut b)?,
            (UP_VERSION, VARINT) => p.version = varint(&mut b)?,
            // An enum is an int32 on the wire: negative values are 10-byte varints.
            (UP_STATUS, VARINT) => p.status = varint(&mut b)? as i32,
            _ => skip(&mut b, wire)?,
        }
    }
    Some(p)
}

fn parse_pong(mut b: &[u8]) -> Option<u64> {
    let mut nonce = 0;
    while !b.is_empty() {
        match key(&mut b)? {
            (PONG_NONCE, VARINT) => nonce = varint(&mut b)?,
            (_, wire) => skip(&mut b, wire)?,
        }
    }
    Some(nonce)
}

fn parse_resync(mut b: &[u8]) -> Option<Resync> {
    let mut r = Resync::default();
    while !b.is_empty() {
        match key(&mut b)? {
            (RS_USERS, LEN) => r.users.push(parse_presence(bytes(&mut b)?)?),
            (RS_LAST_PAGE, VARINT) => r.last_page = varint(&mut b)? != 0,
            (_, wire) => skip(&mut b, wire)?,
        }
    }
    Some(r)
}

#[cfg(test)]
mod tests {
    use super::*;
    use pb::server_message::Kind;

    fn full_presence(user_id: u64, version: u64, status: pb::Status) -> pb::UserPresence {
        pb::UserPresence {
            user_id,
            status: status as i32,
            last_seen: Some(prost_types::Timestamp {
                seconds: 1_700_000_000,
                nanos: 5,
            }),
            version,
            connected: Some(true),
            platforms: vec![1, 3],
            idle_since: Some(prost_types::Timestamp {
                seconds: 1,
                nanos: 0,
            }),
            custom_status: Some(pb::CustomStatus {
                text: "in a meeting".into(),
                emoji: ":calendar:".into(),
                expires_at: None,
            }),
            last_seen_approx: 2,
        }
    }

    fn encode(kind: Kind) -> Vec<u8> {
        pb::ServerMessage { kind: Some(kind) }.encode_to_vec()
    }

    #[test]
    fn a_presence_update_keeps_user_version_and_status_and_skips_the_rest() {
        let bytes = encode(Kind::PresenceUpdated(full_presence(
            123_456_789_012,
            300,
            pb::Status::Busy,
        )));
        match parse_server_message(&bytes) {
            Some(Incoming::Presence(p)) => assert_eq!(
                p,
                Presence {
                    user: 123_456_789_012,
                    version: 300,
                    status: pb::Status::Busy as i32
                }
            ),
            other => panic!("expected a presence, got {other:?}"),
        }
    }

    #[test]
    fn pongs_resyncs_and_welcomes_are_read() {
        match parse_server_message(&encode(Kind::Pong(pb::Pong { nonce: u64::MAX }))) {
            Some(Incoming::Pong(n)) => assert_eq!(n, u64::MAX),
            other => panic!("expected a pong, got {other:?}"),
        }
        let resync = pb::Resync {
            users: vec![
                full_presence(2, 7, pb::Status::Online),
                full_presence(9, 1, pb::Status::Offline),
            ],
            last_page: true,
        };
        match parse_server_message(&encode(Kind::Resync(resync))) {
            Some(Incoming::Resync(r)) => {
                assert!(r.last_page);
                assert_eq!(
                    r.users
                        .iter()
                        .map(|p| (p.user, p.version))
                        .collect::<Vec<_>>(),
                    vec![(2, 7), (9, 1)]
                );
            }
            other => panic!("expected a resync, got {other:?}"),
        }
        let welcome = pb::Welcome {
            connection_id: "c".into(),
            self_: Some(full_presence(5, 3, pb::Status::Away)),
            contacts: vec![full_presence(6, 2, pb::Status::Online)],
            last_page: true,
        };
        match parse_server_message(&encode(Kind::Welcome(welcome.clone()))) {
            Some(Incoming::Welcome(w)) => assert_eq!(*w, welcome),
            other => panic!("expected a welcome, got {other:?}"),
        }
    }

    #[test]
    fn unknown_fields_and_kinds_are_skipped_and_garbage_refused() {
        // A future field 50 (varint) and 51 (bytes) around a presence_updated.
        let mut bytes = vec![0x90, 0x03, 0x2a, 0x9a, 0x03, 0x02, 0xff, 0xff];
        bytes.extend(encode(Kind::PresenceUpdated(full_presence(
            1,
            2,
            pb::Status::Away,
        ))));
        assert!(matches!(
            parse_server_message(&bytes),
            Some(Incoming::Presence(Presence {
                user: 1,
                version: 2,
                ..
            }))
        ));
        // An unknown kind (field 9, length-delimited).
        assert!(matches!(
            parse_server_message(&[0x4a, 0x01, 0x00]),
            Some(Incoming::Other)
        ));
        // A length that runs past the end, and a truncated varint.
        assert!(parse_server_message(&[0x12, 0x05, 0x08]).is_none());
        assert!(parse_server_message(&[0x12, 0x02, 0x08, 0x80]).is_none());
    }
}

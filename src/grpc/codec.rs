//! The protobuf codec of every generated server and client, with small initial buffers.
//!
//! tonic's default codec starts each stream with an 8 KiB encode buffer and an 8 KiB decode
//! buffer. Presence messages are tens of bytes and a device stream lives for hours, so those two
//! buffers were most of the memory an idle Authenticate stream costs (about 17 KiB measured).
//! Buffers still grow on demand for a large message.
use std::marker::PhantomData;

use bytes::{BufMut, Bytes, BytesMut};
use prost::Message;
use tonic::codec::{BufferSettings, Codec};
use tonic_prost::{ProstCodec, ProstDecoder, ProstEncoder};

/// Initial buffer size per stream and direction.
const BUFFER: usize = 256;
/// How much a streaming response may encode before yielding to the network.
const YIELD_THRESHOLD: usize = 32 * 1024;

/// `ProstCodec` with [`BUFFER`]-sized initial buffers. Named in build.rs (`codec_path`).
#[derive(Debug, Clone)]
pub struct CompactCodec<T, U>(PhantomData<(T, U)>);

impl<T, U> Default for CompactCodec<T, U> {
    fn default() -> Self {
        CompactCodec(PhantomData)
    }
}

impl<T, U> Codec for CompactCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = ProstDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstCodec::<T, U>::raw_encoder(BufferSettings::new(BUFFER, YIELD_THRESHOLD))
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstCodec::<T, U>::raw_decoder(BufferSettings::new(BUFFER, YIELD_THRESHOLD))
    }
}

/// A message as gRPC frames it on the wire: no compression, the length, the protobuf bytes.
/// What the server's own stream bodies send and what the bench's raw HTTP/2 client sends.
pub fn frame(msg: &impl Message) -> Bytes {
    let len = msg.encoded_len();
    let mut buf = BytesMut::with_capacity(5 + len);
    buf.put_u8(0);
    buf.put_u32(len as u32);
    msg.encode_raw(&mut buf);
    buf.freeze()
}

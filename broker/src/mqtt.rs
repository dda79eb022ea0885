//! One connection's bytes: framing, the choice of MQTT 3.1.1 or 5 codec from the CONNECT
//! packet, a peek at each frame's header for what rumqttd's packet types keep private
//! (a PUBLISH's QoS and packet id), and [`validate`]'s checks of each frame before the codec
//! decodes it.

mod validate;

use std::io;
use std::time::Duration;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::router::proto::{
    CodecError, Disconnect, DisconnectReasonCode, Packet, Protocol, V4, V5,
};

pub(crate) use validate::{Limits, Violation};

/// How long one write may wait for a peer that does not read.
pub(crate) const WRITE_TIMEOUT: Duration = Duration::from_secs(30);

/// The MQTT version a client speaks, fixed by its CONNECT.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Version {
    V311,
    V5,
}

impl Version {
    pub fn as_str(self) -> &'static str {
        match self {
            Version::V311 => "mqtt3.1.1",
            Version::V5 => "mqtt5",
        }
    }
}

/// What the header of a frame says before it is decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct FrameInfo {
    pub packet_type: u8,
    pub qos: u8,
    pub pkid: u16,
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum ReadError {
    #[error("connection closed")]
    Closed,
    #[error("i/o error: {0}")]
    Io(#[from] io::Error),
    #[error("malformed packet: {0}")]
    Malformed(CodecError),
    #[error("{0}")]
    Invalid(Violation),
    #[error("packet of {0} bytes is larger than allowed")]
    TooLarge(usize),
    #[error("unsupported protocol level {0}")]
    UnsupportedVersion(u8),
    #[error("timed out")]
    Timeout,
}

/// Decodes the fixed header at the start of `buf`: (first byte, header length, remaining length).
fn fixed_header(buf: &[u8]) -> Option<Result<(u8, usize, usize), CodecError>> {
    let first = *buf.first()?;
    let mut len = 0usize;
    for i in 0..4 {
        let b = *buf.get(1 + i)?;
        len |= ((b & 0x7f) as usize) << (7 * i);
        if b & 0x80 == 0 {
            return Some(Ok((first, 2 + i, len)));
        }
    }
    Some(Err(CodecError::MalformedRemainingLength))
}

/// Header facts of the complete frame at the start of `buf`, if there is one, with the
/// length of its fixed header and its whole length. A frame longer than `max` (fixed header
/// included, as MQTT 5's Maximum Packet Size counts it) is refused once its header is read.
fn peek(buf: &[u8], max: usize) -> Result<Option<(FrameInfo, usize, usize)>, ReadError> {
    let Some(header) = fixed_header(buf) else {
        return Ok(None);
    };
    let (first, header_len, remaining) = header.map_err(ReadError::Malformed)?;
    let frame_len = header_len + remaining;
    if frame_len > max {
        return Err(ReadError::TooLarge(frame_len));
    }
    if buf.len() < frame_len {
        return Ok(None);
    }
    let packet_type = first >> 4;
    let qos = (first >> 1) & 0b11;
    let body = &buf[header_len..frame_len];
    let pkid = if packet_type == 3 && qos > 0 && body.len() >= 2 {
        let topic_len = u16::from_be_bytes([body[0], body[1]]) as usize;
        match body.get(2 + topic_len..4 + topic_len) {
            Some(id) => u16::from_be_bytes([id[0], id[1]]),
            None => return Err(ReadError::Malformed(CodecError::MalformedPacket)),
        }
    } else {
        0
    };
    Ok(Some((
        FrameInfo {
            packet_type,
            qos,
            pkid,
        },
        header_len,
        frame_len,
    )))
}

/// The protocol level in a complete CONNECT frame.
fn connect_level(frame: &[u8]) -> Result<u8, ReadError> {
    let Some(Ok((first, header_len, _))) = fixed_header(frame) else {
        return Err(ReadError::Malformed(CodecError::MalformedPacket));
    };
    if first >> 4 != 1 {
        return Err(ReadError::Malformed(CodecError::InvalidPacketType(
            first >> 4,
        )));
    }
    let body = &frame[header_len..];
    let name_len = match body {
        [a, b, ..] => u16::from_be_bytes([*a, *b]) as usize,
        _ => return Err(ReadError::Malformed(CodecError::MalformedPacket)),
    };
    body.get(2 + name_len)
        .copied()
        .ok_or(ReadError::Malformed(CodecError::MalformedPacket))
}

/// Bytes the read buffer starts with and grows by. MQTT packets of a device are small; a larger
/// packet grows the buffer as far as it needs.
const READ_CHUNK: usize = 2048;
/// A buffer larger than this is freed once it is empty, so one large packet does not leave
/// an idle connection holding its size for the rest of its life.
const KEEP_IDLE: usize = 8 * 1024;

/// A connection after its CONNECT: socket, buffers and the codec of its version.
pub(crate) struct Conn<S> {
    io: S,
    read: BytesMut,
    write: BytesMut,
    max_packet: usize,
    limits: Limits,
    version: Version,
}

/// The reading half, which never touches the socket: what [`Conn::read_connect`] and
/// [`Conn::fill`] buffered is framed, checked and decoded here, so the fuzz targets
/// ([`read_stream`]) drive the very code a session does.
impl<S> Conn<S> {
    /// A connection with the default [`Limits`]; [`Conn::set_limits`] changes them.
    pub fn new(io: S, max_packet: usize) -> Self {
        Self {
            io,
            read: BytesMut::with_capacity(READ_CHUNK),
            // Grows on the first packet queued; most connections write little.
            write: BytesMut::new(),
            max_packet,
            limits: Limits::default(),
            version: Version::V311,
        }
    }

    pub fn set_limits(&mut self, limits: Limits) {
        self.limits = limits;
    }

    pub fn version(&self) -> Version {
        self.version
    }

    /// The CONNECT packet, if a complete one is buffered; fixes the codec from its protocol
    /// level.
    fn buffered_connect(&mut self) -> Result<Option<Packet>, ReadError> {
        let Some((_, header_len, len)) = peek(&self.read, self.max_packet)? else {
            return Ok(None);
        };
        let level = connect_level(&self.read[..len])?;
        self.version = match level {
            4 => Version::V311,
            5 => Version::V5,
            other => return Err(ReadError::UnsupportedVersion(other)),
        };
        validate::check_connect(&self.read[..len], header_len, self.version, &self.limits)
            .map_err(ReadError::Invalid)?;
        match self.decode()? {
            p @ Packet::Connect(..) => Ok(Some(p)),
            _ => Err(ReadError::Malformed(CodecError::InvalidPacketType(1))),
        }
    }

    /// The next complete packet already buffered, with its header facts.
    pub fn next_packet(&mut self) -> Result<Option<(FrameInfo, Packet)>, ReadError> {
        let Some((info, header_len, len)) = peek(&self.read, self.max_packet)? else {
            return Ok(None);
        };
        validate::check_packet(&self.read[..len], header_len, self.version, &self.limits)
            .map_err(ReadError::Invalid)?;
        if self.version == Version::V5 && info.packet_type == 14 && len - header_len <= 1 {
            // MQTT 5 lets a DISCONNECT end after its reason code (or have none: 0x00);
            // rumqttd insists on a property length. The code is read within the frame: with
            // none, the next byte belongs to the next packet (or has not arrived yet).
            let reason_code = match self.read[header_len..len].first() {
                Some(0x04) => DisconnectReasonCode::DisconnectWithWillMessage,
                _ => DisconnectReasonCode::NormalDisconnection,
            };
            self.read.advance(len);
            return Ok(Some((
                info,
                Packet::Disconnect(Disconnect { reason_code }, None),
            )));
        }
        Ok(Some((info, self.decode()?)))
    }

    fn decode(&mut self) -> Result<Packet, ReadError> {
        let result = match self.version {
            Version::V311 => V4.read_mut(&mut self.read, self.max_packet),
            Version::V5 => V5.read_mut(&mut self.read, self.max_packet),
        };
        result.map_err(|e| match e {
            CodecError::PayloadSizeLimitExceeded(n) => ReadError::TooLarge(n),
            e => ReadError::Malformed(e),
        })
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> Conn<S> {
    /// Reads the CONNECT packet and fixes the codec from its protocol level.
    pub async fn read_connect(&mut self, within: Duration) -> Result<Packet, ReadError> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if let Some(packet) = self.buffered_connect()? {
                return Ok(packet);
            }
            match tokio::time::timeout_at(deadline, self.io.read_buf(&mut self.read)).await {
                Err(_) => return Err(ReadError::Timeout),
                Ok(Ok(0)) => return Err(ReadError::Closed),
                Ok(Ok(_)) => {}
                Ok(Err(e)) => return Err(e.into()),
            }
        }
    }

    /// Waits for more bytes. Cancel safe.
    pub async fn fill(&mut self) -> Result<(), ReadError> {
        if self.read.is_empty() && self.read.capacity() > KEEP_IDLE {
            self.read = BytesMut::with_capacity(READ_CHUNK);
        } else if self.read.capacity() - self.read.len() < READ_CHUNK / 4 {
            self.read.reserve(READ_CHUNK);
        }
        match self.io.read_buf(&mut self.read).await? {
            0 => Err(ReadError::Closed),
            _ => Ok(()),
        }
    }

    /// Encodes a packet into the write buffer; [`Conn::flush`] sends it.
    pub fn queue(&mut self, packet: Packet) {
        let result = match self.version {
            Version::V311 => V4.write(packet, &mut self.write),
            Version::V5 => V5.write(packet, &mut self.write),
        };
        if let Err(e) = result {
            tracing::warn!(error = %e, "cannot encode an outgoing packet; dropped");
        }
    }

    /// [`Conn::queue`] for a publish, returning the QoS and packet id it was written with.
    pub fn queue_publish(&mut self, packet: Packet) -> Option<FrameInfo> {
        let start = self.write.len();
        self.queue(packet);
        peek(&self.write[start..], usize::MAX)
            .ok()
            .flatten()
            .map(|(info, _, _)| info)
    }

    /// [`Conn::queue_publish`] unless the encoded packet is larger than `max` (the client's
    /// Maximum Packet Size): then nothing is queued, and the error has the QoS and packet id
    /// it would have had.
    pub fn queue_publish_within(
        &mut self,
        packet: Packet,
        max: Option<usize>,
    ) -> Result<Option<FrameInfo>, FrameInfo> {
        let start = self.write.len();
        let info = self.queue_publish(packet);
        match info {
            Some(info) if max.is_some_and(|max| self.write.len() - start > max) => {
                self.write.truncate(start);
                Err(info)
            }
            info => Ok(info),
        }
    }

    /// QoS and packet id of an outgoing publish (rumqttd keeps its fields private), by encoding
    /// it as MQTT 3.1.1 and reading the header: for the rare publish that is not sent.
    pub fn publish_header(packet: Packet) -> Option<FrameInfo> {
        let mut buf = bytes::BytesMut::new();
        V4.write(packet, &mut buf).ok()?;
        peek(&buf, usize::MAX)
            .ok()
            .flatten()
            .map(|(info, _, _)| info)
    }

    pub fn has_queued(&self) -> bool {
        !self.write.is_empty()
    }

    /// Writes what is queued. A peer that reads nothing for [`WRITE_TIMEOUT`] is treated as
    /// gone, so a session stuck on a dead socket still ends (and can be taken over or kicked).
    pub async fn flush(&mut self) -> io::Result<()> {
        if self.write.is_empty() {
            return Ok(());
        }
        let write = async {
            self.io.write_all(&self.write).await?;
            self.io.flush().await
        };
        match tokio::time::timeout(WRITE_TIMEOUT, write).await {
            Ok(result) => {
                if self.write.capacity() > KEEP_IDLE {
                    self.write = BytesMut::new();
                } else {
                    self.write.clear();
                }
                result
            }
            Err(_) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "peer stopped reading",
            )),
        }
    }

    /// [`Conn::close`] after a DISCONNECT that says why: the peer may still be sending (the
    /// packets that broke a rule, say), and a socket closed with unread bytes is reset, which
    /// can make the peer lose the DISCONNECT. So what it sends is read and dropped until it
    /// closes too, within the same bound.
    pub async fn close_draining(mut self, within: Duration) {
        let _ = tokio::time::timeout(within, async {
            let _ = self.flush().await;
            let _ = self.io.shutdown().await;
            let mut sink = [0u8; 1024];
            while matches!(self.io.read(&mut sink).await, Ok(n) if n > 0) {}
        })
        .await;
    }

    /// Sends what is queued (bounded in time) and closes the socket.
    pub async fn close(mut self, within: Duration) {
        let _ = tokio::time::timeout(within, async {
            let _ = self.flush().await;
            let _ = self.io.shutdown().await;
        })
        .await;
    }
}

/// One frame as [`read_stream`] took it.
#[doc(hidden)]
#[derive(Debug)]
pub struct ReadFrame {
    /// Header facts, as the session sees them ([`FrameInfo`]).
    pub packet_type: u8,
    pub qos: u8,
    pub pkid: u16,
    /// The frame's length by its fixed header, the fixed header included.
    pub frame_len: usize,
    /// Bytes the reader took from its buffer for the frame.
    pub consumed: usize,
    pub packet: Packet,
}

/// What the reader made of a byte stream ([`read_stream`]).
#[doc(hidden)]
#[derive(Debug, Default)]
pub struct StreamReading {
    /// 4 (MQTT 3.1.1) or 5, once a CONNECT was read.
    pub protocol_level: Option<u8>,
    /// Every packet read, the CONNECT first.
    pub frames: Vec<ReadFrame>,
    /// Why the reader refused the stream (the session then ends the connection).
    pub error: Option<String>,
    /// Bytes left in the buffer when the stream ended: the start of a frame not complete.
    /// Zero after an error, since how much had arrived behind the refused frame depends on
    /// how the bytes were cut.
    pub pending: usize,
}

/// Reads one connection's byte stream arriving in `chunks`, as a session does: the CONNECT
/// first ([`Conn::read_connect`]), then every packet ([`Conn::next_packet`]), each checked by
/// [`validate`] before the codec decodes it, with the default [`Limits`]. For the fuzz
/// targets (`fuzz/`), which have no socket to give.
#[doc(hidden)]
pub fn read_stream<'a>(
    chunks: impl IntoIterator<Item = &'a [u8]>,
    max_packet: usize,
) -> StreamReading {
    let mut conn = Conn::new((), max_packet);
    let mut out = StreamReading::default();
    for chunk in chunks {
        conn.read.extend_from_slice(chunk);
        loop {
            let before = conn.read.len();
            // What the header says, for the CONNECT (read without a FrameInfo) and for the
            // frame length the codec must agree with.
            let peeked = peek(&conn.read, max_packet).ok().flatten();
            let frame_len = peeked.map_or(0, |(_, _, len)| len);
            let read = match (out.protocol_level, peeked) {
                (None, Some((info, _, _))) => conn.buffered_connect().map(|p| p.map(|p| (info, p))),
                (None, None) => conn.buffered_connect().map(|_| None),
                (Some(_), _) => conn.next_packet(),
            };
            match read {
                Ok(Some((info, packet))) => {
                    out.protocol_level.get_or_insert(match conn.version {
                        Version::V311 => 4,
                        Version::V5 => 5,
                    });
                    out.frames.push(ReadFrame {
                        packet_type: info.packet_type,
                        qos: info.qos,
                        pkid: info.pkid,
                        frame_len,
                        consumed: before - conn.read.len(),
                        packet,
                    });
                }
                Ok(None) => break,
                Err(e) => {
                    out.error = Some(e.to_string());
                    return out;
                }
            }
        }
    }
    out.pending = conn.read.len();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peeks_publish_qos_and_packet_id() {
        // PUBLISH QoS 1, topic "a/b", pkid 0x1234, payload "x"
        let frame = [0x32, 8, 0, 3, b'a', b'/', b'b', 0x12, 0x34, b'x'];
        let (info, header_len, len) = peek(&frame, 1024).unwrap().unwrap();
        assert_eq!(header_len, 2);
        assert_eq!(len, frame.len());
        assert_eq!(
            info,
            FrameInfo {
                packet_type: 3,
                qos: 1,
                pkid: 0x1234
            }
        );
        assert!(peek(&frame[..5], 1024).unwrap().is_none());
        assert!(matches!(peek(&frame, 4), Err(ReadError::TooLarge(10))));
        // The maximum counts the fixed header too.
        assert!(peek(&frame, 10).unwrap().is_some());
        assert!(matches!(peek(&frame, 9), Err(ReadError::TooLarge(10))));
    }

    #[test]
    fn malformed_headers_are_errors() {
        assert!(matches!(
            peek(&[0x30, 0xff, 0xff, 0xff, 0xff, 0x01], 1 << 30),
            Err(ReadError::Malformed(_))
        ));
        // QoS 1 publish whose topic length runs past the frame
        assert!(matches!(
            peek(&[0x32, 3, 0, 9, b'a'], 1024),
            Err(ReadError::Malformed(_))
        ));
    }

    #[test]
    fn a_stream_reads_the_same_however_it_arrives() {
        let connect = [
            0x10, 13, 0, 4, b'M', b'Q', b'T', b'T', 4, 2, 0, 60, 0, 1, b'c',
        ];
        let publish = [0x32, 8, 0, 3, b'a', b'/', b'b', 0x12, 0x34, b'x'];
        let ping = [0xc0, 0];
        let stream = [&connect[..], &publish, &ping].concat();
        let whole = read_stream([&stream[..]], 1024);
        assert_eq!(whole.protocol_level, Some(4));
        assert!(whole.error.is_none());
        assert_eq!(whole.pending, 0);
        let facts: Vec<_> = whole
            .frames
            .iter()
            .map(|f| (f.packet_type, f.qos, f.pkid, f.frame_len, f.consumed))
            .collect();
        assert_eq!(
            facts,
            [(1, 0, 0, 15, 15), (3, 1, 0x1234, 10, 10), (12, 0, 0, 2, 2)]
        );
        let bytewise = read_stream(stream.chunks(1), 1024);
        assert_eq!(bytewise.frames.len(), 3);
        for (a, b) in whole.frames.iter().zip(&bytewise.frames) {
            assert_eq!(a.packet, b.packet);
        }
        // A frame not complete is left pending; one over the maximum ends the reading.
        let cut = read_stream([&stream[..stream.len() - 1]], 1024);
        assert_eq!((cut.frames.len(), cut.pending), (2, 1));
        let small = read_stream([&stream[..]], 12);
        assert!(small.frames.is_empty());
        assert!(small
            .error
            .is_some_and(|e| e.contains("larger than allowed")));
    }

    /// Found by the `mqtt_frames` fuzz target: a DISCONNECT without a reason code read the
    /// byte after its frame as one, so `e0 00` followed by a packet starting with 0x04 (or a
    /// stray 0x04) published the client's will, depending on how TCP had cut the stream.
    #[test]
    fn a_disconnect_without_a_reason_code_is_normal_whatever_follows() {
        let connect = [
            0x10, 14, 0, 4, b'M', b'Q', b'T', b'T', 5, 2, 0, 60, 0, 0, 1, b'c',
        ];
        for tail in [&[][..], &[0x04], &[0x04, 0x00]] {
            let stream = [&connect[..], &[0xe0, 0x00], tail].concat();
            for reading in [
                read_stream([&stream[..]], 1024),
                read_stream(stream.chunks(1), 1024),
            ] {
                assert_eq!(
                    reading.frames[1].packet,
                    Packet::Disconnect(
                        Disconnect {
                            reason_code: DisconnectReasonCode::NormalDisconnection
                        },
                        None
                    ),
                    "followed by {tail:?}"
                );
            }
        }
        let with_will = [&connect[..], &[0xe0, 0x01, 0x04]].concat();
        assert_eq!(
            read_stream([&with_will[..]], 1024).frames[1].packet,
            Packet::Disconnect(
                Disconnect {
                    reason_code: DisconnectReasonCode::DisconnectWithWillMessage
                },
                None
            )
        );
    }

    #[test]
    fn connect_levels() {
        let v5 = [0x10, 10, 0, 4, b'M', b'Q', b'T', b'T', 5, 2, 0, 60];
        assert_eq!(connect_level(&v5).unwrap(), 5);
        let v311 = [0x10, 10, 0, 4, b'M', b'Q', b'T', b'T', 4, 2, 0, 60];
        assert_eq!(connect_level(&v311).unwrap(), 4);
        assert!(connect_level(&[0x30, 0]).is_err());
    }
}

//! What rumqttd's codec does not check, checked on a complete raw frame before it decodes it:
//! fixed-header flags, reserved bits, packet identifiers, topic names and strings, and the
//! MQTT 5 property rules (where a property may appear, at most once, with a valid value),
//! plus the broker's own bounds on properties. Pure functions over bytes; nothing a client
//! sends is allocated before it passed them.

use super::Version;

/// The broker's bounds on what one packet may carry besides its topic and payload.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    /// User properties per packet (a CONNECT's and its will's together).
    pub max_user_properties: usize,
    /// Bytes of property sections per packet.
    pub max_property_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_user_properties: 32,
            max_property_bytes: 8 * 1024,
        }
    }
}

/// Longest client identifier accepted, bytes (device ids are at most 128).
pub(crate) const MAX_CLIENT_ID_LEN: usize = 256;

/// Why a frame is refused. Each kind is one MQTT 5 reason code (the session maps them).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub(crate) enum Violation {
    #[error("malformed packet: {0}")]
    Malformed(&'static str),
    #[error("protocol error: {0}")]
    Protocol(&'static str),
    #[error("invalid topic name: {0}")]
    TopicName(&'static str),
    #[error("topic alias: the broker offers none")]
    TopicAlias,
    #[error("authentication methods are not supported")]
    AuthMethod,
    #[error("client identifier longer than {MAX_CLIENT_ID_LEN} bytes")]
    ClientId,
    #[error("over the broker's limit: {0}")]
    OverLimit(&'static str),
}

#[cfg(test)]
impl Violation {
    /// The MQTT 5 reason code (CONNACK and DISCONNECT share them).
    pub fn code(self) -> u8 {
        match self {
            Violation::Malformed(_) => 0x81,
            Violation::Protocol(_) => 0x82,
            Violation::OverLimit(_) => 0x83,
            Violation::ClientId => 0x85,
            Violation::AuthMethod => 0x8c,
            Violation::TopicName(_) => 0x90,
            Violation::TopicAlias => 0x94,
        }
    }
}

use Violation::{Malformed, Protocol};

const TRUNCATED: Violation = Malformed("truncated");

struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], Violation> {
        if self.buf.len() < n {
            return Err(TRUNCATED);
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }
    fn u8(&mut self) -> Result<u8, Violation> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, Violation> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Result<u32, Violation> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn varint(&mut self) -> Result<usize, Violation> {
        let mut value = 0usize;
        for i in 0..4 {
            let b = self.u8()?;
            value |= ((b & 0x7f) as usize) << (7 * i);
            if b & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err(Malformed("variable byte integer longer than 4 bytes"))
    }
    fn binary(&mut self) -> Result<&'a [u8], Violation> {
        let n = self.u16()? as usize;
        self.take(n)
    }
    /// A UTF-8 string: valid UTF-8 without U+0000.
    fn string(&mut self) -> Result<&'a str, Violation> {
        let s =
            std::str::from_utf8(self.binary()?).map_err(|_| Malformed("string is not UTF-8"))?;
        if s.contains('\0') {
            return Err(Malformed("string contains U+0000"));
        }
        Ok(s)
    }
    fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }
}

/// Which packet a property section belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Section {
    Connect,
    Will,
    Publish,
    /// PUBACK, PUBREC, PUBREL, PUBCOMP.
    Ack,
    Subscribe,
    Unsubscribe,
    Disconnect,
}

/// What a property section said that the caller checks further.
#[derive(Debug, Default)]
struct Seen {
    auth_method: bool,
    auth_data: bool,
    topic_alias: bool,
}

/// Properties of one packet, counted against [`Limits`] across its sections.
struct Budget<'l> {
    limits: &'l Limits,
    users: usize,
    bytes: usize,
}

fn properties(
    r: &mut Reader<'_>,
    section: Section,
    budget: &mut Budget<'_>,
) -> Result<Seen, Violation> {
    use Section::*;
    let len = r.varint()?;
    budget.bytes += len;
    if budget.bytes > budget.limits.max_property_bytes {
        return Err(Violation::OverLimit("property bytes"));
    }
    let mut p = Reader { buf: r.take(len)? };
    let mut once = 0u64;
    let mut seen = Seen::default();
    while !p.is_empty() {
        let id = p.u8()?;
        let allowed: &[Section] = match id {
            0x01 | 0x02 | 0x03 | 0x08 | 0x09 => &[Publish, Will],
            0x0b => &[Subscribe],
            0x11 => &[Connect, Disconnect],
            0x15 | 0x16 | 0x17 | 0x19 | 0x21 | 0x22 | 0x27 => &[Connect],
            0x18 => &[Will],
            0x1f => &[Ack, Disconnect],
            0x23 => &[Publish],
            0x26 => &[
                Connect,
                Will,
                Publish,
                Ack,
                Subscribe,
                Unsubscribe,
                Disconnect,
            ],
            // Sent by servers only.
            0x12 | 0x13 | 0x1a | 0x1c | 0x24 | 0x25 | 0x28 | 0x29 | 0x2a => &[],
            _ => return Err(Malformed("unknown property")),
        };
        if !allowed.contains(&section) {
            return Err(Protocol("property not allowed in this packet"));
        }
        if id == 0x26 {
            budget.users += 1;
            if budget.users > budget.limits.max_user_properties {
                return Err(Violation::OverLimit("user properties"));
            }
            p.string()?;
            p.string()?;
            continue;
        }
        if once & (1 << id) != 0 {
            return Err(Protocol("property appears twice"));
        }
        once |= 1 << id;
        match id {
            0x01 | 0x17 | 0x19 => {
                if p.u8()? > 1 {
                    return Err(Protocol("property value must be 0 or 1"));
                }
            }
            0x02 | 0x11 | 0x18 => {
                p.u32()?;
            }
            0x03 | 0x1f => {
                p.string()?;
            }
            0x08 => {
                if p.string()?.contains(['+', '#']) {
                    return Err(Protocol("wildcard in a response topic"));
                }
            }
            0x09 => {
                p.binary()?;
            }
            0x0b => {
                if p.varint()? == 0 {
                    return Err(Protocol("subscription identifier 0"));
                }
            }
            0x15 => {
                p.string()?;
                seen.auth_method = true;
            }
            0x16 => {
                p.binary()?;
                seen.auth_data = true;
            }
            0x21 => {
                if p.u16()? == 0 {
                    return Err(Protocol("receive maximum 0"));
                }
            }
            0x22 => {
                p.u16()?;
            }
            0x23 => {
                p.u16()?;
                seen.topic_alias = true;
            }
            0x27 => {
                if p.u32()? == 0 {
                    return Err(Protocol("maximum packet size 0"));
                }
            }
            _ => unreachable!("every allowed property is read above"),
        }
    }
    Ok(seen)
}

fn nonzero_pkid(r: &mut Reader<'_>) -> Result<u16, Violation> {
    match r.u16()? {
        0 => Err(Protocol("packet identifier 0")),
        id => Ok(id),
    }
}

/// Checks the CONNECT frame `frame` (fixed header of `header_len` bytes included) of a client
/// that announced `version`.
pub(crate) fn check_connect(
    frame: &[u8],
    header_len: usize,
    version: Version,
    limits: &Limits,
) -> Result<(), Violation> {
    if frame[0] != 0x10 {
        return Err(Malformed("CONNECT fixed-header flags"));
    }
    let v5 = version == Version::V5;
    let mut r = Reader {
        buf: &frame[header_len..],
    };
    if r.binary()? != b"MQTT" {
        return Err(Malformed("protocol name"));
    }
    r.u8()?;
    let flags = r.u8()?;
    if flags & 0x01 != 0 {
        return Err(Malformed("reserved connect flag"));
    }
    let will = flags & 0x04 != 0;
    let will_qos = (flags >> 3) & 0b11;
    if will_qos == 3 || (!will && flags & 0b0011_1000 != 0) {
        return Err(Malformed("will QoS or retain"));
    }
    let (user, password) = (flags & 0x80 != 0, flags & 0x40 != 0);
    if !v5 && password && !user {
        return Err(Malformed("password without user name"));
    }
    r.u16()?;
    let mut budget = Budget {
        limits,
        users: 0,
        bytes: 0,
    };
    let seen = if v5 {
        properties(&mut r, Section::Connect, &mut budget)?
    } else {
        Seen::default()
    };
    if r.string()?.len() > MAX_CLIENT_ID_LEN {
        return Err(Violation::ClientId);
    }
    if will {
        if v5 {
            properties(&mut r, Section::Will, &mut budget)?;
        }
        r.string()?;
        r.binary()?;
    }
    if user {
        r.string()?;
    }
    if password {
        r.binary()?;
    }
    if !r.is_empty() {
        return Err(Malformed("bytes after the payload"));
    }
    if seen.auth_data && !seen.auth_method {
        return Err(Protocol("authentication data without a method"));
    }
    if seen.auth_method {
        return Err(Violation::AuthMethod);
    }
    Ok(())
}

/// Checks a frame a connected client sent.
pub(crate) fn check_packet(
    frame: &[u8],
    header_len: usize,
    version: Version,
    limits: &Limits,
) -> Result<(), Violation> {
    let v5 = version == Version::V5;
    let (kind, flags) = (frame[0] >> 4, frame[0] & 0x0f);
    let mut r = Reader {
        buf: &frame[header_len..],
    };
    let mut budget = Budget {
        limits,
        users: 0,
        bytes: 0,
    };
    let fixed_flags = match kind {
        3 => None,
        6 | 8 | 10 => Some(0b0010),
        _ => Some(0),
    };
    if fixed_flags.is_some_and(|f| f != flags) {
        return Err(Malformed("fixed-header flags"));
    }
    match kind {
        0 => Err(Malformed("reserved packet type 0")),
        15 if !v5 => Err(Malformed("reserved packet type 15")),
        15 => Err(Protocol("AUTH without an authentication method")),
        1 => Err(Protocol("second CONNECT")),
        2 | 9 | 11 | 13 => Err(Protocol("a packet only servers send")),
        3 => {
            let qos = (flags >> 1) & 0b11;
            if qos == 3 {
                return Err(Malformed("QoS 3"));
            }
            if qos == 0 && flags & 0x08 != 0 {
                return Err(Malformed("DUP set on QoS 0"));
            }
            let topic = r.string()?;
            if topic.contains(['+', '#']) {
                return Err(Violation::TopicName("wildcard in a topic name"));
            }
            if qos > 0 {
                nonzero_pkid(&mut r)?;
            }
            let seen = if v5 {
                properties(&mut r, Section::Publish, &mut budget)?
            } else {
                Seen::default()
            };
            if seen.topic_alias {
                return Err(Violation::TopicAlias);
            }
            if topic.is_empty() {
                return Err(if v5 {
                    Protocol("empty topic without a topic alias")
                } else {
                    Malformed("empty topic")
                });
            }
            Ok(())
        }
        4..=7 => {
            nonzero_pkid(&mut r)?;
            if !v5 {
                return match r.is_empty() {
                    true => Ok(()),
                    false => Err(Malformed("acknowledgement longer than 2 bytes")),
                };
            }
            if !r.is_empty() {
                r.u8()?;
            }
            if !r.is_empty() {
                properties(&mut r, Section::Ack, &mut budget)?;
            }
            done(&r)
        }
        8 | 10 => {
            nonzero_pkid(&mut r)?;
            if v5 {
                let section = match kind {
                    8 => Section::Subscribe,
                    _ => Section::Unsubscribe,
                };
                properties(&mut r, section, &mut budget)?;
            }
            if r.is_empty() {
                return Err(Protocol("no topic filter"));
            }
            while !r.is_empty() {
                if r.string()?.is_empty() {
                    return Err(Protocol("empty topic filter"));
                }
                if kind == 8 {
                    let options = r.u8()?;
                    let reserved = if v5 { 0xc0 } else { 0xfc };
                    if options & reserved != 0 {
                        return Err(Malformed("reserved subscription option bits"));
                    }
                    if options & 0b11 == 3 {
                        return Err(Protocol("QoS 3 subscription"));
                    }
                    if (options >> 4) & 0b11 == 3 {
                        return Err(Protocol("retain handling 3"));
                    }
                }
            }
            Ok(())
        }
        12 => done(&r),
        14 if !v5 => done(&r),
        14 => {
            if !r.is_empty() {
                let reason = r.u8()?;
                if !matches!(
                    reason,
                    0x00 | 0x04 | 0x80..=0x83 | 0x90 | 0x93..=0x99
                ) {
                    return Err(Protocol("DISCONNECT reason code"));
                }
            }
            if !r.is_empty() {
                properties(&mut r, Section::Disconnect, &mut budget)?;
            }
            done(&r)
        }
        _ => unreachable!("a packet type is four bits"),
    }
}

fn done(r: &Reader<'_>) -> Result<(), Violation> {
    match r.is_empty() {
        true => Ok(()),
        false => Err(Malformed("unexpected bytes at the end")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits {
        max_user_properties: 2,
        max_property_bytes: 64,
    };

    fn frame(first: u8, body: &[u8]) -> Vec<u8> {
        assert!(body.len() < 128);
        let mut f = vec![first, body.len() as u8];
        f.extend_from_slice(body);
        f
    }

    fn packet(version: Version, first: u8, body: &[u8]) -> Result<(), Violation> {
        check_packet(&frame(first, body), 2, version, &LIMITS)
    }

    fn connect(level: u8, flags: u8, props: &[u8], rest: &[u8]) -> Result<(), Violation> {
        let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', level, flags, 0, 30];
        if level == 5 {
            body.push(props.len() as u8);
            body.extend_from_slice(props);
        }
        body.extend_from_slice(&[0, 1, b'c']);
        body.extend_from_slice(rest);
        let version = if level == 5 {
            Version::V5
        } else {
            Version::V311
        };
        check_connect(&frame(0x10, &body), 2, version, &LIMITS)
    }

    #[test]
    fn fixed_header_flags() {
        use Version::*;
        let cases: &[(Version, u8, &[u8], Option<u8>)] = &[
            (V311, 0x30, &[0, 1, b'a'], None),
            (V311, 0x38, &[0, 1, b'a'], Some(0x81)), // DUP on QoS 0
            (V311, 0x3a, &[0, 1, b'a', 0, 1], None), // DUP on QoS 1
            (V311, 0x36, &[0, 1, b'a', 0, 1], Some(0x81)), // QoS 3
            (V311, 0x62, &[0, 1], None),
            (V311, 0x60, &[0, 1], Some(0x81)),
            (V311, 0x82, &[0, 1, 0, 1, b'a', 1], None),
            (V311, 0x80, &[0, 1, 0, 1, b'a', 1], Some(0x81)),
            (V311, 0xa2, &[0, 1, 0, 1, b'a'], None),
            (V311, 0xa0, &[0, 1, 0, 1, b'a'], Some(0x81)),
            (V311, 0xc0, &[], None),
            (V311, 0xc1, &[], Some(0x81)),
            (V311, 0xe0, &[], None),
            (V311, 0xe8, &[], Some(0x81)),
            (V311, 0x41, &[0, 1], Some(0x81)),
            (V311, 0x00, &[], Some(0x81)),
            (V311, 0xf0, &[], Some(0x81)),
            (V5, 0xf0, &[], Some(0x82)),
            (V311, 0x10, &[], Some(0x82)), // a second CONNECT
            (V5, 0x20, &[0, 0], Some(0x82)),
        ];
        for (i, (version, first, body, code)) in cases.iter().enumerate() {
            assert_eq!(
                packet(*version, *first, body).err().map(Violation::code),
                *code,
                "case {i}: {first:#04x} {body:?}"
            );
        }
    }

    #[test]
    fn publish_rules() {
        use Version::*;
        let cases: &[(Version, &[u8], Option<u8>)] = &[
            (V5, &[0, 1, b'a', 0, 1, 0], None),
            (V5, &[0, 1, b'a', 0, 0, 0], Some(0x82)), // packet id 0
            (V5, &[0, 1, 0xff, 0, 1, 0], Some(0x81)), // not UTF-8
            (V5, &[0, 1, 0, 0, 1, 0], Some(0x81)),    // NUL
            (V5, &[0, 1, b'+', 0, 1, 0], Some(0x90)),
            (V5, &[0, 0, 0, 1, 0], Some(0x82)), // empty topic, no alias
            (V311, &[0, 0, 0, 1], Some(0x81)),
            (V5, &[0, 1, b'a', 0, 1, 2, 0x01, 1], None),
            (V5, &[0, 1, b'a', 0, 1, 2, 0x01, 2], Some(0x82)),
            (V5, &[0, 1, b'a', 0, 1, 4, 0x01, 0, 0x01, 0], Some(0x82)),
            (V5, &[0, 1, b'a', 0, 1, 3, 0x23, 0, 1], Some(0x94)),
            (
                V5,
                &[0, 1, b'a', 0, 1, 6, 0x23, 0, 1, 0x23, 0, 1],
                Some(0x82),
            ),
            (V5, &[0, 1, b'a', 0, 1, 2, 0x0b, 1], Some(0x82)),
            (V5, &[0, 1, b'a', 0, 1, 2, 0x21, 1], Some(0x82)), // CONNECT-only
            (V5, &[0, 1, b'a', 0, 1, 2, 0x7f, 1], Some(0x81)), // unknown
            (V5, &[0, 1, b'a', 0, 1, 5, 0x02, 0], Some(0x81)), // runs past the frame
            (V5, &[0, 1, b'a', 0, 1, 3, 0x02, 0, 0], Some(0x81)), // runs past its section
            (V5, &[0, 1, b'a', 0, 1, 2, 0x08, 0], Some(0x81)), // truncated string
        ];
        for (i, (version, body, code)) in cases.iter().enumerate() {
            assert_eq!(
                packet(*version, 0x32, body).err().map(Violation::code),
                *code,
                "case {i}: {body:?}"
            );
        }
    }

    #[test]
    fn property_bounds() {
        let user = [0x26, 0, 1, b'k', 0, 1, b'v'];
        let mut props = vec![];
        for n in 1..=3 {
            props.extend_from_slice(&user);
            let mut body = vec![0, 1, b'a', 0, 1, props.len() as u8];
            body.extend_from_slice(&props);
            let result = packet(Version::V5, 0x32, &body);
            assert_eq!(result.is_ok(), n <= 2, "{n} user properties");
        }
        let mut body = vec![0, 1, b'a', 0, 1, 66, 0x03, 0, 63];
        body.extend_from_slice(&[b'x'; 63]);
        assert_eq!(
            packet(Version::V5, 0x32, &body),
            Err(Violation::OverLimit("property bytes"))
        );
    }

    #[test]
    fn subscribe_rules() {
        use Version::*;
        let cases: &[(Version, &[u8], Option<u8>)] = &[
            (V311, &[0, 1, 0, 1, b'a', 2], None),
            (V311, &[0, 1, 0, 1, b'a', 3], Some(0x82)),
            (V311, &[0, 1, 0, 1, b'a', 0x41], Some(0x81)),
            (V311, &[0, 1], Some(0x82)), // no filter
            (V311, &[0, 0, 0, 1, b'a', 1], Some(0x82)),
            (V5, &[0, 1, 0, 0, 1, b'a', 0x2d], None),
            (V5, &[0, 1, 0, 0, 1, b'a', 0x41], Some(0x81)),
            (V5, &[0, 1, 0, 0, 1, b'a', 0x31], Some(0x82)),
            (V5, &[0, 1, 2, 0x0b, 1, 0, 1, b'a', 1], None),
            (V5, &[0, 1, 2, 0x0b, 0, 0, 1, b'a', 1], Some(0x82)),
            (V5, &[0, 1, 4, 0x0b, 1, 0x0b, 2, 0, 1, b'a', 1], Some(0x82)),
            (V5, &[0, 1, 0, 0, 0, 1], Some(0x82)), // empty filter
            (V5, &[0, 1, 0, 0, 1, b'a'], Some(0x81)), // options missing
        ];
        for (i, (version, body, code)) in cases.iter().enumerate() {
            assert_eq!(
                packet(*version, 0x82, body).err().map(Violation::code),
                *code,
                "case {i}: {body:?}"
            );
        }
    }

    #[test]
    fn acknowledgements_and_disconnects() {
        use Version::*;
        let cases: &[(Version, u8, &[u8], Option<u8>)] = &[
            (V311, 0x40, &[0, 1], None),
            (V311, 0x40, &[0, 1, 0], Some(0x81)),
            (V311, 0x40, &[0, 0], Some(0x82)),
            (V5, 0x40, &[0, 1], None),
            (V5, 0x40, &[0, 1, 0x10], None),
            (V5, 0x62, &[0, 1, 0x92, 0], None),
            (V5, 0x62, &[0, 1, 0, 3, 0x1f, 0, 0], None),
            (V5, 0x62, &[0, 1, 0, 2, 0x01, 0], Some(0x82)),
            (V5, 0xe0, &[], None),
            (V5, 0xe0, &[0x00], None), // reason code, no property length
            (V5, 0xe0, &[0x04, 0], None),
            (V5, 0xe0, &[0x00, 5, 0x11, 0, 0, 0, 1], None),
            (V5, 0xe0, &[0x00, 0, 0], Some(0x81)),
            (V5, 0xe0, &[0x8c], Some(0x82)),
            (V311, 0xe0, &[0], Some(0x81)),
            (V311, 0xc0, &[0], Some(0x81)),
        ];
        for (i, (version, first, body, code)) in cases.iter().enumerate() {
            assert_eq!(
                packet(*version, *first, body).err().map(Violation::code),
                *code,
                "case {i}: {first:#04x} {body:?}"
            );
        }
    }

    #[test]
    fn connect_rules() {
        let ok = Ok(());
        assert_eq!(connect(4, 0x02, &[], &[]), ok);
        assert_eq!(
            connect(4, 0x03, &[], &[]),
            Err(Malformed("reserved connect flag"))
        );
        assert_eq!(
            connect(4, 0x42, &[], &[0, 1, b'p']),
            Err(Malformed("password without user name"))
        );
        assert_eq!(connect(5, 0x42, &[], &[0, 1, b'p']), ok);
        assert_eq!(
            connect(4, 0x0a, &[], &[]),
            Err(Malformed("will QoS or retain"))
        );
        assert_eq!(
            connect(4, 0x22, &[], &[]),
            Err(Malformed("will QoS or retain"))
        );
        assert_eq!(
            connect(4, 0x1e, &[], &[0, 1, b't', 0, 0]),
            Err(Malformed("will QoS or retain"))
        );
        assert_eq!(connect(4, 0x16, &[], &[0, 1, b't', 0, 0]), ok);
        assert_eq!(connect(5, 0x06, &[], &[0, 0, 1, b't', 0, 0]), ok);
        assert_eq!(
            connect(5, 0x06, &[2, 0x01, 2], &[0, 1, b't', 0, 0]).map_err(Violation::code),
            Err(0x82)
        );
        assert_eq!(
            connect(4, 0x02, &[], &[0]),
            Err(Malformed("bytes after the payload"))
        );
        let props: &[(&[u8], Option<u8>)] = &[
            (&[0x11, 0, 0, 0, 1], None),
            (&[0x11, 0, 0, 0, 1, 0x11, 0, 0, 0, 1], Some(0x82)),
            (&[0x21, 0, 0], Some(0x82)),
            (&[0x21, 0, 1, 0x21, 0, 1], Some(0x82)),
            (&[0x27, 0, 0, 0, 0], Some(0x82)),
            (&[0x17, 1, 0x19, 1], None),
            (&[0x17, 2], Some(0x82)),
            (&[0x19, 2], Some(0x82)),
            (&[0x15, 0, 1, b'x'], Some(0x8c)),
            (&[0x16, 0, 1, b'x'], Some(0x82)),
            (&[0x23, 0, 1], Some(0x82)),
            (&[0x7f], Some(0x81)),
        ];
        for (p, code) in props {
            assert_eq!(
                connect(5, 0x02, p, &[]).err().map(Violation::code),
                *code,
                "{p:?}"
            );
        }
        let mut long = vec![0, 4, b'M', b'Q', b'T', b'T', 4, 2, 0, 30, 1, 1];
        long.extend_from_slice(&[b'c'; 257]);
        let mut f = vec![
            0x10,
            (long.len() % 128) as u8 | 0x80,
            (long.len() / 128) as u8,
        ];
        f.extend_from_slice(&long);
        assert_eq!(
            check_connect(&f, 3, Version::V311, &LIMITS),
            Err(Violation::ClientId)
        );
        let mut bad_flags = frame(
            0x10,
            &[0, 4, b'M', b'Q', b'T', b'T', 4, 2, 0, 30, 0, 1, b'c'],
        );
        assert_eq!(check_connect(&bad_flags, 2, Version::V311, &LIMITS), ok);
        bad_flags[0] = 0x12;
        assert!(check_connect(&bad_flags, 2, Version::V311, &LIMITS).is_err());
    }
}

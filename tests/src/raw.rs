//! Raw MQTT over real sockets, for what a client library would not send: bytes out, whole
//! frames in, and builders of the packets tests need (CONNECT with every knob, PUBLISH,
//! SUBSCRIBE).

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::{tls_config, Platform, WAIT};

pub trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

/// What the server sent, or that it closed the connection.
#[derive(Debug, PartialEq, Eq)]
pub enum Got {
    Packet(u8, Vec<u8>),
    Closed,
}

/// A raw MQTT connection: bytes out, whole frames in.
pub struct Raw {
    io: Box<dyn Stream>,
    buf: Vec<u8>,
}

impl Raw {
    /// A plain TCP connection to `addr`.
    pub async fn tcp(addr: std::net::SocketAddr) -> Raw {
        let io = TcpStream::connect(addr).await.unwrap();
        Raw {
            io: Box::new(io),
            buf: Vec::new(),
        }
    }

    pub async fn service(p: &Platform) -> Raw {
        Raw::tcp(p.app().service_addr()).await
    }

    pub async fn device(p: &Platform, cert: &crate::DeviceCert) -> Raw {
        let tcp = TcpStream::connect(p.app().mqtts_addr()).await.unwrap();
        let connector =
            tokio_rustls::TlsConnector::from(tls_config(&p.server_ca_pem(), Some(cert)));
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        let tls = connector.connect(name, tcp).await.unwrap();
        Raw {
            io: Box::new(tls),
            buf: Vec::new(),
        }
    }

    /// Device `client_id`'s persistent MQTT 3.1.1 session (CleanSession 0), connected again
    /// until the CONNACK says the broker kept it (session present): the session the last
    /// connection left may take a moment to end.
    pub async fn resume_device(p: &Platform, cert: &crate::DeviceCert, client_id: &str) -> Raw {
        let persistent = Connect {
            flags: 0,
            ..Connect::v311(client_id)
        };
        crate::eventually("reconnected with the session", || async {
            let mut raw = Raw::device(p, cert).await;
            raw.send(&persistent.bytes()).await;
            match raw.next().await {
                Got::Packet(0x20, body) if body == [1, 0] => Some(raw),
                _ => None,
            }
        })
        .await
    }

    pub async fn send(&mut self, bytes: &[u8]) {
        // The server may already have closed; what it answered is what the test checks.
        let _ = self.io.write_all(bytes).await;
        let _ = self.io.flush().await;
    }

    /// Closes the sending half of the connection (the server reads the end of the stream).
    pub async fn shutdown(&mut self) {
        let _ = self.io.shutdown().await;
    }

    /// The next frame from the server, or `Closed`; panics if nothing happens within WAIT.
    pub async fn next(&mut self) -> Got {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            if let Some((first, header, len)) = fixed_header(&self.buf) {
                if self.buf.len() >= header + len {
                    let body = self.buf[header..header + len].to_vec();
                    self.buf.drain(..header + len);
                    return Got::Packet(first, body);
                }
            }
            let mut chunk = [0u8; 4096];
            match tokio::time::timeout_at(deadline, self.io.read(&mut chunk)).await {
                Err(_) => panic!("the server neither answered nor closed within {WAIT:?}"),
                Ok(Ok(0)) | Ok(Err(_)) => return Got::Closed,
                Ok(Ok(n)) => self.buf.extend_from_slice(&chunk[..n]),
            }
        }
    }

    /// The next frame, which must be of `packet_type`; returns its first byte and body.
    pub async fn expect(&mut self, packet_type: u8) -> (u8, Vec<u8>) {
        match self.next().await {
            Got::Packet(first, body) if first >> 4 == packet_type => (first, body),
            other => panic!("expected packet type {packet_type}, got {other:?}"),
        }
    }

    /// MQTT 3.1.1: the server must close the connection without answering anything.
    pub async fn expect_closed(&mut self, what: &str) {
        match self.next().await {
            Got::Closed => {}
            Got::Packet(first, body) => {
                panic!("{what}: expected the connection to close, got {first:#04x} {body:02x?}")
            }
        }
    }

    /// MQTT 5: the server must send DISCONNECT with `reason` and close.
    pub async fn expect_disconnect(&mut self, reason: u8, what: &str) {
        match self.next().await {
            Got::Packet(0xe0, body) => {
                assert_eq!(
                    body.first().copied(),
                    Some(reason),
                    "{what}: DISCONNECT reason {body:02x?}"
                );
                assert_eq!(self.next().await, Got::Closed, "{what}: still open");
            }
            other => panic!("{what}: expected DISCONNECT {reason:#04x}, got {other:?}"),
        }
    }

    /// CONNECT and a successful CONNACK.
    pub async fn connect(&mut self, connect: &[u8]) {
        self.send(connect).await;
        let (_, body) = self.expect(2).await;
        assert_eq!(body[1], 0, "CONNACK refused: {body:02x?}");
    }

    /// The session still works: PINGREQ gets PINGRESP.
    pub async fn ping(&mut self) {
        self.send(&[0xc0, 0]).await;
        self.expect(13).await;
    }
}

pub fn fixed_header(buf: &[u8]) -> Option<(u8, usize, usize)> {
    let first = *buf.first()?;
    let mut len = 0usize;
    for i in 0..4 {
        let b = *buf.get(1 + i)?;
        len |= ((b & 0x7f) as usize) << (7 * i);
        if b & 0x80 == 0 {
            return Some((first, 2 + i, len));
        }
    }
    panic!("server sent a malformed remaining length")
}

pub fn varint(mut n: usize, out: &mut Vec<u8>) {
    loop {
        let mut b = (n % 128) as u8;
        n /= 128;
        if n > 0 {
            b |= 0x80;
        }
        out.push(b);
        if n == 0 {
            return;
        }
    }
}

pub fn frame(first: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![first];
    varint(body.len(), &mut out);
    out.extend_from_slice(body);
    out
}

pub fn string(s: &[u8], out: &mut Vec<u8>) {
    out.extend_from_slice(&(s.len() as u16).to_be_bytes());
    out.extend_from_slice(s);
}

pub fn props(p: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    varint(p.len(), &mut out);
    out.extend_from_slice(p);
    out
}

/// A CONNECT with every knob the tests turn.
pub struct Connect<'a> {
    pub first: u8,
    pub level: u8,
    pub flags: u8,
    pub client_id: &'a [u8],
    pub props: Vec<u8>,
    pub will: Option<(&'a [u8], &'a [u8])>,
    pub user: Option<&'a [u8]>,
    pub password: Option<&'a [u8]>,
}

impl<'a> Connect<'a> {
    pub fn v311(client_id: &'a str) -> Self {
        Connect {
            first: 0x10,
            level: 4,
            flags: 0x02,
            client_id: client_id.as_bytes(),
            props: Vec::new(),
            will: None,
            user: None,
            password: None,
        }
    }

    pub fn v5(client_id: &'a str) -> Self {
        Connect {
            level: 5,
            ..Connect::v311(client_id)
        }
    }

    /// Logs in on the service listener with the admin API key.
    pub fn service(mut self, key: &'a str) -> Self {
        self.user = Some(b"service");
        self.password = Some(key.as_bytes());
        self
    }

    pub fn bytes(&self) -> Vec<u8> {
        let mut body = Vec::new();
        string(b"MQTT", &mut body);
        body.push(self.level);
        let mut flags = self.flags;
        if self.will.is_some() {
            flags |= 0x04;
        }
        if self.user.is_some() {
            flags |= 0x80;
        }
        if self.password.is_some() {
            flags |= 0x40;
        }
        body.push(flags);
        body.extend_from_slice(&30u16.to_be_bytes());
        if self.level == 5 {
            body.extend_from_slice(&props(&self.props));
        }
        string(self.client_id, &mut body);
        if let Some((topic, payload)) = self.will {
            if self.level == 5 {
                body.push(0);
            }
            string(topic, &mut body);
            string(payload, &mut body);
        }
        if let Some(u) = self.user {
            string(u, &mut body);
        }
        if let Some(pw) = self.password {
            string(pw, &mut body);
        }
        frame(self.first, &body)
    }
}

/// A PUBLISH (MQTT 5 when `v5_props` is given).
pub fn publish(
    first: u8,
    topic: &[u8],
    pkid: Option<u16>,
    v5_props: Option<&[u8]>,
    payload: &[u8],
) -> Vec<u8> {
    let mut body = Vec::new();
    string(topic, &mut body);
    if let Some(id) = pkid {
        body.extend_from_slice(&id.to_be_bytes());
    }
    if let Some(p) = v5_props {
        body.extend_from_slice(&props(p));
    }
    body.extend_from_slice(payload);
    frame(first, &body)
}

/// A SUBSCRIBE of one filter with `options` (MQTT 5 when `v5` is true).
pub fn subscribe(first: u8, filter: &str, options: u8, v5: bool) -> Vec<u8> {
    let mut body = vec![0, 1];
    if v5 {
        body.push(0);
    }
    string(filter.as_bytes(), &mut body);
    body.push(options);
    frame(first, &body)
}

//! Helpers shared by the integration tests: unique ids, an observer client on Mosquitto, a TCP
//! proxy that can cut connections, and a minimal MQTT broker behind mutual TLS.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Once};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use device_client::fleet_wire::{DeviceId, Topic};
use device_client::BrokerUrl;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

pub const MOSQUITTO: &str = "127.0.0.1:1883";
pub const WAIT: Duration = Duration::from_secs(10);

/// Logs to stderr only when `TEST_LOG` is set.
pub fn init_logging() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        if std::env::var_os("TEST_LOG").is_some() {
            tracing_subscriber::fmt()
                .with_writer(std::io::stderr)
                .with_env_filter(
                    tracing_subscriber::EnvFilter::try_from_default_env()
                        .unwrap_or_else(|_| "debug".into()),
                )
                .init();
        }
    });
}

pub fn unique_id(prefix: &str) -> DeviceId {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    DeviceId::parse(&format!("{prefix}-{}-{nanos}", std::process::id())).unwrap()
}

/// The local Mosquitto, or `None` (after printing why) when nothing listens there.
pub async fn mosquitto() -> Option<BrokerUrl> {
    init_logging();
    match tokio::time::timeout(Duration::from_secs(2), TcpStream::connect(MOSQUITTO)).await {
        Ok(Ok(_)) => Some(format!("mqtt://{MOSQUITTO}").parse().unwrap()),
        _ => {
            println!("skipped: no mosquitto on {MOSQUITTO}");
            None
        }
    }
}

/// A second, plain rumqttc client: subscribes to topics and publishes test input.
pub struct Observer {
    client: AsyncClient,
    rx: mpsc::UnboundedReceiver<(Topic, Vec<u8>)>,
    task: JoinHandle<()>,
}

impl Observer {
    pub async fn connect(topics: &[Topic]) -> Observer {
        let id = unique_id("observer");
        let (host, port) = MOSQUITTO.split_once(':').unwrap();
        let opts = MqttOptions::new(id.as_str(), host, port.parse().unwrap());
        let (client, mut event_loop) = AsyncClient::new(opts, 64);
        for t in topics {
            client
                .subscribe(t.to_string(), QoS::AtLeastOnce)
                .await
                .unwrap();
        }
        let (tx, rx) = mpsc::unbounded_channel();
        let (ready_tx, mut ready_rx) = mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            loop {
                match event_loop.poll().await {
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        let _ = ready_tx.send(());
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        if let Ok(topic) = Topic::parse(&p.topic) {
                            let _ = tx.send((topic, p.payload.to_vec()));
                        }
                    }
                    Ok(_) => {}
                    Err(e) => {
                        eprintln!("observer: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
        });
        for _ in topics {
            tokio::time::timeout(WAIT, ready_rx.recv())
                .await
                .expect("observer subscribed")
                .unwrap();
        }
        Observer { client, rx, task }
    }

    pub async fn publish(&self, topic: &Topic, payload: Vec<u8>, retain: bool) {
        self.client
            .publish(topic.to_string(), QoS::AtLeastOnce, retain, payload)
            .await
            .unwrap();
    }

    /// The first message for which `f` returns `Some`, skipping the others.
    pub async fn expect<T>(
        &mut self,
        what: &str,
        mut f: impl FnMut(&Topic, &[u8]) -> Option<T>,
    ) -> T {
        let wait = async {
            while let Some((topic, payload)) = self.rx.recv().await {
                if let Some(v) = f(&topic, &payload) {
                    return v;
                }
            }
            panic!("observer stopped");
        };
        tokio::time::timeout(WAIT, wait)
            .await
            .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
    }
}

impl Drop for Observer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A TCP proxy in front of Mosquitto that can drop every connection and refuse new ones.
pub struct Proxy {
    pub addr: SocketAddr,
    up: Arc<AtomicBool>,
    conns: Arc<Mutex<Vec<JoinHandle<()>>>>,
    task: JoinHandle<()>,
}

impl Proxy {
    pub async fn start() -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let up = Arc::new(AtomicBool::new(true));
        let conns: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let task = tokio::spawn({
            let up = up.clone();
            let conns = conns.clone();
            async move {
                loop {
                    let Ok((mut inbound, _)) = listener.accept().await else {
                        return;
                    };
                    if !up.load(Ordering::SeqCst) {
                        drop(inbound);
                        continue;
                    }
                    let conn = tokio::spawn(async move {
                        if let Ok(mut outbound) = TcpStream::connect(MOSQUITTO).await {
                            let _ =
                                tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                        }
                    });
                    conns.lock().unwrap().push(conn);
                }
            }
        });
        Proxy {
            addr,
            up,
            conns,
            task,
        }
    }

    pub fn url(&self) -> BrokerUrl {
        format!("mqtt://{}", self.addr).parse().unwrap()
    }

    /// Drops every open connection and refuses new ones until [`Proxy::restore`].
    pub fn cut(&self) {
        self.up.store(false, Ordering::SeqCst);
        for conn in self.conns.lock().unwrap().drain(..) {
            conn.abort();
        }
    }

    pub fn restore(&self) {
        self.up.store(true, Ordering::SeqCst);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.cut();
        self.task.abort();
    }
}

// ---------------------------------------------------------------------------------------------
// A minimal MQTT 3.1.1 broker for one connection: enough to answer CONNECT, SUBSCRIBE,
// PUBLISH (QoS 1), PINGREQ and to record what the client sent.

/// One packet as the fake broker saw it.
#[derive(Debug, Clone, PartialEq)]
pub enum Seen {
    Handshake {
        peer_cn: Option<String>,
    },
    HandshakeFailed(String),
    Connect {
        client_id: String,
    },
    Subscribe {
        filters: Vec<String>,
    },
    Publish {
        topic: String,
        payload: Vec<u8>,
        retain: bool,
    },
    Disconnect,
    Other(u8),
}

/// How the fake broker answers the CONNECT.
#[derive(Debug, Clone, Copy)]
pub struct FakeBrokerConfig {
    pub connack_code: u8,
}

/// Serves MQTT on `stream` until the client disconnects, sending each packet to `seen`.
pub async fn serve_mqtt<S>(
    mut stream: S,
    config: FakeBrokerConfig,
    seen: mpsc::UnboundedSender<Seen>,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    while let Some((header, body)) = read_packet(&mut stream).await {
        let kind = header >> 4;
        match kind {
            1 => {
                // Protocol name, level, flags, keepalive, then the client id.
                let name_len = u16::from_be_bytes([body[0], body[1]]) as usize;
                let at = 2 + name_len + 4;
                let id_len = u16::from_be_bytes([body[at], body[at + 1]]) as usize;
                let client_id =
                    String::from_utf8_lossy(&body[at + 2..at + 2 + id_len]).into_owned();
                let _ = seen.send(Seen::Connect { client_id });
                if stream
                    .write_all(&[0x20, 2, 0, config.connack_code])
                    .await
                    .is_err()
                    || config.connack_code != 0
                {
                    let _ = stream.shutdown().await;
                    return;
                }
            }
            3 => {
                let topic_len = u16::from_be_bytes([body[0], body[1]]) as usize;
                let topic = String::from_utf8_lossy(&body[2..2 + topic_len]).into_owned();
                let qos = (header >> 1) & 3;
                let mut at = 2 + topic_len;
                if qos > 0 {
                    let ack = [0x40, 2, body[at], body[at + 1]];
                    at += 2;
                    let _ = stream.write_all(&ack).await;
                }
                let _ = seen.send(Seen::Publish {
                    topic,
                    payload: body[at..].to_vec(),
                    retain: header & 1 == 1,
                });
            }
            8 => {
                let mut filters = Vec::new();
                let mut at = 2;
                while at < body.len() {
                    let len = u16::from_be_bytes([body[at], body[at + 1]]) as usize;
                    filters.push(String::from_utf8_lossy(&body[at + 2..at + 2 + len]).into_owned());
                    at += 2 + len + 1;
                }
                let mut ack = vec![0x90, 2 + filters.len() as u8, body[0], body[1]];
                ack.extend(std::iter::repeat_n(1u8, filters.len()));
                let _ = stream.write_all(&ack).await;
                let _ = seen.send(Seen::Subscribe { filters });
            }
            12 => {
                let _ = stream.write_all(&[0xD0, 0]).await;
            }
            14 => {
                let _ = seen.send(Seen::Disconnect);
                return;
            }
            other => {
                let _ = seen.send(Seen::Other(other));
            }
        }
        let _ = stream.flush().await;
    }
}

async fn read_packet<S: tokio::io::AsyncRead + Unpin>(stream: &mut S) -> Option<(u8, Vec<u8>)> {
    let header = stream.read_u8().await.ok()?;
    let mut len = 0usize;
    for shift in (0..28).step_by(7) {
        let b = stream.read_u8().await.ok()?;
        len |= ((b & 0x7f) as usize) << shift;
        if b & 0x80 == 0 {
            break;
        }
    }
    let mut body = vec![0; len];
    stream.read_exact(&mut body).await.ok()?;
    Some((header, body))
}

// ---------------------------------------------------------------------------------------------
// The fake broker behind mutual TLS, with its own server CA and device CA.

pub struct FakeTlsBroker {
    pub addr: SocketAddr,
    pub server_ca: device_client::pki::Ca,
    pub device_ca: device_client::pki::Ca,
    pub seen: mpsc::UnboundedReceiver<Seen>,
    task: JoinHandle<()>,
}

impl FakeTlsBroker {
    /// Listens on 127.0.0.1:0 with a certificate for `127.0.0.1`, requiring client
    /// certificates signed by `device_ca`. Each handshake is reported as
    /// `Seen::Handshake`, each failed one as `Seen::HandshakeFailed`.
    pub async fn start(config: FakeBrokerConfig) -> FakeTlsBroker {
        use device_client::pki::{Ca, CaOptions};
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};

        init_logging();
        let server_ca = Ca::generate(&CaOptions {
            common_name: "Test Broker CA".into(),
            ..CaOptions::default()
        })
        .unwrap();
        let device_ca = Ca::generate(&CaOptions::default()).unwrap();
        let server = server_ca.issue_server(&["127.0.0.1".into()], 1).unwrap();

        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(CertificateDer::from_pem_slice(device_ca.cert_pem().as_bytes()).unwrap())
            .unwrap();
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            Arc::new(roots),
            provider.clone(),
        )
        .build()
        .unwrap();
        let tls = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_client_cert_verifier(verifier)
            .with_single_cert(
                vec![CertificateDer::from_pem_slice(server.cert_pem.as_bytes()).unwrap()],
                PrivateKeyDer::from_pem_slice(server.key_pem.as_bytes()).unwrap(),
            )
            .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));

        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, seen) = mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let acceptor = acceptor.clone();
                let tx = tx.clone();
                tokio::spawn(async move {
                    match acceptor.accept(tcp).await {
                        Ok(stream) => {
                            let peer_cn = stream
                                .get_ref()
                                .1
                                .peer_certificates()
                                .and_then(|c| c.first())
                                .and_then(|der| common_name(der));
                            let _ = tx.send(Seen::Handshake { peer_cn });
                            serve_mqtt(stream, config, tx).await;
                        }
                        Err(e) => {
                            let _ = tx.send(Seen::HandshakeFailed(e.to_string()));
                        }
                    }
                });
            }
        });
        FakeTlsBroker {
            addr,
            server_ca,
            device_ca,
            seen,
            task,
        }
    }

    pub fn url(&self) -> BrokerUrl {
        format!("mqtts://{}", self.addr).parse().unwrap()
    }

    pub fn device(&self, id: &DeviceId) -> device_client::pki::CertifiedKeyPem {
        self.device_ca
            .issue_device(&device_client::pki::DeviceCertOptions::new(id.clone()))
            .unwrap()
    }

    /// The next packet for which `f` returns `Some`, skipping the others.
    pub async fn expect<T>(&mut self, what: &str, mut f: impl FnMut(&Seen) -> Option<T>) -> T {
        let wait = async {
            while let Some(seen) = self.seen.recv().await {
                if let Some(v) = f(&seen) {
                    return v;
                }
            }
            panic!("fake broker stopped");
        };
        tokio::time::timeout(WAIT, wait)
            .await
            .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
    }
}

impl Drop for FakeTlsBroker {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn common_name(der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let cn = cert
        .subject()
        .iter_common_name()
        .next()?
        .as_str()
        .ok()?
        .to_owned();
    Some(cn)
}

/// A directory under the system temp dir, removed on drop.
pub struct TempDir(pub std::path::PathBuf);

impl TempDir {
    pub fn new(prefix: &str) -> TempDir {
        let dir = std::env::temp_dir().join(unique_id(prefix).as_str());
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    pub fn path(&self, name: &str) -> std::path::PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

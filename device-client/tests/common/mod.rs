//! Helpers shared by the integration tests: unique ids, an observer client on Mosquitto, a TCP
//! proxy that can cut connections, temporary directories.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Once};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use device_client::fleet_wire::{DeviceId, Topic};
use device_client::BrokerUrl;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
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

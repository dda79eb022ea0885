//! Listeners. Each accepted socket gets its own task: the TLS handshake runs there with a
//! timeout, so one silent client never stalls another's connect.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;
use tokio_util::task::TaskTracker;
use tracing::{debug, error, info, warn};

use crate::admission::Admission;
use crate::auth::ServiceAuth;
use crate::bus::EventBus;
use crate::control::BrokerControl;
use crate::local::Local;
use crate::metrics::Rejection;
use crate::router::{RouterHandle, RouterSettings, SystemPublisher};
use crate::session::{self, Ctx, SessionSettings};
use crate::tls::{self, ServerIdentity};

/// Broker settings. Every field has a default; see `config/fleet.toml`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BrokerConfig {
    /// A TLS handshake that takes longer is dropped.
    pub handshake_timeout_ms: u64,
    /// Connections the node holds at most (devices and services); beyond it a client is
    /// answered CONNACK "quota exceeded" (MQTT 5) or "server unavailable" (3.1.1). 0: what the
    /// open-file limit allows, less the files the process keeps for itself.
    pub max_connections: usize,
    /// New connections per second on average (a token bucket; 0: no limit), with bursts of
    /// `connect_burst`. Beyond it a client is answered CONNACK "server busy" (MQTT 5) or
    /// "server unavailable" (3.1.1) and retries after its backoff, so a restart's reconnect
    /// storm cannot flood the database with first connections.
    pub connect_rate_per_s: f64,
    pub connect_burst: f64,
    /// TLS handshakes doing their work at once. A connect storm waits for a turn here (and in
    /// the listen backlog) instead of in the runtime's run queue, where every connected
    /// session's next packet would wait behind thousands of handshakes. A handshake gives its
    /// turn up after [`HANDSHAKE_TURN`] even if unfinished (a slow or silent client holds none).
    pub max_concurrent_handshakes: usize,
    /// A client that sends no CONNECT within this time after the handshake is dropped.
    pub connect_timeout_ms: u64,
    /// Largest MQTT packet accepted, bytes, fixed header included (MQTT 5 Maximum Packet Size).
    pub max_packet_size: usize,
    /// Receive Maximum: inbound QoS 1 publishes not yet acknowledged plus QoS 2 ones not yet
    /// released a client may have. Advertised to MQTT 5 clients, who are disconnected (0x93)
    /// beyond it; a session of either version stops reading while this many packets wait for
    /// an answer. (`max_pending_acks` is its former name.)
    #[serde(alias = "max_pending_acks")]
    pub receive_maximum: u16,
    /// User properties one MQTT 5 packet may carry (a CONNECT's and its will's together).
    pub max_user_properties: usize,
    /// Bytes of MQTT 5 properties one packet may carry.
    pub max_property_bytes: usize,
    /// Topic filters one connection may hold; a SUBSCRIBE beyond is refused per filter.
    pub max_subscriptions: usize,
    /// Messages addressed to one device (its commands, its assignment) queued for it while it
    /// is away with a persistent session or reads slowly; beyond, new ones are dropped and
    /// counted (`inbox_dropped`).
    pub max_queued_messages: usize,
    /// Bytes (topics and payloads) queued for one device, the same way.
    pub max_queued_bytes: usize,
    /// How long a new connection waits for the session it takes over to finish.
    pub takeover_wait_ms: u64,
    /// Longest a disconnected persistent session is kept, seconds (MQTT 3.1.1 sessions have
    /// no expiry of their own; an MQTT 5 Session Expiry Interval is capped by this).
    pub max_session_expiry_secs: u64,
    /// Longest keep alive a client may ask for, seconds. One that asks for more, or for none
    /// (0), gets this: told in CONNACK's Server Keep Alive (MQTT 5), and held to it on MQTT
    /// 3.1.1 too (silent for 1.5 times this, it is disconnected), so a connection whose peer
    /// vanished is found and its presence ends. 0: no bound (keepalive 0 means no timeout).
    pub max_keep_alive_secs: u16,
    /// How long a presence event may wait for the event bus before the connect is refused.
    pub bus_timeout_ms: u64,
    /// How long shutdown waits for sessions to publish their disconnects.
    pub shutdown_grace_ms: u64,
    pub router: RouterSettings,
    pub conformance: ConformanceConfig,
}

/// The conformance listener (off unless the platform is given an address for it): anonymous
/// MQTT over plain TCP on a loopback address, for running conformance suites through the
/// broker's own session code. Its clients may use any topic outside `devices/` and `cohorts/`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ConformanceConfig {
    /// Topic filters refused with the failure return code (0x80), so that a suite can exercise
    /// a refused subscription. The Eclipse Paho interoperability suite uses `test/nosubscribe`.
    pub refused_filters: Vec<String>,
}

impl Default for ConformanceConfig {
    fn default() -> Self {
        Self {
            refused_filters: vec!["test/nosubscribe".into()],
        }
    }
}

impl Default for BrokerConfig {
    fn default() -> Self {
        Self {
            handshake_timeout_ms: 10_000,
            max_connections: 0,
            connect_rate_per_s: 1000.0,
            connect_burst: 2000.0,
            max_concurrent_handshakes: 32,
            connect_timeout_ms: 10_000,
            max_packet_size: 256 * 1024,
            receive_maximum: 64,
            max_user_properties: 32,
            max_property_bytes: 8 * 1024,
            max_subscriptions: 1_000,
            max_queued_messages: 1_000,
            max_queued_bytes: 1024 * 1024,
            takeover_wait_ms: 5_000,
            max_session_expiry_secs: 7 * 24 * 3600,
            max_keep_alive_secs: 1200,
            bus_timeout_ms: 10_000,
            shutdown_grace_ms: 10_000,
            router: RouterSettings::default(),
            conformance: ConformanceConfig::default(),
        }
    }
}

/// Longest a handshake keeps its turn among [`BrokerConfig::max_concurrent_handshakes`]: far
/// more than the CPU a handshake needs, and short enough that clients who stall mid-handshake
/// cannot hold every turn for long.
pub const HANDSHAKE_TURN: Duration = Duration::from_millis(250);

#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
    #[error("router: {0}")]
    Router(#[from] crate::router::RouterError),
}

/// The broker, ready to serve on listeners the caller bound.
pub struct Broker {
    ctx: Arc<Ctx>,
    shutdown_tx: watch::Sender<bool>,
    device_tls: TlsAcceptor,
    handshake_timeout: Duration,
    handshake_turns: Arc<tokio::sync::Semaphore>,
    grace: Duration,
    conformance: Option<(TcpListener, crate::acl::ConformanceRights)>,
    refused_filters: Arc<[String]>,
}

impl Broker {
    pub fn new(
        config: &BrokerConfig,
        identity: ServerIdentity,
        control: BrokerControl,
        bus: Arc<dyn EventBus>,
        auth: Arc<dyn ServiceAuth>,
    ) -> Result<Self, BrokerError> {
        let device_tls = TlsAcceptor::from(tls::device_server_config(
            identity,
            control.registry.clone(),
        )?);
        let router = RouterHandle::spawn(&config.router);
        let local = Arc::new(Local::new(
            config.max_queued_messages,
            config.max_queued_bytes,
        ));
        let system = SystemPublisher::start(&router, local.clone())?;
        // A control serves one broker; a second `Broker::new` on it keeps the first link.
        let _ = control.node.set(crate::control::Node {
            system: system.clone(),
            router: router.clone(),
            local: local.clone(),
        });
        let (shutdown_tx, shutdown) = watch::channel(false);
        let admission = Admission::new(
            config.max_connections,
            config.connect_rate_per_s,
            config.connect_burst,
        );
        info!(
            max_connections = admission.max_connections(),
            connect_rate_per_s = config.connect_rate_per_s,
            connect_burst = config.connect_burst,
            "connection budgets"
        );
        let ctx = Arc::new(Ctx {
            admission,
            router,
            system,
            local,
            control,
            bus,
            auth,
            settings: SessionSettings {
                connect_timeout: Duration::from_millis(config.connect_timeout_ms),
                max_packet_size: config.max_packet_size,
                receive_maximum: config.receive_maximum.max(1) as usize,
                limits: crate::mqtt::Limits {
                    max_user_properties: config.max_user_properties,
                    max_property_bytes: config.max_property_bytes,
                },
                max_subscriptions: config.max_subscriptions,
                takeover_wait: Duration::from_millis(config.takeover_wait_ms),
                max_session_expiry: Duration::from_secs(config.max_session_expiry_secs),
                max_keep_alive: config.max_keep_alive_secs,
                bus_timeout: Duration::from_millis(config.bus_timeout_ms),
            },
            shutdown,
            service_ids: AtomicU64::new(1),
            connect_gates: dashmap::DashMap::new(),
            unreleased_qos2: dashmap::DashMap::new(),
            linked: dashmap::DashMap::new(),
        });
        Ok(Self {
            ctx,
            shutdown_tx,
            device_tls,
            handshake_timeout: Duration::from_millis(config.handshake_timeout_ms),
            handshake_turns: Arc::new(tokio::sync::Semaphore::new(
                config.max_concurrent_handshakes.max(1),
            )),
            grace: Duration::from_millis(config.shutdown_grace_ms),
            conformance: None,
            refused_filters: config.conformance.refused_filters.clone().into(),
        })
    }

    /// Also serves anonymous clients on `listener`, the conformance listener (see
    /// [`ConformanceConfig`]). The caller makes sure it is a loopback address: anyone who can
    /// reach it may publish and subscribe outside the platform's trees without credentials.
    pub fn with_conformance_listener(mut self, listener: TcpListener) -> Self {
        let rights = crate::acl::ConformanceRights {
            refused_filters: self.refused_filters.clone(),
        };
        warn!(
            addr = ?listener.local_addr().ok(),
            "CONFORMANCE LISTENER ENABLED: anonymous MQTT without TLS on this address, for \
             conformance testing only; never enable it in production"
        );
        self.conformance = Some((listener, rights));
        self
    }

    pub fn control(&self) -> BrokerControl {
        self.ctx.control.clone()
    }

    /// Makes this broker a node of a cluster (see [`crate::cluster`]): what it accepts reaches
    /// the other nodes, what they accept reaches its subscribers, retained messages are the
    /// cluster's. Call before [`Broker::serve`].
    pub async fn join_cluster(
        &self,
        config: crate::cluster::ClusterConfig,
    ) -> Result<crate::cluster::ClusterLink, async_nats::Error> {
        let filters = self.ctx.router.announce_filters();
        crate::cluster::join(
            config,
            self.ctx.control.clone(),
            self.ctx.local.clone(),
            self.ctx.system.clone(),
            filters,
        )
        .await
    }

    /// Serves devices (mTLS), backend services (API key) and, if configured, the conformance
    /// listener until `shutdown` resolves, then
    /// ends every session (reason `server_shutdown`) and waits for them, up to the grace period.
    pub async fn serve(
        mut self,
        devices: TcpListener,
        services: TcpListener,
        shutdown: impl Future<Output = ()>,
    ) {
        let tracker = TaskTracker::new();
        let device_loop = accept_loop(devices, &self.ctx, tracker.clone(), {
            let ctx = self.ctx.clone();
            let acceptor = self.device_tls.clone();
            let timeout = self.handshake_timeout;
            let turns = self.handshake_turns.clone();
            move |stream, peer| {
                let ctx = ctx.clone();
                let acceptor = acceptor.clone();
                let turns = turns.clone();
                async move { device_connection(ctx, acceptor, turns, timeout, stream, peer).await }
            }
        });
        let service_loop = accept_loop(services, &self.ctx, tracker.clone(), {
            let ctx = self.ctx.clone();
            move |stream, peer| session::serve_service(ctx.clone(), stream, peer)
        });
        let conformance_loop = {
            let (ctx, tracker) = (self.ctx.clone(), tracker.clone());
            let conformance = self.conformance.take();
            async move {
                match conformance {
                    Some((listener, rights)) => {
                        let served = ctx.clone();
                        accept_loop(listener, &ctx, tracker, move |stream, peer| {
                            session::serve_conformance(served.clone(), stream, peer, rights.clone())
                        })
                        .await
                    }
                    None => std::future::pending().await,
                }
            }
        };
        tokio::select! {
            _ = device_loop => {}
            _ = service_loop => {}
            _ = conformance_loop => {}
            _ = shutdown => {}
        }
        info!(
            sessions = self.ctx.control.live_sessions(),
            "broker shutting down"
        );
        let _ = self.shutdown_tx.send(true);
        tracker.close();
        if tokio::time::timeout(self.grace, tracker.wait())
            .await
            .is_err()
        {
            warn!("some sessions did not finish within the shutdown grace period");
        }
    }
}

/// Accepts connections and serves each on its own task, counted by the node's
/// [`Admission`] for as long as it lives. A socket beyond what the node may hold is closed at
/// once (counted as `connection_limit`), before any TLS work.
async fn accept_loop<F, Fut>(listener: TcpListener, ctx: &Ctx, tracker: TaskTracker, serve: F)
where
    F: Fn(TcpStream, SocketAddr) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                let Some(held) = ctx.admission.try_hold() else {
                    ctx.control.refused(Rejection::ConnectionLimit, None, peer);
                    drop(stream);
                    continue;
                };
                let _ = stream.set_nodelay(true);
                let served = serve(stream, peer);
                tracker.spawn(async move {
                    served.await;
                    drop(held);
                });
            }
            Err(e) => {
                // Out of file descriptors and the like: back off instead of spinning.
                error!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// The TLS handshake, within `timeout` in all, during a turn among `turns` (see
/// [`BrokerConfig::max_concurrent_handshakes`]).
async fn handshake(
    acceptor: &TlsAcceptor,
    turns: &tokio::sync::Semaphore,
    timeout: Duration,
    stream: TcpStream,
) -> Result<std::io::Result<tokio_rustls::server::TlsStream<TcpStream>>, tokio::time::error::Elapsed>
{
    tokio::time::timeout(timeout, async {
        let turn = turns.acquire().await;
        let accept = acceptor.accept(stream);
        tokio::pin!(accept);
        tokio::select! {
            done = &mut accept => done,
            _ = tokio::time::sleep(HANDSHAKE_TURN) => {
                drop(turn);
                accept.await
            }
        }
    })
    .await
}

async fn device_connection(
    ctx: Arc<Ctx>,
    acceptor: TlsAcceptor,
    turns: Arc<tokio::sync::Semaphore>,
    timeout: Duration,
    stream: TcpStream,
    peer: SocketAddr,
) {
    let tls = match handshake(&acceptor, &turns, timeout, stream).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            let why = tls::classify_handshake_error(&e);
            ctx.control.refused(why, None, peer);
            info!(%peer, reason = why.as_str(), error = %e, "TLS handshake refused");
            return;
        }
        Err(_) => {
            ctx.control.refused(Rejection::TlsHandshake, None, peer);
            debug!(%peer, "TLS handshake timed out");
            return;
        }
    };
    let leaf = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .map(|c| c.as_ref().to_vec());
    let Some(leaf) = leaf else {
        ctx.control.refused(Rejection::BadCertificate, None, peer);
        return;
    };
    // Boxed: the task keeps only the handshake's state and a pointer, and the session's own
    // state is as large as it needs to be (see ARCHITECTURE.md, memory per connection).
    Box::pin(session::serve_device(ctx, tls, peer, leaf)).await;
}

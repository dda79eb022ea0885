//! A fleet simulator and load generator: many devices in one process, each with its own MQTT
//! 5 session (one rumqttc client and event loop per device, small buffers), against any
//! broker: the fleet platform over mutual TLS with certificates minted from a manufacturing
//! CA, or a plain MQTT broker.
//!
//! # Layout
//! - this module: settings ([`SimConfig`], [`Scenario`]), [`run`], the live progress line.
//! - [`hist`]: latency histograms (the `hdrhistogram` crate: bounded memory, < 1 % error), their
//!   percentiles, and the serialized form shards merge from.
//! - `identities`: device ids and certificates, minted in parallel and cached on disk.
//! - [`shard`]: which part of the fleet this process simulates (`--shard K/N`) and which
//!   broker URL each device connects to.
//! - `session`: one device's session: connect, measure CONNACK latency, then disconnect, hold,
//!   or publish; and one round of connects at a given concurrency and rate.
//! - `storm`, `telemetry`, `fanout`: the scenarios; `soak` is `telemetry` while `soak`'s
//!   churn drops devices at random and they reconnect.
//! - `probe`: `telemetry`'s delivery probes after publishing: one message to every device,
//!   then commands to single devices, each timed until it arrived.
//! - [`update`]: the `update` scenario: real agents with real updaters, failures injected at
//!   given rates, following the cohort's deployments (its own report).
//! - `stats`: failure reasons, sequence tracking (loss, duplicates), `/proc/self` readings,
//!   the open-file limit.
//! - [`report`]: the result as a serializable document and a human table.
//! - [`merge`]: the reports of the shards of one run merged into one.
//!
//! Every scenario is bounded by its own count or duration and by
//! [`SimConfig::max_duration`]; it connects only to the addresses it is given.

mod fanout;
pub mod hist;
mod identities;
pub mod merge;
mod probe;
pub mod report;
mod session;
pub mod shard;
mod soak;
mod stats;
mod storm;
mod telemetry;
pub mod update;

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use fleet_wire::{DeviceId, Topic};
use rustls::ClientConfig;
use tokio::time::Instant;

use crate::error::{ConfigError, ConnectError};
use crate::mqtt::{self, MqttClient, MqttLoop, SessionSpec};
use crate::options::Credentials;
use crate::pki::{Ca, KeyAlgorithm, PkiError};
use crate::tls::{SharedTls, TlsConfig};
use crate::url::BrokerUrl;

pub use crate::mqtt::Qos;
pub use report::{
    ChurnReport, ConnectRound, FanoutReport, IdentityReport, IntervalRow, ObserverReport,
    ProbeReport, ProcessReport, Report, TelemetryReport,
};
pub use shard::Shard;
pub use stats::{devices_allowed, raise_open_files_limit};

/// Receives the live progress line, about once per second.
pub type ProgressFn = Arc<dyn Fn(&str) + Send + Sync>;

/// Why a simulation could not run. Failures of individual devices are results, not errors.
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Pki(#[from] PkiError),
    #[error("certificate cache {}: {error}", path.display())]
    Cache {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("the observer could not subscribe: {0}")]
    Observer(String),
    #[error("{0}")]
    Invalid(String),
}

impl From<ConnectError> for SimError {
    fn from(e: ConnectError) -> Self {
        SimError::Observer(e.to_string())
    }
}

/// Where the simulated fleet connects and who its devices are.
#[derive(Clone)]
pub struct SimConfig {
    /// Device `i` (its index in the whole fleet) connects to `urls[i % urls.len()]`; all
    /// `mqtts://` or all `mqtt://`.
    pub urls: Vec<BrokerUrl>,
    /// The part of the fleet this process simulates; the scenario's `devices` is the whole
    /// fleet's.
    pub shard: Shard,
    /// CA certificate(s) (PEM) that signed the broker's certificate; required for `mqtts://`.
    pub server_ca_pem: Option<Vec<u8>>,
    /// Signs one certificate per device (CN = device id); `mqtts://` only. Without it devices
    /// connect without a client certificate.
    pub device_ca: Option<Arc<Ca>>,
    /// Device ids are this prefix and the zero-padded index. Default `sim-`.
    pub id_prefix: String,
    /// Keeps minted certificates for the next run, keyed by CA fingerprint, key algorithm and
    /// device id.
    pub cert_cache: Option<PathBuf>,
    /// The minted devices' keys; default P-256. RSA-2048 is far slower to generate (see
    /// [`crate::pki`]), so cache its certificates for repeated runs.
    pub key_algorithm: KeyAlgorithm,
    pub credentials: Option<Credentials>,
    /// Put before every topic; default empty (topics exactly as in `topics.md`).
    pub topic_prefix: String,
    /// Default 30 s; 0 or at least 1 s.
    pub keep_alive: Duration,
    /// TCP connect, TLS handshake and CONNACK together. Default 10 s, whole seconds.
    pub connect_timeout: Duration,
    /// The whole run, identity minting included, stops after this. Default 300 s.
    pub max_duration: Duration,
    /// Live progress; `None` for none.
    pub progress: Option<ProgressFn>,
}

impl SimConfig {
    pub fn new(url: BrokerUrl) -> Self {
        Self {
            urls: vec![url],
            shard: Shard::WHOLE,
            server_ca_pem: None,
            device_ca: None,
            id_prefix: "sim-".into(),
            cert_cache: None,
            key_algorithm: KeyAlgorithm::EcdsaP256,
            credentials: None,
            topic_prefix: String::new(),
            keep_alive: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(10),
            max_duration: Duration::from_secs(300),
            progress: None,
        }
    }

    fn validate(&self) -> Result<(), SimError> {
        shard::check_urls(&self.urls)?;
        match (self.urls[0].is_tls(), &self.server_ca_pem, &self.device_ca) {
            (true, None, _) => return Err(ConfigError::TlsRequired.into()),
            (false, Some(_), _) | (false, _, Some(_)) => {
                return Err(SimError::Invalid(
                    "a server CA or a device CA needs an mqtts:// URL".into(),
                ))
            }
            _ => {}
        }
        let ka = self.keep_alive;
        if !ka.is_zero() && (ka < Duration::from_secs(1) || ka.as_secs() > u64::from(u16::MAX)) {
            return Err(SimError::Invalid(format!(
                "keep alive must be 0 or between 1 s and 65535 s, got {ka:?}"
            )));
        }
        if self.connect_timeout < Duration::from_secs(1) {
            return Err(SimError::Invalid(
                "connect timeout must be at least 1 s".into(),
            ));
        }
        if self.max_duration.is_zero() {
            return Err(SimError::Invalid("max duration must not be zero".into()));
        }
        if self.topic_prefix.contains(['+', '#', '\0']) {
            return Err(SimError::Invalid(
                "the topic prefix must not contain +, # or NUL".into(),
            ));
        }
        Ok(())
    }
}

/// `connect-storm`: every device connects, at most `concurrency` handshakes at a time and at
/// most `rate` new connections per second, `1 + repeat` times.
#[derive(Debug, Clone)]
pub struct ConnectStorm {
    pub devices: usize,
    pub concurrency: usize,
    /// New connections per second; `None` for as fast as `concurrency` allows.
    pub rate: Option<f64>,
    /// Keep every device connected until all have connected (or failed), then disconnect
    /// them all; otherwise each device disconnects right after its CONNACK.
    pub hold: bool,
    /// Rounds after the first, each reported as its own row.
    pub repeat: u32,
}

impl Default for ConnectStorm {
    fn default() -> Self {
        Self {
            devices: 100,
            concurrency: 100,
            rate: None,
            hold: false,
            repeat: 0,
        }
    }
}

/// `telemetry`: the devices connect, then each publishes `rate` messages per second for
/// `duration`, and an optional observer measures delivery.
#[derive(Debug, Clone)]
pub struct TelemetryLoad {
    pub devices: usize,
    /// Connection attempts at a time while the devices connect.
    pub concurrency: usize,
    /// Messages per second per device.
    pub rate: f64,
    pub qos: Qos,
    /// Approximate size of each JSON payload, bytes (at least the ~40 bytes of its fields).
    pub payload_size: usize,
    pub duration: Duration,
    /// Unacknowledged QoS 1 publishes per device; further ones wait in the client.
    pub inflight: u16,
    pub observe: Option<Observe>,
    /// Add a row of what happened every this often while publishing.
    pub report_every: Option<Duration>,
    /// Each device subscribes to its own `devices/{id}/commands` (QoS 1) right after its
    /// CONNACK, as the device agent does, and publishes only once that subscription is
    /// granted. On the platform this puts one filter per device in the router, which every
    /// new topic is matched against.
    pub subscribe_commands: bool,
    /// More filters each device subscribes to (QoS 1), in the same SUBSCRIBE as its command
    /// topic, after the topic prefix; `{id}` stands for the device id (e.g.
    /// `cohorts/<cohort id>/commands`). The device publishes only once all are granted.
    pub subscribe: Vec<String>,
    /// Messages sent to the devices after publishing; needs `observe`.
    pub probes: Option<Probes>,
}

impl Default for TelemetryLoad {
    fn default() -> Self {
        Self {
            devices: 100,
            concurrency: 100,
            rate: 1.0,
            qos: Qos::AtLeastOnce,
            payload_size: 128,
            duration: Duration::from_secs(10),
            inflight: 10,
            observe: None,
            report_every: None,
            subscribe_commands: false,
            subscribe: Vec::new(),
            probes: None,
        }
    }
}

/// `telemetry`'s delivery probes, once publishing is over and acknowledged: commands sent from
/// the observer's session (a backend service), first one on `fanout_topic`, timed until every
/// device that subscribed had it, then one at a time to `commands` devices picked at random
/// (their `devices/{id}/commands`), each timed until that device had it.
#[derive(Debug, Clone)]
pub struct Probes {
    /// After the topic prefix, e.g. `cohorts/<cohort id>/commands`; every device must have
    /// subscribed to it (see [`TelemetryLoad::subscribe`]).
    pub fanout_topic: Option<String>,
    /// Devices that get a command of their own; needs [`TelemetryLoad::subscribe_commands`].
    pub commands: usize,
    /// How long each probe may take to arrive.
    pub timeout: Duration,
}

impl Default for Probes {
    fn default() -> Self {
        Self {
            fanout_topic: None,
            commands: 0,
            timeout: Duration::from_secs(10),
        }
    }
}

/// A subscriber that measures what the broker delivers: rate, end-to-end latency, loss.
#[derive(Clone)]
pub struct Observe {
    pub url: BrokerUrl,
    pub credentials: Option<Credentials>,
    /// For an `mqtts://` observer; defaults to [`SimConfig::server_ca_pem`].
    pub server_ca_pem: Option<Vec<u8>>,
    /// Default `{topic prefix}devices/+/telemetry`.
    pub filter: Option<String>,
}

impl std::fmt::Debug for Observe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Observe")
            .field("url", &self.url.to_string())
            .field("credentials", &self.credentials)
            .field("filter", &self.filter)
            .finish_non_exhaustive()
    }
}

/// `fanout`: the devices subscribe and a publisher (a backend service) sends `messages`
/// numbered messages, one every `interval`.
#[derive(Debug, Clone)]
pub struct Fanout {
    pub devices: usize,
    /// Connection attempts at a time while the devices connect.
    pub concurrency: usize,
    /// What each device subscribes to (after the topic prefix). `{id}` stands for the device
    /// id: then every message is one publish per device (e.g. `devices/{id}/commands`);
    /// otherwise one publish reaches every device (e.g. `cohorts/<cohort id>/updates`).
    pub topic: String,
    pub messages: u32,
    pub interval: Duration,
    pub qos: Qos,
    pub payload_size: usize,
    pub publisher: Publisher,
}

impl Default for Fanout {
    fn default() -> Self {
        Self {
            devices: 100,
            concurrency: 100,
            topic: "devices/{id}/commands".into(),
            messages: 10,
            interval: Duration::from_secs(1),
            qos: Qos::AtLeastOnce,
            payload_size: 128,
            publisher: Publisher {
                url: BrokerUrl::new(crate::url::Scheme::Mqtt, "127.0.0.1", 8884)
                    .expect("a valid URL"),
                credentials: None,
                server_ca_pem: None,
            },
        }
    }
}

/// The sender of the `fanout` messages, e.g. a backend service on the platform's service
/// listener (any user name, an operator or admin API key as password).
#[derive(Clone)]
pub struct Publisher {
    pub url: BrokerUrl,
    pub credentials: Option<Credentials>,
    /// For an `mqtts://` publisher; defaults to [`SimConfig::server_ca_pem`].
    pub server_ca_pem: Option<Vec<u8>>,
}

impl std::fmt::Debug for Publisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Publisher")
            .field("url", &self.url.to_string())
            .field("credentials", &self.credentials)
            .finish_non_exhaustive()
    }
}

/// `soak`: telemetry over a long time with a row per interval (sessions up, dropped, lost and
/// reconnected, rates, PUBACK latency, client memory and CPU), while devices are dropped at
/// random and reconnect, to see drift, leaks and loss under churn. Needs
/// [`TelemetryLoad::report_every`].
#[derive(Debug, Clone, Default)]
pub struct Soak {
    pub load: TelemetryLoad,
    pub churn: Churn,
}

/// How a soak drops devices: sessions picked at random among those up, at random times (a
/// Poisson process of `per_min` drops per minute over the whole fleet) while publishing runs.
/// A dropped device, and one whose session was lost, reconnects after `reconnect_delay` plus a
/// uniform random part of `reconnect_jitter`; a failed reconnect is retried with the agent's
/// exponential backoff (full jitter, starting at the same delay). Publishes due while a device
/// is offline are counted as not sent (disconnected).
#[derive(Debug, Clone)]
pub struct Churn {
    /// Drops per minute over the fleet; 0 for none.
    pub per_min: f64,
    pub mode: DropMode,
    pub reconnect_delay: Duration,
    pub reconnect_jitter: Duration,
}

impl Default for Churn {
    fn default() -> Self {
        Self {
            per_min: 0.0,
            mode: DropMode::Mixed,
            reconnect_delay: Duration::from_millis(500),
            reconnect_jitter: Duration::from_secs(2),
        }
    }
}

/// How a dropped session ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DropMode {
    /// The socket is closed without a DISCONNECT, as when power or the network goes: the broker
    /// sees the connection lost.
    Abrupt,
    /// The device stops publishing, waits (at most 2 s) for its PUBACKs, then sends a DISCONNECT.
    Clean,
    /// Each drop is abrupt or clean at random, half and half.
    Mixed,
}

impl DropMode {
    pub fn name(self) -> &'static str {
        match self {
            DropMode::Abrupt => "abrupt",
            DropMode::Clean => "clean",
            DropMode::Mixed => "mixed",
        }
    }
}

#[derive(Debug, Clone)]
pub enum Scenario {
    ConnectStorm(ConnectStorm),
    Telemetry(TelemetryLoad),
    Fanout(Fanout),
    Soak(Soak),
}

impl Scenario {
    fn devices(&self) -> usize {
        match self {
            Scenario::ConnectStorm(s) => s.devices,
            Scenario::Telemetry(t) | Scenario::Soak(Soak { load: t, .. }) => t.devices,
            Scenario::Fanout(f) => f.devices,
        }
    }

    /// The name on the command line and in the report.
    pub fn name(&self) -> &'static str {
        match self {
            Scenario::ConnectStorm(_) => "connect-storm",
            Scenario::Telemetry(_) => "telemetry",
            Scenario::Fanout(_) => "fanout",
            Scenario::Soak(_) => "soak",
        }
    }

    fn validate(&self) -> Result<(), SimError> {
        let bad = |m: &str| Err(SimError::Invalid(m.to_owned()));
        match self {
            Scenario::ConnectStorm(s) => {
                if s.devices == 0 || s.concurrency == 0 {
                    return bad("devices and concurrency must be at least 1");
                }
                if s.rate.is_some_and(|r| !(r.is_finite() && r > 0.0)) {
                    return bad("the connect rate must be a positive number");
                }
            }
            Scenario::Soak(Soak {
                load: TelemetryLoad {
                    report_every: None, ..
                },
                ..
            }) => return bad("a soak needs an interval for its rows"),
            Scenario::Soak(Soak { churn: c, .. })
                if !(c.per_min.is_finite() && (0.0..=1_000_000.0).contains(&c.per_min)) =>
            {
                return bad("churn must be between 0 and 1000000 drops per minute")
            }
            Scenario::Soak(Soak { churn: c, .. })
                if c.reconnect_delay + c.reconnect_jitter > Duration::from_secs(3600) =>
            {
                return bad("reconnect delay and jitter must add up to at most an hour")
            }
            Scenario::Telemetry(t) | Scenario::Soak(Soak { load: t, .. }) => {
                if t.report_every.is_some_and(|d| d < Duration::from_secs(1)) {
                    return bad("rows can be at most one per second");
                }
                if t.devices == 0 || t.concurrency == 0 || t.inflight == 0 {
                    return bad("devices, concurrency and inflight must be at least 1");
                }
                if !(t.rate.is_finite() && t.rate > 0.0 && t.rate <= 10_000.0) {
                    return bad("the message rate must be above 0 and at most 10000 per device");
                }
                if t.duration.is_zero() {
                    return bad("the duration must not be zero");
                }
                if t.payload_size > 128 * 1024 {
                    return bad("the payload size must be at most 131072 bytes");
                }
                if t.subscribe.iter().any(|f| f.is_empty() || f.contains('\0')) {
                    return bad("a subscription filter must not be empty or contain NUL");
                }
                if let Some(p) = &t.probes {
                    if matches!(self, Scenario::Soak(_)) {
                        return bad("a soak sends no probes");
                    }
                    if t.observe.is_none() {
                        return bad("probes are sent from the observer's session: add an observer");
                    }
                    if p.commands > 0 && !t.subscribe_commands {
                        return bad("command probes need the devices subscribed to their commands");
                    }
                    if p.fanout_topic.as_ref().is_some_and(|f| {
                        f.is_empty() || f.contains(['+', '#', '\0']) || f.contains("{id}")
                    }) {
                        return bad(
                            "the fan-out probe topic must be one topic name, without wildcards",
                        );
                    }
                    if p.timeout.is_zero() || p.timeout > Duration::from_secs(600) {
                        return bad("the probe timeout must be above 0 and at most 600 s");
                    }
                }
            }
            Scenario::Fanout(f) => {
                if f.devices == 0 || f.concurrency == 0 || f.messages == 0 {
                    return bad("devices, concurrency and messages must be at least 1");
                }
                if f.messages > 1_000_000 {
                    return bad("at most 1000000 messages");
                }
                if f.topic.is_empty() || f.topic.contains('#') || f.topic.contains('+') {
                    return bad("the fanout topic must be a topic name, without wildcards");
                }
                if f.payload_size > 128 * 1024 {
                    return bad("the payload size must be at most 131072 bytes");
                }
            }
        }
        Ok(())
    }
}

/// Counters every device task updates and the progress line reads.
#[derive(Debug, Default)]
pub(crate) struct Live {
    /// Sessions up right now.
    pub connected: AtomicU64,
    pub connects: AtomicU64,
    pub failures: AtomicU64,
    /// Publishes handed to the clients.
    pub submitted: AtomicU64,
    /// Publishes written to the network.
    pub sent: AtomicU64,
    pub acked: AtomicU64,
    /// Submitted publishes of sessions that ended before their acknowledgement.
    pub abandoned: AtomicU64,
    pub delivered: AtomicU64,
    /// Sessions lost after their CONNACK, before the simulator ended them.
    pub lost_sessions: AtomicU64,
    /// Sessions a soak ended on purpose (churn).
    pub drops: AtomicU64,
    /// A soak's reconnects that got their CONNACK, and those that failed.
    pub reconnects: AtomicU64,
    pub reconnect_failures: AtomicU64,
    /// Largest resident set size sampled, bytes.
    pub rss_max: AtomicU64,
}

impl Live {
    fn snapshot(&self) -> LiveSnapshot {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        LiveSnapshot {
            connected: get(&self.connected),
            connects: get(&self.connects),
            failures: get(&self.failures),
            sent: get(&self.sent),
            acked: get(&self.acked),
            delivered: get(&self.delivered),
            drops: get(&self.drops),
            reconnects: get(&self.reconnects),
        }
    }

    pub(crate) fn sample_rss(&self) -> u64 {
        let rss = stats::Usage::now().rss;
        self.rss_max.fetch_max(rss, Ordering::Relaxed);
        rss
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct LiveSnapshot {
    connected: u64,
    connects: u64,
    failures: u64,
    sent: u64,
    acked: u64,
    delivered: u64,
    drops: u64,
    reconnects: u64,
}

/// What the progress line shows besides connections.
#[derive(Debug, Clone, Copy, Default)]
struct Shown {
    publishing: bool,
    observing: bool,
    churning: bool,
}

/// `[ 12s] connected 950/1000  connects/s 312  failed 0  sent/s 1000  acked/s 998 ...`
fn progress_line(
    elapsed: Duration,
    now: LiveSnapshot,
    before: LiveSnapshot,
    devices: usize,
    shown: Shown,
) -> String {
    let Shown {
        publishing,
        observing,
        churning,
    } = shown;
    let mut line = format!(
        "[{:>4}s] connected {}/{}  connects/s {}  failed {}",
        elapsed.as_secs(),
        now.connected,
        devices,
        now.connects - before.connects,
        now.failures,
    );
    if publishing {
        line.push_str(&format!(
            "  sent/s {}  acked/s {}",
            now.sent - before.sent,
            now.acked - before.acked
        ));
    }
    if observing {
        line.push_str(&format!(
            "  delivered/s {}",
            now.delivered - before.delivered
        ));
    }
    if churning {
        line.push_str(&format!(
            "  dropped {}  reconnected {}",
            now.drops, now.reconnects
        ));
    }
    line
}

/// One simulated device: its id and, over TLS, its client configuration.
pub(crate) struct SimDevice {
    pub id: DeviceId,
    pub tls: Option<Arc<ClientConfig>>,
}

/// What the scenarios share.
pub(crate) struct Ctx {
    pub config: SimConfig,
    /// This shard's devices; `devices[i]` is device `first + i` of the fleet.
    pub devices: Vec<SimDevice>,
    pub first: usize,
    /// The run ends here, whatever remains to do.
    pub deadline: Instant,
    pub live: Arc<Live>,
}

impl Ctx {
    /// A session for device `index`, not yet connected, on its own broker URL.
    pub(crate) fn open(
        &self,
        index: usize,
        inflight: u16,
        capacity: usize,
        max_packet: usize,
    ) -> (MqttClient, MqttLoop) {
        self.open_after_failures(index, 0, inflight, capacity, max_packet)
    }

    /// A session for device `index` after `failures` failed attempts in a row: each failure
    /// moves it to the next broker URL, as a device given several nodes fails over when its
    /// node is gone.
    pub(crate) fn open_after_failures(
        &self,
        index: usize,
        failures: usize,
        inflight: u16,
        capacity: usize,
        max_packet: usize,
    ) -> (MqttClient, MqttLoop) {
        let device = &self.devices[index];
        mqtt::open_session(SessionSpec {
            url: shard::url_for(&self.config.urls, self.first + index + failures),
            client_id: device.id.as_str(),
            tls: device.tls.clone(),
            credentials: self.config.credentials.as_ref(),
            keep_alive: self.config.keep_alive,
            connect_timeout: self.config.connect_timeout,
            inflight,
            capacity,
            max_packet,
        })
    }

    /// The telemetry topic of device `index`, with the topic prefix.
    pub(crate) fn telemetry_topic(&self, index: usize) -> String {
        self.topic(Topic::Telemetry(self.devices[index].id.clone()))
    }

    /// The command topic of device `index`, with the topic prefix.
    pub(crate) fn commands_topic(&self, index: usize) -> String {
        self.topic(Topic::Commands(self.devices[index].id.clone()))
    }

    fn topic(&self, topic: Topic) -> String {
        format!("{}{topic}", self.config.topic_prefix)
    }

    /// This shard's index of a device of the fleet, if it is one of its devices.
    pub(crate) fn local_index(&self, fleet_index: usize) -> Option<usize> {
        fleet_index
            .checked_sub(self.first)
            .filter(|i| *i < self.devices.len())
    }

    /// The client id of a helper session (`observer`, `publisher`): unique per process and
    /// shard.
    pub(crate) fn helper_client_id(&self, role: &str) -> String {
        let shard = self.config.shard;
        let mut id = format!("{}{role}-{}", self.config.id_prefix, std::process::id());
        if !shard.is_whole() {
            id.push_str(&format!("-{}", shard.index()));
        }
        id
    }
}

/// Runs `scenario` to its end (or [`SimConfig::max_duration`]) and reports what happened.
pub async fn run(config: &SimConfig, scenario: &Scenario) -> Result<Report, SimError> {
    config.validate()?;
    scenario.validate()?;
    let started = Instant::now();
    let deadline = started + config.max_duration;
    let usage_start = stats::Usage::now();
    let live = Arc::new(Live::default());
    live.sample_rss();
    let fleet = scenario.devices();
    config.shard.check(fleet)?;
    let range = config.shard.range(fleet);
    let first = range.start;
    let n = range.len();
    stats::check_open_files(n)?;

    let ids = range
        .map(|i| identities::device_id(&config.id_prefix, i, fleet))
        .collect::<Result<Vec<_>, _>>()?;
    let (tls_configs, identity_report) = match (&config.server_ca_pem, &config.device_ca) {
        (Some(server_ca), ca) => {
            let shared = Arc::new(SharedTls::new(&TlsConfig::from_ca_pem(server_ca)?)?);
            match ca {
                Some(ca) => {
                    let minted = tokio::time::timeout_at(
                        deadline,
                        identities::mint(
                            ca.clone(),
                            config.key_algorithm,
                            &ids,
                            config.cert_cache.as_deref(),
                            shared,
                        ),
                    )
                    .await
                    .map_err(|_| {
                        SimError::Invalid("max duration reached while minting certificates".into())
                    })??;
                    let report = IdentityReport {
                        devices: n,
                        certificates: true,
                        generated: minted.generated,
                        from_cache: minted.from_cache,
                        generation_s: minted.elapsed.as_secs_f64(),
                    };
                    (minted.configs.into_iter().map(Some).collect(), report)
                }
                None => {
                    let one = shared.client_config(None)?;
                    (vec![Some(one); n], IdentityReport::ids_only(n))
                }
            }
        }
        (None, _) => (vec![None; n], IdentityReport::ids_only(n)),
    };
    let devices = ids
        .into_iter()
        .zip(tls_configs)
        .map(|(id, tls)| SimDevice { id, tls })
        .collect();
    let ctx = Arc::new(Ctx {
        config: config.clone(),
        devices,
        first,
        deadline,
        live: live.clone(),
    });

    let shown = match scenario {
        Scenario::ConnectStorm(_) => Shown::default(),
        Scenario::Telemetry(t) => Shown {
            publishing: true,
            observing: t.observe.is_some(),
            churning: false,
        },
        Scenario::Soak(s) => Shown {
            publishing: true,
            observing: s.load.observe.is_some(),
            churning: true,
        },
        Scenario::Fanout(_) => Shown {
            observing: true,
            ..Shown::default()
        },
    };
    let progress = config.progress.clone().map(|emit| {
        let live = live.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval_at(
                Instant::now() + Duration::from_secs(1),
                Duration::from_secs(1),
            );
            let mut before = live.snapshot();
            loop {
                tick.tick().await;
                live.sample_rss();
                let now = live.snapshot();
                emit(&progress_line(started.elapsed(), now, before, n, shown));
                before = now;
            }
        })
    });

    let usage_before = stats::Usage::now();
    let outcome = match scenario {
        Scenario::ConnectStorm(s) => storm::run(&ctx, s).await,
        Scenario::Telemetry(t) => telemetry::run(&ctx, t, None).await,
        Scenario::Soak(s) => {
            // The churn is the fleet's: a shard drops its share.
            let churn = Churn {
                per_min: s.churn.per_min * n as f64 / fleet as f64,
                ..s.churn.clone()
            };
            telemetry::run(&ctx, &s.load, Some(&churn)).await
        }
        Scenario::Fanout(f) => fanout::run(&ctx, f).await,
    };
    if let Some(p) = progress {
        p.abort();
    }
    let outcome = outcome?;
    let usage_end = stats::Usage::now();
    live.sample_rss();

    let connects: u64 = outcome.rounds.iter().map(|r| r.attempted).sum();
    let messages = match (&outcome.telemetry, &outcome.fanout) {
        (Some(t), _) => t.sent,
        (None, Some(f)) => f.delivered,
        (None, None) => 0,
    };
    let cpu = usage_end.cpu.saturating_sub(usage_before.cpu);
    let rss_connected = outcome.rss_connected.max(usage_start.rss);
    let process = ProcessReport {
        rss_start_bytes: usage_start.rss,
        rss_connected_bytes: rss_connected,
        // VmHWM is updated lazily; a sample taken just before can exceed it.
        rss_peak_bytes: usage_end.rss_peak.max(live.rss_max.load(Ordering::Relaxed)),
        rss_per_device_bytes: (rss_connected - usage_start.rss) / n as u64,
        cpu_total_s: usage_end.cpu.saturating_sub(usage_start.cpu).as_secs_f64(),
        cpu_scenario_s: cpu.as_secs_f64(),
        cpu_per_connect_ms: (connects > 0 && messages == 0)
            .then(|| cpu.as_secs_f64() * 1000.0 / connects as f64),
        cpu_per_message_us: (messages > 0).then(|| cpu.as_secs_f64() * 1e6 / messages as f64),
        open_files_limit: stats::open_files_limit(),
    };
    Ok(Report {
        scenario: scenario.name().into(),
        url: shard::join_urls(&config.urls),
        shard: config.shard,
        devices_range: [first, first + n],
        parameters: report::parameters(config, scenario),
        identities: identity_report,
        rounds: outcome.rounds,
        telemetry: outcome.telemetry,
        fanout: outcome.fanout,
        churn: outcome.churn,
        process,
        shards: Vec::new(),
        elapsed_s: started.elapsed().as_secs_f64(),
        truncated: outcome.truncated,
    })
}

/// What a scenario hands back to [`run`].
pub(crate) struct Outcome {
    pub rounds: Vec<ConnectRound>,
    pub telemetry: Option<TelemetryReport>,
    pub fanout: Option<FanoutReport>,
    pub churn: Option<ChurnReport>,
    /// Resident set size sampled with the most devices connected.
    pub rss_connected: u64,
    pub truncated: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_lines() {
        let before = LiveSnapshot {
            connected: 10,
            connects: 10,
            sent: 100,
            acked: 90,
            delivered: 80,
            ..LiveSnapshot::default()
        };
        let now = LiveSnapshot {
            connected: 50,
            connects: 60,
            failures: 2,
            sent: 400,
            acked: 380,
            delivered: 370,
            drops: 7,
            reconnects: 5,
        };
        let line = progress_line(Duration::from_secs(3), now, before, 100, Shown::default());
        assert_eq!(line, "[   3s] connected 50/100  connects/s 50  failed 2");
        let all = Shown {
            publishing: true,
            observing: true,
            churning: false,
        };
        let line = progress_line(Duration::from_secs(12), now, before, 100, all);
        assert_eq!(
            line,
            "[  12s] connected 50/100  connects/s 50  failed 2  sent/s 300  acked/s 290  delivered/s 290"
        );
        let churning = Shown {
            publishing: true,
            churning: true,
            ..Shown::default()
        };
        let line = progress_line(Duration::from_secs(12), now, before, 100, churning);
        assert_eq!(
            line,
            "[  12s] connected 50/100  connects/s 50  failed 2  sent/s 300  acked/s 290  dropped 7  reconnected 5"
        );
    }

    #[test]
    fn settings_are_checked() {
        let tls: BrokerUrl = "mqtts://127.0.0.1:8883".parse().unwrap();
        let plain: BrokerUrl = "mqtt://127.0.0.1:1883".parse().unwrap();
        assert!(
            SimConfig::new(tls.clone()).validate().is_err(),
            "no server CA"
        );
        let mut c = SimConfig::new(tls);
        c.server_ca_pem = Some(b"pem".to_vec());
        assert!(c.validate().is_ok());
        let mut c = SimConfig::new(plain.clone());
        c.server_ca_pem = Some(b"pem".to_vec());
        assert!(c.validate().is_err(), "server CA with mqtt://");
        let mut c = SimConfig::new(plain.clone());
        c.keep_alive = Duration::from_millis(500);
        assert!(c.validate().is_err());
        let mut c = SimConfig::new(plain);
        c.topic_prefix = "a/#/".into();
        assert!(c.validate().is_err());

        let bad = [
            Scenario::ConnectStorm(ConnectStorm {
                devices: 0,
                ..ConnectStorm::default()
            }),
            Scenario::ConnectStorm(ConnectStorm {
                rate: Some(0.0),
                ..ConnectStorm::default()
            }),
            Scenario::Telemetry(TelemetryLoad {
                rate: f64::NAN,
                ..TelemetryLoad::default()
            }),
            Scenario::Telemetry(TelemetryLoad {
                duration: Duration::ZERO,
                ..TelemetryLoad::default()
            }),
        ];
        for s in bad {
            assert!(s.validate().is_err(), "{s:?}");
        }
        assert!(Scenario::Telemetry(TelemetryLoad::default())
            .validate()
            .is_ok());
        assert!(Scenario::Fanout(Fanout::default()).validate().is_ok());
        assert!(Scenario::Soak(Soak::default()).validate().is_err());
        let load = TelemetryLoad {
            report_every: Some(Duration::from_secs(60)),
            ..TelemetryLoad::default()
        };
        let soak = |churn| {
            Scenario::Soak(Soak {
                load: load.clone(),
                churn,
            })
        };
        assert!(soak(Churn::default()).validate().is_ok());
        for per_min in [f64::NAN, -1.0, f64::INFINITY] {
            let churn = Churn {
                per_min,
                ..Churn::default()
            };
            assert!(soak(churn).validate().is_err(), "{per_min}");
        }
        let churn = Churn {
            reconnect_delay: Duration::from_secs(3600),
            ..Churn::default()
        };
        assert!(soak(churn).validate().is_err());
        let wildcard = Scenario::Fanout(Fanout {
            topic: "devices/+/commands".into(),
            ..Fanout::default()
        });
        assert!(wildcard.validate().is_err());

        let observe = Observe {
            url: "mqtt://127.0.0.1:8884".parse().unwrap(),
            credentials: None,
            server_ca_pem: None,
            filter: None,
        };
        let probing = |probes: Probes, observed: bool, commands: bool| TelemetryLoad {
            observe: observed.then(|| observe.clone()),
            subscribe_commands: commands,
            subscribe: vec!["cohorts/c1/commands".into()],
            probes: Some(probes),
            ..load.clone()
        };
        let both = Probes {
            fanout_topic: Some("cohorts/c1/commands".into()),
            commands: 5,
            ..Probes::default()
        };
        assert!(Scenario::Telemetry(probing(both.clone(), true, true))
            .validate()
            .is_ok());
        let fanout_only = Probes {
            commands: 0,
            ..both.clone()
        };
        assert!(Scenario::Telemetry(probing(fanout_only, true, false))
            .validate()
            .is_ok());
        let bad = [
            ("no observer", probing(both.clone(), false, true)),
            (
                "no command subscription",
                probing(both.clone(), true, false),
            ),
            (
                "wildcard",
                probing(
                    Probes {
                        fanout_topic: Some("cohorts/+/commands".into()),
                        ..both.clone()
                    },
                    true,
                    true,
                ),
            ),
            (
                "no timeout",
                probing(
                    Probes {
                        timeout: Duration::ZERO,
                        ..both.clone()
                    },
                    true,
                    true,
                ),
            ),
        ];
        for (what, t) in bad {
            assert!(Scenario::Telemetry(t).validate().is_err(), "{what}");
        }
        let soak = Scenario::Soak(Soak {
            load: probing(both, true, true),
            churn: Churn::default(),
        });
        assert!(soak.validate().is_err(), "a soak with probes");
    }
}

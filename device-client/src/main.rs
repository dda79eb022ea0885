//! `device-client`: run a device agent, publish one message, issue certificates, or simulate a
//! fleet.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};
use device_client::fleet_wire::payload::Command;
use device_client::fleet_wire::{CohortId, DeviceId, Topic};
use device_client::pki::{Ca, CaOptions, DeviceCertOptions, KeyAlgorithm};
use device_client::sim::{
    self, Churn, ConnectStorm, DropMode, Fanout, Observe, Probes, Publisher, Qos, Scenario,
    SimConfig, Soak, TelemetryLoad,
};
use device_client::{
    publish_once, Agent, AgentConfig, BrokerUrl, ClientIdentity, CommandOutcome, ConnectOptions,
    TlsConfig,
};

#[derive(Parser)]
#[command(
    name = "device-client",
    version,
    about = "Fleet device client: MQTT agent, one-shot publish, device PKI and fleet simulator"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the device agent: print received commands as JSON lines on stdout, log to stderr.
    Run(RunArgs),
    /// Connect, publish one message (QoS 1), wait for the PUBACK, disconnect.
    Publish(PublishArgs),
    /// Create a manufacturing CA or certificates signed by it.
    #[command(subcommand)]
    Pki(PkiCmd),
    /// Sign releases (operators): an Ed25519 key pair, and a signed manifest for
    /// POST /api/v1/releases.
    #[command(subcommand)]
    Release(ReleaseCmd),
    /// Simulate a fleet: many devices in this process against one or more brokers (load
    /// generator); --shard K/N splits one fleet over several processes, `merge` joins their
    /// reports.
    ///
    /// Prints a table at the end (or one JSON document with --json) and, unless --json, a
    /// progress line on stderr every second. Bounded by the scenario and --max-duration.
    #[command(subcommand)]
    Simulate(SimCmd),
}

#[derive(Subcommand)]
enum SimCmd {
    /// Every device connects: CONNACK latency percentiles, connects/s, failures by reason.
    ConnectStorm(StormArgs),
    /// Every device publishes telemetry at a fixed rate: offered vs acknowledged rate, PUBACK
    /// latency, and with --observe-url delivered rate, end-to-end latency and loss.
    Telemetry(TelemetryArgs),
    /// Every device subscribes and a publisher (a backend service) sends numbered messages:
    /// delivery latency, time until the last device had each message, loss.
    Fanout(FanoutArgs),
    /// Telemetry over a long time while devices are dropped at random and reconnect, with one
    /// row per interval: sessions up, dropped, lost and reconnected, rates, PUBACK latency,
    /// client memory and CPU; with --observe-url, delivered and lost. Give --duration and a
    /// --max-duration above it.
    Soak(Box<SoakArgs>),
    /// A cohort of real device agents that install what its deployments tell them, with
    /// failures injected at given rates: per deployment, how long until every device finished
    /// and how each ended. Create the deployment (REST) while it runs.
    Update(UpdateArgs),
    /// Merge the --json reports of the shards (--shard K/N) of one run into the report of the
    /// whole fleet: counts summed, latency percentiles from the merged histograms, interval
    /// rows summed, process figures per shard and summed. Refuses reports of different
    /// scenarios or parameters, and a shard given twice or missing.
    Merge(MergeArgs),
}

#[derive(Args)]
struct MergeArgs {
    /// The shards' JSON reports, in any order.
    #[arg(required = true)]
    reports: Vec<PathBuf>,
    /// Print the merged JSON document instead of the table.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct UpdateArgs {
    #[command(flatten)]
    sim: SimArgs,
    /// Devices (each a real agent) in the simulated fleet.
    #[arg(long, default_value_t = 100)]
    devices: usize,
    /// Agents connecting at a time while the fleet comes up.
    #[arg(long, default_value_t = 50)]
    concurrency: usize,
    /// The cohort the device CA provisions into (its updates topic is followed).
    #[arg(long)]
    cohort: CohortId,
    /// Trusted release signing key (base64 or PEM PUBLIC KEY file); repeat for more.
    #[arg(long = "update-key", required = true)]
    update_keys: Vec<PathBuf>,
    /// The firmware version the simulated devices run when they start.
    #[arg(long, default_value = "1.0.0")]
    firmware_version: String,
    /// Share of devices (0..1) whose download fails.
    #[arg(long, default_value_t = 0.0)]
    fail_download: f64,
    /// Share whose download arrives corrupted (refused by the hash check).
    #[arg(long, default_value_t = 0.0)]
    fail_verify: f64,
    /// Share whose install fails.
    #[arg(long, default_value_t = 0.0)]
    fail_install: f64,
    /// Share that never report (no updater); the platform times them out.
    #[arg(long, default_value_t = 0.0)]
    silent: f64,
    /// The run ends when the newest deployment is finished everywhere and nothing changed
    /// for this long.
    #[arg(long, default_value = "3s", value_parser = parse_duration)]
    settle: Duration,
    /// Do not end before the devices have seen this many deployments (a baseline first, or
    /// a rollback expected).
    #[arg(long, default_value_t = 1)]
    min_deployments: usize,
}

#[derive(Args)]
struct SimArgs {
    /// mqtts://host:port (TLS) or mqtt://host:port (plain TCP). Nothing else is contacted.
    /// Repeat it (or give a comma list) to spread the fleet over broker nodes: device i (its
    /// index in the whole fleet) connects to the (i mod count)-th URL. In a soak, a failed
    /// reconnect moves the device on to the next URL (failover from a node that is gone).
    #[arg(long = "url", required = true, value_delimiter = ',')]
    urls: Vec<BrokerUrl>,
    /// Simulate only part K of N of the fleet (K/N, e.g. 2/4): the contiguous block of
    /// device indices (K-1)*devices/N .. K*devices/N; --devices stays the fleet's total. Merge
    /// the shards' --json reports with `simulate merge`.
    #[arg(long, default_value = "1/1", value_parser = parse_shard)]
    shard: sim::Shard,
    /// CA certificate(s) that signed the broker's certificate (PEM); required for mqtts://.
    #[arg(long)]
    server_ca: Option<PathBuf>,
    /// Manufacturing CA certificate that signs one client certificate per device (mqtts://).
    #[arg(long, requires = "ca_key")]
    ca_cert: Option<PathBuf>,
    /// Its private key (PEM, PKCS#8).
    #[arg(long, requires = "ca_cert")]
    ca_key: Option<PathBuf>,
    /// Device ids are the prefix and a zero-padded index: sim-00000, sim-00001, ...
    #[arg(long, default_value = "sim-")]
    id_prefix: String,
    /// Keep minted certificates here (per CA fingerprint, key algorithm and device id) and
    /// reuse them.
    #[arg(long)]
    cert_cache: Option<PathBuf>,
    /// The minted devices' keys. RSA-2048 keys take far longer to generate than P-256 ones
    /// (use --cert-cache for repeated runs).
    #[arg(long, value_enum, default_value_t = Algorithm::P256)]
    key_algorithm: Algorithm,
    /// MQTT user name (with --password). On the platform's service listener any name goes, with an
    /// API key as the password.
    #[arg(long, requires = "password")]
    username: Option<String>,
    /// MQTT password (with --username), or the DEVICE_CLIENT_PASSWORD environment variable.
    /// On the platform's service listener: an API key.
    #[arg(
        long,
        env = "DEVICE_CLIENT_PASSWORD",
        hide_env_values = true,
        requires = "username"
    )]
    password: Option<String>,
    /// Put before every topic (default none: topics exactly as in topics.md).
    #[arg(long, default_value = "")]
    topic_prefix: String,
    /// MQTT keep-alive of every simulated device, e.g. 30s (0 turns it off).
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    keep_alive: Duration,
    /// TCP connect + TLS handshake + CONNACK, per attempt.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    connect_timeout: Duration,
    /// Hard limit for the whole run.
    #[arg(long, default_value = "300s", value_parser = parse_duration)]
    max_duration: Duration,
    /// Print one JSON document (scenario, parameters, results) and no progress.
    #[arg(long)]
    json: bool,
}

impl SimArgs {
    fn config(&self) -> Result<SimConfig> {
        let mut c = SimConfig::new(self.urls[0].clone());
        c.urls = self.urls.clone();
        c.shard = self.shard;
        if let Some(path) = &self.server_ca {
            c.server_ca_pem = Some(
                std::fs::read(path)
                    .with_context(|| format!("cannot read --server-ca {}", path.display()))?,
            );
        }
        if let (Some(cert), Some(key)) = (&self.ca_cert, &self.ca_key) {
            c.device_ca = Some(Arc::new(Ca::from_files(cert, key)?));
        }
        c.id_prefix = self.id_prefix.clone();
        c.cert_cache = self.cert_cache.clone();
        c.key_algorithm = self.key_algorithm.into();
        c.credentials = credentials(self.username.clone(), self.password.clone());
        c.topic_prefix = self.topic_prefix.clone();
        c.keep_alive = self.keep_alive;
        c.connect_timeout = self.connect_timeout;
        c.max_duration = self.max_duration;
        if !self.json {
            c.progress = Some(progress_printer());
        }
        Ok(c)
    }
}

#[derive(Args)]
struct StormArgs {
    #[command(flatten)]
    sim: SimArgs,
    /// Devices in the simulated fleet, all shards together (ids are the prefix and a zero-padded
    /// index).
    #[arg(long, default_value_t = 100)]
    devices: usize,
    /// Connection attempts (TCP + TLS + CONNECT) in flight at once.
    #[arg(long, default_value_t = 100)]
    concurrency: usize,
    /// New connections per second at most, e.g. 200 or 200/s.
    #[arg(long, value_parser = parse_rate)]
    rate: Option<f64>,
    /// Keep every device connected until all have connected, then disconnect them all.
    #[arg(long)]
    hold: bool,
    /// Connect every device this many more times, one report row per round.
    #[arg(long, default_value_t = 0)]
    repeat: u32,
}

#[derive(Args)]
struct FanoutArgs {
    #[command(flatten)]
    sim: SimArgs,
    /// Devices in the simulated fleet, all shards together (ids are the prefix and a zero-padded
    /// index).
    #[arg(long, default_value_t = 100)]
    devices: usize,
    /// Connection attempts in flight at once while the devices connect.
    #[arg(long, default_value_t = 100)]
    concurrency: usize,
    /// What every device subscribes to; {id} is its device id (one publish per device and
    /// message), otherwise one publish reaches all, e.g. cohorts/<cohort id>/updates.
    #[arg(long, default_value = "devices/{id}/commands")]
    topic: String,
    /// How many messages the publisher sends.
    #[arg(long, default_value_t = 10)]
    messages: u32,
    /// Time between messages.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    interval: Duration,
    /// QoS of the publisher's messages and of the devices' subscriptions (0 or 1).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(0..=1))]
    qos: u8,
    /// Payload bytes per message.
    #[arg(long, default_value_t = 128)]
    payload_size: usize,
    /// Where the publisher connects, e.g. mqtt://127.0.0.1:8884 (the platform's service
    /// listener; username any, password an operator or admin API key).
    #[arg(long)]
    publisher_url: BrokerUrl,
    /// User name of the publisher's connection (any on the platform's service listener; the API key
    /// goes in --publisher-password).
    #[arg(long, requires = "publisher_password")]
    publisher_username: Option<String>,
    /// Used only with --publisher-username, so an exported variable does not stand in the way
    /// of an anonymous publisher.
    #[arg(long, env = "DEVICE_CLIENT_PUBLISHER_PASSWORD", hide_env_values = true)]
    publisher_password: Option<String>,
}

#[derive(Args)]
struct TelemetryArgs {
    #[command(flatten)]
    sim: SimArgs,
    /// Devices in the simulated fleet, all shards together (ids are the prefix and a zero-padded
    /// index).
    #[arg(long, default_value_t = 100)]
    devices: usize,
    /// Connection attempts in flight at once while the devices connect.
    #[arg(long, default_value_t = 100)]
    concurrency: usize,
    /// Messages per second per device, e.g. 1 or 0.2.
    #[arg(long, default_value_t = 1.0)]
    rate: f64,
    /// QoS of the devices' publishes (0 or 1).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(0..=1))]
    qos: u8,
    /// Approximate JSON payload size in bytes.
    #[arg(long, default_value_t = 128)]
    payload_size: usize,
    /// How long the devices publish.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    duration: Duration,
    /// Unacknowledged QoS 1 publishes per device.
    #[arg(long, default_value_t = 10)]
    inflight: u16,
    /// Also report what happened in each interval of this length.
    #[arg(long, value_parser = parse_duration)]
    report_every: Option<Duration>,
    /// Every device subscribes to its devices/{id}/commands (QoS 1) after its CONNACK and
    /// publishes only once the SUBACK granted it, as the device agent does.
    #[arg(long)]
    subscribe_commands: bool,
    /// A further filter every device subscribes to (QoS 1) in the same SUBSCRIBE, {id} for its
    /// device id, e.g. cohorts/<cohort id>/updates; repeat for more. The device publishes only
    /// once all are granted.
    #[arg(long = "subscribe", value_name = "FILTER")]
    subscribe: Vec<String>,
    /// After publishing, send one command on this topic from the observer's session and time
    /// it until every device that subscribed had it, e.g. cohorts/<cohort id>/commands (the
    /// devices must subscribe to it with --subscribe).
    #[arg(long, requires = "observe_url", value_name = "TOPIC")]
    probe_fanout: Option<String>,
    /// After publishing (and the --probe-fanout), send a command to this many devices picked at
    /// random, one at a time, from the observer's session to their devices/{id}/commands, each
    /// timed until that device had it. Needs --subscribe-commands.
    #[arg(
        long,
        requires = "observe_url",
        requires = "subscribe_commands",
        value_name = "N"
    )]
    probe_commands: Option<usize>,
    /// How long each probe may take to arrive.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    probe_timeout: Duration,
    #[command(flatten)]
    observe: ObserveArgs,
}

#[derive(Args)]
struct SoakArgs {
    #[command(flatten)]
    sim: SimArgs,
    /// Devices in the simulated fleet, all shards together (ids are the prefix and a zero-padded
    /// index).
    #[arg(long, default_value_t = 100)]
    devices: usize,
    /// Connection attempts in flight at once while the devices connect.
    #[arg(long, default_value_t = 100)]
    concurrency: usize,
    /// Messages per second per device.
    #[arg(long, default_value_t = 0.1)]
    rate: f64,
    /// QoS of the devices' publishes (0 or 1).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(0..=1))]
    qos: u8,
    /// Payload bytes per message.
    #[arg(long, default_value_t = 128)]
    payload_size: usize,
    /// How long the devices stay and publish, e.g. 1h (raise --max-duration above it).
    #[arg(long, value_parser = parse_duration)]
    duration: Duration,
    /// One report row per interval.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    report_every: Duration,
    /// Unacknowledged QoS 1 publishes each device may have at once.
    #[arg(long, default_value_t = 10)]
    inflight: u16,
    /// Every device subscribes to its devices/{id}/commands (QoS 1) after each CONNACK, as the
    /// device agent does (in a soak it publishes without waiting for the SUBACK).
    #[arg(long)]
    subscribe_commands: bool,
    /// Sessions dropped per minute over the whole fleet, at random times and on random
    /// connected devices: a count (120) or a share of the devices (10%); 0 for none.
    #[arg(long, default_value = "10%", value_parser = parse_churn)]
    churn_per_min: ChurnRate,
    /// How a dropped session ends: abrupt (socket closed, no DISCONNECT), clean (PUBACKs
    /// awaited, then DISCONNECT), or mixed (each drop at random).
    #[arg(long, value_enum, default_value_t = DropArg::Mixed)]
    drop_mode: DropArg,
    /// A dropped (or lost) device reconnects after this ...
    #[arg(long, default_value = "500ms", value_parser = parse_duration)]
    reconnect_delay: Duration,
    /// ... plus a uniform random part of this. Failed reconnects back off exponentially.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    reconnect_jitter: Duration,
    #[command(flatten)]
    observe: ObserveArgs,
}

/// `--churn-per-min`: drops per minute, or a percentage of the devices per minute.
#[derive(Debug, Clone, Copy, PartialEq)]
enum ChurnRate {
    PerMin(f64),
    Percent(f64),
}

impl ChurnRate {
    fn per_min(self, devices: usize) -> f64 {
        match self {
            ChurnRate::PerMin(n) => n,
            ChurnRate::Percent(p) => devices as f64 * p / 100.0,
        }
    }
}

/// `120`, `0` or `10%`: drops per minute, or a share of the devices per minute.
fn parse_churn(s: &str) -> Result<ChurnRate, String> {
    let t = s.trim();
    let (number, percent) = match t.strip_suffix('%') {
        Some(n) => (n.trim(), true),
        None => (t, false),
    };
    match number.parse::<f64>() {
        Ok(v) if v.is_finite() && v >= 0.0 => Ok(if percent {
            ChurnRate::Percent(v)
        } else {
            ChurnRate::PerMin(v)
        }),
        _ => Err(format!(
            "{s:?} is not a churn like 120 (drops per minute) or 10% (of the devices per minute)"
        )),
    }
}

#[derive(Clone, Copy, ValueEnum)]
enum DropArg {
    Abrupt,
    Clean,
    Mixed,
}

#[derive(Args)]
struct ObserveArgs {
    /// Subscriber measuring delivery, e.g. mqtt://127.0.0.1:8884 (the platform's service
    /// listener; username any, password an API key).
    #[arg(long)]
    observe_url: Option<BrokerUrl>,
    /// User name of the observer's connection (any on the platform's service listener; the API key
    /// goes in --observe-password).
    #[arg(long, requires = "observe_url", requires = "observe_password")]
    observe_username: Option<String>,
    /// Used only with --observe-username, so an exported variable does not stand in the way of
    /// a run without an observer or with an anonymous one.
    #[arg(long, env = "DEVICE_CLIENT_OBSERVE_PASSWORD", hide_env_values = true)]
    observe_password: Option<String>,
    /// Default: {topic prefix}devices/+/telemetry.
    #[arg(long, requires = "observe_url")]
    observe_filter: Option<String>,
}

impl ObserveArgs {
    fn observe(self) -> Option<Observe> {
        let credentials = credentials(self.observe_username, self.observe_password);
        Some(Observe {
            url: self.observe_url?,
            credentials,
            server_ca_pem: None,
            filter: self.observe_filter,
        })
    }
}

#[derive(Args)]
struct ConnArgs {
    /// mqtts://host:port (TLS) or mqtt://host:port (plain TCP).
    #[arg(long)]
    url: BrokerUrl,
    /// Device certificate (PEM, leaf first); its CN is the device id.
    #[arg(long, requires = "key")]
    cert: Option<PathBuf>,
    /// Device private key (PEM).
    #[arg(long, requires = "cert")]
    key: Option<PathBuf>,
    /// CA certificate(s) that signed the broker's certificate (PEM); required for mqtts://.
    #[arg(long)]
    ca: Option<PathBuf>,
    /// MQTT client id (= device id); defaults to the certificate CN.
    #[arg(long)]
    client_id: Option<DeviceId>,
    /// MQTT user name (with --password). On the platform's service listener any name goes, with an
    /// API key as the password.
    #[arg(long, requires = "password")]
    username: Option<String>,
    /// MQTT password (with --username), or the DEVICE_CLIENT_PASSWORD environment variable.
    /// On the platform's service listener: an API key.
    #[arg(
        long,
        env = "DEVICE_CLIENT_PASSWORD",
        hide_env_values = true,
        requires = "username"
    )]
    password: Option<String>,
    /// MQTT keepalive, e.g. 30s.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    keep_alive: Duration,
}

impl ConnArgs {
    fn options(&self) -> Result<ConnectOptions> {
        let mut opts = ConnectOptions::new(self.url.clone());
        opts.keep_alive = self.keep_alive;
        opts.client_id = self.client_id.clone();
        match (&self.ca, self.url.is_tls()) {
            (Some(ca), true) => {
                let mut tls = TlsConfig::from_ca_file(ca)?;
                if let (Some(cert), Some(key)) = (&self.cert, &self.key) {
                    tls = tls.with_identity(ClientIdentity::from_files(cert, key)?);
                }
                opts.tls = Some(tls);
            }
            (None, true) => bail!("--ca is required for an mqtts:// URL"),
            (_, false) => {
                if self.ca.is_some() || self.cert.is_some() {
                    bail!("--ca, --cert and --key need an mqtts:// URL");
                }
            }
        }
        if let (Some(u), Some(p)) = (&self.username, &self.password) {
            opts = opts.with_credentials(u, p);
        }
        opts.validate()?;
        Ok(opts)
    }
}

#[derive(Args)]
struct RunArgs {
    #[command(flatten)]
    conn: ConnArgs,
    /// Also follow cohorts/{cohort}/updates.
    #[arg(long)]
    cohort: Option<CohortId>,
    /// Period of the telemetry messages, e.g. 5s or 500ms.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    telemetry_interval: Duration,
    /// Reported in the retained device state.
    #[arg(long)]
    firmware_version: Option<String>,
    /// Stop cleanly once this many telemetry messages were acknowledged.
    #[arg(long)]
    count: Option<u64>,
    /// Telemetry messages kept while offline.
    #[arg(long, default_value_t = 1000)]
    offline_buffer: usize,
    /// Install updates from the cohort topic signed by this Ed25519 public key (a file with
    /// base64 or a PEM PUBLIC KEY); repeat for more. Without one, every update is rejected.
    #[arg(long = "update-key")]
    update_keys: Vec<PathBuf>,
    /// Where installed artifacts are written, as <version>.bin (the reference installer), and
    /// where installed.json records the release installed last, so that a restarted agent
    /// runs it and does not download it again.
    #[arg(long, default_value = "./updates")]
    update_dir: PathBuf,
    /// Remembers attempted deployments across restarts.
    #[arg(long)]
    update_state: Option<PathBuf>,
    /// CA certificate(s) (PEM) of the HTTPS artifact server; default: the system's.
    #[arg(long)]
    update_ca: Option<PathBuf>,
}

#[derive(Subcommand)]
enum ReleaseCmd {
    /// Create an Ed25519 signing key pair: the private key (PEM, keep it secret) and the
    /// public key (base64, for POST /api/v1/signing-keys and the devices' --update-key).
    Keygen {
        /// Where to write the private signing key (PEM; keep it secret).
        #[arg(long)]
        out_key: PathBuf,
        /// Where to write the public key (base64, for POST /api/v1/signing-keys and --update-key).
        #[arg(long)]
        out_pub: PathBuf,
        /// Replace existing output files.
        #[arg(long)]
        force: bool,
    },
    /// Sign an artifact's manifest; prints the JSON body for POST /api/v1/releases.
    Sign {
        /// The private signing key (PEM) from `release keygen`.
        #[arg(long)]
        key: PathBuf,
        /// The product's id (from POST /api/v1/products): the release is for its devices only.
        #[arg(long)]
        product_id: String,
        /// The release's version (semver), e.g. 2.0.0.
        #[arg(long)]
        version: String,
        /// Where devices will download the artifact.
        #[arg(long)]
        url: String,
        /// The artifact file: its size and SHA-256 are what gets signed.
        #[arg(long)]
        artifact: PathBuf,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum TopicKind {
    /// devices/{id}/telemetry
    Telemetry,
    /// devices/{id}/state (retained)
    State,
}

#[derive(Args)]
struct PublishArgs {
    #[command(flatten)]
    conn: ConnArgs,
    /// Which of the device's topics to publish on.
    #[arg(long, value_enum)]
    topic_kind: TopicKind,
    /// JSON object.
    #[arg(long)]
    payload: String,
    /// Limit for the whole exchange.
    #[arg(long, default_value = "15s", value_parser = parse_duration)]
    timeout: Duration,
}

#[derive(Subcommand)]
enum PkiCmd {
    /// Create a self-signed manufacturing CA.
    Ca {
        /// Where to write the certificate (PEM).
        #[arg(long)]
        out_cert: PathBuf,
        /// Where to write the private key (PEM, PKCS#8).
        #[arg(long)]
        out_key: PathBuf,
        /// The CA's common name (CN).
        #[arg(long, default_value = "Acme Manufacturing CA")]
        cn: String,
        /// The CA's organization (O), if any.
        #[arg(long)]
        org: Option<String>,
        /// How many days the certificate is valid from now.
        #[arg(long, default_value_t = 3650)]
        days: u32,
        /// The CA's key (RSA-2048 takes much longer to generate).
        #[arg(long, value_enum, default_value_t = Algorithm::P256)]
        algorithm: Algorithm,
        /// Replace existing output files.
        #[arg(long)]
        force: bool,
    },
    /// Issue a device certificate (CN = device id, clientAuth).
    Device {
        #[command(flatten)]
        ca: CaFiles,
        /// The device id: the certificate's CN, which is also the device's MQTT client id.
        #[arg(long)]
        id: DeviceId,
        /// Where to write the certificate (PEM).
        #[arg(long)]
        out_cert: PathBuf,
        /// Where to write the private key (PEM, PKCS#8).
        #[arg(long)]
        out_key: PathBuf,
        /// How many days the certificate is valid from now.
        #[arg(long, default_value_t = 365)]
        days: u32,
        /// The device's key (RSA-2048 takes much longer to generate).
        #[arg(long, value_enum, default_value_t = Algorithm::P256)]
        algorithm: Algorithm,
        /// Replace existing output files.
        #[arg(long)]
        force: bool,
    },
    /// Issue a broker certificate (serverAuth) for host names / IP addresses.
    Server {
        #[command(flatten)]
        ca: CaFiles,
        /// DNS name or IP address; repeat for more.
        #[arg(long = "name", required = true)]
        names: Vec<String>,
        /// Where to write the certificate (PEM).
        #[arg(long)]
        out_cert: PathBuf,
        /// Where to write the private key (PEM, PKCS#8).
        #[arg(long)]
        out_key: PathBuf,
        /// How many days the certificate is valid from now.
        #[arg(long, default_value_t = 365)]
        days: u32,
        /// Replace existing output files.
        #[arg(long)]
        force: bool,
    },
}

#[derive(Args)]
struct CaFiles {
    /// The manufacturing CA's certificate (PEM).
    #[arg(long)]
    ca_cert: PathBuf,
    /// The manufacturing CA's private key (PEM: PKCS#8, SEC1 or PKCS#1).
    #[arg(long)]
    ca_key: PathBuf,
}

impl CaFiles {
    fn load(&self) -> Result<Ca> {
        Ok(Ca::from_files(&self.ca_cert, &self.ca_key)?)
    }
}

#[derive(Clone, Copy, ValueEnum)]
enum Algorithm {
    P256,
    Rsa2048,
}

impl From<Algorithm> for KeyAlgorithm {
    fn from(a: Algorithm) -> Self {
        match a {
            Algorithm::P256 => KeyAlgorithm::EcdsaP256,
            Algorithm::Rsa2048 => KeyAlgorithm::Rsa2048,
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(dispatch(cli.command)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn dispatch(cmd: Cmd) -> Result<()> {
    match cmd {
        Cmd::Run(args) => run(args).await,
        Cmd::Publish(args) => publish(args).await,
        Cmd::Pki(cmd) => pki(cmd),
        Cmd::Release(cmd) => release(cmd),
        Cmd::Simulate(cmd) => simulate(cmd).await,
    }
}

async fn simulate_update(a: UpdateArgs) -> Result<()> {
    let trusted_keys = update_keys(&a.update_keys)?;
    let load = sim::update::UpdateLoad {
        devices: a.devices,
        concurrency: a.concurrency,
        cohort: a.cohort,
        firmware_version: a.firmware_version,
        trusted_keys,
        failures: sim::update::FailureRates {
            download: a.fail_download,
            verify: a.fail_verify,
            install: a.fail_install,
            silent: a.silent,
        },
        settle: a.settle,
        min_deployments: a.min_deployments,
        download_timeout: Duration::from_secs(60),
    };
    let config = a.sim.config()?;
    let report = sim::update::run(&config, &load).await?;
    let mut out = std::io::stdout().lock();
    if a.sim.json {
        serde_json::to_writer_pretty(&mut out, &report)?;
        writeln!(out)?;
    } else {
        write!(out, "{}", report.to_table())?;
    }
    out.flush()?;
    Ok(())
}

/// Raises the open-file soft limit to the hard limit (one socket per simulated device) and
/// says how many devices that allows, unless the output is JSON.
fn raise_open_files_limit(json: bool) {
    match sim::raise_open_files_limit() {
        Ok(limit) if !json => eprintln!(
            "open-file limit {limit}: room for {} devices in this process",
            sim::devices_allowed(limit)
        ),
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "cannot raise the open-file limit"),
    }
}

fn simulate_merge(a: MergeArgs) -> Result<()> {
    let reports = a
        .reports
        .iter()
        .map(|path| {
            let bytes = std::fs::read(path)
                .with_context(|| format!("cannot read report {}", path.display()))?;
            serde_json::from_slice::<sim::Report>(&bytes).with_context(|| {
                format!(
                    "{} is not the --json report of a simulate run",
                    path.display()
                )
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let merged = sim::merge::merge(&reports).context("cannot merge these reports")?;
    let mut out = std::io::stdout().lock();
    if a.json {
        serde_json::to_writer_pretty(&mut out, &merged)?;
        writeln!(out)?;
    } else {
        write!(out, "{}", merged.to_table())?;
    }
    out.flush()?;
    Ok(())
}

async fn simulate(cmd: SimCmd) -> Result<()> {
    let json = match &cmd {
        SimCmd::Merge(_) => true,
        SimCmd::ConnectStorm(a) => a.sim.json,
        SimCmd::Telemetry(a) => a.sim.json,
        SimCmd::Fanout(a) => a.sim.json,
        SimCmd::Soak(a) => a.sim.json,
        SimCmd::Update(a) => a.sim.json,
    };
    if !matches!(cmd, SimCmd::Merge(_)) {
        raise_open_files_limit(json);
    }
    let (args, scenario) = match cmd {
        SimCmd::Update(a) => return simulate_update(a).await,
        SimCmd::Merge(a) => return simulate_merge(a),
        SimCmd::ConnectStorm(a) => {
            let s = ConnectStorm {
                devices: a.devices,
                concurrency: a.concurrency,
                rate: a.rate,
                hold: a.hold,
                repeat: a.repeat,
            };
            (a.sim, Scenario::ConnectStorm(s))
        }
        SimCmd::Telemetry(a) => {
            let t = TelemetryLoad {
                devices: a.devices,
                concurrency: a.concurrency,
                rate: a.rate,
                qos: qos(a.qos),
                payload_size: a.payload_size,
                duration: a.duration,
                inflight: a.inflight,
                observe: a.observe.observe(),
                report_every: a.report_every,
                subscribe_commands: a.subscribe_commands,
                subscribe: a.subscribe,
                probes: (a.probe_fanout.is_some() || a.probe_commands.is_some()).then(|| Probes {
                    fanout_topic: a.probe_fanout,
                    commands: a.probe_commands.unwrap_or(0),
                    timeout: a.probe_timeout,
                }),
            };
            (a.sim, Scenario::Telemetry(t))
        }
        SimCmd::Soak(a) => {
            let a = *a;
            let churn = Churn {
                per_min: a.churn_per_min.per_min(a.devices),
                mode: match a.drop_mode {
                    DropArg::Abrupt => DropMode::Abrupt,
                    DropArg::Clean => DropMode::Clean,
                    DropArg::Mixed => DropMode::Mixed,
                },
                reconnect_delay: a.reconnect_delay,
                reconnect_jitter: a.reconnect_jitter,
            };
            let load = TelemetryLoad {
                devices: a.devices,
                concurrency: a.concurrency,
                rate: a.rate,
                qos: qos(a.qos),
                payload_size: a.payload_size,
                duration: a.duration,
                inflight: a.inflight,
                observe: a.observe.observe(),
                report_every: Some(a.report_every),
                subscribe_commands: a.subscribe_commands,
                subscribe: Vec::new(),
                probes: None,
            };
            (a.sim, Scenario::Soak(Soak { load, churn }))
        }
        SimCmd::Fanout(a) => {
            let f = Fanout {
                devices: a.devices,
                concurrency: a.concurrency,
                topic: a.topic,
                messages: a.messages,
                interval: a.interval,
                qos: qos(a.qos),
                payload_size: a.payload_size,
                publisher: Publisher {
                    url: a.publisher_url,
                    credentials: credentials(a.publisher_username, a.publisher_password),
                    server_ca_pem: None,
                },
            };
            (a.sim, Scenario::Fanout(f))
        }
    };
    if let Scenario::Telemetry(t) | Scenario::Soak(Soak { load: t, .. }) = &scenario {
        if t.duration >= args.max_duration {
            bail!(
                "--duration {:?} does not fit in --max-duration {:?} (connecting and draining \
                 need time too); raise --max-duration",
                t.duration,
                args.max_duration
            );
        }
    }
    let config = args.config()?;
    let report = sim::run(&config, &scenario).await?;
    if config.progress.is_some() && std::io::stderr().is_terminal() {
        eprintln!();
    }
    let mut out = std::io::stdout().lock();
    if args.json {
        serde_json::to_writer_pretty(&mut out, &report)?;
        writeln!(out)?;
    } else {
        write!(out, "{}", report.to_table())?;
    }
    out.flush()?;
    Ok(())
}

fn qos(q: u8) -> Qos {
    if q == 0 {
        Qos::AtMostOnce
    } else {
        Qos::AtLeastOnce
    }
}

fn credentials(
    username: Option<String>,
    password: Option<String>,
) -> Option<device_client::Credentials> {
    Some(device_client::Credentials {
        username: username?,
        password: password?,
    })
}

/// The live progress line: rewritten in place on a terminal, one line per second otherwise.
fn progress_printer() -> sim::ProgressFn {
    let terminal = std::io::stderr().is_terminal();
    Arc::new(move |line: &str| {
        if terminal {
            eprint!("\r{line}\x1b[K");
        } else {
            eprintln!("{line}");
        }
    })
}

/// `K/N`, 1 <= K <= N.
fn parse_shard(s: &str) -> Result<sim::Shard, String> {
    s.parse().map_err(|e: sim::SimError| e.to_string())
}

/// `200`, `200/s` or `12.5/s`: a positive number per second.
fn parse_rate(s: &str) -> Result<f64, String> {
    let n = s.trim().strip_suffix("/s").unwrap_or(s.trim());
    match n.parse::<f64>() {
        Ok(r) if r.is_finite() && r > 0.0 => Ok(r),
        _ => Err(format!("{s:?} is not a rate like 200 or 200/s")),
    }
}

fn release(cmd: ReleaseCmd) -> Result<()> {
    use device_client::release::SigningKey;
    match cmd {
        ReleaseCmd::Keygen {
            out_key,
            out_pub,
            force,
        } => {
            let key = SigningKey::generate()?;
            write_new(&out_key, key.private_key_pem().as_bytes(), force, true)?;
            write_new(
                &out_pub,
                format!("{}\n", key.public_key_base64()).as_bytes(),
                force,
                false,
            )?;
            println!(
                "{}",
                serde_json::json!({ "key_id": key.key_id(), "public_key": key.public_key_base64() })
            );
        }
        ReleaseCmd::Sign {
            key,
            product_id,
            version,
            url,
            artifact,
        } => {
            let key = SigningKey::from_pem_file(&key)?;
            let bytes = std::fs::read(&artifact)
                .with_context(|| format!("reading {}", artifact.display()))?;
            let signed = key.sign(&product_id, &version, &url, &bytes)?;
            println!("{}", serde_json::to_string_pretty(&signed)?);
        }
    }
    Ok(())
}

/// Writes a file that must not exist yet unless `force`; `secret` files are mode 0600.
fn write_new(path: &Path, bytes: &[u8], force: bool, secret: bool) -> Result<()> {
    if path.exists() && !force {
        bail!("{} exists; pass --force to replace it", path.display());
    }
    std::fs::write(path, bytes).with_context(|| format!("writing {}", path.display()))?;
    #[cfg(unix)]
    if secret {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    }
    Ok(())
}

/// Release signing keys from files (base64 or PEM `PUBLIC KEY`).
fn update_keys(paths: &[PathBuf]) -> Result<Vec<[u8; 32]>> {
    paths
        .iter()
        .map(|path| {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            device_client::fleet_wire::update::parse_public_key(&text)
                .with_context(|| format!("{}", path.display()))
        })
        .collect()
}

/// The reference installer of `device-client run`: keeps the verified artifact as
/// `<dir>/<version>.bin` (written atomically, like the updater's record beside it).
fn file_installer(dir: PathBuf) -> impl device_client::update::Installer {
    move |release: device_client::fleet_wire::update::ReleaseManifest, artifact: bytes::Bytes| {
        let path = dir.join(format!("{}.bin", release.version));
        async move {
            let write = {
                let path = path.clone();
                move || device_client::update::write_atomically(&path, &artifact)
            };
            match tokio::task::spawn_blocking(write).await {
                Ok(written) => written.map_err(|e| format!("writing {}: {e}", path.display())),
                Err(e) => Err(format!("writing {}: {e}", path.display())),
            }
        }
    }
}

async fn run(args: RunArgs) -> Result<()> {
    let trusted_keys = update_keys(&args.update_keys)?;
    let mut config = AgentConfig::new(args.conn.options()?);
    config.cohort = args.cohort;
    config.firmware_version = args.firmware_version.clone();
    config.telemetry_interval = Some(args.telemetry_interval);
    config.stop_after_telemetry = args.count;
    config.offline_buffer = args.offline_buffer;
    let url = config.connect.url.clone();

    let agent = Agent::new(config)
        .on_command(|command: Command| async move {
            match print_json_line(&command) {
                Ok(()) => CommandOutcome::succeeded(),
                Err(e) => CommandOutcome::failed(format!("cannot print the command: {e}")),
            }
        })
        .start()
        .context("cannot start the agent")?;
    tracing::info!(device_id = %agent.device_id(), %url, "agent running; Ctrl-C to stop");
    let download_timeout = Duration::from_secs(300);
    let fetcher = match &args.update_ca {
        Some(ca) => device_client::update::HttpFetcher::with_tls(
            download_timeout,
            &TlsConfig::from_ca_file(ca)?,
        )?,
        None => device_client::update::HttpFetcher::new(download_timeout)?,
    };
    let _updater = device_client::update::Updater::spawn(
        &agent,
        device_client::update::UpdateSettings {
            trusted_keys,
            firmware_version: args.firmware_version,
            state_file: args.update_state,
            update_dir: Some(args.update_dir.clone()),
        },
        fetcher,
        file_installer(args.update_dir),
    );

    tokio::select! {
        r = tokio::signal::ctrl_c() => {
            r.context("cannot listen for Ctrl-C")?;
            tracing::info!("Ctrl-C: disconnecting");
        }
        _ = agent.stopped() => {}
    }
    let status = agent.shutdown().await?;
    tracing::info!(
        telemetry_delivered = status.telemetry_delivered,
        telemetry_dropped = status.telemetry_dropped,
        telemetry_undelivered = status.telemetry_buffered,
        commands = status.commands_received,
        "done"
    );
    if let Some(n) = args.count {
        if status.telemetry_delivered < n {
            bail!(
                "stopped after {} of {n} telemetry messages{}",
                status.telemetry_delivered,
                status
                    .last_error
                    .map(|e| format!(" (last error: {e})"))
                    .unwrap_or_default()
            );
        }
    }
    Ok(())
}

fn print_json_line(command: &Command) -> std::io::Result<()> {
    let line = serde_json::to_string(command)?;
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}")?;
    out.flush()
}

async fn publish(args: PublishArgs) -> Result<()> {
    let opts = args.conn.options()?;
    let id = opts.device_id()?;
    let (topic, retain) = match args.topic_kind {
        TopicKind::Telemetry => (Topic::Telemetry(id), false),
        TopicKind::State => (Topic::State(id), true),
    };
    publish_once(&opts, &topic, args.payload.as_bytes(), retain, args.timeout)
        .await
        .with_context(|| format!("publishing to {topic} via {}", opts.url))?;
    tracing::info!(%topic, "published and acknowledged");
    Ok(())
}

fn pki(cmd: PkiCmd) -> Result<()> {
    match cmd {
        PkiCmd::Ca {
            out_cert,
            out_key,
            cn,
            org,
            days,
            algorithm,
            force,
        } => {
            let opts = CaOptions {
                common_name: cn,
                organization: org,
                validity_days: days,
                algorithm: algorithm.into(),
            };
            let ca = Ca::generate(&opts)?;
            ca.to_pem().write(&out_cert, &out_key, force)?;
            report_written(&out_cert, &out_key);
        }
        PkiCmd::Device {
            ca,
            id,
            out_cert,
            out_key,
            days,
            algorithm,
            force,
        } => {
            let ca = ca.load()?;
            let opts = DeviceCertOptions {
                device_id: id,
                validity_days: days,
                algorithm: algorithm.into(),
            };
            ca.issue_device(&opts)?.write(&out_cert, &out_key, force)?;
            report_written(&out_cert, &out_key);
        }
        PkiCmd::Server {
            ca,
            names,
            out_cert,
            out_key,
            days,
            force,
        } => {
            let ca = ca.load()?;
            ca.issue_server(&names, days)?
                .write(&out_cert, &out_key, force)?;
            report_written(&out_cert, &out_key);
        }
    }
    Ok(())
}

fn report_written(cert: &Path, key: &Path) {
    tracing::info!(cert = %cert.display(), key = %key.display(), "written");
}

/// `500ms`, `5s`, `2m`, `1h`; a bare number is seconds.
/// A duration as humantime writes it (`500ms`, `5s`, `2m`, `1h 30m`); a bare number is seconds.
fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    if let Ok(secs) = s.parse::<u64>() {
        return Ok(Duration::from_secs(secs));
    }
    humantime::parse_duration(s)
        .map_err(|e| format!("{s:?} is not a duration like 500ms, 5s, 2m or 1h: {e}"))
}

#[cfg(test)]
mod tests {

    /// Every flag of every command says what it is (`--help` is the only manual many read).
    #[test]
    fn every_flag_has_help() {
        use clap::CommandFactory;
        fn walk(cmd: &clap::Command, path: &str, missing: &mut Vec<String>) {
            for arg in cmd.get_arguments() {
                let id = arg.get_id().as_str();
                if id == "help" || id == "version" {
                    continue;
                }
                if arg.get_help().is_none() && arg.get_long_help().is_none() {
                    missing.push(format!("{path} --{}", arg.get_long().unwrap_or(id)));
                }
            }
            for sub in cmd.get_subcommands() {
                walk(sub, &format!("{path} {}", sub.get_name()), missing);
            }
        }
        let mut missing = Vec::new();
        walk(&Cli::command(), "device-client", &mut missing);
        assert!(
            missing.is_empty(),
            "flags without help:\n{}",
            missing.join("\n")
        );
    }
    use super::*;

    #[test]
    fn durations() {
        let cases: &[(&str, Option<Duration>)] = &[
            ("500ms", Some(Duration::from_millis(500))),
            ("5s", Some(Duration::from_secs(5))),
            ("5", Some(Duration::from_secs(5))),
            ("2m", Some(Duration::from_secs(120))),
            ("1h", Some(Duration::from_secs(3600))),
            (" 3s ", Some(Duration::from_secs(3))),
            ("", None),
            ("s", None),
            ("1h 30m", Some(Duration::from_secs(5400))),
            ("2d", Some(Duration::from_secs(2 * 86_400))),
            ("5x", None),
            ("-1s", None),
        ];
        for (s, want) in cases {
            assert_eq!(parse_duration(s).ok(), *want, "{s:?}");
        }
    }

    #[test]
    fn churn_rates() {
        let cases: &[(&str, Option<ChurnRate>)] = &[
            ("120", Some(ChurnRate::PerMin(120.0))),
            ("0", Some(ChurnRate::PerMin(0.0))),
            ("2.5", Some(ChurnRate::PerMin(2.5))),
            ("10%", Some(ChurnRate::Percent(10.0))),
            (" 5 % ", Some(ChurnRate::Percent(5.0))),
            ("-1", None),
            ("%", None),
            ("lots", None),
            ("inf", None),
        ];
        for (s, want) in cases {
            assert_eq!(parse_churn(s).ok(), *want, "{s:?}");
        }
    }

    #[test]
    fn rates() {
        let cases: &[(&str, Option<f64>)] = &[
            ("200", Some(200.0)),
            ("200/s", Some(200.0)),
            ("12.5/s", Some(12.5)),
            ("0", None),
            ("-1/s", None),
            ("fast", None),
            ("inf", None),
        ];
        for (s, want) in cases {
            assert_eq!(parse_rate(s).ok(), *want, "{s:?}");
        }
    }

    #[test]
    fn simulate_parses() {
        let cli = Cli::try_parse_from([
            "device-client",
            "simulate",
            "connect-storm",
            "--url",
            "mqtts://127.0.0.1:8883",
            "--server-ca",
            "ca.pem",
            "--ca-cert",
            "mfg.pem",
            "--ca-key",
            "mfg.key",
            "--devices",
            "1000",
            "--concurrency",
            "50",
            "--rate",
            "200/s",
            "--hold",
            "--repeat",
            "1",
        ])
        .unwrap();
        let Cmd::Simulate(SimCmd::ConnectStorm(a)) = cli.command else {
            panic!("not connect-storm");
        };
        assert_eq!((a.devices, a.concurrency, a.rate), (1000, 50, Some(200.0)));
        assert!(a.hold && a.repeat == 1 && !a.sim.json);
        assert_eq!(a.sim.max_duration, Duration::from_secs(300));
        assert_eq!(a.sim.shard, sim::Shard::WHOLE);
        assert_eq!(a.sim.urls.len(), 1);

        // Several broker URLs, repeated or comma-separated, and a shard.
        let cli = Cli::try_parse_from([
            "device-client",
            "simulate",
            "connect-storm",
            "--url",
            "mqtt://10.0.0.1:1883,mqtt://10.0.0.2:1883",
            "--url",
            "mqtt://10.0.0.3:1883",
            "--shard",
            "2/3",
            "--devices",
            "30000",
        ])
        .unwrap();
        let Cmd::Simulate(SimCmd::ConnectStorm(a)) = cli.command else {
            panic!("not connect-storm");
        };
        let urls: Vec<String> = a.sim.urls.iter().map(ToString::to_string).collect();
        assert_eq!(
            urls,
            [
                "mqtt://10.0.0.1:1883",
                "mqtt://10.0.0.2:1883",
                "mqtt://10.0.0.3:1883"
            ]
        );
        assert_eq!(a.sim.shard, sim::Shard::new(2, 3).unwrap());
        for bad in ["0/3", "4/3", "3"] {
            let e = Cli::try_parse_from([
                "device-client",
                "simulate",
                "connect-storm",
                "--url",
                "mqtt://10.0.0.1:1883",
                "--shard",
                bad,
            ]);
            assert!(e.is_err(), "{bad}");
        }

        let cli = Cli::try_parse_from([
            "device-client",
            "simulate",
            "telemetry",
            "--url",
            "mqtt://127.0.0.1:1883",
            "--qos",
            "0",
            "--duration",
            "2s",
            "--observe-url",
            "mqtt://127.0.0.1:1883",
            "--subscribe-commands",
            "--json",
        ])
        .unwrap();
        let Cmd::Simulate(SimCmd::Telemetry(t)) = cli.command else {
            panic!("not telemetry");
        };
        assert_eq!((t.qos, t.duration), (0, Duration::from_secs(2)));
        assert!(t.sim.json && t.observe.observe_url.is_some() && t.subscribe_commands);
        assert!(t.subscribe.is_empty() && t.probe_fanout.is_none() && t.probe_commands.is_none());
        let telemetry = |extra: &[&str]| {
            let mut args = vec![
                "device-client",
                "simulate",
                "telemetry",
                "--url",
                "mqtt://127.0.0.1:1883",
            ];
            args.extend_from_slice(extra);
            Cli::try_parse_from(args)
        };
        let cli = telemetry(&[
            "--subscribe-commands",
            "--subscribe",
            "cohorts/c1/updates",
            "--subscribe",
            "cohorts/c1/commands",
            "--observe-url",
            "mqtt://127.0.0.1:1883",
            "--probe-fanout",
            "cohorts/c1/commands",
            "--probe-commands",
            "50",
        ])
        .unwrap();
        let Cmd::Simulate(SimCmd::Telemetry(t)) = cli.command else {
            panic!("not telemetry");
        };
        assert_eq!(t.subscribe, ["cohorts/c1/updates", "cohorts/c1/commands"]);
        assert_eq!(t.probe_fanout.as_deref(), Some("cohorts/c1/commands"));
        assert_eq!(
            (t.probe_commands, t.probe_timeout),
            (Some(50), Duration::from_secs(10))
        );
        // Probes are sent from the observer's session; single commands need the subscription.
        assert!(telemetry(&["--probe-fanout", "cohorts/c1/commands"]).is_err());
        assert!(telemetry(&[
            "--observe-url",
            "mqtt://127.0.0.1:1883",
            "--probe-commands",
            "5"
        ])
        .is_err());
        let cli = Cli::try_parse_from([
            "device-client",
            "simulate",
            "fanout",
            "--url",
            "mqtt://127.0.0.1:1883",
            "--publisher-url",
            "mqtt://127.0.0.1:8884",
            "--publisher-username",
            "svc",
            "--publisher-password",
            "key",
            "--messages",
            "3",
            "--interval",
            "500ms",
        ])
        .unwrap();
        let Cmd::Simulate(SimCmd::Fanout(f)) = cli.command else {
            panic!("not fanout");
        };
        assert_eq!(f.topic, "devices/{id}/commands");
        assert_eq!((f.messages, f.interval), (3, Duration::from_millis(500)));
        assert!(credentials(f.publisher_username, f.publisher_password).is_some());

        let cli = Cli::try_parse_from([
            "device-client",
            "simulate",
            "soak",
            "--url",
            "mqtt://127.0.0.1:1883",
            "--duration",
            "1h",
            "--max-duration",
            "2h",
        ])
        .unwrap();
        let Cmd::Simulate(SimCmd::Soak(s)) = cli.command else {
            panic!("not soak");
        };
        assert_eq!(
            (s.duration, s.report_every, s.rate),
            (Duration::from_secs(3600), Duration::from_secs(60), 0.1)
        );
        assert_eq!(s.churn_per_min, ChurnRate::Percent(10.0));
        assert_eq!(s.churn_per_min.per_min(1000), 100.0);
        assert!(matches!(s.drop_mode, DropArg::Mixed));
        assert!(s.observe.observe().is_none() && !s.subscribe_commands);
        let cli = Cli::try_parse_from([
            "device-client",
            "simulate",
            "soak",
            "--url",
            "mqtt://127.0.0.1:1883",
            "--duration",
            "60s",
            "--churn-per-min",
            "120",
            "--drop-mode",
            "abrupt",
            "--reconnect-delay",
            "1s",
            "--reconnect-jitter",
            "500ms",
        ])
        .unwrap();
        let Cmd::Simulate(SimCmd::Soak(s)) = cli.command else {
            panic!("not soak");
        };
        assert_eq!(s.churn_per_min.per_min(1000), 120.0);
        assert!(matches!(s.drop_mode, DropArg::Abrupt));
        assert_eq!(
            (s.reconnect_delay, s.reconnect_jitter),
            (Duration::from_secs(1), Duration::from_millis(500))
        );

        for bad in [
            &["--qos", "2"][..],
            &["--ca-cert", "only-cert.pem"][..],
            &["--observe-username", "svc"][..],
        ] {
            let mut args = vec![
                "device-client",
                "simulate",
                "telemetry",
                "--url",
                "mqtt://h",
            ];
            args.extend_from_slice(bad);
            assert!(Cli::try_parse_from(args).is_err(), "{bad:?}");
        }

        // A password alone, as an exported DEVICE_CLIENT_OBSERVE_PASSWORD gives, is not used.
        let cli = Cli::try_parse_from([
            "device-client",
            "simulate",
            "telemetry",
            "--url",
            "mqtt://h",
            "--observe-password",
            "key",
        ])
        .unwrap();
        let Cmd::Simulate(SimCmd::Telemetry(t)) = cli.command else {
            panic!("not telemetry");
        };
        assert!(t.observe.observe().is_none());
    }

    #[test]
    fn cli_parses() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
        let cli = Cli::try_parse_from([
            "device-client",
            "run",
            "--url",
            "mqtt://127.0.0.1:1883",
            "--client-id",
            "dev-1",
            "--telemetry-interval",
            "250ms",
            "--count",
            "3",
        ])
        .unwrap();
        assert!(matches!(
            cli.command,
            Cmd::Run(RunArgs { count: Some(3), .. })
        ));
        assert!(Cli::try_parse_from([
            "device-client",
            "publish",
            "--url",
            "mqtt://h",
            "--topic-kind",
            "bogus",
            "--payload",
            "{}"
        ])
        .is_err());
    }
}

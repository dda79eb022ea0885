//! Settings. Listeners, paths and secrets come from flags or environment variables; tuning
//! comes from an optional TOML file (`config/fleet.toml` documents every key and default).
//! Tests build [`Config`] values directly and never touch the process environment.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::Context;
use broker::BrokerConfig;
use serde::{Deserialize, Serialize};

/// The commented default tuning file, embedded so `fleet-service print-config` can show it.
pub const DEFAULT_TUNING: &str = include_str!("../../config/fleet.toml");

#[derive(Debug, clap::Parser)]
#[command(
    name = "fleet-service",
    version,
    about = "Device messaging and fleet management platform"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Run the whole platform: broker, fleet service and REST bridge.
    Serve(ServeArgs),
    /// Run a broker node of a cluster: the device and service listeners, sessions and router;
    /// events go to NATS JetStream, live messages to the other nodes (needs --nats-url and a
    /// PostgreSQL --database-url).
    Broker(ServeArgs),
    /// Run a fleet-service replica of a cluster: event intake from NATS JetStream, the rollout
    /// engine and the REST bridge (needs --nats-url and a PostgreSQL --database-url).
    Api(ServeArgs),
    /// Print the commented default tuning file.
    PrintConfig,
}

/// Which parts of the platform a process runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Everything in one process (`serve`).
    All,
    /// A broker node (`broker`).
    Broker,
    /// A fleet-service replica (`api`).
    Api,
}

impl Role {
    pub fn runs_broker(self) -> bool {
        matches!(self, Role::All | Role::Broker)
    }
    pub fn runs_api(self) -> bool {
        matches!(self, Role::All | Role::Api)
    }
}

#[derive(Debug, Clone, clap::Args)]
pub struct ServeArgs {
    /// Where the SQLite database, the dev PKI and the admin token live.
    #[arg(long, env = "FLEET_DATA_DIR", default_value = "./data")]
    pub data_dir: PathBuf,
    /// `sqlite://...` or `postgres://...`. Default: sqlite://<data-dir>/fleet.db
    #[arg(long, env = "FLEET_DATABASE_URL")]
    pub database_url: Option<String>,
    /// Device listener (MQTT over mutual TLS).
    #[arg(long, env = "FLEET_MQTTS_LISTEN", default_value = "0.0.0.0:8883")]
    pub mqtts_listen: SocketAddr,
    /// Backend-service listener (MQTT, API key as password).
    #[arg(long, env = "FLEET_SERVICE_LISTEN", default_value = "127.0.0.1:8884")]
    pub service_listen: SocketAddr,
    /// REST bridge.
    #[arg(long, env = "FLEET_HTTP_LISTEN", default_value = "127.0.0.1:8080")]
    pub http_listen: SocketAddr,
    /// Conformance-testing listener: anonymous MQTT over plain TCP, any topic outside
    /// devices/ and cohorts/ (for MQTT conformance suites only). Off unless given; a loopback
    /// address only.
    #[arg(long, env = "FLEET_CONFORMANCE_LISTEN")]
    pub conformance_listen: Option<SocketAddr>,
    /// Bootstrap admin API key. Generated, stored in <data-dir>/admin-token and printed when unset.
    #[arg(long, env = "FLEET_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,
    /// Tuning file (see config/fleet.toml; config/cluster.toml for a cluster).
    #[arg(long, env = "FLEET_CONFIG")]
    pub config: Option<PathBuf>,
    /// NATS server with JetStream (`nats://host:4222`), the cluster's backbone. Required by
    /// `broker` and `api`; with `serve` it puts the single process on the backbone too.
    #[arg(long, env = "FLEET_NATS_URL")]
    pub nats_url: Option<String>,
    /// This process's name in the cluster (unique per broker node; it marks the sessions the
    /// node holds). Overrides `node_id` in the tuning file.
    #[arg(long, env = "FLEET_NODE_ID")]
    pub node_id: Option<String>,
    /// Server certificate chain (PEM, leaf first) the device listener presents, issued by a
    /// CA of your own for the names devices connect to; needs --tls-key. Without it the dev
    /// PKI's certificate (<data-dir>/pki/) is used.
    #[arg(long, env = "FLEET_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// Private key (PEM: PKCS#8, SEC1 or PKCS#1) of --tls-cert.
    #[arg(long, env = "FLEET_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// A host name or IP address to add to the dev server certificate, which always names
    /// localhost and 127.0.0.1: the address devices on other machines connect to. Repeat it or
    /// give a comma list; the certificate is re-issued from the same dev CA when the names
    /// change, so devices keep trusting server-ca.pem.
    #[arg(
        long = "server-name",
        env = "FLEET_SERVER_NAMES",
        value_delimiter = ',',
        conflicts_with = "tls_cert"
    )]
    pub server_names: Vec<String>,
}

/// The certificate the device listener presents.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerTls {
    /// Issued by the dev PKI for localhost, 127.0.0.1 and these further names.
    Dev { names: Vec<String> },
    /// The operator's own chain and key.
    Own { cert: PathBuf, key: PathBuf },
}

impl ServerTls {
    fn from_args(
        cert: Option<PathBuf>,
        key: Option<PathBuf>,
        names: Vec<String>,
    ) -> anyhow::Result<Self> {
        match (cert, key) {
            (Some(cert), Some(key)) => Ok(ServerTls::Own { cert, key }),
            (None, None) => {
                let mut names: Vec<String> = names
                    .into_iter()
                    .map(|n| n.trim().to_ascii_lowercase())
                    .filter(|n| !n.is_empty())
                    .collect();
                if let Some(bad) = names.iter().find(|n| !is_server_name(n)) {
                    anyhow::bail!(
                        "--server-name {bad:?} is neither an IP address nor a host name (letters, digits, '-' and '.')"
                    );
                }
                names.sort();
                names.dedup();
                Ok(ServerTls::Dev { names })
            }
            _ => anyhow::bail!("--tls-cert and --tls-key go together: give both or neither"),
        }
    }
}

/// An IP address, or a DNS name whose labels are letters, digits and inner hyphens (a leading
/// `*.` wildcard allowed).
fn is_server_name(name: &str) -> bool {
    if name.parse::<std::net::IpAddr>().is_ok() {
        return true;
    }
    let host = name.strip_prefix("*.").unwrap_or(name);
    name.len() <= 253
        && host.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        })
}

/// Tuning that rarely changes; the TOML file's shape.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Tuning {
    pub node_id: String,
    pub broker: BrokerConfig,
    pub intake: IntakeTuning,
    pub telemetry: TelemetryTuning,
    pub rollout: RolloutTuning,
    pub ca: CaTuning,
    pub devices: DeviceTuning,
    pub audit: AuditTuning,
    pub listen: ListenTuning,
    pub cluster: ClusterTuning,
}

/// Running as a cluster (`broker` / `api`); ignored by `serve` without `--nats-url`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterTuning {
    /// Namespace of the cluster's NATS subjects and streams, so several installations can
    /// share one NATS.
    pub prefix: String,
    /// A broker node renews its lease this often.
    pub node_lease_renew_ms: u64,
    /// A node that could not renew its lease for this long stops taking connections; its
    /// lease lives twice this long, after which another process declares its devices lost
    /// (`node_lost`).
    pub node_fence_after_ms: u64,
    /// The rollout engine and the pruners run on one replica, which holds a lease this long.
    pub leader_lease_ttl_ms: u64,
    /// JetStream: the events stream refuses (and PUBACKs wait) beyond this many bytes.
    pub events_max_bytes: i64,
    /// JetStream: a publish repeated within this window (same message id) is stored once.
    pub duplicate_window_secs: u64,
    /// JetStream: an event a replica took but did not acknowledge goes to another after this.
    pub ack_wait_secs: u64,
}

impl Default for ClusterTuning {
    fn default() -> Self {
        Self {
            prefix: "fleet".into(),
            node_lease_renew_ms: 2000,
            node_fence_after_ms: 5000,
            leader_lease_ttl_ms: 6000,
            events_max_bytes: 1 << 30,
            duplicate_window_secs: 120,
            ack_wait_secs: 30,
        }
    }
}

/// The listening sockets.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ListenTuning {
    /// Connections the kernel queues before they are accepted (capped by the system's
    /// `net.core.somaxconn`). A restarted node sees every device reconnect at once.
    pub backlog: u32,
}

impl Default for ListenTuning {
    fn default() -> Self {
        Self { backlog: 4096 }
    }
}

/// Security events the platform records on its own.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuditTuning {
    /// This many refused connections of one organization within one window make a
    /// `connection.rejected_burst` audit entry.
    pub rejected_burst_threshold: usize,
    pub rejected_burst_window_secs: u64,
    /// Entries older than this many days are deleted (with the telemetry pruning); 0 keeps
    /// them forever.
    pub retention_days: u64,
}

impl Default for AuditTuning {
    fn default() -> Self {
        Self {
            rejected_burst_threshold: 20,
            rejected_burst_window_secs: 10,
            retention_days: 400,
        }
    }
}

/// Registering manufacturing CAs.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CaTuning {
    /// A CA is registered only with a verification certificate it signed whose CN is a
    /// verification code the organization asked for.
    pub require_proof_of_possession: bool,
    pub verification_code_ttl_secs: u64,
}

impl Default for CaTuning {
    fn default() -> Self {
        Self {
            require_proof_of_possession: true,
            verification_code_ttl_secs: 3600,
        }
    }
}

/// Device lifecycle defaults.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DeviceTuning {
    /// What a quarantined device may do when the request does not say: `commands_only` (it
    /// may connect to receive and acknowledge its commands) or `refuse`.
    pub quarantine_mode: String,
    /// Most first connections provisioned in one database transaction (a group commit).
    pub jitp_max_batch: usize,
}

impl Default for DeviceTuning {
    fn default() -> Self {
        Self {
            quarantine_mode: "commands_only".into(),
            jitp_max_batch: 256,
        }
    }
}

impl Default for Tuning {
    fn default() -> Self {
        Self {
            node_id: "node-1".into(),
            broker: BrokerConfig::default(),
            intake: IntakeTuning::default(),
            telemetry: TelemetryTuning::default(),
            rollout: RolloutTuning::default(),
            ca: CaTuning::default(),
            devices: DeviceTuning::default(),
            audit: AuditTuning::default(),
            listen: ListenTuning::default(),
            cluster: ClusterTuning::default(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RolloutTuning {
    pub tick_ms: u64,
}

impl Default for RolloutTuning {
    fn default() -> Self {
        Self { tick_ms: 1000 }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IntakeTuning {
    pub max_batch: usize,
    pub bus_capacity: usize,
}

impl Default for IntakeTuning {
    fn default() -> Self {
        Self {
            max_batch: 2048,
            bus_capacity: 8192,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetryTuning {
    pub retention_hours: u64,
    pub prune_interval_secs: u64,
}

impl Default for TelemetryTuning {
    fn default() -> Self {
        Self {
            retention_hours: 168,
            prune_interval_secs: 300,
        }
    }
}

/// Everything the platform needs to start.
#[derive(Debug, Clone)]
pub struct Config {
    pub data_dir: PathBuf,
    pub database_url: String,
    pub mqtts_listen: SocketAddr,
    pub service_listen: SocketAddr,
    pub http_listen: SocketAddr,
    /// The conformance listener, if any (see [`check_conformance_listen`]).
    pub conformance_listen: Option<SocketAddr>,
    pub admin_token: Option<String>,
    pub tuning: Tuning,
    pub role: Role,
    /// The cluster's NATS; None: the embedded bus, one process.
    pub nats_url: Option<String>,
    /// The device listener's certificate.
    pub server_tls: ServerTls,
}

impl Config {
    /// Defaults for a data directory, every listener on 127.0.0.1 port 0: what tests start from.
    pub fn for_tests(data_dir: &Path) -> Self {
        let any = "127.0.0.1:0".parse().expect("valid address");
        Self {
            data_dir: data_dir.to_path_buf(),
            database_url: sqlite_url(data_dir),
            mqtts_listen: any,
            service_listen: any,
            http_listen: any,
            conformance_listen: None,
            admin_token: None,
            tuning: Tuning::default(),
            role: Role::All,
            nats_url: None,
            server_tls: ServerTls::Dev { names: Vec::new() },
        }
    }

    pub fn from_args(args: ServeArgs) -> anyhow::Result<Self> {
        Self::for_role(args, Role::All)
    }

    /// Settings of a process that runs `role`; `broker` and `api` need NATS and PostgreSQL.
    pub fn for_role(args: ServeArgs, role: Role) -> anyhow::Result<Self> {
        let mut tuning = match &args.config {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("reading {}", path.display()))?;
                parse_tuning(&text).with_context(|| format!("in {}", path.display()))?
            }
            None => Tuning::default(),
        };
        if let Some(token) = args.admin_token.as_deref().filter(|t| t.len() < 16) {
            // Name what the user gave: the flag, or the environment variable behind it.
            let given = if std::env::var("FLEET_ADMIN_TOKEN").ok().as_deref() == Some(token) {
                "FLEET_ADMIN_TOKEN"
            } else {
                "--admin-token"
            };
            anyhow::bail!("{given} must be at least 16 characters");
        }
        let database_url = args
            .database_url
            .unwrap_or_else(|| sqlite_url(&args.data_dir));
        if !(database_url.starts_with("sqlite:") || database_url.starts_with("postgres")) {
            anyhow::bail!("--database-url must start with sqlite:// or postgres://");
        }
        if let Some(node_id) = args.node_id {
            if node_id.is_empty() || node_id.contains(|c: char| c.is_whitespace() || c == '.') {
                anyhow::bail!("--node-id must be non-empty, without spaces or dots");
            }
            tuning.node_id = node_id;
        }
        if role != Role::All {
            let what = if role == Role::Broker {
                "broker"
            } else {
                "api"
            };
            if args.nats_url.is_none() {
                anyhow::bail!(
                    "`fleet-service {what}` runs in a cluster: give --nats-url (or FLEET_NATS_URL)"
                );
            }
            if !database_url.starts_with("postgres") {
                anyhow::bail!("`fleet-service {what}` runs in a cluster, whose processes share one PostgreSQL: give a postgres:// --database-url");
            }
        }
        let server_tls = ServerTls::from_args(args.tls_cert, args.tls_key, args.server_names)?;
        Ok(Self {
            server_tls,
            data_dir: args.data_dir,
            database_url,
            mqtts_listen: args.mqtts_listen,
            service_listen: args.service_listen,
            http_listen: args.http_listen,
            conformance_listen: args.conformance_listen,
            admin_token: args.admin_token,
            tuning,
            role,
            nats_url: args.nats_url,
        })
    }
}

/// The conformance listener takes anonymous clients without TLS, so it may only listen where
/// nothing but this machine reaches it.
pub fn check_conformance_listen(addr: SocketAddr) -> anyhow::Result<()> {
    if !addr.ip().is_loopback() {
        anyhow::bail!(
            "--conformance-listen {addr} refused: the conformance listener takes anonymous clients \
             without TLS, so it listens only on a loopback address (127.0.0.0/8 or ::1)"
        );
    }
    Ok(())
}

pub fn parse_tuning(text: &str) -> anyhow::Result<Tuning> {
    Ok(toml::from_str(text)?)
}

fn sqlite_url(data_dir: &Path) -> String {
    format!("sqlite://{}", data_dir.join("fleet.db").display())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_file_matches_defaults() {
        let parsed = parse_tuning(DEFAULT_TUNING).unwrap();
        let defaults = Tuning::default();
        assert_eq!(
            toml::to_string(&parsed).unwrap(),
            toml::to_string(&defaults).unwrap(),
            "config/fleet.toml and the code's defaults disagree"
        );
    }

    #[test]
    fn receive_maximum_keeps_its_former_name() {
        let t = parse_tuning("[broker]\nmax_pending_acks = 100\n").unwrap();
        assert_eq!(t.broker.receive_maximum, 100);
    }

    #[test]
    fn a_short_admin_token_is_refused_naming_the_flag() {
        let args = ServeArgs {
            data_dir: "./data".into(),
            database_url: None,
            mqtts_listen: "127.0.0.1:0".parse().unwrap(),
            service_listen: "127.0.0.1:0".parse().unwrap(),
            http_listen: "127.0.0.1:0".parse().unwrap(),
            conformance_listen: None,
            admin_token: Some("short".into()),
            config: None,
            nats_url: None,
            node_id: None,
            tls_cert: None,
            tls_key: None,
            server_names: Vec::new(),
        };
        let err = Config::from_args(args).unwrap_err().to_string();
        assert_eq!(err, "--admin-token must be at least 16 characters");
    }

    #[test]
    fn server_names_are_checked_and_tidied() {
        let dev = |names: &[&str]| {
            ServerTls::from_args(None, None, names.iter().map(|n| n.to_string()).collect())
        };
        assert_eq!(
            dev(&[
                "Fleet.Example.com",
                "192.168.1.20",
                "fleet.example.com",
                " ",
                "::1"
            ])
            .unwrap(),
            ServerTls::Dev {
                names: vec![
                    "192.168.1.20".into(),
                    "::1".into(),
                    "fleet.example.com".into()
                ]
            }
        );
        assert!(dev(&["*.fleet.example.com"]).is_ok());
        for bad in ["exa mple.com", "-bad.com", "a..b", "ünï.com", "x/y"] {
            let err = dev(&[bad]).unwrap_err().to_string();
            assert!(err.contains("--server-name"), "{bad}: {err}");
        }
    }

    #[test]
    fn own_certificate_needs_its_key() {
        use clap::Parser;
        let err = Cli::try_parse_from(["fleet-service", "serve", "--tls-cert", "c.pem"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("--tls-key"), "{err}");
        let err = Cli::try_parse_from([
            "fleet-service",
            "serve",
            "--tls-cert",
            "c.pem",
            "--tls-key",
            "k.pem",
            "--server-name",
            "fleet.example.com",
        ])
        .unwrap_err()
        .to_string();
        assert!(err.contains("cannot be used with"), "{err}");
    }

    /// Every flag says what it is.
    #[test]
    fn every_flag_has_help() {
        use clap::CommandFactory;
        let cli = Cli::command();
        let mut missing = Vec::new();
        for sub in cli.get_subcommands() {
            for arg in sub.get_arguments() {
                let id = arg.get_id().as_str();
                if id != "help" && id != "version" && arg.get_help().is_none() {
                    missing.push(format!("{} --{id}", sub.get_name()));
                }
            }
        }
        assert!(missing.is_empty(), "flags without help: {missing:?}");
    }

    #[test]
    fn conformance_listener_is_loopback_only() {
        for ok in ["127.0.0.1:0", "127.1.2.3:1883", "[::1]:1883"] {
            assert!(
                check_conformance_listen(ok.parse().unwrap()).is_ok(),
                "{ok}"
            );
        }
        for bad in ["0.0.0.0:1883", "192.168.1.20:1883", "[::]:1883"] {
            let err = check_conformance_listen(bad.parse().unwrap())
                .unwrap_err()
                .to_string();
            assert!(err.contains("loopback"), "{bad}: {err}");
        }
    }

    #[test]
    fn typos_fail_loudly() {
        let err = parse_tuning("[broker]\nmax_pakcet_size = 5\n").unwrap_err();
        assert!(format!("{err:#}").contains("max_pakcet_size"), "{err:#}");
    }
}

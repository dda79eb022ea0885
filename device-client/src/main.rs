//! `device-client`: run a device agent, publish one message, or issue certificates.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};
use device_client::fleet_wire::payload::Command;
use device_client::fleet_wire::{CohortId, DeviceId, Topic};
use device_client::pki::{Ca, CaOptions, DeviceCertOptions, KeyAlgorithm};
use device_client::{
    publish_once, Agent, AgentConfig, BrokerUrl, ClientIdentity, CommandOutcome, ConnectOptions,
    TlsConfig,
};

#[derive(Parser)]
#[command(
    name = "device-client",
    version,
    about = "Fleet device client: MQTT agent, one-shot publish and device PKI"
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
    #[arg(long, requires = "password")]
    username: Option<String>,
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
        #[arg(long)]
        out_cert: PathBuf,
        #[arg(long)]
        out_key: PathBuf,
        #[arg(long, default_value = "Acme Manufacturing CA")]
        cn: String,
        #[arg(long)]
        org: Option<String>,
        #[arg(long, default_value_t = 3650)]
        days: u32,
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
        #[arg(long)]
        id: DeviceId,
        #[arg(long)]
        out_cert: PathBuf,
        #[arg(long)]
        out_key: PathBuf,
        #[arg(long, default_value_t = 365)]
        days: u32,
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
        #[arg(long)]
        out_cert: PathBuf,
        #[arg(long)]
        out_key: PathBuf,
        #[arg(long, default_value_t = 365)]
        days: u32,
        #[arg(long)]
        force: bool,
    },
}

#[derive(Args)]
struct CaFiles {
    #[arg(long)]
    ca_cert: PathBuf,
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
    }
}

async fn run(args: RunArgs) -> Result<()> {
    let mut config = AgentConfig::new(args.conn.options()?);
    config.cohort = args.cohort;
    config.firmware_version = args.firmware_version;
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
                algorithm: match algorithm {
                    Algorithm::P256 => KeyAlgorithm::EcdsaP256,
                    Algorithm::Rsa2048 => KeyAlgorithm::Rsa2048,
                },
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
            force,
        } => {
            let ca = ca.load()?;
            let opts = DeviceCertOptions {
                device_id: id,
                validity_days: days,
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
fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (digits, unit) = s.split_at(split);
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("{s:?} is not a duration like 500ms, 5s, 2m or 1h"))?;
    let d = match unit {
        "ms" => Duration::from_millis(n),
        "" | "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n.saturating_mul(60)),
        "h" => Duration::from_secs(n.saturating_mul(3600)),
        other => {
            return Err(format!(
                "unknown unit {other:?} in {s:?}; use ms, s, m or h"
            ))
        }
    };
    Ok(d)
}

#[cfg(test)]
mod tests {
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
            ("1.5s", None),
            ("5d", None),
            ("-1s", None),
        ];
        for (s, want) in cases {
            assert_eq!(parse_duration(s).ok(), *want, "{s:?}");
        }
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

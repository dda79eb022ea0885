//! Builds and runs the whole platform from a [`Config`]: it binds the listeners (port 0 works:
//! the addresses it really got are reported), then runs broker, intake, REST bridge and the
//! telemetry pruner until asked to stop.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use broker::metrics::Metrics;
use broker::registry::Registry;
use broker::{Broker, BrokerControl};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{info, warn};

use crate::config::Config;
use crate::keys::ApiKeys;
use crate::ops::{Applier, Ops};
use crate::pki::DevPki;
use crate::store::{Store, TelemetryRetention};

/// A running platform.
pub struct App {
    mqtts_addr: SocketAddr,
    service_addr: SocketAddr,
    http_addr: SocketAddr,
    admin_token: String,
    pki: DevPki,
    store: Store,
    control: BrokerControl,
    keys: ApiKeys,
    ops: Ops,
    stop: watch::Sender<bool>,
    broker_task: JoinHandle<()>,
    intake_task: JoinHandle<()>,
    http_task: JoinHandle<()>,
    pruner_task: JoinHandle<()>,
    security_task: JoinHandle<()>,
    rollout_task: JoinHandle<()>,
}

impl App {
    /// Starts everything and returns once every listener is bound and serving.
    pub async fn start(config: Config) -> anyhow::Result<App> {
        std::fs::create_dir_all(&config.data_dir)
            .with_context(|| format!("creating {}", config.data_dir.display()))?;
        let pki = DevPki::in_dir(&config.data_dir);
        let identity = pki.ensure().context("dev PKI")?;

        let store = Store::connect(&config.database_url)
            .await
            .with_context(|| format!("opening the database ({})", redact(&config.database_url)))?;
        let admin_token = admin_token(&config)?;
        crate::keys::ensure_bootstrap_admin(&store, &admin_token)
            .await
            .context("bootstrap admin key")?;
        let keys = ApiKeys::load(&store).await.context("loading API keys")?;

        let node_id = &config.tuning.node_id;
        let stale = store
            .mark_node_offline(node_id)
            .await
            .context("marking devices of the previous run offline")?;
        if !stale.is_empty() {
            info!(
                count = stale.len(),
                "devices still online from a previous run marked offline (server_restart)"
            );
        }

        raise_open_file_limit();
        let metrics = Arc::new(Metrics::default());
        let writer = crate::provisioning::ProvisionWriter::start(
            store.clone(),
            config.tuning.devices.jitp_max_batch,
        );
        let registry = Arc::new(Registry::new(Arc::new(writer), metrics.clone()));
        let control = BrokerControl::new(registry, metrics);
        Applier::new(store.clone(), control.clone(), keys.clone())
            .load_registry()
            .await
            .context("loading the registry (CAs, devices, cohorts, revocations, quarantines)")?;
        let rollouts = crate::rollout::Rollouts::new();
        let ops = Ops::local(
            store.clone(),
            keys.clone(),
            control.clone(),
            rollouts.clone(),
        );

        let (bus, source) = broker::bus::embedded(config.tuning.intake.bus_capacity);
        let broker = Broker::new(
            &config.tuning.broker,
            identity,
            control.clone(),
            Arc::new(bus),
            Arc::new(keys.clone()),
        )?;

        // The broker's retained messages live in memory: a moved device that connects after
        // a restart must still learn where it belongs.
        ops.republish_assignments()
            .await
            .context("publishing the devices' assignments")?;

        let backlog = config.tuning.listen.backlog;
        let devices = bind(config.mqtts_listen, backlog, "MQTTS device")?;
        let services = bind(config.service_listen, backlog, "service")?;
        let http = bind(config.http_listen, backlog, "HTTP")?;
        log_backlog(backlog);
        let mqtts_addr = devices.local_addr()?;
        let service_addr = services.local_addr()?;
        let http_addr = http.local_addr()?;

        let (stop, stopped) = watch::channel(false);
        let intake_task = tokio::spawn(crate::intake::run(
            source,
            store.clone(),
            crate::intake::IntakeOptions {
                max_batch: config.tuning.intake.max_batch,
                node_id: node_id.clone(),
                ..Default::default()
            },
        ));
        let broker_task = tokio::spawn(broker.serve(devices, services, wait_stop(stopped.clone())));
        let rollout_task = tokio::spawn(crate::rollout::run(
            store.clone(),
            ops.clone(),
            rollouts,
            Duration::from_millis(config.tuning.rollout.tick_ms),
            stopped.clone(),
        ));
        let default_quarantine =
            broker::registry::QuarantineMode::parse(&config.tuning.devices.quarantine_mode)
                .context("[devices] quarantine_mode must be \"commands_only\" or \"refuse\"")?;
        let mut api_state = crate::api::ApiState::with_ops(store.clone(), ops.clone());
        api_state.settings = crate::api::ApiSettings {
            require_ca_proof: config.tuning.ca.require_proof_of_possession,
            verification_code_ttl_ms: (config.tuning.ca.verification_code_ttl_secs as i64)
                .saturating_mul(1000),
            default_quarantine,
        };
        let api = crate::api::router(api_state);
        let http_stop = wait_stop(stopped.clone());
        let http_task = tokio::spawn(async move {
            if let Err(e) = axum::serve(
                http,
                api.into_make_service_with_connect_info::<std::net::SocketAddr>(),
            )
            .with_graceful_shutdown(http_stop)
            .await
            {
                warn!(error = %e, "HTTP server failed");
            }
        });
        let security_task = tokio::spawn(crate::security::watch_rejections(
            store.clone(),
            control.clone(),
            config.tuning.audit.rejected_burst_threshold.max(1),
            Duration::from_secs(config.tuning.audit.rejected_burst_window_secs.max(1)),
            stopped.clone(),
        ));
        let pruner_task = tokio::spawn(prune_loop(
            store.clone(),
            config.tuning.telemetry.clone(),
            config.tuning.audit.retention_days,
            stopped,
        ));

        info!(%mqtts_addr, %service_addr, %http_addr, database = store.backend_name(), "fleet platform started");
        Ok(App {
            mqtts_addr,
            service_addr,
            http_addr,
            admin_token,
            pki,
            store,
            control,
            keys,
            ops,
            stop,
            broker_task,
            intake_task,
            http_task,
            pruner_task,
            security_task,
            rollout_task,
        })
    }

    pub fn mqtts_addr(&self) -> SocketAddr {
        self.mqtts_addr
    }
    pub fn service_addr(&self) -> SocketAddr {
        self.service_addr
    }
    pub fn http_addr(&self) -> SocketAddr {
        self.http_addr
    }
    pub fn admin_token(&self) -> &str {
        &self.admin_token
    }
    /// The CA devices must trust to verify the server.
    pub fn server_ca_path(&self) -> &Path {
        &self.pki.ca_cert
    }
    pub fn store(&self) -> &Store {
        &self.store
    }
    pub fn control(&self) -> &BrokerControl {
        &self.control
    }
    /// The operations that change the fleet, as the REST bridge calls them.
    pub fn ops(&self) -> &Ops {
        &self.ops
    }
    /// What applies a [`crate::ops::Change`] to this process (a feed's follower calls it).
    pub fn applier(&self) -> Applier {
        Applier::new(self.store.clone(), self.control.clone(), self.keys.clone())
    }

    /// What `fleet-service serve` prints on start.
    pub fn banner(&self) -> String {
        format!(
            "fleet-service is running\n  \
             devices (MQTT over mTLS): {}\n  \
             backend services (MQTT, API key as password): {}\n  \
             REST bridge: http://{}/api/v1\n  \
             server CA (devices trust this): {}\n  \
             admin token: {}\n",
            self.mqtts_addr,
            self.service_addr,
            self.http_addr,
            self.pki.ca_cert.display(),
            self.admin_token
        )
    }

    /// Stops in the order that loses nothing: the broker first (every session publishes its
    /// disconnect through the still-running intake), then intake, REST and the database.
    pub async fn shutdown(self) -> anyhow::Result<()> {
        let _ = self.stop.send(true);
        let _ = self.rollout_task.await;
        if let Err(e) = self.broker_task.await {
            warn!(error = %e, "broker task failed");
        }
        // What is still queued on the bus was never acknowledged to a device; devices resend it.
        self.intake_task.abort();
        let _ = self.intake_task.await;
        let _ = self.http_task.await;
        self.pruner_task.abort();
        let _ = self.pruner_task.await;
        self.security_task.abort();
        let _ = self.security_task.await;
        self.store.close().await;
        info!("fleet platform stopped");
        Ok(())
    }
}

/// Every connection is an open file: raises the process's soft limit to the hard one (the
/// broker's default connection limit is derived from it).
fn raise_open_file_limit() {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) => info!(
            open_files = limit,
            "open-file limit raised to the hard limit"
        ),
        Err(e) => warn!(error = %e, "cannot raise the open-file limit"),
    }
}

/// Says what listen backlog the listeners really have: the kernel silently caps the one asked
/// for at `net.core.somaxconn`.
fn log_backlog(asked: u32) {
    let cap = std::fs::read_to_string("/proc/sys/net/core/somaxconn")
        .ok()
        .and_then(|s| s.trim().parse::<u32>().ok());
    match cap {
        Some(cap) if cap < asked => warn!(
            asked,
            somaxconn = cap,
            "listen backlog capped by net.core.somaxconn; raise it for connect storms"
        ),
        Some(cap) => info!(backlog = asked, somaxconn = cap, "listen backlog"),
        None => info!(backlog = asked, "listen backlog"),
    }
}

fn bind(addr: SocketAddr, backlog: u32, what: &str) -> anyhow::Result<TcpListener> {
    let bound = || -> std::io::Result<TcpListener> {
        let socket = if addr.is_ipv4() {
            tokio::net::TcpSocket::new_v4()?
        } else {
            tokio::net::TcpSocket::new_v6()?
        };
        socket.set_reuseaddr(true)?;
        socket.bind(addr)?;
        socket.listen(backlog)
    };
    bound().with_context(|| format!("binding the {what} listener on {addr}"))
}

async fn wait_stop(mut stopped: watch::Receiver<bool>) {
    let _ = stopped.wait_for(|s| *s).await.map(|_| ());
}

async fn prune_loop(
    store: Store,
    tuning: crate::config::TelemetryTuning,
    audit_retention_days: u64,
    mut stopped: watch::Receiver<bool>,
) {
    let retention = TelemetryRetention {
        max_age: Some(Duration::from_secs(tuning.retention_hours * 3600)),
        ..Default::default()
    };
    let mut tick = tokio::time::interval(Duration::from_secs(tuning.prune_interval_secs.max(1)));
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stopped.wait_for(|s| *s) => return,
        }
        match store.prune_telemetry(&retention).await {
            Ok(0) => {}
            Ok(n) => info!(rows = n, "pruned telemetry history"),
            Err(e) => warn!(error = %e, "telemetry pruning failed"),
        }
        if audit_retention_days > 0 {
            let max_age = Duration::from_secs(audit_retention_days.saturating_mul(86_400));
            match store.prune_audit(max_age).await {
                Ok(0) => {}
                Ok(n) => info!(rows = n, "pruned the audit log"),
                Err(e) => warn!(error = %e, "audit log pruning failed"),
            }
        }
    }
}

/// The bootstrap admin token: from the configuration, else the one stored in the data
/// directory, else a new one, stored there (mode 0600).
fn admin_token(config: &Config) -> anyhow::Result<String> {
    if let Some(token) = &config.admin_token {
        return Ok(token.clone());
    }
    let path: PathBuf = config.data_dir.join("admin-token");
    if let Ok(token) = std::fs::read_to_string(&path) {
        let token = token.trim().to_owned();
        if !token.is_empty() {
            return Ok(token);
        }
    }
    let token = crate::keys::generate_secret();
    std::fs::write(&path, format!("{token}\n"))
        .with_context(|| format!("writing {}", path.display()))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    }
    Ok(token)
}

/// A database URL without its password, for messages.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let creds = &url[scheme + 3..at];
            match creds.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..scheme + 3], &url[at..]),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn redacts_passwords() {
        assert_eq!(
            super::redact("postgres://u:secret@h:5432/db"),
            "postgres://u:***@h:5432/db"
        );
        assert_eq!(
            super::redact("sqlite://./data/fleet.db"),
            "sqlite://./data/fleet.db"
        );
    }
}

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

use crate::config::{Config, Role, ServerTls};
use crate::keys::ApiKeys;
use crate::ops::{Applier, Ops};
use crate::pki::DevPki;
use crate::store::{Store, TelemetryRetention};

/// A running platform, or the part of it one process of a cluster runs (see [`Role`]).
pub struct App {
    role: Role,
    mqtts_addr: Option<SocketAddr>,
    service_addr: Option<SocketAddr>,
    conformance_addr: Option<SocketAddr>,
    http_addr: SocketAddr,
    admin_token: String,
    pki: DevPki,
    server_tls: ServerTls,
    store: Store,
    control: BrokerControl,
    keys: ApiKeys,
    ops: Ops,
    stop: watch::Sender<bool>,
    broker_task: Option<JoinHandle<()>>,
    /// Tasks that end when `stop` fires (REST, rollout engine, leases, followers).
    tasks: Vec<JoinHandle<()>>,
    /// Tasks that are aborted after the broker stopped (intake, pruners, watches).
    background: Vec<JoinHandle<()>>,
    node: Option<crate::cluster::NodeHandle>,
}

impl App {
    /// Starts everything this process runs and returns once every listener is bound and
    /// serving.
    pub async fn start(config: Config) -> anyhow::Result<App> {
        if let Some(addr) = config.conformance_listen {
            crate::config::check_conformance_listen(addr)?;
        }
        std::fs::create_dir_all(&config.data_dir)
            .with_context(|| format!("creating {}", config.data_dir.display()))?;
        let role = config.role;
        let pki = DevPki::in_dir(&config.data_dir);
        let identity = match &config.server_tls {
            ServerTls::Dev { names } => pki.ensure(names).context("dev PKI")?,
            ServerTls::Own { cert, key } => crate::pki::load_identity(cert, key)
                .context("the server certificate (--tls-cert, --tls-key)")?,
        };

        let store = Store::connect(&config.database_url)
            .await
            .with_context(|| format!("opening the database ({})", redact(&config.database_url)))?;
        let admin_token = admin_token(&config)?;
        crate::keys::ensure_bootstrap_admin(&store, &admin_token)
            .await
            .context("bootstrap admin key")?;

        let node_id = config.tuning.node_id.clone();
        let cluster = match &config.nats_url {
            Some(url) => Some(
                crate::cluster::Backbone::connect(url, &node_id, &config.tuning.cluster)
                    .await
                    .with_context(|| format!("connecting to NATS at {url}"))?,
            ),
            None => None,
        };
        // Changes made from now on are followed: the registry below is loaded after this
        // point, so none made in between is missed (applying one twice changes nothing).
        let changes_from = match &cluster {
            Some(c) => Some(
                c.changes_from()
                    .await
                    .context("the cluster's change stream")?,
            ),
            None => None,
        };

        if role.runs_broker() {
            // In a cluster a node renews a lease; one of another process under the same name
            // refuses to start here (inside `NodeHandle::start` below).
            let stale = store
                .mark_node_offline(&node_id)
                .await
                .context("marking devices of the previous run offline")?;
            if !stale.is_empty() {
                info!(
                    count = stale.len(),
                    "devices still online from a previous run marked offline (server_restart)"
                );
            }
            raise_open_file_limit();
        }

        let keys = ApiKeys::load(&store).await.context("loading API keys")?;
        let metrics = Arc::new(Metrics::default());
        let writer = crate::provisioning::ProvisionWriter::start(
            store.clone(),
            config.tuning.devices.jitp_max_batch,
        );
        let announce_devices = writer.announcer();
        let registry = Arc::new(Registry::new(Arc::new(writer), metrics.clone()));
        let control = BrokerControl::new(registry.clone(), metrics.clone());
        let applier = Applier::new(store.clone(), control.clone(), keys.clone());
        applier
            .load_registry()
            .await
            .context("loading the registry (CAs, devices, cohorts, revocations, quarantines)")?;
        let rollouts = crate::rollout::Rollouts::new();
        // A change is announced to this process alone, or on the backbone to every process
        // (this one included, through its follower).
        let feed: Arc<dyn crate::ops::ChangeFeed> = match &cluster {
            None => Arc::new(crate::ops::LocalFeed::new(applier.clone())),
            Some(c) => {
                let feed: Arc<dyn crate::ops::ChangeFeed> = Arc::new(c.change_feed());
                // Devices provisioned on this node's connect path reach the others too.
                let _ = announce_devices.set(feed.clone());
                feed
            }
        };
        let ops = Ops::new(
            store.clone(),
            keys.clone(),
            control.clone(),
            rollouts.clone(),
            feed,
        );

        let (stop, stopped) = watch::channel(false);
        let mut tasks = Vec::new();
        let mut background = Vec::new();
        let backlog = config.tuning.listen.backlog;

        // The event bus: embedded in one process, JetStream in a cluster.
        let (bus, source): (Option<Arc<dyn broker::bus::EventBus>>, Option<Source>) = match &cluster
        {
            None => {
                let (bus, source) = broker::bus::embedded(config.tuning.intake.bus_capacity);
                (Some(Arc::new(bus)), Some(Source::Embedded(source)))
            }
            Some(c) => (
                // A replica publishes too: the offline presence of a lost node's devices.
                Some(
                    c.event_bus(metrics.clone())
                        .await
                        .context("the events stream")?,
                ),
                if role.runs_api() {
                    Some(Source::JetStream(Box::new(
                        c.event_source().await.context("the events consumer")?,
                    )))
                } else {
                    None
                },
            ),
        };

        let mut mqtts_addr = None;
        let mut service_addr = None;
        let mut conformance_addr = None;
        let mut broker_task = None;
        let mut node = None;
        if role.runs_broker() {
            let broker = Broker::new(
                &config.tuning.broker,
                identity,
                control.clone(),
                bus.clone().expect("a broker has a bus"),
                Arc::new(keys.clone()),
            )?;
            match &cluster {
                Some(c) => {
                    let link = broker
                        .join_cluster(c.node_config())
                        .await
                        .map_err(|e| anyhow::anyhow!("joining the cluster: {e}"))?;
                    // Serve no one before the node holds the cluster's retained messages
                    // (a subscriber now would miss them), unless the backbone is down.
                    if tokio::time::timeout(Duration::from_secs(10), link.retained_loaded())
                        .await
                        .is_err()
                    {
                        warn!("the cluster's retained messages are not loaded after 10 s; serving anyway");
                    }
                    node = Some(
                        crate::cluster::NodeHandle::start(
                            &store,
                            &node_id,
                            &config.tuning.cluster,
                            control.clone(),
                            link,
                            stopped.clone(),
                        )
                        .await?,
                    );
                }
                None => {
                    // The broker's retained messages live in memory: a moved device that
                    // connects after a restart must still learn where it belongs. (A cluster
                    // keeps them in its retained stream.)
                    ops.republish_assignments()
                        .await
                        .context("publishing the devices' assignments")?;
                }
            }
            let devices = bind(config.mqtts_listen, backlog, "MQTTS device")?;
            let services = bind(config.service_listen, backlog, "service")?;
            mqtts_addr = Some(devices.local_addr()?);
            service_addr = Some(services.local_addr()?);
            let broker = match config.conformance_listen {
                Some(addr) => {
                    let listener = bind(addr, backlog, "conformance")?;
                    conformance_addr = Some(listener.local_addr()?);
                    broker.with_conformance_listener(listener)
                }
                None => broker,
            };
            broker_task = Some(tokio::spawn(broker.serve(
                devices,
                services,
                wait_stop(stopped.clone()),
            )));
            background.push(tokio::spawn(crate::security::watch_rejections(
                store.clone(),
                control.clone(),
                config.tuning.audit.rejected_burst_threshold.max(1),
                Duration::from_secs(config.tuning.audit.rejected_burst_window_secs.max(1)),
                stopped.clone(),
            )));
        } else if let Some(c) = &cluster {
            // A replica publishes the platform's own messages (cohort updates, assignments)
            // straight to the broker nodes.
            c.attach_publisher(&control)
                .await
                .context("the cluster's retained stream")?;
        }
        if let (Some(c), Some(from)) = (&cluster, changes_from) {
            tasks.push(c.follow_changes(from, applier.clone(), stopped.clone()));
        }

        let http = bind(config.http_listen, backlog, "HTTP")?;
        log_backlog(backlog);
        let http_addr = http.local_addr()?;

        if role.runs_api() {
            let options = crate::intake::IntakeOptions {
                max_batch: config.tuning.intake.max_batch,
                node_id: node_id.clone(),
                ..Default::default()
            };
            background.push(match source.expect("a replica has an event source") {
                Source::Embedded(s) => tokio::spawn(crate::intake::run(s, store.clone(), options)),
                Source::JetStream(s) => {
                    tokio::spawn(crate::intake::run(*s, store.clone(), options))
                }
            });
            let singletons = crate::cluster::Singletons::new(
                cluster.is_some(),
                store.clone(),
                &node_id,
                &config.tuning.cluster,
            );
            {
                let (store, ops, rollouts) = (store.clone(), ops.clone(), rollouts.clone());
                let tick = Duration::from_millis(config.tuning.rollout.tick_ms);
                tasks.push(
                    singletons.run("rollout-engine", stopped.clone(), move |stop| {
                        crate::rollout::run(
                            store.clone(),
                            ops.clone(),
                            rollouts.clone(),
                            tick,
                            stop,
                        )
                    }),
                );
            }
            {
                let (store, telemetry, audit_days) = (
                    store.clone(),
                    config.tuning.telemetry.clone(),
                    config.tuning.audit.retention_days,
                );
                tasks.push(singletons.run("pruner", stopped.clone(), move |stop| {
                    prune_loop(store.clone(), telemetry.clone(), audit_days, stop)
                }));
            }
            if let (Some(_), Some(bus)) = (&cluster, &bus) {
                // The reaper holds a lease of its own (see `nodes::run_reaper`).
                tasks.push(tokio::spawn(crate::cluster::reap_lost_nodes(
                    store.clone(),
                    control.clone(),
                    bus.clone(),
                    config.tuning.cluster.clone(),
                    format!("{node_id}~{}", uuid::Uuid::new_v4().simple()),
                    stopped.clone(),
                )));
            }
            let default_quarantine =
                broker::registry::QuarantineMode::parse(&config.tuning.devices.quarantine_mode)
                    .context("[devices] quarantine_mode must be \"commands_only\" or \"refuse\"")?;
            let mut api_state = crate::api::ApiState::with_ops(store.clone(), ops.clone());
            api_state.backbone = cluster.clone();
            api_state.settings = crate::api::ApiSettings {
                require_ca_proof: config.tuning.ca.require_proof_of_possession,
                verification_code_ttl_ms: (config.tuning.ca.verification_code_ttl_secs as i64)
                    .saturating_mul(1000),
                default_quarantine,
            };
            let api = crate::api::router(api_state);
            tasks.push(serve_http(http, api, stopped.clone()));
        } else {
            tasks.push(serve_http(
                http,
                crate::cluster::node_router(control.clone(), cluster.clone()),
                stopped.clone(),
            ));
        }

        info!(role = ?role, node_id = %node_id, ?mqtts_addr, ?service_addr, %http_addr,
            database = store.backend_name(), cluster = cluster.is_some(), "fleet platform started");
        Ok(App {
            role,
            mqtts_addr,
            service_addr,
            conformance_addr,
            http_addr,
            admin_token,
            pki,
            server_tls: config.server_tls.clone(),
            store,
            control,
            keys,
            ops,
            stop,
            broker_task,
            tasks,
            background,
            node,
        })
    }

    /// The device listener; panics on a process that runs no broker.
    pub fn mqtts_addr(&self) -> SocketAddr {
        self.mqtts_addr.expect("this process runs no broker")
    }
    /// The backend-service listener; panics on a process that runs no broker.
    pub fn service_addr(&self) -> SocketAddr {
        self.service_addr.expect("this process runs no broker")
    }
    /// The conformance listener, when one was configured on a process that runs a broker.
    pub fn conformance_addr(&self) -> Option<SocketAddr> {
        self.conformance_addr
    }
    /// The REST bridge (`api`, `serve`) or the node's health and metrics (`broker`).
    pub fn http_addr(&self) -> SocketAddr {
        self.http_addr
    }
    pub fn admin_token(&self) -> &str {
        &self.admin_token
    }
    /// The dev PKI's CA, which devices trust to verify the server; None when the device
    /// listener presents a certificate of the operator's own (`--tls-cert`).
    pub fn server_ca_path(&self) -> Option<&Path> {
        match self.server_tls {
            ServerTls::Dev { .. } => Some(&self.pki.ca_cert),
            ServerTls::Own { .. } => None,
        }
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

    /// What `fleet-service serve` (or `broker`, `api`) prints on start: one line per listener,
    /// then an empty line.
    pub fn banner(&self) -> String {
        let mut out = format!("fleet-service is running ({})\n", self.role_name());
        if let (Some(d), Some(s)) = (self.mqtts_addr, self.service_addr) {
            out.push_str(&format!("  devices (MQTT over mTLS): {d}\n"));
            out.push_str(&format!(
                "  backend services (MQTT, API key as password): {s}\n"
            ));
        }
        if let Some(c) = self.conformance_addr {
            out.push_str(&format!(
                "  CONFORMANCE TESTING (anonymous MQTT, no TLS; never in production): {c}\n"
            ));
        }
        if self.role.runs_api() {
            out.push_str(&format!(
                "  REST bridge: http://{}/api/v1\n",
                self.http_addr
            ));
        } else {
            out.push_str(&format!(
                "  health and metrics: http://{}/healthz\n",
                self.http_addr
            ));
        }
        match &self.server_tls {
            ServerTls::Dev { .. } => out.push_str(&format!(
                "  server CA (devices trust this): {}\n",
                self.pki.ca_cert.display()
            )),
            ServerTls::Own { cert, .. } => out.push_str(&format!(
                "  server certificate (your own; devices trust its issuer): {}\n",
                cert.display()
            )),
        }
        if self.role.runs_api() {
            out.push_str(&format!("  admin token: {}\n", self.admin_token));
        }
        out
    }

    fn role_name(&self) -> &'static str {
        match self.role {
            Role::All => "all in one process",
            Role::Broker => "broker node",
            Role::Api => "fleet-service replica",
        }
    }

    /// Stops in the order that loses nothing: the broker first (every session publishes its
    /// disconnect through the still-running intake), then intake, REST and the database.
    pub async fn shutdown(self) -> anyhow::Result<()> {
        let _ = self.stop.send(true);
        if let Some(broker) = self.broker_task {
            if let Err(e) = broker.await {
                warn!(error = %e, "broker task failed");
            }
        }
        for task in self.tasks {
            let _ = task.await;
        }
        if let Some(node) = self.node {
            node.release().await;
        }
        // What is still queued on the bus was never acknowledged to a device; devices resend it.
        for task in self.background {
            task.abort();
            let _ = task.await;
        }
        self.store.close().await;
        info!("fleet platform stopped");
        Ok(())
    }
}

/// Where the intake reads events from.
enum Source {
    Embedded(broker::bus::EmbeddedSource),
    JetStream(Box<broker::bus::jetstream::JetStreamSource>),
}

fn serve_http(
    http: TcpListener,
    router: axum::Router,
    stopped: watch::Receiver<bool>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        if let Err(e) = axum::serve(
            http,
            router.into_make_service_with_connect_info::<std::net::SocketAddr>(),
        )
        .with_graceful_shutdown(wait_stop(stopped))
        .await
        {
            warn!(error = %e, "HTTP server failed");
        }
    })
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

//! Running as a cluster: broker nodes (`fleet-service broker`) and fleet-service replicas
//! (`fleet-service api`) sharing one PostgreSQL and one NATS JetStream (the backbone).
//!
//! | What | Where | Delivery |
//! |---|---|---|
//! | Device events (telemetry, state, acks, update reports, presence) | stream `FLEET_EVENTS`, `{prefix}.events.{partition}` | at least once into the database, stored once (message ids, idempotent writes) |
//! | Live MQTT between nodes | `{prefix}.mqtt.{topic}` (core NATS) | at most once, by interest |
//! | Retained messages | stream `FLEET_RETAINED`, last per subject | every node, in stream order |
//! | Changes to the fleet (CAs, devices, keys, quarantines) | stream `FLEET_CONTROL`, `{prefix}.control` | every process, re-read from the database |
//! | Node liveness, singletons | `leases` table in PostgreSQL | one holder at a time, fencing tokens |

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;

use async_nats::jetstream::{self, stream};
use broker::bus::jetstream::{JetStreamBus, JetStreamConfig, JetStreamSource};
use broker::BrokerControl;

use crate::config::ClusterTuning;

/// The name of the stream of changes every process follows.
pub const CONTROL_STREAM: &str = "FLEET_CONTROL";

/// This process's connection to the backbone.
#[derive(Clone)]
pub struct Backbone {
    client: async_nats::Client,
    js: jetstream::Context,
    node_id: String,
    tuning: ClusterTuning,
}

impl Backbone {
    pub async fn connect(url: &str, node_id: &str, tuning: &ClusterTuning) -> anyhow::Result<Self> {
        let client = async_nats::ConnectOptions::new()
            .name(format!("fleet-service {node_id}"))
            // Reconnects for ever: a restarted NATS must find every process again.
            .max_reconnects(None)
            .connection_timeout(Duration::from_secs(5))
            .connect(url)
            .await?;
        Ok(Self {
            js: jetstream::new(client.clone()),
            client,
            node_id: node_id.to_owned(),
            tuning: tuning.clone(),
        })
    }

    /// Whether the connection to NATS is up now (it reconnects by itself when it is not).
    pub fn connected(&self) -> bool {
        self.client.connection_state() == async_nats::connection::State::Connected
    }

    /// How this process's broker joins the other nodes.
    pub fn node_config(&self) -> broker::cluster::ClusterConfig {
        let mut c = broker::cluster::ClusterConfig::new(self.client.clone(), &self.node_id);
        c.prefix = self.tuning.prefix.clone();
        let events = self.events_config();
        c.events_stream = events.stream;
        c.events_subjects = format!("{}.>", events.subject_prefix);
        c
    }

    fn events_config(&self) -> JetStreamConfig {
        JetStreamConfig {
            subject_prefix: format!("{}.events", self.tuning.prefix),
            duplicate_window: Duration::from_secs(self.tuning.duplicate_window_secs.max(1)),
            max_bytes: self.tuning.events_max_bytes,
            node: self.node_id.clone(),
            ack_wait: Duration::from_secs(self.tuning.ack_wait_secs.max(1)),
            ..JetStreamConfig::default()
        }
    }

    /// The event bus of a broker node (and of a replica, for the presence of lost nodes'
    /// devices): an event is acknowledged once the events stream has it.
    pub async fn event_bus(
        &self,
        metrics: Arc<broker::metrics::Metrics>,
    ) -> anyhow::Result<Arc<dyn broker::bus::EventBus>> {
        let bus = JetStreamBus::new(self.client.clone(), &self.events_config(), metrics).await?;
        Ok(Arc::new(bus))
    }

    /// A replica's share of the intake's durable consumer.
    pub async fn event_source(&self) -> anyhow::Result<JetStreamSource> {
        Ok(JetStreamSource::new(self.client.clone(), &self.events_config()).await?)
    }

    /// Makes the platform's own publishes (through `control`) reach the broker nodes, from a
    /// process with no broker of its own.
    pub async fn attach_publisher(&self, control: &BrokerControl) -> anyhow::Result<()> {
        broker::cluster::attach_publisher(self.node_config(), control)
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        Ok(())
    }

    fn control_subject(&self) -> String {
        format!("{}.control", self.tuning.prefix)
    }

    /// Creates the change stream if needed and returns the sequence the next change will get:
    /// a process that loads the database after this call and then follows from there misses
    /// none.
    pub async fn changes_from(&self) -> anyhow::Result<u64> {
        let mut s = self
            .js
            .get_or_create_stream(stream::Config {
                name: CONTROL_STREAM.into(),
                subjects: vec![self.control_subject()],
                storage: stream::StorageType::File,
                // A change only says what to re-read; a process that was away longer than
                // this loads everything again when it starts.
                max_age: Duration::from_secs(24 * 3600),
                ..Default::default()
            })
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let info = s.info().await.map_err(|e| anyhow::anyhow!("{e}"))?;
        Ok(info.state.last_sequence + 1)
    }
}

impl Backbone {
    /// Announces changes on the backbone: every process (this one too) applies them through
    /// its follower. The ack means the change stream has it; it reaches every follower
    /// within milliseconds.
    pub fn change_feed(&self) -> NatsFeed {
        NatsFeed {
            js: self.js.clone(),
            subject: self.control_subject(),
        }
    }

    /// Applies every change from stream sequence `from` on, in order, for ever (through NATS
    /// restarts, resuming after the last one applied), until `stop`.
    pub fn follow_changes(
        &self,
        from: u64,
        applier: crate::ops::Applier,
        mut stop: tokio::sync::watch::Receiver<bool>,
    ) -> tokio::task::JoinHandle<()> {
        let follow = broker::cluster::follow::follow(
            self.js.clone(),
            CONTROL_STREAM.to_owned(),
            self.control_subject(),
            broker::cluster::follow::From::Sequence(from),
            move |f| {
                let applier = applier.clone();
                async move {
                    match serde_json::from_slice::<crate::ops::Change>(&f.message.payload) {
                        Ok(change) => {
                            tracing::debug!(seq = f.stream_sequence, ?change, "applying a change");
                            // A failed read is retried: a change is never skipped.
                            let mut delay = Duration::from_millis(100);
                            while let Err(e) = applier.apply(&change).await {
                                tracing::warn!(?change, error = %e, "applying a change failed; retrying");
                                tokio::time::sleep(delay).await;
                                delay = (delay * 2).min(Duration::from_secs(5));
                            }
                        }
                        Err(e) => tracing::warn!(seq = f.stream_sequence, error = %e,
                            "an unreadable change skipped"),
                    }
                }
            },
            || {},
        );
        tokio::spawn(async move {
            tokio::select! {
                _ = follow => {}
                _ = stop.wait_for(|s| *s) => {}
            }
        })
    }
}

/// The cluster's [`crate::ops::ChangeFeed`]: changes go on the change stream.
pub struct NatsFeed {
    js: jetstream::Context,
    subject: String,
}

#[async_trait::async_trait]
impl crate::ops::ChangeFeed for NatsFeed {
    async fn publish(&self, change: crate::ops::Change) -> anyhow::Result<crate::ops::Applied> {
        let payload = serde_json::to_vec(&change)?;
        self.js
            .publish(self.subject.clone(), payload.into())
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?
            .await
            .map_err(|e| anyhow::anyhow!("the change stream did not take the change: {e}"))?;
        // Applied on every node by its follower: how many sessions it ended is not known here.
        Ok(crate::ops::Applied {
            sessions_ended: None,
        })
    }
}

/// The HTTP listener of a broker node: `/healthz` (200 while the node takes connections, 503
/// once it fenced itself), `/readyz` (also 503 while its connection to the bus is down) and
/// `/api/v1/broker/metrics` (this node's counters).
pub fn node_router(control: BrokerControl, backbone: Option<Backbone>) -> axum::Router {
    use axum::http::StatusCode;
    use axum::routing::get;
    let health = control.clone();
    let ready = control.clone();
    axum::Router::new()
        .route(
            "/healthz",
            get(move || {
                let accepting = health.accepting();
                async move {
                    if accepting {
                        (StatusCode::OK, "ok\n")
                    } else {
                        (
                            StatusCode::SERVICE_UNAVAILABLE,
                            "fenced: this node cannot renew its lease\n",
                        )
                    }
                }
            }),
        )
        .route(
            "/readyz",
            get(move || {
                let why = if !ready.accepting() {
                    Some("fenced: this node cannot renew its lease\n")
                } else if backbone.as_ref().is_some_and(|b| !b.connected()) {
                    Some("the bus (NATS) is unreachable\n")
                } else {
                    None
                };
                async move {
                    match why {
                        None => (StatusCode::OK, "ready\n"),
                        Some(why) => (StatusCode::SERVICE_UNAVAILABLE, why),
                    }
                }
            }),
        )
        .route(
            "/api/v1/broker/metrics",
            get(move || {
                let snapshot = control.metrics();
                async move { axum::Json(snapshot) }
            }),
        )
}

/// A broker node's place in the cluster: its lease (renewed in the background) and what the
/// lease decides: a node that cannot renew stops taking connections before anyone declares its
/// devices lost; it takes them again once it renews.
pub struct NodeHandle {
    lease: crate::nodes::NodeLease,
    _link: broker::cluster::ClusterLink,
}

impl NodeHandle {
    /// Takes the node's lease (waiting, up to the lease's life, for one a crashed run of this
    /// node left behind), then follows it.
    pub async fn start(
        store: &crate::store::Store,
        node_id: &str,
        tuning: &ClusterTuning,
        control: BrokerControl,
        link: broker::cluster::ClusterLink,
        mut stopped: tokio::sync::watch::Receiver<bool>,
    ) -> anyhow::Result<NodeHandle> {
        let instance = format!("{node_id}~{}", uuid::Uuid::new_v4().simple());
        let period = Duration::from_millis(tuning.node_lease_renew_ms.max(10));
        let fence_after = Duration::from_millis(tuning.node_fence_after_ms.max(20));
        let deadline = tokio::time::Instant::now() + fence_after * 2 + period;
        let lease = loop {
            match crate::nodes::heartbeat(store.clone(), node_id, &instance, period, fence_after)
                .await
            {
                Ok(lease) => break lease,
                Err(crate::nodes::NodeLeaseError::InUse { holder, .. })
                    if tokio::time::Instant::now() < deadline =>
                {
                    tracing::info!(node_id, %holder,
                        "the node's lease is held (a previous run that crashed, or another process with this --node-id); waiting for it to expire");
                    tokio::time::sleep(period).await;
                }
                Err(e) => {
                    return Err(anyhow::anyhow!(e)).context(
                        "taking the node's lease: is another process running with this --node-id?",
                    )
                }
            }
        };
        let mut fenced = lease.fenced();
        tokio::spawn(async move {
            loop {
                control.set_accepting(!*fenced.borrow_and_update());
                tokio::select! {
                    changed = fenced.changed() => if changed.is_err() { return },
                    _ = stopped.wait_for(|s| *s) => return,
                }
            }
        });
        Ok(NodeHandle { lease, _link: link })
    }

    /// Releases the lease after a clean shutdown (the node reported its devices' disconnects).
    pub async fn release(self) {
        self.lease.shutdown().await;
    }
}

/// Runs tasks that must run once across replicas (the rollout engine, the pruners, the reaper)
/// under a lease each in a cluster, or simply here in one process.
pub struct Singletons {
    store: Option<crate::store::Store>,
    holder: String,
    ttl: Duration,
}

impl Singletons {
    pub fn new(
        clustered: bool,
        store: crate::store::Store,
        node_id: &str,
        tuning: &ClusterTuning,
    ) -> Self {
        Self {
            store: clustered.then_some(store),
            holder: format!("{node_id}~{}", uuid::Uuid::new_v4().simple()),
            ttl: Duration::from_millis(tuning.leader_lease_ttl_ms.max(30)),
        }
    }

    /// Runs `make(stop)`: here and now in one process; in a cluster while this replica holds
    /// lease `name` (`stop` turns true when it loses it or shuts down).
    pub fn run<F, Fut>(
        &self,
        name: &str,
        stopped: tokio::sync::watch::Receiver<bool>,
        make: F,
    ) -> tokio::task::JoinHandle<()>
    where
        F: Fn(tokio::sync::watch::Receiver<bool>) -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        match &self.store {
            None => tokio::spawn(make(stopped)),
            Some(store) => {
                let singleton =
                    crate::leader::Singleton::new(store.clone(), name, &self.holder, self.ttl);
                tokio::spawn(singleton.run(stopped, make))
            }
        }
    }
}

/// Declares the devices of dead broker nodes offline (`node_lost`) and tells every node and
/// subscriber: their presence goes on the events stream (every node delivers it) and into the
/// retained stream.
pub async fn reap_lost_nodes(
    store: crate::store::Store,
    control: BrokerControl,
    bus: Arc<dyn broker::bus::EventBus>,
    tuning: ClusterTuning,
    holder: String,
    stop: tokio::sync::watch::Receiver<bool>,
) {
    let (tx, mut rx) =
        tokio::sync::mpsc::unbounded_channel::<(String, Vec<(fleet_wire::DeviceId, u64)>)>();
    let publisher = tokio::spawn(async move {
        while let Some((node_id, devices)) = rx.recv().await {
            tracing::warn!(
                node_id,
                devices = devices.len(),
                "broker node lost; its devices are offline (node_lost)"
            );
            for (id, epoch) in devices {
                let now = now_ms();
                let presence = fleet_wire::payload::Presence {
                    device_id: id.clone(),
                    event: fleet_wire::payload::PresenceEvent::Disconnected,
                    epoch,
                    ts_ms: now,
                    connected_at_ms: now,
                    reason: Some(fleet_wire::payload::DisconnectReason::NodeLost),
                    remote_addr: None,
                    protocol: None,
                };
                let payload =
                    bytes::Bytes::from(serde_json::to_vec(&presence).expect("presence serialises"));
                let topic = fleet_wire::Topic::Presence(id.clone());
                let event = broker::bus::BusMessage {
                    topic: topic.to_string(),
                    payload: payload.clone(),
                    epoch,
                    seq: 0,
                    received_at_ms: now,
                    node: Arc::from(node_id.as_str()),
                    id: format!("lost/{id}/{epoch}"),
                };
                if let Err(e) = bus.publish(event).await {
                    tracing::warn!(device_id = %id, error = %e, "node_lost presence not published");
                }
                let _ = control.publish(&topic, payload, true).await;
            }
        }
    });
    let interval = Duration::from_millis(tuning.node_lease_renew_ms.max(10));
    crate::nodes::run_reaper(
        store,
        &holder,
        interval,
        Duration::ZERO,
        stop,
        move |node, devices| {
            let _ = tx.send((node.to_owned(), devices));
        },
    )
    .await;
    publisher.abort();
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

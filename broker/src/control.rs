//! What the rest of the platform may do to a running broker: change who is trusted, end live
//! sessions, read counters. Cheap to clone; every method is synchronous and lock-free.

use std::sync::{Arc, OnceLock};

use bytes::Bytes;

use dashmap::DashMap;
use fleet_wire::payload::DisconnectReason;
use fleet_wire::{DeviceId, Topic};
use tokio::sync::mpsc;

use crate::local::Local;
use crate::metrics::{Metrics, MetricsSnapshot};
use crate::registry::Registry;
use crate::rejections::RecentRejections;
use crate::router::{RouterHandle, SystemPublisher};

/// The broker's handle on one live device session.
#[derive(Debug, Clone)]
pub(crate) struct SessionHandle {
    pub(crate) epoch: u64,
    pub(crate) ca_id: String,
    pub(crate) kick: mpsc::UnboundedSender<DisconnectReason>,
    /// Turns true once the session has ended and published its disconnect.
    pub(crate) done: tokio::sync::watch::Receiver<bool>,
}

pub(crate) type Sessions = DashMap<DeviceId, SessionHandle>;

/// Live backend-service sessions: handle → (API key id, kick).
pub(crate) type ServiceSessions = DashMap<u64, (String, mpsc::UnboundedSender<DisconnectReason>)>;

#[derive(Clone)]
pub struct BrokerControl {
    pub(crate) registry: Arc<Registry>,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) sessions: Arc<Sessions>,
    pub(crate) service_sessions: Arc<ServiceSessions>,
    /// The running broker's delivery parts, once a [`crate::Broker`] was built on this control.
    pub(crate) node: Arc<OnceLock<Node>>,
    pub(crate) rejected: Arc<RecentRejections>,
    /// Whether the node takes new connections (a cluster node that cannot renew its lease
    /// stops: another process is about to declare its devices lost).
    accepting: Arc<std::sync::atomic::AtomicBool>,
    /// Where the platform's own publishes go on a process with no broker of its own (a
    /// fleet-service replica in a cluster): straight to the other nodes.
    pub(crate) remote: Arc<OnceLock<crate::cluster::Egress>>,
}

/// What a running broker delivers through: its own router link, the router, and what the node
/// delivers itself (retained messages, device inboxes).
pub(crate) struct Node {
    pub(crate) system: SystemPublisher,
    pub(crate) router: RouterHandle,
    pub(crate) local: Arc<Local>,
}

/// The broker this control belongs to was never built, so nothing can be published.
#[derive(Debug, thiserror::Error)]
#[error("no broker is running on this control")]
pub struct NotRunning;

impl BrokerControl {
    pub fn new(registry: Arc<Registry>, metrics: Arc<Metrics>) -> Self {
        Self {
            registry,
            metrics,
            sessions: Arc::new(DashMap::new()),
            service_sessions: Arc::new(DashMap::new()),
            node: Arc::new(OnceLock::new()),
            rejected: Arc::new(RecentRejections::new(4096)),
            accepting: Arc::new(std::sync::atomic::AtomicBool::new(true)),
            remote: Arc::new(OnceLock::new()),
        }
    }

    /// Counts a refused connection and keeps it among the recent ones.
    pub(crate) fn refused(
        &self,
        why: crate::metrics::Rejection,
        device: Option<&DeviceId>,
        peer: std::net::SocketAddr,
    ) {
        self.metrics.reject(why);
        let org_id = device
            .and_then(|d| self.registry.device(d))
            .map(|d| d.org_id);
        self.rejected
            .record(device.cloned(), org_id, why, peer.to_string());
    }

    /// The most recent refused connections.
    pub fn rejected(&self) -> &RecentRejections {
        &self.rejected
    }

    /// Publishes a QoS 1 message as the platform itself, on the broker's own link (the same
    /// one presence uses). This is how the rollout engine writes a cohort's desired release,
    /// which no client may publish. Live subscribers get it at once; a retained message also
    /// reaches every later subscriber. Waits only while the link's queue is full.
    pub async fn publish(
        &self,
        topic: &Topic,
        payload: Bytes,
        retain: bool,
    ) -> Result<(), NotRunning> {
        match (self.node.get(), self.remote.get()) {
            (Some(node), _) => {
                node.system
                    .publish(topic.to_string(), payload, 1, retain)
                    .await
            }
            (None, Some(remote)) => remote.send(
                &topic.to_string(),
                &payload,
                1,
                retain,
                !topic.is_durable_event(),
            ),
            (None, None) => return Err(NotRunning),
        }
        Ok(())
    }

    /// Whether the node takes new device and service connections.
    pub fn accepting(&self) -> bool {
        self.accepting.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Stops (false) or resumes (true) taking new connections; live sessions go on.
    pub fn set_accepting(&self, accepting: bool) {
        let was = self
            .accepting
            .swap(accepting, std::sync::atomic::Ordering::Relaxed);
        if was != accepting {
            tracing::warn!(accepting, "node admission changed");
        }
    }

    pub fn registry(&self) -> &Arc<Registry> {
        &self.registry
    }

    pub fn metrics(&self) -> MetricsSnapshot {
        let mut snapshot = self.metrics.snapshot();
        if let Some(node) = self.node.get() {
            let inboxes = node.local.inboxes.snapshot();
            snapshot.router_filters = node.router.filter_count() as u64;
            snapshot.retained_messages = node.local.retained.len() as u64;
            snapshot.device_inboxes = inboxes.inboxes;
            snapshot.inbox_messages = inboxes.queued;
            snapshot.inbox_dropped = inboxes.dropped;
        }
        snapshot
    }

    /// Enables or disables a CA. Disabling also ends the live sessions of its devices, unless
    /// the CA keeps its devices while disabled (then it only stops provisioning new ones). Returns false when the CA is unknown.
    pub fn set_ca_enabled(&self, ca_id: &str, enabled: bool) -> bool {
        let found = self.registry.set_ca_enabled(ca_id, enabled);
        let keep = self
            .registry
            .ca(ca_id)
            .is_some_and(|c| c.keep_devices_when_disabled);
        if found && !enabled && !keep {
            self.disconnect_where(|s| s.ca_id == ca_id, DisconnectReason::Revoked);
        }
        found
    }

    /// Ends a device's live session, if it has one.
    pub fn disconnect_device(&self, id: &DeviceId, reason: DisconnectReason) -> bool {
        self.sessions
            .get(id)
            .map(|s| s.kick.send(reason).is_ok())
            .unwrap_or(false)
    }

    /// Ends every live service session authenticated with the API key `key_id` (it was
    /// revoked); returns how many.
    pub fn disconnect_key(&self, key_id: &str) -> usize {
        let mut n = 0;
        for s in self.service_sessions.iter() {
            if s.value().0 == key_id && s.value().1.send(DisconnectReason::Revoked).is_ok() {
                n += 1;
            }
        }
        n
    }

    /// Quarantines a device (`Some`) or lifts it (`None`), and ends its live session so it
    /// reconnects with the rights that go with it. Returns whether a session was ended.
    pub fn quarantine(&self, id: &DeviceId, mode: Option<crate::registry::QuarantineMode>) -> bool {
        self.registry.set_quarantine(id, mode);
        self.rights_changed(id, DisconnectReason::Revoked)
    }

    /// Moves a device to another cohort and ends its live session, so it reconnects with the
    /// topic rights of the new one (its persistent subscriptions are dropped with the
    /// session). Returns whether a session was ended.
    pub fn reassign(&self, id: &DeviceId, cohort: Option<fleet_wire::CohortId>) -> bool {
        self.registry.move_device(id, cohort);
        self.rights_changed(id, DisconnectReason::Reassigned)
    }

    /// Ends the device's live session (which then drops what it subscribed), or drops the
    /// persistent session it left behind, so it subscribes again under its new rights.
    fn rights_changed(&self, id: &DeviceId, reason: DisconnectReason) -> bool {
        let ended = self.disconnect_device(id, reason);
        if !ended {
            if let Some(node) = self.node.get() {
                node.local.inboxes.forget(id);
            }
        }
        ended
    }

    /// Whether a device has a live session here, and its epoch.
    pub fn session_epoch(&self, id: &DeviceId) -> Option<u64> {
        self.sessions.get(id).map(|s| s.epoch)
    }

    pub fn live_sessions(&self) -> usize {
        self.sessions.len()
    }

    fn disconnect_where(&self, pred: impl Fn(&SessionHandle) -> bool, reason: DisconnectReason) {
        for s in self.sessions.iter() {
            if pred(s.value()) {
                let _ = s.kick.send(reason);
            }
        }
    }
}

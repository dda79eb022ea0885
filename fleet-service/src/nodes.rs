//! Broker node liveness: each broker node holds lease `node/{node_id}` and renews it every
//! couple of seconds ([`heartbeat`]); when a node dies, the reaper ([`run_reaper`], one replica
//! at a time) finds its lease expired and declares its devices offline with `node_lost`
//! ([`reap_lost_nodes`]).
//!
//! # Invariants
//! - A node that has not renewed its lease for `fence_after` says so on [`NodeLease::fenced`]
//!   and must stop accepting devices; its lease lives `2 × fence_after`, and the reaper waits a
//!   further grace, so a node has stopped admitting devices well before anyone declares its
//!   devices lost.
//! - Each device of a lost node is marked offline once: the reaper deletes the node's expired
//!   lease term and marks the devices in one transaction, conditional on that term (so a
//!   concurrent reaper, or the node renewing in time, leaves it alone) and on
//!   `online AND node_id`.
//! - A node whose lease lapsed and that renews it anyway gets a new term
//!   ([`NodeLease::token`] changes): the reaper may have declared its devices lost meanwhile,
//!   so their sessions on the node are stale.

use std::sync::Arc;
use std::time::Duration;

use fleet_wire::DeviceId;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::{sleep_until, timeout, Instant};
use tracing::{error, info, warn};

use crate::leader::{run_singleton, wait_true};
use crate::store::{Store, StoreError};

/// Prefix of the broker nodes' lease names: `node/{node_id}`.
pub const NODE_LEASE_PREFIX: &str = "node/";

/// The lease of the replica that reaps lost nodes.
pub const REAPER_LEASE: &str = "reaper";

/// A broker node declared lost, with the devices it held and their session epochs.
pub type LostNode = (String, Vec<(DeviceId, u64)>);

/// The lease name of node `node_id`.
pub fn node_lease_name(node_id: &str) -> String {
    format!("{NODE_LEASE_PREFIX}{node_id}")
}

/// Why a node could not start its heartbeat.
#[derive(Debug, thiserror::Error)]
pub enum NodeLeaseError {
    /// Another process holds this node id's lease: two brokers configured with one `node_id`.
    #[error(
        "node id {node_id:?} is held by another broker instance ({holder}); each broker node \
         needs its own node_id (if that process is gone, its lease expires within {ttl_ms} ms)"
    )]
    InUse {
        node_id: String,
        holder: String,
        ttl_ms: i64,
    },
    #[error("taking the node lease: {0}")]
    Store(#[from] StoreError),
}

/// A broker node's lease, renewed in the background until [`NodeLease::shutdown`]. Dropping
/// it stops the renewals without releasing the lease, as if the process had died.
#[derive(Debug)]
pub struct NodeLease {
    store: Store,
    name: String,
    instance: String,
    fenced: watch::Receiver<bool>,
    token: watch::Receiver<i64>,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl NodeLease {
    /// True while the lease has not been renewed for `fence_after`: the node must not accept
    /// devices. Turns false again once a renewal succeeds.
    pub fn fenced(&self) -> watch::Receiver<bool> {
        self.fenced.clone()
    }

    /// The lease term's fencing token. It changes when the lease lapsed and was taken anew, so
    /// the node's sessions from before may have been declared lost.
    pub fn token(&self) -> watch::Receiver<i64> {
        self.token.clone()
    }

    /// Stops renewing and releases the lease, so the reaper never sees it expire: the node's own
    /// shutdown reports its devices' disconnects.
    pub async fn shutdown(self) {
        self.stop.send_replace(true);
        let _ = self.task.await;
        match self.store.release_lease(&self.name, &self.instance).await {
            Ok(true) => info!(lease = %self.name, "node lease released"),
            Ok(false) => warn!(lease = %self.name, "node lease was no longer ours to release"),
            Err(e) => warn!(lease = %self.name, error = %e, "releasing the node lease failed"),
        }
    }
}

/// Takes lease `node/{node_id}` as `instance` (unique per process start) and renews it every
/// `period` in the background; the lease lives `2 × fence_after`. Refuses
/// ([`NodeLeaseError::InUse`]) while another instance holds it.
pub async fn heartbeat(
    store: Store,
    node_id: &str,
    instance: &str,
    period: Duration,
    fence_after: Duration,
) -> Result<NodeLease, NodeLeaseError> {
    let name = node_lease_name(node_id);
    let ttl = fence_after * 2;
    let started = Instant::now();
    let Some(lease) = store.try_acquire_lease(&name, instance, ttl).await? else {
        let held = store.lease(&name).await?;
        return Err(NodeLeaseError::InUse {
            node_id: node_id.to_owned(),
            holder: held.as_ref().map(|l| l.holder.clone()).unwrap_or_default(),
            ttl_ms: held.map(|l| l.expires_at_ms - l.renewed_at_ms).unwrap_or(0),
        });
    };
    info!(lease = %name, instance, token = lease.token, "node lease taken");
    let (fenced_tx, fenced) = watch::channel(false);
    let (token_tx, token) = watch::channel(lease.token);
    let (stop, stopped) = watch::channel(false);
    let renewer = Renewer {
        store: store.clone(),
        name: name.clone(),
        instance: instance.to_owned(),
        period: period.max(Duration::from_millis(10)),
        fence_after,
        ttl,
        fenced: fenced_tx,
        token: token_tx,
    };
    let task = tokio::spawn(renewer.run(started, stopped));
    Ok(NodeLease {
        store,
        name,
        instance: instance.to_owned(),
        fenced,
        token,
        stop,
        task,
    })
}

struct Renewer {
    store: Store,
    name: String,
    instance: String,
    period: Duration,
    fence_after: Duration,
    ttl: Duration,
    fenced: watch::Sender<bool>,
    token: watch::Sender<i64>,
}

impl Renewer {
    /// Renews every `period` until `stop`; `last_ok` is when the last granted request was sent.
    async fn run(self, mut last_ok: Instant, mut stop: watch::Receiver<bool>) {
        let mut next = last_ok + self.period;
        loop {
            tokio::select! {
                biased;
                _ = wait_true(&mut stop) => return,
                _ = sleep_until(last_ok + self.fence_after), if !*self.fenced.borrow() => {
                    self.fence();
                    continue;
                }
                _ = sleep_until(next) => {}
            }
            let attempt = Instant::now();
            next = attempt + self.period;
            // A renewal slower than `fence_after` counts as failed; the fence goes up meanwhile.
            let renewal = timeout(
                self.fence_after,
                self.store
                    .try_acquire_lease(&self.name, &self.instance, self.ttl),
            );
            tokio::pin!(renewal);
            let result = loop {
                tokio::select! {
                    biased;
                    _ = wait_true(&mut stop) => return,
                    r = &mut renewal => break r,
                    _ = sleep_until(last_ok + self.fence_after), if !*self.fenced.borrow() => {
                        self.fence();
                    }
                }
            };
            match result {
                Ok(Ok(Some(lease))) => {
                    last_ok = attempt;
                    if *self.token.borrow() != lease.token {
                        warn!(
                            lease = %self.name,
                            token = lease.token,
                            "node lease had lapsed and was taken anew; devices held before may \
                             have been declared lost"
                        );
                        self.token.send_replace(lease.token);
                    }
                    if self.fenced.send_replace(false) {
                        info!(lease = %self.name, "node lease renewed again; accepting devices");
                    }
                }
                Ok(Ok(None)) => {
                    error!(lease = %self.name, "another instance holds this node's lease")
                }
                Ok(Err(e)) if e.is_closed() => {
                    if !self.fenced.send_replace(true) {
                        warn!(lease = %self.name, "store closed; node fenced");
                    }
                    return;
                }
                Ok(Err(e)) => {
                    warn!(lease = %self.name, error = %e, "renewing the node lease failed")
                }
                Err(_) => warn!(lease = %self.name, "renewing the node lease timed out"),
            }
        }
    }

    fn fence(&self) {
        self.fenced.send_replace(true);
        warn!(
            lease = %self.name,
            after_ms = self.fence_after.as_millis() as u64,
            "node lease not renewed in time; fenced: stop accepting devices"
        );
    }
}

/// Declares every broker node whose lease expired more than `grace` ago lost: marks its online
/// devices offline (`node_lost`), ends its open sessions and deletes the lease, each node in
/// one transaction. Returns each node reaped here with its devices and their session epochs, so
/// the caller publishes their offline presence; a node another reaper took first is left out.
pub async fn reap_lost_nodes(store: &Store, grace: Duration) -> Result<Vec<LostNode>, StoreError> {
    let mut lost = Vec::new();
    for lease in store.expired_leases(NODE_LEASE_PREFIX, grace).await? {
        let node_id = lease
            .name
            .strip_prefix(NODE_LEASE_PREFIX)
            .unwrap_or(&lease.name)
            .to_owned();
        if let Some(devices) = store.end_lost_node(&lease, &node_id).await? {
            info!(
                node_id = %node_id,
                instance = %lease.holder,
                expired_since_ms = lease.expired_since_ms,
                devices = devices.len(),
                "broker node lost; its devices marked offline (node_lost)"
            );
            lost.push((node_id, devices));
        }
    }
    Ok(lost)
}

/// Runs [`reap_lost_nodes`] every `interval` on one replica at a time (lease
/// [`REAPER_LEASE`], held as `holder` for `5 × interval`) until `stop`, calling
/// `on_lost(node_id, devices)` for each node it reaped.
pub async fn run_reaper<F>(
    store: Store,
    holder: &str,
    interval: Duration,
    grace: Duration,
    stop: watch::Receiver<bool>,
    on_lost: F,
) where
    F: Fn(&str, Vec<(DeviceId, u64)>) + Send + Sync + 'static,
{
    let interval = interval.max(Duration::from_millis(10));
    let on_lost = Arc::new(on_lost);
    let lease_store = store.clone();
    run_singleton(
        lease_store,
        REAPER_LEASE,
        holder,
        interval * 5,
        stop,
        move |mut stopped| {
            let store = store.clone();
            let on_lost = on_lost.clone();
            async move {
                let mut tick = tokio::time::interval(interval);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tokio::select! {
                        _ = wait_true(&mut stopped) => return,
                        _ = tick.tick() => {}
                    }
                    match reap_lost_nodes(&store, grace).await {
                        Ok(lost) => {
                            for (node_id, devices) in lost {
                                on_lost(&node_id, devices);
                            }
                        }
                        Err(e) if e.is_closed() => return,
                        Err(e) => warn!(error = %e, "reaping lost broker nodes failed"),
                    }
                }
            }
        },
    )
    .await
}

//! The broker's registry writes through here on the connect path: just-in-time provisioning in
//! group commits, so a storm of first connections costs one transaction per batch and holds one
//! database connection, leaving the rest of the pool to the intake (whose commits are what
//! connected devices' PUBACKs wait for).
//!
//! No delay is added to gather a batch: a batch is whatever queued while the previous commit
//! ran, so one device alone commits at once and a thousand arriving together share a few
//! commits.

use broker::registry::{
    CertFacts, NewDevice, Provisioned, RegistryStore, StoreError as RegistryError,
};
use std::sync::{Arc, OnceLock};

use fleet_wire::DeviceId;
use tokio::sync::{mpsc, oneshot};

use crate::ops::{Change, ChangeFeed};
use crate::store::{Store, StoreError};

type Answer = oneshot::Sender<Result<Provisioned, StoreError>>;

/// [`RegistryStore`] over the [`Store`], provisioning in group commits.
pub struct ProvisionWriter {
    store: Store,
    queue: mpsc::Sender<(NewDevice, Answer)>,
    announce: Announce,
}

/// Where new devices are announced once written (in a cluster: to every process, whose
/// registries learn them; a device provisioned on one node may publish through another).
pub type Announce = Arc<OnceLock<Arc<dyn ChangeFeed>>>;

impl ProvisionWriter {
    /// Starts the writer task (it ends when the writer is dropped). `max_batch` devices at most
    /// share one transaction, and a few batches' worth wait in the queue (beyond that, first
    /// connections wait to be queued).
    pub fn start(store: Store, max_batch: usize) -> ProvisionWriter {
        let max_batch = max_batch.max(1);
        let (tx, rx) = mpsc::channel(max_batch.saturating_mul(4));
        let announce = Announce::default();
        tokio::spawn(write_batches(
            store.clone(),
            rx,
            max_batch,
            announce.clone(),
        ));
        ProvisionWriter {
            store,
            queue: tx,
            announce,
        }
    }

    /// Set once the feed exists: every batch written from then on is announced on it.
    pub fn announcer(&self) -> Announce {
        self.announce.clone()
    }
}

/// Tells every process about devices written here (off the connect path: the CONNACK does
/// not wait for it).
fn announce(to: &Announce, change: Change) {
    if let Some(feed) = to.get().cloned() {
        tokio::spawn(async move {
            if let Err(e) = feed.publish(change).await {
                tracing::warn!(error = %e, "new devices not announced to the other processes");
            }
        });
    }
}

async fn write_batches(
    store: Store,
    mut rx: mpsc::Receiver<(NewDevice, Answer)>,
    max_batch: usize,
    to: Announce,
) {
    let mut batch = Vec::with_capacity(max_batch);
    while rx.recv_many(&mut batch, max_batch).await > 0 {
        let (devices, answers): (Vec<NewDevice>, Vec<Answer>) = batch.drain(..).unzip();
        match store.provision_many(&devices).await {
            Ok(results) => {
                for (answer, result) in answers.into_iter().zip(results) {
                    let _ = answer.send(result);
                }
            }
            // The whole transaction failed (one device's bad reference, a lost connection):
            // each device on its own, so one failure costs only itself.
            Err(e) => {
                tracing::debug!(error = %e, devices = devices.len(),
                    "group provisioning failed; provisioning one by one");
                for (answer, device) in answers.into_iter().zip(&devices) {
                    let _ = answer.send(store.provision(device).await);
                }
            }
        }
        // After the commit: the others re-read what it wrote.
        announce(
            &to,
            Change::Devices {
                ids: devices.iter().map(|d| d.id.to_string()).collect(),
            },
        );
    }
}

#[async_trait::async_trait]
impl RegistryStore for ProvisionWriter {
    async fn provision_device(&self, new: &NewDevice) -> Result<Provisioned, RegistryError> {
        let (answer, answered) = oneshot::channel();
        let stopped = || RegistryError::Backend("the provisioning writer stopped".into());
        self.queue
            .send((new.clone(), answer))
            .await
            .map_err(|_| stopped())?;
        Ok(answered.await.map_err(|_| stopped())??)
    }

    async fn claim_device(
        &self,
        id: &DeviceId,
        ca_id: &str,
        cert: &CertFacts,
    ) -> Result<(), RegistryError> {
        RegistryStore::claim_device(&self.store, id, ca_id, cert).await?;
        announce(
            &self.announce,
            Change::Device {
                id: id.to_string(),
                end_session: None,
            },
        );
        Ok(())
    }

    async fn device_record(
        &self,
        id: &DeviceId,
    ) -> Result<Option<broker::registry::DeviceRecord>, RegistryError> {
        RegistryStore::device_record(&self.store, id).await
    }
}

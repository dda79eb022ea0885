//! Fleet operations: one method per change to the fleet, whoever asks for it (the REST bridge
//! today; a CLI or another replica tomorrow).
//!
//! [`Ops`] owns the store, the API key cache and the broker control. Each method writes the
//! store, and once the write is committed announces a [`Change`] on its [`ChangeFeed`]; every
//! process that shares the database applies the change by re-reading it ([`Applier`]). In the
//! embedded default ([`LocalFeed`]) that process is this one, and the change is applied before
//! the method returns, so what [`Applied`] reports (sessions ended) is what happened.
//!
//! Retained messages the platform publishes itself (a moved device's
//! `devices/{id}/assignment`, the rollout engine's `cohorts/{id}/updates`) also go out from
//! here, through the broker's own link.
//!
//! # Invariants
//! - Every method commits its write before it announces the change, so no broker ever holds
//!   something the database does not.
//! - Nothing else in the crate writes fleet state to the store or changes the broker's registry
//!   (the connect path's provisioning and the intake aside).

mod change;

use std::sync::Arc;

use broker::auth::{Scope, ServiceRole};
use broker::metrics::MetricsSnapshot;
use broker::registry::QuarantineMode;
use broker::BrokerControl;
use bytes::Bytes;
use fleet_wire::payload::{DeviceAssignment, DisconnectReason};
use fleet_wire::update::{ReleaseManifest, UpdateCommand};
use fleet_wire::{CohortId, DeviceId, Topic};
use tracing::warn;

pub use change::{Applied, Applier, Change, ChangeFeed, LocalFeed};

use crate::keys::{ApiKeys, CreatedKey, KeyError};
use crate::rollout::{RollbackError, Rollouts};
use crate::store::{
    now_ms, ApiKeyRecord, CaCertificate, CaUpdate, Cohort, CohortCommand, Deletion, Deployment,
    Device, DeviceFilter, DeviceUpdate, ImportOutcome, NewCa, NewCommand, NewDeployment,
    NewRegisteredDevice, Organization, Product, Release, SigningKey, StateChange, Store,
    StoreError, VerificationCode,
};

/// Why an operation failed.
#[derive(Debug, thiserror::Error)]
pub enum OpsError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Key(#[from] KeyError),
    /// The write is committed, but the change could not be announced: processes that did not
    /// apply it catch up on their next start.
    #[error("change committed but not announced: {0:#}")]
    Announce(anyhow::Error),
    /// No broker runs to publish on (a process built without one); nothing was kept.
    #[error("no broker to publish on")]
    NotPublished,
}

/// What a bulk deletion did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BulkDeleted {
    pub deleted: u64,
    /// The first devices deleted, in id order (at most [`BULK_SAMPLE`]).
    pub sample: Vec<DeviceId>,
    /// Live sessions ended, where known (`None` when applied on other processes).
    pub sessions_ended: Option<usize>,
}

/// Devices deleted per transaction by [`Ops::delete_devices`]: each batch is one short write,
/// so a large deletion never holds the database (SQLite's one writer above all) for long.
pub const DELETE_BATCH: u32 = 500;

/// How many device ids a bulk deletion (or its dry run) shows.
pub const BULK_SAMPLE: usize = 20;

/// A certificate revocation: what is never admitted again, and whether a session ended.
#[derive(Debug, Clone)]
pub struct Revoked {
    pub fingerprints: Vec<String>,
    pub session_ended: bool,
}

/// The fleet-operations layer. Cheap to clone.
#[derive(Clone)]
pub struct Ops {
    store: Store,
    keys: ApiKeys,
    control: BrokerControl,
    rollouts: Rollouts,
    feed: Arc<dyn ChangeFeed>,
}

impl Ops {
    /// Operations that announce their changes on `feed`.
    pub fn new(
        store: Store,
        keys: ApiKeys,
        control: BrokerControl,
        rollouts: Rollouts,
        feed: Arc<dyn ChangeFeed>,
    ) -> Self {
        Self {
            store,
            keys,
            control,
            rollouts,
            feed,
        }
    }

    /// Operations whose changes apply at once on this process ([`LocalFeed`]).
    pub fn local(store: Store, keys: ApiKeys, control: BrokerControl, rollouts: Rollouts) -> Self {
        let applier = Applier::new(store.clone(), control.clone(), keys.clone());
        Self::new(
            store,
            keys,
            control,
            rollouts,
            Arc::new(LocalFeed::new(applier)),
        )
    }

    /// The key cache, for authentication and listing.
    pub fn keys(&self) -> &ApiKeys {
        &self.keys
    }

    /// The broker's counters.
    pub fn broker_metrics(&self) -> MetricsSnapshot {
        self.control.metrics()
    }

    /// Up to `limit` of the device's most recent refused connection attempts on this node,
    /// newest first.
    pub fn rejected_attempts(
        &self,
        id: &DeviceId,
        limit: usize,
    ) -> Vec<broker::rejections::RejectedAttempt> {
        self.control.rejected().of_device(id, limit)
    }

    /// Whether the certificate with this fingerprint is never admitted again.
    pub fn is_revoked(&self, fingerprint: &str) -> bool {
        self.control.registry().is_revoked(fingerprint)
    }

    async fn announce(&self, change: Change) -> Result<Applied, OpsError> {
        self.feed.publish(change.clone()).await.map_err(|e| {
            warn!(?change, error = %format!("{e:#}"), "a committed change was not announced");
            OpsError::Announce(e)
        })
    }

    // ---- organizations and API keys ----

    /// Creates an organization with its first admin key.
    pub async fn create_org(&self, name: &str) -> Result<(Organization, CreatedKey), OpsError> {
        let org = self.store.create_org(name).await?;
        let key = self
            .create_api_key(&org.id, "first admin", ServiceRole::Admin, Scope::Org)
            .await?;
        Ok((org, key))
    }

    /// Issues an API key with a fresh secret. The caller checked that the scope's product and
    /// cohort belong to `org_id`.
    pub async fn create_api_key(
        &self,
        org_id: &str,
        name: &str,
        role: ServiceRole,
        scope: Scope,
    ) -> Result<CreatedKey, OpsError> {
        let created = CreatedKey::new(org_id, name, role, scope)?;
        self.store.create_api_key(&created.record).await?;
        self.announce(Change::ApiKey {
            id: created.record.id.clone(),
        })
        .await?;
        tracing::info!(key_id = %created.record.id, org_id, role = role.as_str(), "API key created");
        Ok(created)
    }

    /// Revokes a key of an organization (revoking twice is harmless); its live MQTT service
    /// sessions end. `None` when the organization has no such key.
    pub async fn revoke_api_key(
        &self,
        org_id: &str,
        id: &str,
    ) -> Result<Option<(ApiKeyRecord, Applied)>, OpsError> {
        let Some(key) = self.store.revoke_api_key(org_id, id, now_ms()).await? else {
            return Ok(None);
        };
        let applied = self.announce(Change::ApiKey { id: key.id.clone() }).await?;
        tracing::info!(key_id = %key.id, sessions_ended = ?applied.sessions_ended, "API key revoked");
        Ok(Some((key, applied)))
    }

    /// Deletes an organization that holds no products and no CAs, with its API keys (their
    /// live MQTT sessions end), signing keys and verification codes.
    pub async fn delete_org(&self, id: &str) -> Result<Deletion, OpsError> {
        let keys = match self.store.delete_org(id).await? {
            Deletion::Deleted(keys) => keys,
            Deletion::NotFound => return Ok(Deletion::NotFound),
            Deletion::InUse(d) => return Ok(Deletion::InUse(d)),
        };
        for key in keys {
            self.announce(Change::ApiKey { id: key }).await?;
        }
        tracing::info!(org_id = id, "organization deleted");
        Ok(Deletion::Deleted(()))
    }

    // ---- catalog ----

    pub async fn create_product(&self, org_id: &str, name: &str) -> Result<Product, OpsError> {
        Ok(self.store.create_product(org_id, name).await?)
    }

    pub async fn create_cohort(&self, product: &Product, name: &str) -> Result<Cohort, OpsError> {
        let cohort = self.store.create_cohort(product, name).await?;
        self.announce(Change::Cohort {
            id: cohort.id.clone(),
        })
        .await?;
        Ok(cohort)
    }

    /// Deletes a product of `org_id` (and its releases) that has no cohorts, no devices and
    /// no unrevoked keys scoped to it. Nothing of a product lives in the brokers.
    pub async fn delete_product(&self, org_id: &str, id: &str) -> Result<Deletion, OpsError> {
        Ok(self.store.delete_product(org_id, id).await?)
    }

    /// Deletes a cohort that has no devices, no CA provisioning into it, no live deployment
    /// and no unrevoked keys scoped to it; its finished deployments and commands go with it,
    /// and the retained `cohorts/{id}/updates` is cleared (nobody subscribes to it any more).
    pub async fn delete_cohort(&self, cohort: &CohortId) -> Result<Deletion, OpsError> {
        let deleted = self.store.delete_cohort(cohort.as_str()).await?;
        if deleted == Deletion::Deleted(()) {
            // An empty retained payload removes the retained message (MQTT 3.1.1 3.3.1.3).
            let topic = Topic::CohortUpdates(cohort.clone());
            if let Err(e) = self.control.publish(&topic, Bytes::new(), true).await {
                warn!(cohort_id = %cohort, error = %e, "the deleted cohort's retained update was not cleared");
            }
            self.announce(Change::Cohort {
                id: cohort.to_string(),
            })
            .await?;
        }
        Ok(deleted)
    }

    // ---- CAs ----

    /// Issues a one-time code for proof of possession of a CA's key.
    pub async fn issue_verification_code(
        &self,
        org_id: &str,
        ttl_ms: i64,
    ) -> Result<VerificationCode, OpsError> {
        let mut bytes = [0u8; 16];
        rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut bytes);
        Ok(self
            .store
            .create_verification_code(org_id, &hex::encode(bytes), ttl_ms)
            .await?)
    }

    /// Registers a CA, and makes the brokers trust it. `proof` is the verification code the
    /// registrant's proof certificate carries (already checked against the CA): it is used up
    /// by a successful registration and given back by a failed one. `Ok(None)` when it is not
    /// an unused, unexpired code of the organization.
    pub async fn register_ca(
        &self,
        new: NewCa,
        proof: Option<&str>,
    ) -> Result<Option<CaCertificate>, OpsError> {
        if let Some(code) = proof {
            if !self.store.take_verification_code(&new.org_id, code).await? {
                return Ok(None);
            }
        }
        let created = self.store.create_ca(new).await;
        if let Some(code) = proof {
            let ca_id = created.as_ref().ok().map(|c| c.id.as_str());
            self.store.settle_verification_code(code, ca_id).await?;
        }
        let ca = created?;
        self.announce(Change::Ca { id: ca.id.clone() }).await?;
        Ok(Some(ca))
    }

    /// Changes a CA (enabled, keeping its devices, description, provisioning); disabling it
    /// without keeping its devices ends their live sessions. `None` when there is no such CA.
    pub async fn update_ca(
        &self,
        id: &str,
        update: &CaUpdate,
    ) -> Result<Option<CaCertificate>, OpsError> {
        let Some(ca) = self.store.update_ca(id, update).await? else {
            return Ok(None);
        };
        self.announce(Change::Ca { id: ca.id.clone() }).await?;
        Ok(Some(ca))
    }

    /// Deletes a CA of `org_id` that no device names as its own; every broker stops trusting
    /// it at once.
    pub async fn delete_ca(&self, org_id: &str, id: &str) -> Result<Deletion, OpsError> {
        let deleted = self.store.delete_ca(org_id, id).await?;
        if deleted == Deletion::Deleted(()) {
            self.announce(Change::Ca { id: id.to_owned() }).await?;
        }
        Ok(deleted)
    }

    // ---- devices ----

    /// Registers a device before manufacturing; the brokers then admit it.
    pub async fn create_device(&self, new: &NewRegisteredDevice) -> Result<(), OpsError> {
        self.store.register_device(new).await?;
        self.announce(Change::Device {
            id: new.id.to_string(),
            end_session: None,
        })
        .await?;
        Ok(())
    }

    /// Imports one batch of devices in one transaction (see [`Store::import_devices`]); the
    /// brokers then admit those created. An error means nothing of the batch was written.
    pub async fn import_devices(
        &self,
        batch: &[NewRegisteredDevice],
    ) -> Result<Vec<ImportOutcome>, OpsError> {
        let outcomes = self.store.import_devices(batch).await?;
        let ids: Vec<String> = batch
            .iter()
            .zip(&outcomes)
            .filter(|(_, o)| matches!(o, ImportOutcome::Created))
            .map(|(d, _)| d.id.to_string())
            .collect();
        // The rows are committed whatever happens next, and the import's report says so: a
        // change that could not be announced is logged (by `announce`), and the devices are
        // admitted from the next start on.
        if !ids.is_empty() {
            let _ = self.announce(Change::Devices { ids }).await;
        }
        Ok(outcomes)
    }

    /// Refreshes the planner's statistics after a large import; a failure is logged, and
    /// costs only speed.
    pub async fn refresh_device_statistics(&self) {
        if let Err(e) = self.store.refresh_device_statistics().await {
            warn!(error = %e, "device statistics not refreshed after an import");
        }
    }

    /// Changes a device's tags or cohort. A device moved to another cohort is told so on
    /// `devices/{id}/assignment` (retained), then its session ends (reason `reassigned`) so it
    /// reconnects with the new cohort's rights. `false` when the device is gone.
    pub async fn update_device(
        &self,
        device: &Device,
        update: DeviceUpdate,
    ) -> Result<bool, OpsError> {
        let moved = update
            .cohort_id
            .as_ref()
            .filter(|to| **to != device.cohort_id)
            .cloned();
        if !self.store.update_device(&device.id, &update).await? {
            return Ok(false);
        }
        let end_session = match &moved {
            Some(to) => {
                self.publish_assignment(
                    &device.id,
                    device.product_id.clone(),
                    to.clone(),
                    now_ms(),
                )
                .await;
                Some(DisconnectReason::Reassigned)
            }
            None => None,
        };
        let applied = self
            .announce(Change::Device {
                id: device.id.to_string(),
                end_session,
            })
            .await?;
        if let Some(to) = moved {
            tracing::info!(device_id = %device.id, cohort = ?to, session_ended = applied.ended_any(),
                "device moved to another cohort");
        }
        Ok(true)
    }

    /// Revokes a device's certificates (the one it was provisioned with, and its pin): its
    /// live session ends and they are refused from then on. `None` when no certificate is
    /// known for the device yet.
    pub async fn revoke_certificate(
        &self,
        org_id: &str,
        id: &DeviceId,
        reason: &str,
    ) -> Result<Option<Revoked>, OpsError> {
        let fingerprints = self.store.device_fingerprints(id).await?;
        if fingerprints.is_empty() {
            return Ok(None);
        }
        self.store
            .revoke_certificates(org_id, id, &fingerprints, reason)
            .await?;
        let applied = self
            .announce(Change::Device {
                id: id.to_string(),
                end_session: Some(DisconnectReason::Revoked),
            })
            .await?;
        Ok(Some(Revoked {
            fingerprints,
            session_ended: applied.ended_any(),
        }))
    }

    /// Deletes a device and its history; its certificates are refused from then on and its
    /// live session ends. `false` when another request deleted it first.
    pub async fn delete_device(&self, org_id: &str, id: &DeviceId) -> Result<bool, OpsError> {
        let fingerprints = self.store.device_fingerprints(id).await?;
        self.store
            .revoke_certificates(org_id, id, &fingerprints, "device deleted")
            .await?;
        let deleted = self.store.delete_device(id).await?;
        self.announce(Change::Device {
            id: id.to_string(),
            end_session: Some(DisconnectReason::Revoked),
        })
        .await?;
        Ok(deleted)
    }

    /// Deletes up to `max` devices of `org_id` matching `filter`, [`DELETE_BATCH`] to a
    /// transaction, each as [`Ops::delete_device`] would (history gone, certificates refused
    /// from then on); each committed batch is announced as one [`Change::DevicesRemoved`],
    /// which ends the batch's live sessions on whichever node holds them.
    pub async fn delete_devices(
        &self,
        org_id: &str,
        filter: &DeviceFilter,
        max: u32,
    ) -> Result<BulkDeleted, OpsError> {
        let filter = DeviceFilter {
            org_id: Some(org_id.to_owned()),
            ..filter.clone()
        };
        let mut out = BulkDeleted {
            sessions_ended: Some(0),
            ..BulkDeleted::default()
        };
        while out.deleted < u64::from(max) {
            let left = u64::from(max) - out.deleted;
            let batch = left.min(u64::from(DELETE_BATCH)) as u32;
            let ids = self.store.device_ids(&filter, batch).await?;
            if ids.is_empty() {
                break;
            }
            let gone = self
                .store
                .delete_devices(org_id, &ids, "device deleted")
                .await?;
            if gone.is_empty() {
                // Deleted meanwhile by another request: the next read finds the rest.
                continue;
            }
            out.deleted += gone.len() as u64;
            let room = BULK_SAMPLE.saturating_sub(out.sample.len());
            out.sample.extend(gone.iter().take(room).cloned());
            let applied = self
                .announce(Change::DevicesRemoved {
                    ids: gone.iter().map(ToString::to_string).collect(),
                })
                .await?;
            out.sessions_ended = out
                .sessions_ended
                .zip(applied.sessions_ended)
                .map(|(a, b)| a + b);
        }
        tracing::info!(org_id, deleted = out.deleted, sessions_ended = ?out.sessions_ended,
            "devices deleted in bulk");
        Ok(out)
    }

    /// Quarantines a device (again: changes mode and reason); its live session ends. `None`
    /// when there is no such device, else whether a session ended.
    pub async fn quarantine(
        &self,
        id: &DeviceId,
        mode: QuarantineMode,
        reason: &str,
    ) -> Result<Option<bool>, OpsError> {
        let stored = self.store.quarantine_device(id, mode, reason).await?;
        self.rights_changed(id, stored).await
    }

    /// Lifts a device's quarantine; its live (commands-only) session ends so it reconnects
    /// with its normal rights. `None` when it is not quarantined, else whether a session ended.
    pub async fn lift_quarantine(
        &self,
        id: &DeviceId,
        reason: &str,
    ) -> Result<Option<bool>, OpsError> {
        let stored = self.store.lift_quarantine(id, reason).await?;
        self.rights_changed(id, stored).await
    }

    /// After a quarantine was stored (`stored`) or lifted: the device's session ends so it
    /// reconnects with the rights it has now. `None` when nothing was stored.
    async fn rights_changed(&self, id: &DeviceId, stored: bool) -> Result<Option<bool>, OpsError> {
        if !stored {
            return Ok(None);
        }
        let applied = self
            .announce(Change::Device {
                id: id.to_string(),
                end_session: Some(DisconnectReason::Revoked),
            })
            .await?;
        Ok(Some(applied.ended_any()))
    }

    // ---- commands ----

    /// Stores a command for a device, then publishes it on `devices/{id}/commands` (QoS 1,
    /// through the broker's own link, or to whichever node holds the device). Stored first,
    /// so the device's ack always finds it. An offline device with a persistent session gets
    /// it when it comes back; one without never does, and the command times out. Returns when
    /// it was sent (Unix ms).
    pub async fn send_device_command(
        &self,
        device: &DeviceId,
        new: &NewCommand,
    ) -> Result<i64, OpsError> {
        let sent_at = self.store.create_device_command(device, new).await?;
        if self
            .publish_command(Topic::Commands(device.clone()), new)
            .await
            .is_err()
        {
            if let Err(e) = self.store.delete_device_command(device, &new.id).await {
                warn!(device_id = %device, command_id = %new.id, error = %e,
                    "an unpublished command stays stored");
            }
            return Err(OpsError::NotPublished);
        }
        tracing::info!(device_id = %device, command_id = %new.id, name = %new.name,
            "command sent");
        Ok(sent_at)
    }

    /// Stores a command for a cohort (with how many devices may receive it), then publishes
    /// it once on `cohorts/{id}/commands`; each device answers on its own ack topic.
    pub async fn send_cohort_command(
        &self,
        cohort: &CohortId,
        new: &NewCommand,
    ) -> Result<CohortCommand, OpsError> {
        let stored = self.store.create_cohort_command(cohort, new).await?;
        if self
            .publish_command(Topic::CohortCommands(cohort.clone()), new)
            .await
            .is_err()
        {
            if let Err(e) = self.store.delete_cohort_command(cohort, &new.id).await {
                warn!(cohort_id = %cohort, command_id = %new.id, error = %e,
                    "an unpublished command stays stored");
            }
            return Err(OpsError::NotPublished);
        }
        tracing::info!(cohort_id = %cohort, command_id = %new.id, name = %new.name,
            devices = stored.devices, "cohort command sent");
        Ok(stored)
    }

    async fn publish_command(
        &self,
        topic: Topic,
        new: &NewCommand,
    ) -> Result<(), broker::control::NotRunning> {
        let command = fleet_wire::payload::Command {
            id: new.id.clone(),
            name: new.name.clone(),
            params: new.params.clone().unwrap_or_default(),
        };
        let payload = serde_json::to_vec(&command).expect("a command serialises");
        self.control.publish(&topic, payload.into(), false).await
    }

    // ---- updates ----

    pub async fn create_signing_key(
        &self,
        org_id: &str,
        id: &str,
        name: &str,
        public_key_b64: &str,
    ) -> Result<SigningKey, OpsError> {
        Ok(self
            .store
            .create_signing_key(org_id, id, name, public_key_b64)
            .await?)
    }

    /// `false` when the organization has no such unrevoked key.
    pub async fn revoke_signing_key(&self, org_id: &str, id: &str) -> Result<bool, OpsError> {
        Ok(self.store.revoke_signing_key(org_id, id).await?)
    }

    pub async fn create_release(
        &self,
        manifest: &ReleaseManifest,
        signature: &str,
        key_id: &str,
        notes: Option<&str>,
    ) -> Result<Release, OpsError> {
        Ok(self
            .store
            .create_release(manifest, signature, key_id, notes)
            .await?)
    }

    /// Creates a deployment; the rollout engine takes it up at once.
    pub async fn create_deployment(&self, new: &NewDeployment) -> Result<Deployment, OpsError> {
        let d = self.store.create_deployment(new).await?;
        self.rollouts.wake();
        Ok(d)
    }

    /// Moves a deployment from one of `change.from` to `change.to`; `None` when it is in none
    /// of them.
    pub async fn set_deployment_state(
        &self,
        id: &str,
        change: StateChange<'_>,
        reason: &str,
    ) -> Result<Option<Deployment>, OpsError> {
        let d = self.store.set_deployment_state(id, change, reason).await?;
        if d.is_some() {
            self.rollouts.wake();
        }
        Ok(d)
    }

    /// Rolls a live deployment's cohort back (see [`crate::rollout::rollback`]).
    pub async fn rollback_deployment(
        &self,
        d: &Deployment,
        target: Option<&str>,
        reason: &str,
    ) -> Result<Deployment, RollbackError> {
        let r = crate::rollout::rollback(&self.store, d, target, reason).await?;
        self.rollouts.wake();
        Ok(r)
    }

    // ---- retained messages of the platform ----

    /// Publishes, retained, where a device belongs (`devices/{id}/assignment`).
    pub async fn publish_assignment(
        &self,
        id: &DeviceId,
        product_id: String,
        cohort_id: Option<CohortId>,
        assigned_at_ms: i64,
    ) {
        let assignment = DeviceAssignment {
            product_id,
            cohort_id,
            assigned_at_ms,
        };
        let payload = serde_json::to_vec(&assignment).expect("an assignment serialises");
        if let Err(e) = self
            .control
            .publish(&Topic::Assignment(id.clone()), payload.into(), true)
            .await
        {
            warn!(device_id = %id, error = %e, "assignment not published");
        }
    }

    /// Publishes every moved device's assignment again (on start: the broker's retained
    /// messages live in memory, and a device moved while offline must still learn it).
    pub async fn republish_assignments(&self) -> Result<(), OpsError> {
        for (id, product_id, cohort_id, at) in self.store.device_assignments().await? {
            self.publish_assignment(&id, product_id, cohort_id, at)
                .await;
        }
        Ok(())
    }

    /// Publishes, retained, a cohort's desired release (`cohorts/{id}/updates`). Only the
    /// rollout engine calls this. `false` when no broker runs to publish on.
    pub async fn publish_cohort_update(
        &self,
        cohort_id: &CohortId,
        command: &UpdateCommand,
    ) -> Result<bool, StoreError> {
        let payload = serde_json::to_vec(command)
            .map_err(|e| StoreError::Corrupt(format!("update command: {e}")))?;
        let topic = Topic::CohortUpdates(cohort_id.clone());
        Ok(self
            .control
            .publish(&topic, Bytes::from(payload), true)
            .await
            .is_ok())
    }
}

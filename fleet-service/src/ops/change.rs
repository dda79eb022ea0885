//! What a committed change is announced as, and how a process applies it.
//!
//! A [`Change`] names what changed, never the new value: whoever applies it re-reads the truth
//! from the database. So a change applied twice, late or out of order still leaves the
//! registry and the key cache equal to the database, and every process (broker node or REST
//! replica) that shares the database can apply the same announcement.
//!
//! # Invariants
//! - A change is announced only after the write it names is committed.
//! - [`Applier::apply`] changes nothing in the database; it reads it and updates this
//!   process's registry (through [`BrokerControl`]) and key cache.

use broker::registry::{CohortRecord, QuarantineMode};
use broker::BrokerControl;
use fleet_wire::payload::DisconnectReason;
use fleet_wire::{CohortId, DeviceId};

use crate::keys::ApiKeys;
use crate::store::{Cohort, Store, StoreError};

/// A committed change, named by what it touched.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Change {
    /// Re-read this CA into the registry; if it is now disabled and does not keep its
    /// devices, end its devices' live sessions. A CA that is gone (deleted) stays in the
    /// registry disabled and without keeping its devices (the registry keeps no removal), so
    /// no handshake trusts it from then on.
    Ca { id: String },
    /// Re-read this cohort into the registry. A deleted cohort stays there, named by no
    /// device and no key (deletion requires that), so it changes no one's rights.
    Cohort { id: String },
    /// Re-read this device: its record (or remove it from the registry if deleted), its
    /// quarantine, its revoked certificate fingerprints. Then, if `end_session` is set, end its
    /// live session with that reason, or forget the persistent session it left, so it
    /// subscribes again under its new rights.
    Device {
        id: String,
        end_session: Option<DisconnectReason>,
    },
    /// Bulk form for imports: re-read these devices' records.
    Devices { ids: Vec<String> },
    /// Bulk form of a deleted [`Change::Device`]: re-read these devices (those gone leave the
    /// registry, with their quarantine), their revoked certificates, and end each one's live
    /// session (`revoked`), or forget the persistent session it left. A bulk deletion
    /// announces one per batch.
    DevicesRemoved { ids: Vec<String> },
    /// Re-read this API key into the key cache (or drop it if revoked or deleted); a revoked
    /// key's live service sessions end.
    ApiKey { id: String },
}

/// What applying a change did on this process (`None` where it is not known, e.g. applied on
/// other nodes).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Applied {
    pub sessions_ended: Option<usize>,
}

impl Applied {
    /// Whether a session is known to have ended.
    pub fn ended_any(&self) -> bool {
        self.sessions_ended.is_some_and(|n| n > 0)
    }
}

/// Applies a change to this process: re-reads from the store, updates the registry (through
/// [`BrokerControl`]) and the key cache.
#[derive(Clone)]
pub struct Applier {
    store: Store,
    control: BrokerControl,
    keys: ApiKeys,
}

impl Applier {
    pub fn new(store: Store, control: BrokerControl, keys: ApiKeys) -> Self {
        Self {
            store,
            control,
            keys,
        }
    }

    /// Loads everything the registry holds, as on start: CAs, devices, cohorts, revoked
    /// certificates and quarantines. (The key cache loads itself: [`ApiKeys::load`].)
    pub async fn load_registry(&self) -> Result<(), StoreError> {
        let registry = self.control.registry();
        for ca in self.store.load_ca_records().await? {
            registry.upsert_ca(ca);
        }
        for device in self.store.load_device_records().await? {
            registry.upsert_device(device);
        }
        for cohort in self.store.all_cohorts().await? {
            registry.upsert_cohort(cohort_record(&cohort)?);
        }
        for fingerprint in self.store.revoked_fingerprints().await? {
            registry.revoke_certificate(&fingerprint);
        }
        for (id, mode) in self.store.quarantined_devices().await? {
            registry.set_quarantine(&id, Some(mode));
        }
        Ok(())
    }

    pub async fn apply(&self, change: &Change) -> Result<Applied, StoreError> {
        match change {
            Change::Ca { id } => self.ca(id).await,
            Change::Cohort { id } => self.cohort(id).await,
            Change::Device { id, end_session } => self.device(id, *end_session).await,
            Change::Devices { ids } => self.devices(ids).await,
            Change::DevicesRemoved { ids } => self.devices_removed(ids).await,
            Change::ApiKey { id } => self.api_key(id).await,
        }
    }

    async fn ca(&self, id: &str) -> Result<Applied, StoreError> {
        match self.store.ca(id).await? {
            Some(ca) => {
                self.control.registry().upsert_ca(ca.to_record()?);
                // Also ends the live sessions of the CA's devices when it is disabled.
                self.control.set_ca_enabled(&ca.id, ca.enabled);
            }
            None => {
                // Deleted: not even `keep_devices_when_disabled` may keep it a trust anchor.
                if let Some(mut gone) = self.control.registry().ca(id) {
                    gone.keep_devices_when_disabled = false;
                    gone.jitp = None;
                    self.control.registry().upsert_ca(gone);
                }
                self.control.set_ca_enabled(id, false);
            }
        }
        // BrokerControl does not say how many sessions a disabled CA's devices had.
        Ok(Applied {
            sessions_ended: None,
        })
    }

    async fn cohort(&self, id: &str) -> Result<Applied, StoreError> {
        if let Some(cohort) = self.store.cohort(id).await? {
            self.control
                .registry()
                .upsert_cohort(cohort_record(&cohort)?);
        }
        Ok(Applied {
            sessions_ended: Some(0),
        })
    }

    async fn device(
        &self,
        id: &str,
        end_session: Option<DisconnectReason>,
    ) -> Result<Applied, StoreError> {
        let id = device_id(id)?;
        let registry = self.control.registry();
        let record = self.store.device_record(&id).await?;
        let cohort = record.as_ref().and_then(|r| r.cohort_id.clone());
        match record {
            Some(r) => registry.upsert_device(r),
            None => {
                registry.remove_device(&id);
            }
        }
        let quarantine: Option<QuarantineMode> = self.store.quarantine_of(&id).await?;
        registry.set_quarantine(&id, quarantine);
        for f in self.store.revoked_fingerprints_of(&id).await? {
            registry.revoke_certificate(&f);
        }
        let ended = match end_session {
            Some(reason) => self.end_session(&id, reason, cohort),
            None => false,
        };
        Ok(Applied {
            sessions_ended: Some(usize::from(ended)),
        })
    }

    /// Ends the device's live session with `reason`, or, when it has none here, forgets the
    /// persistent session it left. Returns whether a live session ended.
    fn end_session(
        &self,
        id: &DeviceId,
        reason: DisconnectReason,
        cohort: Option<CohortId>,
    ) -> bool {
        if self.control.disconnect_device(id, reason) {
            return true;
        }
        // BrokerControl forgets a persistent session only as part of a change of rights;
        // re-applying the cohort just read from the database is that change, and alters
        // nothing else.
        self.control.reassign(id, cohort)
    }

    async fn devices(&self, ids: &[String]) -> Result<Applied, StoreError> {
        let ids = ids
            .iter()
            .map(|id| device_id(id))
            .collect::<Result<Vec<_>, _>>()?;
        let registry = self.control.registry();
        let records = self.store.device_records(&ids).await?;
        let found: std::collections::HashSet<&DeviceId> = records.iter().map(|r| &r.id).collect();
        for id in ids.iter().filter(|id| !found.contains(id)) {
            registry.remove_device(id);
        }
        for r in records {
            registry.upsert_device(r);
        }
        Ok(Applied {
            sessions_ended: Some(0),
        })
    }

    async fn devices_removed(&self, ids: &[String]) -> Result<Applied, StoreError> {
        let ids = ids
            .iter()
            .map(|id| device_id(id))
            .collect::<Result<Vec<_>, _>>()?;
        let registry = self.control.registry();
        let records = self.store.device_records(&ids).await?;
        let found: std::collections::HashMap<&DeviceId, Option<CohortId>> = records
            .iter()
            .map(|r| (&r.id, r.cohort_id.clone()))
            .collect();
        for f in self.store.revoked_fingerprints_of_many(&ids).await? {
            registry.revoke_certificate(&f);
        }
        for r in &records {
            registry.upsert_device(r.clone());
        }
        let mut ended = 0;
        for id in &ids {
            let cohort = match found.get(id) {
                Some(cohort) => cohort.clone(),
                None => {
                    registry.remove_device(id);
                    registry.set_quarantine(id, None);
                    None
                }
            };
            ended += usize::from(self.end_session(id, DisconnectReason::Revoked, cohort));
        }
        Ok(Applied {
            sessions_ended: Some(ended),
        })
    }

    async fn api_key(&self, id: &str) -> Result<Applied, StoreError> {
        let key = self
            .store
            .api_key(id)
            .await?
            .filter(|k| k.revoked_at_ms.is_none());
        let active = key.is_some();
        self.keys.refresh(id, key.as_ref());
        // A key that no longer authenticates ends its live MQTT service sessions now, not at
        // their next connect.
        let ended = if active {
            0
        } else {
            self.control.disconnect_key(id)
        };
        Ok(Applied {
            sessions_ended: Some(ended),
        })
    }
}

fn device_id(id: &str) -> Result<DeviceId, StoreError> {
    DeviceId::parse(id).map_err(|e| StoreError::Corrupt(format!("device id {id:?}: {e}")))
}

/// What the broker's registry keeps of a cohort (for the topic rights of scoped keys).
fn cohort_record(cohort: &Cohort) -> Result<CohortRecord, StoreError> {
    Ok(CohortRecord {
        id: CohortId::parse(&cohort.id)
            .map_err(|e| StoreError::Corrupt(format!("cohort id {:?}: {e}", cohort.id)))?,
        org_id: cohort.org_id.clone(),
        product_id: cohort.product_id.clone(),
    })
}

/// Where the ops layer sends changes after the database commit.
#[async_trait::async_trait]
pub trait ChangeFeed: Send + Sync + 'static {
    async fn publish(&self, change: Change) -> anyhow::Result<Applied>;
}

/// The embedded default: applies at once, on this process.
pub struct LocalFeed(Applier);

impl LocalFeed {
    pub fn new(applier: Applier) -> Self {
        Self(applier)
    }
}

#[async_trait::async_trait]
impl ChangeFeed for LocalFeed {
    async fn publish(&self, change: Change) -> anyhow::Result<Applied> {
        Ok(self.0.apply(&change).await?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn changes_have_a_stable_wire_form() {
        let cases = [
            (
                Change::Ca { id: "ca-1".into() },
                r#"{"kind":"ca","id":"ca-1"}"#,
            ),
            (
                Change::Device {
                    id: "d-1".into(),
                    end_session: Some(DisconnectReason::Reassigned),
                },
                r#"{"kind":"device","id":"d-1","end_session":"reassigned"}"#,
            ),
            (
                Change::Devices {
                    ids: vec!["a".into(), "b".into()],
                },
                r#"{"kind":"devices","ids":["a","b"]}"#,
            ),
            (
                Change::DevicesRemoved {
                    ids: vec!["a".into()],
                },
                r#"{"kind":"devices_removed","ids":["a"]}"#,
            ),
            (
                Change::ApiKey { id: "k".into() },
                r#"{"kind":"api_key","id":"k"}"#,
            ),
        ];
        for (change, json) in cases {
            assert_eq!(serde_json::to_string(&change).unwrap(), json);
            assert_eq!(serde_json::from_str::<Change>(json).unwrap(), change);
        }
    }
}

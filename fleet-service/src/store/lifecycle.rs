//! Devices created by an operator before manufacturing, their deletion, and revoked
//! certificates.

use std::collections::BTreeMap;

use fleet_wire::{CohortId, DeviceId};

use super::devices::DeviceState;
use super::{now_ms, tags_to_json, Store, StoreError};

/// A device to register before it first connects.
#[derive(Debug, Clone)]
pub struct NewRegisteredDevice {
    pub id: DeviceId,
    pub org_id: String,
    pub product_id: String,
    pub cohort_id: Option<CohortId>,
    pub tags: BTreeMap<String, String>,
    pub pinned_fingerprint: Option<String>,
}

impl Store {
    /// Creates a device in state `registered`. [`StoreError::Conflict`] when the id is taken
    /// (by any organization: device ids are MQTT client ids).
    pub async fn register_device(&self, new: &NewRegisteredDevice) -> Result<(), StoreError> {
        let now = now_ms();
        with_pool!(self, |pool, begin| {
            let mut tx = pool.begin_with(begin).await?;
            let inserted = sqlx::query(
                "INSERT INTO devices (id, org_id, product_id, cohort_id, tags, state, \
                 state_reason, state_changed_at, online, session_epoch, presence_rank, \
                 pinned_fingerprint, created_at, updated_at) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, FALSE, 0, 1, $9, $8, $8) \
                 ON CONFLICT (id) DO NOTHING",
            )
            .bind(new.id.as_str())
            .bind(&new.org_id)
            .bind(&new.product_id)
            .bind(new.cohort_id.as_ref().map(|c| c.as_str()))
            .bind(tags_to_json(&new.tags))
            .bind(DeviceState::Registered.as_str())
            .bind("registered: awaiting its first connection")
            .bind(now)
            .bind(&new.pinned_fingerprint)
            .execute(&mut *tx)
            .await
            .map_err(|e| super::constraint(e, "device", "the device's product or cohort"))?
            .rows_affected();
            if inserted == 0 {
                return Err(StoreError::Conflict("a device with this id"));
            }
            if !new.tags.is_empty() {
                let mut q =
                    sqlx::QueryBuilder::new("INSERT INTO device_tags (device_id, key, value) ");
                q.push_values(&new.tags, |mut b, (k, v)| {
                    b.push_bind(new.id.as_str()).push_bind(k).push_bind(v);
                });
                q.build().execute(&mut *tx).await?;
            }
            tx.commit().await?;
        });
        Ok(())
    }

    /// Records certificates that are never admitted again.
    pub async fn revoke_certificates(
        &self,
        org_id: &str,
        device: &DeviceId,
        fingerprints: &[String],
        reason: &str,
    ) -> Result<(), StoreError> {
        let now = now_ms();
        with_pool!(self, |pool, begin| {
            let mut tx = pool.begin_with(begin).await?;
            for f in fingerprints {
                sqlx::query(
                    "INSERT INTO revoked_certificates \
                     (fingerprint_sha256, org_id, device_id, reason, revoked_at) \
                     VALUES ($1, $2, $3, $4, $5) ON CONFLICT (fingerprint_sha256) DO NOTHING",
                )
                .bind(f)
                .bind(org_id)
                .bind(device.as_str())
                .bind(reason)
                .bind(now)
                .execute(&mut *tx)
                .await?;
            }
            tx.commit().await?;
        });
        Ok(())
    }

    /// Every revoked certificate's fingerprint, for loading the broker's registry at start.
    pub async fn revoked_fingerprints(&self) -> Result<Vec<String>, StoreError> {
        let rows: Vec<(String,)> = with_pool!(self, |pool| {
            sqlx::query_as("SELECT fingerprint_sha256 FROM revoked_certificates")
                .fetch_all(pool)
                .await
        })?;
        Ok(rows.into_iter().map(|(f,)| f).collect())
    }

    /// The certificates a device is known by: the one it was provisioned with, and its pin.
    pub async fn device_fingerprints(&self, id: &DeviceId) -> Result<Vec<String>, StoreError> {
        let row: Option<(Option<String>, Option<String>)> = with_pool!(self, |pool| {
            sqlx::query_as("SELECT cert_fingerprint, pinned_fingerprint FROM devices WHERE id = $1")
                .bind(id.as_str())
                .fetch_optional(pool)
                .await
        })?;
        let (a, b) = row.unwrap_or_default();
        let mut out: Vec<String> = a.into_iter().chain(b).collect();
        out.dedup();
        Ok(out)
    }

    /// Deletes a device and everything of it (tags, telemetry, executions). Returns whether it
    /// existed.
    pub async fn delete_device(&self, id: &DeviceId) -> Result<bool, StoreError> {
        let done = with_pool!(self, |pool| {
            sqlx::query("DELETE FROM devices WHERE id = $1")
                .bind(id.as_str())
                .execute(pool)
                .await
                .map(|d| d.rows_affected())
        })?;
        Ok(done > 0)
    }
}

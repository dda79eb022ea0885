//! Quarantine: a device set apart by an operator. Its state is `quarantined` (which presence,
//! update reports and the rollout engine never override) until the quarantine is lifted.

use broker::registry::QuarantineMode;
use fleet_wire::DeviceId;

use super::devices::DeviceState;
use super::{now_ms, Store, StoreError};

impl Store {
    /// Quarantines a device (again, with a new mode or reason, if it already is). Returns
    /// whether the device exists.
    pub async fn quarantine_device(
        &self,
        id: &DeviceId,
        mode: QuarantineMode,
        reason: &str,
    ) -> Result<bool, StoreError> {
        let now = now_ms();
        let done = with_pool!(self, |pool| {
            sqlx::query(
                "UPDATE devices SET state = $2, state_reason = $3, \
                 state_changed_at = CASE WHEN state <> $2 THEN $4 ELSE state_changed_at END, \
                 quarantine_mode = $5, quarantined_at = COALESCE(quarantined_at, $4), \
                 updated_at = $4 WHERE id = $1",
            )
            .bind(id.as_str())
            .bind(DeviceState::Quarantined.as_str())
            .bind(reason)
            .bind(now)
            .bind(mode.as_str())
            .execute(pool)
            .await
            .map(|d| d.rows_affected())
        })?;
        Ok(done > 0)
    }

    /// Lifts a device's quarantine; its state follows presence again (online, offline, or
    /// registered if it never connected). Returns false when it was not quarantined.
    pub async fn lift_quarantine(&self, id: &DeviceId, reason: &str) -> Result<bool, StoreError> {
        let now = now_ms();
        let done = with_pool!(self, |pool| {
            sqlx::query(
                "UPDATE devices SET \
                 state = CASE WHEN online THEN $2 \
                     WHEN connected_at IS NULL AND last_seen IS NULL THEN $3 ELSE $4 END, \
                 state_reason = $5, state_changed_at = $6, quarantine_mode = NULL, \
                 quarantined_at = NULL, updated_at = $6 \
                 WHERE id = $1 AND quarantine_mode IS NOT NULL",
            )
            .bind(id.as_str())
            .bind(DeviceState::Online.as_str())
            .bind(DeviceState::Registered.as_str())
            .bind(DeviceState::Offline.as_str())
            .bind(reason)
            .bind(now)
            .execute(pool)
            .await
            .map(|d| d.rows_affected())
        })?;
        Ok(done > 0)
    }

    /// A device's quarantine mode, if it is quarantined.
    pub async fn quarantine_of(&self, id: &DeviceId) -> Result<Option<QuarantineMode>, StoreError> {
        let row: Option<(Option<String>,)> = with_pool!(self, |pool| {
            sqlx::query_as("SELECT quarantine_mode FROM devices WHERE id = $1")
                .bind(id.as_str())
                .fetch_optional(pool)
                .await
        })?;
        row.and_then(|(m,)| m)
            .map(|m| {
                QuarantineMode::parse(&m)
                    .ok_or_else(|| StoreError::Corrupt(format!("quarantine mode {m:?}")))
            })
            .transpose()
    }

    /// Every quarantined device, for loading the broker's registry at start.
    pub async fn quarantined_devices(&self) -> Result<Vec<(DeviceId, QuarantineMode)>, StoreError> {
        let rows: Vec<(String, String)> = with_pool!(self, |pool| {
            sqlx::query_as(
                "SELECT id, quarantine_mode FROM devices WHERE quarantine_mode IS NOT NULL \
                 ORDER BY id",
            )
            .fetch_all(pool)
            .await
        })?;
        rows.into_iter()
            .map(|(id, m)| {
                let id = DeviceId::parse(&id)
                    .map_err(|e| StoreError::Corrupt(format!("device id {id:?}: {e}")))?;
                let mode = QuarantineMode::parse(&m)
                    .ok_or_else(|| StoreError::Corrupt(format!("quarantine mode {m:?}")))?;
                Ok((id, mode))
            })
            .collect()
    }
}

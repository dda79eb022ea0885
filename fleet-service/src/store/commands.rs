//! Commands sent over REST (to one device, or to a cohort) and the devices' acknowledgements.
//!
//! A command is stored before it is published, so an ack that comes back at once finds it,
//! and any replica answers for it. Its status is derived when it is read (acknowledged, sent,
//! timed out): no timer runs. An ack names only the command's id, so the intake records it
//! (one row per device and id) only when a command with that id was sent to the device or to
//! its cohort; a cohort command costs one row when sent and one per device that answers.

use std::collections::BTreeMap;

use fleet_wire::payload::CommandStatus;
use fleet_wire::{CohortId, DeviceId};

use super::{now_ms, Store, StoreError};

/// What a command to a device or a cohort is.
#[derive(Debug, Clone)]
pub struct NewCommand {
    /// Unique per device (per cohort for a cohort command).
    pub id: String,
    pub name: String,
    /// A JSON object.
    pub params: Option<serde_json::Value>,
    pub timeout_ms: i64,
    /// The API key that sends it.
    pub sent_by: String,
}

/// A device's answer to a command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandAckRecord {
    /// `accepted`, `succeeded`, `failed` or `rejected`.
    pub status: String,
    pub message: Option<String>,
    pub at_ms: i64,
}

/// A command as one device sees it: sent to it, or to its cohort; with its ack, if any.
#[derive(Debug, Clone, PartialEq)]
pub struct DeviceCommand {
    pub device_id: DeviceId,
    /// The cohort it was sent to, for a cohort command.
    pub cohort_id: Option<String>,
    pub id: String,
    pub name: String,
    pub params: Option<serde_json::Value>,
    pub sent_at_ms: i64,
    pub timeout_ms: i64,
    pub ack: Option<CommandAckRecord>,
}

/// A command sent to a cohort, and how its devices answered.
#[derive(Debug, Clone, PartialEq)]
pub struct CohortCommand {
    pub cohort_id: String,
    pub id: String,
    pub name: String,
    pub params: Option<serde_json::Value>,
    pub sent_at_ms: i64,
    pub timeout_ms: i64,
    /// The devices of the cohort that could receive it when it was sent (not quarantined).
    pub devices: u64,
    /// How many devices answered, by the status they answered with.
    pub acks: BTreeMap<String, u64>,
}

/// One device's ack from the bus, for the intake's batch. At most one per device and command
/// id in a batch (the intake keeps a final status over `accepted`).
#[derive(Debug, Clone)]
pub struct CommandAckRow {
    pub device_id: DeviceId,
    pub command_id: String,
    pub status: CommandStatus,
    pub message: Option<String>,
    pub at_ms: i64,
}

/// The name of a status as stored.
pub fn command_status_name(s: CommandStatus) -> &'static str {
    match s {
        CommandStatus::Accepted => "accepted",
        CommandStatus::Succeeded => "succeeded",
        CommandStatus::Failed => "failed",
        CommandStatus::Rejected => "rejected",
    }
}

fn params_from_text(s: Option<String>) -> Result<Option<serde_json::Value>, StoreError> {
    super::json_from_text(s, "command params")
}

/// A command as a device sees it: the cohort it was sent to (none when sent to the device),
/// name, params, sent at, timeout.
type TargetRow = (Option<String>, String, Option<String>, i64, i64);
/// An ack: status, message, when.
type AckRow = (String, Option<String>, i64);

/// Follows `WITH v (device_id, command_id, status, message, at) AS (VALUES ...`: records each
/// ack whose device has a command of that id, sent to it or to its current cohort. A stored
/// `accepted` gives way to a final status; a final status stays (a redelivery changes nothing).
pub(super) const ACKS_INSERT_FROM_V: &str = ") INSERT INTO command_acks \
     (device_id, command_id, cohort_id, status, message, acked_at) \
     SELECT v.device_id, v.command_id, cc.cohort_id, v.status, v.message, v.at \
     FROM v JOIN devices d ON d.id = v.device_id \
     LEFT JOIN cohort_commands cc ON cc.cohort_id = d.cohort_id AND cc.id = v.command_id \
     WHERE cc.id IS NOT NULL OR EXISTS (SELECT 1 FROM device_commands dc \
         WHERE dc.device_id = v.device_id AND dc.id = v.command_id) \
     ON CONFLICT (device_id, command_id) DO UPDATE SET \
     status = excluded.status, message = excluded.message, acked_at = excluded.acked_at \
     WHERE command_acks.status = 'accepted' AND excluded.status <> 'accepted'";

/// Acks one multi-row statement records (5 binds a row).
pub(super) const ACK_ROWS_PER_INSERT: usize = 500;

/// The intake's write of a batch's acks (`$rows`: `&[&CommandAckRow]`) inside its
/// transaction. A macro, so it expands inside each backend's arm of `with_pool!`.
macro_rules! record_acks {
    ($tx:expr, $rows:expr) => {{
        let rows: &[&$crate::store::CommandAckRow] = $rows;
        for chunk in rows.chunks($crate::store::commands::ACK_ROWS_PER_INSERT) {
            let mut q =
                sqlx::QueryBuilder::new("WITH v (device_id, command_id, status, message, at) AS (");
            q.push_values(chunk, |mut b, a| {
                b.push_bind(a.device_id.as_str())
                    .push_bind(a.command_id.as_str())
                    .push_bind($crate::store::commands::command_status_name(a.status))
                    .push_bind(a.message.as_deref())
                    .push_bind(a.at_ms);
            });
            q.push($crate::store::commands::ACKS_INSERT_FROM_V);
            q.build().execute(&mut *$tx).await?;
        }
    }};
}
pub(super) use record_acks;

impl Store {
    /// Stores a command for a device. [`StoreError::Conflict`] when the device already has a
    /// command with this id; [`StoreError::MissingReference`] when the device is gone.
    pub async fn create_device_command(
        &self,
        device: &DeviceId,
        new: &NewCommand,
    ) -> Result<i64, StoreError> {
        let now = now_ms();
        with_pool!(self, |pool| {
            sqlx::query(
                "INSERT INTO device_commands \
                 (device_id, id, name, params, sent_at, timeout_ms, sent_by) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7)",
            )
            .bind(device.as_str())
            .bind(&new.id)
            .bind(&new.name)
            .bind(new.params.as_ref().map(|p| p.to_string()))
            .bind(now)
            .bind(new.timeout_ms)
            .bind(&new.sent_by)
            .execute(pool)
            .await
            .map(drop)
        })
        .map_err(|e| super::constraint(e, "a command with this id for the device", "device"))?;
        Ok(now)
    }

    /// Forgets a command that could not be published.
    pub async fn delete_device_command(
        &self,
        device: &DeviceId,
        id: &str,
    ) -> Result<(), StoreError> {
        with_pool!(self, |pool| {
            sqlx::query("DELETE FROM device_commands WHERE device_id = $1 AND id = $2")
                .bind(device.as_str())
                .bind(id)
                .execute(pool)
                .await
                .map(drop)
        })?;
        Ok(())
    }

    /// The command `id` as the device sees it: sent to the device, else to its current cohort;
    /// with the device's ack. `None` when neither has one.
    pub async fn device_command(
        &self,
        device: &DeviceId,
        id: &str,
    ) -> Result<Option<DeviceCommand>, StoreError> {
        let (row, ack): (Option<TargetRow>, Option<AckRow>) = with_pool!(self, |pool| {
            let direct: Option<TargetRow> = sqlx::query_as(
                "SELECT CAST(NULL AS TEXT), name, params, sent_at, timeout_ms \
                 FROM device_commands WHERE device_id = $1 AND id = $2",
            )
            .bind(device.as_str())
            .bind(id)
            .fetch_optional(pool)
            .await?;
            let row = match direct {
                Some(row) => Some(row),
                None => {
                    sqlx::query_as(
                        "SELECT cc.cohort_id, cc.name, cc.params, cc.sent_at, cc.timeout_ms \
                         FROM cohort_commands cc JOIN devices d ON d.cohort_id = cc.cohort_id \
                         WHERE d.id = $1 AND cc.id = $2",
                    )
                    .bind(device.as_str())
                    .bind(id)
                    .fetch_optional(pool)
                    .await?
                }
            };
            let ack = match row {
                Some(_) => {
                    sqlx::query_as(
                        "SELECT status, message, acked_at FROM command_acks \
                         WHERE device_id = $1 AND command_id = $2",
                    )
                    .bind(device.as_str())
                    .bind(id)
                    .fetch_optional(pool)
                    .await?
                }
                None => None,
            };
            (row, ack)
        });
        let Some((cohort_id, name, params, sent_at_ms, timeout_ms)) = row else {
            return Ok(None);
        };
        Ok(Some(DeviceCommand {
            device_id: device.clone(),
            cohort_id,
            id: id.to_owned(),
            name,
            params: params_from_text(params)?,
            sent_at_ms,
            timeout_ms,
            ack: ack.map(|(status, message, at_ms)| CommandAckRecord {
                status,
                message,
                at_ms,
            }),
        }))
    }

    /// Stores a command for a cohort, counting the devices that can receive it (those of the
    /// cohort that are not quarantined: a quarantined device hears only its own commands).
    /// [`StoreError::Conflict`] when the cohort already has a command with this id.
    pub async fn create_cohort_command(
        &self,
        cohort: &CohortId,
        new: &NewCommand,
    ) -> Result<CohortCommand, StoreError> {
        let now = now_ms();
        let devices: i64 = with_pool!(self, |pool, begin| {
            let mut tx = pool.begin_with(begin).await?;
            let (devices,): (i64,) = sqlx::query_as(
                "SELECT COUNT(*) FROM devices WHERE cohort_id = $1 AND quarantine_mode IS NULL",
            )
            .bind(cohort.as_str())
            .fetch_one(&mut *tx)
            .await?;
            sqlx::query(
                "INSERT INTO cohort_commands \
                 (cohort_id, id, name, params, sent_at, timeout_ms, sent_by, devices) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
            )
            .bind(cohort.as_str())
            .bind(&new.id)
            .bind(&new.name)
            .bind(new.params.as_ref().map(|p| p.to_string()))
            .bind(now)
            .bind(new.timeout_ms)
            .bind(&new.sent_by)
            .bind(devices)
            .execute(&mut *tx)
            .await
            .map_err(|e| super::constraint(e, "a command with this id for the cohort", "cohort"))?;
            tx.commit().await?;
            devices
        });
        Ok(CohortCommand {
            cohort_id: cohort.to_string(),
            id: new.id.clone(),
            name: new.name.clone(),
            params: new.params.clone(),
            sent_at_ms: now,
            timeout_ms: new.timeout_ms,
            devices: devices.max(0) as u64,
            acks: BTreeMap::new(),
        })
    }

    /// Forgets a cohort command that could not be published.
    pub async fn delete_cohort_command(
        &self,
        cohort: &CohortId,
        id: &str,
    ) -> Result<(), StoreError> {
        with_pool!(self, |pool| {
            sqlx::query("DELETE FROM cohort_commands WHERE cohort_id = $1 AND id = $2")
                .bind(cohort.as_str())
                .bind(id)
                .execute(pool)
                .await
                .map(drop)
        })?;
        Ok(())
    }

    /// A cohort's command `id`, with its devices' acks counted by status; `None` when the
    /// cohort has no such command.
    pub async fn cohort_command(
        &self,
        cohort: &str,
        id: &str,
    ) -> Result<Option<CohortCommand>, StoreError> {
        let (row, counts) = with_pool!(self, |pool| {
            let row: Option<(String, Option<String>, i64, i64, i64)> = sqlx::query_as(
                "SELECT name, params, sent_at, timeout_ms, devices FROM cohort_commands \
                 WHERE cohort_id = $1 AND id = $2",
            )
            .bind(cohort)
            .bind(id)
            .fetch_optional(pool)
            .await?;
            let counts: Vec<(String, i64)> = match row {
                Some(_) => {
                    sqlx::query_as(
                        "SELECT status, COUNT(*) FROM command_acks \
                         WHERE cohort_id = $1 AND command_id = $2 GROUP BY status",
                    )
                    .bind(cohort)
                    .bind(id)
                    .fetch_all(pool)
                    .await?
                }
                None => Vec::new(),
            };
            Ok::<_, sqlx::Error>((row, counts))
        })?;
        let Some((name, params, sent_at_ms, timeout_ms, devices)) = row else {
            return Ok(None);
        };
        Ok(Some(CohortCommand {
            cohort_id: cohort.to_owned(),
            id: id.to_owned(),
            name,
            params: params_from_text(params)?,
            sent_at_ms,
            timeout_ms,
            devices: devices.max(0) as u64,
            acks: counts
                .into_iter()
                .map(|(s, n)| (s, n.max(0) as u64))
                .collect(),
        }))
    }
}

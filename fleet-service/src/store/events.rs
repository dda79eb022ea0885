//! The intake's writes: one transaction per batch of bus events, and the telemetry history
//! (reads and retention).

use std::collections::{BTreeSet, HashSet};
use std::time::Duration;

use fleet_wire::payload::{Presence, PresenceEvent};
use fleet_wire::DeviceId;

use super::devices::DeviceState;
use super::{now_ms, Store, StoreError};

/// One telemetry message for the history.
#[derive(Debug, Clone)]
pub struct TelemetryRow {
    pub device_id: DeviceId,
    pub epoch: u64,
    pub seq: u64,
    pub received_at_ms: i64,
    /// The JSON object as published.
    pub payload: String,
}

/// The newest telemetry of one device in a batch.
#[derive(Debug, Clone)]
pub struct LatestTelemetry {
    pub device_id: DeviceId,
    pub payload: String,
    pub at_ms: i64,
}

/// The newest reported state of one device in a batch.
#[derive(Debug, Clone)]
pub struct ReportedChange {
    pub device_id: DeviceId,
    /// The whole reported JSON object.
    pub reported: String,
    pub firmware_version: Option<String>,
    pub at_ms: i64,
}

/// What a batch of bus events changes, already grouped by the intake.
#[derive(Debug, Clone, Default)]
pub struct EventBatch {
    /// The node whose broker holds the sessions `connected` events announce.
    pub node_id: String,
    /// Presence events; the store applies each only if it is newer than what it has.
    pub presence: Vec<Presence>,
    /// Telemetry history rows; a row already stored (same device, epoch, seq) is skipped.
    pub telemetry: Vec<TelemetryRow>,
    /// At most one per device.
    pub latest_telemetry: Vec<LatestTelemetry>,
    /// At most one per device.
    pub reported: Vec<ReportedChange>,
    /// When each device was last heard from in this batch (telemetry, state, command acks).
    pub seen: Vec<(DeviceId, i64)>,
    /// Update progress reports, in the order they arrived.
    pub update_reports: Vec<super::UpdateReport>,
    /// Command acks, at most one per device and command id; recorded only for commands sent
    /// over REST (to the device or its cohort).
    pub command_acks: Vec<super::CommandAckRow>,
}

impl EventBatch {
    fn device_ids(&self) -> BTreeSet<&DeviceId> {
        self.presence
            .iter()
            .map(|p| &p.device_id)
            .chain(self.telemetry.iter().map(|t| &t.device_id))
            .chain(self.latest_telemetry.iter().map(|t| &t.device_id))
            .chain(self.reported.iter().map(|r| &r.device_id))
            .chain(self.seen.iter().map(|(d, _)| d))
            .chain(self.update_reports.iter().map(|r| &r.device_id))
            .chain(self.command_acks.iter().map(|a| &a.device_id))
            .collect()
    }
}

/// What [`Store::apply_events`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EventOutcome {
    /// Devices the batch names that do not exist; nothing was written for them.
    pub unknown_devices: HashSet<DeviceId>,
    pub presence_applied: u64,
    /// Presence events older than what was stored, deliberately ignored.
    pub presence_stale: u64,
    pub telemetry_inserted: u64,
    /// Telemetry rows that were already stored (redeliveries).
    pub telemetry_duplicates: u64,
    /// Update reports applied, and those ignored (finished execution, older than the stored
    /// report, or no such deployment for the device).
    pub update_reports_applied: u64,
    pub update_reports_ignored: u64,
}

/// A telemetry message from the history.
#[derive(Debug, Clone, PartialEq)]
pub struct TelemetryRecord {
    pub epoch: u64,
    pub seq: u64,
    pub received_at_ms: i64,
    pub payload: serde_json::Value,
}

/// How much telemetry history to keep. `None` means no limit of that kind.
#[derive(Debug, Clone, Copy, Default)]
pub struct TelemetryRetention {
    /// Rows received longer ago than this are deleted.
    pub max_age: Option<Duration>,
    /// Beyond this many rows per device, the oldest (by epoch, then seq) are deleted.
    pub max_rows_per_device: Option<u32>,
}

/// Bind parameters per statement stay well below SQLite's (32766) and PostgreSQL's (65535)
/// limits.
const IDS_PER_QUERY: usize = 500;
const TELEMETRY_ROWS_PER_INSERT: usize = 1000;

/// The conditional presence update: it applies only when `(epoch, rank)` is newer than the
/// stored `(session_epoch, presence_rank)`, and changes the state only where presence drives
/// it. All right-hand sides read the row as it was before the update. `PRESENCE_DRIVEN` is
/// spelled out because `concat!` takes only literals; a test checks the two agree.
const PRESENCE_UPDATE: &str = "UPDATE devices SET \
     online = $2, \
     state = CASE WHEN state IN ('registered', 'offline', 'online') THEN $3 ELSE state END, \
     state_reason = CASE WHEN state IN ('registered', 'offline', 'online') \
         THEN $4 ELSE state_reason END, \
     state_changed_at = CASE WHEN state IN ('registered', 'offline', 'online') AND state <> $3 \
         THEN $5 ELSE state_changed_at END, \
     session_epoch = $6, \
     presence_rank = $7, \
     node_id = $8, \
     connected_at = COALESCE($9, connected_at), \
     last_seen = CASE WHEN last_seen IS NULL OR last_seen < $5 THEN $5 ELSE last_seen END, \
     disconnect_reason = $10, \
     remote_addr = COALESCE($11, remote_addr), \
     updated_at = $12 \
     WHERE id = $1 AND (session_epoch < $6 OR (session_epoch = $6 AND presence_rank < $7))";

/// Devices one multi-row UPDATE changes (a `VALUES` row of 2–3 parameters each).
const DEVICE_ROWS_PER_UPDATE: usize = 500;

/// Follows `WITH v (id, payload, at) AS (VALUES ...`; then `updated_at`'s parameter and
/// `FROM v WHERE devices.id = v.id` (UPDATE ... FROM: SQLite 3.33+, PostgreSQL).
const TELEMETRY_LATEST_UPDATE_FROM_V: &str = ") UPDATE devices SET \
     last_telemetry = CASE WHEN devices.last_telemetry_at IS NULL \
         OR devices.last_telemetry_at <= v.at THEN v.payload ELSE devices.last_telemetry END, \
     last_telemetry_at = CASE WHEN devices.last_telemetry_at IS NULL \
         OR devices.last_telemetry_at <= v.at THEN v.at ELSE devices.last_telemetry_at END, \
     updated_at = ";

const REPORTED_UPDATE: &str = "UPDATE devices SET \
     reported = CASE WHEN reported_at IS NULL OR reported_at <= $4 THEN $2 ELSE reported END, \
     firmware_version = CASE WHEN reported_at IS NULL OR reported_at <= $4 \
         THEN $3 ELSE firmware_version END, \
     reported_at = CASE WHEN reported_at IS NULL OR reported_at <= $4 \
         THEN $4 ELSE reported_at END, \
     updated_at = $5 \
     WHERE id = $1";

/// Follows `WITH v (id, at) AS (VALUES ...`.
const SEEN_UPDATE_FROM_V: &str = ") UPDATE devices SET \
     last_seen = CASE WHEN devices.last_seen IS NULL OR devices.last_seen < v.at \
         THEN v.at ELSE devices.last_seen END \
     FROM v WHERE devices.id = v.id";

/// One session's row of the connection history; a disconnect fills in its end, whichever
/// event came first.
const SESSION_UPSERT: &str = "INSERT INTO device_sessions \
     (device_id, epoch, started_at, ended_at, end_reason, remote_addr, protocol, node_id) \
     VALUES ($1, $2, $3, $4, $5, $6, $7, $8) \
     ON CONFLICT (device_id, epoch) DO UPDATE SET \
     ended_at = COALESCE(excluded.ended_at, device_sessions.ended_at), \
     end_reason = COALESCE(excluded.end_reason, device_sessions.end_reason), \
     remote_addr = COALESCE(device_sessions.remote_addr, excluded.remote_addr), \
     protocol = COALESCE(device_sessions.protocol, excluded.protocol)";

/// `(online, state, state_reason, presence_rank, node_id, connected_at, disconnect_reason)`
/// for a presence event.
type PresenceColumns = (
    bool,
    &'static str,
    String,
    i16,
    Option<String>,
    Option<i64>,
    Option<&'static str>,
);

fn presence_columns(p: &Presence, node_id: &str) -> PresenceColumns {
    match p.event {
        PresenceEvent::Connected => (
            true,
            DeviceState::Online.as_str(),
            "connected".to_owned(),
            0,
            Some(node_id.to_owned()),
            Some(p.connected_at_ms),
            None,
        ),
        PresenceEvent::Disconnected => {
            let reason = p.reason.map(|r| r.as_str()).unwrap_or("unknown");
            (
                false,
                DeviceState::Offline.as_str(),
                format!("disconnected: {reason}"),
                1,
                None,
                None,
                Some(reason),
            )
        }
    }
}

fn to_i64(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

impl Store {
    /// Writes a batch of bus events in one transaction. Events of devices that do not exist
    /// are skipped and reported in [`EventOutcome::unknown_devices`]; everything else is
    /// idempotent, so the whole batch may be retried after a failure.
    pub async fn apply_events(&self, batch: &EventBatch) -> Result<EventOutcome, StoreError> {
        let now = now_ms();
        let wanted: Vec<&DeviceId> = batch.device_ids().into_iter().collect();
        let mut outcome = EventOutcome::default();
        with_pool!(self, |pool, begin| {
            let mut tx = pool.begin_with(begin).await?;

            let mut known: HashSet<String> = HashSet::with_capacity(wanted.len());
            for chunk in wanted.chunks(IDS_PER_QUERY) {
                let mut q = sqlx::QueryBuilder::new("SELECT id FROM devices WHERE id IN (");
                let mut list = q.separated(", ");
                for id in chunk {
                    list.push_bind(id.as_str());
                }
                q.push(")");
                let rows: Vec<(String,)> = q.build_query_as().fetch_all(&mut *tx).await?;
                known.extend(rows.into_iter().map(|(id,)| id));
            }
            let exists = |id: &DeviceId| known.contains(id.as_str());
            outcome.unknown_devices = wanted
                .iter()
                .filter(|id| !exists(id))
                .map(|id| (*id).clone())
                .collect();

            for p in batch.presence.iter().filter(|p| exists(&p.device_id)) {
                let (online, state, reason, rank, node, connected_at, disconnect_reason) =
                    presence_columns(p, &batch.node_id);
                let done = sqlx::query(PRESENCE_UPDATE)
                    .bind(p.device_id.as_str())
                    .bind(online)
                    .bind(state)
                    .bind(reason)
                    .bind(p.ts_ms)
                    .bind(to_i64(p.epoch))
                    .bind(rank)
                    .bind(node)
                    .bind(connected_at)
                    .bind(disconnect_reason)
                    .bind(p.remote_addr.as_deref())
                    .bind(now)
                    .execute(&mut *tx)
                    .await?;
                if done.rows_affected() > 0 {
                    outcome.presence_applied += 1;
                } else {
                    outcome.presence_stale += 1;
                }
                // The connection history takes every event, stale for the state or not.
                let (ended_at, end_reason) = match p.event {
                    PresenceEvent::Connected => (None, None),
                    PresenceEvent::Disconnected => (
                        Some(p.ts_ms),
                        Some(p.reason.map_or("unknown", |r| r.as_str())),
                    ),
                };
                sqlx::query(SESSION_UPSERT)
                    .bind(p.device_id.as_str())
                    .bind(to_i64(p.epoch))
                    .bind(p.connected_at_ms)
                    .bind(ended_at)
                    .bind(end_reason)
                    .bind(p.remote_addr.as_deref())
                    .bind(p.protocol.as_deref())
                    .bind(&batch.node_id)
                    .execute(&mut *tx)
                    .await?;
            }

            let rows: Vec<&TelemetryRow> = batch
                .telemetry
                .iter()
                .filter(|t| exists(&t.device_id))
                .collect();
            for chunk in rows.chunks(TELEMETRY_ROWS_PER_INSERT) {
                let mut q = sqlx::QueryBuilder::new(
                    "INSERT INTO telemetry (device_id, epoch, seq, received_at, payload) ",
                );
                q.push_values(chunk, |mut b, t| {
                    b.push_bind(t.device_id.as_str())
                        .push_bind(to_i64(t.epoch))
                        .push_bind(to_i64(t.seq))
                        .push_bind(t.received_at_ms)
                        .push_bind(t.payload.as_str());
                });
                q.push(" ON CONFLICT (device_id, epoch, seq) DO NOTHING");
                let inserted = q.build().execute(&mut *tx).await?.rows_affected();
                outcome.telemetry_inserted += inserted;
                outcome.telemetry_duplicates += chunk.len() as u64 - inserted;
            }

            // One statement per chunk of devices, not per device: at thousands of devices a
            // second, a statement each was most of the intake's time.
            let latest: Vec<&LatestTelemetry> = batch
                .latest_telemetry
                .iter()
                .filter(|t| exists(&t.device_id))
                .collect();
            for chunk in latest.chunks(DEVICE_ROWS_PER_UPDATE) {
                let mut q = sqlx::QueryBuilder::new("WITH v (id, payload, at) AS (");
                q.push_values(chunk, |mut b, t| {
                    b.push_bind(t.device_id.as_str())
                        .push_bind(t.payload.as_str())
                        .push_bind(t.at_ms);
                });
                q.push(TELEMETRY_LATEST_UPDATE_FROM_V);
                q.push_bind(now);
                q.push(" FROM v WHERE devices.id = v.id");
                q.build().execute(&mut *tx).await?;
            }

            for r in batch.reported.iter().filter(|r| exists(&r.device_id)) {
                sqlx::query(REPORTED_UPDATE)
                    .bind(r.device_id.as_str())
                    .bind(r.reported.as_str())
                    .bind(r.firmware_version.as_deref())
                    .bind(r.at_ms)
                    .bind(now)
                    .execute(&mut *tx)
                    .await?;
            }

            let seen: Vec<&(DeviceId, i64)> =
                batch.seen.iter().filter(|(id, _)| exists(id)).collect();
            for chunk in seen.chunks(DEVICE_ROWS_PER_UPDATE) {
                let mut q = sqlx::QueryBuilder::new("WITH v (id, at) AS (");
                q.push_values(chunk, |mut b, (id, at)| {
                    b.push_bind(id.as_str()).push_bind(*at);
                });
                q.push(SEEN_UPDATE_FROM_V);
                q.build().execute(&mut *tx).await?;
            }

            let acks: Vec<&super::CommandAckRow> = batch
                .command_acks
                .iter()
                .filter(|a| exists(&a.device_id))
                .collect();
            super::commands::record_acks!(tx, &acks);

            for r in batch.update_reports.iter().filter(|r| exists(&r.device_id)) {
                if super::updates::apply_report!(tx, r, now) {
                    outcome.update_reports_applied += 1;
                } else {
                    outcome.update_reports_ignored += 1;
                }
            }

            tx.commit().await?;
        });
        Ok(outcome)
    }

    /// The newest `limit` telemetry messages of a device, newest (highest epoch, seq) first.
    pub async fn telemetry(
        &self,
        device_id: &DeviceId,
        limit: u32,
    ) -> Result<Vec<TelemetryRecord>, StoreError> {
        self.telemetry_before(device_id, None, limit).await
    }

    /// Like [`Store::telemetry`], but only messages older than `(epoch, seq)` when given: the
    /// next page of a listing.
    pub async fn telemetry_before(
        &self,
        device_id: &DeviceId,
        before: Option<(u64, u64)>,
        limit: u32,
    ) -> Result<Vec<TelemetryRecord>, StoreError> {
        let (epoch, seq) = before
            .map(|(e, s)| (Some(e as i64), Some(s as i64)))
            .unwrap_or_default();
        let rows: Vec<(i64, i64, i64, String)> = with_pool!(self, |pool| {
            sqlx::query_as(
                "SELECT epoch, seq, received_at, payload FROM telemetry WHERE device_id = $1 \
                 AND ($3 IS NULL OR epoch < $3 OR (epoch = $3 AND seq < $4)) \
                 ORDER BY epoch DESC, seq DESC LIMIT $2",
            )
            .bind(device_id.as_str())
            .bind(i64::from(limit))
            .bind(epoch)
            .bind(seq)
            .fetch_all(pool)
            .await
        })?;
        rows.into_iter()
            .map(|(epoch, seq, received_at, payload)| {
                Ok(TelemetryRecord {
                    epoch: epoch.max(0) as u64,
                    seq: seq.max(0) as u64,
                    received_at_ms: received_at,
                    payload: serde_json::from_str(&payload)
                        .map_err(|e| StoreError::Corrupt(format!("telemetry payload: {e}")))?,
                })
            })
            .collect()
    }

    /// How many telemetry messages of a device the history holds.
    pub async fn telemetry_count(&self, device_id: &DeviceId) -> Result<u64, StoreError> {
        let (n,): (i64,) = with_pool!(self, |pool| {
            sqlx::query_as("SELECT COUNT(*) FROM telemetry WHERE device_id = $1")
                .bind(device_id.as_str())
                .fetch_one(pool)
                .await
        })?;
        Ok(n.max(0) as u64)
    }

    /// Deletes telemetry history (and connection history older than the age limit) beyond
    /// `retention`; returns how many rows went. Meant to be called periodically.
    pub async fn prune_telemetry(&self, retention: &TelemetryRetention) -> Result<u64, StoreError> {
        let mut deleted = 0;
        if let Some(max_age) = retention.max_age {
            let cutoff =
                now_ms().saturating_sub(i64::try_from(max_age.as_millis()).unwrap_or(i64::MAX));
            // The connection history and the commands sent over REST (with their acks) age
            // out with the telemetry.
            for sql in [
                "DELETE FROM telemetry WHERE received_at < $1",
                "DELETE FROM device_sessions WHERE started_at < $1",
                "DELETE FROM device_commands WHERE sent_at < $1",
                "DELETE FROM cohort_commands WHERE sent_at < $1",
                "DELETE FROM command_acks WHERE acked_at < $1",
            ] {
                deleted += with_pool!(self, |pool| {
                    sqlx::query(sql)
                        .bind(cutoff)
                        .execute(pool)
                        .await
                        .map(|done| done.rows_affected())
                })?;
            }
        }
        if let Some(max_rows) = retention.max_rows_per_device {
            deleted += with_pool!(self, |pool| {
                sqlx::query(
                    "DELETE FROM telemetry WHERE (device_id, epoch, seq) IN ( \
                       SELECT device_id, epoch, seq FROM ( \
                         SELECT device_id, epoch, seq, ROW_NUMBER() OVER ( \
                           PARTITION BY device_id ORDER BY epoch DESC, seq DESC) AS rn \
                         FROM telemetry) ranked \
                       WHERE rn > $1)",
                )
                .bind(i64::from(max_rows))
                .execute(pool)
                .await
                .map(|done| done.rows_affected())
            })?;
        }
        Ok(deleted)
    }
}

#[cfg(test)]
mod tests {
    use super::super::devices::PRESENCE_DRIVEN;
    use super::*;

    #[test]
    fn presence_update_uses_the_presence_driven_states() {
        assert!(PRESENCE_UPDATE.contains(PRESENCE_DRIVEN));
        assert_eq!(PRESENCE_UPDATE.matches(PRESENCE_DRIVEN).count(), 3);
    }
}

/// One session of a device, from the connection history.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct SessionRecord {
    pub epoch: i64,
    #[sqlx(rename = "started_at")]
    pub started_at_ms: i64,
    #[sqlx(rename = "ended_at")]
    pub ended_at_ms: Option<i64>,
    pub end_reason: Option<String>,
    pub remote_addr: Option<String>,
    pub protocol: Option<String>,
}

impl Store {
    /// A device's most recent sessions, newest first.
    pub async fn device_sessions(
        &self,
        id: &DeviceId,
        limit: u32,
    ) -> Result<Vec<SessionRecord>, StoreError> {
        let rows = with_pool!(self, |pool| {
            sqlx::query_as(
                "SELECT epoch, started_at, ended_at, end_reason, remote_addr, protocol \
                 FROM device_sessions WHERE device_id = $1 ORDER BY epoch DESC LIMIT $2",
            )
            .bind(id.as_str())
            .bind(i64::from(limit))
            .fetch_all(pool)
            .await
        })?;
        Ok(rows)
    }
}

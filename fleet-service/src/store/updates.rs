//! Software updates: signing keys, releases, deployments and per-device executions, plus the
//! intake's writes of device progress reports.
//!
//! # Invariants
//! - At most one deployment per cohort is `active` or `paused` (a partial unique index,
//!   `deployments_one_live`, migration 0012; and checked in the transaction
//!   that creates one).
//! - `admit_below` of a deployment only grows, and an execution is admitted exactly when its
//!   rank is below it: admission raises both in one transaction.
//! - A finished execution (`succeeded`, `failed`, `rejected`) never changes again; a device's
//!   late report may still replace `timed_out`, because the device is the truth.
//! - An execution is `deferred` exactly while it is admitted, has not reported, and its device
//!   is not reachable ([`REACHABLE`]); it then has a `deferred_reason` and no `notified_at`,
//!   so neither the wave, the thresholds nor the timeout count it. The engine re-checks this
//!   on every pass (`refresh_reachability!`); a report from the device ends it at once.

use std::collections::BTreeMap;

use fleet_wire::update::{
    rollout_rank, DeploymentState, ReleaseManifest, SignedRelease, UpdateStatus, UpdateStatusKind,
    ADMIT_ALL,
};
use fleet_wire::{CohortId, DeviceId};

use super::devices::DeviceState;
use super::{constraint, new_id, now_ms, Store, StoreError};
use crate::rollout::policy::{Counts, RolloutPolicy};

/// An Ed25519 public key that may sign releases.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct SigningKey {
    pub id: String,
    pub org_id: String,
    pub name: String,
    /// Base64 of the 32-byte key.
    pub public_key: String,
    #[sqlx(rename = "created_at")]
    pub created_at_ms: i64,
    #[sqlx(rename = "revoked_at")]
    pub revoked_at_ms: Option<i64>,
}

/// A signed release of a product.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Release {
    pub id: String,
    pub manifest: ReleaseManifest,
    pub signature: String,
    pub key_id: String,
    pub notes: Option<String>,
    pub created_at_ms: i64,
}

impl Release {
    pub fn signed(&self) -> SignedRelease {
        SignedRelease {
            manifest: self.manifest.clone(),
            signature: self.signature.clone(),
            key_id: self.key_id.clone(),
        }
    }
}

#[derive(sqlx::FromRow)]
struct ReleaseRow {
    id: String,
    product_id: String,
    version: String,
    url: String,
    size: i64,
    sha256: String,
    signature: String,
    key_id: String,
    notes: Option<String>,
    created_at: i64,
}

impl From<ReleaseRow> for Release {
    fn from(r: ReleaseRow) -> Self {
        Release {
            id: r.id,
            manifest: ReleaseManifest {
                product_id: r.product_id,
                version: r.version,
                url: r.url,
                size: r.size.max(0) as u64,
                sha256: r.sha256,
            },
            signature: r.signature,
            key_id: r.key_id,
            notes: r.notes,
            created_at_ms: r.created_at,
        }
    }
}

const RELEASE_COLUMNS: &str =
    "id, product_id, version, url, size, sha256, signature, key_id, notes, created_at";

/// Whether a deployment installs a release or takes a cohort back to one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeploymentKind {
    Rollout,
    Rollback,
}

impl DeploymentKind {
    pub fn as_str(self) -> &'static str {
        match self {
            DeploymentKind::Rollout => "rollout",
            DeploymentKind::Rollback => "rollback",
        }
    }
}

/// A release targeted at a cohort.
#[derive(Debug, Clone, PartialEq)]
pub struct Deployment {
    pub id: String,
    pub product_id: String,
    pub cohort_id: CohortId,
    pub release_id: String,
    pub kind: DeploymentKind,
    pub state: DeploymentState,
    pub state_reason: String,
    pub policy: RolloutPolicy,
    pub current_wave: u32,
    pub admit_below: u64,
    pub revision: u64,
    pub rate_started_at_ms: Option<i64>,
    pub rate_base: u64,
    pub previous_release_id: Option<String>,
    pub rollback_of: Option<String>,
    pub rolled_back_by: Option<String>,
    pub created_at_ms: i64,
    pub updated_at_ms: i64,
    pub finished_at_ms: Option<i64>,
}

#[derive(sqlx::FromRow)]
struct DeploymentRow {
    id: String,
    product_id: String,
    cohort_id: String,
    release_id: String,
    kind: String,
    state: String,
    state_reason: String,
    policy: String,
    current_wave: i32,
    admit_below: i64,
    revision: i64,
    rate_started_at: Option<i64>,
    rate_base: i64,
    previous_release_id: Option<String>,
    rollback_of: Option<String>,
    rolled_back_by: Option<String>,
    created_at: i64,
    updated_at: i64,
    finished_at: Option<i64>,
}

const DEPLOYMENT_COLUMNS: &str = "id, product_id, cohort_id, release_id, kind, state, \
    state_reason, policy, current_wave, admit_below, revision, rate_started_at, rate_base, \
    previous_release_id, rollback_of, rolled_back_by, created_at, updated_at, finished_at";

impl TryFrom<DeploymentRow> for Deployment {
    type Error = StoreError;

    fn try_from(r: DeploymentRow) -> Result<Self, StoreError> {
        let corrupt = |what: &str| StoreError::Corrupt(format!("deployment {}: {what}", r.id));
        Ok(Deployment {
            cohort_id: CohortId::parse(&r.cohort_id).map_err(|_| corrupt("cohort id"))?,
            kind: match r.kind.as_str() {
                "rollout" => DeploymentKind::Rollout,
                "rollback" => DeploymentKind::Rollback,
                _ => return Err(corrupt("kind")),
            },
            state: DeploymentState::parse(&r.state).ok_or_else(|| corrupt("state"))?,
            policy: serde_json::from_str(&r.policy).map_err(|_| corrupt("policy"))?,
            current_wave: r.current_wave.max(0) as u32,
            admit_below: r.admit_below.max(0) as u64,
            revision: r.revision.max(0) as u64,
            rate_base: r.rate_base.max(0) as u64,
            id: r.id,
            product_id: r.product_id,
            release_id: r.release_id,
            state_reason: r.state_reason,
            rate_started_at_ms: r.rate_started_at,
            previous_release_id: r.previous_release_id,
            rollback_of: r.rollback_of,
            rolled_back_by: r.rolled_back_by,
            created_at_ms: r.created_at,
            updated_at_ms: r.updated_at,
            finished_at_ms: r.finished_at,
        })
    }
}

/// Where one device is with one deployment: `pending` until it reports, then what it
/// reported, or `deferred` (its wave reached it while it was not reachable; it converges when
/// it is), `timed_out` (set by the rollout engine), or `canceled` (its deployment was
/// canceled before the device started on it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ExecutionStatus {
    Pending,
    Deferred,
    Queued,
    Downloading,
    Verifying,
    Installing,
    Rebooting,
    Succeeded,
    Failed,
    Rejected,
    TimedOut,
    Canceled,
}

impl ExecutionStatus {
    pub const ALL: [ExecutionStatus; 12] = [
        ExecutionStatus::Pending,
        ExecutionStatus::Deferred,
        ExecutionStatus::Queued,
        ExecutionStatus::Downloading,
        ExecutionStatus::Verifying,
        ExecutionStatus::Installing,
        ExecutionStatus::Rebooting,
        ExecutionStatus::Succeeded,
        ExecutionStatus::Failed,
        ExecutionStatus::Rejected,
        ExecutionStatus::TimedOut,
        ExecutionStatus::Canceled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ExecutionStatus::Pending => "pending",
            ExecutionStatus::Deferred => "deferred",
            ExecutionStatus::TimedOut => "timed_out",
            ExecutionStatus::Canceled => "canceled",
            ExecutionStatus::Queued => UpdateStatusKind::Queued.as_str(),
            ExecutionStatus::Downloading => UpdateStatusKind::Downloading.as_str(),
            ExecutionStatus::Verifying => UpdateStatusKind::Verifying.as_str(),
            ExecutionStatus::Installing => UpdateStatusKind::Installing.as_str(),
            ExecutionStatus::Rebooting => UpdateStatusKind::Rebooting.as_str(),
            ExecutionStatus::Succeeded => UpdateStatusKind::Succeeded.as_str(),
            ExecutionStatus::Failed => UpdateStatusKind::Failed.as_str(),
            ExecutionStatus::Rejected => UpdateStatusKind::Rejected.as_str(),
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|st| st.as_str() == s)
    }
}

/// The SQL list of statuses that are final.
const FINISHED: &str = "('succeeded', 'failed', 'rejected', 'timed_out', 'canceled')";

/// Why an execution is deferred: what kept its device from taking part.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DeferReason {
    /// Registered, but it never connected.
    NeverConnected,
    /// It connected before, and is offline now.
    Offline,
    /// Online, but it never reported a firmware version: no update agent runs on it (a plain
    /// MQTT client, a simulator).
    NoUpdateAgent,
    /// Quarantined: it may not hear its cohort.
    Quarantined,
}

impl DeferReason {
    pub const ALL: [DeferReason; 4] = [
        DeferReason::NeverConnected,
        DeferReason::Offline,
        DeferReason::NoUpdateAgent,
        DeferReason::Quarantined,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            DeferReason::NeverConnected => "never_connected",
            DeferReason::Offline => "offline",
            DeferReason::NoUpdateAgent => "no_update_agent",
            DeferReason::Quarantined => "quarantined",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|r| r.as_str() == s)
    }
}

/// The SQL condition "device `d` is reachable": online, not quarantined, and running an update
/// agent, which the agent shows by reporting its firmware version (`devices/{id}/state`). A
/// plain MQTT client that only publishes telemetry never does. Presence and reported state
/// are in the database already, so the engine reads them here and the broker does nothing
/// more per message.
const REACHABLE: &str =
    "(d.online = TRUE AND d.state <> 'quarantined' AND d.firmware_version IS NOT NULL)";

/// The [`DeferReason`] of device `d` when it is not [`REACHABLE`] (the arms in that order).
const DEFER_REASON: &str = "(CASE WHEN d.state = 'quarantined' THEN 'quarantined' \
     WHEN d.online = TRUE THEN 'no_update_agent' \
     WHEN d.last_seen IS NULL THEN 'never_connected' ELSE 'offline' END)";

/// Brings the executions of deployment `$id` that have not reported in line with their
/// devices' reachability (inside `$tx`): an admitted `pending` or `deferred` one whose device
/// is not reachable is `deferred` with its current reason and no `notified_at`; an admitted
/// one whose device is reachable is `pending` and notified (its timeout runs from now).
macro_rules! refresh_reachability {
    ($tx:expr, $id:expr, $now:expr) => {{
        let deployment_id: &str = $id;
        sqlx::query(&format!(
            "UPDATE deployment_executions SET status = 'deferred', notified_at = NULL, \
             deferred_reason = (SELECT {DEFER_REASON} FROM devices d \
                 WHERE d.id = deployment_executions.device_id), updated_at = $2 \
             WHERE deployment_id = $1 AND admitted_at IS NOT NULL \
             AND status IN ('pending', 'deferred') \
             AND NOT EXISTS (SELECT 1 FROM devices d \
                 WHERE d.id = deployment_executions.device_id AND {REACHABLE}) \
             AND (status = 'pending' OR deferred_reason IS NULL OR deferred_reason <> \
                 (SELECT {DEFER_REASON} FROM devices d \
                 WHERE d.id = deployment_executions.device_id))"
        ))
        .bind(deployment_id)
        .bind($now)
        .execute(&mut *$tx)
        .await?;
        sqlx::query(&format!(
            "UPDATE deployment_executions SET status = 'pending', deferred_reason = NULL, \
             notified_at = $2, updated_at = $2 \
             WHERE deployment_id = $1 AND admitted_at IS NOT NULL \
             AND (status = 'deferred' OR (status = 'pending' AND notified_at IS NULL)) \
             AND EXISTS (SELECT 1 FROM devices d \
                 WHERE d.id = deployment_executions.device_id AND {REACHABLE})"
        ))
        .bind(deployment_id)
        .bind($now)
        .execute(&mut *$tx)
        .await?;
    }};
}

/// One device's execution of one deployment.
#[derive(Debug, Clone, PartialEq)]
pub struct Execution {
    pub deployment_id: String,
    pub device_id: DeviceId,
    pub rank: u32,
    pub status: ExecutionStatus,
    pub error: Option<String>,
    /// Why it is deferred; only with [`ExecutionStatus::Deferred`].
    pub deferred_reason: Option<DeferReason>,
    pub from_version: Option<String>,
    pub firmware_version: Option<String>,
    pub admitted_at_ms: Option<i64>,
    pub notified_at_ms: Option<i64>,
    pub last_report_at_ms: Option<i64>,
    pub finished_at_ms: Option<i64>,
    pub updated_at_ms: i64,
}

#[derive(sqlx::FromRow)]
struct ExecutionRow {
    deployment_id: String,
    device_id: String,
    rank: i64,
    status: String,
    error: Option<String>,
    deferred_reason: Option<String>,
    from_version: Option<String>,
    firmware_version: Option<String>,
    admitted_at: Option<i64>,
    notified_at: Option<i64>,
    last_report_at: Option<i64>,
    finished_at: Option<i64>,
    updated_at: i64,
}

const EXECUTION_COLUMNS: &str = "deployment_id, device_id, rank, status, error, \
    deferred_reason, from_version, firmware_version, admitted_at, notified_at, last_report_at, \
    finished_at, updated_at";

impl TryFrom<ExecutionRow> for Execution {
    type Error = StoreError;

    fn try_from(r: ExecutionRow) -> Result<Self, StoreError> {
        Ok(Execution {
            device_id: DeviceId::parse(&r.device_id)
                .map_err(|e| StoreError::Corrupt(format!("device id {:?}: {e}", r.device_id)))?,
            status: ExecutionStatus::parse(&r.status)
                .ok_or_else(|| StoreError::Corrupt(format!("execution status {:?}", r.status)))?,
            rank: u32::try_from(r.rank).unwrap_or_default(),
            deferred_reason: r
                .deferred_reason
                .map(|s| {
                    DeferReason::parse(&s)
                        .ok_or_else(|| StoreError::Corrupt(format!("deferred reason {s:?}")))
                })
                .transpose()?,
            deployment_id: r.deployment_id,
            error: r.error,
            from_version: r.from_version,
            firmware_version: r.firmware_version,
            admitted_at_ms: r.admitted_at,
            notified_at_ms: r.notified_at,
            last_report_at_ms: r.last_report_at,
            finished_at_ms: r.finished_at,
            updated_at_ms: r.updated_at,
        })
    }
}

/// A deployment to create.
#[derive(Debug, Clone)]
pub struct NewDeployment {
    pub release: Release,
    pub cohort_id: CohortId,
    pub kind: DeploymentKind,
    pub policy: RolloutPolicy,
    pub reason: String,
    /// For a rollback: the deployment it replaces (which becomes `rolled_back`).
    pub rollback_of: Option<String>,
}

/// Execution counts of one deployment: the policy's [`Counts`], every status, and why the
/// deferred ones are.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ExecutionSummary {
    pub counts: Counts,
    pub by_status: BTreeMap<&'static str, u64>,
    pub deferred_by_reason: BTreeMap<&'static str, u64>,
}

/// A device's progress report, for the intake's batch.
#[derive(Debug, Clone)]
pub struct UpdateReport {
    pub device_id: DeviceId,
    pub status: UpdateStatus,
    /// When the broker received it; orders reports of one device.
    pub at_ms: i64,
}

/// What [`Store::set_deployment_state`] may do.
#[derive(Debug, Clone, Copy)]
pub struct StateChange<'a> {
    pub from: &'a [DeploymentState],
    pub to: DeploymentState,
}

fn to_i64(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// Inserts `pending` executions for `$devices` (`(id, firmware_version)` pairs), ranked,
/// and admitted at once where the rank is below `$admit_below`. A macro, so it expands inside
/// each backend's arm of `with_pool!`.
macro_rules! insert_executions {
    ($tx:expr, $deployment_id:expr, $devices:expr, $admit_below:expr, $now:expr) => {{
        let deployment_id: &str = $deployment_id;
        let admit_below: u64 = $admit_below;
        let ranked: Vec<(&str, Option<&str>, i64)> = $devices
            .iter()
            .filter_map(|(id, fw): &(String, Option<String>)| {
                let device = DeviceId::parse(id).ok()?;
                Some((
                    id.as_str(),
                    fw.as_deref(),
                    i64::from(rollout_rank(deployment_id, &device)),
                ))
            })
            .collect();
        // 8 binds a row: 1,000 rows stay well below both backends' bind limits.
        for chunk in ranked.chunks(1000) {
            let mut q = sqlx::QueryBuilder::new(
                "INSERT INTO deployment_executions (deployment_id, device_id, rank, status, \
                 from_version, admitted_at, created_at, updated_at) ",
            );
            q.push_values(chunk, |mut b, (id, fw, rank)| {
                let admitted = (*rank as u64) < admit_below;
                b.push_bind(deployment_id)
                    .push_bind(*id)
                    .push_bind(*rank)
                    .push_bind("pending")
                    .push_bind(*fw)
                    .push_bind(admitted.then_some($now))
                    .push_bind($now)
                    .push_bind($now);
            });
            q.push(" ON CONFLICT (deployment_id, device_id) DO NOTHING");
            q.build().execute(&mut *$tx).await?;
        }
    }};
}

/// Sets the state of a device for an update (see [`UPDATE_STATE`]).
macro_rules! set_update_state {
    ($tx:expr, $device_id:expr, $state:expr, $reason:expr, $now:expr) => {
        sqlx::query(UPDATE_STATE)
            .bind($device_id)
            .bind($state.as_str())
            .bind($reason)
            .bind($now)
            .execute(&mut *$tx)
            .await?
    };
}

/// A device's state after an update report: `updating`, `failed`, or back to what presence
/// says. Quarantine is never overridden.
pub(super) const UPDATE_STATE: &str = "UPDATE devices SET \
     state = CASE WHEN $2 = 'online' THEN (CASE WHEN online THEN 'online' ELSE 'offline' END) \
         ELSE $2 END, \
     state_reason = $3, state_changed_at = $4, updated_at = $4 \
     WHERE id = $1 AND state <> 'quarantined'";

/// The state a report puts its device in, and why.
pub(super) fn report_state(r: &UpdateReport) -> (DeviceState, String) {
    let s = &r.status;
    let what = match &s.error {
        Some(e) => format!("update {}: {}: {e}", s.deployment_id, s.status.as_str()),
        None => format!("update {}: {}", s.deployment_id, s.status.as_str()),
    };
    let state = match s.status {
        UpdateStatusKind::Succeeded => DeviceState::Online,
        UpdateStatusKind::Failed | UpdateStatusKind::Rejected => DeviceState::Failed,
        _ => DeviceState::Updating,
    };
    (state, what)
}

/// The intake's write of one report (`$r`: [`UpdateReport`]) inside its transaction: applied
/// unless the execution is final or has a newer report. Evaluates to whether it applied.
macro_rules! apply_report {
    ($tx:expr, $r:expr, $now:expr) => {{
        let r: &$crate::store::UpdateReport = $r;
        let s = &r.status;
        let finished = s.status.is_terminal().then_some(r.at_ms);
        // A device that joined the cohort after the deployment began may report before the
        // engine enrolled it: enroll it here, if the deployment is its cohort's.
        let rank = i64::from(fleet_wire::update::rollout_rank(
            &s.deployment_id,
            &r.device_id,
        ));
        sqlx::query($crate::store::updates::ENROLL_REPORTER)
            .bind(s.deployment_id.as_str())
            .bind(r.device_id.as_str())
            .bind(rank)
            .bind(r.at_ms)
            .bind($now)
            .execute(&mut *$tx)
            .await?;
        let done = sqlx::query($crate::store::updates::APPLY_REPORT)
            .bind(s.deployment_id.as_str())
            .bind(r.device_id.as_str())
            .bind(s.status.as_str())
            .bind(s.error.as_deref())
            .bind(s.firmware_version.as_deref())
            .bind(r.at_ms)
            .bind(finished)
            .bind($now)
            .execute(&mut *$tx)
            .await?;
        let applied = done.rows_affected() > 0;
        if applied {
            let (state, reason) = $crate::store::updates::report_state(r);
            sqlx::query($crate::store::updates::UPDATE_STATE)
                .bind(r.device_id.as_str())
                .bind(state.as_str())
                .bind(reason)
                .bind($now)
                .execute(&mut *$tx)
                .await?;
        }
        applied
    }};
}
pub(super) use apply_report;

/// See `apply_report!`: an execution for a reporting device of the deployment's cohort.
pub(super) const ENROLL_REPORTER: &str = "INSERT INTO deployment_executions \
     (deployment_id, device_id, rank, status, from_version, admitted_at, created_at, updated_at) \
     SELECT dp.id, dv.id, $3, 'pending', dv.firmware_version, $4, $5, $5 \
     FROM deployments dp JOIN devices dv ON dv.cohort_id = dp.cohort_id \
     WHERE dp.id = $1 AND dv.id = $2 \
     ON CONFLICT (deployment_id, device_id) DO NOTHING";

/// See `apply_report!`: a final execution never changes; `timed_out` may still be replaced
/// by the device's own (late) report, and `deferred` by any report (the device is reachable
/// after all).
pub(super) const APPLY_REPORT: &str = "UPDATE deployment_executions SET status = $3, \
     error = $4, deferred_reason = NULL, firmware_version = COALESCE($5, firmware_version), \
     last_report_at = $6, finished_at = $7, admitted_at = COALESCE(admitted_at, $6), \
     notified_at = COALESCE(notified_at, $6), updated_at = $8 \
     WHERE deployment_id = $1 AND device_id = $2 \
     AND status NOT IN ('succeeded', 'failed', 'rejected') \
     AND (last_report_at IS NULL OR last_report_at <= $6)";

impl Store {
    /// Registers a public key under its id. [`StoreError::Conflict`] if it is known.
    pub async fn create_signing_key(
        &self,
        org_id: &str,
        id: &str,
        name: &str,
        public_key_b64: &str,
    ) -> Result<SigningKey, StoreError> {
        let key = SigningKey {
            id: id.to_owned(),
            org_id: org_id.to_owned(),
            name: name.to_owned(),
            public_key: public_key_b64.to_owned(),
            created_at_ms: now_ms(),
            revoked_at_ms: None,
        };
        with_pool!(self, |pool| {
            sqlx::query(
                "INSERT INTO signing_keys (id, name, public_key, created_at, org_id) \
                 VALUES ($1, $2, $3, $4, $5)",
            )
            .bind(&key.id)
            .bind(&key.name)
            .bind(&key.public_key)
            .bind(key.created_at_ms)
            .bind(&key.org_id)
            .execute(pool)
            .await
            .map(|_| ())
        })
        .map_err(|e| constraint(e, "this signing key", "signing key"))?;
        Ok(key)
    }

    /// The signing keys of an organization, by id.
    pub async fn signing_keys(&self, org_id: &str) -> Result<Vec<SigningKey>, StoreError> {
        self.signing_keys_page(org_id, &super::PageRequest::ALL)
            .await
    }

    /// One page of an organization's signing keys, by id.
    pub async fn signing_keys_page(
        &self,
        org_id: &str,
        page: &super::PageRequest,
    ) -> Result<Vec<SigningKey>, StoreError> {
        Ok(with_pool!(self, |pool| {
            sqlx::query_as(
                "SELECT id, org_id, name, public_key, created_at, revoked_at FROM signing_keys \
                 WHERE org_id = $1 AND ($2 IS NULL OR id > $2) ORDER BY id LIMIT $3",
            )
            .bind(org_id)
            .bind(page.after.as_deref())
            .bind(page.fetch())
            .fetch_all(pool)
            .await
        })?)
    }

    pub async fn signing_key(&self, id: &str) -> Result<Option<SigningKey>, StoreError> {
        Ok(with_pool!(self, |pool| {
            sqlx::query_as(
                "SELECT id, org_id, name, public_key, created_at, revoked_at FROM signing_keys \
                 WHERE id = $1",
            )
            .bind(id)
            .fetch_optional(pool)
            .await
        })?)
    }

    /// Revokes a key of an organization: no new release may name it. Returns false when the
    /// organization has no such key or it is revoked already.
    pub async fn revoke_signing_key(&self, org_id: &str, id: &str) -> Result<bool, StoreError> {
        let done = with_pool!(self, |pool| {
            sqlx::query(
                "UPDATE signing_keys SET revoked_at = $2 \
                 WHERE id = $1 AND org_id = $3 AND revoked_at IS NULL",
            )
            .bind(id)
            .bind(now_ms())
            .bind(org_id)
            .execute(pool)
            .await
            .map(|done| done.rows_affected())
        })?;
        Ok(done > 0)
    }

    /// Stores a release whose signature the caller verified. [`StoreError::Conflict`] when the
    /// product has this version already.
    pub async fn create_release(
        &self,
        manifest: &ReleaseManifest,
        signature: &str,
        key_id: &str,
        notes: Option<&str>,
    ) -> Result<Release, StoreError> {
        let release = Release {
            id: new_id(),
            manifest: manifest.clone(),
            signature: signature.to_owned(),
            key_id: key_id.to_owned(),
            notes: notes.map(str::to_owned),
            created_at_ms: now_ms(),
        };
        with_pool!(self, |pool| {
            sqlx::query(&format!(
                "INSERT INTO releases ({RELEASE_COLUMNS}) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)"
            ))
            .bind(&release.id)
            .bind(&manifest.product_id)
            .bind(&manifest.version)
            .bind(&manifest.url)
            .bind(to_i64(manifest.size))
            .bind(&manifest.sha256)
            .bind(signature)
            .bind(key_id)
            .bind(notes)
            .bind(release.created_at_ms)
            .execute(pool)
            .await
            .map(|_| ())
        })
        .map_err(|e| {
            constraint(
                e,
                "a release of this product with this version",
                "the product or signing key",
            )
        })?;
        Ok(release)
    }

    pub async fn release(&self, id: &str) -> Result<Option<Release>, StoreError> {
        let row: Option<ReleaseRow> = with_pool!(self, |pool| {
            sqlx::query_as(&format!(
                "SELECT {RELEASE_COLUMNS} FROM releases WHERE id = $1"
            ))
            .bind(id)
            .fetch_optional(pool)
            .await
        })?;
        Ok(row.map(Release::from))
    }

    /// One page of releases, newest first, of one organization's products, optionally of one
    /// product.
    pub async fn releases(
        &self,
        org_id: &str,
        product_id: Option<&str>,
        page: &super::PageRequest,
    ) -> Result<Vec<Release>, StoreError> {
        let rows: Vec<ReleaseRow> = with_pool!(self, |pool| {
            let mut q = sqlx::QueryBuilder::new(format!(
                "SELECT {RELEASE_COLUMNS} FROM releases WHERE product_id IN \
                 (SELECT id FROM products WHERE org_id = "
            ));
            q.push_bind(org_id).push(")");
            if let Some(p) = product_id {
                q.push(" AND product_id = ").push_bind(p);
            }
            if let Some(after) = &page.after {
                q.push(" AND id < ").push_bind(after.as_str());
            }
            q.push(" ORDER BY id DESC LIMIT ").push_bind(page.fetch());
            q.build_query_as().fetch_all(pool).await
        })?;
        Ok(rows.into_iter().map(Release::from).collect())
    }

    /// Creates a deployment and an execution for every device of the cohort, in one
    /// transaction. Refused with [`StoreError::Conflict`] while another deployment of the
    /// cohort is active or paused, except the one a rollback replaces, which becomes
    /// `rolled_back` in the same transaction.
    pub async fn create_deployment(&self, new: &NewDeployment) -> Result<Deployment, StoreError> {
        let now = now_ms();
        let id = new_id();
        let policy_json = serde_json::to_string(&new.policy)
            .map_err(|e| StoreError::Corrupt(format!("policy: {e}")))?;
        let row: DeploymentRow = with_pool!(self, |pool, begin| {
            let mut tx = pool.begin_with(begin).await?;
            if let Some(old) = &new.rollback_of {
                sqlx::query(
                    "UPDATE deployments SET state = $2, state_reason = $3, rolled_back_by = $4, \
                     revision = revision + 1, updated_at = $5, finished_at = $5 WHERE id = $1",
                )
                .bind(old)
                .bind(DeploymentState::RolledBack.as_str())
                .bind(&new.reason)
                .bind(&id)
                .bind(now)
                .execute(&mut *tx)
                .await?;
            }
            let busy: Option<(String,)> = sqlx::query_as(
                "SELECT id FROM deployments WHERE cohort_id = $1 \
                 AND state IN ('active', 'paused') LIMIT 1",
            )
            .bind(new.cohort_id.as_str())
            .fetch_optional(&mut *tx)
            .await?;
            if busy.is_some() {
                return Err(StoreError::Conflict(
                    "an active or paused deployment for this cohort",
                ));
            }
            let previous: Option<(String,)> = sqlx::query_as(
                "SELECT release_id FROM deployments WHERE cohort_id = $1 \
                 AND state = 'completed' ORDER BY id DESC LIMIT 1",
            )
            .bind(new.cohort_id.as_str())
            .fetch_optional(&mut *tx)
            .await?;
            let row: DeploymentRow = sqlx::query_as(&format!(
                "INSERT INTO deployments (id, product_id, cohort_id, release_id, kind, state, \
                 state_reason, policy, current_wave, admit_below, revision, rate_started_at, \
                 rate_base, previous_release_id, rollback_of, created_at, updated_at) \
                 VALUES ($1, $2, $3, $4, $5, 'active', $6, $7, 0, 0, 1, $8, 0, $9, $10, $8, $8) \
                 RETURNING {DEPLOYMENT_COLUMNS}"
            ))
            .bind(&id)
            .bind(&new.release.manifest.product_id)
            .bind(new.cohort_id.as_str())
            .bind(&new.release.id)
            .bind(new.kind.as_str())
            .bind(&new.reason)
            .bind(&policy_json)
            .bind(now)
            .bind(previous.map(|(r,)| r))
            .bind(&new.rollback_of)
            .fetch_one(&mut *tx)
            .await
            // The partial unique index `deployments_one_live` refuses a second live
            // deployment that a concurrent create slipped past the check above.
            .map_err(|e| {
                constraint(
                    e,
                    "an active or paused deployment for this cohort",
                    "the cohort or release of this product",
                )
            })?;
            let devices: Vec<(String, Option<String>)> = sqlx::query_as(
                "SELECT id, firmware_version FROM devices WHERE cohort_id = $1 ORDER BY id",
            )
            .bind(new.cohort_id.as_str())
            .fetch_all(&mut *tx)
            .await?;
            insert_executions!(tx, &id, devices, 0u64, now);
            tx.commit().await?;
            row
        });
        row.try_into()
    }

    pub async fn deployment(&self, id: &str) -> Result<Option<Deployment>, StoreError> {
        let row: Option<DeploymentRow> = with_pool!(self, |pool| {
            sqlx::query_as(&format!(
                "SELECT {DEPLOYMENT_COLUMNS} FROM deployments WHERE id = $1"
            ))
            .bind(id)
            .fetch_optional(pool)
            .await
        })?;
        row.map(Deployment::try_from).transpose()
    }

    /// One page of deployments of one organization's products, newest first, optionally of
    /// one product, one cohort or in one state.
    pub async fn deployments(
        &self,
        org_id: &str,
        product_id: Option<&str>,
        cohort_id: Option<&str>,
        state: Option<DeploymentState>,
        page: &super::PageRequest,
    ) -> Result<Vec<Deployment>, StoreError> {
        let rows: Vec<DeploymentRow> = with_pool!(self, |pool| {
            let mut q = sqlx::QueryBuilder::new(format!(
                "SELECT {DEPLOYMENT_COLUMNS} FROM deployments WHERE product_id IN \
                 (SELECT id FROM products WHERE org_id = "
            ));
            q.push_bind(org_id).push(")");
            if let Some(p) = product_id {
                q.push(" AND product_id = ").push_bind(p);
            }
            if let Some(c) = cohort_id {
                q.push(" AND cohort_id = ").push_bind(c);
            }
            if let Some(s) = state {
                q.push(" AND state = ").push_bind(s.as_str());
            }
            if let Some(after) = &page.after {
                q.push(" AND id < ").push_bind(after.as_str());
            }
            q.push(" ORDER BY id DESC LIMIT ").push_bind(page.fetch());
            q.build_query_as().fetch_all(pool).await
        })?;
        rows.into_iter().map(Deployment::try_from).collect()
    }

    /// What the rollout engine looks after: every active or paused deployment, and the newest
    /// deployment of each cohort (whose message the cohort topic carries).
    pub async fn live_deployments(&self) -> Result<Vec<Deployment>, StoreError> {
        let rows: Vec<DeploymentRow> = with_pool!(self, |pool| {
            sqlx::query_as(&format!(
                "SELECT {DEPLOYMENT_COLUMNS} FROM deployments \
                 WHERE state IN ('active', 'paused') \
                 OR id IN (SELECT MAX(id) FROM deployments GROUP BY cohort_id) ORDER BY id"
            ))
            .fetch_all(pool)
            .await
        })?;
        rows.into_iter().map(Deployment::try_from).collect()
    }

    /// Moves a deployment from one of `change.from` to `change.to`, with a reason, and bumps
    /// its revision so devices see it. Resuming restarts the rate clock and the timeouts of
    /// admitted devices (they were told to wait). Returns the deployment as it is now, or
    /// `None` when it was in none of the `from` states.
    pub async fn set_deployment_state(
        &self,
        id: &str,
        change: StateChange<'_>,
        reason: &str,
    ) -> Result<Option<Deployment>, StoreError> {
        let now = now_ms();
        let finished = !matches!(change.to, DeploymentState::Active | DeploymentState::Paused);
        let row: Option<DeploymentRow> = with_pool!(self, |pool, begin| {
            let mut tx = pool.begin_with(begin).await?;
            let mut q = sqlx::QueryBuilder::new("UPDATE deployments SET state = ");
            q.push_bind(change.to.as_str())
                .push(", state_reason = ")
                .push_bind(reason)
                .push(", revision = revision + 1, updated_at = ")
                .push_bind(now);
            if finished {
                q.push(", finished_at = ").push_bind(now);
            }
            if change.to == DeploymentState::Active {
                q.push(", rate_started_at = ").push_bind(now).push(
                    ", rate_base = (SELECT COUNT(*) FROM deployment_executions e \
                     WHERE e.deployment_id = deployments.id AND e.admitted_at IS NOT NULL \
                     AND e.status <> 'deferred')",
                );
            }
            q.push(" WHERE id = ").push_bind(id).push(" AND state IN (");
            let mut list = q.separated(", ");
            for s in change.from {
                list.push_bind(s.as_str());
            }
            q.push(format!(") RETURNING {DEPLOYMENT_COLUMNS}"));
            let row: Option<DeploymentRow> = q.build_query_as().fetch_optional(&mut *tx).await?;
            if row.is_some() && change.to == DeploymentState::Canceled {
                // What had not started never will: it ends with its deployment. A device
                // already downloading or installing still reports how that ended.
                sqlx::query(
                    "UPDATE deployment_executions SET status = $2, finished_at = $3, \
                     deferred_reason = NULL, updated_at = $3 \
                     WHERE deployment_id = $1 AND status IN ($4, $5, $6)",
                )
                .bind(id)
                .bind(ExecutionStatus::Canceled.as_str())
                .bind(now)
                .bind(ExecutionStatus::Pending.as_str())
                .bind(ExecutionStatus::Queued.as_str())
                .bind(ExecutionStatus::Deferred.as_str())
                .execute(&mut *tx)
                .await?;
            }
            if row.is_some() && change.to == DeploymentState::Active {
                sqlx::query(&format!(
                    "UPDATE deployment_executions SET notified_at = $2, updated_at = $2 \
                     WHERE deployment_id = $1 AND notified_at IS NOT NULL \
                     AND status NOT IN {FINISHED}"
                ))
                .bind(id)
                .bind(now)
                .execute(&mut *tx)
                .await?;
            }
            tx.commit().await?;
            row
        });
        row.map(Deployment::try_from).transpose()
    }

    /// Gives executions to devices that joined the cohort since the deployment began; those
    /// ranked below `admit_below` are admitted at once. Returns how many were added.
    pub async fn enroll_new_devices(&self, d: &Deployment) -> Result<u64, StoreError> {
        let now = now_ms();
        with_pool!(self, |pool, begin| {
            let mut tx = pool.begin_with(begin).await?;
            let devices: Vec<(String, Option<String>)> = sqlx::query_as(
                "SELECT id, firmware_version FROM devices WHERE cohort_id = $1 \
                 AND NOT EXISTS (SELECT 1 FROM deployment_executions e \
                 WHERE e.deployment_id = $2 AND e.device_id = devices.id) ORDER BY id",
            )
            .bind(d.cohort_id.as_str())
            .bind(&d.id)
            .fetch_all(&mut *tx)
            .await?;
            if devices.is_empty() {
                return Ok(0);
            }
            insert_executions!(tx, &d.id, devices, d.admit_below, now);
            tx.commit().await?;
            Ok(devices.len() as u64)
        })
    }

    /// Follows the reachability of the admitted devices that have not reported: defers those
    /// that are not reachable (or updates why), and counts again, with their timeout clock
    /// starting now, those that are.
    pub async fn refresh_reachability(&self, deployment_id: &str) -> Result<(), StoreError> {
        let now = now_ms();
        with_pool!(self, |pool, begin| {
            let mut tx = pool.begin_with(begin).await?;
            refresh_reachability!(tx, deployment_id, now);
            tx.commit().await?;
        });
        Ok(())
    }

    /// Marks `timed_out` every admitted, notified, unfinished execution that has been silent
    /// for `timeout_ms`, and marks those devices `failed`. Returns their ids.
    pub async fn time_out_executions(
        &self,
        deployment_id: &str,
        timeout_ms: i64,
    ) -> Result<Vec<DeviceId>, StoreError> {
        let now = now_ms();
        let error = format!("no report for {} s", timeout_ms / 1000);
        let ids: Vec<(String,)> = with_pool!(self, |pool, begin| {
            let mut tx = pool.begin_with(begin).await?;
            let ids: Vec<(String,)> = sqlx::query_as(&format!(
                "UPDATE deployment_executions SET status = 'timed_out', error = $3, \
                 finished_at = $2, updated_at = $2 \
                 WHERE deployment_id = $1 AND notified_at IS NOT NULL \
                 AND status NOT IN {FINISHED} \
                 AND COALESCE(last_report_at, notified_at) < $4 RETURNING device_id"
            ))
            .bind(deployment_id)
            .bind(now)
            .bind(&error)
            .bind(now - timeout_ms)
            .fetch_all(&mut *tx)
            .await?;
            for (id,) in &ids {
                set_update_state!(
                    tx,
                    id.as_str(),
                    DeviceState::Failed,
                    format!("update {deployment_id}: timed out ({error})"),
                    now
                );
            }
            tx.commit().await?;
            ids
        });
        ids.into_iter()
            .map(|(id,)| {
                DeviceId::parse(&id).map_err(|e| StoreError::Corrupt(format!("device id: {e}")))
            })
            .collect()
    }

    /// Marks `failed` every `succeeded` execution whose device reported, in a state or status
    /// since, another firmware version than `version`: the device rolled back on its own, or
    /// claimed success without running the release. Returns how many.
    pub async fn fail_mismatched_versions(
        &self,
        deployment_id: &str,
        version: &str,
    ) -> Result<u64, StoreError> {
        let now = now_ms();
        let done = with_pool!(self, |pool, begin| {
            let mut tx = pool.begin_with(begin).await?;
            let rows: Vec<(String, Option<String>, Option<String>)> = sqlx::query_as(
                "SELECT e.device_id, e.firmware_version, d.firmware_version \
                 FROM deployment_executions e JOIN devices d ON d.id = e.device_id \
                 WHERE e.deployment_id = $1 AND e.status = 'succeeded' AND ( \
                   (e.firmware_version IS NOT NULL AND e.firmware_version <> $2) \
                   OR (d.reported_at > e.finished_at \
                       AND (d.firmware_version IS NULL OR d.firmware_version <> $2)))",
            )
            .bind(deployment_id)
            .bind(version)
            .fetch_all(&mut *tx)
            .await?;
            for (device, claimed, running) in &rows {
                let runs = match claimed.as_deref().filter(|c| *c != version) {
                    Some(c) => c.to_owned(),
                    None => running.clone().unwrap_or_else(|| "no version".to_owned()),
                };
                let error = format!("device runs {runs}, not {version}");
                sqlx::query(
                    "UPDATE deployment_executions SET status = 'failed', error = $3, \
                     firmware_version = $4, updated_at = $5 \
                     WHERE deployment_id = $1 AND device_id = $2",
                )
                .bind(deployment_id)
                .bind(device)
                .bind(&error)
                .bind(&runs)
                .bind(now)
                .execute(&mut *tx)
                .await?;
                set_update_state!(
                    tx,
                    device.as_str(),
                    DeviceState::Failed,
                    format!("update {deployment_id}: {error}"),
                    now
                );
            }
            tx.commit().await?;
            rows.len() as u64
        });
        Ok(done)
    }

    /// Counts the executions of a deployment by status.
    pub async fn execution_summary(
        &self,
        deployment_id: &str,
    ) -> Result<ExecutionSummary, StoreError> {
        // `ready` looks at the device only for executions not admitted yet (CASE evaluates
        // its arms in order).
        let rows: Vec<(String, Option<String>, i64, i64, i64, i64)> = with_pool!(self, |pool| {
            sqlx::query_as(&format!(
                "SELECT e.status, e.deferred_reason, COUNT(*), \
                 SUM(CASE WHEN e.admitted_at IS NOT NULL THEN 1 ELSE 0 END), \
                 SUM(CASE WHEN e.notified_at IS NOT NULL THEN 1 ELSE 0 END), \
                 SUM(CASE WHEN e.admitted_at IS NOT NULL THEN 0 \
                     WHEN EXISTS (SELECT 1 FROM devices d \
                     WHERE d.id = e.device_id AND {REACHABLE}) THEN 1 ELSE 0 END) \
                 FROM deployment_executions e WHERE e.deployment_id = $1 \
                 GROUP BY e.status, e.deferred_reason"
            ))
            .bind(deployment_id)
            .fetch_all(pool)
            .await
        })?;
        let mut s = ExecutionSummary::default();
        for st in ExecutionStatus::ALL {
            s.by_status.insert(st.as_str(), 0);
        }
        for (status, reason, n, admitted, notified, ready) in rows {
            let st = ExecutionStatus::parse(&status)
                .ok_or_else(|| StoreError::Corrupt(format!("execution status {status:?}")))?;
            let (n, admitted, notified) = (n as u64, admitted as u64, notified as u64);
            *s.by_status.entry(st.as_str()).or_default() += n;
            s.counts.total += n;
            s.counts.notified += notified;
            s.counts.ready += ready as u64;
            if st == ExecutionStatus::Deferred {
                s.counts.deferred += n;
                let reason = reason
                    .as_deref()
                    .and_then(DeferReason::parse)
                    .ok_or_else(|| StoreError::Corrupt(format!("deferred reason {reason:?}")))?;
                *s.deferred_by_reason.entry(reason.as_str()).or_default() += n;
            } else {
                s.counts.admitted += admitted;
            }
            match st {
                ExecutionStatus::Succeeded => s.counts.succeeded += n,
                ExecutionStatus::Failed => s.counts.failed += n,
                ExecutionStatus::Rejected => s.counts.rejected += n,
                ExecutionStatus::TimedOut => s.counts.timed_out += n,
                _ => {}
            }
        }
        Ok(s)
    }

    /// Admits the `n` lowest-ranked reachable devices not admitted yet (or, with `all`, every
    /// device from now on) and raises `admit_below` to match, if the deployment is still active
    /// at `revision`. Devices ranked below the new cutoff that are not reachable are admitted
    /// too (a device computes its own admission from the cutoff, so it converges when it
    /// connects), but `deferred`. Returns the deployment as it is now, or `None` if it changed
    /// meanwhile.
    pub async fn admit(
        &self,
        d: &Deployment,
        n: u64,
        all: bool,
    ) -> Result<Option<Deployment>, StoreError> {
        let now = now_ms();
        let row: Option<DeploymentRow> = with_pool!(self, |pool, begin| {
            let mut tx = pool.begin_with(begin).await?;
            let mut cutoff = d.admit_below;
            if n > 0 {
                let ranks: Vec<(i64,)> = sqlx::query_as(&format!(
                    "SELECT e.rank FROM deployment_executions e JOIN devices d \
                     ON d.id = e.device_id WHERE e.deployment_id = $1 \
                     AND e.admitted_at IS NULL AND {REACHABLE} ORDER BY e.rank LIMIT $2"
                ))
                .bind(&d.id)
                .bind(to_i64(n))
                .fetch_all(&mut *tx)
                .await?;
                if let Some((last,)) = ranks.last() {
                    cutoff = cutoff.max(*last as u64 + 1);
                }
            }
            if all {
                cutoff = ADMIT_ALL;
            }
            if cutoff == d.admit_below {
                return Ok(Some(d.clone()));
            }
            let row: Option<DeploymentRow> = sqlx::query_as(&format!(
                "UPDATE deployments SET admit_below = $3, revision = revision + 1, \
                 updated_at = $4, rate_started_at = COALESCE(rate_started_at, $4) \
                 WHERE id = $1 AND revision = $2 AND state = 'active' \
                 RETURNING {DEPLOYMENT_COLUMNS}"
            ))
            .bind(&d.id)
            .bind(to_i64(d.revision))
            .bind(to_i64(cutoff))
            .bind(now)
            .fetch_optional(&mut *tx)
            .await?;
            if row.is_none() {
                return Ok(None);
            }
            sqlx::query(
                "UPDATE deployment_executions SET admitted_at = $3, updated_at = $3 \
                 WHERE deployment_id = $1 AND admitted_at IS NULL AND rank < $2",
            )
            .bind(&d.id)
            .bind(to_i64(cutoff))
            .bind(now)
            .execute(&mut *tx)
            .await?;
            refresh_reachability!(tx, &d.id, now);
            tx.commit().await?;
            row
        });
        row.map(Deployment::try_from).transpose()
    }

    /// Moves an active deployment at `revision` to wave `wave`, restarting the rate clock;
    /// with `complete`, marks it completed instead. `None` if it changed meanwhile.
    pub async fn advance_deployment(
        &self,
        d: &Deployment,
        wave: u32,
        admitted: u64,
        complete: Option<&str>,
    ) -> Result<Option<Deployment>, StoreError> {
        let now = now_ms();
        let (state, reason, finished) = match complete {
            Some(reason) => (DeploymentState::Completed, reason.to_owned(), Some(now)),
            None => (
                DeploymentState::Active,
                format!("wave {} of {}", wave + 1, d.policy.waves.len()),
                None,
            ),
        };
        let row: Option<DeploymentRow> = with_pool!(self, |pool| {
            sqlx::query_as(&format!(
                "UPDATE deployments SET current_wave = $3, state = $4, state_reason = $5, \
                 rate_started_at = $6, rate_base = $7, finished_at = $8, \
                 revision = revision + 1, updated_at = $6 \
                 WHERE id = $1 AND revision = $2 AND state = 'active' \
                 RETURNING {DEPLOYMENT_COLUMNS}"
            ))
            .bind(&d.id)
            .bind(to_i64(d.revision))
            .bind(wave as i32)
            .bind(state.as_str())
            .bind(&reason)
            .bind(now)
            .bind(to_i64(admitted))
            .bind(finished)
            .fetch_optional(pool)
            .await
        })?;
        row.map(Deployment::try_from).transpose()
    }

    /// Executions of a deployment ordered by device id, after `after`, optionally of one
    /// status.
    pub async fn executions(
        &self,
        deployment_id: &str,
        status: Option<ExecutionStatus>,
        after: Option<&DeviceId>,
        limit: u32,
    ) -> Result<Vec<Execution>, StoreError> {
        let rows: Vec<ExecutionRow> = with_pool!(self, |pool| {
            let mut q = sqlx::QueryBuilder::new(format!(
                "SELECT {EXECUTION_COLUMNS} FROM deployment_executions WHERE deployment_id = "
            ));
            q.push_bind(deployment_id);
            if let Some(s) = status {
                q.push(" AND status = ").push_bind(s.as_str());
            }
            if let Some(a) = after {
                q.push(" AND device_id > ").push_bind(a.as_str());
            }
            q.push(" ORDER BY device_id LIMIT ")
                .push_bind(i64::from(limit));
            q.build_query_as().fetch_all(pool).await
        })?;
        rows.into_iter().map(Execution::try_from).collect()
    }

    /// A device's executions, newest deployment first.
    pub async fn device_executions(&self, device: &DeviceId) -> Result<Vec<Execution>, StoreError> {
        let rows: Vec<ExecutionRow> = with_pool!(self, |pool| {
            sqlx::query_as(&format!(
                "SELECT {EXECUTION_COLUMNS} FROM deployment_executions WHERE device_id = $1 \
                 ORDER BY deployment_id DESC LIMIT 50"
            ))
            .bind(device.as_str())
            .fetch_all(pool)
            .await
        })?;
        rows.into_iter().map(Execution::try_from).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sql_reasons_are_the_defer_reasons() {
        let mut arms: Vec<&str> = ["THEN '", "ELSE '"]
            .iter()
            .flat_map(|k| DEFER_REASON.split(k).skip(1))
            .map(|rest| rest.split('\'').next().unwrap())
            .collect();
        arms.sort_unstable();
        let mut all = DeferReason::ALL.map(DeferReason::as_str);
        all.sort_unstable();
        assert_eq!(arms, all);
        assert_eq!(
            ExecutionStatus::parse("deferred"),
            Some(ExecutionStatus::Deferred)
        );
    }
}

//! The audit log: who did what to which resource, when, with which request, and how it ended.
//! Rows are only inserted, never changed.

use super::{now_ms, Store, StoreError};

/// Who acted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ActorKind {
    /// An API key; the actor is its id.
    ApiKey,
    /// The platform itself (the broker noticing refused connections, ...).
    Platform,
}

impl ActorKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ActorKind::ApiKey => "api_key",
            ActorKind::Platform => "platform",
        }
    }
}

/// One entry to record.
#[derive(Debug, Clone)]
pub struct NewAuditEntry {
    pub org_id: String,
    pub actor_kind: ActorKind,
    pub actor: String,
    pub action: String,
    pub target_kind: Option<String>,
    pub target_id: Option<String>,
    pub request_id: Option<String>,
    /// Whether the action took effect.
    pub success: bool,
    pub status: Option<u16>,
    pub error_code: Option<String>,
    pub remote_addr: Option<String>,
    pub detail: Option<serde_json::Value>,
}

/// A recorded entry.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct AuditEntry {
    pub id: i64,
    pub org_id: String,
    #[sqlx(rename = "at")]
    pub at_ms: i64,
    pub actor_kind: String,
    pub actor: String,
    pub action: String,
    pub target_kind: Option<String>,
    pub target_id: Option<String>,
    pub request_id: Option<String>,
    pub outcome: String,
    pub status: Option<i32>,
    pub error_code: Option<String>,
    pub remote_addr: Option<String>,
    pub detail: Option<String>,
}

/// Which entries to list; `None` fields do not filter.
#[derive(Debug, Clone, Default)]
pub struct AuditFilter {
    pub org_id: String,
    /// Exact, or a prefix when it ends with `.` (`device.` is every device action).
    pub action: Option<String>,
    pub actor: Option<String>,
    pub target_id: Option<String>,
    pub request_id: Option<String>,
    /// `success` or `failure`.
    pub outcome: Option<String>,
    pub since_ms: Option<i64>,
    pub until_ms: Option<i64>,
}

/// An event the platform records about a device on its own, in the transaction that made it:
/// `$1` organization, `$2` time, `$3` action, `$4` device id, `$5` detail (JSON).
pub(super) const DEVICE_EVENT: &str = "INSERT INTO audit_log \
     (org_id, at, actor_kind, actor, action, target_kind, target_id, outcome, detail) \
     VALUES ($1, $2, 'platform', 'broker', $3, 'device', $4, 'success', $5)";

impl Store {
    pub async fn record_audit(&self, e: &NewAuditEntry) -> Result<(), StoreError> {
        let detail = e.detail.as_ref().map(|d| d.to_string());
        with_pool!(self, |pool| {
            sqlx::query(
                "INSERT INTO audit_log (org_id, at, actor_kind, actor, action, target_kind, \
                 target_id, request_id, outcome, status, error_code, remote_addr, detail) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)",
            )
            .bind(&e.org_id)
            .bind(now_ms())
            .bind(e.actor_kind.as_str())
            .bind(&e.actor)
            .bind(&e.action)
            .bind(&e.target_kind)
            .bind(&e.target_id)
            .bind(&e.request_id)
            .bind(if e.success { "success" } else { "failure" })
            .bind(e.status.map(i32::from))
            .bind(&e.error_code)
            .bind(&e.remote_addr)
            .bind(detail)
            .execute(pool)
            .await
            .map(|_| ())
        })?;
        Ok(())
    }

    /// Deletes entries older than `max_age`; returns how many went.
    pub async fn prune_audit(&self, max_age: std::time::Duration) -> Result<u64, StoreError> {
        let cutoff =
            now_ms().saturating_sub(i64::try_from(max_age.as_millis()).unwrap_or(i64::MAX));
        let done = with_pool!(self, |pool| {
            sqlx::query("DELETE FROM audit_log WHERE at < $1")
                .bind(cutoff)
                .execute(pool)
                .await
                .map(|d| d.rows_affected())
        })?;
        Ok(done)
    }

    /// Up to `limit` entries matching `filter`, newest first, older than the entry `before`.
    pub async fn audit_entries(
        &self,
        filter: &AuditFilter,
        before: Option<i64>,
        limit: u32,
    ) -> Result<Vec<AuditEntry>, StoreError> {
        let rows = with_pool!(self, |pool| {
            let mut q = sqlx::QueryBuilder::new(
                "SELECT id, org_id, at, actor_kind, actor, action, target_kind, target_id, \
                 request_id, outcome, status, error_code, remote_addr, detail \
                 FROM audit_log WHERE org_id = ",
            );
            q.push_bind(filter.org_id.as_str());
            match filter.action.as_deref() {
                Some(prefix) if prefix.ends_with('.') => {
                    // A range, so the (org_id, action, id) index serves it; `~` sorts after
                    // every character of an action name.
                    q.push(" AND action >= ").push_bind(prefix);
                    q.push(" AND action < ").push_bind(format!("{prefix}~"));
                }
                Some(action) => {
                    q.push(" AND action = ").push_bind(action);
                }
                None => {}
            }
            if let Some(actor) = &filter.actor {
                q.push(" AND actor = ").push_bind(actor.as_str());
            }
            if let Some(target) = &filter.target_id {
                q.push(" AND target_id = ").push_bind(target.as_str());
            }
            if let Some(request_id) = &filter.request_id {
                q.push(" AND request_id = ").push_bind(request_id.as_str());
            }
            if let Some(outcome) = &filter.outcome {
                q.push(" AND outcome = ").push_bind(outcome.as_str());
            }
            if let Some(t) = filter.since_ms {
                q.push(" AND at >= ").push_bind(t);
            }
            if let Some(t) = filter.until_ms {
                q.push(" AND at < ").push_bind(t);
            }
            if let Some(before) = before {
                q.push(" AND id < ").push_bind(before);
            }
            q.push(" ORDER BY id DESC LIMIT ")
                .push_bind(i64::from(limit));
            q.build_query_as::<AuditEntry>().fetch_all(pool).await
        })?;
        Ok(rows)
    }
}

//! The audit log over HTTP: request ids, the middleware that records every mutating request,
//! and the listing.
//!
//! # Invariants
//! - Every mutating route has an entry in [`ACTIONS`] (a test holds it to [`super::routes`]),
//!   and every request to one that presents a valid API key is recorded, whatever its outcome
//!   (a viewer's refused attempt too). Requests without a valid key are not: they name no
//!   organization to record them in.
//! - The entry is written before the response leaves, so a client that saw a success can find
//!   it in the log.
//! - Response bodies are never stored (an API key's secret is in one); request bodies are
//!   stored only when small JSON, with secret-looking fields redacted.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{ConnectInfo, MatchedPath, Request, State};
use axum::http::{header, HeaderValue, Method};
use axum::middleware::Next;
use axum::response::Response;
use axum::Json;
use broker::auth::ServicePrincipal;
use serde::Serialize;
use utoipa::ToSchema;

use super::auth::Admin;
use super::error::ErrorBody;
use super::extract::ApiQuery;
use super::paging::{parse_limit, DEFAULT_LIMIT};
use super::validate::parse_time;
use super::{access, rfc3339, ApiError, ApiState};
use crate::store::{ActorKind, AuditEntry, AuditFilter, NewAuditEntry};

pub(super) const REQUEST_ID: &str = "x-request-id";
/// Request bodies up to this size are kept in the entry's detail.
const MAX_DETAIL_BODY: usize = 16 * 1024;

/// The request's id: the client's `X-Request-Id` when it is sane, else a new UUID.
#[derive(Clone, Debug)]
pub(super) struct RequestId(pub String);

/// Where the auth extractors leave the key that made the request.
#[derive(Clone, Default)]
pub(super) struct AuditSlot(Arc<std::sync::Mutex<Option<(String, String)>>>);

impl AuditSlot {
    pub(super) fn set(&self, p: &ServicePrincipal) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) =
            Some((p.key_id.clone(), p.org_id.clone()));
    }

    fn take(&self) -> Option<(String, String)> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).take()
    }
}

/// Where an action's target id comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Target {
    /// The route's first path parameter.
    Path,
    /// The `id` of the created resource in the response.
    Created,
    None,
}

/// Every mutating route: method, path, action, and what kind of resource it acts on.
#[rustfmt::skip]
const ACTIONS: &[(&str, &str, &str, &str, Target)] = &[
    ("POST", "/api/v1/organizations", "organization.create", "organization", Target::Created),
    ("DELETE", "/api/v1/organizations/:org_id", "organization.delete", "organization", Target::Path),
    ("POST", "/api/v1/products", "product.create", "product", Target::Created),
    ("DELETE", "/api/v1/products/:product_id", "product.delete", "product", Target::Path),
    ("POST", "/api/v1/products/:product_id/cohorts", "cohort.create", "cohort", Target::Created),
    ("DELETE", "/api/v1/cohorts/:cohort_id", "cohort.delete", "cohort", Target::Path),
    ("POST", "/api/v1/cohorts/:cohort_id/commands", "cohort.command", "cohort", Target::Path),
    ("POST", "/api/v1/products/:product_id/devices/import", "device.import", "product", Target::Path),
    ("POST", "/api/v1/ca-certificates", "ca.create", "ca", Target::Created),
    ("POST", "/api/v1/ca-certificates/verification-code", "ca.verification_code", "ca", Target::None),
    ("PATCH", "/api/v1/ca-certificates/:ca_id", "ca.update", "ca", Target::Path),
    ("DELETE", "/api/v1/ca-certificates/:ca_id", "ca.delete", "ca", Target::Path),
    ("POST", "/api/v1/devices", "device.create", "device", Target::Created),
    ("DELETE", "/api/v1/devices", "device.bulk_delete", "device", Target::None),
    ("PATCH", "/api/v1/devices/:device_id", "device.update", "device", Target::Path),
    ("DELETE", "/api/v1/devices/:device_id", "device.delete", "device", Target::Path),
    ("POST", "/api/v1/devices/:device_id/revoke-certificate", "device.revoke_certificate", "device", Target::Path),
    ("POST", "/api/v1/devices/:device_id/commands", "device.command", "device", Target::Path),
    ("POST", "/api/v1/devices/:device_id/quarantine", "device.quarantine", "device", Target::Path),
    ("DELETE", "/api/v1/devices/:device_id/quarantine", "device.lift_quarantine", "device", Target::Path),
    ("POST", "/api/v1/signing-keys", "signing_key.create", "signing_key", Target::Created),
    ("DELETE", "/api/v1/signing-keys/:key_id", "signing_key.revoke", "signing_key", Target::Path),
    ("POST", "/api/v1/releases", "release.create", "release", Target::Created),
    ("POST", "/api/v1/deployments", "deployment.create", "deployment", Target::Created),
    ("POST", "/api/v1/deployments/:deployment_id/pause", "deployment.pause", "deployment", Target::Path),
    ("POST", "/api/v1/deployments/:deployment_id/resume", "deployment.resume", "deployment", Target::Path),
    ("POST", "/api/v1/deployments/:deployment_id/cancel", "deployment.cancel", "deployment", Target::Path),
    ("POST", "/api/v1/deployments/:deployment_id/rollback", "deployment.rollback", "deployment", Target::Path),
    ("POST", "/api/v1/deployments/:deployment_id/promote", "deployment.promote", "deployment", Target::Path),
    ("POST", "/api/v1/api-keys", "api_key.create", "api_key", Target::Created),
    ("DELETE", "/api/v1/api-keys/:key_id", "api_key.revoke", "api_key", Target::Path),
];

fn action_of(method: &Method, path: &str) -> Option<(&'static str, &'static str, Target)> {
    ACTIONS
        .iter()
        .find(|(m, p, ..)| *m == method.as_str() && *p == path)
        .map(|(_, _, action, kind, target)| (*action, *kind, *target))
}

fn is_mutating(method: &Method) -> bool {
    !matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS)
}

/// The value of the first `:param` of `template` in `path`.
fn first_param(template: &str, path: &str) -> Option<String> {
    template
        .split('/')
        .zip(path.split('/'))
        .find(|(t, _)| t.starts_with(':'))
        .map(|(_, v)| v.to_owned())
}

/// Replaces the values of secret-looking fields, at any depth.
fn redact(v: &mut serde_json::Value) {
    match v {
        serde_json::Value::Object(map) => {
            for (k, v) in map.iter_mut() {
                let k = k.to_ascii_lowercase();
                if ["secret", "password", "token", "private"]
                    .iter()
                    .any(|s| k.contains(s))
                {
                    *v = serde_json::Value::String("[redacted]".into());
                } else {
                    redact(v);
                }
            }
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(redact),
        _ => {}
    }
}

/// Gives every request an id (kept from `X-Request-Id` when it is 1 to 128 visible ASCII
/// characters) and answers with it in `X-Request-Id`.
pub(super) async fn request_id(mut req: Request, next: Next) -> Response {
    let id = req
        .headers()
        .get(REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 128 && v.bytes().all(|b| b.is_ascii_graphic()))
        .map(str::to_owned)
        .unwrap_or_else(|| uuid::Uuid::now_v7().to_string());
    req.extensions_mut().insert(RequestId(id.clone()));
    let mut response = next.run(req).await;
    if let Ok(v) = HeaderValue::from_str(&id) {
        response.headers_mut().insert(REQUEST_ID, v);
    }
    response
}

/// Records a mutating request in the audit log once it is answered.
pub(super) async fn record(
    State(state): State<ApiState>,
    mut req: Request,
    next: Next,
) -> Response {
    if !is_mutating(req.method()) {
        return next.run(req).await;
    }
    let method = req.method().clone();
    let template = req
        .extensions()
        .get::<MatchedPath>()
        .map(|m| m.as_str().to_owned());
    let Some((action, target_kind, target)) =
        template.as_deref().and_then(|t| action_of(&method, t))
    else {
        return next.run(req).await;
    };
    let slot = AuditSlot::default();
    req.extensions_mut().insert(slot.clone());
    let request_id = req.extensions().get::<RequestId>().map(|r| r.0.clone());
    let remote_addr = req
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.to_string());
    // A bulk deletion is chosen by its query: the entry keeps it.
    let query = (action == "device.bulk_delete")
        .then(|| req.uri().query().map(str::to_owned))
        .flatten();
    let mut target_id = match target {
        Target::Path => template
            .as_deref()
            .and_then(|t| first_param(t, req.uri().path())),
        _ => None,
    };
    // A small JSON body is kept as the entry's detail.
    let small_json = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"))
        && req
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<usize>().ok())
            .is_some_and(|n| n <= MAX_DETAIL_BODY);
    let mut detail = None;
    if small_json && action != "device.import" {
        let (parts, body) = req.into_parts();
        let bytes = axum::body::to_bytes(body, MAX_DETAIL_BODY)
            .await
            .unwrap_or_default();
        detail = serde_json::from_slice::<serde_json::Value>(&bytes)
            .ok()
            .map(|mut v| {
                redact(&mut v);
                serde_json::json!({ "request": v })
            });
        req = Request::from_parts(parts, Body::from(bytes));
    }

    let response = next.run(req).await;

    let Some((actor, org_id)) = slot.take() else {
        return response;
    };
    let status = response.status();
    let (parts, body) = response.into_parts();
    // Answers are built in memory, so this copies nothing.
    let bytes = axum::body::to_bytes(body, usize::MAX)
        .await
        .unwrap_or_default();
    let answer = serde_json::from_slice::<serde_json::Value>(&bytes).ok();
    let answer = answer.as_ref();
    if target == Target::Created && status.is_success() {
        target_id = answer
            .and_then(|a| a.get("id"))
            .and_then(|v| v.as_str())
            .map(str::to_owned);
    }
    if action == "device.import" && status.is_success() {
        let counts = ["rows", "created", "skipped", "failed"].map(|k| {
            (
                k.to_owned(),
                answer.and_then(|a| a.get(k)).cloned().unwrap_or_default(),
            )
        });
        detail = Some(serde_json::Value::Object(counts.into_iter().collect()));
    }
    if action == "device.bulk_delete" {
        let mut d = serde_json::Map::new();
        d.insert("query".into(), query.unwrap_or_default().into());
        if status.is_success() {
            for k in ["dry_run", "matched", "deleted", "remaining"] {
                d.insert(
                    k.into(),
                    answer.and_then(|a| a.get(k)).cloned().unwrap_or_default(),
                );
            }
        }
        detail = Some(serde_json::Value::Object(d));
    }
    // A command's id may be the platform's choice: the entry names it.
    if action.ends_with(".command") && status.is_success() {
        if let (Some(serde_json::Value::Object(d)), Some(id)) =
            (&mut detail, answer.and_then(|a| a.get("id")))
        {
            d.insert("command_id".into(), id.clone());
        }
    }
    let error_code = (!status.is_success())
        .then(|| {
            answer
                .and_then(|a| a["error"]["code"].as_str())
                .map(str::to_owned)
        })
        .flatten();
    let entry = NewAuditEntry {
        org_id,
        actor_kind: ActorKind::ApiKey,
        actor,
        action: action.to_owned(),
        target_kind: Some(target_kind.to_owned()),
        target_id,
        request_id,
        success: status.is_success(),
        status: Some(status.as_u16()),
        error_code,
        remote_addr,
        detail,
    };
    if let Err(e) = state.store.record_audit(&entry).await {
        tracing::error!(error = %e, action, "audit entry not recorded");
    }
    Response::from_parts(parts, Body::from(bytes))
}

/// One audit entry. Times are RFC 3339, UTC.
#[derive(Serialize, ToSchema)]
pub(super) struct AuditBody {
    /// Increases with every entry; entries list newest first.
    id: i64,
    at: String,
    /// `api_key` or `platform`.
    actor_kind: String,
    /// The API key's id, or the part of the platform that acted (`broker`).
    actor: String,
    /// Such as `device.quarantine`, `api_key.revoke`, `ca.update`,
    /// `connection.rejected_burst`.
    action: String,
    target_kind: Option<String>,
    target_id: Option<String>,
    /// The request's `X-Request-Id`.
    request_id: Option<String>,
    /// `success` or `failure`.
    outcome: String,
    /// The HTTP status the request was answered with.
    status: Option<i32>,
    /// The error code of a failed request.
    error_code: Option<String>,
    remote_addr: Option<String>,
    /// What else the action carries: the request body (small JSON ones, secrets redacted),
    /// an import's counts, a bulk deletion's query and counts, a command's id, a burst's
    /// refusals by reason.
    detail: Option<serde_json::Value>,
}

impl From<AuditEntry> for AuditBody {
    fn from(e: AuditEntry) -> Self {
        Self {
            id: e.id,
            at: rfc3339(e.at_ms),
            actor_kind: e.actor_kind,
            actor: e.actor,
            action: e.action,
            target_kind: e.target_kind,
            target_id: e.target_id,
            request_id: e.request_id,
            outcome: e.outcome,
            status: e.status,
            error_code: e.error_code,
            remote_addr: e.remote_addr,
            detail: e.detail.and_then(|d| serde_json::from_str(&d).ok()),
        }
    }
}

/// One page of audit entries, newest first.
#[derive(Serialize, ToSchema)]
pub(super) struct AuditPage {
    items: Vec<AuditBody>,
    /// Pass as `cursor` for the next (older) page; none on the last page.
    next_cursor: Option<String>,
}

fn parse_audit_query(
    org_id: &str,
    pairs: Vec<(String, String)>,
) -> Result<(AuditFilter, Option<i64>, u32), ApiError> {
    let bad = |m: String| ApiError::bad_request("invalid_query", m);
    let mut filter = AuditFilter {
        org_id: org_id.to_owned(),
        ..AuditFilter::default()
    };
    let (mut before, mut limit) = (None, DEFAULT_LIMIT);
    let mut seen = std::collections::HashSet::new();
    for (key, value) in pairs {
        if !seen.insert(key.clone()) {
            return Err(bad(format!("{key} may be given only once")));
        }
        match key.as_str() {
            "action" => filter.action = Some(value),
            "actor" => filter.actor = Some(value),
            "target_id" => filter.target_id = Some(value),
            "request_id" => filter.request_id = Some(value),
            "outcome" => match value.as_str() {
                "success" | "failure" => filter.outcome = Some(value),
                _ => return Err(bad("outcome must be success or failure".into())),
            },
            "since" => filter.since_ms = Some(parse_time(&key, &value)?),
            "until" => filter.until_ms = Some(parse_time(&key, &value)?),
            "limit" => limit = parse_limit(&value)?,
            "cursor" => {
                before = Some(
                    value
                        .parse::<i64>()
                        .map_err(|_| bad("invalid cursor".into()))?,
                )
            }
            other => return Err(bad(format!("unknown query parameter {other:?}"))),
        }
    }
    Ok((filter, before, limit))
}

/// The organization's audit log, newest first: every mutating request made with one of its
/// keys (whatever the outcome), what the platform did on its own (`device.provision` by
/// just-in-time provisioning, `device.first_connection` of a registered device) and the
/// security events it noticed (`connection.rejected_burst`).
///
/// Role: admin, without a scope.
#[utoipa::path(
    get,
    path = "/api/v1/audit",
    tag = "audit",
    security(("api_key" = [])),
    params(
        ("action" = Option<String>, Query, description = "An action such as `device.quarantine`, or a prefix ending in `.` (`device.`)"),
        ("actor" = Option<String>, Query, description = "An API key id, or `broker`"),
        ("target_id" = Option<String>, Query, description = "The id of the resource acted on"),
        ("request_id" = Option<String>, Query, description = "The request's `X-Request-Id`"),
        ("outcome" = Option<String>, Query, description = "`success` or `failure`"),
        ("since" = Option<String>, Query, description = "RFC 3339: entries at or after this"),
        ("until" = Option<String>, Query, description = "RFC 3339: entries before this"),
        ("limit" = Option<u32>, Query, minimum = 1, maximum = 1000, description = "Page size, 100 by default"),
        ("cursor" = Option<String>, Query, description = "`next_cursor` of the previous page"),
    ),
    responses(
        (status = 200, description = "One page of entries", body = AuditPage),
        (status = 400, description = "`invalid_query`: an unknown or repeated parameter, or a bad value", body = ErrorBody),
        (status = 401, description = "No API key, or an unknown or revoked one", body = ErrorBody),
        (status = 403, description = "Not an admin key, or a scoped one", body = ErrorBody),
        (status = 500, description = "`internal`: a store failure, logged", body = ErrorBody),
    ),
)]
pub(super) async fn list_audit(
    Admin(by): Admin,
    State(state): State<ApiState>,
    ApiQuery(pairs): ApiQuery<Vec<(String, String)>>,
) -> Result<Json<AuditPage>, ApiError> {
    access::org_wide(&by)?;
    let (filter, before, limit) = parse_audit_query(&by.org_id, pairs)?;
    let mut items = state
        .store
        .audit_entries(&filter, before, limit + 1)
        .await?;
    let next_cursor = if items.len() > limit as usize {
        items.truncate(limit as usize);
        items.last().map(|e| e.id.to_string())
    } else {
        None
    };
    Ok(Json(AuditPage {
        items: items.into_iter().map(AuditBody::from).collect(),
        next_cursor,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_mutating_route_has_an_action() {
        for r in super::super::routes() {
            if is_mutating(&r.method) {
                assert!(
                    action_of(&r.method, r.path).is_some(),
                    "{} {} has no audit action",
                    r.method,
                    r.path
                );
            }
        }
        for (m, p, ..) in ACTIONS {
            assert!(
                super::super::routes()
                    .iter()
                    .any(|r| r.method.as_str() == *m && r.path == *p),
                "audit action for {m} {p}, which is no route"
            );
        }
    }

    #[test]
    fn params_and_redaction() {
        assert_eq!(
            first_param(
                "/api/v1/devices/:device_id/quarantine",
                "/api/v1/devices/d-1/quarantine"
            ),
            Some("d-1".into())
        );
        assert_eq!(first_param("/api/v1/products", "/api/v1/products"), None);
        let mut v = serde_json::json!({"name": "k", "nested": {"client_secret": "s"}, "list": [{"password": "p"}]});
        redact(&mut v);
        assert_eq!(
            v,
            serde_json::json!({"name": "k", "nested": {"client_secret": "[redacted]"}, "list": [{"password": "[redacted]"}]})
        );
    }
}

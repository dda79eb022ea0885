//! Software updates over REST: signing keys (admins), releases, deployments and their
//! per-device executions.
//!
//! A release is refused at creation unless its Ed25519 signature over the canonical manifest
//! verifies against a registered, unrevoked key. Every deployment change is written to the
//! store first and then the rollout engine is woken, which publishes the cohort's message.

use std::collections::BTreeMap;

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use broker::auth::ServicePrincipal;
use fleet_wire::update::{self, DeploymentState, ReleaseManifest};
use fleet_wire::CohortId;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::auth::{Admin, Caller, Writer};
use super::error::ErrorBody;
use super::extract::{object_or_null, ApiJson, ApiPath, ApiQuery, Optional};
use super::openapi::{
    DeferReasonName, DeploymentKindName, DeploymentStateName, ExecutionStatusName,
};
use super::paging::{
    decode_cursor, encode_cursor, page_request, parse_limit, Items, Page, PageParams, DEFAULT_LIMIT,
};
use super::validate::{path_device, valid_name};
use super::{access, rfc3339, rfc3339_opt, ApiError, ApiState};
use crate::rollout::policy::{PolicyError, RolloutPolicy};
use crate::rollout::RollbackError;
use crate::store::{
    Deployment, DeploymentKind, Execution, ExecutionStatus, ExecutionSummary, NewDeployment,
    Release, SigningKey, StateChange,
};

// ---- signing keys ----

/// A release signing key to register: the public half only.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(as = CreateSigningKey)]
pub(super) struct CreateKey {
    /// 1 to 200 characters after trimming, no control characters.
    #[schema(min_length = 1, max_length = 200)]
    name: String,
    /// Base64 of the 32-byte Ed25519 key, or a PEM `PUBLIC KEY`.
    public_key: String,
}

#[derive(Serialize, ToSchema)]
pub(super) struct SigningKeyBody {
    /// Derived from the public key.
    id: String,
    name: String,
    /// Base64 of the 32-byte Ed25519 key.
    public_key: String,
    /// RFC 3339, UTC.
    created_at: String,
    /// RFC 3339, UTC; none while the key is valid.
    revoked_at: Option<String>,
}

impl From<SigningKey> for SigningKeyBody {
    fn from(k: SigningKey) -> Self {
        Self {
            id: k.id,
            name: k.name,
            public_key: k.public_key,
            created_at: rfc3339(k.created_at_ms),
            revoked_at: rfc3339_opt(k.revoked_at_ms),
        }
    }
}

/// Registers a release signing key (Ed25519 public key).
///
/// Role: admin.
#[utoipa::path(
    post,
    path = "/api/v1/signing-keys",
    tag = "updates",
    security(("api_key" = [])),
    request_body = CreateKey,
    responses(
        (status = 201, description = "Registered", body = SigningKeyBody),
        (status = 400, description = "`malformed_json` or `invalid_body`", body = ErrorBody),
        (status = 401, description = "No API key, or an unknown or revoked one", body = ErrorBody),
        (status = 403, description = "Not an admin key", body = ErrorBody),
        (status = 409, description = "The key is registered already", body = ErrorBody),
        (status = 415, description = "The body is not `application/json`", body = ErrorBody),
        (status = 422, description = "`invalid_name` or `invalid_public_key`", body = ErrorBody),
        (status = 500, description = "`internal`: a store failure, logged", body = ErrorBody),
    ),
)]
pub(super) async fn create_signing_key(
    Admin(by): Admin,
    State(state): State<ApiState>,
    ApiJson(body): ApiJson<CreateKey>,
) -> Result<(StatusCode, Json<SigningKeyBody>), ApiError> {
    access::org_wide(&by)?;
    let name = valid_name(&body.name)?;
    let key = update::parse_public_key(&body.public_key)
        .map_err(|e| ApiError::unprocessable("invalid_public_key", e.to_string()))?;
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD.encode(key);
    let created = state
        .ops
        .create_signing_key(&by.org_id, &update::key_id(&key), name, &b64)
        .await?;
    Ok((StatusCode::CREATED, Json(created.into())))
}

/// Lists every signing key, revoked ones too.
///
/// Role: viewer (any valid API key).
#[utoipa::path(
    get,
    path = "/api/v1/signing-keys",
    tag = "updates",
    security(("api_key" = [])),
    params(PageParams),
    responses(
        (status = 200, description = "One page of signing keys, by id", body = Page<SigningKeyBody>),
        (status = 400, description = "`invalid_query`", body = ErrorBody),
        (status = 401, description = "No API key, or an unknown or revoked one", body = ErrorBody),
        (status = 500, description = "`internal`: a store failure, logged", body = ErrorBody),
    ),
)]
pub(super) async fn list_signing_keys(
    Caller(by): Caller,
    State(state): State<ApiState>,
    ApiQuery(q): ApiQuery<PageParams>,
) -> Result<Json<Page<SigningKeyBody>>, ApiError> {
    access::org_wide(&by)?;
    let page = q.request()?;
    let rows = state.store.signing_keys_page(&by.org_id, &page).await?;
    Ok(Json(Page::of(rows, &page, |k| &k.id, Into::into)))
}

/// Revokes a signing key: releases it signed stay; new ones must use another key.
///
/// Role: admin.
#[utoipa::path(
    delete,
    path = "/api/v1/signing-keys/{key_id}",
    tag = "updates",
    security(("api_key" = [])),
    params(("key_id" = String, Path, description = "The signing key's id")),
    responses(
        (status = 204, description = "Revoked"),
        (status = 400, description = "`invalid_path`", body = ErrorBody),
        (status = 401, description = "No API key, or an unknown or revoked one", body = ErrorBody),
        (status = 403, description = "Not an admin key", body = ErrorBody),
        (status = 404, description = "No such signing key, or it is revoked already", body = ErrorBody),
        (status = 500, description = "`internal`: a store failure, logged", body = ErrorBody),
    ),
)]
pub(super) async fn revoke_signing_key(
    Admin(by): Admin,
    State(state): State<ApiState>,
    ApiPath(id): ApiPath<String>,
) -> Result<StatusCode, ApiError> {
    access::org_wide(&by)?;
    if state.ops.revoke_signing_key(&by.org_id, &id).await? {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::not_found(
            "signing key (or it is revoked already)",
        ))
    }
}

// ---- releases ----

/// A release to register. Its signature must verify over the canonical manifest (product,
/// version, URL, size, hash) against a registered, unrevoked signing key.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct CreateRelease {
    product_id: String,
    /// A semantic version such as `1.4.2`.
    version: String,
    /// The artifact: `http://` or `https://`, at most 2048 characters.
    #[schema(max_length = 2048, pattern = "^https?://")]
    url: String,
    /// The artifact's size in bytes.
    size: u64,
    /// Hex SHA-256 of the artifact.
    #[schema(pattern = "^[0-9a-fA-F]{64}$")]
    sha256: String,
    /// Base64 Ed25519 signature over the canonical manifest.
    signature: String,
    /// Which key signed; by default every registered key is tried.
    #[serde(default)]
    key_id: Option<String>,
    /// At most 10000 characters.
    #[serde(default)]
    #[schema(max_length = 10000)]
    notes: Option<String>,
}

#[derive(Serialize, ToSchema)]
pub(super) struct ReleaseBody {
    id: String,
    product_id: String,
    version: String,
    url: String,
    size: u64,
    sha256: String,
    signature: String,
    key_id: String,
    notes: Option<String>,
    /// RFC 3339, UTC.
    created_at: String,
}

impl From<Release> for ReleaseBody {
    fn from(r: Release) -> Self {
        Self {
            id: r.id,
            product_id: r.manifest.product_id,
            version: r.manifest.version,
            url: r.manifest.url,
            size: r.manifest.size,
            sha256: r.manifest.sha256,
            signature: r.signature,
            key_id: r.key_id,
            notes: r.notes,
            created_at: rfc3339(r.created_at_ms),
        }
    }
}

/// Registers a signed release of a product.
///
/// Role: operator or admin.
#[utoipa::path(
    post,
    path = "/api/v1/releases",
    tag = "updates",
    security(("api_key" = [])),
    request_body = CreateRelease,
    responses(
        (status = 201, description = "Registered", body = ReleaseBody),
        (status = 400, description = "`malformed_json` or `invalid_body`", body = ErrorBody),
        (status = 401, description = "No API key, or an unknown or revoked one", body = ErrorBody),
        (status = 403, description = "A viewer key", body = ErrorBody),
        (status = 409, description = "The product has this version already", body = ErrorBody),
        (status = 415, description = "The body is not `application/json`", body = ErrorBody),
        (status = 422, description = "`invalid_version`, `invalid_url`, `invalid_notes`, `invalid_manifest`, `invalid_reference` (no such product), `unknown_signing_key` or `invalid_signature`", body = ErrorBody),
        (status = 500, description = "`internal`: a store failure, logged", body = ErrorBody),
    ),
)]
pub(super) async fn create_release(
    Writer(by): Writer,
    State(state): State<ApiState>,
    ApiJson(body): ApiJson<CreateRelease>,
) -> Result<(StatusCode, Json<ReleaseBody>), ApiError> {
    if semver::Version::parse(&body.version).is_err() {
        return Err(ApiError::unprocessable(
            "invalid_version",
            "version must be a semantic version such as 1.4.2",
        ));
    }
    let url = body.url.trim();
    if !(url.starts_with("http://") || url.starts_with("https://")) || url.len() > 2048 {
        return Err(ApiError::unprocessable(
            "invalid_url",
            "url must be an http:// or https:// URL of at most 2048 characters",
        ));
    }
    if body.notes.as_ref().is_some_and(|n| n.len() > 10_000) {
        return Err(ApiError::unprocessable(
            "invalid_notes",
            "notes must be at most 10000 characters",
        ));
    }
    let manifest = ReleaseManifest {
        product_id: body.product_id.clone(),
        version: body.version.clone(),
        url: url.to_owned(),
        size: body.size,
        sha256: body.sha256.to_ascii_lowercase(),
    };
    manifest
        .canonical_bytes()
        .map_err(|e| ApiError::unprocessable("invalid_manifest", e.to_string()))?;
    match access::product(&state, &by, &body.product_id).await {
        Ok(p) if by.covers_product(&p.org_id, &p.id) => {}
        Ok(_) => {
            return Err(ApiError::forbidden(
                "a cohort-scoped key may not register releases",
            ))
        }
        Err(_) => {
            return Err(ApiError::unprocessable(
                "invalid_reference",
                "product does not exist",
            ))
        }
    }
    let keys: Vec<SigningKey> = state
        .store
        .signing_keys(&by.org_id)
        .await?
        .into_iter()
        .filter(|k| k.revoked_at_ms.is_none())
        .filter(|k| body.key_id.as_ref().is_none_or(|id| *id == k.id))
        .collect();
    if keys.is_empty() {
        return Err(ApiError::unprocessable(
            "unknown_signing_key",
            match &body.key_id {
                Some(id) => format!("no registered, unrevoked signing key {id}"),
                None => "no signing key is registered; POST /api/v1/signing-keys first".into(),
            },
        ));
    }
    let mut signed_by = None;
    let mut last_error = None;
    for k in &keys {
        let Ok(public) = update::parse_public_key(&k.public_key) else {
            continue;
        };
        match update::verify_manifest(&manifest, &body.signature, &public) {
            Ok(()) => {
                signed_by = Some(k.id.clone());
                break;
            }
            Err(e) => last_error = Some(e),
        }
    }
    let Some(key_id) = signed_by else {
        let why = match last_error {
            Some(update::SignatureError::Invalid(_)) | None => {
                "the signature does not verify against any registered signing key".to_owned()
            }
            Some(e) => e.to_string(),
        };
        return Err(ApiError::unprocessable("invalid_signature", why));
    };
    let release = state
        .ops
        .create_release(
            &manifest,
            body.signature.trim(),
            &key_id,
            body.notes.as_deref(),
        )
        .await?;
    Ok((StatusCode::CREATED, Json(release.into())))
}

#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(super) struct ReleaseQuery {
    /// Only releases of this product.
    #[serde(default)]
    product_id: Option<String>,
    /// Page size, 100 by default.
    #[param(minimum = 1, maximum = 1000)]
    #[serde(default)]
    limit: Option<u32>,
    /// `next_cursor` of the previous page.
    #[serde(default)]
    cursor: Option<String>,
}

/// Lists releases, newest first.
///
/// Role: viewer (any valid API key).
#[utoipa::path(
    get,
    path = "/api/v1/releases",
    tag = "updates",
    security(("api_key" = [])),
    params(ReleaseQuery),
    responses(
        (status = 200, description = "One page of releases, newest first", body = Page<ReleaseBody>),
        (status = 400, description = "`invalid_query`", body = ErrorBody),
        (status = 401, description = "No API key, or an unknown or revoked one", body = ErrorBody),
        (status = 500, description = "`internal`: a store failure, logged", body = ErrorBody),
    ),
)]
pub(super) async fn list_releases(
    Caller(by): Caller,
    State(state): State<ApiState>,
    ApiQuery(q): ApiQuery<ReleaseQuery>,
) -> Result<Json<Page<ReleaseBody>>, ApiError> {
    let page = page_request(q.limit, q.cursor.as_deref())?;
    let (scope_product, _) = access::scope_filter(&by);
    if scope_product.is_some_and(|s| q.product_id.as_deref().is_some_and(|p| p != s)) {
        return Ok(Json(Page::empty()));
    }
    let product = scope_product.or(q.product_id.as_deref());
    let rows = state.store.releases(&by.org_id, product, &page).await?;
    Ok(Json(Page::of(rows, &page, |r| &r.id, Into::into)))
}

/// One release.
///
/// Role: viewer (any valid API key).
#[utoipa::path(
    get,
    path = "/api/v1/releases/{release_id}",
    tag = "updates",
    security(("api_key" = [])),
    params(("release_id" = String, Path, description = "The release's id")),
    responses(
        (status = 200, description = "The release", body = ReleaseBody),
        (status = 400, description = "`invalid_path`", body = ErrorBody),
        (status = 401, description = "No API key, or an unknown or revoked one", body = ErrorBody),
        (status = 404, description = "No such release", body = ErrorBody),
        (status = 500, description = "`internal`: a store failure, logged", body = ErrorBody),
    ),
)]
pub(super) async fn get_release(
    Caller(by): Caller,
    State(state): State<ApiState>,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<ReleaseBody>, ApiError> {
    let r = access::release(&state, &by, &id).await?;
    Ok(Json(r.into()))
}

// ---- deployments ----

/// A release to roll out to a cohort of its product.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct CreateDeployment {
    release_id: String,
    cohort_id: String,
    /// By default one wave of the whole cohort; see `RolloutPolicy`.
    #[serde(default, deserialize_with = "object_or_null")]
    policy: Option<RolloutPolicy>,
}

/// Execution counts of one deployment.
#[derive(Serialize, ToSchema)]
pub(super) struct DeploymentSummary {
    /// Devices with an execution (the cohort's devices since the deployment began).
    total: u64,
    /// Devices the waves count: admitted and not deferred (reachable when admitted: online,
    /// not quarantined, running an update agent; or reported since).
    admitted: u64,
    /// Devices not admitted yet that are reachable now: what the next wave chooses from.
    ready: u64,
    /// Devices their wave reached while they were not reachable: not counted in the waves or
    /// the thresholds; they install and count when they become reachable.
    deferred: u64,
    /// The deferred devices by reason: `never_connected`, `offline`, `no_update_agent`
    /// (online, but it never reported a firmware version), `quarantined`.
    deferred_by_reason: BTreeMap<&'static str, u64>,
    /// Succeeded + failures.
    finished: u64,
    succeeded: u64,
    /// Failed + rejected + timed out.
    failures: u64,
    /// Devices per execution status (see `ExecutionStatus`).
    by_status: BTreeMap<&'static str, u64>,
    /// Finished devices as a share of all devices.
    percent_done: f64,
    /// Failed + rejected + timed out as a share of finished devices.
    failure_rate_percent: f64,
}

impl From<ExecutionSummary> for DeploymentSummary {
    fn from(s: ExecutionSummary) -> Self {
        let c = s.counts;
        let pct = |part: u64, whole: u64| {
            if whole == 0 {
                0.0
            } else {
                (part as f64 * 1000.0 / whole as f64).round() / 10.0
            }
        };
        Self {
            total: c.total,
            admitted: c.admitted,
            ready: c.ready,
            deferred: c.deferred,
            deferred_by_reason: s.deferred_by_reason,
            finished: c.finished(),
            succeeded: c.succeeded,
            failures: c.failures(),
            by_status: s.by_status,
            percent_done: pct(c.finished(), c.total),
            failure_rate_percent: pct(c.failures(), c.finished()),
        }
    }
}

/// A deployment: a release targeted at a cohort, with its policy and progress. Timestamps are
/// RFC 3339, UTC.
#[derive(Serialize, ToSchema)]
pub(super) struct DeploymentBody {
    id: String,
    product_id: String,
    cohort_id: String,
    release_id: String,
    /// The release's version.
    version: String,
    #[schema(value_type = DeploymentKindName)]
    kind: &'static str,
    #[schema(value_type = DeploymentStateName)]
    state: &'static str,
    /// Why it is in its state.
    state_reason: String,
    /// As validated: ends with a wave of the whole cohort.
    policy: RolloutPolicy,
    /// 1-based, of `waves`.
    current_wave: u32,
    waves: usize,
    /// Devices whose wave rank is below this are admitted.
    admit_below: u64,
    /// Grows with every change the cohort topic carries.
    revision: u64,
    /// What the cohort ran before (the default rollback target).
    previous_release_id: Option<String>,
    /// For a rollback: the deployment it replaced.
    rollback_of: Option<String>,
    /// The rollback that replaced this deployment.
    rolled_back_by: Option<String>,
    created_at: String,
    updated_at: String,
    finished_at: Option<String>,
    summary: DeploymentSummary,
}

async fn deployment_body(state: &ApiState, d: Deployment) -> Result<DeploymentBody, ApiError> {
    let summary = state.store.execution_summary(&d.id).await?;
    let version = state
        .store
        .release(&d.release_id)
        .await?
        .map(|r| r.manifest.version)
        .unwrap_or_default();
    Ok(DeploymentBody {
        waves: d.policy.waves.len(),
        current_wave: d.current_wave + 1,
        id: d.id,
        product_id: d.product_id,
        cohort_id: d.cohort_id.to_string(),
        release_id: d.release_id,
        version,
        kind: d.kind.as_str(),
        state: d.state.as_str(),
        state_reason: d.state_reason,
        policy: d.policy,
        admit_below: d.admit_below,
        revision: d.revision,
        previous_release_id: d.previous_release_id,
        rollback_of: d.rollback_of,
        rolled_back_by: d.rolled_back_by,
        created_at: rfc3339(d.created_at_ms),
        updated_at: rfc3339(d.updated_at_ms),
        finished_at: rfc3339_opt(d.finished_at_ms),
        summary: summary.into(),
    })
}

fn policy_error(e: PolicyError) -> ApiError {
    ApiError::unprocessable("invalid_policy", e.to_string())
}

/// Creates a rollout of `release_id` to `cohort_id` after the checks every path shares.
async fn start_deployment(
    state: &ApiState,
    by: &ServicePrincipal,
    release_id: &str,
    cohort_id: &str,
    policy: Option<RolloutPolicy>,
    reason: String,
) -> Result<Deployment, ApiError> {
    let policy = policy
        .unwrap_or_default()
        .validated()
        .map_err(policy_error)?;
    let release = access::release(state, by, release_id)
        .await
        .map_err(|_| ApiError::unprocessable("invalid_reference", "release does not exist"))?;
    let cohort = access::cohort(state, by, cohort_id)
        .await
        .map_err(|_| ApiError::unprocessable("invalid_reference", "cohort does not exist"))?;
    if cohort.product_id != release.manifest.product_id {
        return Err(ApiError::unprocessable(
            "invalid_reference",
            "the release and the cohort belong to different products",
        ));
    }
    let cohort_id = CohortId::parse(&cohort.id).map_err(|_| ApiError::internal())?;
    let d = state
        .ops
        .create_deployment(&NewDeployment {
            release,
            cohort_id,
            kind: DeploymentKind::Rollout,
            policy,
            reason,
            rollback_of: None,
        })
        .await?;
    Ok(d)
}

/// Deploys a release to a cohort of its product, in waves by its policy.
///
/// Role: operator or admin.
#[utoipa::path(
    post,
    path = "/api/v1/deployments",
    tag = "updates",
    security(("api_key" = [])),
    request_body = CreateDeployment,
    responses(
        (status = 201, description = "Created; the rollout engine publishes the cohort's message", body = DeploymentBody),
        (status = 400, description = "`malformed_json` or `invalid_body`", body = ErrorBody),
        (status = 401, description = "No API key, or an unknown or revoked one", body = ErrorBody),
        (status = 403, description = "A viewer key", body = ErrorBody),
        (status = 409, description = "The cohort has an active or paused deployment", body = ErrorBody),
        (status = 415, description = "The body is not `application/json`", body = ErrorBody),
        (status = 422, description = "`invalid_policy` or `invalid_reference` (no such release or cohort, or of different products)", body = ErrorBody),
        (status = 500, description = "`internal`: a store failure, logged", body = ErrorBody),
    ),
)]
pub(super) async fn create_deployment(
    Writer(by): Writer,
    State(state): State<ApiState>,
    ApiJson(body): ApiJson<CreateDeployment>,
) -> Result<(StatusCode, Json<DeploymentBody>), ApiError> {
    let d = start_deployment(
        &state,
        &by,
        &body.release_id,
        &body.cohort_id,
        body.policy,
        "created".into(),
    )
    .await?;
    Ok((StatusCode::CREATED, Json(deployment_body(&state, d).await?)))
}

#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(super) struct DeploymentQuery {
    /// Only deployments to this cohort.
    #[serde(default)]
    cohort_id: Option<String>,
    /// Only deployments in this state.
    #[serde(default)]
    #[param(value_type = Option<DeploymentStateName>)]
    state: Option<String>,
    /// Page size, 100 by default.
    #[param(minimum = 1, maximum = 1000)]
    #[serde(default)]
    limit: Option<u32>,
    /// `next_cursor` of the previous page.
    #[serde(default)]
    cursor: Option<String>,
}

/// Lists deployments, newest first.
///
/// Role: viewer (any valid API key).
#[utoipa::path(
    get,
    path = "/api/v1/deployments",
    tag = "updates",
    security(("api_key" = [])),
    params(DeploymentQuery),
    responses(
        (status = 200, description = "One page of deployments, newest first, with their summaries", body = Page<DeploymentBody>),
        (status = 400, description = "`invalid_query`", body = ErrorBody),
        (status = 401, description = "No API key, or an unknown or revoked one", body = ErrorBody),
        (status = 500, description = "`internal`: a store failure, logged", body = ErrorBody),
    ),
)]
pub(super) async fn list_deployments(
    Caller(by): Caller,
    State(state): State<ApiState>,
    ApiQuery(q): ApiQuery<DeploymentQuery>,
) -> Result<Json<Page<DeploymentBody>>, ApiError> {
    let page = page_request(q.limit, q.cursor.as_deref())?;
    let st = match q.state.as_deref() {
        Some(s) => Some(DeploymentState::parse(s).ok_or_else(|| {
            ApiError::bad_request(
                "invalid_query",
                "state must be active, paused, completed, canceled or rolled_back",
            )
        })?),
        None => None,
    };
    let (scope_product, scope_cohort) = access::scope_filter(&by);
    if scope_cohort.is_some_and(|s| q.cohort_id.as_deref().is_some_and(|c| c != s)) {
        return Ok(Json(Page::empty()));
    }
    let cohort = scope_cohort.or(q.cohort_id.as_deref());
    let rows = state
        .store
        .deployments(&by.org_id, scope_product, cohort, st, &page)
        .await?;
    let Page { items, next_cursor } = Page::of(rows, &page, |d| &d.id, |d| d);
    let mut bodies = Vec::with_capacity(items.len());
    for d in items {
        bodies.push(deployment_body(&state, d).await?);
    }
    Ok(Json(Page {
        items: bodies,
        next_cursor,
    }))
}

async fn load(state: &ApiState, by: &ServicePrincipal, id: &str) -> Result<Deployment, ApiError> {
    access::deployment(state, by, id).await
}

/// One deployment, with its execution summary.
///
/// Role: viewer (any valid API key).
#[utoipa::path(
    get,
    path = "/api/v1/deployments/{deployment_id}",
    tag = "updates",
    security(("api_key" = [])),
    params(("deployment_id" = String, Path, description = "The deployment's id")),
    responses(
        (status = 200, description = "The deployment", body = DeploymentBody),
        (status = 400, description = "`invalid_path`", body = ErrorBody),
        (status = 401, description = "No API key, or an unknown or revoked one", body = ErrorBody),
        (status = 404, description = "No such deployment", body = ErrorBody),
        (status = 500, description = "`internal`: a store failure, logged", body = ErrorBody),
    ),
)]
pub(super) async fn get_deployment(
    Caller(by): Caller,
    State(state): State<ApiState>,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<DeploymentBody>, ApiError> {
    let d = load(&state, &by, &id).await?;
    Ok(Json(deployment_body(&state, d).await?))
}

/// Why; optional, and so is the whole body.
#[derive(Deserialize, Default, ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct ReasonBody {
    /// At most 1000 characters; recorded as the deployment's `state_reason`.
    #[serde(default)]
    #[schema(max_length = 1000)]
    reason: Option<String>,
}

async fn change_state(
    state: &ApiState,
    by: &ServicePrincipal,
    id: &str,
    change: StateChange<'_>,
    default_reason: &str,
    reason: Option<String>,
) -> Result<Json<DeploymentBody>, ApiError> {
    let d = load(state, by, id).await?;
    let reason = reason.unwrap_or_else(|| default_reason.to_owned());
    if reason.len() > 1000 {
        return Err(ApiError::unprocessable(
            "invalid_reason",
            "reason must be at most 1000 characters",
        ));
    }
    match state.ops.set_deployment_state(id, change, &reason).await? {
        Some(d) => Ok(Json(deployment_body(state, d).await?)),
        None => Err(ApiError::conflict(format!(
            "deployment is {}; this needs it to be {}",
            d.state.as_str(),
            change
                .from
                .iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join(" or ")
        ))),
    }
}

/// Pauses a deployment (it must be active).
///
/// Role: operator or admin.
#[utoipa::path(
    post,
    path = "/api/v1/deployments/{deployment_id}/pause",
    tag = "updates",
    security(("api_key" = [])),
    params(("deployment_id" = String, Path, description = "The deployment's id")),
    request_body(content = Option<ReasonBody>, description = "Optional: no body, an empty body or `null` is the same as `{}`"),
    responses(
        (status = 200, description = "The changed deployment", body = DeploymentBody),
        (status = 400, description = "`invalid_path`, `malformed_json` or `invalid_body`", body = ErrorBody),
        (status = 401, description = "No API key, or an unknown or revoked one", body = ErrorBody),
        (status = 403, description = "A viewer key", body = ErrorBody),
        (status = 404, description = "No such deployment", body = ErrorBody),
        (status = 409, description = "The deployment is not active", body = ErrorBody),
        (status = 415, description = "The body is not `application/json`", body = ErrorBody),
        (status = 422, description = "`invalid_reason`", body = ErrorBody),
        (status = 500, description = "`internal`: a store failure, logged", body = ErrorBody),
    ),
)]
pub(super) async fn pause_deployment(
    Writer(by): Writer,
    State(state): State<ApiState>,
    ApiPath(id): ApiPath<String>,
    Optional(body): Optional<ReasonBody>,
) -> Result<Json<DeploymentBody>, ApiError> {
    let change = StateChange {
        from: &[DeploymentState::Active],
        to: DeploymentState::Paused,
    };
    change_state(
        &state,
        &by,
        &id,
        change,
        "paused by an operator",
        body.reason,
    )
    .await
}

/// Resumes a deployment (it must be paused).
///
/// Role: operator or admin.
#[utoipa::path(
    post,
    path = "/api/v1/deployments/{deployment_id}/resume",
    tag = "updates",
    security(("api_key" = [])),
    params(("deployment_id" = String, Path, description = "The deployment's id")),
    request_body(content = Option<ReasonBody>, description = "Optional: no body, an empty body or `null` is the same as `{}`"),
    responses(
        (status = 200, description = "The changed deployment", body = DeploymentBody),
        (status = 400, description = "`invalid_path`, `malformed_json` or `invalid_body`", body = ErrorBody),
        (status = 401, description = "No API key, or an unknown or revoked one", body = ErrorBody),
        (status = 403, description = "A viewer key", body = ErrorBody),
        (status = 404, description = "No such deployment", body = ErrorBody),
        (status = 409, description = "The deployment is not paused", body = ErrorBody),
        (status = 415, description = "The body is not `application/json`", body = ErrorBody),
        (status = 422, description = "`invalid_reason`", body = ErrorBody),
        (status = 500, description = "`internal`: a store failure, logged", body = ErrorBody),
    ),
)]
pub(super) async fn resume_deployment(
    Writer(by): Writer,
    State(state): State<ApiState>,
    ApiPath(id): ApiPath<String>,
    Optional(body): Optional<ReasonBody>,
) -> Result<Json<DeploymentBody>, ApiError> {
    let change = StateChange {
        from: &[DeploymentState::Paused],
        to: DeploymentState::Active,
    };
    change_state(
        &state,
        &by,
        &id,
        change,
        "resumed by an operator",
        body.reason,
    )
    .await
}

/// Cancels a deployment (it must be active or paused).
///
/// Role: operator or admin.
#[utoipa::path(
    post,
    path = "/api/v1/deployments/{deployment_id}/cancel",
    tag = "updates",
    security(("api_key" = [])),
    params(("deployment_id" = String, Path, description = "The deployment's id")),
    request_body(content = Option<ReasonBody>, description = "Optional: no body, an empty body or `null` is the same as `{}`"),
    responses(
        (status = 200, description = "The changed deployment", body = DeploymentBody),
        (status = 400, description = "`invalid_path`, `malformed_json` or `invalid_body`", body = ErrorBody),
        (status = 401, description = "No API key, or an unknown or revoked one", body = ErrorBody),
        (status = 403, description = "A viewer key", body = ErrorBody),
        (status = 404, description = "No such deployment", body = ErrorBody),
        (status = 409, description = "The deployment is not active or paused", body = ErrorBody),
        (status = 415, description = "The body is not `application/json`", body = ErrorBody),
        (status = 422, description = "`invalid_reason`", body = ErrorBody),
        (status = 500, description = "`internal`: a store failure, logged", body = ErrorBody),
    ),
)]
pub(super) async fn cancel_deployment(
    Writer(by): Writer,
    State(state): State<ApiState>,
    ApiPath(id): ApiPath<String>,
    Optional(body): Optional<ReasonBody>,
) -> Result<Json<DeploymentBody>, ApiError> {
    let change = StateChange {
        from: &[DeploymentState::Active, DeploymentState::Paused],
        to: DeploymentState::Canceled,
    };
    change_state(
        &state,
        &by,
        &id,
        change,
        "canceled by an operator",
        body.reason,
    )
    .await
}

/// Where to roll back to, and why; optional, and so is the whole body.
#[derive(Deserialize, Default, ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct RollbackBody {
    /// By default the release the cohort ran before this deployment.
    #[serde(default)]
    release_id: Option<String>,
    #[serde(default)]
    reason: Option<String>,
}

/// Rolls a live deployment's cohort back to the release it ran before, or to a named one.
///
/// The deployment becomes `rolled_back`, and a new `rollback` deployment admits every device at once.
///
/// Role: operator or admin.
#[utoipa::path(
    post,
    path = "/api/v1/deployments/{deployment_id}/rollback",
    tag = "updates",
    security(("api_key" = [])),
    params(("deployment_id" = String, Path, description = "The deployment's id")),
    request_body(content = Option<RollbackBody>, description = "Optional: no body, an empty body or `null` is the same as `{}`"),
    responses(
        (status = 201, description = "The rollback deployment", body = DeploymentBody),
        (status = 400, description = "`invalid_path`, `malformed_json` or `invalid_body`", body = ErrorBody),
        (status = 401, description = "No API key, or an unknown or revoked one", body = ErrorBody),
        (status = 403, description = "A viewer key", body = ErrorBody),
        (status = 404, description = "No such deployment", body = ErrorBody),
        (status = 409, description = "The deployment is not live (active or paused), or the cohort has another live deployment", body = ErrorBody),
        (status = 415, description = "The body is not `application/json`", body = ErrorBody),
        (status = 422, description = "`invalid_rollback`: no previous release, or the release does not exist or belongs to another product", body = ErrorBody),
        (status = 500, description = "`internal`: a store failure, logged", body = ErrorBody),
    ),
)]
pub(super) async fn rollback_deployment(
    Writer(by): Writer,
    State(state): State<ApiState>,
    ApiPath(id): ApiPath<String>,
    Optional(body): Optional<RollbackBody>,
) -> Result<(StatusCode, Json<DeploymentBody>), ApiError> {
    let d = load(&state, &by, &id).await?;
    // A release the key cannot see is answered exactly like one that does not exist, so a
    // rollback never tells another organization which release ids exist.
    if let Some(target) = &body.release_id {
        if access::release(&state, &by, target).await.is_err() {
            return Err(ApiError::unprocessable(
                "invalid_rollback",
                RollbackError::UnknownRelease(target.clone()).to_string(),
            ));
        }
    }
    let reason = body
        .reason
        .unwrap_or_else(|| "rolled back by an operator".into());
    let r = state
        .ops
        .rollback_deployment(&d, body.release_id.as_deref(), &reason)
        .await
        .map_err(|e| match e {
            RollbackError::Store(e) => ApiError::from(e),
            RollbackError::NotLive(..) => ApiError::conflict(e.to_string()),
            other => ApiError::unprocessable("invalid_rollback", other.to_string()),
        })?;
    Ok((StatusCode::CREATED, Json(deployment_body(&state, r).await?)))
}

/// The cohort to deploy a proven release to next.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct PromoteBody {
    /// Another cohort of the same product.
    cohort_id: String,
    /// By default one wave of the whole cohort; see `RolloutPolicy`.
    #[serde(default, deserialize_with = "object_or_null")]
    policy: Option<RolloutPolicy>,
    /// Promote even though the deployment has not completed.
    #[serde(default)]
    force: bool,
}

/// Deploys the release a deployment proved to another cohort of the same product.
/// Deploys the release a deployment proved to another cohort of the same product.
///
/// Role: operator or admin.
#[utoipa::path(
    post,
    path = "/api/v1/deployments/{deployment_id}/promote",
    tag = "updates",
    security(("api_key" = [])),
    params(("deployment_id" = String, Path, description = "The deployment's id")),
    request_body = PromoteBody,
    responses(
        (status = 201, description = "The new deployment", body = DeploymentBody),
        (status = 400, description = "`invalid_path`, `malformed_json` or `invalid_body`", body = ErrorBody),
        (status = 401, description = "No API key, or an unknown or revoked one", body = ErrorBody),
        (status = 403, description = "A viewer key", body = ErrorBody),
        (status = 404, description = "No such deployment", body = ErrorBody),
        (status = 409, description = "The deployment has not completed (and `force` is not set), or the target cohort has a live deployment", body = ErrorBody),
        (status = 415, description = "The body is not `application/json`", body = ErrorBody),
        (status = 422, description = "`invalid_reference` (the same cohort, no such cohort, or another product's) or `invalid_policy`", body = ErrorBody),
        (status = 500, description = "`internal`: a store failure, logged", body = ErrorBody),
    ),
)]
pub(super) async fn promote_deployment(
    Writer(by): Writer,
    State(state): State<ApiState>,
    ApiPath(id): ApiPath<String>,
    ApiJson(body): ApiJson<PromoteBody>,
) -> Result<(StatusCode, Json<DeploymentBody>), ApiError> {
    let d = load(&state, &by, &id).await?;
    if d.state != DeploymentState::Completed && !body.force {
        return Err(ApiError::conflict(format!(
            "deployment is {}, not completed; promote with \"force\": true to skip the proof",
            d.state.as_str()
        )));
    }
    if body.cohort_id == d.cohort_id.as_str() {
        return Err(ApiError::unprocessable(
            "invalid_reference",
            "promotion needs another cohort than the deployment's own",
        ));
    }
    let new = start_deployment(
        &state,
        &by,
        &d.release_id,
        &body.cohort_id,
        body.policy,
        format!("promoted from deployment {} (cohort {})", d.id, d.cohort_id),
    )
    .await?;
    Ok((
        StatusCode::CREATED,
        Json(deployment_body(&state, new).await?),
    ))
}

// ---- executions ----

/// One device's progress with one deployment. Timestamps are RFC 3339, UTC.
#[derive(Serialize, ToSchema)]
pub(super) struct ExecutionBody {
    deployment_id: String,
    device_id: String,
    #[schema(value_type = ExecutionStatusName)]
    status: &'static str,
    /// The device's error (`failed`) or reason (`rejected`).
    error: Option<String>,
    /// Why the execution is `deferred`: `never_connected`, `offline`, `no_update_agent`
    /// (online, but it never reported a firmware version) or `quarantined`.
    #[schema(value_type = Option<DeferReasonName>)]
    deferred_reason: Option<&'static str>,
    /// The firmware version the device ran when the deployment began.
    from_version: Option<String>,
    /// The firmware version the device last reported.
    firmware_version: Option<String>,
    /// Whether its wave has reached it (a deferred device is admitted: it installs when it
    /// becomes reachable).
    admitted: bool,
    admitted_at: Option<String>,
    last_report_at: Option<String>,
    finished_at: Option<String>,
    updated_at: String,
}

impl From<Execution> for ExecutionBody {
    fn from(e: Execution) -> Self {
        Self {
            deployment_id: e.deployment_id,
            device_id: e.device_id.to_string(),
            status: e.status.as_str(),
            error: e.error,
            deferred_reason: e.deferred_reason.map(|r| r.as_str()),
            from_version: e.from_version,
            firmware_version: e.firmware_version,
            admitted: e.admitted_at_ms.is_some(),
            admitted_at: rfc3339_opt(e.admitted_at_ms),
            last_report_at: rfc3339_opt(e.last_report_at_ms),
            finished_at: rfc3339_opt(e.finished_at_ms),
            updated_at: rfc3339(e.updated_at_ms),
        }
    }
}

/// One page of executions, by device id.
#[derive(Serialize, ToSchema)]
pub(super) struct ExecutionPage {
    items: Vec<ExecutionBody>,
    /// Pass as `cursor` for the next page; none on the last page.
    next_cursor: Option<String>,
}

/// A deployment's per-device executions, by device id, paginated.
///
/// Role: viewer (any valid API key).
#[utoipa::path(
    get,
    path = "/api/v1/deployments/{deployment_id}/executions",
    tag = "updates",
    security(("api_key" = [])),
    params(("deployment_id" = String, Path, description = "The deployment's id"),
        ("status" = Option<ExecutionStatusName>, Query, description = "Only executions with this status"),
        ("limit" = Option<u32>, Query, minimum = 1, maximum = 1000, description = "Page size, 100 by default"),
        ("cursor" = Option<String>, Query, description = "`next_cursor` of the previous page"),
    ),
    responses(
        (status = 200, description = "One page of executions", body = ExecutionPage),
        (status = 400, description = "`invalid_path`, or `invalid_query`: an unknown parameter or a bad value", body = ErrorBody),
        (status = 401, description = "No API key, or an unknown or revoked one", body = ErrorBody),
        (status = 404, description = "No such deployment", body = ErrorBody),
        (status = 500, description = "`internal`: a store failure, logged", body = ErrorBody),
    ),
)]
pub(super) async fn list_executions(
    Caller(by): Caller,
    State(state): State<ApiState>,
    ApiPath(id): ApiPath<String>,
    ApiQuery(pairs): ApiQuery<Vec<(String, String)>>,
) -> Result<Json<ExecutionPage>, ApiError> {
    load(&state, &by, &id).await?;
    let mut status = None;
    let mut limit = DEFAULT_LIMIT;
    let mut after = None;
    for (key, value) in pairs {
        match key.as_str() {
            "status" => {
                status = Some(ExecutionStatus::parse(&value).ok_or_else(|| {
                    ApiError::bad_request("invalid_query", format!("unknown status {value:?}"))
                })?)
            }
            "limit" => limit = parse_limit(&value)?,
            "cursor" => {
                after = Some(
                    decode_cursor(&value)
                        .and_then(|id| fleet_wire::DeviceId::parse(&id).ok())
                        .ok_or_else(|| ApiError::bad_request("invalid_query", "invalid cursor"))?,
                )
            }
            other => {
                return Err(ApiError::bad_request(
                    "invalid_query",
                    format!("unknown query parameter {other:?}"),
                ))
            }
        }
    }
    let mut items = state
        .store
        .executions(&id, status, after.as_ref(), limit + 1)
        .await?;
    let next_cursor = if items.len() > limit as usize {
        items.truncate(limit as usize);
        items.last().map(|e| encode_cursor(e.device_id.as_str()))
    } else {
        None
    };
    Ok(Json(ExecutionPage {
        items: items.into_iter().map(Into::into).collect(),
        next_cursor,
    }))
}

/// A device's most recent executions (at most 50), one per deployment that reached it.
///
/// Role: viewer (any valid API key).
#[utoipa::path(
    get,
    path = "/api/v1/devices/{device_id}/executions",
    tag = "devices",
    security(("api_key" = [])),
    params(("device_id" = String, Path, description = "The device's id")),
    responses(
        (status = 200, description = "The device's executions", body = Items<ExecutionBody>),
        (status = 400, description = "`invalid_path`", body = ErrorBody),
        (status = 401, description = "No API key, or an unknown or revoked one", body = ErrorBody),
        (status = 404, description = "No such device", body = ErrorBody),
        (status = 500, description = "`internal`: a store failure, logged", body = ErrorBody),
    ),
)]
pub(super) async fn device_executions(
    Caller(by): Caller,
    State(state): State<ApiState>,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<Items<ExecutionBody>>, ApiError> {
    let id = path_device(&id)?;
    access::device(&state, &by, &id).await?;
    let items = state.store.device_executions(&id).await?;
    Ok(Json(Items {
        items: items.into_iter().map(Into::into).collect(),
    }))
}

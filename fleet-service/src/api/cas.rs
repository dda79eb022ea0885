//! Manufacturing CA certificates. Every change (a deletion too) is stored, then pushed to the
//! running brokers.

use std::collections::BTreeMap;

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use broker::registry::JitpSettings;
use fleet_wire::CohortId;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::auth::{Caller, Writer};
use super::error::ErrorBody;
use super::extract::{ApiJson, ApiPath, ApiQuery};
use super::paging::{page_request, Page};
use super::validate::valid_tags;
use super::{access, rfc3339, ApiError, ApiState};
use crate::store::cas::{parse_ca_pem, verify_possession};
use crate::store::{CaCertificate, CaUpdate, Deletion, NewCa};

/// Longest description accepted.
const MAX_DESCRIPTION: usize = 1000;

/// Just-in-time provisioning: devices whose certificate this CA signed are created on first
/// connect, in this product and cohort, with these tags.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct JitpBody {
    product_id: String,
    /// A cohort of `product_id`.
    cohort_id: String,
    /// At most 64 tags: keys of 1 to 128 characters without `:`; string values of 1 to 256
    /// characters; no control characters.
    #[serde(default)]
    #[schema(value_type = BTreeMap<String, String>)]
    tags: serde_json::Map<String, serde_json::Value>,
}

/// A manufacturing CA to trust.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct CreateCa {
    /// One PEM `CERTIFICATE`: a CA certificate.
    certificate_pem: String,
    /// At most 1000 characters.
    #[serde(default)]
    #[schema(max_length = 1000)]
    description: Option<String>,
    /// Whether devices it signed may connect; true by default.
    #[serde(default)]
    enabled: Option<bool>,
    /// While disabled, whether the devices it already provisioned keep connecting (a disabled
    /// CA never provisions new ones); false by default.
    #[serde(default)]
    keep_devices_when_disabled: Option<bool>,
    /// Proof of possession of the CA's key: one PEM certificate signed by this CA whose subject
    /// CN is a verification code from `POST /api/v1/ca-certificates/verification-code`.
    /// Required unless the service runs with `[ca] require_proof_of_possession = false`.
    #[serde(default)]
    verification_certificate_pem: Option<String>,
    #[serde(default)]
    jitp: Option<JitpBody>,
}

/// Absent, `null` and a value are three different things in a PATCH.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct PatchCa {
    /// Absent: unchanged. Disabling stops provisioning from it and, unless
    /// `keep_devices_when_disabled`, ends the live sessions of its devices and refuses them.
    #[serde(default)]
    enabled: Option<bool>,
    /// Absent: unchanged.
    #[serde(default)]
    keep_devices_when_disabled: Option<bool>,
    /// Absent: unchanged; `null`: removed.
    #[serde(default, deserialize_with = "super::extract::present")]
    #[schema(value_type = Option<String>)]
    description: Option<Option<String>>,
    /// Absent: unchanged; `null`: provisioning turned off.
    #[serde(default, deserialize_with = "super::extract::present")]
    #[schema(value_type = Option<JitpBody>)]
    jitp: Option<Option<JitpBody>>,
}

#[derive(Serialize, ToSchema)]
pub(super) struct JitpOut {
    product_id: String,
    cohort_id: String,
    tags: BTreeMap<String, String>,
}

#[derive(Serialize, ToSchema)]
pub(super) struct CaBody {
    id: String,
    /// Hex SHA-256 of the certificate's DER.
    fingerprint_sha256: String,
    subject: String,
    /// RFC 3339, UTC.
    not_before: String,
    /// RFC 3339, UTC.
    not_after: String,
    description: Option<String>,
    enabled: bool,
    /// While disabled, whether its existing devices keep connecting.
    keep_devices_when_disabled: bool,
    jitp: Option<JitpOut>,
    certificate_pem: String,
    /// RFC 3339, UTC.
    created_at: String,
    /// RFC 3339, UTC.
    updated_at: String,
}

impl From<CaCertificate> for CaBody {
    fn from(c: CaCertificate) -> Self {
        Self {
            id: c.id,
            fingerprint_sha256: c.fingerprint_sha256,
            subject: c.subject,
            not_before: rfc3339(c.not_before_ms),
            not_after: rfc3339(c.not_after_ms),
            description: c.description,
            enabled: c.enabled,
            keep_devices_when_disabled: c.keep_devices_when_disabled,
            jitp: c.jitp.map(|j| JitpOut {
                product_id: j.product_id,
                cohort_id: j.cohort_id.to_string(),
                tags: j.tags,
            }),
            certificate_pem: c.certificate_pem,
            created_at: rfc3339(c.created_at_ms),
            updated_at: rfc3339(c.updated_at_ms),
        }
    }
}

fn valid_description(d: Option<String>) -> Result<Option<String>, ApiError> {
    match d {
        Some(d) if d.chars().count() > MAX_DESCRIPTION => Err(ApiError::unprocessable(
            "invalid_description",
            format!("description must be at most {MAX_DESCRIPTION} characters"),
        )),
        other => Ok(other),
    }
}

/// Checks that the provisioning target exists in the CA's organization and hangs together. A
/// product or cohort of another organization is reported exactly like a missing one.
async fn valid_jitp(
    state: &ApiState,
    org_id: &str,
    body: JitpBody,
) -> Result<JitpSettings, ApiError> {
    let product = state.store.product(&body.product_id).await?;
    if product.is_none_or(|p| p.org_id != org_id) {
        return Err(ApiError::unprocessable(
            "unknown_product",
            format!("product {:?} does not exist", body.product_id),
        ));
    }
    let unknown_cohort = || {
        ApiError::unprocessable(
            "unknown_cohort",
            format!("cohort {:?} does not exist", body.cohort_id),
        )
    };
    let cohort_id = CohortId::parse(&body.cohort_id).map_err(|_| unknown_cohort())?;
    let cohort = state
        .store
        .cohort(cohort_id.as_str())
        .await?
        .ok_or_else(unknown_cohort)?;
    if cohort.product_id != body.product_id {
        return Err(ApiError::unprocessable(
            "cohort_not_in_product",
            format!(
                "cohort {:?} belongs to another product than {:?}",
                body.cohort_id, body.product_id
            ),
        ));
    }
    Ok(JitpSettings {
        product_id: body.product_id,
        cohort_id,
        tags: valid_tags(body.tags)?,
    })
}

/// Registers a manufacturing CA certificate, and makes the running broker trust it.
///
/// The registrant proves it holds the CA's key (as AWS IoT and Peridio ask): get a code from
/// `POST /api/v1/ca-certificates/verification-code`, sign a certificate whose subject CN is
/// that code with the CA's key, and send it as `verification_certificate_pem`. A code is used
/// once. A CA certificate already registered (by any organization) is a 409.
///
/// Role: operator or admin, with a key for the whole organization.
#[utoipa::path(
    post,
    path = "/api/v1/ca-certificates",
    tag = "ca-certificates",
    security(("api_key" = [])),
    request_body = CreateCa,
    responses(
        (status = 201, description = "Registered", body = CaBody),
        (status = 400, description = "`malformed_json` or `invalid_body`", body = ErrorBody),
        (status = 401, description = "No API key, or an unknown or revoked one", body = ErrorBody),
        (status = 403, description = "A viewer key", body = ErrorBody),
        (status = 409, description = "A CA with the same fingerprint is registered", body = ErrorBody),
        (status = 415, description = "The body is not `application/json`", body = ErrorBody),
        (status = 422, description = "`invalid_certificate`, `invalid_description`, `unknown_product`, \
            `unknown_cohort`, `cohort_not_in_product`, `invalid_tags`, `proof_required` or \
            `invalid_proof`", body = ErrorBody),
        (status = 500, description = "`internal`: a store failure, logged", body = ErrorBody),
    ),
)]
pub(super) async fn create_ca(
    Writer(by): Writer,
    State(state): State<ApiState>,
    ApiJson(body): ApiJson<CreateCa>,
) -> Result<(StatusCode, Json<CaBody>), ApiError> {
    access::org_wide(&by)?;
    let cert = parse_ca_pem(&body.certificate_pem)
        .map_err(|e| ApiError::unprocessable("invalid_certificate", e.to_string()))?;
    let description = valid_description(body.description)?;
    let jitp = match body.jitp {
        Some(j) => Some(valid_jitp(&state, &by.org_id, j).await?),
        None => None,
    };
    let code = match (
        &body.verification_certificate_pem,
        state.settings.require_ca_proof,
    ) {
        (None, false) => None,
        (None, true) => {
            return Err(ApiError::unprocessable(
                "proof_required",
                "registering a CA needs verification_certificate_pem: a certificate signed by \
                 the CA whose CN is a code from POST /api/v1/ca-certificates/verification-code",
            ))
        }
        (Some(pem), _) => Some(
            verify_possession(&cert, pem)
                .map_err(|e| ApiError::unprocessable("invalid_proof", e.to_string()))?,
        ),
    };
    let new = NewCa {
        org_id: by.org_id.clone(),
        cert,
        description,
        enabled: body.enabled.unwrap_or(true),
        keep_devices_when_disabled: body.keep_devices_when_disabled.unwrap_or(false),
        jitp,
    };
    let ca = state
        .ops
        .register_ca(new, code.as_deref())
        .await?
        .ok_or_else(|| {
            ApiError::unprocessable(
                "invalid_proof",
                "the verification certificate's CN is not an unused, unexpired \
                 verification code of this organization",
            )
        })?;
    tracing::info!(ca_id = %ca.id, fingerprint = %ca.fingerprint_sha256, subject = %ca.subject,
        by = %by.key_id, "CA certificate registered");
    Ok((StatusCode::CREATED, Json(ca.into())))
}

#[derive(Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(super) struct CaListQuery {
    /// RFC 3339: only CA certificates that expire before this (expired ones included).
    #[serde(default)]
    expires_before: Option<String>,
    /// Page size, 100 by default.
    #[param(minimum = 1, maximum = 1000)]
    #[serde(default)]
    limit: Option<u32>,
    /// `next_cursor` of the previous page.
    #[serde(default)]
    cursor: Option<String>,
}

/// Lists the organization's CA certificates, or those expiring before a time.
///
/// Role: viewer (any valid API key), without a scope.
#[utoipa::path(
    get,
    path = "/api/v1/ca-certificates",
    tag = "ca-certificates",
    security(("api_key" = [])),
    params(CaListQuery),
    responses(
        (status = 200, description = "One page of CA certificates, by id", body = Page<CaBody>),
        (status = 400, description = "`invalid_query`", body = ErrorBody),
        (status = 401, description = "No API key, or an unknown or revoked one", body = ErrorBody),
        (status = 500, description = "`internal`: a store failure, logged", body = ErrorBody),
    ),
)]
pub(super) async fn list_cas(
    Caller(by): Caller,
    State(state): State<ApiState>,
    ApiQuery(q): ApiQuery<CaListQuery>,
) -> Result<Json<Page<CaBody>>, ApiError> {
    access::org_wide(&by)?;
    let page = page_request(q.limit, q.cursor.as_deref())?;
    let before = q
        .expires_before
        .map(|t| super::validate::parse_time("expires_before", &t))
        .transpose()?;
    let rows = state.store.cas(Some(&by.org_id), before, &page).await?;
    Ok(Json(Page::of(rows, &page, |c| &c.id, Into::into)))
}

/// One CA certificate.
///
/// Role: viewer (any valid API key).
#[utoipa::path(
    get,
    path = "/api/v1/ca-certificates/{ca_id}",
    tag = "ca-certificates",
    security(("api_key" = [])),
    params(("ca_id" = String, Path, description = "The CA's id")),
    responses(
        (status = 200, description = "The CA certificate", body = CaBody),
        (status = 400, description = "`invalid_path`", body = ErrorBody),
        (status = 401, description = "No API key, or an unknown or revoked one", body = ErrorBody),
        (status = 404, description = "No such CA certificate", body = ErrorBody),
        (status = 500, description = "`internal`: a store failure, logged", body = ErrorBody),
    ),
)]
pub(super) async fn get_ca(
    Caller(by): Caller,
    State(state): State<ApiState>,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<CaBody>, ApiError> {
    let ca = access::ca(&state, &by, &id).await?;
    Ok(Json(ca.into()))
}

/// Changes a CA certificate (enabled, description, provisioning), and pushes the change to the
/// running broker.
///
/// Role: operator or admin.
#[utoipa::path(
    patch,
    path = "/api/v1/ca-certificates/{ca_id}",
    tag = "ca-certificates",
    security(("api_key" = [])),
    params(("ca_id" = String, Path, description = "The CA's id")),
    request_body = PatchCa,
    responses(
        (status = 200, description = "The changed CA certificate", body = CaBody),
        (status = 400, description = "`invalid_path`, `malformed_json` or `invalid_body`", body = ErrorBody),
        (status = 401, description = "No API key, or an unknown or revoked one", body = ErrorBody),
        (status = 403, description = "A viewer key", body = ErrorBody),
        (status = 404, description = "No such CA certificate", body = ErrorBody),
        (status = 415, description = "The body is not `application/json`", body = ErrorBody),
        (status = 422, description = "`invalid_description`, `unknown_product`, `unknown_cohort`, \
            `cohort_not_in_product` or `invalid_tags`", body = ErrorBody),
        (status = 500, description = "`internal`: a store failure, logged", body = ErrorBody),
    ),
)]
pub(super) async fn update_ca(
    Writer(by): Writer,
    State(state): State<ApiState>,
    ApiPath(id): ApiPath<String>,
    ApiJson(body): ApiJson<PatchCa>,
) -> Result<Json<CaBody>, ApiError> {
    access::ca(&state, &by, &id).await?;
    let jitp = match body.jitp {
        Some(Some(j)) => Some(Some(valid_jitp(&state, &by.org_id, j).await?)),
        Some(None) => Some(None),
        None => None,
    };
    let update = CaUpdate {
        enabled: body.enabled,
        keep_devices_when_disabled: body.keep_devices_when_disabled,
        description: body.description.map(valid_description).transpose()?,
        jitp,
    };
    let ca = state
        .ops
        .update_ca(&id, &update)
        .await?
        .ok_or_else(|| ApiError::not_found("CA certificate"))?;
    tracing::info!(ca_id = %ca.id, enabled = ca.enabled, by = %by.key_id,
        "CA certificate updated");
    Ok(Json(ca.into()))
}

/// Deletes a CA certificate: every broker stops trusting it at once (a handshake with a
/// certificate it signed fails from then on). The devices it provisioned (or whose first
/// certificate it signed) must be deleted first: they name it as theirs, and without it they
/// would be admitted with a certificate of any CA of the organization. To keep them while
/// refusing new ones, disable the CA instead (`PATCH` with `enabled: false`).
///
/// Role: operator or admin, with a key for the whole organization.
#[utoipa::path(
    delete,
    path = "/api/v1/ca-certificates/{ca_id}",
    tag = "ca-certificates",
    security(("api_key" = [])),
    params(("ca_id" = String, Path, description = "The CA's id")),
    responses(
        (status = 204, description = "Deleted, and no longer trusted"),
        (status = 400, description = "`invalid_path`", body = ErrorBody),
        (status = 401, description = "No API key, or an unknown or revoked one", body = ErrorBody),
        (status = 403, description = "A viewer key, or a scoped one", body = ErrorBody),
        (status = 404, description = "No such CA certificate", body = ErrorBody),
        (status = 409, description = "`in_use`: devices of the CA remain", body = ErrorBody),
        (status = 500, description = "`internal`: a store failure, logged", body = ErrorBody),
    ),
)]
pub(super) async fn delete_ca(
    Writer(by): Writer,
    State(state): State<ApiState>,
    ApiPath(id): ApiPath<String>,
) -> Result<StatusCode, ApiError> {
    let ca = access::ca(&state, &by, &id).await?;
    match state.ops.delete_ca(&by.org_id, &ca.id).await? {
        Deletion::Deleted(()) => {}
        Deletion::NotFound => return Err(ApiError::not_found("CA certificate")),
        Deletion::InUse(d) => {
            return Err(ApiError::in_use(
                "CA certificate",
                &d,
                &format!("ca_id={}", ca.id),
            ))
        }
    }
    tracing::info!(ca_id = %ca.id, fingerprint = %ca.fingerprint_sha256, by = %by.key_id,
        "CA certificate deleted");
    Ok(StatusCode::NO_CONTENT)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn tag_rules() {
        let ok = |v: serde_json::Value| valid_tags(v.as_object().unwrap().clone()).is_ok();
        assert!(ok(json!({})));
        assert!(ok(json!({"site": "eu-1", "line": "a:b"})));
        assert!(!ok(json!({"": "x"})));
        assert!(!ok(json!({"a:b": "x"})));
        assert!(!ok(json!({"k": ""})));
        assert!(!ok(json!({"k": 1})));
        assert!(!ok(json!({"k": null})));
        assert!(!ok(json!({"k": "a\nb"})));
    }

    #[test]
    fn patch_tells_absent_from_null() {
        let p: PatchCa = serde_json::from_str("{}").unwrap();
        assert!(p.jitp.is_none() && p.description.is_none());
        let p: PatchCa = serde_json::from_str(r#"{"jitp":null,"description":null}"#).unwrap();
        assert!(matches!(p.jitp, Some(None)));
        assert!(matches!(p.description, Some(None)));
    }
}

/// A verification code for proof of possession.
#[derive(Serialize, ToSchema)]
pub(super) struct VerificationCodeBody {
    /// Put this as the subject CN of a certificate signed by the CA to register.
    code: String,
    /// RFC 3339, UTC: the code is refused after this.
    expires_at: String,
}

/// Issues a verification code for registering a CA with proof of possession of its key.
///
/// Role: operator or admin, with a key for the whole organization.
#[utoipa::path(
    post,
    path = "/api/v1/ca-certificates/verification-code",
    tag = "ca-certificates",
    security(("api_key" = [])),
    responses(
        (status = 201, description = "A fresh code, usable once until `expires_at`", body = VerificationCodeBody),
        (status = 401, description = "No API key, or an unknown or revoked one", body = ErrorBody),
        (status = 403, description = "A viewer key, or a scoped one", body = ErrorBody),
        (status = 500, description = "`internal`: a store failure, logged", body = ErrorBody),
    ),
)]
pub(super) async fn verification_code(
    Writer(by): Writer,
    State(state): State<ApiState>,
) -> Result<(StatusCode, Json<VerificationCodeBody>), ApiError> {
    access::org_wide(&by)?;
    let code = state
        .ops
        .issue_verification_code(&by.org_id, state.settings.verification_code_ttl_ms)
        .await?;
    Ok((
        StatusCode::CREATED,
        Json(VerificationCodeBody {
            code: code.code,
            expires_at: rfc3339(code.expires_at_ms),
        }),
    ))
}

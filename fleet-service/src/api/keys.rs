//! API keys, for admins. A secret is returned once, by the create call.

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use broker::auth::{Scope, ServiceRole};
use serde::Deserialize;
use utoipa::ToSchema;

use super::auth::Admin;
use super::bodies::KeyBody;
use super::error::ErrorBody;
use super::extract::{ApiJson, ApiPath, ApiQuery};
use super::paging::{Page, PageParams};
use super::{access, ApiError, ApiState};

/// An API key to issue.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(as = CreateApiKey)]
pub(super) struct CreateKey {
    /// 1 to 200 characters after trimming, no control characters.
    #[schema(min_length = 1, max_length = 200)]
    name: String,
    #[schema(value_type = super::openapi::ApiKeyRole)]
    role: String,
    /// Narrows the key to one product of the organization (and its cohorts and devices).
    #[serde(default)]
    product_id: Option<String>,
    /// Narrows the key further, to one cohort of `product_id` (which is then required).
    #[serde(default)]
    cohort_id: Option<String>,
}

/// Issues an API key. Its secret is in this answer only; the service keeps a hash.
///
/// Role: admin.
#[utoipa::path(
    post,
    path = "/api/v1/api-keys",
    tag = "api-keys",
    security(("api_key" = [])),
    request_body = CreateKey,
    responses(
        (status = 201, description = "Issued; `secret` is the bearer token", body = KeyBody),
        (status = 400, description = "`malformed_json` or `invalid_body`", body = ErrorBody),
        (status = 401, description = "No API key, or an unknown or revoked one", body = ErrorBody),
        (status = 403, description = "Not an admin key", body = ErrorBody),
        (status = 409, description = "The generated id or secret is taken (retry)", body = ErrorBody),
        (status = 415, description = "The body is not `application/json`", body = ErrorBody),
        (status = 422, description = "`invalid_role` or `invalid_name`", body = ErrorBody),
        (status = 500, description = "`internal`: a store failure, logged", body = ErrorBody),
    ),
)]
pub(super) async fn create_key(
    Admin(admin): Admin,
    State(state): State<ApiState>,
    ApiJson(body): ApiJson<CreateKey>,
) -> Result<(StatusCode, Json<KeyBody>), ApiError> {
    access::org_wide(&admin)?;
    let role = ServiceRole::parse(&body.role).ok_or_else(|| {
        ApiError::unprocessable("invalid_role", "role must be admin, operator or viewer")
    })?;
    let scope = key_scope(&state, &admin.org_id, body.product_id, body.cohort_id).await?;
    let created = state
        .ops
        .create_api_key(&admin.org_id, &body.name, role, scope)
        .await?;
    tracing::info!(key_id = %created.record.id, by = %admin.key_id, "API key issued over REST");
    let mut out = KeyBody::from(created.record);
    out.secret = Some(created.secret);
    Ok((StatusCode::CREATED, Json(out)))
}

/// Lists every API key, revoked ones too, without secrets.
///
/// Role: admin.
#[utoipa::path(
    get,
    path = "/api/v1/api-keys",
    tag = "api-keys",
    security(("api_key" = [])),
    params(PageParams),
    responses(
        (status = 200, description = "One page of API keys, by id", body = Page<KeyBody>),
        (status = 400, description = "`invalid_query`", body = ErrorBody),
        (status = 401, description = "No API key, or an unknown or revoked one", body = ErrorBody),
        (status = 403, description = "Not an admin key", body = ErrorBody),
        (status = 500, description = "`internal`: a store failure, logged", body = ErrorBody),
    ),
)]
pub(super) async fn list_keys(
    Admin(admin): Admin,
    State(state): State<ApiState>,
    ApiQuery(q): ApiQuery<PageParams>,
) -> Result<Json<Page<KeyBody>>, ApiError> {
    access::org_wide(&admin)?;
    let page = q.request()?;
    let rows = state.ops.keys().list(&admin.org_id, &page).await?;
    Ok(Json(Page::of(rows, &page, |k| &k.id, Into::into)))
}

/// Revokes an API key; requests with it are refused from now on, and its live MQTT service
/// sessions are ended.
///
/// Role: admin.
#[utoipa::path(
    delete,
    path = "/api/v1/api-keys/{key_id}",
    tag = "api-keys",
    security(("api_key" = [])),
    params(("key_id" = String, Path, description = "The API key's id")),
    responses(
        (status = 200, description = "The revoked key", body = KeyBody),
        (status = 400, description = "`invalid_path`", body = ErrorBody),
        (status = 401, description = "No API key, or an unknown or revoked one", body = ErrorBody),
        (status = 403, description = "Not an admin key", body = ErrorBody),
        (status = 404, description = "No such API key", body = ErrorBody),
        (status = 500, description = "`internal`: a store failure, logged", body = ErrorBody),
    ),
)]
pub(super) async fn revoke_key(
    Admin(admin): Admin,
    State(state): State<ApiState>,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<KeyBody>, ApiError> {
    access::org_wide(&admin)?;
    let (key, applied) = state
        .ops
        .revoke_api_key(&admin.org_id, &id)
        .await?
        .ok_or_else(|| ApiError::not_found("API key"))?;
    tracing::info!(key_id = %key.id, by = %admin.key_id, sessions_ended = ?applied.sessions_ended,
        "API key revoked over REST");
    Ok(Json(key.into()))
}

/// The scope a new key asks for, checked against the organization: a product or cohort of
/// another organization is reported exactly like a missing one.
async fn key_scope(
    state: &ApiState,
    org_id: &str,
    product_id: Option<String>,
    cohort_id: Option<String>,
) -> Result<Scope, ApiError> {
    let unknown = |what: &str, id: &str| {
        ApiError::unprocessable("invalid_scope", format!("{what} {id:?} does not exist"))
    };
    match (product_id, cohort_id) {
        (None, None) => Ok(Scope::Org),
        (None, Some(_)) => Err(ApiError::unprocessable(
            "invalid_scope",
            "a cohort scope needs the cohort's product_id too",
        )),
        (Some(product_id), cohort_id) => {
            let product = state.store.product(&product_id).await?;
            if product.is_none_or(|p| p.org_id != org_id) {
                return Err(unknown("product", &product_id));
            }
            let Some(cohort_id) = cohort_id else {
                return Ok(Scope::Product { product_id });
            };
            match state.store.cohort(&cohort_id).await? {
                Some(c) if c.product_id == product_id => Ok(Scope::Cohort {
                    product_id,
                    cohort_id,
                }),
                _ => Err(unknown("cohort of that product", &cohort_id)),
            }
        }
    }
}

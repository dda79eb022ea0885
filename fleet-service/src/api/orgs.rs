//! Organizations. The platform admin (an unscoped admin key of the `default` organization)
//! creates and deletes them; each comes with its first admin key, whose secret is in that answer only.
//! Every other key sees its own organization alone.

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::auth::{Admin, Caller};
use super::bodies::KeyBody;
use super::error::ErrorBody;
use super::extract::{ApiJson, ApiPath, ApiQuery};
use super::paging::{Page, PageParams};
use super::validate::valid_name;
use super::{rfc3339, ApiError, ApiState};
use crate::store::{Deletion, Organization};

#[derive(Serialize, ToSchema)]
#[schema(as = OrganizationBody)]
pub(super) struct OrgBody {
    id: String,
    name: String,
    /// RFC 3339, UTC.
    created_at: String,
}

impl From<Organization> for OrgBody {
    fn from(o: Organization) -> Self {
        Self {
            id: o.id,
            name: o.name,
            created_at: rfc3339(o.created_at_ms),
        }
    }
}

/// A new organization and its first admin key.
#[derive(Serialize, ToSchema)]
pub(super) struct CreatedOrg {
    organization: OrgBody,
    /// An admin key of the new organization; `secret` is shown here only.
    admin_key: KeyBody,
}

/// The name of a new organization.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct CreateOrg {
    /// 1 to 200 characters after trimming, no control characters; unique.
    #[schema(min_length = 1, max_length = 200)]
    name: String,
}

/// Creates an organization, with a first admin key for it.
///
/// Role: admin, and the platform admin: an admin key of the `default` organization without a
/// scope.
#[utoipa::path(
    post,
    path = "/api/v1/organizations",
    tag = "organizations",
    security(("api_key" = [])),
    request_body = CreateOrg,
    responses(
        (status = 201, description = "Created; `admin_key.secret` is the new organization's admin token", body = CreatedOrg),
        (status = 400, description = "`malformed_json` or `invalid_body`", body = ErrorBody),
        (status = 401, description = "No API key, or an unknown or revoked one", body = ErrorBody),
        (status = 403, description = "Not the platform admin", body = ErrorBody),
        (status = 409, description = "An organization of that name exists", body = ErrorBody),
        (status = 415, description = "The body is not `application/json`", body = ErrorBody),
        (status = 422, description = "`invalid_name`", body = ErrorBody),
        (status = 500, description = "`internal`: a store failure, logged", body = ErrorBody),
    ),
)]
pub(super) async fn create_org(
    Admin(by): Admin,
    State(state): State<ApiState>,
    ApiJson(body): ApiJson<CreateOrg>,
) -> Result<(StatusCode, Json<CreatedOrg>), ApiError> {
    if !by.platform_admin() {
        return Err(ApiError::forbidden(
            "only the platform admin (an unscoped admin key of the default organization) \
             creates organizations",
        ));
    }
    let name = valid_name(&body.name)?;
    let (org, created) = state.ops.create_org(name).await?;
    tracing::info!(org_id = %org.id, name = %org.name, by = %by.key_id, "organization created");
    let mut admin_key = KeyBody::from(created.record);
    admin_key.secret = Some(created.secret);
    Ok((
        StatusCode::CREATED,
        Json(CreatedOrg {
            organization: org.into(),
            admin_key,
        }),
    ))
}

/// Lists organizations: every one for the platform admin, the key's own for anyone else.
///
/// Role: viewer (any valid API key).
#[utoipa::path(
    get,
    path = "/api/v1/organizations",
    tag = "organizations",
    security(("api_key" = [])),
    params(PageParams),
    responses(
        (status = 200, description = "One page of the organizations the key may see, by id", body = Page<OrgBody>),
        (status = 400, description = "`invalid_query`", body = ErrorBody),
        (status = 401, description = "No API key, or an unknown or revoked one", body = ErrorBody),
        (status = 500, description = "`internal`: a store failure, logged", body = ErrorBody),
    ),
)]
pub(super) async fn list_orgs(
    Caller(by): Caller,
    State(state): State<ApiState>,
    ApiQuery(q): ApiQuery<PageParams>,
) -> Result<Json<Page<OrgBody>>, ApiError> {
    let page = q.request()?;
    let only = (!by.platform_admin()).then_some(by.org_id.as_str());
    let rows = state.store.orgs(only, &page).await?;
    Ok(Json(Page::of(rows, &page, |o| &o.id, Into::into)))
}

/// One organization: the key's own, or any for the platform admin.
///
/// Role: viewer (any valid API key).
#[utoipa::path(
    get,
    path = "/api/v1/organizations/{org_id}",
    tag = "organizations",
    security(("api_key" = [])),
    params(("org_id" = String, Path, description = "The organization's id")),
    responses(
        (status = 200, description = "The organization", body = OrgBody),
        (status = 400, description = "`invalid_path`", body = ErrorBody),
        (status = 401, description = "No API key, or an unknown or revoked one", body = ErrorBody),
        (status = 404, description = "No such organization (or not the key's)", body = ErrorBody),
        (status = 500, description = "`internal`: a store failure, logged", body = ErrorBody),
    ),
)]
pub(super) async fn get_org(
    Caller(by): Caller,
    State(state): State<ApiState>,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<OrgBody>, ApiError> {
    if id != by.org_id && !by.platform_admin() {
        return Err(ApiError::not_found("organization"));
    }
    let org = state
        .store
        .org(&id)
        .await?
        .ok_or_else(|| ApiError::not_found("organization"))?;
    Ok(Json(org.into()))
}

/// Deletes an organization. It must hold no products and no CA certificates (delete them
/// first); its API keys (their live MQTT sessions end), signing keys and verification codes
/// go with it. Its audit log stays until the retention removes it. The `default`
/// organization, which holds the platform admin, cannot be deleted.
///
/// Role: admin, and the platform admin: an admin key of the `default` organization without a
/// scope.
#[utoipa::path(
    delete,
    path = "/api/v1/organizations/{org_id}",
    tag = "organizations",
    security(("api_key" = [])),
    params(("org_id" = String, Path, description = "The organization's id")),
    responses(
        (status = 204, description = "Deleted"),
        (status = 400, description = "`invalid_path`", body = ErrorBody),
        (status = 401, description = "No API key, or an unknown or revoked one", body = ErrorBody),
        (status = 403, description = "Not the platform admin", body = ErrorBody),
        (status = 404, description = "No such organization", body = ErrorBody),
        (status = 409, description = "`in_use`: products or CA certificates remain; or the `default` organization", body = ErrorBody),
        (status = 500, description = "`internal`: a store failure, logged", body = ErrorBody),
    ),
)]
pub(super) async fn delete_org(
    Admin(by): Admin,
    State(state): State<ApiState>,
    ApiPath(id): ApiPath<String>,
) -> Result<StatusCode, ApiError> {
    if !by.platform_admin() {
        return Err(ApiError::forbidden(
            "only the platform admin (an unscoped admin key of the default organization) \
             deletes organizations",
        ));
    }
    if id == broker::auth::DEFAULT_ORG {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "in_use",
            "the default organization holds the platform admin and cannot be deleted",
        ));
    }
    match state.ops.delete_org(&id).await? {
        Deletion::Deleted(()) => {}
        Deletion::NotFound => return Err(ApiError::not_found("organization")),
        // Its devices belong to its products: deleting those comes first anyway.
        Deletion::InUse(d) => return Err(ApiError::in_use("organization", &d, "")),
    }
    tracing::info!(org_id = %id, by = %by.key_id, "organization deleted");
    Ok(StatusCode::NO_CONTENT)
}

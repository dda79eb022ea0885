//! Products and cohorts: created, listed, and deleted once nothing depends on them.

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::auth::{Caller, Writer};
use super::error::ErrorBody;
use super::extract::{ApiJson, ApiPath, ApiQuery};
use super::paging::{Page, PageParams};
use super::validate::valid_name;
use super::{access, rfc3339, ApiError, ApiState};
use crate::store::{Cohort, Deletion, Product};
use fleet_wire::CohortId;

/// A product or cohort to create.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct CreateNamed {
    /// 1 to 200 characters after trimming, no control characters.
    #[schema(example = "thermostat", min_length = 1, max_length = 200)]
    name: String,
}

#[derive(Serialize, ToSchema)]
pub(super) struct ProductBody {
    id: String,
    name: String,
    /// RFC 3339, UTC.
    created_at: String,
}

impl From<Product> for ProductBody {
    fn from(p: Product) -> Self {
        Self {
            id: p.id,
            name: p.name,
            created_at: rfc3339(p.created_at_ms),
        }
    }
}

#[derive(Serialize, ToSchema)]
pub(super) struct CohortBody {
    id: String,
    name: String,
    product_id: String,
    /// RFC 3339, UTC.
    created_at: String,
}

impl From<Cohort> for CohortBody {
    fn from(c: Cohort) -> Self {
        Self {
            id: c.id,
            name: c.name,
            product_id: c.product_id,
            created_at: rfc3339(c.created_at_ms),
        }
    }
}

/// Creates a product.
///
/// Role: operator or admin.
#[utoipa::path(
    post,
    path = "/api/v1/products",
    tag = "catalog",
    security(("api_key" = [])),
    request_body = CreateNamed,
    responses(
        (status = 201, description = "Created", body = ProductBody),
        (status = 400, description = "`malformed_json` or `invalid_body`", body = ErrorBody),
        (status = 401, description = "No API key, or an unknown or revoked one", body = ErrorBody),
        (status = 403, description = "A viewer key", body = ErrorBody),
        (status = 409, description = "A product of that name exists", body = ErrorBody),
        (status = 415, description = "The body is not `application/json`", body = ErrorBody),
        (status = 422, description = "`invalid_name`", body = ErrorBody),
        (status = 500, description = "`internal`: a store failure, logged", body = ErrorBody),
    ),
)]
pub(super) async fn create_product(
    Writer(by): Writer,
    State(state): State<ApiState>,
    ApiJson(body): ApiJson<CreateNamed>,
) -> Result<(StatusCode, Json<ProductBody>), ApiError> {
    access::org_wide(&by)?;
    let name = valid_name(&body.name)?;
    let product = state.ops.create_product(&by.org_id, name).await?;
    tracing::info!(product_id = %product.id, name = %product.name, by = %by.key_id,
        "product created");
    Ok((StatusCode::CREATED, Json(product.into())))
}

/// Lists every product.
///
/// Role: viewer (any valid API key).
#[utoipa::path(
    get,
    path = "/api/v1/products",
    tag = "catalog",
    security(("api_key" = [])),
    params(PageParams),
    responses(
        (status = 200, description = "One page of products, by id", body = Page<ProductBody>),
        (status = 400, description = "`invalid_query`", body = ErrorBody),
        (status = 401, description = "No API key, or an unknown or revoked one", body = ErrorBody),
        (status = 500, description = "`internal`: a store failure, logged", body = ErrorBody),
    ),
)]
pub(super) async fn list_products(
    Caller(by): Caller,
    State(state): State<ApiState>,
    ApiQuery(q): ApiQuery<PageParams>,
) -> Result<Json<Page<ProductBody>>, ApiError> {
    let page = q.request()?;
    let (scope_product, _) = access::scope_filter(&by);
    let rows = state
        .store
        .products(&by.org_id, scope_product, &page)
        .await?;
    Ok(Json(Page::of(rows, &page, |p| &p.id, Into::into)))
}

/// One product.
///
/// Role: viewer (any valid API key).
#[utoipa::path(
    get,
    path = "/api/v1/products/{product_id}",
    tag = "catalog",
    security(("api_key" = [])),
    params(("product_id" = String, Path, description = "The product's id")),
    responses(
        (status = 200, description = "The product", body = ProductBody),
        (status = 400, description = "`invalid_path`", body = ErrorBody),
        (status = 401, description = "No API key, or an unknown or revoked one", body = ErrorBody),
        (status = 404, description = "No such product", body = ErrorBody),
        (status = 500, description = "`internal`: a store failure, logged", body = ErrorBody),
    ),
)]
pub(super) async fn get_product(
    Caller(by): Caller,
    State(state): State<ApiState>,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<ProductBody>, ApiError> {
    let product = access::product(&state, &by, &id).await?;
    Ok(Json(product.into()))
}

/// Creates a cohort of a product.
///
/// Role: operator or admin.
#[utoipa::path(
    post,
    path = "/api/v1/products/{product_id}/cohorts",
    tag = "catalog",
    security(("api_key" = [])),
    params(("product_id" = String, Path, description = "The product's id")),
    request_body = CreateNamed,
    responses(
        (status = 201, description = "Created", body = CohortBody),
        (status = 400, description = "`invalid_path`, `malformed_json` or `invalid_body`", body = ErrorBody),
        (status = 401, description = "No API key, or an unknown or revoked one", body = ErrorBody),
        (status = 403, description = "A viewer key", body = ErrorBody),
        (status = 404, description = "No such product", body = ErrorBody),
        (status = 409, description = "The product has a cohort of that name", body = ErrorBody),
        (status = 415, description = "The body is not `application/json`", body = ErrorBody),
        (status = 422, description = "`invalid_name`", body = ErrorBody),
        (status = 500, description = "`internal`: a store failure, logged", body = ErrorBody),
    ),
)]
pub(super) async fn create_cohort(
    Writer(by): Writer,
    State(state): State<ApiState>,
    ApiPath(product_id): ApiPath<String>,
    ApiJson(body): ApiJson<CreateNamed>,
) -> Result<(StatusCode, Json<CohortBody>), ApiError> {
    let product = access::product(&state, &by, &product_id).await?;
    if !by.covers_product(&product.org_id, &product.id) {
        return Err(ApiError::forbidden(
            "a cohort-scoped key may not create cohorts",
        ));
    }
    let name = valid_name(&body.name)?;
    let cohort = state.ops.create_cohort(&product, name).await?;
    tracing::info!(cohort_id = %cohort.id, product_id = %product_id, name = %cohort.name,
        by = %by.key_id, "cohort created");
    Ok((StatusCode::CREATED, Json(cohort.into())))
}

/// Lists a product's cohorts.
///
/// Role: viewer (any valid API key).
#[utoipa::path(
    get,
    path = "/api/v1/products/{product_id}/cohorts",
    tag = "catalog",
    security(("api_key" = [])),
    params(("product_id" = String, Path, description = "The product's id"), PageParams),
    responses(
        (status = 200, description = "One page of the product's cohorts, oldest first", body = Page<CohortBody>),
        (status = 400, description = "`invalid_path` or `invalid_query`", body = ErrorBody),
        (status = 401, description = "No API key, or an unknown or revoked one", body = ErrorBody),
        (status = 404, description = "No such product", body = ErrorBody),
        (status = 500, description = "`internal`: a store failure, logged", body = ErrorBody),
    ),
)]
pub(super) async fn list_cohorts(
    Caller(by): Caller,
    State(state): State<ApiState>,
    ApiPath(product_id): ApiPath<String>,
    ApiQuery(q): ApiQuery<PageParams>,
) -> Result<Json<Page<CohortBody>>, ApiError> {
    let page = q.request()?;
    access::product(&state, &by, &product_id).await?;
    let (_, scope_cohort) = access::scope_filter(&by);
    let rows = state
        .store
        .cohorts_page(&product_id, scope_cohort, &page)
        .await?;
    Ok(Json(Page::of(rows, &page, |c| &c.id, Into::into)))
}

/// One cohort.
///
/// Role: viewer (any valid API key).
#[utoipa::path(
    get,
    path = "/api/v1/cohorts/{cohort_id}",
    tag = "catalog",
    security(("api_key" = [])),
    params(("cohort_id" = String, Path, description = "The cohort's id")),
    responses(
        (status = 200, description = "The cohort", body = CohortBody),
        (status = 400, description = "`invalid_path`", body = ErrorBody),
        (status = 401, description = "No API key, or an unknown or revoked one", body = ErrorBody),
        (status = 404, description = "No such cohort", body = ErrorBody),
        (status = 500, description = "`internal`: a store failure, logged", body = ErrorBody),
    ),
)]
pub(super) async fn get_cohort(
    Caller(by): Caller,
    State(state): State<ApiState>,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<CohortBody>, ApiError> {
    let cohort = access::cohort(&state, &by, &id).await?;
    Ok(Json(cohort.into()))
}

/// Deletes a product and its releases. Everything else of it must be gone first: its cohorts,
/// its devices, and unrevoked API keys scoped to it (a 409 `in_use` says which remain).
///
/// Role: operator or admin, with a key for the whole organization.
#[utoipa::path(
    delete,
    path = "/api/v1/products/{product_id}",
    tag = "catalog",
    security(("api_key" = [])),
    params(("product_id" = String, Path, description = "The product's id")),
    responses(
        (status = 204, description = "Deleted"),
        (status = 400, description = "`invalid_path`", body = ErrorBody),
        (status = 401, description = "No API key, or an unknown or revoked one", body = ErrorBody),
        (status = 403, description = "A viewer key, or a scoped one", body = ErrorBody),
        (status = 404, description = "No such product", body = ErrorBody),
        (status = 409, description = "`in_use`: cohorts, devices or API keys scoped to it remain", body = ErrorBody),
        (status = 500, description = "`internal`: a store failure, logged", body = ErrorBody),
    ),
)]
pub(super) async fn delete_product(
    Writer(by): Writer,
    State(state): State<ApiState>,
    ApiPath(id): ApiPath<String>,
) -> Result<StatusCode, ApiError> {
    access::org_wide(&by)?;
    let product = access::product(&state, &by, &id).await?;
    match state.ops.delete_product(&by.org_id, &product.id).await? {
        Deletion::Deleted(()) => {}
        Deletion::NotFound => return Err(ApiError::not_found("product")),
        Deletion::InUse(d) => {
            return Err(ApiError::in_use(
                "product",
                &d,
                &format!("product_id={}", product.id),
            ))
        }
    }
    tracing::info!(product_id = %product.id, by = %by.key_id, "product deleted");
    Ok(StatusCode::NO_CONTENT)
}

/// Deletes a cohort, with its finished deployments and the commands sent to it. It must be
/// empty: no devices (delete or move them), no CA provisioning into it, no active or paused
/// deployment, no unrevoked API key scoped to it (a 409 `in_use` says which remain).
///
/// Role: operator or admin, with a key that covers the cohort's product.
#[utoipa::path(
    delete,
    path = "/api/v1/cohorts/{cohort_id}",
    tag = "catalog",
    security(("api_key" = [])),
    params(("cohort_id" = String, Path, description = "The cohort's id")),
    responses(
        (status = 204, description = "Deleted"),
        (status = 400, description = "`invalid_path`", body = ErrorBody),
        (status = 401, description = "No API key, or an unknown or revoked one", body = ErrorBody),
        (status = 403, description = "A viewer key, or a cohort-scoped key", body = ErrorBody),
        (status = 404, description = "No such cohort", body = ErrorBody),
        (status = 409, description = "`in_use`: devices, provisioning CAs, a live deployment or API keys scoped to it remain", body = ErrorBody),
        (status = 500, description = "`internal`: a store failure, logged", body = ErrorBody),
    ),
)]
pub(super) async fn delete_cohort(
    Writer(by): Writer,
    State(state): State<ApiState>,
    ApiPath(id): ApiPath<String>,
) -> Result<StatusCode, ApiError> {
    let cohort = access::cohort(&state, &by, &id).await?;
    if !by.covers_product(&cohort.org_id, &cohort.product_id) {
        return Err(ApiError::forbidden(
            "a cohort-scoped key may not delete cohorts",
        ));
    }
    let cohort_id = CohortId::parse(&cohort.id).map_err(|_| ApiError::not_found("cohort"))?;
    match state.ops.delete_cohort(&cohort_id).await? {
        Deletion::Deleted(()) => {}
        Deletion::NotFound => return Err(ApiError::not_found("cohort")),
        Deletion::InUse(d) => {
            return Err(ApiError::in_use(
                "cohort",
                &d,
                &format!("cohort_id={}", cohort.id),
            ))
        }
    }
    tracing::info!(cohort_id = %cohort.id, by = %by.key_id, "cohort deleted");
    Ok(StatusCode::NO_CONTENT)
}

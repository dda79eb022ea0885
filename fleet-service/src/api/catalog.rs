//! Products and cohorts.

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::auth::{Caller, Writer};
use super::error::{ApiJson, ApiPath, ErrorBody};
use super::{rfc3339, valid_name, ApiError, ApiState};
use crate::store::{Cohort, Product};

/// A product or cohort to create.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct CreateNamed {
    /// 1 to 200 characters after trimming, no control characters.
    #[schema(example = "thermostat")]
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

/// A whole list, unpaginated.
#[derive(Serialize, ToSchema)]
pub(super) struct Items<T> {
    pub(super) items: Vec<T>,
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
    let name = valid_name(&body.name)?;
    let product = state.store.create_product(name).await?;
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
    responses(
        (status = 200, description = "Every product", body = Items<ProductBody>),
        (status = 401, description = "No API key, or an unknown or revoked one", body = ErrorBody),
        (status = 500, description = "`internal`: a store failure, logged", body = ErrorBody),
    ),
)]
pub(super) async fn list_products(
    _: Caller,
    State(state): State<ApiState>,
) -> Result<Json<Items<ProductBody>>, ApiError> {
    let items = state.store.products().await?;
    Ok(Json(Items {
        items: items.into_iter().map(Into::into).collect(),
    }))
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
    _: Caller,
    State(state): State<ApiState>,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<ProductBody>, ApiError> {
    let product = state
        .store
        .product(&id)
        .await?
        .ok_or_else(|| ApiError::not_found("product"))?;
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
    if state.store.product(&product_id).await?.is_none() {
        return Err(ApiError::not_found("product"));
    }
    let name = valid_name(&body.name)?;
    let cohort = state.store.create_cohort(&product_id, name).await?;
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
    params(("product_id" = String, Path, description = "The product's id")),
    responses(
        (status = 200, description = "The product's cohorts", body = Items<CohortBody>),
        (status = 400, description = "`invalid_path`", body = ErrorBody),
        (status = 401, description = "No API key, or an unknown or revoked one", body = ErrorBody),
        (status = 404, description = "No such product", body = ErrorBody),
        (status = 500, description = "`internal`: a store failure, logged", body = ErrorBody),
    ),
)]
pub(super) async fn list_cohorts(
    _: Caller,
    State(state): State<ApiState>,
    ApiPath(product_id): ApiPath<String>,
) -> Result<Json<Items<CohortBody>>, ApiError> {
    if state.store.product(&product_id).await?.is_none() {
        return Err(ApiError::not_found("product"));
    }
    let items = state.store.cohorts_of(&product_id).await?;
    Ok(Json(Items {
        items: items.into_iter().map(Into::into).collect(),
    }))
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
    _: Caller,
    State(state): State<ApiState>,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<CohortBody>, ApiError> {
    let cohort = state
        .store
        .cohort(&id)
        .await?
        .ok_or_else(|| ApiError::not_found("cohort"))?;
    Ok(Json(cohort.into()))
}

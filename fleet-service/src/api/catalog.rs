//! Products and cohorts.

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use serde::{Deserialize, Serialize};

use super::auth::{Caller, Writer};
use super::error::{ApiJson, ApiPath};
use super::{rfc3339, valid_name, ApiError, ApiState};
use crate::store::{Cohort, Product};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct CreateNamed {
    name: String,
}

#[derive(Serialize)]
pub(super) struct ProductBody {
    id: String,
    name: String,
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

#[derive(Serialize)]
pub(super) struct CohortBody {
    id: String,
    name: String,
    product_id: String,
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

#[derive(Serialize)]
pub(super) struct Items<T> {
    pub(super) items: Vec<T>,
}

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

pub(super) async fn list_products(
    _: Caller,
    State(state): State<ApiState>,
) -> Result<Json<Items<ProductBody>>, ApiError> {
    let items = state.store.products().await?;
    Ok(Json(Items {
        items: items.into_iter().map(Into::into).collect(),
    }))
}

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

//! The REST bridge for operators: JSON over HTTP under `/api/v1`.
//!
//! Every route but `/api/v1/health` wants `Authorization: Bearer <api key>`. Viewers may read;
//! operators and admins may also change products, cohorts and CAs; only admins manage API
//! keys. Every error, including axum's own rejections, has the shape
//! `{"error":{"code":"...","message":"..."}}`.
//!
//! # Layout
//! - `error`: [`ApiError`], and the JSON/query/path extractors that answer in its shape.
//! - `auth`: the bearer-token extractors.
//! - `catalog`, `cas`, `devices`, `keys`: one module per resource.
//! - `updates`: signing keys, releases, deployments (create, pause, resume, cancel, rollback,
//!   promote) and per-device executions.
//!
//! # Invariants
//! - Database error text never reaches a client: it is logged, and the client gets a 500 with
//!   code `internal`.
//! - A change to a CA is written to the store first, then pushed to the running broker, so the
//!   broker never trusts something the database does not hold.

mod auth;
mod cas;
mod catalog;
mod devices;
mod error;
mod keys;
mod updates;

use axum::routing::{delete, get, post};
use axum::{Json, Router};
use broker::BrokerControl;

pub use error::ApiError;

use crate::keys::ApiKeys;
use crate::rollout::Rollouts;
use crate::store::Store;

/// What every handler gets.
#[derive(Clone)]
pub struct ApiState {
    pub store: Store,
    pub keys: ApiKeys,
    pub control: BrokerControl,
    pub rollouts: Rollouts,
}

impl ApiState {
    pub fn new(store: Store, keys: ApiKeys, control: BrokerControl, rollouts: Rollouts) -> Self {
        Self {
            store,
            keys,
            control,
            rollouts,
        }
    }
}

/// The REST bridge. Serve it with `axum::serve(listener, router(state))`.
pub fn router(state: ApiState) -> Router {
    Router::new()
        .route("/api/v1/health", get(health))
        .route(
            "/api/v1/products",
            post(catalog::create_product).get(catalog::list_products),
        )
        .route("/api/v1/products/:product_id", get(catalog::get_product))
        .route(
            "/api/v1/products/:product_id/cohorts",
            post(catalog::create_cohort).get(catalog::list_cohorts),
        )
        .route("/api/v1/cohorts/:cohort_id", get(catalog::get_cohort))
        .route(
            "/api/v1/ca-certificates",
            post(cas::create_ca).get(cas::list_cas),
        )
        .route(
            "/api/v1/ca-certificates/:ca_id",
            get(cas::get_ca).patch(cas::update_ca),
        )
        .route("/api/v1/devices", get(devices::list_devices))
        .route("/api/v1/devices/:device_id", get(devices::get_device))
        .route(
            "/api/v1/devices/:device_id/telemetry",
            get(devices::device_telemetry),
        )
        .route(
            "/api/v1/devices/:device_id/executions",
            get(updates::device_executions),
        )
        .route(
            "/api/v1/signing-keys",
            post(updates::create_signing_key).get(updates::list_signing_keys),
        )
        .route(
            "/api/v1/signing-keys/:key_id",
            delete(updates::revoke_signing_key),
        )
        .route(
            "/api/v1/releases",
            post(updates::create_release).get(updates::list_releases),
        )
        .route("/api/v1/releases/:release_id", get(updates::get_release))
        .route(
            "/api/v1/deployments",
            post(updates::create_deployment).get(updates::list_deployments),
        )
        .route(
            "/api/v1/deployments/:deployment_id",
            get(updates::get_deployment),
        )
        .route(
            "/api/v1/deployments/:deployment_id/pause",
            post(updates::pause_deployment),
        )
        .route(
            "/api/v1/deployments/:deployment_id/resume",
            post(updates::resume_deployment),
        )
        .route(
            "/api/v1/deployments/:deployment_id/cancel",
            post(updates::cancel_deployment),
        )
        .route(
            "/api/v1/deployments/:deployment_id/rollback",
            post(updates::rollback_deployment),
        )
        .route(
            "/api/v1/deployments/:deployment_id/promote",
            post(updates::promote_deployment),
        )
        .route(
            "/api/v1/deployments/:deployment_id/executions",
            get(updates::list_executions),
        )
        .route("/api/v1/broker/metrics", get(broker_metrics))
        .route(
            "/api/v1/api-keys",
            post(keys::create_key).get(keys::list_keys),
        )
        .route("/api/v1/api-keys/:key_id", delete(keys::revoke_key))
        .fallback(error::no_such_route)
        .method_not_allowed_fallback(error::method_not_allowed)
        .with_state(state)
}

async fn health() -> Json<serde_json::Value> {
    Json(serde_json::json!({ "status": "ok" }))
}

async fn broker_metrics(
    _caller: auth::Caller,
    axum::extract::State(state): axum::extract::State<ApiState>,
) -> Json<broker::metrics::MetricsSnapshot> {
    Json(state.control.metrics())
}

/// RFC 3339 (UTC) text of a Unix-milliseconds timestamp.
fn rfc3339(ms: i64) -> String {
    use time::format_description::well_known::Rfc3339;
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .ok()
        .and_then(|t| t.format(&Rfc3339).ok())
        .unwrap_or_default()
}

fn rfc3339_opt(ms: Option<i64>) -> Option<String> {
    ms.map(rfc3339)
}

/// Checks a product or cohort name: 1 to 200 characters after trimming, no control characters.
fn valid_name(name: &str) -> Result<&str, ApiError> {
    let name = name.trim();
    if name.is_empty() || name.chars().count() > 200 || name.chars().any(char::is_control) {
        return Err(ApiError::unprocessable(
            "invalid_name",
            "name must be 1 to 200 characters without control characters",
        ));
    }
    Ok(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_rfc3339_utc() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_700_000_000_123), "2023-11-14T22:13:20.123Z");
    }

    #[test]
    fn names() {
        assert_eq!(valid_name("  a b ").unwrap(), "a b");
        assert!(valid_name("   ").is_err());
        assert!(valid_name("a\nb").is_err());
        assert!(valid_name(&"x".repeat(201)).is_err());
    }
}

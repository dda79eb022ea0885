//! The REST bridge for operators: JSON over HTTP under `/api/v1`.
//!
//! Every route but `/api/v1/health` and `/api/v1/openapi.json` wants
//! `Authorization: Bearer <api key>`. Viewers may read;
//! operators and admins may also change products, cohorts and CAs; only admins manage API
//! keys. Every error, including axum's own rejections, has the shape
//! `{"error":{"code":"...","message":"..."}}`.
//!
//! # Layout
//! - `error`: [`ApiError`], the one error shape, and the layer that puts every error answer in it.
//! - `extract`: the JSON/query/path/body extractors that answer in that shape, and the check
//!   that refuses control characters in paths and queries.
//! - `auth`: the bearer-token extractors.
//! - `paging`: `limit` and `cursor`, the one way every list pages; `validate`: checks of
//!   names, tags, device ids in paths, times in queries and operators' reasons that several
//!   resources share; `bodies`: the device and API key bodies several resources render.
//!   Resource modules import these, never each other's helpers.
//! - `catalog`, `cas`, `devices`, `keys`, `orgs`, `quarantine`: one module per resource;
//!   `access` loads what a key names, or answers 404; `device_filter` reads the device
//!   filters that both the device list and the bulk deletion take.
//! - `commands`: commands sent to a device or a cohort, and their acknowledgements.
//! - `updates`: signing keys, releases, deployments (create, pause, resume, cancel, rollback,
//!   promote) and per-device executions.
//! - `audit`: request ids, the middleware that records every mutating request, and the
//!   audit log's listing.
//! - `import`: bulk import of devices from CSV or JSON; `fuzzing` (hidden) lets the fuzz
//!   targets in `fuzz/` reach its parser.
//! - `summary`: the fleet summary.
//! - `lifecycle`: devices registered before manufacturing, moved, revoked, deleted (one, or in
//!   bulk by a filter).
//! - `openapi`: the OpenAPI document, generated from the handlers' `#[utoipa::path]`
//!   annotations and the bodies' `ToSchema` derives; served at `/api/v1/openapi.json` and
//!   committed as `openapi.json` at the repository root.
//!
//! # Invariants
//! - Database error text never reaches a client: it is logged, and the client gets a 500 with
//!   code `internal`.
//! - Handlers authenticate, parse, call and render: every change goes through
//!   [`crate::ops::Ops`], which commits it and then announces it to the brokers, so a broker
//!   never holds something the database does not. Handlers read the store, never write it
//!   (the audit middleware's entries aside).
//! - The router is built from [`routes`] alone, and tests hold that table, the OpenAPI document
//!   and the committed `openapi.json` in step: a route cannot be served undocumented.

mod access;
mod audit;
mod auth;
mod bodies;
mod cas;
mod catalog;
mod commands;
mod device_filter;
mod devices;
mod error;
mod extract;
mod import;
mod keys;
mod lifecycle;
mod openapi;
mod orgs;
mod paging;
mod quarantine;
mod summary;
mod updates;
mod validate;

use axum::extract::State;
use axum::handler::Handler;
use axum::http::{Method, StatusCode};
use axum::routing::{MethodFilter, MethodRouter};
use axum::{Json, Router};
use serde::Serialize;
use std::time::Duration;
use utoipa::ToSchema;

pub use error::ApiError;

/// The bulk import's parser, for the fuzz targets in `fuzz/` (outside the workspace).
#[doc(hidden)]
pub mod fuzzing {
    pub use super::import::{read_import, ImportedFields, ImportedRow};
}

use crate::ops::Ops;
use crate::store::Store;

/// What every handler gets: the store to read, and the operations that change the fleet.
#[derive(Clone)]
pub struct ApiState {
    pub store: Store,
    pub ops: Ops,
    pub settings: ApiSettings,
    /// The cluster's backbone, when this process is a replica of one: readiness needs it.
    pub backbone: Option<crate::cluster::Backbone>,
}

/// Behaviour the tuning file chooses.
#[derive(Debug, Clone)]
pub struct ApiSettings {
    /// CAs are registered only with proof of possession of their key.
    pub require_ca_proof: bool,
    pub verification_code_ttl_ms: i64,
    /// What a quarantine does when the request does not say.
    pub default_quarantine: broker::registry::QuarantineMode,
}

impl Default for ApiSettings {
    fn default() -> Self {
        Self {
            require_ca_proof: true,
            verification_code_ttl_ms: 3_600_000,
            default_quarantine: broker::registry::QuarantineMode::CommandsOnly,
        }
    }
}

impl ApiState {
    pub fn with_ops(store: Store, ops: Ops) -> Self {
        Self {
            store,
            ops,
            settings: ApiSettings::default(),
            backbone: None,
        }
    }
}

/// One route: a method, a path in axum's syntax, and its handler.
struct Route {
    #[cfg_attr(not(test), allow(dead_code))] // read by the route-coverage test
    method: Method,
    path: &'static str,
    handler: MethodRouter<ApiState>,
}

fn route<H, T>(method: Method, path: &'static str, handler: H) -> Route
where
    H: Handler<T, ApiState>,
    T: 'static,
{
    let filter = MethodFilter::try_from(method.clone()).expect("a method axum routes");
    Route {
        method,
        path,
        handler: axum::routing::on(filter, handler),
    }
}

/// Every route of the REST bridge. The router is built from this table alone; a test checks it
/// against the OpenAPI document (each handler's `#[utoipa::path]`), both ways.
fn routes() -> Vec<Route> {
    use Method as M;
    vec![
        route(M::GET, "/api/v1/health", health),
        route(M::GET, "/healthz", healthz),
        route(M::GET, "/readyz", ready),
        route(M::GET, "/api/v1/openapi.json", openapi::serve),
        route(M::POST, "/api/v1/organizations", orgs::create_org),
        route(M::GET, "/api/v1/organizations", orgs::list_orgs),
        route(M::GET, "/api/v1/organizations/:org_id", orgs::get_org),
        route(M::DELETE, "/api/v1/organizations/:org_id", orgs::delete_org),
        route(M::POST, "/api/v1/products", catalog::create_product),
        route(M::GET, "/api/v1/products", catalog::list_products),
        route(M::GET, "/api/v1/products/:product_id", catalog::get_product),
        route(
            M::DELETE,
            "/api/v1/products/:product_id",
            catalog::delete_product,
        ),
        route(
            M::POST,
            "/api/v1/products/:product_id/cohorts",
            catalog::create_cohort,
        ),
        route(
            M::GET,
            "/api/v1/products/:product_id/cohorts",
            catalog::list_cohorts,
        ),
        route(M::GET, "/api/v1/cohorts/:cohort_id", catalog::get_cohort),
        route(
            M::DELETE,
            "/api/v1/cohorts/:cohort_id",
            catalog::delete_cohort,
        ),
        route(
            M::POST,
            "/api/v1/cohorts/:cohort_id/commands",
            commands::send_cohort_command,
        ),
        route(
            M::GET,
            "/api/v1/cohorts/:cohort_id/commands/:command_id",
            commands::get_cohort_command,
        ),
        route(
            M::POST,
            "/api/v1/products/:product_id/devices/import",
            import::import_devices,
        ),
        route(M::POST, "/api/v1/ca-certificates", cas::create_ca),
        route(
            M::POST,
            "/api/v1/ca-certificates/verification-code",
            cas::verification_code,
        ),
        route(M::GET, "/api/v1/ca-certificates", cas::list_cas),
        route(M::GET, "/api/v1/ca-certificates/:ca_id", cas::get_ca),
        route(M::PATCH, "/api/v1/ca-certificates/:ca_id", cas::update_ca),
        route(M::DELETE, "/api/v1/ca-certificates/:ca_id", cas::delete_ca),
        route(M::GET, "/api/v1/devices", devices::list_devices),
        route(M::DELETE, "/api/v1/devices", lifecycle::delete_devices),
        route(M::GET, "/api/v1/fleet/summary", summary::fleet_summary),
        route(M::POST, "/api/v1/devices", lifecycle::create_device),
        route(M::GET, "/api/v1/devices/:device_id", devices::get_device),
        route(
            M::PATCH,
            "/api/v1/devices/:device_id",
            lifecycle::update_device,
        ),
        route(
            M::DELETE,
            "/api/v1/devices/:device_id",
            lifecycle::delete_device,
        ),
        route(
            M::POST,
            "/api/v1/devices/:device_id/revoke-certificate",
            lifecycle::revoke_certificate,
        ),
        route(
            M::GET,
            "/api/v1/devices/:device_id/telemetry",
            devices::device_telemetry,
        ),
        route(
            M::POST,
            "/api/v1/devices/:device_id/commands",
            commands::send_device_command,
        ),
        route(
            M::GET,
            "/api/v1/devices/:device_id/commands/:command_id",
            commands::get_device_command,
        ),
        route(
            M::POST,
            "/api/v1/devices/:device_id/quarantine",
            quarantine::quarantine,
        ),
        route(
            M::DELETE,
            "/api/v1/devices/:device_id/quarantine",
            quarantine::lift_quarantine,
        ),
        route(
            M::GET,
            "/api/v1/devices/:device_id/executions",
            updates::device_executions,
        ),
        route(M::POST, "/api/v1/signing-keys", updates::create_signing_key),
        route(M::GET, "/api/v1/signing-keys", updates::list_signing_keys),
        route(
            M::DELETE,
            "/api/v1/signing-keys/:key_id",
            updates::revoke_signing_key,
        ),
        route(M::POST, "/api/v1/releases", updates::create_release),
        route(M::GET, "/api/v1/releases", updates::list_releases),
        route(M::GET, "/api/v1/releases/:release_id", updates::get_release),
        route(M::POST, "/api/v1/deployments", updates::create_deployment),
        route(M::GET, "/api/v1/deployments", updates::list_deployments),
        route(
            M::GET,
            "/api/v1/deployments/:deployment_id",
            updates::get_deployment,
        ),
        route(
            M::POST,
            "/api/v1/deployments/:deployment_id/pause",
            updates::pause_deployment,
        ),
        route(
            M::POST,
            "/api/v1/deployments/:deployment_id/resume",
            updates::resume_deployment,
        ),
        route(
            M::POST,
            "/api/v1/deployments/:deployment_id/cancel",
            updates::cancel_deployment,
        ),
        route(
            M::POST,
            "/api/v1/deployments/:deployment_id/rollback",
            updates::rollback_deployment,
        ),
        route(
            M::POST,
            "/api/v1/deployments/:deployment_id/promote",
            updates::promote_deployment,
        ),
        route(
            M::GET,
            "/api/v1/deployments/:deployment_id/executions",
            updates::list_executions,
        ),
        route(M::GET, "/api/v1/broker/metrics", broker_metrics),
        route(M::GET, "/api/v1/audit", audit::list_audit),
        route(M::POST, "/api/v1/api-keys", keys::create_key),
        route(M::GET, "/api/v1/api-keys", keys::list_keys),
        route(M::DELETE, "/api/v1/api-keys/:key_id", keys::revoke_key),
    ]
}

/// The REST bridge. Serve it with `axum::serve(listener, router(state))`.
pub fn router(state: ApiState) -> Router {
    // Routes of one path merge into one method router; the fallbacks answer the rest. The
    // audit layer sees matched routes only; every answer carries a request id.
    routes()
        .into_iter()
        .fold(Router::new(), |router, r| router.route(r.path, r.handler))
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            audit::record,
        ))
        .fallback(error::no_such_route)
        .method_not_allowed_fallback(error::method_not_allowed)
        .layer(axum::middleware::from_fn(
            extract::refuse_control_characters,
        ))
        .layer(axum::middleware::map_response(error::json_error_bodies))
        .layer(axum::middleware::from_fn(audit::request_id))
        .with_state(state)
}

#[derive(Serialize, ToSchema)]
struct Health {
    #[schema(example = "ok")]
    status: &'static str,
}

/// Whether the service answers.
///
/// No API key needed.
#[utoipa::path(
    get,
    path = "/api/v1/health",
    tag = "service",
    responses((status = 200, description = "The service is up", body = Health)),
)]
async fn health() -> Json<Health> {
    Json(Health { status: "ok" })
}

/// Whether the process answers (liveness), at the root where probes look for it.
///
/// No API key needed.
#[utoipa::path(
    get,
    path = "/healthz",
    tag = "service",
    responses((status = 200, description = "The process is up", body = Health)),
)]
async fn healthz() -> Json<Health> {
    Json(Health { status: "ok" })
}

/// Whether the service can do its work now: its database answers within 2 s and, in a
/// cluster, its connection to the bus (NATS) is up. For load balancers and orchestrators
/// (`/healthz` says only that the process answers).
///
/// No API key needed.
#[utoipa::path(
    get,
    path = "/readyz",
    tag = "service",
    responses(
        (status = 200, description = "Ready", body = Health),
        (status = 503, description = "Not ready: the database does not answer, or (in a cluster) the bus is unreachable", body = Health),
    ),
)]
async fn ready(State(state): State<ApiState>) -> (StatusCode, Json<Health>) {
    let unavailable =
        |status: &'static str| (StatusCode::SERVICE_UNAVAILABLE, Json(Health { status }));
    if let Err(e) = state.store.ping(Duration::from_secs(2)).await {
        tracing::warn!(error = %e, "not ready: the database does not answer");
        return unavailable("database unavailable");
    }
    if state.backbone.as_ref().is_some_and(|b| !b.connected()) {
        tracing::warn!("not ready: the bus (NATS) is unreachable");
        return unavailable("bus unavailable");
    }
    (StatusCode::OK, Json(Health { status: "ready" }))
}

/// The broker's counters: sessions, connects, provisioning, publishes, rejections.
///
/// Role: viewer of the `default` organization, without a scope (the counters cover every
/// organization).
#[utoipa::path(
    get,
    path = "/api/v1/broker/metrics",
    tag = "service",
    security(("api_key" = [])),
    responses(
        (status = 200, description = "A snapshot of the counters", body = broker::metrics::MetricsSnapshot),
        (status = 401, description = "No API key, or an unknown or revoked one", body = error::ErrorBody),
        (status = 403, description = "A key of another organization, or a scoped key", body = error::ErrorBody),
    ),
)]
async fn broker_metrics(
    auth::Caller(by): auth::Caller,
    axum::extract::State(state): axum::extract::State<ApiState>,
) -> Result<Json<broker::metrics::MetricsSnapshot>, ApiError> {
    // The broker is shared by every organization, so its counters are the platform's.
    if by.org_id != broker::auth::DEFAULT_ORG || !by.org_wide() {
        return Err(ApiError::forbidden(
            "the broker's counters cover every organization: only unscoped keys of the \
             default organization read them",
        ));
    }
    Ok(Json(state.ops.broker_metrics()))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_rfc3339_utc() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_700_000_000_123), "2023-11-14T22:13:20.123Z");
    }
}

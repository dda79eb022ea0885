//! A device's life outside JITP: registered before manufacturing (optionally pinned to one
//! certificate), its certificate revoked, or deleted (one, or in bulk by a filter).
//! Revocation and deletion end a live session at once and refuse the certificate from then on.

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use broker::auth::Place;
use fleet_wire::{CohortId, DeviceId};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::auth::Writer;
use super::bodies::DeviceBody;
use super::device_filter::{self, DeviceFilterParams};
use super::error::ErrorBody;
use super::extract::{ApiJson, ApiPath, ApiQuery, Optional};
use super::validate::{path_device, pin_of, valid_tags};
use super::{access, ApiError, ApiState};
use crate::ops::OpsError;
use crate::store::{DeviceFilter, NewRegisteredDevice, StoreError};

/// A device to register before it first connects.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct CreateDevice {
    /// The device id: its certificate's CN and MQTT client id.
    #[schema(
        min_length = 1,
        max_length = 128,
        pattern = "^[A-Za-z0-9][A-Za-z0-9._:-]*$"
    )]
    id: String,
    product_id: String,
    /// A cohort of `product_id`.
    #[serde(default)]
    cohort_id: Option<String>,
    /// At most 64 tags: keys of 1 to 128 characters without `:`, string values of 1 to 256
    /// characters, no control characters.
    #[serde(default)]
    #[schema(value_type = std::collections::BTreeMap<String, String>)]
    tags: serde_json::Map<String, serde_json::Value>,
    /// Pin the device to this certificate: only it is admitted for the id.
    #[serde(default)]
    certificate_pem: Option<String>,
    /// Pin the device to the certificate with this SHA-256 fingerprint (64 hex digits of its
    /// DER; colons allowed).
    #[serde(default)]
    certificate_fingerprint: Option<String>,
}

/// Registers a device before manufacturing, in state `registered`. It may connect with any
/// certificate its organization's CAs signed (even one without just-in-time provisioning),
/// or, when pinned, only with that certificate.
///
/// Role: operator or admin, with a key that covers the product (or the cohort).
#[utoipa::path(
    post,
    path = "/api/v1/devices",
    tag = "devices",
    security(("api_key" = [])),
    request_body = CreateDevice,
    responses(
        (status = 201, description = "Registered", body = DeviceBody),
        (status = 400, description = "`malformed_json` or `invalid_body`", body = ErrorBody),
        (status = 401, description = "No API key, or an unknown or revoked one", body = ErrorBody),
        (status = 403, description = "A viewer key", body = ErrorBody),
        (status = 409, description = "The device id is taken (device ids are unique across the installation)", body = ErrorBody),
        (status = 415, description = "The body is not `application/json`", body = ErrorBody),
        (status = 422, description = "`invalid_device_id`, `unknown_product`, `unknown_cohort`, `invalid_tags` or `invalid_certificate`", body = ErrorBody),
        (status = 500, description = "`internal`: a store failure, logged", body = ErrorBody),
    ),
)]
pub(super) async fn create_device(
    Writer(by): Writer,
    State(state): State<ApiState>,
    ApiJson(body): ApiJson<CreateDevice>,
) -> Result<(StatusCode, Json<DeviceBody>), ApiError> {
    let id = DeviceId::parse(&body.id).map_err(|e| {
        ApiError::unprocessable("invalid_device_id", format!("device id {:?}: {e}", body.id))
    })?;
    let product = access::product(&state, &by, &body.product_id)
        .await
        .map_err(|_| {
            ApiError::unprocessable(
                "unknown_product",
                format!("product {:?} does not exist", body.product_id),
            )
        })?;
    let cohort = match &body.cohort_id {
        Some(c) => {
            let unknown = || {
                ApiError::unprocessable(
                    "unknown_cohort",
                    format!("cohort {c:?} does not exist in that product"),
                )
            };
            let cohort = access::cohort(&state, &by, c)
                .await
                .map_err(|_| unknown())?;
            if cohort.product_id != product.id {
                return Err(unknown());
            }
            Some(CohortId::parse(&cohort.id).map_err(|_| unknown())?)
        }
        None => None,
    };
    // A cohort-scoped key registers devices in its cohort only.
    if !by.sees(Place {
        org_id: &product.org_id,
        product_id: &product.id,
        cohort_id: Some(cohort.as_ref().map_or("", |c| c.as_str())),
    }) {
        return Err(ApiError::forbidden(
            "this key may register devices only in its own cohort",
        ));
    }
    let tags = valid_tags(body.tags)?;
    let pinned_fingerprint = pin_of(
        body.certificate_pem.as_deref(),
        body.certificate_fingerprint.as_deref(),
    )?;
    let new = NewRegisteredDevice {
        id: id.clone(),
        org_id: product.org_id.clone(),
        product_id: product.id.clone(),
        cohort_id: cohort,
        tags,
        pinned_fingerprint,
    };
    state.ops.create_device(&new).await.map_err(|e| match e {
        OpsError::Store(StoreError::Conflict(_)) => ApiError::conflict(
            "the device id is taken (device ids are unique across the installation)",
        ),
        other => other.into(),
    })?;
    tracing::info!(device_id = %id, by = %by.key_id, "device registered before manufacturing");
    let device = access::device(&state, &by, &id).await?;
    Ok((StatusCode::CREATED, Json(device.into())))
}

/// What to change about a device; absent fields stay as they are.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct PatchDevice {
    /// Replaces every tag (`{}` removes them all); at most 64.
    #[serde(default)]
    #[schema(value_type = Option<std::collections::BTreeMap<String, String>>)]
    tags: Option<serde_json::Map<String, serde_json::Value>>,
    /// Moves the device to this cohort of its product; `null` takes it out of every cohort.
    #[serde(default, deserialize_with = "super::extract::present")]
    #[schema(value_type = Option<String>, nullable)]
    cohort_id: Option<Option<String>>,
}

/// Changes a device's tags, or moves it to another cohort of its product. A moved device
/// learns its new cohort on `devices/{id}/assignment` (retained), and its live session ends
/// (reason `reassigned`) so that it reconnects with the topic rights of the new cohort; an
/// agent does both on its own.
///
/// Role: operator or admin, with a key that sees the device where it is and where it goes.
#[utoipa::path(
    patch,
    path = "/api/v1/devices/{device_id}",
    tag = "devices",
    security(("api_key" = [])),
    params(("device_id" = String, Path, description = "The device's id")),
    request_body = PatchDevice,
    responses(
        (status = 200, description = "The device as it is now", body = DeviceBody),
        (status = 400, description = "`invalid_path`, `malformed_json` or `invalid_body`", body = ErrorBody),
        (status = 401, description = "No API key, or an unknown or revoked one", body = ErrorBody),
        (status = 403, description = "A viewer key, or a cohort-scoped key taking the device out of every cohort (a cohort it does not see is `unknown_cohort`)", body = ErrorBody),
        (status = 404, description = "No such device", body = ErrorBody),
        (status = 415, description = "The body is not `application/json`", body = ErrorBody),
        (status = 422, description = "`unknown_cohort` or `invalid_tags`", body = ErrorBody),
        (status = 500, description = "`internal`: a store failure, logged", body = ErrorBody),
    ),
)]
pub(super) async fn update_device(
    Writer(by): Writer,
    State(state): State<ApiState>,
    ApiPath(id): ApiPath<String>,
    ApiJson(body): ApiJson<PatchDevice>,
) -> Result<Json<DeviceBody>, ApiError> {
    let id = path_device(&id)?;
    let device = access::device(&state, &by, &id).await?;
    let tags = body.tags.map(valid_tags).transpose()?;
    let cohort = match body.cohort_id {
        None => None,
        Some(None) => Some(None),
        Some(Some(c)) => {
            let unknown = || {
                ApiError::unprocessable(
                    "unknown_cohort",
                    format!("cohort {c:?} does not exist in the device's product"),
                )
            };
            let cohort = access::cohort(&state, &by, &c)
                .await
                .map_err(|_| unknown())?;
            if cohort.product_id != device.product_id {
                return Err(unknown());
            }
            Some(Some(CohortId::parse(&cohort.id).map_err(|_| unknown())?))
        }
    };
    if let Some(to) = &cohort {
        if !by.sees(Place {
            org_id: &device.org_id,
            product_id: &device.product_id,
            cohort_id: Some(to.as_ref().map_or("", |c| c.as_str())),
        }) {
            return Err(ApiError::forbidden(
                "this key may not move devices out of its cohort",
            ));
        }
    }
    let update = crate::store::DeviceUpdate {
        tags,
        cohort_id: cohort,
    };
    if !state.ops.update_device(&device, update).await? {
        return Err(ApiError::not_found("device"));
    }
    let device = access::device(&state, &by, &id).await?;
    Ok(Json(device.into()))
}

/// Why a certificate is revoked; optional, and so is the body.
#[derive(Deserialize, Default, ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct RevokeRequest {
    #[serde(default)]
    reason: Option<String>,
}

#[derive(Serialize, ToSchema)]
pub(super) struct RevokedBody {
    device_id: String,
    /// The fingerprints that are never admitted again.
    revoked: Vec<String>,
    /// Whether a live session was ended by this request.
    session_ended: bool,
}

/// Revokes a device's certificate (the one it was provisioned with, and its pin): its live
/// session ends within a second, and that certificate is refused from then on.
///
/// Role: operator or admin.
#[utoipa::path(
    post,
    path = "/api/v1/devices/{device_id}/revoke-certificate",
    tag = "devices",
    security(("api_key" = [])),
    params(("device_id" = String, Path, description = "The device's id")),
    request_body(content = Option<RevokeRequest>, description = "Optional: no body, an empty body or `null` is the same as `{}`"),
    responses(
        (status = 200, description = "Revoked", body = RevokedBody),
        (status = 400, description = "`invalid_path`, `malformed_json` or `invalid_body`", body = ErrorBody),
        (status = 401, description = "No API key, or an unknown or revoked one", body = ErrorBody),
        (status = 403, description = "A viewer key", body = ErrorBody),
        (status = 404, description = "No such device", body = ErrorBody),
        (status = 409, description = "No certificate is known for the device yet", body = ErrorBody),
        (status = 500, description = "`internal`: a store failure, logged", body = ErrorBody),
    ),
)]
pub(super) async fn revoke_certificate(
    Writer(by): Writer,
    State(state): State<ApiState>,
    ApiPath(id): ApiPath<String>,
    Optional(body): Optional<RevokeRequest>,
) -> Result<Json<RevokedBody>, ApiError> {
    let id = path_device(&id)?;
    let device = access::device(&state, &by, &id).await?;
    let no_certificate = || ApiError::conflict("no certificate is known for this device yet");
    if state.store.device_fingerprints(&id).await?.is_empty() {
        return Err(no_certificate());
    }
    let reason = body
        .reason
        .unwrap_or_else(|| "revoked by an operator".into());
    let reason = super::validate::valid_reason(&reason)?.to_owned();
    let revoked = state
        .ops
        .revoke_certificate(&device.org_id, &id, &reason)
        .await?
        .ok_or_else(no_certificate)?;
    tracing::info!(device_id = %id, session_ended = revoked.session_ended, by = %by.key_id,
        "device certificate revoked");
    Ok(Json(RevokedBody {
        device_id: id.to_string(),
        revoked: revoked.fingerprints,
        session_ended: revoked.session_ended,
    }))
}

/// Deletes a device and its history. Its live session ends within a second, and its
/// certificate is refused from then on (so a CA with just-in-time provisioning cannot bring it
/// back with that certificate).
///
/// Role: operator or admin.
#[utoipa::path(
    delete,
    path = "/api/v1/devices/{device_id}",
    tag = "devices",
    security(("api_key" = [])),
    params(("device_id" = String, Path, description = "The device's id")),
    responses(
        (status = 204, description = "Deleted"),
        (status = 400, description = "`invalid_path`", body = ErrorBody),
        (status = 401, description = "No API key, or an unknown or revoked one", body = ErrorBody),
        (status = 403, description = "A viewer key", body = ErrorBody),
        (status = 404, description = "No such device", body = ErrorBody),
        (status = 500, description = "`internal`: a store failure, logged", body = ErrorBody),
    ),
)]
pub(super) async fn delete_device(
    Writer(by): Writer,
    State(state): State<ApiState>,
    ApiPath(id): ApiPath<String>,
) -> Result<StatusCode, ApiError> {
    let id = path_device(&id)?;
    let device = access::device(&state, &by, &id).await?;
    // Of concurrent deletes of one device, one deletes it; the others are told it is gone.
    if !state.ops.delete_device(&device.org_id, &id).await? {
        return Err(ApiError::not_found("device"));
    }
    tracing::info!(device_id = %id, by = %by.key_id, "device deleted");
    Ok(StatusCode::NO_CONTENT)
}

/// Most devices one bulk deletion removes; the answer's `remaining` says whether to call again.
const MAX_BULK_DELETE: u32 = 10_000;
/// Devices one bulk deletion removes unless `limit` says otherwise.
const DEFAULT_BULK_DELETE: u32 = 1_000;

/// What a bulk deletion did, or (a dry run) would do.
#[derive(Serialize, ToSchema)]
pub(super) struct BulkDeleteBody {
    dry_run: bool,
    /// Devices the filter matched before anything was deleted.
    matched: u64,
    /// Devices this request deleted (0 in a dry run).
    deleted: u64,
    /// Devices that still match: call again while this is not 0.
    remaining: u64,
    /// The first (up to 20) ids, in id order: those a dry run matched, or those deleted.
    sample: Vec<String>,
    /// Live sessions this request ended; none when other processes applied the change.
    sessions_ended: Option<usize>,
}

/// Deletes the devices a filter selects (the same filters as `GET /api/v1/devices`), each as
/// `DELETE /api/v1/devices/{id}` would: its history goes, its live session ends, its
/// certificate is refused from then on. With `dry_run=true` nothing changes: the answer says
/// how many match and names the first few. A call deletes at most `limit` devices, 500 to a
/// transaction, so no call holds the database for long; call again while `remaining` is not 0.
/// At least one filter is required.
///
/// Role: operator or admin; a scoped key deletes within its scope only.
#[utoipa::path(
    delete,
    path = "/api/v1/devices",
    tag = "devices",
    security(("api_key" = [])),
    params(
        ("dry_run" = Option<bool>, Query, description = "`true`: count and name what matches, delete nothing"),
        ("limit" = Option<u32>, Query, minimum = 1, maximum = 10000, description = "Most devices this call deletes, 1,000 by default"),
        DeviceFilterParams,
    ),
    responses(
        (status = 200, description = "What was deleted, or would be", body = BulkDeleteBody),
        (status = 400, description = "`invalid_query`: no filter, an unknown or repeated parameter, or a bad value", body = ErrorBody),
        (status = 401, description = "No API key, or an unknown or revoked one", body = ErrorBody),
        (status = 403, description = "A viewer key", body = ErrorBody),
        (status = 500, description = "`internal`: a store failure, logged", body = ErrorBody),
    ),
)]
pub(super) async fn delete_devices(
    Writer(by): Writer,
    State(state): State<ApiState>,
    ApiQuery(pairs): ApiQuery<Vec<(String, String)>>,
) -> Result<Json<BulkDeleteBody>, ApiError> {
    let bad = |m: String| ApiError::bad_request("invalid_query", m);
    let (mut dry_run, mut limit) = (false, DEFAULT_BULK_DELETE);
    let filter = device_filter::parse_query(pairs, |key, value| {
        match key {
            "dry_run" => {
                dry_run = match value.as_str() {
                    "true" => true,
                    "false" => false,
                    _ => return Err(bad("dry_run must be true or false".into())),
                }
            }
            "limit" => {
                limit = value
                    .parse()
                    .ok()
                    .filter(|n| (1..=MAX_BULK_DELETE).contains(n))
                    .ok_or_else(|| {
                        bad(format!(
                            "limit must be a whole number from 1 to {MAX_BULK_DELETE}"
                        ))
                    })?
            }
            other => return Err(bad(format!("unknown query parameter {other:?}"))),
        }
        Ok(())
    })?;
    if filter == DeviceFilter::default() {
        return Err(bad(
            "name at least one filter (product_id=... selects every device of a product)".into(),
        ));
    }
    let Some(filter) = device_filter::scoped(&by, filter) else {
        return Ok(Json(BulkDeleteBody {
            dry_run,
            matched: 0,
            deleted: 0,
            remaining: 0,
            sample: Vec::new(),
            sessions_ended: Some(0),
        }));
    };
    let matched = state.store.count_devices(&filter).await?;
    if dry_run {
        let sample = state
            .store
            .device_ids(&filter, crate::ops::BULK_SAMPLE as u32)
            .await?;
        return Ok(Json(BulkDeleteBody {
            dry_run,
            matched,
            deleted: 0,
            remaining: matched,
            sample: sample.iter().map(ToString::to_string).collect(),
            sessions_ended: Some(0),
        }));
    }
    let done = state.ops.delete_devices(&by.org_id, &filter, limit).await?;
    let remaining = state.store.count_devices(&filter).await?;
    tracing::info!(deleted = done.deleted, remaining, by = %by.key_id, "devices deleted in bulk");
    Ok(Json(BulkDeleteBody {
        dry_run,
        matched,
        deleted: done.deleted,
        remaining,
        sample: done.sample.iter().map(ToString::to_string).collect(),
        sessions_ended: done.sessions_ended,
    }))
}

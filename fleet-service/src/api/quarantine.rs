//! Quarantine: set a device apart. Its live session ends at once; from then on it may connect
//! only to receive (and acknowledge) its commands, or not at all, until the quarantine is
//! lifted.

use axum::extract::State;
use axum::Json;
use broker::registry::QuarantineMode;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::auth::Writer;
use super::error::ErrorBody;
use super::extract::Optional;
use super::extract::{ApiJson, ApiPath};
use super::validate::{path_device, valid_reason};
use super::{access, ApiError, ApiState};

/// Why, and how strictly.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct QuarantineRequest {
    /// 1 to 1000 characters; recorded as the device's `state_reason`.
    #[schema(min_length = 1, max_length = 1000)]
    reason: String,
    /// `commands_only` (connect only to receive and acknowledge commands) or `refuse`; the
    /// service's `[devices] quarantine_mode` when absent.
    #[serde(default)]
    #[schema(value_type = Option<QuarantineModeName>)]
    mode: Option<String>,
}

#[derive(Serialize, ToSchema)]
#[schema(as = QuarantineModeName)]
#[serde(rename_all = "snake_case")]
#[allow(dead_code)] // only its schema is used
pub(super) enum QuarantineModeName {
    CommandsOnly,
    Refuse,
}

#[derive(Serialize, ToSchema)]
pub(super) struct QuarantineBody {
    device_id: String,
    /// `quarantined`, or after lifting the state presence gives it.
    state: String,
    /// The mode now in force; none once lifted.
    #[schema(value_type = Option<QuarantineModeName>)]
    mode: Option<&'static str>,
    /// Whether a live session was ended by this request.
    session_ended: bool,
}

/// The reason a lift records; optional, and so is the body.
#[derive(Deserialize, Default, ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct LiftRequest {
    #[serde(default)]
    reason: Option<String>,
}

/// Quarantines a device: ends its live session within a second, and from then on it may
/// connect only to receive and acknowledge its commands (`commands_only`) or not at all
/// (`refuse`). Quarantining again changes the mode and reason.
///
/// Role: operator or admin.
#[utoipa::path(
    post,
    path = "/api/v1/devices/{device_id}/quarantine",
    tag = "devices",
    security(("api_key" = [])),
    params(("device_id" = String, Path, description = "The device's id")),
    request_body = QuarantineRequest,
    responses(
        (status = 200, description = "Quarantined", body = QuarantineBody),
        (status = 400, description = "`invalid_path`, `malformed_json` or `invalid_body`", body = ErrorBody),
        (status = 401, description = "No API key, or an unknown or revoked one", body = ErrorBody),
        (status = 403, description = "A viewer key", body = ErrorBody),
        (status = 404, description = "No such device", body = ErrorBody),
        (status = 415, description = "The body is not `application/json`", body = ErrorBody),
        (status = 422, description = "`invalid_reason` or `invalid_mode`", body = ErrorBody),
        (status = 500, description = "`internal`: a store failure, logged", body = ErrorBody),
    ),
)]
pub(super) async fn quarantine(
    Writer(by): Writer,
    State(state): State<ApiState>,
    ApiPath(id): ApiPath<String>,
    ApiJson(body): ApiJson<QuarantineRequest>,
) -> Result<Json<QuarantineBody>, ApiError> {
    let id = path_device(&id)?;
    access::device(&state, &by, &id).await?;
    let reason = valid_reason(&body.reason)?;
    let mode = match body.mode.as_deref() {
        None => state.settings.default_quarantine,
        Some(m) => QuarantineMode::parse(m).ok_or_else(|| {
            ApiError::unprocessable("invalid_mode", "mode must be commands_only or refuse")
        })?,
    };
    let session_ended = state
        .ops
        .quarantine(&id, mode, &format!("quarantined: {reason}"))
        .await?
        .ok_or_else(|| ApiError::not_found("device"))?;
    tracing::info!(device_id = %id, mode = mode.as_str(), session_ended, by = %by.key_id,
        "device quarantined");
    Ok(Json(QuarantineBody {
        device_id: id.to_string(),
        state: "quarantined".into(),
        mode: Some(mode.as_str()),
        session_ended,
    }))
}

/// Lifts a device's quarantine. Its live commands-only session, if any, is ended so that it
/// reconnects with its normal topic rights.
///
/// Role: operator or admin.
#[utoipa::path(
    delete,
    path = "/api/v1/devices/{device_id}/quarantine",
    tag = "devices",
    security(("api_key" = [])),
    params(("device_id" = String, Path, description = "The device's id")),
    request_body(content = Option<LiftRequest>, description = "Optional: no body, an empty body or `null` is the same as `{}`"),
    responses(
        (status = 200, description = "Lifted", body = QuarantineBody),
        (status = 400, description = "`invalid_path`, `malformed_json` or `invalid_body`", body = ErrorBody),
        (status = 401, description = "No API key, or an unknown or revoked one", body = ErrorBody),
        (status = 403, description = "A viewer key", body = ErrorBody),
        (status = 404, description = "No such device", body = ErrorBody),
        (status = 409, description = "The device is not quarantined", body = ErrorBody),
        (status = 422, description = "`invalid_reason`", body = ErrorBody),
        (status = 500, description = "`internal`: a store failure, logged", body = ErrorBody),
    ),
)]
pub(super) async fn lift_quarantine(
    Writer(by): Writer,
    State(state): State<ApiState>,
    ApiPath(id): ApiPath<String>,
    Optional(body): Optional<LiftRequest>,
) -> Result<Json<QuarantineBody>, ApiError> {
    let id = path_device(&id)?;
    access::device(&state, &by, &id).await?;
    let reason = match &body.reason {
        Some(r) => format!("quarantine lifted: {}", valid_reason(r)?),
        None => "quarantine lifted".to_owned(),
    };
    let session_ended = state
        .ops
        .lift_quarantine(&id, &reason)
        .await?
        .ok_or_else(|| ApiError::conflict("the device is not quarantined"))?;
    let device = access::device(&state, &by, &id).await?;
    tracing::info!(device_id = %id, session_ended, by = %by.key_id, "quarantine lifted");
    Ok(Json(QuarantineBody {
        device_id: id.to_string(),
        state: device.state.as_str().to_owned(),
        mode: None,
        session_ended,
    }))
}

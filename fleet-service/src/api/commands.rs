//! Commands over REST: sent to one device (`devices/{id}/commands`) or a cohort
//! (`cohorts/{id}/commands`) as the platform publishes them, and read back with the devices'
//! acknowledgements.
//!
//! A command is stored, then published at QoS 1. Its status is worked out when it is read:
//! `acknowledged` once the device's ack is stored (the intake records acks of commands sent
//! here), `timed_out` once `timeout_s` passed without one, `sent` before that. A late ack
//! still turns a timed-out command into an acknowledged one.

use std::collections::BTreeMap;

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use broker::registry::QuarantineMode;
use fleet_wire::CohortId;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::auth::{Caller, Writer};
use super::error::ErrorBody;
use super::extract::{ApiJson, ApiPath};
use super::validate::path_device;
use super::{access, rfc3339, ApiError, ApiState};
use crate::store::{now_ms, CohortCommand, DeviceCommand, NewCommand};

/// `timeout_s` unless the request says otherwise.
const DEFAULT_TIMEOUT_S: u64 = 300;
/// The longest `timeout_s`: a week, the longest a device's persistent session keeps a queued
/// command by default (`max_session_expiry_secs`).
const MAX_TIMEOUT_S: u64 = 7 * 24 * 3600;
/// The largest command as published (id, name and params as JSON).
const MAX_COMMAND_BYTES: usize = 64 * 1024;
/// The longest command name, in characters.
const MAX_NAME: usize = 128;

/// A command to send.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct SendCommand {
    /// The command's id, which the device echoes in its ack. 1 to 128 characters of
    /// `A-Z a-z 0-9 . _ : -`, starting with a letter or digit; unique per device (per cohort
    /// for a cohort command), so sending the same id again is a 409 and sends nothing. A UUID
    /// when absent.
    #[serde(default)]
    #[schema(
        min_length = 1,
        max_length = 128,
        pattern = "^[A-Za-z0-9][A-Za-z0-9._:-]*$"
    )]
    id: Option<String>,
    /// What the device should do: 1 to 128 characters, no control characters.
    #[schema(example = "reboot", min_length = 1, max_length = 128)]
    name: String,
    /// A JSON object, passed to the device as it is.
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    params: Option<serde_json::Value>,
    /// Seconds without an ack after which the command counts as timed out: 1 to 604800 (a
    /// week), 300 by default.
    #[serde(default)]
    #[schema(minimum = 1, maximum = 604800)]
    timeout_s: Option<u64>,
}

/// Where a command is: `sent` (no ack yet), `acknowledged` (the device answered; for a cohort
/// command, every device did) or `timed_out` (`timeout_s` passed first).
#[derive(Serialize, ToSchema)]
#[schema(as = CommandState)]
#[serde(rename_all = "snake_case")]
#[allow(dead_code)] // only its schema is used
pub(super) enum CommandStateName {
    Sent,
    Acknowledged,
    TimedOut,
}

/// What a device answered, as it said it.
#[derive(Serialize, ToSchema)]
#[schema(as = CommandAckStatus)]
#[serde(rename_all = "snake_case")]
#[allow(dead_code)] // only its schema is used
pub(super) enum AckStatusName {
    Accepted,
    Succeeded,
    Failed,
    Rejected,
}

/// The device's acknowledgement. An `accepted` may later be replaced by the final status.
#[derive(Serialize, ToSchema)]
pub(super) struct AckBody {
    #[schema(value_type = AckStatusName)]
    status: String,
    /// The device's own words, if it sent any.
    message: Option<String>,
    /// RFC 3339, UTC: when the broker received the ack.
    at: String,
}

/// A command as one device sees it.
#[derive(Serialize, ToSchema)]
pub(super) struct CommandBody {
    id: String,
    device_id: String,
    /// The cohort it was sent to, for a command sent to the device's cohort.
    cohort_id: Option<String>,
    name: String,
    params: Option<serde_json::Value>,
    /// RFC 3339, UTC.
    sent_at: String,
    timeout_s: u64,
    /// RFC 3339, UTC: `sent_at` + `timeout_s`; without an ack by then the command timed out.
    expires_at: String,
    #[schema(value_type = CommandStateName)]
    status: &'static str,
    ack: Option<AckBody>,
}

/// A command just sent to a device.
#[derive(Serialize, ToSchema)]
pub(super) struct SentCommandBody {
    #[serde(flatten)]
    command: CommandBody,
    /// Whether the device was connected when it was sent. An offline device gets the command
    /// when it comes back only if it holds a persistent session (MQTT 3.1.1 CleanSession=0,
    /// MQTT 5 with a Session Expiry Interval); otherwise it times out.
    device_online: bool,
}

/// A command sent to a cohort, and how its devices answered.
#[derive(Serialize, ToSchema)]
pub(super) struct CohortCommandBody {
    id: String,
    cohort_id: String,
    name: String,
    params: Option<serde_json::Value>,
    /// RFC 3339, UTC.
    sent_at: String,
    timeout_s: u64,
    /// RFC 3339, UTC: `sent_at` + `timeout_s`.
    expires_at: String,
    /// `acknowledged` once every device counted in `devices` answered.
    #[schema(value_type = CommandStateName)]
    status: &'static str,
    /// Devices of the cohort that could receive it when it was sent (quarantined devices hear
    /// only their own commands, so they are not counted).
    devices: u64,
    /// Devices that answered, by the status they answered with.
    acks: BTreeMap<String, u64>,
    /// Devices counted in `devices` that have not answered yet (or, after `expires_at`, did
    /// not answer in time).
    pending: u64,
}

impl From<DeviceCommand> for CommandBody {
    fn from(c: DeviceCommand) -> Self {
        let expires = c.sent_at_ms.saturating_add(c.timeout_ms);
        let status = match (&c.ack, now_ms() >= expires) {
            (Some(_), _) => "acknowledged",
            (None, true) => "timed_out",
            (None, false) => "sent",
        };
        Self {
            id: c.id,
            device_id: c.device_id.to_string(),
            cohort_id: c.cohort_id,
            name: c.name,
            params: c.params,
            sent_at: rfc3339(c.sent_at_ms),
            timeout_s: (c.timeout_ms / 1000).max(0) as u64,
            expires_at: rfc3339(expires),
            status,
            ack: c.ack.map(|a| AckBody {
                status: a.status,
                message: a.message,
                at: rfc3339(a.at_ms),
            }),
        }
    }
}

impl From<CohortCommand> for CohortCommandBody {
    fn from(c: CohortCommand) -> Self {
        let expires = c.sent_at_ms.saturating_add(c.timeout_ms);
        let answered: u64 = c.acks.values().sum();
        let pending = c.devices.saturating_sub(answered);
        let status = match (pending, now_ms() >= expires) {
            (0, _) => "acknowledged",
            (_, true) => "timed_out",
            (_, false) => "sent",
        };
        Self {
            id: c.id,
            cohort_id: c.cohort_id,
            name: c.name,
            params: c.params,
            sent_at: rfc3339(c.sent_at_ms),
            timeout_s: (c.timeout_ms / 1000).max(0) as u64,
            expires_at: rfc3339(expires),
            status,
            devices: c.devices,
            acks: c.acks,
            pending,
        }
    }
}

/// Whether `id` may be a command id: what a device id may be, so it is safe in a path.
fn valid_command_id(id: &str) -> bool {
    fleet_wire::DeviceId::parse(id).is_ok()
}

/// Checks a request and makes the command it asks for; `sent_by` is the key's id.
fn new_command(body: SendCommand, sent_by: &str) -> Result<NewCommand, ApiError> {
    let id =
        match body.id {
            Some(id) if valid_command_id(&id) => id,
            Some(_) => return Err(ApiError::unprocessable(
                "invalid_command_id",
                "id must be 1 to 128 characters of A-Z a-z 0-9 . _ : -, starting with a letter \
                 or digit",
            )),
            None => uuid::Uuid::now_v7().to_string(),
        };
    let name = body.name.trim();
    if name.is_empty() || name.chars().count() > MAX_NAME || name.chars().any(char::is_control) {
        return Err(ApiError::unprocessable(
            "invalid_command_name",
            format!("name must be 1 to {MAX_NAME} characters without control characters"),
        ));
    }
    let params = match body.params {
        None => None,
        Some(p @ serde_json::Value::Object(_)) => Some(p),
        Some(_) => {
            return Err(ApiError::unprocessable(
                "invalid_params",
                "params must be a JSON object",
            ))
        }
    };
    let timeout_s = body.timeout_s.unwrap_or(DEFAULT_TIMEOUT_S);
    if !(1..=MAX_TIMEOUT_S).contains(&timeout_s) {
        return Err(ApiError::unprocessable(
            "invalid_timeout",
            format!("timeout_s must be 1 to {MAX_TIMEOUT_S} seconds"),
        ));
    }
    let size = id.len() + name.len() + params.as_ref().map_or(0, |p| p.to_string().len());
    if size > MAX_COMMAND_BYTES {
        return Err(ApiError::unprocessable(
            "command_too_large",
            format!("a command (id, name and params as JSON) is at most {MAX_COMMAND_BYTES} bytes"),
        ));
    }
    Ok(NewCommand {
        id,
        name: name.to_owned(),
        params,
        timeout_ms: (timeout_s * 1000) as i64,
        sent_by: sent_by.to_owned(),
    })
}

/// Sends a command to a device: it is published on `devices/{id}/commands` (QoS 1), wherever
/// the device is connected. An offline device gets it when it reconnects, if it holds a
/// persistent session (`device_online` says which case it was). Read the device's answer with
/// `GET /api/v1/devices/{device_id}/commands/{command_id}`.
///
/// A device quarantined with mode `refuse`, or whose certificates are all revoked, cannot
/// connect to receive it: 409. One quarantined `commands_only` may (that is what the mode is
/// for).
///
/// Role: operator or admin.
#[utoipa::path(
    post,
    path = "/api/v1/devices/{device_id}/commands",
    tag = "commands",
    security(("api_key" = [])),
    params(("device_id" = String, Path, description = "The device's id")),
    request_body = SendCommand,
    responses(
        (status = 201, description = "Stored and published; `status` is `sent`", body = SentCommandBody),
        (status = 400, description = "`invalid_path`, `malformed_json` or `invalid_body`", body = ErrorBody),
        (status = 401, description = "No API key, or an unknown or revoked one", body = ErrorBody),
        (status = 403, description = "A viewer key", body = ErrorBody),
        (status = 404, description = "No such device", body = ErrorBody),
        (status = 409, description = "`conflict`: the device already has a command with this id; `device_quarantined` (mode `refuse`); `certificate_revoked`", body = ErrorBody),
        (status = 415, description = "The body is not `application/json`", body = ErrorBody),
        (status = 422, description = "`invalid_command_id`, `invalid_command_name`, `invalid_params`, `invalid_timeout` or `command_too_large`", body = ErrorBody),
        (status = 500, description = "`internal`: a store failure, logged", body = ErrorBody),
        (status = 503, description = "`broker_unavailable`: no broker to publish on; nothing was sent", body = ErrorBody),
    ),
)]
pub(super) async fn send_device_command(
    Writer(by): Writer,
    State(state): State<ApiState>,
    ApiPath(id): ApiPath<String>,
    ApiJson(body): ApiJson<SendCommand>,
) -> Result<(StatusCode, Json<SentCommandBody>), ApiError> {
    let id = path_device(&id)?;
    let device = access::device(&state, &by, &id).await?;
    let new = new_command(body, &by.key_id)?;
    if state.store.quarantine_of(&id).await? == Some(QuarantineMode::Refuse) {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "device_quarantined",
            "the device is quarantined with mode refuse: it cannot connect to receive commands \
             (quarantine it commands_only, or lift the quarantine)",
        ));
    }
    let known = state.store.device_fingerprints(&id).await?;
    if !known.is_empty() {
        let revoked = state.store.revoked_fingerprints_of(&id).await?;
        if known.iter().all(|f| revoked.contains(f)) {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "certificate_revoked",
                "the device's certificate is revoked: it cannot connect to receive commands",
            ));
        }
    }
    let sent_at_ms = state.ops.send_device_command(&id, &new).await?;
    let command = DeviceCommand {
        device_id: id,
        cohort_id: None,
        id: new.id,
        name: new.name,
        params: new.params,
        sent_at_ms,
        timeout_ms: new.timeout_ms,
        ack: None,
    };
    Ok((
        StatusCode::CREATED,
        Json(SentCommandBody {
            command: command.into(),
            device_online: device.online,
        }),
    ))
}

/// A command sent to the device (or to its cohort, while the device is in it), with the
/// device's acknowledgement: `sent`, `acknowledged` (its status and message, and when), or
/// `timed_out`.
///
/// Role: viewer (any valid API key).
#[utoipa::path(
    get,
    path = "/api/v1/devices/{device_id}/commands/{command_id}",
    tag = "commands",
    security(("api_key" = [])),
    params(
        ("device_id" = String, Path, description = "The device's id"),
        ("command_id" = String, Path, description = "The command's id"),
    ),
    responses(
        (status = 200, description = "The command and the device's answer", body = CommandBody),
        (status = 400, description = "`invalid_path`", body = ErrorBody),
        (status = 401, description = "No API key, or an unknown or revoked one", body = ErrorBody),
        (status = 404, description = "No such device, or no such command for it", body = ErrorBody),
        (status = 500, description = "`internal`: a store failure, logged", body = ErrorBody),
    ),
)]
pub(super) async fn get_device_command(
    Caller(by): Caller,
    State(state): State<ApiState>,
    ApiPath((id, command_id)): ApiPath<(String, String)>,
) -> Result<Json<CommandBody>, ApiError> {
    let id = path_device(&id)?;
    access::device(&state, &by, &id).await?;
    if !valid_command_id(&command_id) {
        return Err(ApiError::not_found("command"));
    }
    let command = state
        .store
        .device_command(&id, &command_id)
        .await?
        .ok_or_else(|| ApiError::not_found("command"))?;
    Ok(Json(command.into()))
}

/// Sends a command to every device of a cohort: it is published once on
/// `cohorts/{id}/commands` (QoS 1), and each device answers on its own
/// `devices/{id}/commands/ack`. One row is stored for the command and one per device that
/// answers, whatever the cohort's size. Read the answers with
/// `GET /api/v1/cohorts/{cohort_id}/commands/{command_id}` (counts), or one device's with
/// `GET /api/v1/devices/{device_id}/commands/{command_id}`.
///
/// Role: operator or admin.
#[utoipa::path(
    post,
    path = "/api/v1/cohorts/{cohort_id}/commands",
    tag = "commands",
    security(("api_key" = [])),
    params(("cohort_id" = String, Path, description = "The cohort's id")),
    request_body = SendCommand,
    responses(
        (status = 201, description = "Stored and published", body = CohortCommandBody),
        (status = 400, description = "`invalid_path`, `malformed_json` or `invalid_body`", body = ErrorBody),
        (status = 401, description = "No API key, or an unknown or revoked one", body = ErrorBody),
        (status = 403, description = "A viewer key", body = ErrorBody),
        (status = 404, description = "No such cohort", body = ErrorBody),
        (status = 409, description = "`conflict`: the cohort already has a command with this id", body = ErrorBody),
        (status = 415, description = "The body is not `application/json`", body = ErrorBody),
        (status = 422, description = "`invalid_command_id`, `invalid_command_name`, `invalid_params`, `invalid_timeout` or `command_too_large`", body = ErrorBody),
        (status = 500, description = "`internal`: a store failure, logged", body = ErrorBody),
        (status = 503, description = "`broker_unavailable`: no broker to publish on; nothing was sent", body = ErrorBody),
    ),
)]
pub(super) async fn send_cohort_command(
    Writer(by): Writer,
    State(state): State<ApiState>,
    ApiPath(id): ApiPath<String>,
    ApiJson(body): ApiJson<SendCommand>,
) -> Result<(StatusCode, Json<CohortCommandBody>), ApiError> {
    let cohort = access::cohort(&state, &by, &id).await?;
    let cohort_id = CohortId::parse(&cohort.id).map_err(|_| ApiError::not_found("cohort"))?;
    let new = new_command(body, &by.key_id)?;
    let sent = state.ops.send_cohort_command(&cohort_id, &new).await?;
    Ok((StatusCode::CREATED, Json(sent.into())))
}

/// A command sent to a cohort, with its devices' answers counted by status.
///
/// Role: viewer (any valid API key).
#[utoipa::path(
    get,
    path = "/api/v1/cohorts/{cohort_id}/commands/{command_id}",
    tag = "commands",
    security(("api_key" = [])),
    params(
        ("cohort_id" = String, Path, description = "The cohort's id"),
        ("command_id" = String, Path, description = "The command's id"),
    ),
    responses(
        (status = 200, description = "The command and its answers", body = CohortCommandBody),
        (status = 400, description = "`invalid_path`", body = ErrorBody),
        (status = 401, description = "No API key, or an unknown or revoked one", body = ErrorBody),
        (status = 404, description = "No such cohort, or no such command for it", body = ErrorBody),
        (status = 500, description = "`internal`: a store failure, logged", body = ErrorBody),
    ),
)]
pub(super) async fn get_cohort_command(
    Caller(by): Caller,
    State(state): State<ApiState>,
    ApiPath((id, command_id)): ApiPath<(String, String)>,
) -> Result<Json<CohortCommandBody>, ApiError> {
    let cohort = access::cohort(&state, &by, &id).await?;
    if !valid_command_id(&command_id) {
        return Err(ApiError::not_found("command"));
    }
    let command = state
        .store
        .cohort_command(&cohort.id, &command_id)
        .await?
        .ok_or_else(|| ApiError::not_found("command"))?;
    Ok(Json(command.into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(v: serde_json::Value) -> SendCommand {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn command_bodies() {
        use serde_json::json;
        let ok = new_command(
            body(json!({"name": " reboot ", "params": {"delay_s": 5}})),
            "k",
        )
        .unwrap();
        assert_eq!(ok.name, "reboot");
        assert!(uuid::Uuid::parse_str(&ok.id).is_ok(), "a generated id");
        assert_eq!(ok.timeout_ms, DEFAULT_TIMEOUT_S as i64 * 1000);
        assert_eq!(ok.sent_by, "k");
        let given =
            new_command(body(json!({"id": "c-1", "name": "x", "timeout_s": 1})), "k").unwrap();
        assert_eq!((given.id.as_str(), given.timeout_ms), ("c-1", 1000));
        assert!(new_command(body(json!({"name": "x", "params": null})), "k")
            .unwrap()
            .params
            .is_none());

        let cases = [
            (json!({"id": "a/b", "name": "x"}), "invalid_command_id"),
            (json!({"id": "", "name": "x"}), "invalid_command_id"),
            (
                json!({"id": "x".repeat(129), "name": "x"}),
                "invalid_command_id",
            ),
            (json!({"name": "  "}), "invalid_command_name"),
            (json!({"name": "a\nb"}), "invalid_command_name"),
            (json!({"name": "x".repeat(129)}), "invalid_command_name"),
            (json!({"name": "x", "params": [1]}), "invalid_params"),
            (json!({"name": "x", "params": "s"}), "invalid_params"),
            (json!({"name": "x", "timeout_s": 0}), "invalid_timeout"),
            (
                json!({"name": "x", "timeout_s": MAX_TIMEOUT_S + 1}),
                "invalid_timeout",
            ),
            (
                json!({"name": "x", "params": {"blob": "x".repeat(MAX_COMMAND_BYTES)}}),
                "command_too_large",
            ),
        ];
        for (b, code) in cases {
            let e = new_command(body(b.clone()), "k").err().unwrap();
            assert_eq!(
                (e.status, e.code),
                (StatusCode::UNPROCESSABLE_ENTITY, code),
                "{b}"
            );
        }
    }

    #[test]
    fn status_is_derived_when_read() {
        let now = now_ms();
        let command = |sent_at_ms, ack| DeviceCommand {
            device_id: fleet_wire::DeviceId::parse("d").unwrap(),
            cohort_id: None,
            id: "c".into(),
            name: "n".into(),
            params: None,
            sent_at_ms,
            timeout_ms: 10_000,
            ack,
        };
        let ack = Some(crate::store::CommandAckRecord {
            status: "succeeded".into(),
            message: None,
            at_ms: now,
        });
        assert_eq!(CommandBody::from(command(now, None)).status, "sent");
        assert_eq!(
            CommandBody::from(command(now - 20_000, None)).status,
            "timed_out"
        );
        assert_eq!(
            CommandBody::from(command(now - 20_000, ack.clone())).status,
            "acknowledged",
            "a late ack wins over the timeout"
        );
        let cohort = |devices, acks: &[(&str, u64)], sent_at_ms| CohortCommand {
            cohort_id: "c".into(),
            id: "c".into(),
            name: "n".into(),
            params: None,
            sent_at_ms,
            timeout_ms: 10_000,
            devices,
            acks: acks.iter().map(|(s, n)| (s.to_string(), *n)).collect(),
        };
        let b = CohortCommandBody::from(cohort(3, &[("succeeded", 1)], now));
        assert_eq!((b.status, b.pending), ("sent", 2));
        let b = CohortCommandBody::from(cohort(3, &[("succeeded", 1)], now - 20_000));
        assert_eq!((b.status, b.pending), ("timed_out", 2));
        let b = CohortCommandBody::from(cohort(2, &[("succeeded", 1), ("failed", 1)], now));
        assert_eq!((b.status, b.pending), ("acknowledged", 0));
    }
}

//! Devices: one device, the filtered and paginated list, and its telemetry history.

use axum::extract::State;
use axum::Json;
use base64::Engine;
use fleet_wire::DeviceId;
use serde::Serialize;
use utoipa::ToSchema;

use super::auth::Caller;
use super::bodies::DeviceBody;
use super::device_filter::{self, DeviceFilterParams};
use super::error::ErrorBody;
use super::extract::{ApiPath, ApiQuery};
use super::paging::{decode_cursor, encode_cursor, parse_limit, DEFAULT_LIMIT};
use super::validate::path_device;
use super::{access, rfc3339, rfc3339_opt, ApiError, ApiState};
use crate::store::{Device, DeviceCursor, DeviceFilter, DeviceSort, TelemetryRecord};

/// One session of the device.
#[derive(Serialize, ToSchema)]
pub(super) struct SessionBody {
    /// The session's epoch: it counts the device's sessions.
    epoch: i64,
    started_at: String,
    /// None while the session is live (or its end is not known yet).
    ended_at: Option<String>,
    /// Why it ended: `client`, `keepalive_timeout`, `takeover`, `revoked`, `reassigned`, ...
    end_reason: Option<String>,
    remote_addr: Option<String>,
    /// `mqtt3.1.1` or `mqtt5`.
    protocol: Option<String>,
}

/// A connection attempt with the device's id that the broker refused.
#[derive(Serialize, ToSchema)]
pub(super) struct RejectedBody {
    at: String,
    /// Such as `pin_mismatch`, `certificate_revoked`, `quarantined`, `client_id_mismatch`.
    reason: &'static str,
    /// For people: what the reason means.
    message: String,
    remote_addr: String,
}

/// How many sessions and refused attempts a device's detail shows.
const DETAIL_HISTORY: usize = 20;

/// A certificate of the device that is refused from now on.
#[derive(Serialize, ToSchema)]
pub(super) struct RevokedCertificateBody {
    /// Hex SHA-256 of the certificate's DER.
    fingerprint_sha256: String,
    /// Why, as the operator said (or `revoked by an operator`).
    reason: String,
    /// RFC 3339, UTC.
    revoked_at: String,
}

/// A device with its diagnostics.
#[derive(Serialize, ToSchema)]
pub(super) struct DeviceDetail {
    #[serde(flatten)]
    device: DeviceBody,
    /// Whether the device's certificate (`certificate`) is revoked: it can no longer connect.
    certificate_revoked: bool,
    /// The device's revoked certificates (its certificate, its pin), newest first.
    revoked_certificates: Vec<RevokedCertificateBody>,
    /// Its most recent sessions, newest first (up to 20).
    sessions: Vec<SessionBody>,
    /// Its most recent refused connection attempts, newest first (up to 20), as this broker
    /// saw them since it started.
    rejected_attempts: Vec<RejectedBody>,
}

/// One page of devices, in the order asked for.
#[derive(Serialize, ToSchema)]
pub(super) struct DevicePage {
    items: Vec<DeviceBody>,
    /// Pass as `cursor` for the next page; none on the last page.
    next_cursor: Option<String>,
}

/// One telemetry message.
#[derive(Serialize, ToSchema)]
pub(super) struct TelemetryBody {
    /// The session it came in.
    epoch: u64,
    /// Its sequence number within the session.
    seq: u64,
    /// RFC 3339, UTC.
    received_at: String,
    /// The payload as the device sent it, any JSON value.
    payload: serde_json::Value,
}

impl From<TelemetryRecord> for TelemetryBody {
    fn from(t: TelemetryRecord) -> Self {
        Self {
            epoch: t.epoch,
            seq: t.seq,
            received_at: rfc3339(t.received_at_ms),
            payload: t.payload,
        }
    }
}

/// A device's most recent telemetry, newest first.
#[derive(Serialize, ToSchema)]
pub(super) struct TelemetryPage {
    items: Vec<TelemetryBody>,
    /// Pass as `cursor` for the next (older) page; none on the last page.
    next_cursor: Option<String>,
}

/// The device list's query: the device filters (`device_filter`), `sort`, `limit` and `cursor`
/// at most once each, but `tag=key:value` any number of times (all must match).
#[derive(Debug, Default, PartialEq)]
struct ListQuery {
    filter: DeviceFilter,
    limit: u32,
    sort: DeviceSort,
    after: Option<DeviceCursor>,
}

/// A cursor of a sorted listing: the sort it belongs to, the last row's sort key and id. The
/// id order keeps its plain cursor (the id alone).
fn encode_sorted_cursor(sort: DeviceSort, d: &Device) -> String {
    match sort {
        DeviceSort::Id => encode_cursor(d.id.as_str()),
        _ => base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(format!(
            "{}\n{}\n{}",
            sort.as_str(),
            sort.key_of(d),
            d.id
        )),
    }
}

fn decode_sorted_cursor(sort: DeviceSort, cursor: &str) -> Option<DeviceCursor> {
    if sort == DeviceSort::Id {
        return decode_cursor(cursor)
            .and_then(|id| DeviceId::parse(&id).ok())
            .map(|id| DeviceCursor { key: 0, id });
    }
    let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(cursor)
        .ok()?;
    let text = std::str::from_utf8(&raw).ok()?;
    let mut parts = text.splitn(3, '\n');
    let (name, key, id) = (parts.next()?, parts.next()?, parts.next()?);
    (name == sort.as_str()).then_some(())?;
    Some(DeviceCursor {
        key: key.parse().ok()?,
        id: DeviceId::parse(id).ok()?,
    })
}

fn parse_list_query(pairs: Vec<(String, String)>) -> Result<ListQuery, ApiError> {
    let bad = |m: String| ApiError::bad_request("invalid_query", m);
    let (mut sort, mut limit, mut cursor) = (DeviceSort::default(), DEFAULT_LIMIT, None);
    let filter = device_filter::parse_query(pairs, |key, value| {
        match key {
            "sort" => {
                sort = DeviceSort::parse(&value).ok_or_else(|| {
                    let known: Vec<_> = DeviceSort::ALL.iter().map(|s| s.as_str()).collect();
                    bad(format!("sort must be one of {}", known.join(", ")))
                })?;
            }
            "limit" => limit = parse_limit(&value)?,
            "cursor" => cursor = Some(value),
            other => return Err(bad(format!("unknown query parameter {other:?}"))),
        }
        Ok(())
    })?;
    let after = match cursor {
        Some(c) => Some(decode_sorted_cursor(sort, &c).ok_or_else(|| {
            bad("invalid cursor (a cursor resumes only the sort it came from)".into())
        })?),
        None => None,
    };
    Ok(ListQuery {
        filter,
        limit,
        sort,
        after,
    })
}

/// One device: identity, state, presence, reported state and last telemetry, with its
/// connection history and its recently refused connection attempts.
///
/// Role: viewer (any valid API key).
#[utoipa::path(
    get,
    path = "/api/v1/devices/{device_id}",
    tag = "devices",
    security(("api_key" = [])),
    params(("device_id" = String, Path, description = "The device's id")),
    responses(
        (status = 200, description = "The device", body = DeviceDetail),
        (status = 400, description = "`invalid_path`", body = ErrorBody),
        (status = 401, description = "No API key, or an unknown or revoked one", body = ErrorBody),
        (status = 404, description = "No such device (also for an id that cannot be valid)", body = ErrorBody),
        (status = 500, description = "`internal`: a store failure, logged", body = ErrorBody),
    ),
)]
pub(super) async fn get_device(
    Caller(by): Caller,
    State(state): State<ApiState>,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<DeviceDetail>, ApiError> {
    let id = path_device(&id)?;
    let device = access::device(&state, &by, &id).await?;
    let sessions = state
        .store
        .device_sessions(&id, DETAIL_HISTORY as u32)
        .await?
        .into_iter()
        .map(|s| SessionBody {
            epoch: s.epoch,
            started_at: rfc3339(s.started_at_ms),
            ended_at: rfc3339_opt(s.ended_at_ms),
            end_reason: s.end_reason,
            remote_addr: s.remote_addr,
            protocol: s.protocol,
        })
        .collect();
    let rejected_attempts = state
        .ops
        .rejected_attempts(&id, DETAIL_HISTORY)
        .into_iter()
        .map(|a| RejectedBody {
            at: rfc3339(a.at_ms),
            reason: a.reason.as_str(),
            message: a.reason.to_string(),
            remote_addr: a.remote_addr,
        })
        .collect();
    let revoked_certificates: Vec<RevokedCertificateBody> = state
        .store
        .revoked_certificates_of(&id)
        .await?
        .into_iter()
        .map(|(fingerprint_sha256, reason, at)| RevokedCertificateBody {
            fingerprint_sha256,
            reason,
            revoked_at: rfc3339(at),
        })
        .collect();
    let certificate_revoked = device.certificate.as_ref().is_some_and(|c| {
        revoked_certificates
            .iter()
            .any(|r| r.fingerprint_sha256 == c.fingerprint_sha256)
    });
    Ok(Json(DeviceDetail {
        device: device.into(),
        certificate_revoked,
        revoked_certificates,
        sessions,
        rejected_attempts,
    }))
}

/// Lists devices, filtered, sorted (by id unless `sort` says otherwise) and paginated. Every
/// parameter but `tag` at most once.
///
/// Role: viewer (any valid API key).
#[utoipa::path(
    get,
    path = "/api/v1/devices",
    tag = "devices",
    security(("api_key" = [])),
    params(
        DeviceFilterParams,
        ("sort" = Option<String>, Query, description = "`id` (default), `last_seen` (never seen first), `-last_seen` (most recently seen first), `created_at` or `-created_at`; ties in id order"),
        ("limit" = Option<u32>, Query, minimum = 1, maximum = 1000,
            description = "Page size, 100 by default"),
        ("cursor" = Option<String>, Query, description = "`next_cursor` of the previous page, with the same `sort`"),
    ),
    responses(
        (status = 200, description = "One page of devices", body = DevicePage),
        (status = 400, description = "`invalid_query`: an unknown or repeated parameter, or a bad value", body = ErrorBody),
        (status = 401, description = "No API key, or an unknown or revoked one", body = ErrorBody),
        (status = 500, description = "`internal`: a store failure, logged", body = ErrorBody),
    ),
)]
pub(super) async fn list_devices(
    Caller(by): Caller,
    State(state): State<ApiState>,
    ApiQuery(pairs): ApiQuery<Vec<(String, String)>>,
) -> Result<Json<DevicePage>, ApiError> {
    let q = parse_list_query(pairs)?;
    // A scoped key's listing is its filter within the scope: a filter naming another product
    // or cohort lists nothing.
    let Some(filter) = device_filter::scoped(&by, q.filter) else {
        return Ok(Json(DevicePage {
            items: Vec::new(),
            next_cursor: None,
        }));
    };
    let mut devices = state
        .store
        .devices_sorted(&filter, q.sort, q.after.as_ref(), q.limit + 1)
        .await?;
    let next_cursor = if devices.len() > q.limit as usize {
        devices.truncate(q.limit as usize);
        devices.last().map(|d| encode_sorted_cursor(q.sort, d))
    } else {
        None
    };
    Ok(Json(DevicePage {
        items: devices.into_iter().map(Into::into).collect(),
        next_cursor,
    }))
}

/// A device's most recent telemetry messages.
///
/// Role: viewer (any valid API key).
#[utoipa::path(
    get,
    path = "/api/v1/devices/{device_id}/telemetry",
    tag = "devices",
    security(("api_key" = [])),
    params(
        ("device_id" = String, Path, description = "The device's id"),
        ("limit" = Option<u32>, Query, minimum = 1, maximum = 1000,
            description = "How many, 100 by default"),
        ("cursor" = Option<String>, Query, description = "`next_cursor` of the previous page"),
    ),
    responses(
        (status = 200, description = "The newest messages, one page", body = TelemetryPage),
        (status = 400, description = "`invalid_path`, or `invalid_query`: an unknown parameter or a bad limit", body = ErrorBody),
        (status = 401, description = "No API key, or an unknown or revoked one", body = ErrorBody),
        (status = 404, description = "No such device", body = ErrorBody),
        (status = 500, description = "`internal`: a store failure, logged", body = ErrorBody),
    ),
)]
pub(super) async fn device_telemetry(
    Caller(by): Caller,
    State(state): State<ApiState>,
    ApiPath(id): ApiPath<String>,
    ApiQuery(pairs): ApiQuery<Vec<(String, String)>>,
) -> Result<Json<TelemetryPage>, ApiError> {
    let mut limit = DEFAULT_LIMIT;
    let mut before = None;
    let bad_cursor = || ApiError::bad_request("invalid_query", "invalid cursor");
    for (key, value) in pairs {
        match key.as_str() {
            "limit" => limit = parse_limit(&value)?,
            "cursor" => {
                let raw = decode_cursor(&value).ok_or_else(bad_cursor)?;
                let (epoch, seq) = raw.split_once('.').ok_or_else(bad_cursor)?;
                before = Some((
                    epoch.parse().map_err(|_| bad_cursor())?,
                    seq.parse().map_err(|_| bad_cursor())?,
                ));
            }
            other => {
                return Err(ApiError::bad_request(
                    "invalid_query",
                    format!("unknown query parameter {other:?}"),
                ))
            }
        }
    }
    let id = path_device(&id)?;
    access::device(&state, &by, &id).await?;
    let mut items = state.store.telemetry_before(&id, before, limit + 1).await?;
    let next_cursor = if items.len() > limit as usize {
        items.truncate(limit as usize);
        items
            .last()
            .map(|t| encode_cursor(&format!("{}.{}", t.epoch, t.seq)))
    } else {
        None
    };
    Ok(Json(TelemetryPage {
        items: items.into_iter().map(Into::into).collect(),
        next_cursor,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::DeviceState;

    fn q(s: &[(&str, &str)]) -> Result<ListQuery, ApiError> {
        parse_list_query(
            s.iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        )
    }

    #[test]
    fn list_query_table() {
        let ok = q(&[
            ("state", "online"),
            ("tag", "site:eu-1"),
            ("tag", "url:http://x"),
            ("online", "true"),
            ("limit", "5"),
        ])
        .unwrap();
        assert_eq!(ok.filter.state, Some(DeviceState::Online));
        assert_eq!(
            ok.filter.tags,
            vec![
                ("site".to_owned(), "eu-1".to_owned()),
                ("url".to_owned(), "http://x".to_owned())
            ]
        );
        assert_eq!(ok.filter.online, Some(true));
        assert_eq!(ok.limit, 5);
        assert_eq!(q(&[]).unwrap().limit, DEFAULT_LIMIT);

        let cursor = encode_cursor("dev-9");
        assert_eq!(
            q(&[("cursor", &cursor)])
                .unwrap()
                .after
                .unwrap()
                .id
                .as_str(),
            "dev-9"
        );
        assert_eq!(
            q(&[("sort", "-last_seen")]).unwrap().sort,
            DeviceSort::LastSeenDesc
        );
        // A sorted cursor resumes its own sort only.
        let sorted = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode("-last_seen\n5\nd-1");
        let after = q(&[("cursor", &sorted), ("sort", "-last_seen")])
            .unwrap()
            .after
            .unwrap();
        assert_eq!((after.key, after.id.as_str()), (5, "d-1"));
        assert!(q(&[("sort", "created_at"), ("cursor", &sorted)]).is_err());
        assert!(q(&[("cursor", &sorted)]).is_err(), "not an id cursor");
        assert!(q(&[("sort", "colour")]).is_err());

        for bad in [
            vec![("limit", "0")],
            vec![("limit", "1001")],
            vec![("limit", "x")],
            vec![("limit", "5"), ("limit", "6")],
            vec![("cursor", "!!")],
            vec![("cursor", "YS9i")], // "a/b": not a device id
            vec![("tag", "nocolon")],
            vec![("tag", ":v")],
            vec![("tag", "k:")],
            vec![("online", "yes")],
            vec![("state", "sleeping")],
            vec![("colour", "red")],
        ] {
            let err = q(&bad).unwrap_err();
            assert_eq!(err.status, axum::http::StatusCode::BAD_REQUEST, "{bad:?}");
        }
    }
}

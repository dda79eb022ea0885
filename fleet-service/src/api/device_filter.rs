//! The device filter as a query string: what `GET /devices` lists and `DELETE /devices`
//! deletes are chosen by the same parameters, read here, and narrowed to the key's scope the
//! same way.

use broker::auth::ServicePrincipal;
use utoipa::IntoParams;

use super::openapi::DeviceStateName;
use super::validate::parse_time;
use super::{access, ApiError};
use crate::store::{DeviceFilter, DeviceState};

/// The device filters as the OpenAPI document lists them, for every route that takes them
/// (`params(DeviceFilterParams, ...)`). Only documentation: [`parse_query`] reads the query
/// itself, so that an unknown or repeated parameter is refused by name.
#[derive(IntoParams)]
#[into_params(parameter_in = Query)]
#[allow(dead_code)] // read by utoipa's derive only
pub(super) struct DeviceFilterParams {
    /// Only devices in this state.
    state: Option<DeviceStateName>,
    /// Only devices of this cohort.
    cohort_id: Option<String>,
    /// Only devices of this product.
    product_id: Option<String>,
    /// Only devices of this CA (it provisioned them, or signed the certificate they first connected with).
    ca_id: Option<String>,
    /// Only online (`true`) or offline (`false`) devices.
    online: Option<bool>,
    /// Only devices reporting this firmware version.
    firmware_version: Option<String>,
    /// RFC 3339: only devices last seen before this.
    last_seen_before: Option<String>,
    /// RFC 3339: only devices last seen at or after this.
    last_seen_after: Option<String>,
    /// Only ids starting with this.
    id_prefix: Option<String>,
    /// RFC 3339: only devices whose certificate expires before this.
    cert_expires_before: Option<String>,
    /// `key:value`; may repeat, and every tag must match.
    #[param(style = Form, explode)]
    tag: Option<Vec<String>>,
}

/// Reads a query of device filters and the caller's own parameters: `other` gets each
/// parameter that is not a filter (and refuses those it does not know). Every parameter but
/// `tag` at most once.
pub(super) fn parse_query(
    pairs: Vec<(String, String)>,
    mut other: impl FnMut(&str, String) -> Result<(), ApiError>,
) -> Result<DeviceFilter, ApiError> {
    let mut filter = DeviceFilter::default();
    let mut seen = std::collections::HashSet::new();
    for (key, value) in pairs {
        if key != "tag" && !seen.insert(key.clone()) {
            return Err(ApiError::bad_request(
                "invalid_query",
                format!("{key} may be given only once"),
            ));
        }
        if let Some(value) = apply(&mut filter, &key, value)? {
            other(&key, value)?;
        }
    }
    Ok(filter)
}

/// Applies the query parameter `key` to `filter` if it is one of the device filters, or gives
/// its value back when it is not one.
fn apply(filter: &mut DeviceFilter, key: &str, value: String) -> Result<Option<String>, ApiError> {
    let bad = |m: String| ApiError::bad_request("invalid_query", m);
    match key {
        "state" => {
            filter.state = Some(DeviceState::parse(&value).ok_or_else(|| {
                let known: Vec<_> = DeviceState::ALL.iter().map(|s| s.as_str()).collect();
                bad(format!("state must be one of {}", known.join(", ")))
            })?);
        }
        "cohort_id" => filter.cohort_id = Some(value),
        "product_id" => filter.product_id = Some(value),
        "ca_id" => filter.ca_id = Some(value),
        "online" => {
            filter.online = Some(match value.as_str() {
                "true" => true,
                "false" => false,
                _ => return Err(bad("online must be true or false".into())),
            });
        }
        "tag" => match value.split_once(':') {
            Some((k, v)) if !k.is_empty() && !v.is_empty() => {
                filter.tags.push((k.to_owned(), v.to_owned()));
            }
            _ => return Err(bad(format!("tag must be key:value, got {value:?}"))),
        },
        "firmware_version" => filter.firmware_version = Some(value),
        "last_seen_before" => filter.last_seen_before_ms = Some(parse_time(key, &value)?),
        "last_seen_after" => filter.last_seen_after_ms = Some(parse_time(key, &value)?),
        "cert_expires_before" => filter.cert_expires_before_ms = Some(parse_time(key, &value)?),
        "id_prefix" => {
            if value.is_empty()
                || value.len() > 128
                || !value
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "._:-".contains(c))
            {
                return Err(bad(
                    "id_prefix must be 1 to 128 device-id characters (A-Z a-z 0-9 . _ : -)".into(),
                ));
            }
            filter.id_prefix = Some(value);
        }
        _ => return Ok(Some(value)),
    }
    Ok(None)
}

/// `filter` within the key's organization and scope; `None` when it names a product or
/// cohort outside the scope (it matches nothing the key sees).
pub(super) fn scoped(p: &ServicePrincipal, mut filter: DeviceFilter) -> Option<DeviceFilter> {
    filter.org_id = Some(p.org_id.clone());
    let (scope_product, scope_cohort) = access::scope_filter(p);
    for (scope, wanted) in [
        (scope_product, &mut filter.product_id),
        (scope_cohort, &mut filter.cohort_id),
    ] {
        if let Some(scope) = scope {
            if wanted.as_deref().is_some_and(|f| f != scope) {
                return None;
            }
            *wanted = Some(scope.to_owned());
        }
    }
    Some(filter)
}

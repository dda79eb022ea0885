//! Response bodies that more than one resource module renders: a device (created, changed
//! or read) and an API key (issued on its own or with a new organization).

use std::collections::BTreeMap;

use serde::Serialize;
use utoipa::ToSchema;

use super::openapi::{ApiKeyRole, DeviceStateName};
use super::{rfc3339, rfc3339_opt};
use crate::store::{ApiKeyRecord, Device};

/// The device's client certificate.
#[derive(Serialize, ToSchema)]
pub(super) struct CertificateBody {
    /// Hex SHA-256 of the certificate's DER.
    fingerprint_sha256: String,
    subject: String,
    issuer: String,
    serial: String,
    /// RFC 3339, UTC.
    not_after: String,
}

/// A device. Timestamps are RFC 3339, UTC.
#[derive(Serialize, ToSchema)]
pub(super) struct DeviceBody {
    id: String,
    product_id: String,
    cohort_id: Option<String>,
    /// The CA that signed its certificate.
    ca_id: Option<String>,
    tags: BTreeMap<String, String>,
    #[schema(value_type = DeviceStateName)]
    state: &'static str,
    state_reason: String,
    state_changed_at: String,
    online: bool,
    last_seen: Option<String>,
    connected_at: Option<String>,
    /// Counts the device's sessions; a newer session's events win over an older one's.
    session_epoch: u64,
    disconnect_reason: Option<String>,
    remote_addr: Option<String>,
    /// As the device last reported it.
    firmware_version: Option<String>,
    /// The device's last reported state, any JSON value.
    reported: Option<serde_json::Value>,
    reported_at: Option<String>,
    /// The device's last telemetry payload, any JSON value.
    last_telemetry: Option<serde_json::Value>,
    last_telemetry_at: Option<String>,
    certificate: Option<CertificateBody>,
    created_at: String,
}

impl From<Device> for DeviceBody {
    fn from(d: Device) -> Self {
        Self {
            id: d.id.to_string(),
            product_id: d.product_id,
            cohort_id: d.cohort_id.map(|c| c.to_string()),
            ca_id: d.ca_id,
            tags: d.tags,
            state: d.state.as_str(),
            state_reason: d.state_reason,
            state_changed_at: rfc3339(d.state_changed_at_ms),
            online: d.online,
            last_seen: rfc3339_opt(d.last_seen_ms),
            connected_at: rfc3339_opt(d.connected_at_ms),
            session_epoch: d.session_epoch,
            disconnect_reason: d.disconnect_reason,
            remote_addr: d.remote_addr,
            firmware_version: d.firmware_version,
            reported: d.reported,
            reported_at: rfc3339_opt(d.reported_at_ms),
            last_telemetry: d.last_telemetry,
            last_telemetry_at: rfc3339_opt(d.last_telemetry_at_ms),
            certificate: d.certificate.map(|c| CertificateBody {
                fingerprint_sha256: c.fingerprint_sha256,
                subject: c.subject,
                issuer: c.issuer,
                serial: c.serial,
                not_after: rfc3339(c.not_after_ms),
            }),
            created_at: rfc3339(d.created_at_ms),
        }
    }
}

#[derive(Serialize, ToSchema)]
#[schema(as = ApiKeyBody)]
pub(super) struct KeyBody {
    id: String,
    org_id: String,
    name: String,
    #[schema(value_type = ApiKeyRole)]
    role: &'static str,
    /// The product the key is scoped to; none for a key of the whole organization.
    product_id: Option<String>,
    /// The cohort the key is scoped to, within `product_id`.
    cohort_id: Option<String>,
    /// RFC 3339, UTC.
    created_at: String,
    /// RFC 3339, UTC; none while the key is valid.
    revoked_at: Option<String>,
    /// Only in the answer to the create call.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) secret: Option<String>,
}

impl From<ApiKeyRecord> for KeyBody {
    fn from(k: ApiKeyRecord) -> Self {
        let (product_id, cohort_id) = k.scope.narrows_to();
        let (product_id, cohort_id) = (product_id.map(str::to_owned), cohort_id.map(str::to_owned));
        Self {
            id: k.id,
            org_id: k.org_id,
            name: k.name,
            role: k.role.as_str(),
            product_id,
            cohort_id,
            created_at: rfc3339(k.created_at_ms),
            revoked_at: rfc3339_opt(k.revoked_at_ms),
            secret: None,
        }
    }
}

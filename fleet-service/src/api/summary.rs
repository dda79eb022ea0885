//! The fleet summary: what an operator's dashboard shows, in one call.

use std::collections::{BTreeMap, HashMap};

use axum::extract::State;
use axum::Json;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::auth::Caller;
use super::error::ErrorBody;
use super::extract::ApiQuery;
use super::{access, ApiError, ApiState};
use crate::store::{DeviceState, SummaryScope, FIRMWARE_VERSIONS};

const DEFAULT_WINDOW_DAYS: u32 = 30;
const MAX_WINDOW_DAYS: u32 = 3650;
const DAY_MS: i64 = 86_400_000;

#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(super) struct SummaryQuery {
    /// Only this product's devices.
    product_id: Option<String>,
    /// Only this cohort's devices.
    cohort_id: Option<String>,
    /// Certificates expiring within this many days count as expiring (1 to 3650; 30 by
    /// default).
    expiring_within_days: Option<u32>,
}

#[derive(Serialize, ToSchema)]
pub(super) struct FirmwareCount {
    /// None: devices that never reported a version.
    version: Option<String>,
    devices: i64,
}

#[derive(Serialize, ToSchema)]
pub(super) struct ProductCount {
    product_id: String,
    name: String,
    devices: i64,
    online: i64,
}

#[derive(Serialize, ToSchema)]
pub(super) struct CohortCount {
    /// None: the product's devices outside every cohort.
    cohort_id: Option<String>,
    product_id: String,
    name: Option<String>,
    devices: i64,
    online: i64,
}

#[derive(Serialize, ToSchema)]
pub(super) struct CertificateCounts {
    window_days: u32,
    /// Devices whose certificate has expired.
    device_expired: i64,
    /// Devices whose certificate expires within the window.
    device_expiring: i64,
    /// The organization's CA certificates that have expired (none for a scoped key: CAs
    /// belong to the whole organization).
    ca_expired: Option<i64>,
    /// The organization's CA certificates expiring within the window.
    ca_expiring: Option<i64>,
}

/// Counts over the devices the key sees (or the product or cohort asked for).
#[derive(Serialize, ToSchema)]
pub(super) struct FleetSummaryBody {
    devices: i64,
    online: i64,
    offline: i64,
    quarantined: i64,
    /// Every state, zeros included.
    by_state: BTreeMap<&'static str, i64>,
    /// The 50 most common versions, most common first.
    firmware_versions: Vec<FirmwareCount>,
    /// Devices on versions beyond those 50.
    other_firmware_versions: i64,
    products: Vec<ProductCount>,
    cohorts: Vec<CohortCount>,
    certificates: CertificateCounts,
}

/// The fleet in one call: devices by state and presence, firmware versions, per product and
/// cohort, quarantined devices, and certificates expired or expiring within a window.
///
/// Role: viewer (any valid API key); a scoped key's summary covers its scope.
#[utoipa::path(
    get,
    path = "/api/v1/fleet/summary",
    tag = "devices",
    security(("api_key" = [])),
    params(SummaryQuery),
    responses(
        (status = 200, description = "The counts", body = FleetSummaryBody),
        (status = 400, description = "`invalid_query`", body = ErrorBody),
        (status = 401, description = "No API key, or an unknown or revoked one", body = ErrorBody),
        (status = 404, description = "No such product or cohort", body = ErrorBody),
        (status = 500, description = "`internal`: a store failure, logged", body = ErrorBody),
    ),
)]
pub(super) async fn fleet_summary(
    Caller(by): Caller,
    State(state): State<ApiState>,
    ApiQuery(q): ApiQuery<SummaryQuery>,
) -> Result<Json<FleetSummaryBody>, ApiError> {
    let window_days = q.expiring_within_days.unwrap_or(DEFAULT_WINDOW_DAYS);
    if !(1..=MAX_WINDOW_DAYS).contains(&window_days) {
        return Err(ApiError::bad_request(
            "invalid_query",
            format!("expiring_within_days must be 1 to {MAX_WINDOW_DAYS}"),
        ));
    }
    // What is asked for must be seen; what is not asked for is the key's scope.
    let mut product_id = match &q.product_id {
        Some(p) => Some(access::product(&state, &by, p).await?.id),
        None => None,
    };
    let cohort_id = match &q.cohort_id {
        Some(c) => {
            let cohort = access::cohort(&state, &by, c).await?;
            if product_id.as_ref().is_some_and(|p| *p != cohort.product_id) {
                return Err(ApiError::not_found("cohort"));
            }
            product_id = Some(cohort.product_id);
            Some(cohort.id)
        }
        None => None,
    };
    let (scope_product, scope_cohort) = access::scope_filter(&by);
    let scope = SummaryScope {
        org_id: by.org_id.clone(),
        product_id: product_id.or(scope_product.map(str::to_owned)),
        cohort_id: cohort_id.or(scope_cohort.map(str::to_owned)),
    };
    let now = crate::store::now_ms();
    let until = now.saturating_add(i64::from(window_days) * DAY_MS);
    let summary = state.store.fleet_summary(&scope, now, until).await?;

    let mut by_state: BTreeMap<&'static str, i64> =
        DeviceState::ALL.iter().map(|s| (s.as_str(), 0)).collect();
    let (mut devices, mut online) = (0, 0);
    let mut products: HashMap<&str, (i64, i64)> = HashMap::new();
    let mut cohorts: HashMap<(&str, Option<&str>), (i64, i64)> = HashMap::new();
    for g in &summary.groups {
        devices += g.devices;
        let on = if g.online { g.devices } else { 0 };
        online += on;
        if let Some(n) = DeviceState::parse(&g.state).and_then(|s| by_state.get_mut(s.as_str())) {
            *n += g.devices;
        }
        let p = products.entry(&g.product_id).or_default();
        p.0 += g.devices;
        p.1 += on;
        let c = cohorts
            .entry((&g.product_id, g.cohort_id.as_deref()))
            .or_default();
        c.0 += g.devices;
        c.1 += on;
    }
    let product_names: HashMap<String, String> = state
        .store
        .products(&by.org_id, None, &crate::store::PageRequest::ALL)
        .await?
        .into_iter()
        .map(|p| (p.id, p.name))
        .collect();
    let mut cohort_names: HashMap<String, String> = HashMap::new();
    for product in products.keys() {
        for c in state.store.cohorts_of(product).await? {
            cohort_names.insert(c.id, c.name);
        }
    }
    let mut products: Vec<ProductCount> = products
        .into_iter()
        .map(|(id, (devices, online))| ProductCount {
            product_id: id.to_owned(),
            name: product_names.get(id).cloned().unwrap_or_default(),
            devices,
            online,
        })
        .collect();
    products.sort_by(|a, b| a.name.cmp(&b.name).then(a.product_id.cmp(&b.product_id)));
    let mut cohorts: Vec<CohortCount> = cohorts
        .into_iter()
        .map(|((product, cohort), (devices, online))| CohortCount {
            cohort_id: cohort.map(str::to_owned),
            product_id: product.to_owned(),
            name: cohort.and_then(|c| cohort_names.get(c).cloned()),
            devices,
            online,
        })
        .collect();
    cohorts.sort_by(|a, b| {
        (&a.product_id, &a.name, &a.cohort_id).cmp(&(&b.product_id, &b.name, &b.cohort_id))
    });

    let named = summary.firmware.len().min(FIRMWARE_VERSIONS as usize);
    let firmware_versions: Vec<FirmwareCount> = summary.firmware[..named]
        .iter()
        .map(|(version, devices)| FirmwareCount {
            version: version.clone(),
            devices: *devices,
        })
        .collect();
    let other_firmware_versions =
        devices - firmware_versions.iter().map(|f| f.devices).sum::<i64>();

    let (ca_expired, ca_expiring) = if by.org_wide() {
        let cas = state
            .store
            .cas(Some(&by.org_id), None, &crate::store::PageRequest::ALL)
            .await?;
        let expired = cas.iter().filter(|c| c.not_after_ms < now).count() as i64;
        let expiring = cas
            .iter()
            .filter(|c| c.not_after_ms >= now && c.not_after_ms < until)
            .count() as i64;
        (Some(expired), Some(expiring))
    } else {
        (None, None)
    };
    Ok(Json(FleetSummaryBody {
        devices,
        online,
        offline: devices - online,
        quarantined: summary.quarantined,
        by_state,
        firmware_versions,
        other_firmware_versions,
        products,
        cohorts,
        certificates: CertificateCounts {
            window_days,
            device_expired: summary.certificates_expired,
            device_expiring: summary.certificates_expiring,
            ca_expired,
            ca_expiring,
        },
    }))
}

//! What a key may see: every handler loads the resources it names through here.
//!
//! # Invariants
//! - A resource of another organization, or outside the key's product or cohort scope, is
//!   answered exactly like one that does not exist (404 with the same message), so a key learns
//!   nothing about what it cannot see.
//! - Organization-level resources (CAs, API keys, signing keys) need an unscoped key; a scoped key is told so with a 403, which reveals nothing about other organizations.

use broker::auth::{Place, ServicePrincipal};
use fleet_wire::DeviceId;

use super::{ApiError, ApiState};
use crate::store::{CaCertificate, Cohort, Deployment, Device, Product, Release};

/// Refuses a product- or cohort-scoped key.
pub(super) fn org_wide(p: &ServicePrincipal) -> Result<(), ApiError> {
    if p.org_wide() {
        Ok(())
    } else {
        Err(ApiError::forbidden(
            "this key is scoped to a product or cohort; this needs a key for the whole \
             organization",
        ))
    }
}

/// The product `id`, if the key sees it.
pub(super) async fn product(
    state: &ApiState,
    p: &ServicePrincipal,
    id: &str,
) -> Result<Product, ApiError> {
    match state.store.product(id).await? {
        Some(product)
            if p.sees(Place {
                org_id: &product.org_id,
                product_id: &product.id,
                cohort_id: None,
            }) =>
        {
            Ok(product)
        }
        _ => Err(ApiError::not_found("product")),
    }
}

/// The cohort `id`, if the key sees it.
pub(super) async fn cohort(
    state: &ApiState,
    p: &ServicePrincipal,
    id: &str,
) -> Result<Cohort, ApiError> {
    match state.store.cohort(id).await? {
        Some(cohort)
            if p.sees(Place {
                org_id: &cohort.org_id,
                product_id: &cohort.product_id,
                cohort_id: Some(&cohort.id),
            }) =>
        {
            Ok(cohort)
        }
        _ => Err(ApiError::not_found("cohort")),
    }
}

/// Whether the key sees a device.
pub(super) fn sees_device(p: &ServicePrincipal, d: &Device) -> bool {
    p.sees(Place {
        org_id: &d.org_id,
        product_id: &d.product_id,
        cohort_id: Some(d.cohort_id.as_ref().map_or("", |c| c.as_str())),
    })
}

/// The device `id`, if the key sees it. A device outside every cohort is seen only by keys
/// that cover its whole product.
pub(super) async fn device(
    state: &ApiState,
    p: &ServicePrincipal,
    id: &DeviceId,
) -> Result<Device, ApiError> {
    match state.store.device(id).await? {
        Some(device) if sees_device(p, &device) => Ok(device),
        _ => Err(ApiError::not_found("device")),
    }
}

/// The CA `id`, if it is the key's organization's. Needs an unscoped key.
pub(super) async fn ca(
    state: &ApiState,
    p: &ServicePrincipal,
    id: &str,
) -> Result<CaCertificate, ApiError> {
    org_wide(p)?;
    match state.store.ca(id).await? {
        Some(ca) if ca.org_id == p.org_id => Ok(ca),
        _ => Err(ApiError::not_found("CA certificate")),
    }
}

/// The release `id`, if the key sees its product.
pub(super) async fn release(
    state: &ApiState,
    p: &ServicePrincipal,
    id: &str,
) -> Result<Release, ApiError> {
    let not_found = || ApiError::not_found("release");
    let release = state.store.release(id).await?.ok_or_else(not_found)?;
    product(state, p, &release.manifest.product_id)
        .await
        .map_err(|_| not_found())?;
    Ok(release)
}

/// The deployment `id`, if the key sees its cohort.
pub(super) async fn deployment(
    state: &ApiState,
    p: &ServicePrincipal,
    id: &str,
) -> Result<Deployment, ApiError> {
    let not_found = || ApiError::not_found("deployment");
    let deployment = state.store.deployment(id).await?.ok_or_else(not_found)?;
    cohort(state, p, deployment.cohort_id.as_str())
        .await
        .map_err(|_| not_found())?;
    Ok(deployment)
}

/// The product and cohort a scoped key narrows a listing to: a listing's own filter is
/// intersected with these (a filter outside the scope lists nothing).
pub(super) fn scope_filter(p: &ServicePrincipal) -> (Option<&str>, Option<&str>) {
    p.scope.narrows_to()
}

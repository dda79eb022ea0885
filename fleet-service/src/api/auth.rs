//! Bearer-token extractors. Put them before any body extractor in a handler, so an
//! unauthenticated or under-privileged request is refused before its body is looked at.
//!
//! Each carries the key's [`ServicePrincipal`]: its organization, role and scope. The role is
//! checked here; what the key may see (organization and scope) is checked by `access` when a
//! handler loads the resource, so a resource outside them is a 404 exactly like a missing one.

use axum::extract::FromRequestParts;
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;
use broker::auth::{ServicePrincipal, ServiceRole};

use super::{ApiError, ApiState};

/// Any valid API key: viewer, operator or admin.
pub struct Caller(pub ServicePrincipal);

/// An API key that may change things: operator or admin.
pub struct Writer(pub ServicePrincipal);

/// An admin API key.
pub struct Admin(pub ServicePrincipal);

fn principal(parts: &Parts, state: &ApiState) -> Result<ServicePrincipal, ApiError> {
    let header = parts
        .headers
        .get(AUTHORIZATION)
        .ok_or_else(|| ApiError::unauthorized("missing Authorization: Bearer <api key>"))?;
    let token = header
        .to_str()
        .ok()
        .and_then(|h| h.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, token)| token.trim())
        .filter(|t| !t.is_empty())
        .ok_or_else(|| ApiError::unauthorized("expected Authorization: Bearer <api key>"))?;
    let p = state
        .ops
        .keys()
        .principal(token)
        .ok_or_else(|| ApiError::unauthorized("unknown or revoked API key"))?;
    // The audit log records who made a mutating request, even one its role may not make.
    if let Some(slot) = parts.extensions.get::<super::audit::AuditSlot>() {
        slot.set(&p);
    }
    Ok(p)
}

#[axum::async_trait]
impl FromRequestParts<ApiState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &ApiState) -> Result<Self, ApiError> {
        principal(parts, state).map(Caller)
    }
}

#[axum::async_trait]
impl FromRequestParts<ApiState> for Writer {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &ApiState) -> Result<Self, ApiError> {
        let p = principal(parts, state)?;
        match p.role {
            ServiceRole::Admin | ServiceRole::Operator => Ok(Writer(p)),
            ServiceRole::Viewer => Err(ApiError::forbidden("viewer keys may only read")),
        }
    }
}

#[axum::async_trait]
impl FromRequestParts<ApiState> for Admin {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &ApiState) -> Result<Self, ApiError> {
        let p = principal(parts, state)?;
        match p.role {
            ServiceRole::Admin => Ok(Admin(p)),
            _ => Err(ApiError::forbidden("only admin keys may do this")),
        }
    }
}

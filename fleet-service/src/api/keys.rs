//! API keys, for admins. A secret is returned once, by the create call.

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use broker::auth::ServiceRole;
use serde::{Deserialize, Serialize};

use super::auth::Admin;
use super::catalog::Items;
use super::error::{ApiJson, ApiPath};
use super::{rfc3339, rfc3339_opt, ApiError, ApiState};
use crate::keys::KeyError;
use crate::store::ApiKeyRecord;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct CreateKey {
    name: String,
    role: String,
}

#[derive(Serialize)]
pub(super) struct KeyBody {
    id: String,
    name: String,
    role: &'static str,
    created_at: String,
    revoked_at: Option<String>,
    /// Only in the answer to the create call.
    #[serde(skip_serializing_if = "Option::is_none")]
    secret: Option<String>,
}

impl From<ApiKeyRecord> for KeyBody {
    fn from(k: ApiKeyRecord) -> Self {
        Self {
            id: k.id,
            name: k.name,
            role: k.role.as_str(),
            created_at: rfc3339(k.created_at_ms),
            revoked_at: rfc3339_opt(k.revoked_at_ms),
            secret: None,
        }
    }
}

pub(super) async fn create_key(
    Admin(admin): Admin,
    State(state): State<ApiState>,
    ApiJson(body): ApiJson<CreateKey>,
) -> Result<(StatusCode, Json<KeyBody>), ApiError> {
    let role = ServiceRole::parse(&body.role).ok_or_else(|| {
        ApiError::unprocessable("invalid_role", "role must be admin, operator or viewer")
    })?;
    let created = state
        .keys
        .create(&body.name, role)
        .await
        .map_err(|e| match e {
            KeyError::Store(e) => ApiError::from(e),
            other => ApiError::unprocessable("invalid_name", other.to_string()),
        })?;
    tracing::info!(key_id = %created.record.id, by = %admin.key_id, "API key issued over REST");
    let mut out = KeyBody::from(created.record);
    out.secret = Some(created.secret);
    Ok((StatusCode::CREATED, Json(out)))
}

pub(super) async fn list_keys(
    _admin: Admin,
    State(state): State<ApiState>,
) -> Result<Json<Items<KeyBody>>, ApiError> {
    let items = state.keys.list().await?;
    Ok(Json(Items {
        items: items.into_iter().map(Into::into).collect(),
    }))
}

pub(super) async fn revoke_key(
    Admin(admin): Admin,
    State(state): State<ApiState>,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<KeyBody>, ApiError> {
    let key = state
        .keys
        .revoke(&id)
        .await?
        .ok_or_else(|| ApiError::not_found("API key"))?;
    tracing::info!(key_id = %key.id, by = %admin.key_id, "API key revoked over REST");
    Ok(Json(key.into()))
}

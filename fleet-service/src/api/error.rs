//! The one error shape of the REST bridge.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;
use utoipa::ToSchema;

use crate::store::{Dependent, StoreError};

/// An error answer: `{"error":{"code":"...","message":"..."}}` with an HTTP status.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
        }
    }

    /// 400: the request is malformed (JSON, query, path).
    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }

    /// 401: no API key, or not one we know.
    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "unauthorized", message)
    }

    /// 403: the key is valid but its role may not do this.
    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "forbidden", message)
    }

    /// 404: no such resource.
    pub fn not_found(what: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no such {what}"),
        )
    }

    /// 409: it already exists.
    pub fn conflict(message: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, "conflict", message)
    }

    /// 409 `in_use`: the `what` cannot be deleted while `dependents` remain; the message says
    /// what to do about each. `devices_query` selects its devices in `DELETE /devices`.
    pub fn in_use(what: &str, dependents: &[(Dependent, u64)], devices_query: &str) -> Self {
        let plural = |n: u64, one: &str, many: &str| {
            if n == 1 {
                format!("1 {one}")
            } else {
                format!("{n} {many}")
            }
        };
        let parts: Vec<String> = dependents
            .iter()
            .map(|&(d, n)| match d {
                Dependent::Products => {
                    format!("{} (delete them first)", plural(n, "product", "products"))
                }
                Dependent::Cohorts => {
                    format!("{} (delete them first)", plural(n, "cohort", "cohorts"))
                }
                Dependent::Devices => format!(
                    "{} (delete them first: DELETE /api/v1/devices?{devices_query} deletes them \
                     in bulk, with dry_run=true it only counts them)",
                    plural(n, "device", "devices")
                ),
                Dependent::CaCertificates => format!(
                    "{} (delete them first)",
                    plural(n, "CA certificate", "CA certificates")
                ),
                Dependent::ProvisioningCas => format!(
                    "{} provisioning into it (change their jitp first)",
                    plural(n, "CA certificate", "CA certificates")
                ),
                Dependent::ApiKeys => format!(
                    "{} scoped to it (revoke them first)",
                    plural(n, "unrevoked API key", "unrevoked API keys")
                ),
                Dependent::LiveDeployments => {
                    "an active or paused deployment (cancel it first)".to_owned()
                }
                Dependent::Other => "other records that refer to it".to_owned(),
            })
            .collect();
        Self::new(
            StatusCode::CONFLICT,
            "in_use",
            format!("the {what} still has {}", parts.join("; ")),
        )
    }

    /// 422: well-formed, but not acceptable.
    pub fn unprocessable(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNPROCESSABLE_ENTITY, code, message)
    }

    /// 500: our fault. The cause is logged, never returned.
    pub fn internal() -> Self {
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "internal error; see the service log",
        )
    }
}

/// The body of every error answer.
#[derive(Serialize, ToSchema)]
pub struct ErrorBody {
    error: ErrorDetail,
}

#[derive(Serialize, ToSchema)]
pub struct ErrorDetail {
    /// Stable and machine-readable: `unauthorized`, `forbidden`, `not_found`, `conflict`,
    /// `invalid_query`, `invalid_name`, ...
    #[schema(example = "not_found")]
    code: &'static str,
    /// For people; may change.
    #[schema(example = "no such product")]
    message: String,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = Json(ErrorBody {
            error: ErrorDetail {
                code: self.code,
                message: self.message,
            },
        });
        let mut response = (self.status, body).into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Conflict(what) => ApiError::conflict(format!("{what} already exists")),
            StoreError::MissingReference(what) => {
                ApiError::unprocessable("invalid_reference", format!("{what} does not exist"))
            }
            StoreError::Collision(id) => {
                ApiError::conflict(format!("device id {id} is owned by another CA"))
            }
            other => {
                tracing::error!(error = %other, "store failure in the REST bridge");
                ApiError::internal()
            }
        }
    }
}

impl From<crate::ops::OpsError> for ApiError {
    fn from(e: crate::ops::OpsError) -> Self {
        match e {
            crate::ops::OpsError::Store(e) => e.into(),
            crate::ops::OpsError::Key(crate::keys::KeyError::Store(e)) => e.into(),
            crate::ops::OpsError::Key(e @ crate::keys::KeyError::BadName) => {
                ApiError::unprocessable("invalid_name", e.to_string())
            }
            crate::ops::OpsError::NotPublished => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "broker_unavailable",
                "no broker runs to publish the command on; nothing was sent",
            ),
            other => {
                tracing::error!(error = %other, "operation failed in the REST bridge");
                ApiError::internal()
            }
        }
    }
}

pub(super) async fn no_such_route() -> ApiError {
    ApiError::not_found("route")
}

pub(super) async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "this route does not support the method",
    )
}

/// Middleware: an error answer that is not JSON (a rejection from outside our extractors, such
/// as a body limit hit before a handler ran) is rewritten into the error shape.
pub(super) async fn json_error_bodies(response: Response) -> Response {
    let status = response.status();
    let is_json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if is_json || !(status.is_client_error() || status.is_server_error()) {
        return response;
    }
    let (code, message) = match status {
        StatusCode::PAYLOAD_TOO_LARGE => (
            "payload_too_large",
            "the request body is larger than this route accepts",
        ),
        StatusCode::UNSUPPORTED_MEDIA_TYPE => (
            "unsupported_media_type",
            "the body's content type is not accepted",
        ),
        StatusCode::NOT_FOUND => ("not_found", "no such resource"),
        StatusCode::METHOD_NOT_ALLOWED => (
            "method_not_allowed",
            "this route does not support the method",
        ),
        s if s.is_server_error() => ("internal", "internal error; see the service log"),
        _ => ("bad_request", "the request could not be read"),
    };
    let mut answer = ApiError::new(status, code, message).into_response();
    for (name, value) in response.headers() {
        if name != header::CONTENT_TYPE && name != header::CONTENT_LENGTH {
            answer.headers_mut().insert(name.clone(), value.clone());
        }
    }
    answer
}

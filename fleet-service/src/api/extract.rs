//! Request extractors whose rejections answer in the API's error shape, and the checks every
//! request goes through before a handler sees it.
//!
//! # Invariants
//! - No id or filter with a control character (NUL above all: PostgreSQL refuses it in text)
//!   reaches a handler: [`refuse_control_characters`] answers such a path (`invalid_path`) or
//!   query (`invalid_query`) with a 400, and a JSON body with a NUL anywhere is `invalid_body`.
//! - A JSON body is exactly one JSON object: trailing bytes, `[]` and scalars are refused.
//!   Error messages name JSON types and field paths, never Rust types.
//! - A body over the route's limit is a 413 `payload_too_large` in the error shape.

use axum::body::Bytes;
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde::de::DeserializeOwned;
use serde_json::Value;

use super::ApiError;

/// Whether a percent-encoded URI part carries a control character (`%00`-`%1F`, `%7F`).
fn has_encoded_control(s: &str) -> bool {
    let b = s.as_bytes();
    b.iter().any(|c| c.is_ascii_control())
        || b.windows(3).any(|w| {
            w[0] == b'%'
                && std::str::from_utf8(&w[1..])
                    .ok()
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                    .is_some_and(|c| c.is_ascii_control())
        })
}

/// Middleware: refuses a request whose path or query carries a control character, before
/// routing, so no route can pass one to the store.
pub(super) async fn refuse_control_characters(req: Request, next: Next) -> Response {
    let uri = req.uri();
    if has_encoded_control(uri.path()) {
        return ApiError::bad_request(
            "invalid_path",
            "the path must not contain control characters (such as %00)",
        )
        .into_response();
    }
    if uri.query().is_some_and(has_encoded_control) {
        return ApiError::bad_request(
            "invalid_query",
            "query parameters must not contain control characters (such as %00)",
        )
        .into_response();
    }
    next.run(req).await
}

/// 413 in the error shape.
pub(super) fn too_large() -> ApiError {
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "payload_too_large",
        "the request body is larger than this route accepts",
    )
}

fn unsupported_media_type(message: &str) -> ApiError {
    ApiError::new(
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "unsupported_media_type",
        message,
    )
}

/// The largest body a route reads unless it says otherwise.
pub(super) const BODY_LIMIT: usize = 2 * 1024 * 1024;

/// How much of an over-limit body is read and thrown away before the 413 leaves: a server
/// that closes a connection with unread data resets it, and the client then loses the answer.
const DRAIN_LIMIT: usize = 128 * 1024 * 1024;

/// The body's bytes, up to `LIMIT`; over it, a 413 `payload_too_large`.
pub(super) struct ApiBytes<const LIMIT: usize = BODY_LIMIT>(pub Bytes);

#[axum::async_trait]
impl<S: Send + Sync, const LIMIT: usize> FromRequest<S> for ApiBytes<LIMIT> {
    type Rejection = ApiError;

    async fn from_request(req: Request, _state: &S) -> Result<Self, ApiError> {
        use futures::StreamExt;
        let mut stream = req.into_body().into_data_stream();
        let mut body = bytes::BytesMut::new();
        let mut over = None;
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|_| {
                ApiError::bad_request("invalid_body", "the request body could not be read")
            })?;
            match &mut over {
                Some(drained) => {
                    *drained += chunk.len();
                    if *drained > DRAIN_LIMIT {
                        break;
                    }
                }
                None if body.len() + chunk.len() > LIMIT => {
                    body = bytes::BytesMut::new();
                    over = Some(chunk.len());
                }
                None => body.extend_from_slice(&chunk),
            }
        }
        if over.is_some() {
            return Err(too_large());
        }
        Ok(ApiBytes(body.freeze()))
    }
}

/// The media type of `Content-Type`, lowercased, without parameters.
pub(super) fn media_type(headers: &HeaderMap) -> String {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .map(|v| v.trim().to_ascii_lowercase())
        .unwrap_or_default()
}

fn is_json(headers: &HeaderMap) -> bool {
    let m = media_type(headers);
    m == "application/json" || (m.starts_with("application/") && m.ends_with("+json"))
}

/// A JSON object body, deserialized into `T` (see the module's invariants).
pub struct ApiJson<T>(pub T);

#[axum::async_trait]
impl<T, S> FromRequest<S> for ApiJson<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        if !is_json(req.headers()) {
            return Err(unsupported_media_type(
                "expected a request with Content-Type: application/json",
            ));
        }
        let ApiBytes(bytes) = ApiBytes::<BODY_LIMIT>::from_request(req, state).await?;
        parse_object(&bytes).map(ApiJson)
    }
}

/// An optional JSON object body: none at all, an empty body or `null` is the same as `{}`.
pub(super) struct Optional<T>(pub(super) T);

#[axum::async_trait]
impl<T, S> FromRequest<S> for Optional<T>
where
    T: DeserializeOwned + Default,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let json = is_json(req.headers());
        let ApiBytes(bytes) = ApiBytes::<BODY_LIMIT>::from_request(req, state).await?;
        let text = bytes.trim_ascii();
        if text.is_empty() || (json && text == b"null") {
            return Ok(Optional(T::default()));
        }
        if !json {
            return Err(unsupported_media_type(
                "a body must be sent with Content-Type: application/json",
            ));
        }
        parse_object(&bytes).map(Optional)
    }
}

/// Parses one JSON object (nothing after it) into `T`. Whole numbers written with a fraction
/// of zero (`5276.0`) count as integers.
pub(super) fn parse_object<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let StrictValue(mut value) = serde_json::from_slice(bytes).map_err(|e| {
        let message = plain(&e.to_string());
        if e.is_data() {
            ApiError::bad_request("invalid_body", message)
        } else {
            ApiError::bad_request("malformed_json", message)
        }
    })?;
    if !value.is_object() {
        return Err(ApiError::bad_request(
            "invalid_body",
            "the body must be a JSON object",
        ));
    }
    if let Some(at) = find_nul(&value, "") {
        return Err(ApiError::bad_request(
            "invalid_body",
            format!("{at} contains a NUL character"),
        ));
    }
    whole_numbers(&mut value);
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let message = plain(&e.inner().to_string());
        ApiError::bad_request(
            "invalid_body",
            if path == "." {
                message
            } else {
                format!("{path}: {message}")
            },
        )
    })
}

/// A JSON value in which no object names a key twice (serde_json keeps the last silently).
struct StrictValue(Value);

impl<'de> serde::Deserialize<'de> for StrictValue {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(StrictVisitor).map(StrictValue)
    }
}

struct StrictVisitor;

impl<'de> serde::de::Visitor<'de> for StrictVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }

    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::from(v))
    }

    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::from(v))
    }

    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        Ok(Value::from(v))
    }

    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_owned()))
    }

    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }

    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut items = Vec::new();
        while let Some(StrictValue(v)) = seq.next_element()? {
            items.push(v);
        }
        Ok(Value::Array(items))
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut out = serde_json::Map::new();
        while let Some(key) = map.next_key::<String>()? {
            let StrictValue(v) = map.next_value()?;
            if out.contains_key(&key) {
                return Err(serde::de::Error::custom(format_args!(
                    "duplicate field `{key}`"
                )));
            }
            out.insert(key, v);
        }
        Ok(Value::Object(out))
    }
}

/// Deserializes a field that is present (possibly `null`) as `Some(..)`; an absent field stays
/// `None` through `#[serde(default)]`.
pub(super) fn present<'de, T, D>(d: D) -> Result<Option<Option<T>>, D::Error>
where
    T: serde::Deserialize<'de>,
    D: serde::Deserializer<'de>,
{
    <Option<T> as serde::Deserialize>::deserialize(d).map(Some)
}

/// Deserializes an optional field whose type is a struct from an object only: serde reads a
/// struct from an array too, filling its fields by position (`"policy": []` would be the
/// default policy), which the API's schema does not allow.
pub(super) fn object_or_null<'de, T, D>(d: D) -> Result<Option<T>, D::Error>
where
    T: DeserializeOwned,
    D: serde::Deserializer<'de>,
{
    use serde::de::Error;
    match <Option<Value> as serde::Deserialize>::deserialize(d)? {
        None => Ok(None),
        Some(v @ Value::Object(_)) => serde_json::from_value(v)
            .map(Some)
            .map_err(D::Error::custom),
        Some(other) => Err(D::Error::invalid_type(
            serde::de::Unexpected::Other(match other {
                Value::Array(_) => "an array",
                Value::String(_) => "a string",
                Value::Number(_) => "a number",
                _ => "a boolean",
            }),
            &"an object",
        )),
    }
}

/// Where a string (or an object key) of `v` holds a NUL, as a path.
fn find_nul(v: &Value, at: &str) -> Option<String> {
    let here = || {
        if at.is_empty() {
            "the body".to_owned()
        } else {
            at.to_owned()
        }
    };
    match v {
        Value::String(s) => s.contains('\0').then(here),
        Value::Array(items) => items
            .iter()
            .enumerate()
            .find_map(|(i, item)| find_nul(item, &format!("{at}[{i}]"))),
        Value::Object(map) => map.iter().find_map(|(k, item)| {
            let path = if at.is_empty() {
                k.clone()
            } else {
                format!("{at}.{k}")
            };
            if k.contains('\0') {
                Some(format!("a key of {}", here()))
            } else {
                find_nul(item, &path)
            }
        }),
        _ => None,
    }
}

/// Turns floats with a zero fraction that fit an integer into integers.
fn whole_numbers(v: &mut Value) {
    match v {
        Value::Number(n) if n.is_f64() => {
            let f = n.as_f64().unwrap_or(f64::NAN);
            if f.fract() == 0.0 && f.abs() < 9.0e15 {
                *v = Value::from(f as i64);
            }
        }
        Value::Array(items) => items.iter_mut().for_each(whole_numbers),
        Value::Object(map) => map.values_mut().for_each(whole_numbers),
        _ => {}
    }
}

/// A serde message in JSON's terms: `expected u32` becomes `expected a non-negative integer`,
/// `expected struct CreateKey` becomes `expected a JSON object`, and so on.
pub(super) fn plain(message: &str) -> String {
    const NAMES: &[(&str, &str)] = &[
        ("u8", "a non-negative integer"),
        ("u16", "a non-negative integer"),
        ("u32", "a non-negative integer"),
        ("u64", "a non-negative integer"),
        ("usize", "a non-negative integer"),
        ("i8", "an integer"),
        ("i16", "an integer"),
        ("i32", "an integer"),
        ("i64", "an integer"),
        ("isize", "an integer"),
        ("f32", "a number"),
        ("f64", "a number"),
        ("a boolean", "true or false"),
        ("a map", "a JSON object"),
        ("a sequence", "a JSON array"),
        ("unit", "null"),
    ];
    let mut out = String::with_capacity(message.len());
    let mut rest = message;
    while let Some(i) = rest.find("expected ") {
        let (head, tail) = rest.split_at(i + "expected ".len());
        out.push_str(head);
        rest = tail;
        for prefix in ["tuple struct ", "struct ", "enum ", "newtype struct "] {
            if let Some(after) = rest.strip_prefix(prefix) {
                let end = after
                    .find(|c: char| !(c.is_alphanumeric() || c == '_'))
                    .unwrap_or(after.len());
                out.push_str(if prefix == "enum " {
                    "one of the documented values"
                } else {
                    "a JSON object"
                });
                rest = &after[end..];
                break;
            }
        }
        for (name, json) in NAMES {
            if let Some(after) = rest.strip_prefix(name) {
                if after
                    .chars()
                    .next()
                    .is_none_or(|c| !(c.is_alphanumeric() || c == '_'))
                {
                    out.push_str(json);
                    rest = after;
                    break;
                }
            }
        }
    }
    out.push_str(rest);
    out
}

/// `axum::extract::Query`, answering malformed query strings in the API's error shape.
pub struct ApiQuery<T>(pub T);

#[axum::async_trait]
impl<T, S> FromRequestParts<S> for ApiQuery<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        axum::extract::Query::<T>::from_request_parts(parts, state)
            .await
            .map(|q| ApiQuery(q.0))
            .map_err(|e: QueryRejection| {
                let text = e.body_text();
                let text = text
                    .strip_prefix("Failed to deserialize query string: ")
                    .unwrap_or(&text);
                ApiError::bad_request("invalid_query", plain(text))
            })
    }
}

/// `axum::extract::Path`, answering bad path parameters in the API's error shape.
pub struct ApiPath<T>(pub T);

#[axum::async_trait]
impl<T, S> FromRequestParts<S> for ApiPath<T>
where
    T: DeserializeOwned + Send,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        axum::extract::Path::<T>::from_request_parts(parts, state)
            .await
            .map(|p| ApiPath(p.0))
            .map_err(|e: PathRejection| {
                ApiError::bad_request("invalid_path", plain(&e.body_text()))
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(serde::Deserialize, Debug, Default)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Body {
        #[serde(default)]
        n: Option<u32>,
        #[serde(default)]
        s: Option<String>,
    }

    #[test]
    fn bodies() {
        assert_eq!(parse_object::<Body>(b"{\"n\": 5.0}").unwrap().n, Some(5));
        for (bad, code) in [
            (&b"[]"[..], "invalid_body"),
            (b"3", "invalid_body"),
            (b"{} x", "malformed_json"),
            (b"{}{}", "malformed_json"),
            (b"{\"n\": 5.5}", "invalid_body"),
            (b"{\"s\": \"a\\u0000\"}", "invalid_body"),
            (b"{\"n\": \"x\"}", "invalid_body"),
            (b"{\"n\": 1, \"n\": 2}", "invalid_body"),
        ] {
            let e = parse_object::<Body>(bad).unwrap_err();
            assert_eq!(e.code, code, "{}", String::from_utf8_lossy(bad));
            assert!(!e.message.contains("u32"), "{}", e.message);
            assert!(!e.message.contains("struct"), "{}", e.message);
        }
    }

    #[test]
    fn plain_messages() {
        assert_eq!(
            plain("invalid type: string \"x\", expected u32 at line 1"),
            "invalid type: string \"x\", expected a non-negative integer at line 1"
        );
        assert_eq!(
            plain("invalid type: sequence, expected struct CreateKey"),
            "invalid type: sequence, expected a JSON object"
        );
        assert_eq!(plain("expected u64x"), "expected u64x");
    }

    #[test]
    fn control_characters_in_uris() {
        assert!(has_encoded_control("/a/%00"));
        assert!(has_encoded_control("x=%1f"));
        assert!(has_encoded_control("x=%7F"));
        assert!(!has_encoded_control("/a/%2500"));
        assert!(!has_encoded_control("x=%20&y=%C3%A9"));
    }
}

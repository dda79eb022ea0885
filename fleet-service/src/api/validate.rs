//! Checks of values several resources share: names, tags, device ids in paths, certificate
//! pins, times in queries.

use std::collections::BTreeMap;

use fleet_wire::DeviceId;

use super::ApiError;

/// Longest tag key, in characters.
pub(super) const MAX_TAG_KEY: usize = 128;
/// Longest tag value, in characters.
pub(super) const MAX_TAG_VALUE: usize = 256;
/// Most tags one device may carry.
pub(super) const MAX_TAGS: usize = 64;

/// Checks a product or cohort name: 1 to 200 characters after trimming, no control characters.
pub(super) fn valid_name(name: &str) -> Result<&str, ApiError> {
    let name = name.trim();
    if name.is_empty() || name.chars().count() > 200 || name.chars().any(char::is_control) {
        return Err(ApiError::unprocessable(
            "invalid_name",
            "name must be 1 to 200 characters without control characters",
        ));
    }
    Ok(name)
}

/// Checks tags: string keys and values, non-empty, bounded, no control characters, and no `:`
/// in keys (the device list filters on `tag=key:value`).
pub(super) fn valid_tags(
    tags: serde_json::Map<String, serde_json::Value>,
) -> Result<BTreeMap<String, String>, ApiError> {
    let bad = |message: String| ApiError::unprocessable("invalid_tags", message);
    if tags.len() > MAX_TAGS {
        return Err(bad(format!(
            "{} tags; a device carries at most {MAX_TAGS}",
            tags.len()
        )));
    }
    let mut out = BTreeMap::new();
    for (key, value) in tags {
        if key.is_empty()
            || key.chars().count() > MAX_TAG_KEY
            || key.contains(':')
            || key.chars().any(char::is_control)
        {
            return Err(bad(format!(
                "tag key {key:?} must be 1 to {MAX_TAG_KEY} characters, without ':' or control \
                 characters"
            )));
        }
        let value = match value {
            serde_json::Value::String(v)
                if !v.is_empty()
                    && v.chars().count() <= MAX_TAG_VALUE
                    && !v.chars().any(char::is_control) =>
            {
                v
            }
            _ => {
                return Err(bad(format!(
                    "tag {key:?} must have a string value of 1 to {MAX_TAG_VALUE} characters \
                     without control characters"
                )))
            }
        };
        out.insert(key, value);
    }
    Ok(out)
}

/// A device id in a path; one that cannot be valid names no device.
pub(super) fn path_device(id: &str) -> Result<DeviceId, ApiError> {
    DeviceId::parse(id).map_err(|_| ApiError::not_found("device"))
}

/// An RFC 3339 query value as Unix milliseconds.
pub(super) fn parse_time(key: &str, value: &str) -> Result<i64, ApiError> {
    use time::format_description::well_known::Rfc3339;
    time::OffsetDateTime::parse(value, &Rfc3339)
        .map(|t| (t.unix_timestamp_nanos() / 1_000_000) as i64)
        .map_err(|_| {
            ApiError::bad_request(
                "invalid_query",
                format!("{key} must be an RFC 3339 time such as 2026-01-31T12:00:00Z"),
            )
        })
}

/// The pin a request asks for, as lower-case hex.
pub(super) fn pin_of(
    pem: Option<&str>,
    fingerprint: Option<&str>,
) -> Result<Option<String>, ApiError> {
    let bad = |m: &str| ApiError::unprocessable("invalid_certificate", m.to_owned());
    match (pem, fingerprint) {
        (Some(_), Some(_)) => Err(bad(
            "give certificate_pem or certificate_fingerprint, not both",
        )),
        (None, None) => Ok(None),
        (Some(pem), None) => {
            let items = rustls_pemfile::read_all(&mut pem.as_bytes())
                .collect::<Result<Vec<_>, _>>()
                .map_err(|_| bad("certificate_pem is not PEM"))?;
            match items.as_slice() {
                [rustls_pemfile::Item::X509Certificate(der)] => {
                    x509_parser::parse_x509_certificate(der)
                        .map_err(|_| bad("certificate_pem does not parse as X.509"))?;
                    Ok(Some(broker::registry::fingerprint(der)))
                }
                _ => Err(bad("certificate_pem must hold exactly one certificate")),
            }
        }
        (None, Some(f)) => {
            let hex: String = f
                .chars()
                .filter(|c| *c != ':')
                .collect::<String>()
                .to_lowercase();
            if hex.len() != 64 || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
                return Err(bad(
                    "certificate_fingerprint must be 64 hex digits (SHA-256)",
                ));
            }
            Ok(Some(hex))
        }
    }
}

/// A reason an operator gives (quarantine, lift, revocation): 1 to 1000 characters after
/// trimming, no control characters.
pub(super) fn valid_reason(reason: &str) -> Result<&str, ApiError> {
    let r = reason.trim();
    if r.is_empty() || r.chars().count() > 1000 || r.chars().any(char::is_control) {
        return Err(ApiError::unprocessable(
            "invalid_reason",
            "reason must be 1 to 1000 characters without control characters",
        ));
    }
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert_eq!(valid_name("  a b ").unwrap(), "a b");
        assert!(valid_name("   ").is_err());
        assert!(valid_name("a\nb").is_err());
        assert!(valid_name(&"x".repeat(201)).is_err());
    }

    #[test]
    fn tag_count_is_capped() {
        let many = |n: usize| {
            (0..n)
                .map(|i| (format!("k{i}"), serde_json::Value::String("v".into())))
                .collect::<serde_json::Map<_, _>>()
        };
        assert!(valid_tags(many(MAX_TAGS)).is_ok());
        let e = valid_tags(many(MAX_TAGS + 1)).unwrap_err();
        assert_eq!(e.code, "invalid_tags");
    }
}

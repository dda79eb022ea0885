//! Pagination, one way for every list: `limit` (1 to 1000, 100 by default) and `cursor` (the
//! previous page's `next_cursor`) in the query, `{"items": [...], "next_cursor": ...}` in the
//! answer. A cursor is the last item's id, base64url; only the device list's sorted orders
//! carry more in theirs.

use base64::Engine;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::ApiError;
use crate::store::PageRequest;

pub(super) const DEFAULT_LIMIT: u32 = 100;
pub(super) const MAX_LIMIT: u32 = 1000;

/// One page of a list.
#[derive(Serialize, ToSchema)]
pub(super) struct Page<T> {
    pub(super) items: Vec<T>,
    /// Pass as `cursor` for the next page; none on the last page.
    pub(super) next_cursor: Option<String>,
}

impl<T> Page<T> {
    pub(super) fn empty() -> Self {
        Page {
            items: Vec::new(),
            next_cursor: None,
        }
    }

    /// The page of `rows` (fetched with one more than `page.limit`, so a further page shows),
    /// its cursor the id of its last row.
    pub(super) fn of<R>(
        mut rows: Vec<R>,
        page: &PageRequest,
        id: impl Fn(&R) -> &str,
        body: impl FnMut(R) -> T,
    ) -> Self {
        let next_cursor = if rows.len() > page.limit as usize {
            rows.truncate(page.limit as usize);
            rows.last().map(|r| encode_cursor(id(r)))
        } else {
            None
        };
        Page {
            items: rows.into_iter().map(body).collect(),
            next_cursor,
        }
    }
}

/// A whole list, short by nature (at most a fixed number of items).
#[derive(Serialize, ToSchema)]
pub(super) struct Items<T> {
    pub(super) items: Vec<T>,
}

/// `limit` and `cursor`, for lists that take nothing else.
#[derive(Deserialize, IntoParams, Default)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(super) struct PageParams {
    /// Page size, 100 by default.
    #[param(minimum = 1, maximum = 1000)]
    #[serde(default)]
    pub(super) limit: Option<u32>,
    /// `next_cursor` of the previous page.
    #[serde(default)]
    pub(super) cursor: Option<String>,
}

impl PageParams {
    /// Checks the values and asks the store for one row more than the page holds.
    pub(super) fn request(&self) -> Result<PageRequest, ApiError> {
        page_request(self.limit, self.cursor.as_deref())
    }
}

/// The store's page request for a `limit` and `cursor`: one row more than the page holds.
pub(super) fn page_request(
    limit: Option<u32>,
    cursor: Option<&str>,
) -> Result<PageRequest, ApiError> {
    let limit = match limit {
        None => DEFAULT_LIMIT,
        Some(n) if (1..=MAX_LIMIT).contains(&n) => n,
        Some(_) => return Err(limit_error()),
    };
    let after = cursor
        .map(|c| {
            decode_cursor(c).ok_or_else(|| ApiError::bad_request("invalid_query", "invalid cursor"))
        })
        .transpose()?;
    Ok(PageRequest { after, limit })
}

fn limit_error() -> ApiError {
    ApiError::bad_request(
        "invalid_query",
        format!("limit must be an integer from 1 to {MAX_LIMIT}"),
    )
}

pub(super) fn parse_limit(s: &str) -> Result<u32, ApiError> {
    s.parse::<u32>()
        .ok()
        .filter(|n| (1..=MAX_LIMIT).contains(n))
        .ok_or_else(limit_error)
}

pub(super) fn encode_cursor(id: &str) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(id)
}

/// The id a cursor carries; `None` when it is not one of ours.
pub(super) fn decode_cursor(cursor: &str) -> Option<String> {
    let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(cursor)
        .ok()?;
    let id = String::from_utf8(raw).ok()?;
    (!id.is_empty() && !id.chars().any(char::is_control)).then_some(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests() {
        let r = page_request(None, None).unwrap();
        assert_eq!((r.limit, r.after), (DEFAULT_LIMIT, None));
        let c = encode_cursor("abc");
        assert_eq!(
            page_request(Some(5), Some(&c)).unwrap().after.as_deref(),
            Some("abc")
        );
        assert!(page_request(Some(0), None).is_err());
        assert!(page_request(Some(1001), None).is_err());
        assert!(page_request(None, Some("!!")).is_err());
        assert!(page_request(None, Some(&encode_cursor("a\0b"))).is_err());
    }

    #[test]
    fn pages() {
        let req = PageRequest {
            after: None,
            limit: 2,
        };
        let p = Page::of(vec!["a", "b", "c"], &req, |s| s, |s| s.to_owned());
        assert_eq!(p.items, ["a", "b"]);
        assert_eq!(p.next_cursor, Some(encode_cursor("b")));
        let p = Page::of(vec!["a", "b"], &req, |s| s, |s| s.to_owned());
        assert_eq!(p.next_cursor, None);
    }
}

//! Paging, one way for every list (API.md conventions): `?limit=N` (a default and a maximum
//! per list, both in the OpenAPI document) and `?after=CURSOR`; when more items follow, the
//! answer carries `Link: <path?...&limit=N&after=CURSOR>; rel="next"` (RFC 8288) and the body
//! stays a JSON array. No list is ever cut silently: a page without a `Link` is the last.
//!
//! A cursor is opaque to clients and URL-safe: base64url (no padding) of a one-byte tag and
//! the list's own position (an order id, a coupon id, a phase and a key...). The tag names the
//! list (and, for a list merged from two sources, the part the position is in), so a cursor
//! from another list is a 400 rather than a silent jump. A list reads from its cursor with a
//! range scan, never from the start.
//!
//! The `Link` target is a relative reference (path and query of this request, `limit` and
//! the cursor replaced): it resolves against whatever address the client used, proxies
//! included.

use super::error::ApiError;
use actix_web::http::header::{HeaderValue, LINK};
use actix_web::{HttpRequest, HttpResponse, ResponseError};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use serde::Serialize;

/// Cursors longer than this are refused before decoding (positions are ids of at most 128
/// characters plus a tag and a little structure).
const CURSOR_CHARS_MAX: usize = 512;

/// A list's page sizes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Items per page when the request names no `limit`.
    pub default: usize,
    /// The largest `limit` accepted.
    pub max: usize,
}

/// Parses `limit`: absent gives the list's default; anything but an integer from 1 to the
/// list's maximum is a 400 `invalid_limit`.
pub fn limit(raw: Option<&str>, limits: Limits) -> Result<usize, ApiError> {
    let Some(raw) = raw else {
        return Ok(limits.default);
    };
    match raw.parse::<usize>() {
        Ok(n) if (1..=limits.max).contains(&n) => Ok(n),
        _ => Err(ApiError::new(
            actix_web::http::StatusCode::BAD_REQUEST,
            "invalid_limit",
            format!("limit must be an integer from 1 to {}", limits.max),
        )
        .with("limit_max", limits.max as u64)),
    }
}

/// A decoded cursor: the tag and the position after which the next page starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cursor {
    pub tag: u8,
    pub position: Vec<u8>,
}

impl Cursor {
    pub fn new(tag: u8, position: impl Into<Vec<u8>>) -> Cursor {
        Cursor {
            tag,
            position: position.into(),
        }
    }

    /// The URL-safe text form.
    pub fn encode(&self) -> String {
        let mut bytes = Vec::with_capacity(1 + self.position.len());
        bytes.push(self.tag);
        bytes.extend_from_slice(&self.position);
        URL_SAFE_NO_PAD.encode(bytes)
    }

    /// The position as text (lists whose positions are ids), or a 400.
    pub fn position_str(&self) -> Result<&str, ApiError> {
        std::str::from_utf8(&self.position).map_err(|_| invalid_cursor())
    }
}

/// The 400 every unusable cursor gets.
pub fn invalid_cursor() -> ApiError {
    ApiError::new(
        actix_web::http::StatusCode::BAD_REQUEST,
        "invalid_cursor",
        "after must be a cursor taken from this list's Link header",
    )
}

/// Parses `after`: absent is the start of the list; a cursor that does not decode, or whose
/// tag is not one of `tags` (another list's cursor), or with an empty position, is a 400
/// `invalid_cursor`.
pub fn after(raw: Option<&str>, tags: &[u8]) -> Result<Option<Cursor>, ApiError> {
    let Some(raw) = raw else { return Ok(None) };
    if raw.len() > CURSOR_CHARS_MAX {
        return Err(invalid_cursor());
    }
    let bytes = URL_SAFE_NO_PAD.decode(raw).map_err(|_| invalid_cursor())?;
    match bytes.split_first() {
        Some((tag, position)) if tags.contains(tag) && !position.is_empty() => {
            Ok(Some(Cursor::new(*tag, position)))
        }
        _ => Err(invalid_cursor()),
    }
}

/// Keeps the first `limit` of `items` (fetched as `limit + 1` to learn whether more follow)
/// and returns the cursor of the last one kept when more follow.
pub fn cut<T>(mut items: Vec<(Cursor, T)>, limit: usize) -> (Vec<T>, Option<Cursor>) {
    let more = items.len() > limit;
    items.truncate(limit);
    let next = if more {
        items.last().map(|(cursor, _)| cursor.clone())
    } else {
        None
    };
    (items.into_iter().map(|(_, item)| item).collect(), next)
}

/// `<path?query>; rel="next"`: this request's path and query with the given parameters
/// replaced (every other parameter, such as a filter, is kept as the client sent it).
pub fn next_link(req: &HttpRequest, replace: &[(&str, String)]) -> String {
    let mut query: Vec<String> = req
        .query_string()
        .split('&')
        .filter(|pair| !pair.is_empty())
        .filter(|pair| {
            let name = pair.split('=').next().unwrap_or_default();
            !replace.iter().any(|(replaced, _)| *replaced == name)
        })
        .map(str::to_owned)
        .collect();
    // Values are integers and base64url cursors: nothing to escape.
    query.extend(
        replace
            .iter()
            .map(|(name, value)| format!("{name}={value}")),
    );
    format!("<{}?{}>; rel=\"next\"", req.path(), query.join("&"))
}

/// A page as a JSON array, with `Link: rel="next"` when `next` is a cursor.
pub fn respond<T: Serialize>(
    req: &HttpRequest,
    items: &[T],
    limit: usize,
    next: Option<Cursor>,
) -> HttpResponse {
    let mut response = HttpResponse::Ok();
    if let Some(next) = next {
        let link = next_link(
            req,
            &[("limit", limit.to_string()), ("after", next.encode())],
        );
        // A request's path and query are visible ASCII (the URI parser admits nothing
        // else), so the link always makes a valid header value.
        match HeaderValue::from_str(&link) {
            Ok(value) => {
                response.insert_header((LINK, value));
            }
            Err(_) => {
                crate::error_limited!(link, "a next-page link is not a header value");
                return ApiError::unavailable("link_unavailable", "cannot link the next page")
                    .error_response();
            }
        }
    }
    response.json(items)
}

/// How the pages of one list read from several logs (a cluster's partitions) make one page:
/// every part is asked for the same page (the same `limit` and `after`) of items sorted by
/// the string field `key`, whose value is also the cursor's position (tagged `cursor`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Merge {
    pub key: &'static str,
    pub limits: Limits,
    pub cursor: u8,
}

impl Merge {
    /// The first `limit` items of all the parts, in key order, and the cursor after the last
    /// one when more follow (more than `limit` in all, or a part that had more itself). The
    /// first `limit` items after a cursor are each among their own part's first `limit`, so
    /// the merged page is exactly the page one list would give.
    pub fn merge(
        &self,
        parts: Vec<(Vec<serde_json::Value>, bool)>,
        limit: usize,
    ) -> (Vec<serde_json::Value>, Option<Cursor>) {
        let part_had_more = parts.iter().any(|(_, more)| *more);
        let mut items: Vec<(String, serde_json::Value)> = parts
            .into_iter()
            .flat_map(|(items, _)| items)
            .map(|item| {
                let key = item[self.key].as_str().unwrap_or_default().to_owned();
                (key, item)
            })
            .collect();
        items.sort_by(|a, b| a.0.cmp(&b.0));
        let more = part_had_more || items.len() > limit;
        items.truncate(limit);
        let next = if more {
            items
                .last()
                .map(|(key, _)| Cursor::new(self.cursor, key.as_bytes()))
        } else {
            None
        };
        (items.into_iter().map(|(_, item)| item).collect(), next)
    }
}

/// The OpenAPI description of the `Link` response header of a paged list.
pub const LINK_DESCRIPTION: &str =
    "RFC 8288 `<path?...&limit=N&after=CURSOR>; rel=\"next\"`, present only when more items follow";

#[cfg(test)]
mod tests {
    use super::*;
    use actix_web::test::TestRequest;

    #[test]
    fn limits_default_and_bound() {
        // Goal: absent -> default; 1..=max accepted; 0, max + 1 and text are invalid_limit.
        let limits = Limits {
            default: 10,
            max: 50,
        };
        assert_eq!(limit(None, limits).unwrap(), 10);
        assert_eq!(limit(Some("50"), limits).unwrap(), 50);
        for bad in ["0", "51", "-1", "ten", ""] {
            assert_eq!(limit(Some(bad), limits).unwrap_err().code, "invalid_limit");
        }
    }

    #[test]
    fn cursors_round_trip_and_refuse_other_lists() {
        // Goal: a cursor decodes to what was encoded, is URL-safe, and another tag, garbage or
        // an empty position is invalid_cursor.
        let cursor = Cursor::new(b's', "order:1/ü".as_bytes());
        let text = cursor.encode();
        assert!(text
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'));
        assert_eq!(after(Some(&text), b"s").unwrap(), Some(cursor));
        assert!(after(None, b"s").unwrap().is_none());
        for bad in [text.as_str(), "!!", "AA", "cw", &"A".repeat(600)] {
            assert_eq!(
                after(Some(bad), b"p").unwrap_err().code,
                "invalid_cursor",
                "{bad}"
            );
        }
    }

    #[test]
    fn cut_links_only_when_more_follow() {
        // Goal: limit + 1 items -> limit kept and the last kept one's cursor; fewer -> no cursor.
        let items: Vec<(Cursor, u32)> =
            (0..4).map(|i| (Cursor::new(b't', [i]), i as u32)).collect();
        let (kept, next) = cut(items.clone(), 3);
        assert_eq!((kept, next), (vec![0, 1, 2], Some(Cursor::new(b't', [2]))));
        let (kept, next) = cut(items, 4);
        assert_eq!((kept.len(), next), (4, None));
    }

    #[test]
    fn merged_parts_give_the_page_one_list_would() {
        // Goal: pages of several parts, merged, are the pages of the whole list: every item
        // once, in key order, with a next cursor exactly while items remain.
        use serde_json::json;
        let merge = Merge {
            key: "order_id",
            limits: Limits {
                default: 3,
                max: 10,
            },
            cursor: b'd',
        };
        let parts: Vec<Vec<&str>> = vec![
            vec!["a", "d", "e", "h"],
            vec!["b", "c"],
            vec![],
            vec!["f", "g"],
        ];
        let page = |after: Option<&str>, limit: usize| {
            let parts = parts
                .iter()
                .map(|part| {
                    let rest: Vec<_> = part
                        .iter()
                        .filter(|k| after.is_none_or(|a| **k > a))
                        .collect();
                    let more = rest.len() > limit;
                    (
                        rest.into_iter()
                            .take(limit)
                            .map(|k| json!({"order_id": k}))
                            .collect(),
                        more,
                    )
                })
                .collect();
            merge.merge(parts, limit)
        };
        let mut seen = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let (items, next) = page(after.as_deref(), 3);
            seen.extend(
                items
                    .iter()
                    .map(|i| i["order_id"].as_str().unwrap().to_owned()),
            );
            match next {
                Some(cursor) => after = Some(cursor.position_str().unwrap().to_owned()),
                None => break,
            }
        }
        assert_eq!(seen, ["a", "b", "c", "d", "e", "f", "g", "h"]);
        let (items, next) = page(None, 8);
        assert_eq!(
            (items.len(), next.is_none()),
            (8, true),
            "one page holds all"
        );
        let (_, next) = page(None, 7);
        assert!(next.is_some(), "one left after seven");
    }

    #[test]
    fn the_next_link_keeps_filters_and_replaces_paging() {
        // Goal: other parameters survive as sent; limit and after appear once, new values.
        let req = TestRequest::get()
            .uri("/v1/wallets/u1/rewards?kind=subsidy&after=old&limit=2&status=all")
            .to_http_request();
        assert_eq!(
            next_link(&req, &[("limit", "2".into()), ("after", "bmV3".into())]),
            "</v1/wallets/u1/rewards?kind=subsidy&status=all&limit=2&after=bmV3>; rel=\"next\""
        );
    }
}

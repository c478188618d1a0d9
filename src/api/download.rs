//! Serving stored bytes: `ETag` (the sha256), conditional `If-None-Match`, and single byte ranges,
//! streamed from storage without buffering.

use std::ops::Range;

use axum::body::Body;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::Response;

use super::AppState;
use super::error::{ApiError, ApiResult};

pub struct Object<'a> {
    pub key: &'a str,
    pub size: u64,
    pub sha256: &'a str,
    pub content_type: &'static str,
}

pub async fn serve(state: &AppState, headers: &HeaderMap, object: Object<'_>) -> ApiResult<Response<Body>> {
    let etag = format!("\"{}\"", object.sha256);
    let if_none_match = headers.get(header::IF_NONE_MATCH).and_then(|v| v.to_str().ok());
    if if_none_match.is_some_and(|v| v.split(',').any(|t| t.trim() == etag || t.trim() == "*")) {
        return Ok(Response::builder()
            .status(StatusCode::NOT_MODIFIED)
            .header(header::ETAG, &etag)
            .body(Body::empty())
            .expect("valid response"));
    }
    let range = match headers.get(header::RANGE).and_then(|v| v.to_str().ok()) {
        None => None,
        Some(spec) => parse_range(spec, object.size)?,
    };
    let stream = state.storage.read(object.key, range.clone()).await?;
    let mut response = Response::builder()
        .header(header::CONTENT_TYPE, object.content_type)
        .header(header::ETAG, &etag)
        .header(header::ACCEPT_RANGES, "bytes");
    response = match &range {
        Some(r) => response
            .status(StatusCode::PARTIAL_CONTENT)
            .header(header::CONTENT_LENGTH, r.end - r.start)
            .header(
                header::CONTENT_RANGE,
                HeaderValue::from_str(&format!("bytes {}-{}/{}", r.start, r.end - 1, object.size)).expect("ascii"),
            ),
        None => response
            .status(StatusCode::OK)
            .header(header::CONTENT_LENGTH, object.size),
    };
    Ok(response.body(Body::from_stream(stream)).expect("valid response"))
}

/// Parses one `bytes=` range against an object of `len` bytes. A syntactically unusable header is
/// ignored (the whole object is sent, as RFC 9110 allows); several ranges are served as the whole
/// object too; a well-formed range outside the object is a 416.
pub fn parse_range(spec: &str, len: u64) -> ApiResult<Option<Range<u64>>> {
    let Some(set) = spec.trim().strip_prefix("bytes=") else {
        return Ok(None);
    };
    if set.contains(',') {
        return Ok(None);
    }
    let Some((start, end)) = set.trim().split_once('-') else {
        return Ok(None);
    };
    let unsatisfiable = ApiError::RangeNotSatisfiable { len };
    let range = match (start.trim(), end.trim()) {
        ("", "") => return Ok(None),
        ("", suffix) => {
            let Ok(n) = suffix.parse::<u64>() else {
                return Ok(None);
            };
            if n == 0 || len == 0 {
                return Err(unsatisfiable);
            }
            len.saturating_sub(n)..len
        }
        (start, end) => {
            let Ok(start) = start.parse::<u64>() else {
                return Ok(None);
            };
            let end = if end.is_empty() {
                len.saturating_sub(1)
            } else {
                let Ok(end) = end.parse::<u64>() else {
                    return Ok(None);
                };
                if end < start {
                    return Ok(None);
                }
                end.min(len.saturating_sub(1))
            };
            if start >= len {
                return Err(unsatisfiable);
            }
            start..end + 1
        }
    };
    Ok(Some(range))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_follow_rfc_9110() {
        assert_eq!(parse_range("bytes=0-9", 100).unwrap(), Some(0..10));
        assert_eq!(parse_range("bytes=90-", 100).unwrap(), Some(90..100));
        assert_eq!(parse_range("bytes=-10", 100).unwrap(), Some(90..100));
        assert_eq!(parse_range("bytes=-500", 100).unwrap(), Some(0..100));
        assert_eq!(parse_range("bytes=50-500", 100).unwrap(), Some(50..100));
        assert_eq!(parse_range("items=0-1", 100).unwrap(), None);
        assert_eq!(parse_range("bytes=0-1,5-6", 100).unwrap(), None);
        assert_eq!(parse_range("bytes=9-3", 100).unwrap(), None);
        assert!(matches!(
            parse_range("bytes=100-", 100),
            Err(ApiError::RangeNotSatisfiable { len: 100 })
        ));
        assert!(matches!(
            parse_range("bytes=-0", 100),
            Err(ApiError::RangeNotSatisfiable { .. })
        ));
    }
}

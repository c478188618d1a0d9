//! The API's one error shape, `{"error": {"code", "message"}}`, and the mapping of every failure
//! (ours and axum's own rejections) onto it. Internal errors are logged with their cause and shown
//! to the client as an opaque 500.

use axum::Json;
use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    InvalidModel(String),
    #[error("{0}")]
    InvalidRecipe(String),
    #[error("{0}")]
    InvalidGoal(String),
    #[error("{0}")]
    InvalidDataset(String),
    #[error("{0}")]
    InvalidJson(String),
    #[error("{0}")]
    InvalidRequest(String),
    #[error("{0}")]
    InvalidQuery(String),
    #[error("{0}")]
    UnsupportedMediaType(String),
    #[error("{0}")]
    PayloadTooLarge(String),
    #[error("{message}")]
    Conflict { code: &'static str, message: String },
    #[error("{message}")]
    Gone { code: &'static str, message: String },
    #[error("{message}")]
    Unprocessable { code: &'static str, message: String },
    #[error("the requested range is outside the {len}-byte object")]
    RangeNotSatisfiable { len: u64 },
    #[error("{0}")]
    NotReady(String),
    #[error("{0}")]
    Unauthorized(String),
    #[error("too many requests for this API key; retry in {retry_after_s} s")]
    RateLimited { retry_after_s: u64 },
    #[error("{0}")]
    QuotaExceeded(String),
    #[error("{0}")]
    NotAcceptable(String),
    #[error("{message}")]
    Unavailable { code: &'static str, message: String },
    #[error("{message}")]
    Timeout { code: &'static str, message: String },
    #[error("internal error")]
    Internal(#[from] anyhow::Error),
}

pub type ApiResult<T> = Result<T, ApiError>;

impl ApiError {
    pub fn status_and_code(&self) -> (StatusCode, &'static str) {
        match self {
            ApiError::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
            ApiError::InvalidModel(_) => (StatusCode::BAD_REQUEST, "invalid_model"),
            ApiError::InvalidRecipe(_) => (StatusCode::BAD_REQUEST, "invalid_recipe"),
            ApiError::InvalidGoal(_) => (StatusCode::BAD_REQUEST, "invalid_goal"),
            ApiError::InvalidDataset(_) => (StatusCode::BAD_REQUEST, "invalid_dataset"),
            ApiError::InvalidJson(_) => (StatusCode::BAD_REQUEST, "invalid_json"),
            ApiError::InvalidRequest(_) => (StatusCode::BAD_REQUEST, "invalid_request"),
            ApiError::InvalidQuery(_) => (StatusCode::BAD_REQUEST, "invalid_query"),
            ApiError::UnsupportedMediaType(_) => (StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type"),
            ApiError::PayloadTooLarge(_) => (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large"),
            ApiError::Conflict { code, .. } => (StatusCode::CONFLICT, code),
            ApiError::Gone { code, .. } => (StatusCode::GONE, code),
            ApiError::Unprocessable { code, .. } => (StatusCode::UNPROCESSABLE_ENTITY, code),
            ApiError::RangeNotSatisfiable { .. } => (StatusCode::RANGE_NOT_SATISFIABLE, "range_not_satisfiable"),
            ApiError::NotReady(_) => (StatusCode::SERVICE_UNAVAILABLE, "not_ready"),
            ApiError::Unauthorized(_) => (StatusCode::UNAUTHORIZED, "unauthorized"),
            ApiError::RateLimited { .. } => (StatusCode::TOO_MANY_REQUESTS, "rate_limited"),
            ApiError::QuotaExceeded(_) => (StatusCode::TOO_MANY_REQUESTS, "quota_exceeded"),
            ApiError::NotAcceptable(_) => (StatusCode::NOT_ACCEPTABLE, "not_acceptable"),
            ApiError::Unavailable { code, .. } => (StatusCode::SERVICE_UNAVAILABLE, code),
            ApiError::Timeout { code, .. } => (StatusCode::GATEWAY_TIMEOUT, code),
            ApiError::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        }
    }

    pub fn not_found(what: &str) -> Self {
        ApiError::NotFound(format!("{what} not found"))
    }
}

/// Longest error message sent; messages quote client input (names, JSON), which may be huge.
pub const MAX_MESSAGE_CHARS: usize = 1000;

/// The body every error response carries.
pub fn error_body(status: StatusCode, code: &str, message: &str) -> Response {
    let message = match message.char_indices().nth(MAX_MESSAGE_CHARS) {
        Some((cut, _)) => format!("{}... (cut)", &message[..cut]),
        None => message.to_string(),
    };
    (status, Json(json!({"error": {"code": code, "message": message}}))).into_response()
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code) = self.status_and_code();
        if let ApiError::Internal(e) = &self {
            tracing::error!(error = ?e, "internal error");
        }
        let mut response = error_body(status, code, &self.to_string());
        match self {
            ApiError::RangeNotSatisfiable { len } => {
                let value = HeaderValue::from_str(&format!("bytes */{len}")).expect("ascii header");
                response.headers_mut().insert(header::CONTENT_RANGE, value);
            }
            ApiError::Unauthorized(_) => {
                let value = HeaderValue::from_static("Bearer realm=\"modelpress\"");
                response.headers_mut().insert(header::WWW_AUTHENTICATE, value);
            }
            ApiError::RateLimited { retry_after_s } => {
                response
                    .headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from(retry_after_s));
            }
            _ => {}
        }
        response
    }
}

impl From<sqlx::Error> for ApiError {
    fn from(e: sqlx::Error) -> Self {
        ApiError::Internal(e.into())
    }
}

impl From<crate::storage::StorageError> for ApiError {
    /// The object store failing (unreachable, timing out, refusing) is a 503 the client may retry;
    /// the details (endpoint, bucket) stay in the server's log. Anything else is internal.
    fn from(e: crate::storage::StorageError) -> Self {
        match e {
            crate::storage::StorageError::Remote { .. } => {
                tracing::error!(error = %e, source = ?std::error::Error::source(&e), "the object store failed");
                ApiError::Unavailable {
                    code: "storage_unavailable",
                    message: "the object store did not complete the request; try again later".into(),
                }
            }
            other => ApiError::Internal(other.into()),
        }
    }
}

impl From<JsonRejection> for ApiError {
    fn from(r: JsonRejection) -> Self {
        match r {
            JsonRejection::MissingJsonContentType(_) => {
                ApiError::UnsupportedMediaType("expected a request body with Content-Type: application/json".into())
            }
            JsonRejection::BytesRejection(b) if b.status() == StatusCode::PAYLOAD_TOO_LARGE => {
                ApiError::PayloadTooLarge(format!("the JSON body is too large: {}", b.body_text()))
            }
            other => ApiError::InvalidJson(other.body_text()),
        }
    }
}

impl From<PathRejection> for ApiError {
    /// A path that does not parse (a malformed id) names nothing that exists.
    fn from(r: PathRejection) -> Self {
        ApiError::NotFound(format!("no such resource: {}", r.body_text()))
    }
}

impl From<QueryRejection> for ApiError {
    fn from(r: QueryRejection) -> Self {
        ApiError::InvalidQuery(r.body_text())
    }
}

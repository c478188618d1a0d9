//! The HTTP API: application state, the router (one module per resource), and the layers every
//! request passes through (request id, tracing, one error format).

pub mod audit;
pub mod auth;
mod capabilities;
mod datasets;
mod download;
pub mod error;
pub mod events;
pub mod extract;
mod health;
mod infer;
pub mod jobs;
pub mod metrics;
mod models;
pub mod ratelimit;
mod upload;
mod webhooks;

use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::extract::DefaultBodyLimit;
use axum::http::{Method, Request, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::{self, MethodRouter};
use sqlx::PgPool;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::trace::TraceLayer;

use crate::config::Config;
use crate::storage::Storage;
use error::{ApiError, error_body};

#[derive(Clone)]
pub struct AppState {
    pub pool: PgPool,
    pub storage: Arc<dyn Storage>,
    pub config: Arc<Config>,
    /// ONNX Runtime as this process found it: its version, or why it could not be loaded.
    pub runtime: Arc<Result<crate::eval::Runtime, String>>,
    /// Ids of jobs that just changed (fed by the LISTEN relay in `events`).
    pub events: tokio::sync::broadcast::Sender<uuid::Uuid>,
    pub http_metrics: Arc<metrics::HttpMetrics>,
    pub rate_limiter: Arc<ratelimit::RateLimiter>,
    /// The inference worker processes behind `POST /v1/jobs/{id}/infer`.
    pub inference: Arc<crate::infer::InferencePool>,
}

/// Builds the router while recording every (method, path) it serves, so the OpenAPI document can be
/// checked against the code.
struct Routes {
    router: Router<AppState>,
    table: Vec<(Method, &'static str)>,
}

impl Routes {
    fn new() -> Self {
        Routes {
            router: Router::new(),
            table: Vec::new(),
        }
    }

    fn add(mut self, method: Method, path: &'static str, handler: MethodRouter<AppState>) -> Self {
        self.table.push((method, path));
        self.router = self.router.route(path, handler);
        self
    }
}

fn routes() -> Routes {
    use axum::http::Method as M;
    Routes::new()
        .add(M::GET, "/", routing::get(dashboard))
        .add(M::GET, "/healthz", routing::get(health::healthz))
        .add(M::GET, "/readyz", routing::get(health::readyz))
        .add(M::GET, "/metrics", routing::get(metrics::metrics))
        .add(M::GET, "/v1/capabilities", routing::get(capabilities::capabilities))
        .add(
            M::POST,
            "/v1/models",
            routing::post(models::upload).layer(DefaultBodyLimit::disable()),
        )
        .add(M::GET, "/v1/models", routing::get(models::list))
        .add(M::GET, "/v1/models/{id}", routing::get(models::get))
        .add(M::DELETE, "/v1/models/{id}", routing::delete(models::delete))
        .add(M::GET, "/v1/models/{id}/content", routing::get(models::content))
        .add(M::GET, "/v1/models/{id}/files/{*path}", routing::get(models::file))
        .add(
            M::POST,
            "/v1/datasets",
            routing::post(datasets::upload).layer(DefaultBodyLimit::disable()),
        )
        .add(M::GET, "/v1/datasets", routing::get(datasets::list))
        .add(M::GET, "/v1/datasets/{id}", routing::get(datasets::get))
        .add(M::DELETE, "/v1/datasets/{id}", routing::delete(datasets::delete))
        .add(M::POST, "/v1/jobs", routing::post(jobs::create))
        .add(M::GET, "/v1/jobs", routing::get(jobs::list))
        .add(M::GET, "/v1/jobs/{id}", routing::get(jobs::get))
        .add(M::POST, "/v1/jobs/{id}/cancel", routing::post(jobs::cancel))
        .add(M::GET, "/v1/jobs/{id}/events", routing::get(events::job_events))
        .add(M::GET, "/v1/jobs/{id}/report", routing::get(jobs::report))
        .add(M::GET, "/v1/jobs/{id}/report.html", routing::get(jobs::report_html))
        .add(M::GET, "/v1/jobs/{id}/artifacts/{name}", routing::get(jobs::artifact))
        .add(M::GET, "/v1/jobs/{id}/webhooks", routing::get(webhooks::list))
        .add(
            M::POST,
            "/v1/jobs/{id}/infer",
            routing::post(infer::infer).layer(DefaultBodyLimit::disable()),
        )
}

/// Every (method, path) the API serves, in OpenAPI path syntax (a `{*rest}` wildcard is written
/// `{rest}` there).
pub fn route_table() -> Vec<(Method, String)> {
    routes()
        .table
        .into_iter()
        .map(|(m, p)| (m, p.replace("{*", "{")))
        .collect()
}

pub fn app(state: AppState) -> Router {
    let max_json = state.config.server.max_json_bytes;
    routes()
        .router
        .fallback(unknown_route)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(max_json))
        .layer(middleware::from_fn_with_state(state.clone(), auth::authenticate))
        .layer(middleware::from_fn_with_state(state.clone(), metrics::track))
        .with_state(state)
        .layer(middleware::from_fn(errors_as_json))
        .layer(TraceLayer::new_for_http().make_span_with(|req: &Request<Body>| {
            let request_id = req
                .headers()
                .get("x-request-id")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("-");
            tracing::info_span!("request", method = %req.method(), path = %req.uri().path(), request_id)
        }))
        .layer(PropagateRequestIdLayer::x_request_id())
        .layer(SetRequestIdLayer::x_request_id(MakeRequestUuid))
}

/// The dashboard: one self-contained page (inline CSS and JavaScript, no external resources)
/// compiled into the binary.
async fn dashboard() -> axum::response::Html<&'static str> {
    axum::response::Html(include_str!("dashboard.html"))
}

async fn unknown_route(method: Method, uri: axum::http::Uri) -> ApiError {
    ApiError::NotFound(format!("no route for {method} {}", uri.path()))
}

async fn method_not_allowed(method: Method, uri: axum::http::Uri) -> Response {
    error_body(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        &format!("{method} is not allowed on {}", uri.path()),
    )
}

/// Last line of defence for the error format: any error response that is not already JSON (from a
/// layer or a rejection we did not wrap) is rewritten into `{"error": {...}}` with a code derived
/// from its status.
async fn errors_as_json(req: Request<Body>, next: Next) -> Response {
    let response = next.run(req).await;
    let status = response.status();
    let is_json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return response;
    }
    let code = match status {
        StatusCode::NOT_FOUND => "not_found",
        StatusCode::METHOD_NOT_ALLOWED => "method_not_allowed",
        StatusCode::PAYLOAD_TOO_LARGE => "payload_too_large",
        StatusCode::UNSUPPORTED_MEDIA_TYPE => "unsupported_media_type",
        StatusCode::RANGE_NOT_SATISFIABLE => "range_not_satisfiable",
        StatusCode::UNAUTHORIZED => "unauthorized",
        StatusCode::TOO_MANY_REQUESTS => "rate_limited",
        s if s.is_server_error() => "internal",
        _ => "invalid_request",
    };
    let message = status.canonical_reason().unwrap_or("error").to_lowercase();
    let (mut parts, _) = response.into_parts();
    let mut rewritten = error_body(status, code, &message);
    std::mem::swap(rewritten.headers_mut(), &mut parts.headers);
    rewritten.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    rewritten.headers_mut().remove(header::CONTENT_LENGTH);
    rewritten
}

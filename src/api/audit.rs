//! The audit trail: one structured `audit` line per mutating request (POST, PUT, PATCH, DELETE),
//! naming who (key id, tenant), what (method and route template), which resource (the created
//! resource's `Location`, else the request path), the outcome, and the request id that ties it to
//! the rest of the request's log lines.

use axum::body::Body;
use axum::extract::MatchedPath;
use axum::http::{Method, Request, header};
use axum::middleware::Next;
use axum::response::Response;

use super::auth::Principal;

pub async fn record(principal: Principal, req: Request<Body>, next: Next) -> Response {
    let mutating = matches!(
        *req.method(),
        Method::POST | Method::PUT | Method::PATCH | Method::DELETE
    );
    if !mutating {
        return next.run(req).await;
    }
    let method = req.method().clone();
    let route = req.extensions().get::<MatchedPath>().map(|p| p.as_str().to_string());
    let path = req.uri().path().to_string();
    let request_id = req
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("-")
        .to_string();
    let response = next.run(req).await;
    let resource = response
        .headers()
        .get(header::LOCATION)
        .and_then(|v| v.to_str().ok())
        .unwrap_or(&path);
    let key_id = principal.key_id.map_or_else(|| "none".to_string(), |k| k.to_string());
    tracing::info!(
        target: "audit",
        key_id,
        tenant = %principal.tenant,
        action = %format!("{method} {}", route.as_deref().unwrap_or(&path)),
        resource,
        status = response.status().as_u16(),
        request_id,
        "audit"
    );
    response
}

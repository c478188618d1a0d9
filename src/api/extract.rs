//! axum's extractors, with their rejections turned into the API's error format.

use axum::extract::{FromRequest, FromRequestParts};
use axum::http::request::Parts;
use uuid::Uuid;

use super::auth::Principal;
use super::error::ApiError;

#[derive(FromRequest)]
#[from_request(via(axum::Json), rejection(ApiError))]
pub struct Json<T>(pub T);

#[derive(FromRequestParts)]
#[from_request(via(axum::extract::Path), rejection(ApiError))]
pub struct Path<T>(pub T);

#[derive(FromRequestParts)]
#[from_request(via(axum::extract::Query), rejection(ApiError))]
pub struct Query<T>(pub T);

/// The tenant a request acts for, as `auth::authenticate` resolved it from the request's key. A
/// request that did not pass through authentication has no tenant and is refused, so a route
/// mounted outside `/v1` by mistake cannot fall back to someone's data.
#[derive(Debug, Clone, Copy)]
pub struct Tenant(pub Uuid);

impl<S: Send + Sync> FromRequestParts<S> for Tenant {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        parts
            .extensions
            .get::<Principal>()
            .map(|p| Tenant(p.tenant))
            .ok_or_else(|| ApiError::Unauthorized("this request carries no credentials".into()))
    }
}

//! axum's extractors, with their rejections turned into the API's error format.

use axum::extract::{FromRequest, FromRequestParts};
use axum::http::request::Parts;
use uuid::Uuid;

use super::error::ApiError;
use crate::db::DEFAULT_TENANT;

#[derive(FromRequest)]
#[from_request(via(axum::Json), rejection(ApiError))]
pub struct Json<T>(pub T);

#[derive(FromRequestParts)]
#[from_request(via(axum::extract::Path), rejection(ApiError))]
pub struct Path<T>(pub T);

#[derive(FromRequestParts)]
#[from_request(via(axum::extract::Query), rejection(ApiError))]
pub struct Query<T>(pub T);

/// The tenant a request acts for. Until API keys exist (single-tenant local mode), every request
/// acts for the built-in default tenant; handlers already scope every query by it.
#[derive(Debug, Clone, Copy)]
pub struct Tenant(pub Uuid);

impl<S: Send + Sync> FromRequestParts<S> for Tenant {
    type Rejection = ApiError;

    async fn from_request_parts(_parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        Ok(Tenant(DEFAULT_TENANT))
    }
}

//! `/v1/models`: upload (raw body or multipart), list, get, download, delete.

use axum::body::Body;
use axum::extract::{FromRequest, Multipart, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::AppState;
use super::download;
use super::error::{ApiError, ApiResult};
use super::extract::{Path, Query, Tenant};
use super::upload::{self, Staged};
use crate::db::models::{self as db_models, DeleteOutcome, ModelRow, NewModel};
use crate::db::page::{self, Cursor};
use crate::onnx::{self, ModelSummary};
use crate::storage;

#[derive(Debug, Serialize)]
pub struct Model {
    pub id: Uuid,
    pub name: String,
    pub size_bytes: i64,
    pub sha256: String,
    pub created_at: DateTime<Utc>,
    pub summary: ModelSummary,
}

impl From<ModelRow> for Model {
    fn from(r: ModelRow) -> Self {
        Model {
            id: r.id,
            name: r.name,
            size_bytes: r.size_bytes,
            sha256: r.sha256,
            created_at: r.created_at,
            summary: r.summary.0,
        }
    }
}

#[derive(Debug, Serialize)]
pub struct Page<T> {
    pub items: Vec<T>,
    pub next_cursor: Option<String>,
}

#[derive(Debug, Deserialize)]
pub struct UploadQuery {
    name: Option<String>,
}

#[derive(Debug, Deserialize)]
pub struct PageQuery {
    pub limit: Option<i64>,
    pub cursor: Option<String>,
}

impl PageQuery {
    pub fn parse(&self) -> ApiResult<(i64, Option<Cursor>)> {
        let limit = self.limit.unwrap_or(page::DEFAULT_LIMIT);
        if !(1..=page::MAX_LIMIT).contains(&limit) {
            return Err(ApiError::InvalidQuery(format!(
                "limit must be within 1..={}",
                page::MAX_LIMIT
            )));
        }
        let cursor = match &self.cursor {
            None => None,
            Some(c) => Some(
                Cursor::decode(c).ok_or_else(|| ApiError::InvalidQuery("cursor is not one this API issued".into()))?,
            ),
        };
        Ok((limit, cursor))
    }
}

/// The next cursor when the page is full (there may be more rows after it).
pub fn next_cursor<T>(rows: &[T], limit: i64, key: impl Fn(&T) -> Cursor) -> Option<String> {
    (rows.len() as i64 == limit)
        .then(|| rows.last().map(|r| key(r).encode()))
        .flatten()
}

/// A display name: trimmed, control characters dropped, at most 255 characters. It is only a
/// label; storage keys never use it.
fn clean_name(raw: Option<&str>) -> String {
    let cleaned: String = raw
        .unwrap_or("")
        .trim()
        .chars()
        .filter(|c| !c.is_control())
        .take(255)
        .collect();
    if cleaned.is_empty() { "model".into() } else { cleaned }
}

pub async fn upload(
    State(state): State<AppState>,
    tenant: Tenant,
    Query(query): Query<UploadQuery>,
    request: Request,
) -> ApiResult<Response> {
    let limit = state.config.limits.max_model_bytes;
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > limit) {
        return Err(upload::too_large(limit));
    }
    let content_type = request
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_ascii_lowercase();
    let staging = state.config.staging_dir();
    let (staged, filename) = if content_type.starts_with("application/octet-stream") {
        let body = request.into_body().into_data_stream();
        (upload::stage(&staging, body, limit).await?, None)
    } else if content_type.starts_with("multipart/form-data") {
        let mut multipart = Multipart::from_request(request, &state)
            .await
            .map_err(|e| ApiError::InvalidRequest(e.body_text()))?;
        let mut found = None;
        while let Some(field) = multipart
            .next_field()
            .await
            .map_err(|e| ApiError::InvalidRequest(format!("malformed multipart body: {}", e.body_text())))?
        {
            if field.name() == Some("file") {
                let filename = field.file_name().map(str::to_string);
                found = Some((upload::stage(&staging, field, limit).await?, filename));
                break;
            }
        }
        found.ok_or_else(|| ApiError::InvalidRequest("the multipart body has no part named \"file\"".into()))?
    } else {
        return Err(ApiError::UnsupportedMediaType(
            "upload the model as application/octet-stream or as multipart/form-data with a part named \"file\"".into(),
        ));
    };
    let name = clean_name(query.name.as_deref().or(filename.as_deref()));
    let model = store_model(&state, tenant, staged, &name).await?;
    let location = format!("/v1/models/{}", model.id);
    Ok((StatusCode::CREATED, [(header::LOCATION, location)], axum::Json(model)).into_response())
}

/// Parses the staged file as ONNX, moves it into storage and records it. An invalid model leaves
/// nothing behind: the staged file is deleted when `staged` drops.
async fn store_model(state: &AppState, tenant: Tenant, staged: Staged, name: &str) -> ApiResult<Model> {
    if staged.size == 0 {
        return Err(ApiError::InvalidModel("the upload is empty".into()));
    }
    let path = staged.path.to_path_buf();
    let summary = tokio::task::spawn_blocking(move || onnx::load(&path).map(|m| ModelSummary::of(&m)))
        .await
        .map_err(|e| ApiError::Internal(e.into()))?
        .map_err(|e| ApiError::InvalidModel(e.to_string()))?;
    let id = Uuid::new_v4();
    let key = storage::model_key(tenant.0, id);
    state.storage.put_file(&key, &staged.path).await?;
    let row = db_models::insert(
        &state.pool,
        NewModel {
            id,
            tenant_id: tenant.0,
            name,
            size_bytes: staged.size as i64,
            sha256: &staged.sha256,
            storage_key: &key,
            summary: &summary,
        },
    )
    .await;
    match row {
        Ok(row) => {
            tracing::info!(model_id = %id, size = staged.size, "model stored");
            Ok(row.into())
        }
        Err(e) => {
            let _ = state.storage.delete(&key).await;
            Err(e.into())
        }
    }
}

pub async fn list(
    State(state): State<AppState>,
    tenant: Tenant,
    Query(q): Query<PageQuery>,
) -> ApiResult<axum::Json<Page<Model>>> {
    let (limit, cursor) = q.parse()?;
    let rows = db_models::list(&state.pool, tenant.0, limit, cursor).await?;
    let next_cursor = next_cursor(&rows, limit, |r| Cursor {
        created_at: r.created_at,
        id: r.id,
    });
    Ok(axum::Json(Page {
        items: rows.into_iter().map(Model::from).collect(),
        next_cursor,
    }))
}

async fn find(state: &AppState, tenant: Tenant, id: Uuid) -> ApiResult<ModelRow> {
    db_models::get(&state.pool, tenant.0, id)
        .await?
        .ok_or_else(|| ApiError::not_found("model"))
}

pub async fn get(State(state): State<AppState>, tenant: Tenant, Path(id): Path<Uuid>) -> ApiResult<axum::Json<Model>> {
    Ok(axum::Json(find(&state, tenant, id).await?.into()))
}

pub async fn content(
    State(state): State<AppState>,
    tenant: Tenant,
    Path(id): Path<Uuid>,
    headers: HeaderMap,
) -> ApiResult<Response<Body>> {
    let model = find(&state, tenant, id).await?;
    download::serve(
        &state,
        &headers,
        download::Object {
            key: &model.storage_key,
            size: model.size_bytes as u64,
            sha256: &model.sha256,
            content_type: "application/octet-stream",
        },
    )
    .await
}

pub async fn delete(State(state): State<AppState>, tenant: Tenant, Path(id): Path<Uuid>) -> ApiResult<StatusCode> {
    match db_models::delete(&state.pool, tenant.0, id).await? {
        DeleteOutcome::Deleted(key) => {
            if let Err(e) = state.storage.delete(&key).await {
                tracing::warn!(error = %e, key, "model row deleted but its bytes could not be removed");
            }
            Ok(StatusCode::NO_CONTENT)
        }
        DeleteOutcome::NotFound => Err(ApiError::not_found("model")),
        DeleteOutcome::InUse => Err(ApiError::Conflict {
            code: "model_in_use",
            message: "a queued or running job uses this model; cancel it or wait for it to finish".into(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_cleaned_and_defaulted() {
        assert_eq!(clean_name(Some("  resnet.onnx ")), "resnet.onnx");
        assert_eq!(clean_name(Some("a\u{0}b\nc")), "abc");
        assert_eq!(clean_name(None), "model");
        assert_eq!(clean_name(Some(&"x".repeat(300))).len(), 255);
    }
}

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
use super::upload::{self, Written};
use crate::db::DeleteOutcome;
use crate::db::models::{self as db_models, ModelFile, ModelRow, NewModel};
use crate::db::page::{self, Cursor};
use crate::onnx::bundle::{self, ArchiveKind, BundleError};
use crate::onnx::{self, ModelSummary, external};
use crate::storage;

#[derive(Debug, Serialize)]
pub struct Model {
    pub id: Uuid,
    pub name: String,
    pub size_bytes: i64,
    pub sha256: String,
    pub created_at: DateTime<Utc>,
    pub summary: ModelSummary,
    /// External-data files stored with the model (bundles); empty for self-contained models.
    pub files: Vec<ModelFileInfo>,
}

#[derive(Debug, Serialize)]
pub struct ModelFileInfo {
    pub path: String,
    pub size_bytes: i64,
    pub sha256: String,
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
            files: r
                .files
                .0
                .into_iter()
                .map(|f| ModelFileInfo {
                    path: f.path,
                    size_bytes: f.size_bytes,
                    sha256: f.sha256,
                })
                .collect(),
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

/// A page of API items from database rows, with the cursor of the last row when the page is full.
pub fn page<R, T>(
    rows: Vec<R>,
    limit: i64,
    key: impl Fn(&R) -> (DateTime<Utc>, Uuid),
    item: impl Fn(R) -> T,
) -> Page<T> {
    let next_cursor = next_cursor(&rows, limit, |r| {
        let (created_at, id) = key(r);
        Cursor { created_at, id }
    });
    Page {
        items: rows.into_iter().map(item).collect(),
        next_cursor,
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
pub fn clean_name(raw: Option<&str>, default: &str) -> String {
    let cleaned: String = raw
        .unwrap_or("")
        .trim()
        .chars()
        .filter(|c| !c.is_control())
        .take(255)
        .collect();
    if cleaned.is_empty() { default.into() } else { cleaned }
}

/// Where the model file goes inside its upload folder; its external-data files sit beside it.
const MODEL_FILE: &str = "model.onnx";

pub async fn upload(
    State(state): State<AppState>,
    tenant: Tenant,
    Query(query): Query<UploadQuery>,
    request: Request,
) -> ApiResult<Response> {
    let limit = state.config.limits.max_model_bytes;
    upload::check_quota(&state, tenant, 0).await?;
    let staging = state.config.staging_dir();
    let (content_type, folder) = upload::begin(request.headers(), limit, &staging).await?;
    let internal = |e: std::io::Error| ApiError::Internal(e.into());
    let model_path = folder.path().join(MODEL_FILE);
    let archive = match content_type.split(';').next().unwrap_or("").trim() {
        "application/zip" | "application/x-zip-compressed" => Some(ArchiveKind::Zip),
        "application/x-tar" | "application/tar" => Some(ArchiveKind::Tar),
        _ => None,
    };
    let (written, filename) = if content_type.starts_with("application/octet-stream") {
        let body = request.into_body().into_data_stream();
        (Some(upload::stage(&model_path, body, limit).await?), None)
    } else if let Some(kind) = archive {
        // The archive is staged outside the model's folder, then unpacked into it.
        let holder = tempfile::tempdir_in(&staging).map_err(internal)?;
        let archive_path = holder.path().join("bundle");
        upload::stage(&archive_path, request.into_body().into_data_stream(), limit).await?;
        let dest = folder.path().join("bundle");
        tokio::task::spawn_blocking(move || bundle::extract(&archive_path, kind, &dest, limit))
            .await
            .map_err(|e| ApiError::Internal(e.into()))?
            .map_err(|e| match e {
                BundleError::TooLarge { .. } => ApiError::InvalidModel(e.to_string()),
                BundleError::Invalid(m) => ApiError::InvalidModel(format!("invalid bundle: {m}")),
                BundleError::Io(e) => ApiError::Internal(e.into()),
            })?;
        (None, None)
    } else if content_type.starts_with("multipart/form-data") {
        let filename = stage_multipart(&state, request, folder.path(), &model_path, limit).await?;
        (None, filename)
    } else {
        return Err(ApiError::UnsupportedMediaType(
            "upload the model as application/octet-stream, as a .zip or .tar bundle (application/zip, \
             application/x-tar), or as multipart/form-data with a part named \"file\""
                .into(),
        ));
    };
    let model_path = match archive {
        Some(_) => {
            bundle::find_model(&folder.path().join("bundle")).map_err(|e| ApiError::InvalidModel(e.to_string()))?
        }
        None => model_path,
    };
    let name = clean_name(
        query
            .name
            .as_deref()
            .or(filename.as_deref())
            .or_else(|| archive.and_then(|_| model_path.file_name().and_then(|n| n.to_str()))),
        "model",
    );
    let model = store_model(&state, tenant, &model_path, written, &name).await?;
    drop(folder);
    let location = format!("/v1/models/{}", model.id);
    Ok((StatusCode::CREATED, [(header::LOCATION, location)], axum::Json(model)).into_response())
}

/// Multipart: the part named `file` is the model; parts named `data` carry external-data files,
/// each stored under its filename (a relative path such as `weights/w.bin`). Returns the model
/// part's filename.
async fn stage_multipart(
    state: &AppState,
    request: Request,
    folder: &std::path::Path,
    model_path: &std::path::Path,
    limit: u64,
) -> ApiResult<Option<String>> {
    let mut multipart = Multipart::from_request(request, state)
        .await
        .map_err(|e| ApiError::InvalidRequest(e.body_text()))?;
    let mut budget = limit;
    let mut model_filename = None;
    let mut saw_model = false;
    while let Some(field) = multipart
        .next_field()
        .await
        .map_err(|e| ApiError::InvalidRequest(format!("malformed multipart body: {}", e.body_text())))?
    {
        let path = match field.name() {
            Some("file") => {
                if saw_model {
                    return Err(ApiError::InvalidRequest(
                        "the upload has two parts named \"file\"".into(),
                    ));
                }
                saw_model = true;
                model_filename = field.file_name().map(str::to_string);
                model_path.to_path_buf()
            }
            Some("data") => {
                let location = field
                    .file_name()
                    .ok_or_else(|| ApiError::InvalidRequest("a \"data\" part needs a filename".into()))?
                    .to_string();
                external::check_location(&location)
                    .map_err(|why| ApiError::InvalidModel(format!("data part {location:?}: the name {why}")))?;
                if location == MODEL_FILE {
                    return Err(ApiError::InvalidRequest(format!(
                        "a data part may not be named {MODEL_FILE:?}"
                    )));
                }
                folder.join(location)
            }
            _ => continue,
        };
        let written = upload::stage(&path, field, budget).await.map_err(|e| match e {
            ApiError::PayloadTooLarge(_) => upload::too_large(limit),
            other => other,
        })?;
        budget -= written.size;
    }
    if !saw_model {
        return Err(ApiError::InvalidRequest(
            "the multipart body has no part named \"file\"".into(),
        ));
    }
    Ok(model_filename)
}

/// Parses the model, checks its external data against the files uploaded with it, moves model and
/// files into storage and records them. An invalid model leaves nothing behind (the upload folder is
/// removed by the caller).
async fn store_model(
    state: &AppState,
    tenant: Tenant,
    model_path: &std::path::Path,
    written: Option<Written>,
    name: &str,
) -> ApiResult<Model> {
    let path = model_path.to_path_buf();
    let checked = tokio::task::spawn_blocking(move || -> Result<_, crate::onnx::OnnxError> {
        onnx::precheck(&path)?;
        let model = onnx::read(&path)?;
        onnx::domains::check(&model)?;
        let dir = path.parent().expect("the model sits in its upload folder");
        let used = external::check(&model, dir)?;
        Ok((ModelSummary::of(&model), used))
    })
    .await
    .map_err(|e| ApiError::Internal(e.into()))?;
    let (summary, used) = match checked {
        Ok(ok) => ok,
        Err(crate::onnx::OnnxError::Io { source, .. }) if source.kind() != std::io::ErrorKind::NotFound => {
            return Err(ApiError::Internal(source.into()));
        }
        Err(e) => return Err(ApiError::InvalidModel(e.to_string())),
    };
    let Written { size, sha256 } = match written {
        Some(w) => w,
        None => {
            let (size, sha256) = storage::hash_file(model_path)
                .await
                .map_err(|e| ApiError::Internal(e.into()))?;
            Written { size, sha256 }
        }
    };
    let id = Uuid::new_v4();
    let dir = model_path.parent().expect("the model sits in its upload folder");
    let mut files = Vec::new();
    let mut total = size;
    for (n, location) in used.iter().enumerate() {
        let (file_size, file_sha) = storage::hash_file(&dir.join(location))
            .await
            .map_err(|e| ApiError::Internal(e.into()))?;
        total += file_size;
        files.push(ModelFile {
            path: location.clone(),
            size_bytes: file_size as i64,
            sha256: file_sha,
            storage_key: storage::model_file_key(tenant.0, id, n),
        });
    }
    upload::check_quota(state, tenant, total).await?;
    let key = storage::model_key(tenant.0, id);
    let stored = async {
        for f in &files {
            state.storage.put_file(&f.storage_key, &dir.join(&f.path)).await?;
        }
        state.storage.put_file(&key, model_path).await
    }
    .await;
    let row = match stored {
        Ok(()) => db_models::insert(
            &state.pool,
            NewModel {
                id,
                tenant_id: tenant.0,
                name,
                size_bytes: total as i64,
                sha256: &sha256,
                storage_key: &key,
                summary: &summary,
                files: &files,
            },
        )
        .await
        .map_err(ApiError::from),
        Err(e) => Err(ApiError::from(e)),
    };
    match row {
        Ok(row) => {
            tracing::info!(model_id = %id, size = total, files = files.len(), "model stored");
            Ok(row.into())
        }
        Err(e) => {
            let _ = state.storage.delete_prefix(&storage::model_prefix(tenant.0, id)).await;
            Err(e)
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
    Ok(axum::Json(page(rows, limit, |r| (r.created_at, r.id), Model::from)))
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
    // size_bytes counts a bundle's data files too; the .onnx alone is what is sent here.
    let size = state.storage.size(&model.storage_key).await?;
    download::serve(
        &state,
        &headers,
        download::Object {
            key: &model.storage_key,
            size,
            sha256: &model.sha256,
            content_type: "application/octet-stream",
        },
    )
    .await
}

/// One external-data file of a bundle model, by the location its model gives for it.
pub async fn file(
    State(state): State<AppState>,
    tenant: Tenant,
    Path((id, path)): Path<(Uuid, String)>,
    headers: HeaderMap,
) -> ApiResult<Response<Body>> {
    let model = find(&state, tenant, id).await?;
    let file = model
        .files
        .0
        .iter()
        .find(|f| f.path == path)
        .ok_or_else(|| ApiError::NotFound(format!("model {id} has no file {path:?}")))?;
    download::serve(
        &state,
        &headers,
        download::Object {
            key: &file.storage_key,
            size: file.size_bytes as u64,
            sha256: &file.sha256,
            content_type: "application/octet-stream",
        },
    )
    .await
}

pub async fn delete(State(state): State<AppState>, tenant: Tenant, Path(id): Path<Uuid>) -> ApiResult<StatusCode> {
    match db_models::delete(&state.pool, tenant.0, id).await? {
        DeleteOutcome::Deleted => {
            let prefix = storage::model_prefix(tenant.0, id);
            if let Err(e) = state.storage.delete_prefix(&prefix).await {
                tracing::warn!(error = %e, prefix, "model row deleted but its bytes could not be removed");
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
        assert_eq!(clean_name(Some("  resnet.onnx "), "model"), "resnet.onnx");
        assert_eq!(clean_name(Some("a\u{0}b\nc"), "model"), "abc");
        assert_eq!(clean_name(None, "model"), "model");
        assert_eq!(clean_name(Some(&"x".repeat(300)), "model").len(), 255);
    }
}

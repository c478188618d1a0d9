//! `/v1/datasets`: upload a NumPy `.npz` (raw body or multipart), list, get, delete.

use axum::extract::{FromRequest, Multipart, Request, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::AppState;
use super::error::{ApiError, ApiResult};
use super::extract::{Path, Query, Tenant};
use super::models::{Page, PageQuery, page};
use super::upload;
use crate::db::DeleteOutcome;
use crate::db::datasets::{self as db_datasets, DatasetRow, NewDataset};
use crate::eval::npz::{self, NpyArray, NpzError};
use crate::storage;

#[derive(Debug, Serialize)]
pub struct Dataset {
    pub id: Uuid,
    pub name: String,
    pub size_bytes: i64,
    pub sha256: String,
    pub arrays: Vec<NpyArray>,
    pub samples: i64,
    pub created_at: DateTime<Utc>,
}

impl From<DatasetRow> for Dataset {
    fn from(r: DatasetRow) -> Self {
        Dataset {
            id: r.id,
            name: r.name,
            size_bytes: r.size_bytes,
            sha256: r.sha256,
            arrays: r.arrays.0,
            samples: r.samples,
            created_at: r.created_at,
        }
    }
}

#[derive(Debug, Deserialize)]
pub struct UploadQuery {
    name: Option<String>,
}

fn invalid_dataset(message: impl Into<String>) -> ApiError {
    ApiError::InvalidDataset(message.into())
}

pub async fn upload(
    State(state): State<AppState>,
    tenant: Tenant,
    Query(query): Query<UploadQuery>,
    request: Request,
) -> ApiResult<Response> {
    let limit = state.config.limits.max_dataset_bytes;
    upload::check_quota(&state, tenant, 0).await?;
    let (content_type, folder) = upload::begin(request.headers(), limit, &state.config.staging_dir()).await?;
    let path = folder.path().join("data.npz");
    let (written, filename) = if content_type.starts_with("application/octet-stream") {
        (
            upload::stage(&path, request.into_body().into_data_stream(), limit).await?,
            None,
        )
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
                found = Some((upload::stage(&path, field, limit).await?, filename));
                break;
            }
        }
        found.ok_or_else(|| ApiError::InvalidRequest("the multipart body has no part named \"file\"".into()))?
    } else {
        return Err(ApiError::UnsupportedMediaType(
            "upload the dataset (.npz) as application/octet-stream or multipart/form-data with a part named \"file\""
                .into(),
        ));
    };

    let unpack_dir = folder.path().join("arrays");
    let npz_path = path.clone();
    let arrays = tokio::task::spawn_blocking(move || {
        std::fs::create_dir_all(&unpack_dir)?;
        let arrays = npz::unpack(&npz_path, &unpack_dir, limit)?;
        let samples = npz::sample_count(&arrays)?;
        Ok::<_, NpzError>((arrays, samples))
    })
    .await
    .map_err(|e| ApiError::Internal(e.into()))?;
    let (arrays, samples) = arrays.map_err(|e| match e {
        NpzError::Io(e) => ApiError::Internal(e.into()),
        other => invalid_dataset(other.to_string()),
    })?;

    upload::check_quota(&state, tenant, written.size).await?;
    let id = Uuid::new_v4();
    let key = storage::dataset_key(tenant.0, id);
    let name = super::models::clean_name(query.name.as_deref().or(filename.as_deref()), "dataset");
    state.storage.put_file(&key, &path).await?;
    let row = db_datasets::insert(
        &state.pool,
        NewDataset {
            id,
            tenant_id: tenant.0,
            name: &name,
            size_bytes: written.size as i64,
            sha256: &written.sha256,
            storage_key: &key,
            arrays: &arrays,
            samples: samples as i64,
        },
    )
    .await;
    let row = match row {
        Ok(row) => row,
        Err(e) => {
            let _ = state.storage.delete(&key).await;
            return Err(e.into());
        }
    };
    tracing::info!(dataset_id = %id, samples, "dataset stored");
    let location = format!("/v1/datasets/{id}");
    Ok((
        StatusCode::CREATED,
        [(header::LOCATION, location)],
        axum::Json(Dataset::from(row)),
    )
        .into_response())
}

pub async fn list(
    State(state): State<AppState>,
    tenant: Tenant,
    Query(q): Query<PageQuery>,
) -> ApiResult<axum::Json<Page<Dataset>>> {
    let (limit, cursor) = q.parse()?;
    let rows = db_datasets::list(&state.pool, tenant.0, limit, cursor).await?;
    Ok(axum::Json(page(rows, limit, |r| (r.created_at, r.id), Dataset::from)))
}

pub async fn get(
    State(state): State<AppState>,
    tenant: Tenant,
    Path(id): Path<Uuid>,
) -> ApiResult<axum::Json<Dataset>> {
    let row = db_datasets::get(&state.pool, tenant.0, id)
        .await?
        .ok_or_else(|| ApiError::not_found("dataset"))?;
    Ok(axum::Json(row.into()))
}

pub async fn delete(State(state): State<AppState>, tenant: Tenant, Path(id): Path<Uuid>) -> ApiResult<StatusCode> {
    match db_datasets::delete(&state.pool, tenant.0, id).await? {
        DeleteOutcome::Deleted => {
            let key = storage::dataset_key(tenant.0, id);
            if let Err(e) = state.storage.delete(&key).await {
                tracing::warn!(error = %e, key, "dataset row deleted but its bytes could not be removed");
            }
            Ok(StatusCode::NO_CONTENT)
        }
        DeleteOutcome::NotFound => Err(ApiError::not_found("dataset")),
        DeleteOutcome::InUse => Err(ApiError::Conflict {
            code: "dataset_in_use",
            message: "a queued or running job uses this dataset; cancel it or wait for it to finish".into(),
        }),
    }
}

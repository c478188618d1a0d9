//! Uploaded models.

use chrono::{DateTime, Utc};
use sqlx::PgPool;
use sqlx::types::Json;
use uuid::Uuid;

use super::DeleteOutcome;
use super::page::Cursor;
use crate::onnx::ModelSummary;

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct ModelRow {
    pub id: Uuid,
    pub tenant_id: Uuid,
    pub name: String,
    pub size_bytes: i64,
    pub sha256: String,
    pub storage_key: String,
    pub summary: Json<ModelSummary>,
    pub created_at: DateTime<Utc>,
    pub files: Json<Vec<ModelFile>>,
}

/// An external-data file stored with a model.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ModelFile {
    /// Relative to the model's folder, as the model's `external_data` locations name it.
    pub path: String,
    pub size_bytes: i64,
    pub sha256: String,
    pub storage_key: String,
}

pub struct NewModel<'a> {
    pub id: Uuid,
    pub tenant_id: Uuid,
    pub name: &'a str,
    pub size_bytes: i64,
    pub sha256: &'a str,
    pub storage_key: &'a str,
    pub summary: &'a ModelSummary,
    pub files: &'a [ModelFile],
}

pub async fn insert(pool: &PgPool, m: NewModel<'_>) -> Result<ModelRow, sqlx::Error> {
    sqlx::query_as(
        "INSERT INTO models (id, tenant_id, name, size_bytes, sha256, storage_key, summary, files)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
         RETURNING *",
    )
    .bind(m.id)
    .bind(m.tenant_id)
    .bind(m.name)
    .bind(m.size_bytes)
    .bind(m.sha256)
    .bind(m.storage_key)
    .bind(Json(m.summary))
    .bind(Json(m.files))
    .fetch_one(pool)
    .await
}

pub async fn get(pool: &PgPool, tenant: Uuid, id: Uuid) -> Result<Option<ModelRow>, sqlx::Error> {
    sqlx::query_as("SELECT * FROM models WHERE id = $1 AND tenant_id = $2")
        .bind(id)
        .bind(tenant)
        .fetch_optional(pool)
        .await
}

/// Newest first, `limit` rows after `cursor`.
pub async fn list(
    pool: &PgPool,
    tenant: Uuid,
    limit: i64,
    cursor: Option<Cursor>,
) -> Result<Vec<ModelRow>, sqlx::Error> {
    sqlx::query_as(
        "SELECT * FROM models
         WHERE tenant_id = $1 AND ($2::timestamptz IS NULL OR (created_at, id) < ($2, $3))
         ORDER BY created_at DESC, id DESC
         LIMIT $4",
    )
    .bind(tenant)
    .bind(cursor.map(|c| c.created_at))
    .bind(cursor.map(|c| c.id))
    .bind(limit)
    .fetch_all(pool)
    .await
}

pub async fn delete(pool: &PgPool, tenant: Uuid, id: Uuid) -> Result<DeleteOutcome, sqlx::Error> {
    let deleted: Option<(Uuid,)> = sqlx::query_as(
        "DELETE FROM models m
         WHERE m.id = $1 AND m.tenant_id = $2
           AND NOT EXISTS (SELECT 1 FROM jobs j WHERE j.model_id = m.id AND j.state IN ('queued', 'running'))
         RETURNING m.id",
    )
    .bind(id)
    .bind(tenant)
    .fetch_optional(pool)
    .await?;
    Ok(match deleted {
        Some(_) => DeleteOutcome::Deleted,
        None if get(pool, tenant, id).await?.is_some() => DeleteOutcome::InUse,
        None => DeleteOutcome::NotFound,
    })
}

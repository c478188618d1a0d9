//! Uploaded evaluation datasets.

use chrono::{DateTime, Utc};
use sqlx::PgPool;
use sqlx::types::Json;
use uuid::Uuid;

use super::DeleteOutcome;
use super::page::Cursor;
use crate::eval::npz::NpyArray;

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct DatasetRow {
    pub id: Uuid,
    pub tenant_id: Uuid,
    pub name: String,
    pub size_bytes: i64,
    pub sha256: String,
    pub storage_key: String,
    pub arrays: Json<Vec<NpyArray>>,
    pub samples: i64,
    pub created_at: DateTime<Utc>,
}

pub struct NewDataset<'a> {
    pub id: Uuid,
    pub tenant_id: Uuid,
    pub name: &'a str,
    pub size_bytes: i64,
    pub sha256: &'a str,
    pub storage_key: &'a str,
    pub arrays: &'a [NpyArray],
    pub samples: i64,
}

pub async fn insert(pool: &PgPool, d: NewDataset<'_>) -> Result<DatasetRow, sqlx::Error> {
    sqlx::query_as(
        "INSERT INTO datasets (id, tenant_id, name, size_bytes, sha256, storage_key, arrays, samples)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
         RETURNING *",
    )
    .bind(d.id)
    .bind(d.tenant_id)
    .bind(d.name)
    .bind(d.size_bytes)
    .bind(d.sha256)
    .bind(d.storage_key)
    .bind(Json(d.arrays))
    .bind(d.samples)
    .fetch_one(pool)
    .await
}

pub async fn get(pool: &PgPool, tenant: Uuid, id: Uuid) -> Result<Option<DatasetRow>, sqlx::Error> {
    sqlx::query_as("SELECT * FROM datasets WHERE id = $1 AND tenant_id = $2")
        .bind(id)
        .bind(tenant)
        .fetch_optional(pool)
        .await
}

pub async fn list(
    pool: &PgPool,
    tenant: Uuid,
    limit: i64,
    cursor: Option<Cursor>,
) -> Result<Vec<DatasetRow>, sqlx::Error> {
    sqlx::query_as(
        "SELECT * FROM datasets
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

/// Deletes the dataset unless a queued or running job still needs it.
pub async fn delete(pool: &PgPool, tenant: Uuid, id: Uuid) -> Result<DeleteOutcome, sqlx::Error> {
    let deleted: Option<(Uuid,)> = sqlx::query_as(
        "DELETE FROM datasets d
         WHERE d.id = $1 AND d.tenant_id = $2
           AND NOT EXISTS (SELECT 1 FROM jobs j WHERE j.dataset_id = d.id AND j.state IN ('queued', 'running'))
         RETURNING d.id",
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

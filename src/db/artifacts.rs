//! Files a finished job produced. Rows are written by the queue in the same transaction that marks
//! the job succeeded, so a job never shows artifacts from an attempt that lost its lease.

use chrono::{DateTime, Utc};
use sqlx::PgPool;
use uuid::Uuid;

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct ArtifactRow {
    pub job_id: Uuid,
    pub tenant_id: Uuid,
    pub name: String,
    pub size_bytes: i64,
    pub sha256: String,
    pub content_type: String,
    pub storage_key: String,
    pub created_at: DateTime<Utc>,
}

pub async fn list_for_jobs(pool: &PgPool, tenant: Uuid, jobs: &[Uuid]) -> Result<Vec<ArtifactRow>, sqlx::Error> {
    sqlx::query_as("SELECT * FROM artifacts WHERE tenant_id = $1 AND job_id = ANY($2) ORDER BY job_id, name")
        .bind(tenant)
        .bind(jobs)
        .fetch_all(pool)
        .await
}

pub async fn get(pool: &PgPool, tenant: Uuid, job: Uuid, name: &str) -> Result<Option<ArtifactRow>, sqlx::Error> {
    sqlx::query_as("SELECT * FROM artifacts WHERE tenant_id = $1 AND job_id = $2 AND name = $3")
        .bind(tenant)
        .bind(job)
        .bind(name)
        .fetch_optional(pool)
        .await
}

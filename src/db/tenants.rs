//! Tenants and their API keys. A key is `mpk_<key id>_<secret>`; only the SHA-256 of the secret is
//! stored, so a database dump does not hand out working keys.

use chrono::{DateTime, Utc};
use sqlx::PgPool;
use uuid::Uuid;

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct ApiKeyRow {
    pub id: Uuid,
    pub tenant_id: Uuid,
    pub secret_hash: Vec<u8>,
    pub created_at: DateTime<Utc>,
    pub revoked_at: Option<DateTime<Utc>>,
}

/// A key as `modelpress keys list` shows it (never the secret).
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct KeyListing {
    pub id: Uuid,
    pub tenant: String,
    pub created_at: DateTime<Utc>,
    pub revoked_at: Option<DateTime<Utc>>,
}

/// The tenant named `name`, created if it does not exist yet.
pub async fn get_or_create(pool: &PgPool, name: &str) -> Result<Uuid, sqlx::Error> {
    let (id,): (Uuid,) = sqlx::query_as(
        "INSERT INTO tenants (id, name) VALUES ($1, $2)
         ON CONFLICT (name) DO UPDATE SET name = EXCLUDED.name
         RETURNING id",
    )
    .bind(Uuid::new_v4())
    .bind(name)
    .fetch_one(pool)
    .await?;
    Ok(id)
}

pub async fn insert_key(pool: &PgPool, id: Uuid, tenant: Uuid, secret_hash: &[u8]) -> Result<(), sqlx::Error> {
    sqlx::query("INSERT INTO api_keys (id, tenant_id, secret_hash) VALUES ($1, $2, $3)")
        .bind(id)
        .bind(tenant)
        .bind(secret_hash)
        .execute(pool)
        .await?;
    Ok(())
}

pub async fn find_key(pool: &PgPool, id: Uuid) -> Result<Option<ApiKeyRow>, sqlx::Error> {
    sqlx::query_as("SELECT * FROM api_keys WHERE id = $1")
        .bind(id)
        .fetch_optional(pool)
        .await
}

pub async fn list_keys(pool: &PgPool) -> Result<Vec<KeyListing>, sqlx::Error> {
    sqlx::query_as(
        "SELECT k.id, t.name AS tenant, k.created_at, k.revoked_at
         FROM api_keys k JOIN tenants t ON t.id = k.tenant_id
         ORDER BY t.name, k.created_at",
    )
    .fetch_all(pool)
    .await
}

/// Revokes the key; false when no unrevoked key has this id.
pub async fn revoke_key(pool: &PgPool, id: Uuid) -> Result<bool, sqlx::Error> {
    let done = sqlx::query("UPDATE api_keys SET revoked_at = now() WHERE id = $1 AND revoked_at IS NULL")
        .bind(id)
        .execute(pool)
        .await?;
    Ok(done.rows_affected() > 0)
}

/// The tenant's webhook signing secret, created on first use. `fresh` is only used when the tenant
/// has none yet, so concurrent callers all end up with the same secret.
pub async fn webhook_secret(pool: &PgPool, tenant: Uuid, fresh: &str) -> Result<String, sqlx::Error> {
    let (secret,): (String,) = sqlx::query_as(
        "UPDATE tenants SET webhook_secret = COALESCE(webhook_secret, $2) WHERE id = $1 RETURNING webhook_secret",
    )
    .bind(tenant)
    .bind(fresh)
    .fetch_one(pool)
    .await?;
    Ok(secret)
}

/// Bytes the tenant keeps stored: models (with their data files), datasets and job artifacts.
pub async fn stored_bytes(pool: &PgPool, tenant: Uuid) -> Result<i64, sqlx::Error> {
    let (total,): (i64,) = sqlx::query_as(
        "SELECT (COALESCE((SELECT sum(size_bytes) FROM models WHERE tenant_id = $1), 0)
               + COALESCE((SELECT sum(size_bytes) FROM datasets WHERE tenant_id = $1), 0)
               + COALESCE((SELECT sum(size_bytes) FROM artifacts WHERE tenant_id = $1), 0))::bigint",
    )
    .bind(tenant)
    .fetch_one(pool)
    .await?;
    Ok(total)
}

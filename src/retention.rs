//! Retention: finished jobs and artifacts expire after their configured number of days, and objects
//! no row refers to are removed after a grace period. Rows are deleted first and their bytes after:
//! a crash or a failed delete in between leaves an orphan for the next sweep, never a row pointing
//! at missing bytes. One process sweeps at a time (a PostgreSQL advisory lock), so any number of
//! API and worker processes can run the sweeper.

use std::sync::Arc;
use std::time::Duration;

use futures::TryStreamExt;
use sqlx::pool::PoolConnection;
use sqlx::{PgPool, Postgres};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::config::RetentionConfig;
use crate::storage::{self, Storage};

/// Advisory-lock key of the sweep ("mpsweep" in ASCII).
pub const LOCK_KEY: i64 = 0x006d_7073_7765_6570;
/// Rows deleted, and listed objects checked, per statement.
const BATCH: usize = 500;

/// What one sweep removed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Swept {
    pub jobs_deleted: u64,
    pub artifacts_expired: u64,
    pub orphans_deleted: u64,
    pub orphan_bytes: u64,
    /// Byte deletions that failed; their objects are orphans for a later sweep.
    pub delete_failures: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum RetentionError {
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    #[error("listing the store: {0}")]
    Storage(#[from] storage::StorageError),
}

/// Sweeps every `sweep_interval_s` until `shutdown`.
pub async fn run(pool: PgPool, store: Arc<dyn Storage>, config: RetentionConfig, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_secs(config.sweep_interval_s.max(1)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.cancelled() => return,
        }
        let swept = tokio::select! {
            swept = sweep(&pool, store.as_ref(), &config) => swept,
            _ = shutdown.cancelled() => return,
        };
        match swept {
            Ok(Some(s)) if s != Swept::default() => tracing::info!(?s, "retention sweep"),
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "retention sweep failed; retrying next interval"),
        }
    }
}

/// One sweep, unless another process is sweeping (`None`).
pub async fn sweep(
    pool: &PgPool,
    store: &dyn Storage,
    config: &RetentionConfig,
) -> Result<Option<Swept>, RetentionError> {
    // Session-level lock on a connection of its own: released by the unlock below, or by
    // PostgreSQL when the connection closes (a process that dies mid-sweep, or a sweep dropped at
    // shutdown: see `Held`).
    let mut conn = pool.acquire().await?;
    let (locked,): (bool,) = sqlx::query_as("SELECT pg_try_advisory_lock($1)")
        .bind(LOCK_KEY)
        .fetch_one(&mut *conn)
        .await?;
    if !locked {
        return Ok(None);
    }
    let mut held = Held(Some(conn));
    let result = sweep_locked(pool, store, config).await;
    let mut conn = held.0.take().expect("the lock's connection is held until here");
    let unlocked = sqlx::query("SELECT pg_advisory_unlock($1)")
        .bind(LOCK_KEY)
        .execute(&mut *conn)
        .await;
    if unlocked.is_err() {
        // Never hand a connection that may still hold the lock back to the pool.
        drop(conn.detach());
    }
    result.map(Some)
}

/// The connection holding the sweep lock. Dropped before the unlock (the sweep future dropped at
/// shutdown), it closes instead of returning to the pool still holding the lock.
struct Held(Option<PoolConnection<Postgres>>);

impl Drop for Held {
    fn drop(&mut self) {
        if let Some(conn) = self.0.take() {
            drop(conn.detach());
        }
    }
}

async fn sweep_locked(pool: &PgPool, store: &dyn Storage, config: &RetentionConfig) -> Result<Swept, RetentionError> {
    let mut swept = Swept::default();
    if config.finished_jobs_days > 0 {
        loop {
            let jobs = delete_finished_jobs(pool, config.finished_jobs_days).await?;
            swept.jobs_deleted += jobs.len() as u64;
            remove_job_bytes(store, &jobs, &mut swept).await;
            if jobs.len() < BATCH {
                break;
            }
        }
    }
    if config.artifacts_days > 0 {
        loop {
            let jobs = expire_artifacts(pool, config.artifacts_days).await?;
            swept.artifacts_expired += jobs.len() as u64;
            remove_job_bytes(store, &jobs, &mut swept).await;
            if jobs.len() < BATCH {
                break;
            }
        }
    }
    remove_orphans(pool, store, config.orphan_grace_s, &mut swept).await?;
    Ok(swept)
}

/// Deletes up to one batch of jobs that finished more than `days` ago; artifacts rows cascade.
async fn delete_finished_jobs(pool: &PgPool, days: u32) -> Result<Vec<(Uuid, Uuid)>, sqlx::Error> {
    sqlx::query_as(
        "DELETE FROM jobs WHERE id IN (
             SELECT id FROM jobs
             WHERE state IN ('succeeded', 'failed', 'cancelled')
               AND finished_at < now() - make_interval(days => $1)
             LIMIT $2)
         RETURNING id, tenant_id",
    )
    .bind(days as i32)
    .bind(BATCH as i64)
    .fetch_all(pool)
    .await
}

/// Marks up to one batch of succeeded jobs older than `days` as having expired artifacts and
/// deletes their artifacts rows, in one statement.
async fn expire_artifacts(pool: &PgPool, days: u32) -> Result<Vec<(Uuid, Uuid)>, sqlx::Error> {
    sqlx::query_as(
        "WITH expired AS (
             UPDATE jobs SET artifacts_expired_at = now()
             WHERE id IN (
                 SELECT id FROM jobs
                 WHERE state = 'succeeded' AND artifacts_expired_at IS NULL
                   AND finished_at < now() - make_interval(days => $1)
                 LIMIT $2)
             RETURNING id, tenant_id),
         gone AS (DELETE FROM artifacts a USING expired e WHERE a.job_id = e.id)
         SELECT id, tenant_id FROM expired",
    )
    .bind(days as i32)
    .bind(BATCH as i64)
    .fetch_all(pool)
    .await
}

/// Everything stored for these jobs (every attempt's uploads). A failure is counted and left to
/// the orphan sweep.
async fn remove_job_bytes(store: &dyn Storage, jobs: &[(Uuid, Uuid)], swept: &mut Swept) {
    for &(job, tenant) in jobs {
        let prefix = storage::job_prefix(tenant, job);
        if let Err(e) = store.delete_prefix(&prefix).await {
            tracing::warn!(error = %e, prefix, "deleting an expired job's bytes failed; left for the orphan sweep");
            swept.delete_failures += 1;
        }
    }
}

/// Removes objects older than the grace period that no model, dataset or artifact row names.
async fn remove_orphans(
    pool: &PgPool,
    store: &dyn Storage,
    grace_s: u64,
    swept: &mut Swept,
) -> Result<(), RetentionError> {
    let cutoff = chrono::Utc::now() - chrono::Duration::seconds(grace_s.min(i64::MAX as u64) as i64);
    let mut listing = store.list(storage::TENANTS_PREFIX);
    let mut batch = Vec::with_capacity(BATCH);
    loop {
        let next = listing.try_next().await?;
        if let Some(object) = &next
            && object.modified < cutoff
        {
            batch.push((object.key.clone(), object.size));
        }
        if batch.len() == BATCH || (next.is_none() && !batch.is_empty()) {
            remove_unreferenced(pool, store, std::mem::take(&mut batch), swept).await?;
        }
        if next.is_none() {
            return Ok(());
        }
    }
}

async fn remove_unreferenced(
    pool: &PgPool,
    store: &dyn Storage,
    candidates: Vec<(String, u64)>,
    swept: &mut Swept,
) -> Result<(), RetentionError> {
    let keys: Vec<&str> = candidates.iter().map(|(k, _)| k.as_str()).collect();
    let unreferenced: Vec<(String,)> = sqlx::query_as(
        "SELECT k FROM unnest($1::text[]) AS k
         WHERE NOT EXISTS (SELECT 1 FROM models WHERE storage_key = k)
           AND NOT EXISTS (SELECT 1 FROM models WHERE files @> jsonb_build_array(jsonb_build_object('storage_key', k)))
           AND NOT EXISTS (SELECT 1 FROM datasets WHERE storage_key = k)
           AND NOT EXISTS (SELECT 1 FROM artifacts WHERE storage_key = k)",
    )
    .bind(&keys)
    .fetch_all(pool)
    .await?;
    for (key,) in unreferenced {
        let size = candidates.iter().find(|(k, _)| *k == key).map_or(0, |(_, s)| *s);
        match store.delete(&key).await {
            Ok(()) => {
                swept.orphans_deleted += 1;
                swept.orphan_bytes += size;
            }
            Err(e) => {
                tracing::warn!(error = %e, key, "deleting an orphaned object failed");
                swept.delete_failures += 1;
            }
        }
    }
    Ok(())
}

//! The jobs table as a queue. A worker claims a job with one `FOR UPDATE SKIP LOCKED` statement and a
//! lease, renews the lease while it works (fenced by the attempt number), and finishes it with one
//! statement that only succeeds if it still holds that attempt. Expired leases are swept back to the
//! queue, so a worker that dies costs one lease, never the job. No transaction stays open while a
//! job runs.

use chrono::{DateTime, Utc};
use rand::Rng;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sqlx::PgPool;
use sqlx::types::Json;
use uuid::Uuid;

use crate::db::page::Cursor;

/// Channel the `jobs_notify_queued` trigger notifies on.
pub const CHANNEL: &str = "modelpress_jobs";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, sqlx::Type)]
#[serde(rename_all = "snake_case")]
#[sqlx(type_name = "text", rename_all = "snake_case")]
pub enum JobState {
    Queued,
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

impl JobState {
    pub const ALL: [JobState; 5] = [
        JobState::Queued,
        JobState::Running,
        JobState::Succeeded,
        JobState::Failed,
        JobState::Cancelled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Queued => "queued",
            JobState::Running => "running",
            JobState::Succeeded => "succeeded",
            JobState::Failed => "failed",
            JobState::Cancelled => "cancelled",
        }
    }

    pub fn parse(s: &str) -> Option<JobState> {
        JobState::ALL.into_iter().find(|st| st.as_str() == s)
    }

    pub fn is_terminal(self) -> bool {
        matches!(self, JobState::Succeeded | JobState::Failed | JobState::Cancelled)
    }
}

/// A job's error as the API shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobError {
    pub code: String,
    pub message: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AttemptError {
    pub attempt: i32,
    pub code: String,
    pub message: String,
    pub at: DateTime<Utc>,
}

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct JobRow {
    pub id: Uuid,
    pub tenant_id: Uuid,
    pub model_id: Uuid,
    pub recipe: Json<Value>,
    pub state: JobState,
    pub priority: i32,
    pub attempt: i32,
    pub max_attempts: i32,
    pub scheduled_at: DateTime<Utc>,
    pub lease_expires_at: Option<DateTime<Utc>>,
    pub worker_id: Option<String>,
    pub cancel_requested: bool,
    pub progress_stage: String,
    pub progress_percent: f32,
    pub error: Option<Json<JobError>>,
    pub attempt_errors: Json<Vec<AttemptError>>,
    pub created_at: DateTime<Utc>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    pub timeout_s: i32,
    pub idempotency_key: Option<String>,
    pub request_hash: Option<String>,
    pub dataset_id: Option<Uuid>,
    /// The job's evaluation options (`eval::dataset::EvaluationOptions` as JSON).
    pub evaluation: Json<Value>,
    /// Goal jobs: what the advisor is asked (the recipe is JSON null then).
    pub goal: Option<Json<Value>>,
    /// Goal jobs: the candidates measured so far by the current attempt.
    pub candidates: Json<Value>,
    /// Set when retention deleted the job's artifacts.
    pub artifacts_expired_at: Option<DateTime<Utc>>,
    /// Told (signed POST of the job) when the job ends.
    pub webhook_url: Option<String>,
}

pub struct NewJob<'a> {
    pub tenant_id: Uuid,
    pub model_id: Uuid,
    pub recipe: &'a Value,
    pub priority: i32,
    pub max_attempts: i32,
    pub timeout_s: i32,
    pub dataset_id: Option<Uuid>,
    pub evaluation: &'a Value,
    pub goal: Option<&'a Value>,
    pub webhook_url: Option<&'a str>,
    /// `(Idempotency-Key, hash of the request)`, when the client sent a key.
    pub idempotency: Option<(&'a str, &'a str)>,
}

pub enum Enqueued {
    Created(JobRow),
    /// The key was used before for the same request: the job it created.
    Replayed(JobRow),
    /// The key was used before for a different request.
    KeyReused(JobRow),
    ModelNotFound,
}

/// Inserts a queued job if the tenant's model exists. The model row is locked `FOR SHARE` so a
/// concurrent delete cannot slip between the check and the insert. With an idempotency key, a
/// second submission (even a concurrent one) finds the first job instead of creating another.
pub async fn enqueue(pool: &PgPool, job: NewJob<'_>) -> Result<Enqueued, sqlx::Error> {
    let (key, hash) = job.idempotency.unzip();
    let created: Option<JobRow> = sqlx::query_as(
        "WITH model AS (SELECT id FROM models WHERE id = $2 AND tenant_id = $3 FOR SHARE)
         INSERT INTO jobs (id, tenant_id, model_id, recipe, priority, max_attempts, timeout_s,
                           idempotency_key, request_hash, dataset_id, evaluation, goal, webhook_url)
         SELECT $1, $3, model.id, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13 FROM model
         ON CONFLICT (tenant_id, idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING
         RETURNING *",
    )
    .bind(Uuid::new_v4())
    .bind(job.model_id)
    .bind(job.tenant_id)
    .bind(Json(job.recipe))
    .bind(job.priority)
    .bind(job.max_attempts)
    .bind(job.timeout_s)
    .bind(key)
    .bind(hash)
    .bind(job.dataset_id)
    .bind(Json(job.evaluation))
    .bind(job.goal.map(Json))
    .bind(job.webhook_url)
    .fetch_optional(pool)
    .await?;
    if let Some(row) = created {
        return Ok(Enqueued::Created(row));
    }
    let Some(key) = key else {
        return Ok(Enqueued::ModelNotFound);
    };
    let earlier: Option<JobRow> = sqlx::query_as("SELECT * FROM jobs WHERE tenant_id = $1 AND idempotency_key = $2")
        .bind(job.tenant_id)
        .bind(key)
        .fetch_optional(pool)
        .await?;
    Ok(match earlier {
        Some(row) if row.request_hash.as_deref() == hash => Enqueued::Replayed(row),
        Some(row) => Enqueued::KeyReused(row),
        None => Enqueued::ModelNotFound,
    })
}

/// Queued and running jobs of the tenant (what its active-jobs quota counts).
pub async fn active_count(pool: &PgPool, tenant: Uuid) -> Result<i64, sqlx::Error> {
    let (n,): (i64,) =
        sqlx::query_as("SELECT count(*) FROM jobs WHERE tenant_id = $1 AND state IN ('queued', 'running')")
            .bind(tenant)
            .fetch_one(pool)
            .await?;
    Ok(n)
}

pub async fn get(pool: &PgPool, tenant: Uuid, id: Uuid) -> Result<Option<JobRow>, sqlx::Error> {
    sqlx::query_as("SELECT * FROM jobs WHERE id = $1 AND tenant_id = $2")
        .bind(id)
        .bind(tenant)
        .fetch_optional(pool)
        .await
}

/// Newest first, optionally in one state, `limit` rows after `cursor`.
pub async fn list(
    pool: &PgPool,
    tenant: Uuid,
    state: Option<JobState>,
    limit: i64,
    cursor: Option<Cursor>,
) -> Result<Vec<JobRow>, sqlx::Error> {
    sqlx::query_as(
        "SELECT * FROM jobs
         WHERE tenant_id = $1
           AND ($2::text IS NULL OR state = $2)
           AND ($3::timestamptz IS NULL OR (created_at, id) < ($3, $4))
         ORDER BY created_at DESC, id DESC
         LIMIT $5",
    )
    .bind(tenant)
    .bind(state.map(JobState::as_str))
    .bind(cursor.map(|c| c.created_at))
    .bind(cursor.map(|c| c.id))
    .bind(limit)
    .fetch_all(pool)
    .await
}

/// Claims the most urgent runnable job (priority, then age) for `worker`, leased for `lease_s`.
pub async fn claim(pool: &PgPool, worker: &str, lease_s: u64) -> Result<Option<JobRow>, sqlx::Error> {
    claim_for(pool, worker, lease_s, None).await
}

/// Like [`claim`], restricted to jobs whose execution provider is in `providers` (a CPU-only
/// worker leaves CUDA jobs for a CUDA worker). `None` claims any job.
pub async fn claim_for(
    pool: &PgPool,
    worker: &str,
    lease_s: u64,
    providers: Option<&[String]>,
) -> Result<Option<JobRow>, sqlx::Error> {
    sqlx::query_as(
        "UPDATE jobs SET
             state = 'running',
             attempt = attempt + 1,
             lease_expires_at = now() + make_interval(secs => $2),
             worker_id = $1,
             started_at = COALESCE(started_at, now()),
             progress_stage = 'starting',
             progress_percent = 0,
             candidates = '[]'::jsonb
         WHERE id = (
             SELECT id FROM jobs
             WHERE state = 'queued' AND scheduled_at <= now()
               AND ($3::text[] IS NULL OR COALESCE(evaluation->>'execution_provider', 'cpu') = ANY($3))
             ORDER BY priority DESC, scheduled_at, created_at
             LIMIT 1
             FOR UPDATE SKIP LOCKED
         )
         RETURNING *",
    )
    .bind(worker)
    .bind(lease_s as f64)
    .bind(providers)
    .fetch_optional(pool)
    .await
}

/// Records the advisor's candidates so far, only if `attempt` still owns the running job.
pub async fn record_candidates(pool: &PgPool, id: Uuid, attempt: i32, candidates: &Value) -> Result<(), sqlx::Error> {
    sqlx::query("UPDATE jobs SET candidates = $3 WHERE id = $1 AND attempt = $2 AND state = 'running'")
        .bind(id)
        .bind(attempt)
        .bind(Json(candidates))
        .execute(pool)
        .await?;
    Ok(())
}

/// What a heartbeat learned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lease {
    Held,
    /// The job still belongs to this attempt, but a user asked to cancel it.
    CancelRequested,
    /// Another attempt (or the rescuer) owns the job now: stop and write nothing.
    Lost,
}

/// Renews the lease and records progress, only if `attempt` still owns the running job.
pub async fn heartbeat(
    pool: &PgPool,
    id: Uuid,
    attempt: i32,
    lease_s: u64,
    progress: Option<(&str, f32)>,
) -> Result<Lease, sqlx::Error> {
    let row: Option<(bool,)> = sqlx::query_as(
        "UPDATE jobs SET
             lease_expires_at = now() + make_interval(secs => $3),
             progress_stage = COALESCE($4, progress_stage),
             progress_percent = COALESCE($5, progress_percent)
         WHERE id = $1 AND attempt = $2 AND state = 'running'
         RETURNING cancel_requested",
    )
    .bind(id)
    .bind(attempt)
    .bind(lease_s as f64)
    .bind(progress.map(|p| p.0))
    .bind(progress.map(|p| p.1))
    .fetch_optional(pool)
    .await?;
    Ok(match row {
        Some((true,)) => Lease::CancelRequested,
        Some((false,)) => Lease::Held,
        None => Lease::Lost,
    })
}

pub struct NewArtifact {
    pub name: String,
    pub size_bytes: i64,
    pub sha256: String,
    pub content_type: String,
    pub storage_key: String,
}

/// Marks the attempt succeeded and records its artifacts in one transaction. Returns false (and
/// writes nothing) when the attempt no longer owns the job.
pub async fn complete(pool: &PgPool, job: &JobRow, artifacts: &[NewArtifact]) -> Result<bool, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let done = sqlx::query(
        "UPDATE jobs SET state = 'succeeded', finished_at = now(), lease_expires_at = NULL,
             progress_stage = 'done', progress_percent = 100
         WHERE id = $1 AND attempt = $2 AND state = 'running'",
    )
    .bind(job.id)
    .bind(job.attempt)
    .execute(&mut *tx)
    .await?;
    if done.rows_affected() == 0 {
        tx.rollback().await?;
        return Ok(false);
    }
    for a in artifacts {
        sqlx::query(
            "INSERT INTO artifacts (job_id, tenant_id, name, size_bytes, sha256, content_type, storage_key)
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(job.id)
        .bind(job.tenant_id)
        .bind(&a.name)
        .bind(a.size_bytes)
        .bind(&a.sha256)
        .bind(&a.content_type)
        .bind(&a.storage_key)
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await?;
    Ok(true)
}

/// Records a failed attempt. A retryable error with attempts left requeues the job after an
/// exponential backoff with jitter; anything else ends it `failed`. Every attempt's error is kept.
/// Returns the new state, or `None` when the attempt no longer owns the job.
pub async fn fail(
    pool: &PgPool,
    job: &JobRow,
    error: &JobError,
    retryable: bool,
    retry_base_s: u64,
) -> Result<Option<JobState>, sqlx::Error> {
    let retry = retryable && job.attempt < job.max_attempts;
    let backoff = if retry {
        backoff_s(retry_base_s, job.attempt)
    } else {
        0.0
    };
    let row: Option<(JobState,)> = sqlx::query_as(
        "UPDATE jobs SET
             state = CASE WHEN $3 THEN 'queued' ELSE 'failed' END,
             scheduled_at = CASE WHEN $3 THEN now() + make_interval(secs => $4) ELSE scheduled_at END,
             finished_at = CASE WHEN $3 THEN NULL ELSE now() END,
             error = CASE WHEN $3 THEN error ELSE $5 END,
             progress_stage = CASE WHEN $3 THEN 'retrying' ELSE 'failed' END,
             attempt_errors = attempt_errors || jsonb_build_array($6::jsonb),
             lease_expires_at = NULL, worker_id = NULL
         WHERE id = $1 AND attempt = $2 AND state = 'running'
         RETURNING state",
    )
    .bind(job.id)
    .bind(job.attempt)
    .bind(retry)
    .bind(backoff)
    .bind(Json(error))
    .bind(attempt_error(job.attempt, error))
    .fetch_optional(pool)
    .await?;
    Ok(row.map(|r| r.0))
}

/// Ends a running job `cancelled` after its worker stopped it.
pub async fn mark_cancelled(pool: &PgPool, job: &JobRow) -> Result<bool, sqlx::Error> {
    let done = sqlx::query(
        "UPDATE jobs SET state = 'cancelled', finished_at = now(), lease_expires_at = NULL,
             worker_id = NULL, progress_stage = 'cancelled'
         WHERE id = $1 AND attempt = $2 AND state = 'running'",
    )
    .bind(job.id)
    .bind(job.attempt)
    .execute(pool)
    .await?;
    Ok(done.rows_affected() > 0)
}

/// Hands a job back to the queue without spending an attempt (worker shutting down).
pub async fn release(pool: &PgPool, job: &JobRow) -> Result<bool, sqlx::Error> {
    let done = sqlx::query(
        "UPDATE jobs SET state = 'queued', attempt = attempt - 1, lease_expires_at = NULL,
             worker_id = NULL, progress_stage = 'queued', progress_percent = 0, scheduled_at = now()
         WHERE id = $1 AND attempt = $2 AND state = 'running'",
    )
    .bind(job.id)
    .bind(job.attempt)
    .execute(pool)
    .await?;
    Ok(done.rows_affected() > 0)
}

/// Sweeps running jobs whose lease expired: back to the queue, or `failed` with `lease_expired`
/// once out of attempts, or `cancelled` if a cancel was pending. Returns how many were swept.
pub async fn rescue_expired(pool: &PgPool) -> Result<u64, sqlx::Error> {
    let message = "the worker running this attempt stopped renewing its lease (crashed or lost)";
    let done = sqlx::query(
        "UPDATE jobs SET
             state = CASE WHEN cancel_requested THEN 'cancelled'
                          WHEN attempt >= max_attempts THEN 'failed' ELSE 'queued' END,
             finished_at = CASE WHEN cancel_requested OR attempt >= max_attempts THEN now() ELSE NULL END,
             error = CASE WHEN NOT cancel_requested AND attempt >= max_attempts
                          THEN jsonb_build_object('code', 'lease_expired', 'message', $1::text) ELSE error END,
             attempt_errors = attempt_errors || jsonb_build_array(jsonb_build_object(
                 'attempt', attempt, 'code', 'lease_expired', 'message', $1::text,
                 'at', to_jsonb(now()))),
             progress_stage = 'rescued', lease_expires_at = NULL, worker_id = NULL
         WHERE state = 'running' AND lease_expires_at < now()",
    )
    .bind(message)
    .execute(pool)
    .await?;
    Ok(done.rows_affected())
}

pub enum CancelOutcome {
    Cancelled(JobRow),
    /// Running: the worker sees the request at its next heartbeat.
    Requested(JobRow),
    AlreadyFinished(JobRow),
    NotFound,
}

pub async fn cancel(pool: &PgPool, tenant: Uuid, id: Uuid) -> Result<CancelOutcome, sqlx::Error> {
    let row: Option<JobRow> = sqlx::query_as(
        "UPDATE jobs SET
             state = CASE WHEN state = 'queued' THEN 'cancelled' ELSE state END,
             finished_at = CASE WHEN state = 'queued' THEN now() ELSE finished_at END,
             progress_stage = CASE WHEN state = 'queued' THEN 'cancelled' ELSE progress_stage END,
             cancel_requested = true
         WHERE id = $1 AND tenant_id = $2 AND state IN ('queued', 'running')
         RETURNING *",
    )
    .bind(id)
    .bind(tenant)
    .fetch_optional(pool)
    .await?;
    Ok(match row {
        Some(job) if job.state == JobState::Cancelled => CancelOutcome::Cancelled(job),
        Some(job) => CancelOutcome::Requested(job),
        None => match get(pool, tenant, id).await? {
            Some(job) => CancelOutcome::AlreadyFinished(job),
            None => CancelOutcome::NotFound,
        },
    })
}

fn attempt_error(attempt: i32, error: &JobError) -> Json<AttemptError> {
    Json(AttemptError {
        attempt,
        code: error.code.clone(),
        message: error.message.clone(),
        at: Utc::now(),
    })
}

/// `base * 2^(attempt-1)` seconds plus up to 25% jitter, capped at an hour.
pub fn backoff_s(base: u64, attempt: i32) -> f64 {
    let exp = (base as f64) * 2f64.powi((attempt - 1).clamp(0, 20));
    let jitter = rand::rng().random_range(0.0..=0.25);
    (exp * (1.0 + jitter)).min(3600.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_per_attempt_with_bounded_jitter() {
        for attempt in 1..=4 {
            let b = backoff_s(5, attempt);
            let base = 5.0 * 2f64.powi(attempt - 1);
            assert!(b >= base && b <= base * 1.25, "attempt {attempt}: {b}");
        }
        assert_eq!(backoff_s(5, 40), 3600.0);
    }

    #[test]
    fn states_parse_from_their_names_only() {
        for s in JobState::ALL {
            assert_eq!(JobState::parse(s.as_str()), Some(s));
        }
        assert_eq!(JobState::parse("done"), None);
    }
}

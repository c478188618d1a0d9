//! Webhook deliveries. Rows are created by the `jobs_enqueue_webhook` trigger when a job with a
//! `webhook_url` reaches a terminal state; a sender claims due rows with a lease (it pushes
//! `next_attempt_at` past the request's timeout) and records each attempt, fenced by the attempt
//! number so a sender that lost its lease cannot overwrite a newer outcome.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sqlx::PgPool;
use sqlx::types::Json;
use uuid::Uuid;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeliveryAttempt {
    pub attempt: i32,
    pub at: DateTime<Utc>,
    /// The receiver's HTTP status, when it answered.
    pub status: Option<u16>,
    pub error: Option<String>,
}

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct DeliveryRow {
    pub id: Uuid,
    pub tenant_id: Uuid,
    pub job_id: Uuid,
    pub url: String,
    pub event: String,
    pub state: String,
    pub attempts: i32,
    pub attempt_log: Json<Vec<DeliveryAttempt>>,
    pub next_attempt_at: DateTime<Utc>,
    pub created_at: DateTime<Utc>,
    pub delivered_at: Option<DateTime<Utc>>,
}

/// Claims up to `limit` due deliveries, counting the attempt and leasing each for `lease_s`.
pub async fn claim_due(pool: &PgPool, limit: i64, lease_s: u64) -> Result<Vec<DeliveryRow>, sqlx::Error> {
    sqlx::query_as(
        "UPDATE webhook_deliveries SET attempts = attempts + 1,
             next_attempt_at = now() + make_interval(secs => $2)
         WHERE id IN (
             SELECT id FROM webhook_deliveries
             WHERE state = 'pending' AND next_attempt_at <= now()
             ORDER BY next_attempt_at
             LIMIT $1
             FOR UPDATE SKIP LOCKED
         )
         RETURNING *",
    )
    .bind(limit)
    .bind(lease_s as f64)
    .fetch_all(pool)
    .await
}

/// What one attempt led to.
pub enum Outcome {
    Delivered,
    RetryIn(f64),
    GaveUp,
}

pub async fn record(
    pool: &PgPool,
    delivery: &DeliveryRow,
    attempt: &DeliveryAttempt,
    outcome: Outcome,
) -> Result<(), sqlx::Error> {
    let (state, retry_s) = match outcome {
        Outcome::Delivered => ("delivered", 0.0),
        Outcome::RetryIn(s) => ("pending", s),
        Outcome::GaveUp => ("failed", 0.0),
    };
    sqlx::query(
        "UPDATE webhook_deliveries SET
             state = $3,
             attempt_log = attempt_log || jsonb_build_array($4::jsonb),
             next_attempt_at = CASE WHEN $3 = 'pending' THEN now() + make_interval(secs => $5) ELSE next_attempt_at END,
             delivered_at = CASE WHEN $3 = 'delivered' THEN now() ELSE NULL END
         WHERE id = $1 AND attempts = $2 AND state = 'pending'",
    )
    .bind(delivery.id)
    .bind(delivery.attempts)
    .bind(state)
    .bind(Json(attempt))
    .bind(retry_s)
    .execute(pool)
    .await?;
    Ok(())
}

pub async fn list_for_job(pool: &PgPool, tenant: Uuid, job: Uuid) -> Result<Vec<DeliveryRow>, sqlx::Error> {
    sqlx::query_as("SELECT * FROM webhook_deliveries WHERE tenant_id = $1 AND job_id = $2 ORDER BY created_at, id")
        .bind(tenant)
        .bind(job)
        .fetch_all(pool)
        .await
}

//! `GET /v1/jobs/{id}/webhooks`: the job's webhook deliveries and every attempt's outcome, so a
//! client can see why its receiver heard nothing.

use axum::extract::State;
use chrono::{DateTime, Utc};
use serde::Serialize;
use uuid::Uuid;

use super::AppState;
use super::error::{ApiError, ApiResult};
use super::extract::{Path, Tenant};
use crate::db::webhooks::{self as db_webhooks, DeliveryAttempt, DeliveryRow};
use crate::queue;

#[derive(Debug, Serialize)]
pub struct Delivery {
    id: Uuid,
    /// The job state announced: succeeded, failed or cancelled.
    event: String,
    url: String,
    /// pending, delivered or failed (no attempts left).
    state: String,
    attempts: i32,
    next_attempt_at: Option<DateTime<Utc>>,
    created_at: DateTime<Utc>,
    delivered_at: Option<DateTime<Utc>>,
    log: Vec<DeliveryAttempt>,
}

impl From<DeliveryRow> for Delivery {
    fn from(r: DeliveryRow) -> Self {
        Delivery {
            id: r.id,
            next_attempt_at: (r.state == "pending").then_some(r.next_attempt_at),
            event: r.event,
            url: r.url,
            state: r.state,
            attempts: r.attempts,
            created_at: r.created_at,
            delivered_at: r.delivered_at,
            log: r.attempt_log.0,
        }
    }
}

#[derive(Debug, Serialize)]
pub struct Deliveries {
    items: Vec<Delivery>,
}

pub async fn list(
    State(state): State<AppState>,
    tenant: Tenant,
    Path(id): Path<Uuid>,
) -> ApiResult<axum::Json<Deliveries>> {
    queue::get(&state.pool, tenant.0, id)
        .await?
        .ok_or_else(|| ApiError::not_found("job"))?;
    let rows = db_webhooks::list_for_job(&state.pool, tenant.0, id).await?;
    Ok(axum::Json(Deliveries {
        items: rows.into_iter().map(Delivery::from).collect(),
    }))
}

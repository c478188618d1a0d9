//! The webhook sender: a background task in every API/worker process that claims due rows of
//! `webhook_deliveries`, POSTs the job's JSON (signed) to its URL, and records the attempt. The
//! table is the queue, so a pending delivery survives a restart, and several processes share the
//! work without sending one delivery twice at once.

use std::sync::Arc;
use std::time::Duration;

use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use super::{SIGNATURE_HEADER, Target, check_url, signature};
use crate::api::auth::random_secret;
use crate::config::Config;
use crate::db::tenants;
use crate::db::webhooks::{self, DeliveryAttempt, DeliveryRow, Outcome};
use crate::queue;

/// Deliveries one sender has in flight at once.
const BATCH: i64 = 8;
/// Longest part of a receiver's answer kept in the delivery log.
const MAX_ERROR_CHARS: usize = 300;

pub async fn run(pool: PgPool, config: Arc<Config>, shutdown: CancellationToken) {
    let poll = Duration::from_millis(config.webhooks.poll_interval_ms.max(10));
    // The lease outlasts the request (resolution + timeout), so a live sender is never overtaken.
    let lease_s = config.webhooks.timeout_s * 2 + 10;
    loop {
        match webhooks::claim_due(&pool, BATCH, lease_s).await {
            Ok(due) if !due.is_empty() => {
                let sends = due.iter().map(|d| deliver(&pool, &config, d));
                futures::future::join_all(sends).await;
                continue;
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "claiming webhook deliveries failed"),
        }
        tokio::select! {
            _ = tokio::time::sleep(poll) => {}
            _ = shutdown.cancelled() => return,
        }
    }
}

#[tracing::instrument(skip_all, fields(delivery_id = %d.id, job_id = %d.job_id, attempt = d.attempts))]
async fn deliver(pool: &PgPool, config: &Config, d: &DeliveryRow) {
    let (status, error) = match attempt(pool, config, d).await {
        Ok(status) if (200..300).contains(&status) => (Some(status), None),
        Ok(status) => (Some(status), Some(format!("the receiver answered {status}"))),
        Err(e) => (None, Some(e.chars().take(MAX_ERROR_CHARS).collect())),
    };
    let outcome = match &error {
        None => Outcome::Delivered,
        Some(_) if d.attempts < config.webhooks.max_attempts => {
            Outcome::RetryIn(queue::backoff_s(config.webhooks.retry_base_s, d.attempts))
        }
        Some(_) => Outcome::GaveUp,
    };
    match &error {
        None => tracing::info!(url = %d.url, "webhook delivered"),
        Some(e) => tracing::warn!(url = %d.url, error = %e, "webhook attempt failed"),
    }
    let entry = DeliveryAttempt {
        attempt: d.attempts,
        at: chrono::Utc::now(),
        status,
        error,
    };
    if let Err(e) = webhooks::record(pool, d, &entry, outcome).await {
        tracing::warn!(error = %e, "recording a webhook attempt failed; it will be retried when its lease ends");
    }
}

/// One POST; the receiver's status, or why there was none.
async fn attempt(pool: &PgPool, config: &Config, d: &DeliveryRow) -> Result<u16, String> {
    let job = queue::get(pool, d.tenant_id, d.job_id)
        .await
        .map_err(|e| format!("reading the job: {e}"))?
        .ok_or("the job no longer exists")?;
    let body = crate::api::jobs::job_json(pool, job)
        .await
        .map_err(|e| format!("serializing the job: {e}"))?;
    let secret = tenants::webhook_secret(pool, d.tenant_id, &random_secret())
        .await
        .map_err(|e| format!("reading the tenant's secret: {e}"))?;
    // Checked again now: the host's addresses may have changed since the job was submitted.
    let Target { url, host, addrs } = check_url(&d.url, config.webhooks.allow_private_targets).await?;
    let client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy()
        .timeout(Duration::from_secs(config.webhooks.timeout_s))
        .resolve_to_addrs(&host, &addrs)
        .build()
        .map_err(|e| format!("building the HTTP client: {e}"))?;
    let t = chrono::Utc::now().timestamp();
    let response = client
        .post(url)
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .header(reqwest::header::USER_AGENT, "ModelPress-Webhook/1")
        .header(SIGNATURE_HEADER, signature(&secret, t, body.as_bytes()))
        .header("x-modelpress-delivery", d.id.to_string())
        .header("x-modelpress-event", format!("job.{}", d.event))
        .body(body)
        .send()
        .await
        .map_err(|e| format!("sending failed: {e}"))?;
    Ok(response.status().as_u16())
}

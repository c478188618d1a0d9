//! Live job updates for dashboards: `GET /v1/jobs/{id}/events` is a Server-Sent Events stream of
//! the job's state and progress. One LISTEN connection per API process (the `jobs_notify_event`
//! trigger) fans job ids out to the open streams; each stream re-reads only its own job when its
//! id comes by, so a thousand watchers cost one database connection, not a thousand polls.

use std::convert::Infallible;
use std::time::Duration;

use axum::extract::State;
use axum::response::sse::{Event, KeepAlive, Sse};
use futures::Stream;
use sqlx::PgPool;
use sqlx::postgres::PgListener;
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::AppState;
use super::error::{ApiError, ApiResult};
use super::extract::{Path, Tenant};
use super::jobs::job_json;
use crate::queue;

pub const CHANNEL: &str = "modelpress_job_events";

/// Relays job-change notifications to every open stream until `shutdown`. A lost connection is
/// retried; streams also re-read their job on a timer, so a missed notification only delays.
pub fn spawn_relay(pool: PgPool, shutdown: CancellationToken) -> broadcast::Sender<Uuid> {
    let (tx, _) = broadcast::channel(1024);
    let sender = tx.clone();
    tokio::spawn(async move {
        loop {
            let mut listener = match PgListener::connect_with(&pool).await {
                Ok(l) => l,
                Err(e) => {
                    tracing::warn!(error = %e, "job event LISTEN unavailable; retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_secs(2)) => continue,
                        _ = shutdown.cancelled() => return,
                    }
                }
            };
            if listener.listen(CHANNEL).await.is_err() {
                continue;
            }
            loop {
                tokio::select! {
                    n = listener.recv() => match n {
                        Ok(n) => {
                            if let Ok(id) = n.payload().parse::<Uuid>() {
                                let _ = sender.send(id);
                            }
                        }
                        Err(_) => break,
                    },
                    _ = shutdown.cancelled() => return,
                }
            }
        }
    });
    tx
}

struct Watch {
    pool: PgPool,
    tenant: Uuid,
    id: Uuid,
    rx: broadcast::Receiver<Uuid>,
    last: Option<String>,
    done: bool,
}

pub async fn job_events(
    State(state): State<AppState>,
    tenant: Tenant,
    Path(id): Path<Uuid>,
) -> ApiResult<Sse<impl Stream<Item = Result<Event, Infallible>>>> {
    // Subscribe before the first read, so no change between the two is missed.
    let rx = state.events.subscribe();
    queue::get(&state.pool, tenant.0, id)
        .await?
        .ok_or_else(|| ApiError::not_found("job"))?;
    let watch = Watch {
        pool: state.pool.clone(),
        tenant: tenant.0,
        id,
        rx,
        last: None,
        done: false,
    };
    let stream = futures::stream::unfold(watch, |mut w| async move {
        loop {
            if w.done {
                return None;
            }
            // Read now (first event, or after a notification / the fallback timer).
            if let Ok(Some(row)) = queue::get(&w.pool, w.tenant, w.id).await {
                let terminal = row.state.is_terminal();
                let json = job_json(&w.pool, row).await.unwrap_or_default();
                if w.last.as_deref() != Some(json.as_str()) {
                    w.last = Some(json.clone());
                    w.done = terminal;
                    return Some((Ok(Event::default().event("job").data(json)), w));
                }
                if terminal {
                    return None;
                }
            }
            // Wait for this job's notification, or re-read every 5 s in case one was missed.
            let wait = async {
                loop {
                    match w.rx.recv().await {
                        Ok(id) if id == w.id => return,
                        Ok(_) => continue,
                        Err(broadcast::error::RecvError::Lagged(_)) => return,
                        Err(broadcast::error::RecvError::Closed) => std::future::pending::<()>().await,
                    }
                }
            };
            let _ = tokio::time::timeout(Duration::from_secs(5), wait).await;
        }
    });
    Ok(Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(15))))
}

//! The worker loop: claim a job, run its attempt in a child process, keep the lease alive, report
//! progress, and record the outcome. Several jobs run at once up to `worker.concurrency`; shutdown
//! stops claiming, gives running jobs a grace period, and hands back what cannot finish.

mod attempt;
pub mod events;
pub mod limits;

pub use attempt::fetch_model;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use sqlx::PgPool;
use sqlx::postgres::PgListener;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::config::Config;
use crate::queue;
use crate::storage::Storage;

/// Everything a worker needs; cheap to clone into each job task.
#[derive(Clone)]
pub struct WorkerContext {
    pub pool: PgPool,
    pub storage: Arc<dyn Storage>,
    pub config: Arc<Config>,
    /// Program run as `<runner> [--config FILE] compress ... --events` for each attempt.
    pub runner: PathBuf,
    pub worker_id: String,
    /// Execution providers this worker's ONNX Runtime offers; it claims only jobs it can run.
    pub providers: Vec<String>,
}

impl WorkerContext {
    pub fn new(pool: PgPool, storage: Arc<dyn Storage>, config: Arc<Config>) -> std::io::Result<Self> {
        let runner = if config.worker.runner.is_empty() {
            std::env::current_exe()?
        } else {
            PathBuf::from(&config.worker.runner)
        };
        let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "local".into());
        let providers = match crate::eval::Runtime::init(&config.onnxruntime.dylib_path) {
            Ok(rt) => rt.providers().iter().map(|p| p.as_str().to_string()).collect(),
            // Without ORT nothing can run; claim CPU jobs so they fail with the reason.
            Err(_) => vec!["cpu".into()],
        };
        Ok(WorkerContext {
            pool,
            storage,
            config,
            runner,
            providers,
            worker_id: format!(
                "{host}:{}:{}",
                std::process::id(),
                &uuid::Uuid::new_v4().to_string()[..8]
            ),
        })
    }
}

/// Runs the worker until `shutdown` fires and every running job has finished or been released.
pub async fn run(ctx: WorkerContext, shutdown: CancellationToken) {
    let cfg = &ctx.config.worker;
    tracing::info!(
        worker = %ctx.worker_id,
        concurrency = cfg.concurrency,
        providers = ?ctx.providers,
        runner = %ctx.runner.display(),
        "worker started"
    );
    let slots = Arc::new(Semaphore::new(cfg.concurrency));
    let mut running = JoinSet::new();
    let rescuer = tokio::spawn(rescue_loop(ctx.clone(), shutdown.clone()));
    let mut listener = listen(&ctx.pool).await;
    let poll = Duration::from_millis(cfg.poll_interval_ms);

    loop {
        let permit = tokio::select! {
            permit = slots.clone().acquire_owned() => permit.expect("semaphore is never closed"),
            _ = shutdown.cancelled() => break,
        };
        while running.try_join_next().is_some() {}
        match queue::claim_for(&ctx.pool, &ctx.worker_id, cfg.lease_s, Some(&ctx.providers)).await {
            Ok(Some(job)) => {
                let span = tracing::info_span!("job", job_id = %job.id, attempt = job.attempt);
                let (ctx, shutdown) = (ctx.clone(), shutdown.clone());
                running.spawn(
                    async move {
                        attempt::run(&ctx, job, &shutdown).await;
                        drop(permit);
                    }
                    .instrument(span),
                );
                continue;
            }
            Ok(None) => drop(permit),
            Err(e) => {
                drop(permit);
                tracing::warn!(error = %e, "claiming a job failed; retrying after the poll interval");
            }
        }
        // Nothing runnable: sleep until a NOTIFY, the poll interval, or shutdown.
        tokio::select! {
            _ = wait_for_notification(&mut listener), if listener.is_some() => {}
            _ = tokio::time::sleep(poll) => {}
            _ = shutdown.cancelled() => break,
        }
    }
    tracing::info!(running = running.len(), "worker stopping; waiting for running jobs");
    while running.join_next().await.is_some() {}
    rescuer.abort();
    tracing::info!("worker stopped");
}

async fn listen(pool: &PgPool) -> Option<PgListener> {
    let mut listener = match PgListener::connect_with(pool).await {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!(error = %e, "LISTEN unavailable; falling back to polling");
            return None;
        }
    };
    match listener.listen(queue::CHANNEL).await {
        Ok(()) => Some(listener),
        Err(e) => {
            tracing::warn!(error = %e, "LISTEN failed; falling back to polling");
            None
        }
    }
}

async fn wait_for_notification(listener: &mut Option<PgListener>) {
    if let Some(l) = listener {
        // PgListener reconnects by itself; an error here just means "go and poll".
        if let Err(e) = l.recv().await {
            tracing::debug!(error = %e, "notification stream interrupted");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

async fn rescue_loop(ctx: WorkerContext, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_secs(ctx.config.worker.rescue_interval_s.max(1)));
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.cancelled() => return,
        }
        match queue::rescue_expired(&ctx.pool).await {
            Ok(0) => {}
            Ok(n) => tracing::warn!(jobs = n, "rescued jobs whose lease expired"),
            Err(e) => tracing::warn!(error = %e, "lease rescue failed"),
        }
    }
}

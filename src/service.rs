//! Wiring for `modelpress serve` and `modelpress worker`: storage, ONNX Runtime, the HTTP server and
//! the workers, all stopped by one cancellation token (SIGTERM/SIGINT in the binary, the test
//! harness in tests).

use std::sync::Arc;

use anyhow::Context;
use sqlx::PgPool;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::api::{self, AppState};
use crate::config::Config;
use crate::eval::Runtime;
use crate::infer::{InferencePool, PoolSettings};
use crate::retention;
use crate::storage::{LocalStorage, S3Storage, Storage};
use crate::worker::{self, WorkerContext};

pub struct ServiceOptions {
    /// Serve HTTP on this listener; `None` runs workers only.
    pub listener: Option<TcpListener>,
    pub workers: bool,
}

/// The store `storage.backend` names. Building an S3 store checks its settings but contacts
/// nothing; the first request does.
pub fn storage(config: &Config) -> anyhow::Result<Arc<dyn Storage>> {
    if config.storage.backend == "s3" {
        let s3 = S3Storage::new(&config.s3_options())
            .with_context(|| format!("configuring the S3 store (bucket {:?})", config.storage.bucket))?;
        return Ok(Arc::new(s3));
    }
    let root = config.storage_root();
    let local = LocalStorage::new(&root).with_context(|| format!("opening local storage at {}", root.display()))?;
    Ok(Arc::new(local))
}

/// The inference workers run the same program as job attempts (`worker.runner`, else this binary)
/// under the same memory limit.
fn inference_pool(config: &Config) -> anyhow::Result<InferencePool> {
    let runner = if config.worker.runner.is_empty() {
        std::env::current_exe().context("locating this binary for the inference workers")?
    } else {
        config.worker.runner.clone().into()
    };
    Ok(InferencePool::new(PoolSettings {
        runner,
        dylib: crate::eval::runtime::locate(&config.onnxruntime.dylib_path),
        memory_limit_mb: config.worker.job_memory_limit_mb,
        inference: config.inference.clone(),
    }))
}

pub async fn run(
    config: Arc<Config>,
    pool: PgPool,
    options: ServiceOptions,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let storage = storage(&config)?;
    let dylib = config.onnxruntime.dylib_path.clone();
    let runtime = tokio::task::spawn_blocking(move || Runtime::init(&dylib).map_err(|e| e.to_string())).await?;
    if let Err(e) = &runtime {
        tracing::error!(error = %e, "ONNX Runtime is not available; /readyz reports not ready and jobs will fail");
    }

    tracing::info!(store = %storage.describe(), "object store");

    if options.listener.is_some() && config.auth.mode == crate::config::AuthMode::None {
        tracing::warn!(
            "AUTHENTICATION IS OFF (auth.mode = \"none\"): every /v1 request acts for the default tenant \
             without a key. Use this for local single-user runs only; set auth.mode = \"api_key\" \
             (MODELPRESS_AUTH__MODE=api_key) before exposing the service."
        );
    }
    if config.webhooks.allow_private_targets {
        tracing::warn!("webhooks.allow_private_targets is on: webhooks may target loopback and private addresses");
    }

    let mut tasks = tokio::task::JoinSet::new();
    if config.retention.sweep_interval_s > 0 {
        let (pool, storage, retention) = (pool.clone(), storage.clone(), config.retention.clone());
        tasks.spawn(retention::run(pool, storage, retention, shutdown.clone()));
    }
    // Every process sends due webhooks; the deliveries table shares the work between them.
    tasks.spawn(crate::webhooks::sender::run(
        pool.clone(),
        config.clone(),
        shutdown.clone(),
    ));
    if options.workers {
        let ctx = WorkerContext::new(pool.clone(), storage.clone(), config.clone())?;
        tasks.spawn(worker::run(ctx, shutdown.clone()));
    }
    if let Some(listener) = options.listener {
        let events = api::events::spawn_relay(pool.clone(), shutdown.clone());
        let state = AppState {
            pool,
            storage,
            config: config.clone(),
            runtime: Arc::new(runtime),
            events,
            http_metrics: Default::default(),
            rate_limiter: Arc::new(api::ratelimit::RateLimiter::new(
                config.limits.requests_per_second,
                config.limits.burst,
            )),
            inference: Arc::new(inference_pool(&config)?),
        };
        let app = api::app(state);
        tracing::info!(addr = %listener.local_addr()?, "HTTP API listening");
        let stop = shutdown.clone();
        tasks.spawn(async move {
            if let Err(e) = axum::serve(listener, app)
                .with_graceful_shutdown(async move { stop.cancelled().await })
                .await
            {
                tracing::error!(error = %e, "HTTP server failed");
            }
        });
    }
    while tasks.join_next().await.is_some() {}
    Ok(())
}

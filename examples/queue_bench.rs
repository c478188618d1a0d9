//! Queue benchmark: claim+complete throughput of no-op jobs with 1, 4 and 16 concurrent workers, and
//! the time from submission to the NOTIFY and to the claim for an idle worker. Runs against a fresh
//! database created next to `DATABASE_URL`'s and dropped afterwards; prints a Markdown section.
//!
//! `cargo run --release --example queue_bench` (or `make bench`, which writes BENCHMARKS.md).

use std::time::Instant;

use modelpress::db::{self, DEFAULT_TENANT};
use modelpress::onnx::{ModelSummary, builder};
use modelpress::queue::{self, NewJob};
use sqlx::postgres::{PgConnectOptions, PgListener, PgPoolOptions};
use sqlx::{ConnectOptions, PgPool};

const JOBS_PER_RUN: usize = 2000;
const NOTIFY_SAMPLES: usize = 200;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let url = std::env::var("DATABASE_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
    let admin_opts: PgConnectOptions = url.parse()?;
    let name = format!("modelpress_bench_{}", std::process::id());
    let mut admin = admin_opts.clone().database("postgres").connect().await?;
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(&mut admin)
        .await?;
    let result = run(admin_opts.clone().database(&name)).await;
    sqlx::query(&format!("DROP DATABASE {name} WITH (FORCE)"))
        .execute(&mut admin)
        .await?;
    let markdown = result?;
    println!("{markdown}");
    Ok(())
}

async fn run(opts: PgConnectOptions) -> anyhow::Result<String> {
    let pool = PgPoolOptions::new()
        .max_connections(24)
        .connect_with(opts.clone())
        .await?;
    db::migrate(&pool).await?;
    let model_id = uuid::Uuid::new_v4();
    let summary = ModelSummary::of(&builder::tiny_mlp(0));
    db::models::insert(
        &pool,
        db::models::NewModel {
            id: model_id,
            tenant_id: DEFAULT_TENANT,
            name: "bench",
            size_bytes: 1,
            sha256: "0",
            storage_key: "bench",
            summary: &summary,
            files: &[],
        },
    )
    .await?;
    let (version,): (String,) = sqlx::query_as("SHOW server_version").fetch_one(&pool).await?;

    let mut out = String::new();
    out.push_str("## Queue (no-op jobs: claim + complete, no job process)\n\n");
    out.push_str(&format!(
        "PostgreSQL {version} on 127.0.0.1; {JOBS_PER_RUN} jobs per run; each worker loops claim → complete \
         until the queue is empty. Command: `cargo run --release --example queue_bench`.\n\n"
    ));
    out.push_str("| concurrent workers | jobs/s | total s |\n|---:|---:|---:|\n");
    for workers in [1usize, 4, 16] {
        enqueue_many(&pool, model_id, JOBS_PER_RUN).await?;
        let start = Instant::now();
        let mut tasks = tokio::task::JoinSet::new();
        for w in 0..workers {
            let pool = pool.clone();
            tasks.spawn(async move {
                let id = format!("bench-{w}");
                let mut done = 0usize;
                while let Some(job) = queue::claim(&pool, &id, 60).await? {
                    anyhow::ensure!(queue::complete(&pool, &job, &[]).await?, "lost a lease");
                    done += 1;
                }
                anyhow::Ok(done)
            });
        }
        let mut total = 0;
        while let Some(done) = tasks.join_next().await {
            total += done??;
        }
        let secs = start.elapsed().as_secs_f64();
        anyhow::ensure!(total == JOBS_PER_RUN, "completed {total} of {JOBS_PER_RUN}");
        out.push_str(&format!("| {workers} | {:.0} | {secs:.2} |\n", total as f64 / secs));
    }

    // Submit-to-wake and submit-to-claim for one idle worker.
    let mut listener = PgListener::connect_with(&pool).await?;
    listener.listen(queue::CHANNEL).await?;
    let (mut wake, mut claim) = (Vec::new(), Vec::new());
    let recipe = serde_json::json!([{"pass": "optimize"}]);
    for _ in 0..NOTIFY_SAMPLES {
        let start = Instant::now();
        let new = NewJob {
            tenant_id: DEFAULT_TENANT,
            model_id,
            recipe: &recipe,
            priority: 0,
            max_attempts: 1,
            timeout_s: 60,
            dataset_id: None,
            evaluation: &serde_json::json!({}),
            idempotency: None,
        };
        queue::enqueue(&pool, new).await?;
        listener.recv().await?;
        wake.push(start.elapsed().as_secs_f64() * 1e3);
        let job = queue::claim(&pool, "bench", 60).await?.expect("the job just submitted");
        claim.push(start.elapsed().as_secs_f64() * 1e3);
        queue::complete(&pool, &job, &[]).await?;
    }
    let (w, c) = (
        modelpress::eval::latency::summarize(wake),
        modelpress::eval::latency::summarize(claim),
    );
    out.push_str(&format!(
        "\nSubmit → NOTIFY received by an idle worker: p50 {:.2} ms, p99 {:.2} ms; submit → job claimed: \
         p50 {:.2} ms, p99 {:.2} ms ({NOTIFY_SAMPLES} samples; the submit time includes the INSERT's commit).\n",
        w.p50_ms, w.p99_ms, c.p50_ms, c.p99_ms
    ));
    out.push_str(
        "\nA killed worker's job is rescued once its lease expires: at most `worker.lease_s` + \
         `worker.rescue_interval_s` (60 s + 5 s by default); `tests/queue.rs` shows it end to end with a 3 s lease.\n",
    );
    pool.close().await;
    Ok(out)
}

async fn enqueue_many(pool: &PgPool, model_id: uuid::Uuid, n: usize) -> anyhow::Result<()> {
    sqlx::query(
        "INSERT INTO jobs (id, tenant_id, model_id, recipe)
         SELECT gen_random_uuid(), $1, $2, '[{\"pass\": \"optimize\"}]'::jsonb FROM generate_series(1, $3)",
    )
    .bind(DEFAULT_TENANT)
    .bind(model_id)
    .bind(n as i64)
    .execute(pool)
    .await?;
    Ok(())
}

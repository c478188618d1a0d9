//! Queue benchmark: claim+complete throughput of no-op jobs with 1, 4 and 16 concurrent workers, the
//! time from submission to the NOTIFY and to the claim for an idle worker, and the time a killed
//! worker's job takes to be rescued and finished by another worker process (real `modelpress worker`
//! processes, SIGKILLed). Runs against a fresh database created next to `DATABASE_URL`'s and dropped
//! afterwards; prints a Markdown section.
//!
//! `cargo build --release --bin modelpress --examples && target/release/examples/queue_bench` (or
//! `make bench`, which writes BENCHMARKS.md). The rescue measurement runs `modelpress worker` from the
//! folder above this binary's (target/release/modelpress) and needs ORT_DYLIB_PATH (or the project's
//! .venv) for the second worker's job process.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use modelpress::db::{self, DEFAULT_TENANT};
use modelpress::onnx::{ModelSummary, builder};
use modelpress::queue::{self, Enqueued, JobState, NewJob};
use sqlx::postgres::{PgConnectOptions, PgListener, PgPoolOptions};
use sqlx::{ConnectOptions, PgPool};

const JOBS_PER_RUN: usize = 2000;
const NOTIFY_SAMPLES: usize = 200;
/// Rescue measurement: runs, and the worker settings its worker processes get.
const RESCUE_RUNS: usize = 3;
const RESCUE_LEASE_S: u64 = 3;
const RESCUE_INTERVAL_S: u64 = 1;
const POLL: Duration = Duration::from_millis(20);
/// Longest wait for any one step of the rescue measurement before it gives up.
const STEP_TIMEOUT: Duration = Duration::from_secs(60);

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
    // Checked first: the rescue measurement, last, needs it.
    let bin = worker_binary()?;
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
         until the queue is empty. Command: `cargo build --release --bin modelpress --examples && \
         target/release/examples/queue_bench`.\n\n"
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
            goal: None,
            tenant_id: DEFAULT_TENANT,
            model_id,
            recipe: &recipe,
            priority: 0,
            max_attempts: 1,
            timeout_s: 60,
            dataset_id: None,
            evaluation: &serde_json::json!({}),
            webhook_url: None,
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
    out.push_str(&rescue_section(&pool, &opts, &bin).await?);
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

/// Kill → rescue → success of one job, with real worker processes, `RESCUE_RUNS` times. Each run
/// enqueues a job and starts worker A, whose runner is a script that records its pid and sleeps: the
/// job stays `running` while A renews its lease. Once the job runs and its job process has started,
/// A is SIGKILLed (its orphaned job process too) and worker B, with the real runner, is started at
/// once; the run times kill → job back in `queued` (B's rescuer swept it) and kill → `succeeded`.
async fn rescue_section(pool: &PgPool, opts: &PgConnectOptions, bin: &Path) -> anyhow::Result<String> {
    let tmp = tempfile::tempdir()?;
    let data_dir = tmp.path().join("data");
    // A model the workers can fetch: keys are paths under the local store root, <data_dir>/objects.
    let key = "bench/model.onnx";
    let object = data_dir.join("objects").join(key);
    std::fs::create_dir_all(object.parent().expect("the key has a folder"))?;
    let model = builder::tiny_mlp(0);
    let bytes = modelpress::onnx::encode(&model);
    std::fs::write(&object, &bytes)?;
    let model_id = uuid::Uuid::new_v4();
    db::models::insert(
        pool,
        db::models::NewModel {
            id: model_id,
            tenant_id: DEFAULT_TENANT,
            name: "bench-rescue",
            size_bytes: bytes.len() as i64,
            sha256: "0",
            storage_key: key,
            summary: &ModelSummary::of(&model),
            files: &[],
        },
    )
    .await?;
    let job_process = JobProcess(tmp.path().join("job-process.pid"));
    let runner = tmp.path().join("runner.sh");
    std::fs::write(
        &runner,
        format!("#!/bin/sh\necho $$ > '{}'\nexec sleep 60\n", job_process.0.display()),
    )?;
    std::fs::set_permissions(&runner, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    // The bench database's URL, password included (the getters leave it out).
    let url = opts.to_url_lossy().to_string();
    let recipe = serde_json::json!([{"pass": "optimize"}]);

    let (mut rescued, mut succeeded) = (Vec::new(), Vec::new());
    for run in 1..=RESCUE_RUNS {
        let new = NewJob {
            goal: None,
            tenant_id: DEFAULT_TENANT,
            model_id,
            recipe: &recipe,
            priority: 0,
            max_attempts: 3,
            timeout_s: 60,
            dataset_id: None,
            evaluation: &serde_json::json!({}),
            webhook_url: None,
            idempotency: None,
        };
        let Enqueued::Created(job) = queue::enqueue(pool, new).await? else {
            anyhow::bail!("run {run}: the rescue job was not created");
        };
        let mut first = WorkerProcess::spawn(bin, &url, &data_dir, Some(&runner))?;
        let started = Instant::now();
        loop {
            first.ensure_alive("first")?;
            let state = queue::get(pool, DEFAULT_TENANT, job.id).await?.map(|j| j.state);
            if state == Some(JobState::Running) && job_process.pid().is_some() {
                break;
            }
            anyhow::ensure!(
                started.elapsed() < STEP_TIMEOUT,
                "run {run}: the first worker did not start the job within {STEP_TIMEOUT:?} (state {state:?})"
            );
            tokio::time::sleep(POLL).await;
        }
        first.0.kill()?;
        let killed = Instant::now();
        first.0.wait()?;
        job_process.kill();
        let mut second = WorkerProcess::spawn(bin, &url, &data_dir, None)?;
        let mut back = None;
        let done = loop {
            second.ensure_alive("second")?;
            let row = queue::get(pool, DEFAULT_TENANT, job.id)
                .await?
                .ok_or_else(|| anyhow::anyhow!("run {run}: the job vanished"))?;
            // Back in the queue, or already claimed again by the second worker between two polls.
            if back.is_none() && (row.state == JobState::Queued || row.attempt >= 2) {
                back = Some(killed.elapsed().as_secs_f64());
            }
            match row.state {
                JobState::Succeeded => break killed.elapsed().as_secs_f64(),
                JobState::Failed | JobState::Cancelled => anyhow::bail!(
                    "run {run}: the rescued job ended {}: {:?}",
                    row.state.as_str(),
                    row.error.map(|e| e.0)
                ),
                _ => {}
            }
            anyhow::ensure!(
                killed.elapsed() < STEP_TIMEOUT,
                "run {run}: the job did not succeed within {STEP_TIMEOUT:?} of the kill (state {})",
                row.state.as_str()
            );
            tokio::time::sleep(POLL).await;
        };
        drop(second);
        let (attempt, artifacts): (i32, i64) = sqlx::query_as(
            "SELECT attempt, (SELECT count(*) FROM artifacts WHERE job_id = jobs.id) FROM jobs WHERE id = $1",
        )
        .bind(job.id)
        .fetch_one(pool)
        .await?;
        anyhow::ensure!(
            attempt == 2 && artifacts == 3,
            "run {run}: expected the second attempt to succeed with 3 artifacts, got attempt {attempt} with \
             {artifacts}"
        );
        rescued.push(back.expect("a job that succeeded again was rescued first"));
        succeeded.push(done);
    }
    let list = |v: &[f64]| v.iter().map(|s| format!("{s:.2}")).collect::<Vec<_>>().join(", ");
    Ok(format!(
        "\n### Rescue of a killed worker's job (measured)\n\n\
         {RESCUE_RUNS} runs with real `modelpress worker` processes, `worker.lease_s` = {RESCUE_LEASE_S} s and \
         `worker.rescue_interval_s` = {RESCUE_INTERVAL_S} s: a worker claims a job and starts its job process, is \
         killed with SIGKILL, and a second worker is started at once. Kill → job back in `queued` (swept by the \
         second worker's rescuer): median **{:.2} s** (runs: {} s). Kill → job `succeeded` (the second worker runs it \
         again with the real job process, an `optimize` job on a tiny MLP): median **{:.2} s** (runs: {} s). The job \
         is polled every {} ms; a job already claimed again between two polls counts as back in the queue.\n\n\
         Rescue time ≈ lease expiry + rescue interval, by design: a dead worker's lease runs out `worker.lease_s` \
         after its last renewal (renewed about once a second while a job runs), and the next sweep (every \
         `worker.rescue_interval_s`) puts the job back in the queue. Here the kill lands just after the claim, so \
         the whole lease runs out first; in general expect between about `lease_s` − 1 s and `lease_s` + \
         `rescue_interval_s`: with the defaults (60 s + 5 s), about a minute, at most 65 s.\n",
        median(&rescued),
        list(&rescued),
        median(&succeeded),
        list(&succeeded),
        POLL.as_millis(),
    ))
}

fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// `target/release/modelpress`, next to the folder of this binary (target/release/examples).
fn worker_binary() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let bin = exe
        .parent()
        .and_then(Path::parent)
        .map(|dir| dir.join("modelpress"))
        .ok_or_else(|| anyhow::anyhow!("cannot place {} in a target folder", exe.display()))?;
    anyhow::ensure!(
        bin.is_file(),
        "{} not found: the rescue measurement runs real worker processes; build it first with \
         `cargo build --release --bin modelpress --examples`",
        bin.display()
    );
    Ok(bin)
}

/// A `modelpress worker` process, killed (and reaped) when dropped, so none outlives the bench.
struct WorkerProcess(Child);

impl WorkerProcess {
    /// With `runner`, the worker runs that program as each job's process instead of itself.
    fn spawn(bin: &Path, url: &str, data_dir: &Path, runner: Option<&Path>) -> anyhow::Result<Self> {
        let mut cmd = Command::new(bin);
        cmd.arg("worker");
        // Only the settings below: none inherited from the caller's environment.
        for (name, _) in std::env::vars_os() {
            if name.to_string_lossy().starts_with("MODELPRESS_") {
                cmd.env_remove(name);
            }
        }
        cmd.env("DATABASE_URL", url)
            .env("MODELPRESS_WORKER__LEASE_S", RESCUE_LEASE_S.to_string())
            .env("MODELPRESS_WORKER__RESCUE_INTERVAL_S", RESCUE_INTERVAL_S.to_string())
            .env("MODELPRESS_SERVER__DATA_DIR", data_dir)
            .env("MODELPRESS_DATABASE__MIGRATE_ON_START", "false")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if let Some(runner) = runner {
            cmd.env("MODELPRESS_WORKER__RUNNER", runner);
        }
        let child = cmd
            .spawn()
            .map_err(|e| anyhow::anyhow!("starting {} worker: {e}", bin.display()))?;
        Ok(WorkerProcess(child))
    }

    fn ensure_alive(&mut self, which: &str) -> anyhow::Result<()> {
        match self.0.try_wait()? {
            None => Ok(()),
            Some(status) => anyhow::bail!(
                "the {which} worker process exited on its own ({status}); run `modelpress worker` with the same \
                 environment to see why"
            ),
        }
    }
}

impl Drop for WorkerProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The pid file the first worker's job process (the sleeping runner script) writes. Killing that
/// worker orphans the process, so it is killed by its pid: after each kill, and when dropped.
struct JobProcess(PathBuf);

impl JobProcess {
    fn pid(&self) -> Option<libc::pid_t> {
        std::fs::read_to_string(&self.0).ok()?.trim().parse().ok()
    }

    fn kill(&self) {
        if let Some(pid) = self.pid().filter(|&pid| pid > 1) {
            // SAFETY: kill(2) takes plain integers; the pid is the runner's own, read from the file it
            // wrote, and it has not been reaped (its 60 s sleep is still running).
            unsafe {
                libc::kill(pid, libc::SIGKILL);
            }
        }
        let _ = std::fs::remove_file(&self.0);
    }
}

impl Drop for JobProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

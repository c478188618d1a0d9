//! One attempt of one job: fetch the model, run `modelpress compress --events` as a child process,
//! keep the lease, watch for cancel, timeout and shutdown, then store the artifacts and record the
//! outcome. The child isolates the worker from anything the model does to ONNX Runtime.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::WorkerContext;
use super::events::Event;
use crate::db;
use crate::eval::dataset::EvaluationOptions;
use crate::pipeline::{MODEL_ARTIFACT, REPORT_ARTIFACT, REPORT_HTML_ARTIFACT, ZSTD_ARTIFACT};
use crate::queue::{self, JobError, JobRow, Lease, NewArtifact};
use crate::storage;

enum Outcome {
    Succeeded(Vec<NewArtifact>),
    Failed {
        error: JobError,
        retryable: bool,
    },
    Cancelled,
    /// Shutting down: the job goes back to the queue untouched.
    Released,
    /// Another attempt owns the job now; write nothing.
    LeaseLost,
}

fn failed(code: &str, message: impl Into<String>, retryable: bool) -> Outcome {
    Outcome::Failed {
        error: JobError {
            code: code.into(),
            message: message.into(),
        },
        retryable,
    }
}

pub async fn run(ctx: &WorkerContext, job: JobRow, shutdown: &CancellationToken) {
    tracing::info!(model_id = %job.model_id, "job attempt started");
    let scratch = ctx.config.scratch_dir().join(format!("{}-{}", job.id, job.attempt));
    let outcome = match tokio::fs::create_dir_all(&scratch).await {
        Ok(()) => execute(ctx, &job, &scratch, shutdown).await,
        Err(e) => failed("io_error", format!("creating scratch space: {e}"), true),
    };
    let recorded = record(ctx, &job, outcome).await;
    if let Err(e) = recorded {
        // The lease will expire and the rescuer will hand the job to another attempt.
        tracing::error!(error = %e, "recording the job outcome failed");
    }
    if let Err(e) = tokio::fs::remove_dir_all(&scratch).await {
        tracing::warn!(error = %e, path = %scratch.display(), "removing scratch space failed");
    }
}

async fn record(ctx: &WorkerContext, job: &JobRow, outcome: Outcome) -> Result<(), sqlx::Error> {
    let pool = &ctx.pool;
    match outcome {
        Outcome::Succeeded(artifacts) => {
            if queue::complete(pool, job, &artifacts).await? {
                tracing::info!("job succeeded");
            } else {
                tracing::warn!("lease lost before completion; discarding this attempt's artifacts");
                discard_uploads(ctx, job).await;
            }
        }
        Outcome::Failed { error, retryable } => {
            discard_uploads(ctx, job).await;
            let state = queue::fail(pool, job, &error, retryable, ctx.config.worker.retry_base_s).await?;
            tracing::warn!(code = %error.code, message = %error.message, ?state, "job attempt failed");
        }
        Outcome::Cancelled => {
            discard_uploads(ctx, job).await;
            queue::mark_cancelled(pool, job).await?;
            tracing::info!("job cancelled");
        }
        Outcome::Released => {
            discard_uploads(ctx, job).await;
            queue::release(pool, job).await?;
            tracing::info!("job released back to the queue for shutdown");
        }
        Outcome::LeaseLost => {
            discard_uploads(ctx, job).await;
            tracing::warn!("lease lost; another attempt owns the job");
        }
    }
    Ok(())
}

async fn discard_uploads(ctx: &WorkerContext, job: &JobRow) {
    let prefix = format!("{}/{}", storage::job_prefix(job.tenant_id, job.id), job.attempt);
    if let Err(e) = ctx.storage.delete_prefix(&prefix).await {
        tracing::warn!(error = %e, "removing this attempt's uploads failed");
    }
}

async fn execute(ctx: &WorkerContext, job: &JobRow, scratch: &Path, shutdown: &CancellationToken) -> Outcome {
    let model = match db::models::get(&ctx.pool, job.tenant_id, job.model_id).await {
        Ok(Some(m)) => m,
        Ok(None) => return failed("model_missing", "the job's model was deleted", false),
        Err(e) => return failed("database_error", e.to_string(), true),
    };
    // The model and its external-data files, laid out as they were uploaded.
    let input = scratch.join("input").join("model.onnx");
    if let Err(e) = fetch_model(ctx.storage.as_ref(), &model, &input).await {
        return failed("storage_error", format!("fetching the model: {e}"), true);
    }
    let out_dir = scratch.join("out");
    // The child reads exactly the configuration this worker runs with (file, env and overrides).
    let config_path = scratch.join("config.toml");
    let written = toml::to_string(ctx.config.as_ref()).map_err(std::io::Error::other);
    if let Err(e) = async { tokio::fs::write(&config_path, written?).await }.await {
        return failed("io_error", format!("writing the job's configuration: {e}"), true);
    }
    let dataset = match job.dataset_id {
        None => None,
        Some(id) => match db::datasets::get(&ctx.pool, job.tenant_id, id).await {
            Ok(Some(d)) => {
                let path = scratch.join("dataset.npz");
                if let Err(e) = ctx.storage.get_file(&d.storage_key, &path).await {
                    return failed("storage_error", format!("fetching the dataset: {e}"), true);
                }
                Some(path)
            }
            Ok(None) => return failed("dataset_missing", "the job's dataset was deleted", false),
            Err(e) => return failed("database_error", e.to_string(), true),
        },
    };
    let mut child = match spawn(ctx, job, &config_path, &input, &out_dir, dataset.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            return failed(
                "runtime_crashed",
                format!("starting the job process {}: {e}", ctx.runner.display()),
                true,
            );
        }
    };

    let progress: Arc<Mutex<Option<(String, f32)>>> = Arc::default();
    let error: Arc<Mutex<Option<Event>>> = Arc::default();
    let candidates: Arc<Mutex<Candidates>> = Arc::default();
    let stderr_tail: Arc<Mutex<VecDeque<String>>> = Arc::default();
    let stdout = child.stdout.take().expect("stdout is piped");
    let stderr = child.stderr.take().expect("stderr is piped");
    let readers = (
        tokio::spawn(read_events(stdout, progress.clone(), error.clone(), candidates.clone())),
        tokio::spawn(read_stderr(stderr, stderr_tail.clone())),
    );

    let status = match supervise(ctx, job, &mut child, (&progress, &candidates), shutdown).await {
        Ok(status) => status,
        Err(outcome) => {
            let _ = child.kill().await;
            return outcome;
        }
    };
    let _ = readers.0.await;
    let _ = readers.1.await;
    // Candidates reported after the last heartbeat (a search faster than one tick).
    let found = candidates.lock().unwrap().clone();
    if found.events > 0
        && let Err(e) =
            queue::record_candidates(&ctx.pool, job.id, job.attempt, &serde_json::Value::Array(found.list)).await
    {
        tracing::warn!(error = %e, "recording candidates failed");
    }

    if status.success() {
        return store_artifacts(ctx, job, &out_dir).await;
    }
    if let Some(Event::Error {
        code,
        message,
        retryable,
    }) = error.lock().unwrap().take()
    {
        if out_of_memory(&message) {
            return memory_limit(ctx, &message);
        }
        return failed(&code, message, retryable);
    }
    let tail: Vec<String> = stderr_tail.lock().unwrap().iter().cloned().collect();
    if tail.iter().any(|l| out_of_memory(l)) {
        return memory_limit(ctx, &tail.join(" | "));
    }
    failed("runtime_crashed", crash_message(status, &tail), true)
}

/// Copies a model and its external-data files out of storage into `input`'s folder, laid out as
/// they were uploaded.
pub async fn fetch_model(
    storage: &dyn storage::Storage,
    model: &db::models::ModelRow,
    input: &Path,
) -> anyhow::Result<()> {
    let dir = input.parent().expect("input sits in a folder");
    tokio::fs::create_dir_all(dir).await?;
    storage.get_file(&model.storage_key, input).await?;
    for file in &model.files.0 {
        // Checked at upload; checked again because this path comes from the database.
        crate::onnx::external::check_location(&file.path)
            .map_err(|why| anyhow::anyhow!("file {:?} {why}", file.path))?;
        let dest = dir.join(&file.path);
        if let Some(parent) = dest.parent() {
            tokio::fs::create_dir_all(parent).await?;
        }
        storage.get_file(&file.storage_key, &dest).await?;
    }
    Ok(())
}

fn spawn(
    ctx: &WorkerContext,
    job: &JobRow,
    config: &Path,
    input: &Path,
    out_dir: &Path,
    dataset: Option<&Path>,
) -> std::io::Result<Child> {
    let mut cmd = Command::new(&ctx.runner);
    cmd.arg("--config").arg(config).arg("compress").arg(input);
    match &job.goal {
        Some(goal) => cmd.arg("--goal").arg(goal.0.to_string()),
        None => cmd.arg("--recipe").arg(job.recipe.0.to_string()),
    };
    cmd.arg("--out")
        .arg(out_dir)
        .arg("--job-id")
        .arg(job.id.to_string())
        .arg("--events")
        .arg("--evaluation")
        .arg(evaluation_options(ctx, job))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .env("TMPDIR", out_dir.parent().unwrap_or(out_dir))
        .kill_on_drop(true);
    super::limits::limit_address_space(&mut cmd, ctx.config.worker.job_memory_limit_mb);
    if let Some(dataset) = dataset {
        cmd.arg("--dataset").arg(dataset);
    }
    if let Some(lib) = crate::eval::runtime::locate(&ctx.config.onnxruntime.dylib_path) {
        cmd.env("ORT_DYLIB_PATH", lib);
    }
    cmd.spawn()
}

/// The job's evaluation options as JSON; jobs queued before options existed get the defaults.
fn evaluation_options(ctx: &WorkerContext, job: &JobRow) -> String {
    let options = serde_json::from_value::<EvaluationOptions>(job.evaluation.0.clone())
        .unwrap_or_else(|_| EvaluationOptions::defaults(&ctx.config.eval));
    serde_json::to_string(&options).expect("options serialize")
}

/// Waits for the child while renewing the lease. `Err` carries the outcome when the attempt must
/// stop early (the caller kills the child).
async fn supervise(
    ctx: &WorkerContext,
    job: &JobRow,
    child: &mut Child,
    (progress, candidates): (&Mutex<Option<StageProgress>>, &Mutex<Candidates>),
    shutdown: &CancellationToken,
) -> Result<ExitStatus, Outcome> {
    let cfg = &ctx.config.worker;
    let deadline = Instant::now() + Duration::from_secs(job.timeout_s.max(1) as u64);
    // Renewing also reads cancel_requested, so renew often enough that a cancel lands within
    // about a second, and at least three times per lease.
    let renew_every = Duration::from_secs_f64((cfg.lease_s as f64 / 3.0).min(1.0));
    let mut last_renewal = Instant::now();
    let mut reported: Option<(String, f32)> = None;
    let mut reported_candidates = 0usize;
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    let mut grace_until: Option<Instant> = None;
    loop {
        tokio::select! {
            status = child.wait() => {
                return status.map_err(|e| failed("runtime_crashed", format!("waiting for the job process: {e}"), true));
            }
            _ = tokio::time::sleep_until(deadline) => {
                let message = format!("the attempt ran past the job's time limit ({}s)", job.timeout_s);
                return Err(failed("timeout", message, false));
            }
            _ = shutdown.cancelled(), if grace_until.is_none() => {
                grace_until = Some(Instant::now() + Duration::from_secs(ctx.config.server.shutdown_grace_s));
                tracing::info!("shutdown requested; giving the running attempt its grace period");
            }
            _ = tick.tick() => {
                if grace_until.is_some_and(|g| Instant::now() >= g) {
                    return Err(Outcome::Released);
                }
                let found = candidates.lock().unwrap().clone();
                if found.events != reported_candidates {
                    let list = serde_json::Value::Array(found.list);
                    match queue::record_candidates(&ctx.pool, job.id, job.attempt, &list).await {
                        Ok(()) => reported_candidates = found.events,
                        Err(e) => tracing::warn!(error = %e, "recording candidates failed"),
                    }
                }
                let latest = progress.lock().unwrap().clone();
                let changed = latest.is_some() && latest != reported;
                if !changed && last_renewal.elapsed() < renew_every {
                    continue;
                }
                let p = latest.as_ref().map(|(s, p)| (s.as_str(), *p));
                match queue::heartbeat(&ctx.pool, job.id, job.attempt, cfg.lease_s, p).await {
                    Ok(Lease::Held) => {}
                    Ok(Lease::CancelRequested) => return Err(Outcome::Cancelled),
                    Ok(Lease::Lost) => return Err(Outcome::LeaseLost),
                    // A database blip: keep working; the lease has slack for a few missed renewals.
                    Err(e) => tracing::warn!(error = %e, "heartbeat failed"),
                }
                last_renewal = Instant::now();
                reported = latest;
            }
        }
    }
}

/// The job process's latest `(stage, percent)`.
type StageProgress = (String, f32);

/// The advisor's candidates as the job process reported them, and how many reports came (each
/// adds a candidate or updates one), so the supervisor knows when the list changed.
#[derive(Debug, Default, Clone)]
struct Candidates {
    events: usize,
    list: Vec<serde_json::Value>,
}

impl Candidates {
    fn update(&mut self, candidate: serde_json::Value) {
        self.events += 1;
        let id = candidate.get("id").cloned();
        match self.list.iter_mut().find(|c| c.get("id") == id.as_ref()) {
            Some(existing) => *existing = candidate,
            None => self.list.push(candidate),
        }
    }
}

async fn read_events(
    stdout: tokio::process::ChildStdout,
    progress: Arc<Mutex<Option<(String, f32)>>>,
    error: Arc<Mutex<Option<Event>>>,
    candidates: Arc<Mutex<Candidates>>,
) {
    let mut lines = BufReader::new(stdout).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        match serde_json::from_str::<Event>(&line) {
            Ok(Event::Progress { stage, percent }) => *progress.lock().unwrap() = Some((stage, percent)),
            Ok(e @ Event::Error { .. }) => *error.lock().unwrap() = Some(e),
            Ok(Event::Candidate { candidate }) => candidates.lock().unwrap().update(candidate),
            Ok(Event::Done) => {}
            Err(_) => tracing::debug!(line, "job process output"),
        }
    }
}

/// Keeps the last lines the child wrote to stderr for the crash message, and logs them.
async fn read_stderr(stderr: tokio::process::ChildStderr, tail: Arc<Mutex<VecDeque<String>>>) {
    let mut lines = BufReader::new(stderr).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        tracing::debug!(target: "modelpress::job_process", "{line}");
        let mut t = tail.lock().unwrap();
        if t.len() == 10 {
            t.pop_front();
        }
        t.push_back(line);
    }
}

/// Whether an error or a dying process's output says an allocation failed: ONNX Runtime reports
/// `bad_alloc`/"Failed to allocate", Rust aborts with "memory allocation of N bytes failed".
fn out_of_memory(text: &str) -> bool {
    let t = text.to_ascii_lowercase();
    [
        "bad_alloc",
        "bad allocation",
        "failed to allocate",
        "memory allocation of",
        "out of memory",
    ]
    .iter()
    .any(|needle| t.contains(needle))
}

/// Running out of memory repeats on every attempt, so it is not retried.
fn memory_limit(ctx: &WorkerContext, detail: &str) -> Outcome {
    let limit = ctx.config.worker.job_memory_limit_mb;
    let what = if limit > 0 {
        format!("the job ran out of memory (limit worker.job_memory_limit_mb = {limit} MiB)")
    } else {
        "the job ran out of memory".to_string()
    };
    failed("memory_limit", format!("{what}: {detail}"), false)
}

fn crash_message(status: ExitStatus, tail: &[String]) -> String {
    use std::os::unix::process::ExitStatusExt;
    let how = match (status.code(), status.signal()) {
        (_, Some(sig)) => format!("the job process was killed by signal {sig}"),
        (Some(code), _) => {
            format!("the job process exited with status {code} without reporting an error")
        }
        _ => "the job process ended abnormally".to_string(),
    };
    match tail.last() {
        Some(last) => format!("{how}; its last output: {last}"),
        None => how,
    }
}

async fn store_artifacts(ctx: &WorkerContext, job: &JobRow, out_dir: &Path) -> Outcome {
    let mut stored = Vec::new();
    // A goal job whose goal nobody could meet succeeds with a report and no model.
    let optional_model = job.goal.is_some() && !out_dir.join(MODEL_ARTIFACT).exists();
    for (name, content_type) in [
        (MODEL_ARTIFACT, "application/octet-stream"),
        (REPORT_ARTIFACT, "application/json"),
        (REPORT_HTML_ARTIFACT, "text/html; charset=utf-8"),
        (ZSTD_ARTIFACT, "application/zstd"),
    ] {
        if name == MODEL_ARTIFACT && optional_model {
            continue;
        }
        let path: PathBuf = out_dir.join(name);
        // The zstd copy is written only by recipes whose passes ship one.
        if name == ZSTD_ARTIFACT && !path.exists() {
            continue;
        }
        let (size, sha256) = match storage::hash_file(&path).await {
            Ok(h) => h,
            Err(e) => {
                return failed(
                    "pass_failed",
                    format!("the job process did not write {name}: {e}"),
                    false,
                );
            }
        };
        let key = storage::artifact_key(job.tenant_id, job.id, job.attempt, name);
        if let Err(e) = ctx.storage.put_file(&key, &path).await {
            return failed("storage_error", format!("storing {name}: {e}"), true);
        }
        stored.push(NewArtifact {
            name: name.into(),
            size_bytes: size as i64,
            sha256,
            content_type: content_type.into(),
            storage_key: key,
        });
    }
    Outcome::Succeeded(stored)
}

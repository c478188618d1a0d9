//! `/v1/jobs`: submit a recipe against a model, watch it, cancel it, fetch its report and artifacts.

use std::collections::HashMap;

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};
use uuid::Uuid;

use super::AppState;
use super::download;
use super::error::{ApiError, ApiResult};
use super::extract::{Json, Path, Query, Tenant};
use super::models::{Page, PageQuery, next_cursor};
use crate::advisor::Goal;
use crate::compress::Recipe;
use crate::db::artifacts::{self, ArtifactRow};
use crate::db::datasets as db_datasets;
use crate::db::models as db_models;
use crate::db::page::Cursor;
use crate::eval::Provider;
use crate::eval::dataset::{self, EvaluationOptions, Task};
use crate::pipeline::{REPORT_ARTIFACT, REPORT_HTML_ARTIFACT};
use crate::queue::{self, AttemptError, CancelOutcome, Enqueued, JobError, JobRow, JobState, NewJob};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateJob {
    model_id: Uuid,
    /// Exactly one of `recipe` (the passes to run) and `goal` (let the advisor choose).
    recipe: Option<Value>,
    goal: Option<Value>,
    #[serde(default)]
    priority: i32,
    max_attempts: Option<i32>,
    timeout_s: Option<i32>,
    /// Evaluate on this dataset instead of synthetic inputs.
    dataset_id: Option<Uuid>,
    task: Option<Task>,
    label_key: Option<String>,
    calibration_fraction: Option<f64>,
    /// Evaluate without the calibration split even when no pass calibrates (to re-measure an
    /// advisor's decision on the advisor's samples).
    #[serde(default)]
    hold_out_calibration: bool,
    execution_provider: Option<String>,
    /// Sizes for named dynamic input dimensions of synthetic inputs (`{"height": 48}`).
    #[serde(default)]
    dim_overrides: std::collections::BTreeMap<String, i64>,
    /// Told with a signed POST of the job when it ends (see `webhooks`).
    webhook_url: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct Progress {
    stage: String,
    percent: f32,
}

#[derive(Debug, Serialize)]
pub struct Artifact {
    name: String,
    size_bytes: i64,
    sha256: String,
    url: String,
}

#[derive(Debug, Serialize)]
pub struct Job {
    id: Uuid,
    model_id: Uuid,
    state: JobState,
    /// `null` for goal jobs.
    recipe: Value,
    #[serde(skip_serializing_if = "Option::is_none")]
    goal: Option<Value>,
    /// Goal jobs: the candidates the advisor has measured so far.
    #[serde(skip_serializing_if = "Option::is_none")]
    candidates: Option<Value>,
    priority: i32,
    progress: Progress,
    attempts: i32,
    max_attempts: i32,
    cancel_requested: bool,
    timeout_s: i32,
    dataset_id: Option<Uuid>,
    evaluation: Value,
    error: Option<JobError>,
    attempt_errors: Vec<AttemptError>,
    created_at: DateTime<Utc>,
    started_at: Option<DateTime<Utc>>,
    finished_at: Option<DateTime<Utc>>,
    webhook_url: Option<String>,
    artifacts: Vec<Artifact>,
    /// When retention deleted the artifacts (`retention.artifacts_days`); null while they exist.
    artifacts_expired_at: Option<DateTime<Utc>>,
}

impl Job {
    fn new(row: JobRow, artifacts: Vec<ArtifactRow>) -> Job {
        Job {
            artifacts: artifacts
                .into_iter()
                .map(|a| Artifact {
                    url: format!("/v1/jobs/{}/artifacts/{}", row.id, a.name),
                    name: a.name,
                    size_bytes: a.size_bytes,
                    sha256: a.sha256,
                })
                .collect(),
            id: row.id,
            model_id: row.model_id,
            state: row.state,
            recipe: row.recipe.0,
            candidates: row.goal.is_some().then_some(row.candidates.0),
            goal: row.goal.map(|g| g.0),
            priority: row.priority,
            progress: Progress {
                stage: row.progress_stage,
                percent: row.progress_percent,
            },
            attempts: row.attempt,
            max_attempts: row.max_attempts,
            cancel_requested: row.cancel_requested,
            timeout_s: row.timeout_s,
            dataset_id: row.dataset_id,
            evaluation: row.evaluation.0,
            error: row.error.map(|e| e.0),
            attempt_errors: row.attempt_errors.0,
            created_at: row.created_at,
            started_at: row.started_at,
            finished_at: row.finished_at,
            webhook_url: row.webhook_url,
            artifacts_expired_at: row.artifacts_expired_at,
        }
    }
}

/// Rows → API jobs, fetching all their artifacts in one query.
async fn with_artifacts(state: &AppState, tenant: Tenant, rows: Vec<JobRow>) -> ApiResult<Vec<Job>> {
    let ids: Vec<Uuid> = rows.iter().map(|r| r.id).collect();
    let mut by_job: HashMap<Uuid, Vec<ArtifactRow>> = HashMap::new();
    for a in artifacts::list_for_jobs(&state.pool, tenant.0, &ids).await? {
        by_job.entry(a.job_id).or_default().push(a);
    }
    Ok(rows
        .into_iter()
        .map(|r| {
            let arts = by_job.remove(&r.id).unwrap_or_default();
            Job::new(r, arts)
        })
        .collect())
}

async fn one(state: &AppState, tenant: Tenant, row: JobRow) -> ApiResult<Job> {
    Ok(with_artifacts(state, tenant, vec![row]).await?.remove(0))
}

/// A job as the API shows it, serialized: what `GET /v1/jobs/{id}` returns and the event stream
/// sends.
pub async fn job_json(pool: &sqlx::PgPool, row: JobRow) -> ApiResult<String> {
    let arts = artifacts::list_for_jobs(pool, row.tenant_id, &[row.id]).await?;
    serde_json::to_string(&Job::new(row, arts)).map_err(|e| ApiError::Internal(e.into()))
}

/// The client's `Idempotency-Key`: 1 to 255 visible ASCII characters.
fn idempotency_key(headers: &HeaderMap) -> ApiResult<Option<String>> {
    let Some(value) = headers.get("idempotency-key") else {
        return Ok(None);
    };
    match value.to_str() {
        Ok(k) if (1..=255).contains(&k.len()) && k.bytes().all(|b| b.is_ascii_graphic()) => Ok(Some(k.to_string())),
        _ => Err(ApiError::InvalidRequest(
            "Idempotency-Key must be 1 to 255 visible ASCII characters".into(),
        )),
    }
}

pub async fn create(
    State(state): State<AppState>,
    tenant: Tenant,
    headers: HeaderMap,
    Json(body): Json<CreateJob>,
) -> ApiResult<Response> {
    let key = idempotency_key(&headers)?;
    let recipe = match (&body.recipe, &body.goal) {
        (Some(r), None) => Some(Recipe::parse(r).map_err(|e| ApiError::InvalidRecipe(e.0))?),
        (None, Some(_)) => None,
        _ => {
            return Err(ApiError::InvalidRequest(
                "give exactly one of recipe (the passes to run) and goal (let the advisor choose)".into(),
            ));
        }
    };
    let max_attempts = body.max_attempts.unwrap_or(state.config.worker.max_attempts);
    if !(1..=10).contains(&max_attempts) {
        return Err(ApiError::InvalidRequest("max_attempts must be within 1..=10".into()));
    }
    let cap = state.config.worker.max_job_timeout_s as i64;
    let mut evaluation = evaluation_options(&state, tenant, &body).await?;
    let goal = match &body.goal {
        None => None,
        Some(g) => {
            let goal = Goal::parse(g, evaluation.task).map_err(ApiError::InvalidGoal)?;
            if let Some(p) = &goal.execution_provider {
                if body.execution_provider.as_ref().is_some_and(|b| b != p) {
                    return Err(ApiError::InvalidGoal(format!(
                        "goal.execution_provider {p:?} contradicts the job's execution_provider"
                    )));
                }
                evaluation.execution_provider = p.clone();
                check_provider(&state, &evaluation)?;
            }
            Some(goal)
        }
    };
    // A goal job searches for up to its time budget; by default it gets that plus a quarter and a
    // minute for the last candidate and the report.
    let default_timeout = match &goal {
        Some(g) => (g.time_budget_s + g.time_budget_s / 4 + 60) as i64,
        None => state.config.worker.job_timeout_s as i64,
    };
    let timeout_s = body.timeout_s.map_or(default_timeout.min(cap), i64::from);
    if !(1..=cap).contains(&timeout_s) {
        return Err(ApiError::InvalidRequest(format!(
            "timeout_s must be within 1..={cap} (worker.max_job_timeout_s)"
        )));
    }
    if let Some(url) = &body.webhook_url {
        crate::webhooks::check_url(url, state.config.webhooks.allow_private_targets)
            .await
            .map_err(|why| ApiError::Unprocessable {
                code: "invalid_webhook_url",
                message: why,
            })?;
    }
    let active_cap = state.config.limits.max_active_jobs_per_tenant;
    if active_cap > 0 && queue::active_count(&state.pool, tenant.0).await? >= i64::from(active_cap) {
        return Err(ApiError::QuotaExceeded(format!(
            "this tenant already has {active_cap} queued or running jobs \
             (limits.max_active_jobs_per_tenant); wait for one to finish"
        )));
    }
    // Store the normalized recipe (defaults filled in) so the job shows exactly what will run.
    let recipe = serde_json::to_value(&recipe).map_err(|e| ApiError::Internal(e.into()))?;
    let goal = goal
        .map(|g| serde_json::to_value(&g))
        .transpose()
        .map_err(|e| ApiError::Internal(e.into()))?;
    let evaluation = serde_json::to_value(&evaluation).map_err(|e| ApiError::Internal(e.into()))?;
    // What makes two submissions "the same request" for an idempotency key: the normalized body.
    let request_hash = hex::encode(Sha256::digest(
        serde_json::json!([
            body.model_id,
            recipe,
            goal,
            body.priority,
            max_attempts,
            timeout_s,
            body.dataset_id,
            evaluation,
            body.webhook_url
        ])
        .to_string(),
    ));
    let outcome = queue::enqueue(
        &state.pool,
        NewJob {
            tenant_id: tenant.0,
            model_id: body.model_id,
            recipe: &recipe,
            priority: body.priority,
            max_attempts,
            timeout_s: timeout_s as i32,
            dataset_id: body.dataset_id,
            evaluation: &evaluation,
            goal: goal.as_ref(),
            webhook_url: body.webhook_url.as_deref(),
            idempotency: key.as_deref().map(|k| (k, request_hash.as_str())),
        },
    )
    .await?;
    let (status, row) = match outcome {
        Enqueued::Created(row) => {
            tracing::info!(job_id = %row.id, model_id = %row.model_id, "job queued");
            (StatusCode::CREATED, row)
        }
        Enqueued::Replayed(row) => (StatusCode::OK, row),
        Enqueued::KeyReused(row) => {
            return Err(ApiError::Unprocessable {
                code: "idempotency_key_reused",
                message: format!(
                    "this Idempotency-Key was already used for a different request (job {})",
                    row.id
                ),
            });
        }
        Enqueued::ModelNotFound => return Err(ApiError::NotFound(format!("model {} not found", body.model_id))),
    };
    let location = format!("/v1/jobs/{}", row.id);
    let job = one(&state, tenant, row).await?;
    Ok((status, [(header::LOCATION, location)], axum::Json(job)).into_response())
}

/// The job's evaluation options, checked: the provider is one this server can serve, the task has
/// the data it needs, and the dataset (if any) matches the model's inputs.
async fn evaluation_options(state: &AppState, tenant: Tenant, body: &CreateJob) -> ApiResult<EvaluationOptions> {
    let mut options = EvaluationOptions::defaults(&state.config.eval);
    if let Some(task) = body.task {
        options.task = task;
    }
    if let Some(key) = &body.label_key {
        options.label_key = key.clone();
    }
    if let Some(fraction) = body.calibration_fraction {
        if !(0.0..0.95).contains(&fraction) {
            return Err(ApiError::InvalidRequest(
                "calibration_fraction must be within [0, 0.95)".into(),
            ));
        }
        options.calibration_fraction = fraction;
    }
    if let Some((name, size)) = body.dim_overrides.iter().find(|(_, v)| !(1..=1 << 20).contains(*v)) {
        return Err(ApiError::InvalidRequest(format!(
            "dim_overrides.{name} = {size}: sizes must be within 1..=1048576"
        )));
    }
    options.dim_overrides = body.dim_overrides.clone();
    options.hold_out_calibration = body.hold_out_calibration;
    if let Some(provider) = &body.execution_provider {
        options.execution_provider = provider.clone();
    }
    check_provider(state, &options)?;
    let Some(dataset_id) = body.dataset_id else {
        if options.task != Task::Generic {
            return Err(ApiError::InvalidRequest(format!(
                "task {:?} needs a dataset_id with labels",
                options.task
            )));
        }
        return Ok(options);
    };
    let dataset = db_datasets::get(&state.pool, tenant.0, dataset_id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("dataset {dataset_id} not found")))?;
    let model = db_models::get(&state.pool, tenant.0, body.model_id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("model {} not found", body.model_id)))?;
    dataset::check(
        &model.summary.0.inputs,
        &dataset.arrays.0,
        options.task,
        &options.label_key,
    )
    .map_err(|why| ApiError::Unprocessable {
        code: "dataset_mismatch",
        message: why,
    })?;
    Ok(options)
}

/// The provider is one this server's ONNX Runtime offers.
fn check_provider(state: &AppState, options: &EvaluationOptions) -> ApiResult<()> {
    let provider = Provider::parse(&options.execution_provider).ok_or_else(|| {
        ApiError::InvalidRequest(format!(
            "execution_provider {:?} is not one of cpu, cuda",
            options.execution_provider
        ))
    })?;
    if let Ok(runtime) = state.runtime.as_ref()
        && !runtime.providers().contains(&provider)
    {
        return Err(ApiError::Unprocessable {
            code: "cuda_unavailable",
            message: format!(
                "this server's ONNX Runtime ({}) has no {} execution provider; install the onnxruntime-gpu build \
                 and the CUDA libraries, or use \"cpu\"",
                runtime.version,
                provider.as_str()
            ),
        });
    }
    Ok(())
}

#[derive(Debug, Deserialize)]
pub struct ListQuery {
    state: Option<String>,
    limit: Option<i64>,
    cursor: Option<String>,
}

pub async fn list(
    State(state): State<AppState>,
    tenant: Tenant,
    Query(q): Query<ListQuery>,
) -> ApiResult<axum::Json<Page<Job>>> {
    let (limit, cursor) = PageQuery {
        limit: q.limit,
        cursor: q.cursor,
    }
    .parse()?;
    let filter = match q.state.as_deref() {
        None | Some("") => None,
        Some(s) => Some(JobState::parse(s).ok_or_else(|| {
            let known: Vec<&str> = JobState::ALL.iter().map(|s| s.as_str()).collect();
            ApiError::InvalidQuery(format!("state must be one of {}", known.join(", ")))
        })?),
    };
    let rows = queue::list(&state.pool, tenant.0, filter, limit, cursor).await?;
    let next_cursor = next_cursor(&rows, limit, |r| Cursor {
        created_at: r.created_at,
        id: r.id,
    });
    Ok(axum::Json(Page {
        items: with_artifacts(&state, tenant, rows).await?,
        next_cursor,
    }))
}

async fn find(state: &AppState, tenant: Tenant, id: Uuid) -> ApiResult<JobRow> {
    queue::get(&state.pool, tenant.0, id)
        .await?
        .ok_or_else(|| ApiError::not_found("job"))
}

/// The job, with an `ETag` of its content so a polling dashboard gets `304 Not Modified` (and no
/// body) until something changes.
pub async fn get(
    State(state): State<AppState>,
    tenant: Tenant,
    Path(id): Path<Uuid>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let row = find(&state, tenant, id).await?;
    let json = job_json(&state.pool, row).await?;
    let etag = format!("\"{}\"", &hex::encode(Sha256::digest(json.as_bytes()))[..32]);
    let matches = headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim() == etag));
    if matches {
        return Ok((StatusCode::NOT_MODIFIED, [(header::ETAG, etag)]).into_response());
    }
    Ok((
        [
            (header::ETAG, etag),
            (header::CONTENT_TYPE, "application/json".to_string()),
        ],
        json,
    )
        .into_response())
}

pub async fn cancel(State(state): State<AppState>, tenant: Tenant, Path(id): Path<Uuid>) -> ApiResult<axum::Json<Job>> {
    match queue::cancel(&state.pool, tenant.0, id).await? {
        CancelOutcome::Cancelled(row) | CancelOutcome::Requested(row) => {
            Ok(axum::Json(one(&state, tenant, row).await?))
        }
        CancelOutcome::AlreadyFinished(row) => Err(ApiError::Conflict {
            code: "job_finished",
            message: format!("the job already finished ({})", row.state.as_str()),
        }),
        CancelOutcome::NotFound => Err(ApiError::not_found("job")),
    }
}

pub async fn report(
    State(state): State<AppState>,
    tenant: Tenant,
    Path(id): Path<Uuid>,
    headers: HeaderMap,
) -> ApiResult<Response<Body>> {
    finished_report(&state, tenant, id, REPORT_ARTIFACT, &headers).await
}

/// The report as one self-contained HTML page (inline SVG charts, no external resources).
pub async fn report_html(
    State(state): State<AppState>,
    tenant: Tenant,
    Path(id): Path<Uuid>,
    headers: HeaderMap,
) -> ApiResult<Response<Body>> {
    finished_report(&state, tenant, id, REPORT_HTML_ARTIFACT, &headers).await
}

/// A report artifact, once the job has finished (409 `job_not_finished` before).
async fn finished_report(
    state: &AppState,
    tenant: Tenant,
    id: Uuid,
    name: &str,
    headers: &HeaderMap,
) -> ApiResult<Response<Body>> {
    let job = find(state, tenant, id).await?;
    if !job.state.is_terminal() {
        return Err(ApiError::Conflict {
            code: "job_not_finished",
            message: format!("the job is {}; its report exists once it succeeds", job.state.as_str()),
        });
    }
    serve_artifact(state, tenant, id, name, headers).await
}

pub async fn artifact(
    State(state): State<AppState>,
    tenant: Tenant,
    Path((id, name)): Path<(Uuid, String)>,
    headers: HeaderMap,
) -> ApiResult<Response<Body>> {
    serve_artifact(&state, tenant, id, &name, &headers).await
}

/// 410 `artifacts_expired` when retention deleted the job's artifacts, else 404.
async fn missing_artifact(state: &AppState, tenant: Tenant, job: Uuid, name: &str) -> ApiError {
    match queue::get(&state.pool, tenant.0, job).await {
        Ok(Some(JobRow {
            artifacts_expired_at: Some(at),
            ..
        })) => ApiError::Gone {
            code: "artifacts_expired",
            message: format!(
                "job {job}'s artifacts were deleted at {} after the retention period",
                at.to_rfc3339()
            ),
        },
        Ok(_) => ApiError::NotFound(format!("job {job} has no artifact named {name:?}")),
        Err(e) => e.into(),
    }
}

async fn serve_artifact(
    state: &AppState,
    tenant: Tenant,
    job: Uuid,
    name: &str,
    headers: &HeaderMap,
) -> ApiResult<Response<Body>> {
    let Some(artifact) = artifacts::get(&state.pool, tenant.0, job, name).await? else {
        return Err(missing_artifact(state, tenant, job, name).await);
    };
    let content_type = match artifact.content_type.as_str() {
        "application/json" => "application/json",
        "text/html; charset=utf-8" => "text/html; charset=utf-8",
        "application/zstd" => "application/zstd",
        _ => "application/octet-stream",
    };
    download::serve(
        state,
        headers,
        download::Object {
            key: &artifact.storage_key,
            size: artifact.size_bytes as u64,
            sha256: &artifact.sha256,
            content_type,
        },
    )
    .await
}

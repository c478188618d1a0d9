//! `POST /v1/jobs/{id}/infer`: run a finished job's compressed model (and, with `?compare=true`,
//! the original beside it) on the client's own inputs, so a result can be checked before it is
//! shipped. Bodies are JSON (`{"inputs": {name: nested arrays}}`) or `.npz`; the answer comes in
//! the form `Accept` asks for. The models run in the inference worker processes (`crate::infer`).

use std::collections::BTreeMap;
use std::future::Future;
use std::path::PathBuf;
use std::time::Instant;

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::Value;
use uuid::Uuid;

use super::AppState;
use super::error::{ApiError, ApiResult};
use super::extract::{Path, Query, Tenant};
use crate::db::artifacts;
use crate::db::models as db_models;
use crate::eval::Provider;
use crate::eval::dataset::EvaluationOptions;
use crate::infer::compare::differences;
use crate::infer::pool::Session;
use crate::infer::protocol::{FailureCode, Signature, Tensor};
use crate::infer::tensors::{self, InvalidInput};
use crate::infer::{InferError, ModelRef};
use crate::pipeline::MODEL_ARTIFACT;
use crate::queue::{self, JobRow, JobState};

#[derive(Debug, Deserialize)]
pub struct InferQuery {
    #[serde(default)]
    compare: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct JsonInputs {
    inputs: BTreeMap<String, Value>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Format {
    Json,
    Npz,
}

const NPZ_TYPE: &str = "application/octet-stream";

pub async fn infer(
    State(state): State<AppState>,
    tenant: Tenant,
    Path(id): Path<Uuid>,
    Query(q): Query<InferQuery>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Response> {
    let reply_format = accepted(&headers)?;
    let input_format = content_type(&headers)?;
    let body = read_body(&state, &headers, body).await?;
    let job = queue::get(&state.pool, tenant.0, id)
        .await?
        .ok_or_else(|| ApiError::not_found("job"))?;
    finished(&job)?;
    let provider = provider_of(&state, &job)?;

    let compressed = compressed_model(&state, tenant, &job, provider).await?;
    let original = if q.compare {
        Some(original_model(&state, tenant, &job, provider).await?)
    } else {
        None
    };
    let pool = &state.inference;
    let (c_session, o_session) = tokio::try_join!(pool.session(&compressed), async {
        match &original {
            Some(o) => pool.session(o).await.map(Some),
            None => Ok(None),
        }
    })?;
    let c_inputs = parse_inputs(&state, input_format, &body, &c_session.info.inputs, "").await?;
    let o_inputs = match &o_session {
        Some(s) => Some(parse_inputs(&state, input_format, &body, &s.info.inputs, "the original model's ").await?),
        None => None,
    };

    let start = Instant::now();
    let (c_out, o_out) = tokio::try_join!(pool.run(&compressed, c_inputs), async {
        match (&original, o_inputs) {
            (Some(o), Some(inputs)) => pool.run(o, inputs).await.map(Some),
            _ => Ok(None),
        }
    })?;
    let inference_ms = start.elapsed().as_secs_f64() * 1000.0;
    let load_ms = [&Some(c_session), &o_session]
        .into_iter()
        .flatten()
        .filter_map(|s: &Session| s.load_ms)
        .reduce(f64::max);

    let mut response = respond(reply_format, id, c_out.outputs, o_out.map(|o| o.outputs))?;
    let h = response.headers_mut();
    h.insert("x-inference-ms", ms_header(inference_ms));
    if let Some(ms) = load_ms {
        h.insert("x-inference-load-ms", ms_header(ms));
    }
    Ok(response)
}

/// The outputs in the form the client asked for; with the original's (`o_out`), those and the
/// difference.
fn respond(format: Format, id: Uuid, c_out: Vec<Tensor>, o_out: Option<Vec<Tensor>>) -> ApiResult<Response> {
    let difference = o_out.as_ref().map(|o| differences(&c_out, o));
    Ok(match format {
        Format::Json => {
            let mut text = format!(r#"{{"job_id":"{id}","outputs":{}"#, tensors::outputs_json(&c_out));
            if let (Some(o), Some(d)) = (&o_out, &difference) {
                let d = serde_json::to_string(d).map_err(|e| ApiError::Internal(e.into()))?;
                text.push_str(&format!(
                    r#","original":{{"outputs":{}}},"difference":{d}"#,
                    tensors::outputs_json(o)
                ));
            }
            text.push('}');
            ([(header::CONTENT_TYPE, "application/json")], text).into_response()
        }
        Format::Npz => {
            let mut parts: Vec<(&str, &[Tensor])> = vec![("", &c_out)];
            if let Some(o) = &o_out {
                parts.push(("original.", o));
            }
            let bytes = tensors::to_npz(&parts).map_err(|e| ApiError::Internal(e.into()))?;
            let mut r = ([(header::CONTENT_TYPE, NPZ_TYPE)], bytes).into_response();
            if let Some(d) = &difference {
                let d = serde_json::to_string(d).map_err(|e| ApiError::Internal(e.into()))?;
                // Output names outside visible ASCII cannot travel in a header; the JSON form has them.
                if let Ok(v) = HeaderValue::from_str(&d) {
                    r.headers_mut().insert("x-inference-difference", v);
                }
            }
            r
        }
    })
}

fn ms_header(ms: f64) -> HeaderValue {
    HeaderValue::from_str(&format!("{ms:.3}")).expect("a number is a valid header")
}

/// Only a job that succeeded has a model to run.
fn finished(job: &JobRow) -> ApiResult<()> {
    match job.state {
        JobState::Succeeded => Ok(()),
        s if !s.is_terminal() => Err(ApiError::Conflict {
            code: "job_not_finished",
            message: format!("the job is {}; its model can be run once the job succeeds", s.as_str()),
        }),
        s => Err(ApiError::Conflict {
            code: "job_not_succeeded",
            message: format!("the job {} and produced no model to run", s.as_str()),
        }),
    }
}

/// The reply format: the first of `Accept`'s types we can produce (JSON when none is given).
fn accepted(headers: &HeaderMap) -> ApiResult<Format> {
    let Some(accept) = headers.get(header::ACCEPT) else {
        return Ok(Format::Json);
    };
    let accept = accept.to_str().unwrap_or("");
    for media in accept.split(',') {
        let media = media.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
        match media.as_str() {
            "application/json" | "*/*" | "application/*" | "" => return Ok(Format::Json),
            NPZ_TYPE | "application/x-npz" => return Ok(Format::Npz),
            _ => {}
        }
    }
    Err(ApiError::NotAcceptable(format!(
        "cannot answer in {accept:?}: ask for application/json or application/octet-stream (.npz)"
    )))
}

fn content_type(headers: &HeaderMap) -> ApiResult<Format> {
    let ct = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    match ct.as_str() {
        "application/json" => Ok(Format::Json),
        NPZ_TYPE | "application/x-npz" => Ok(Format::Npz),
        _ => Err(ApiError::UnsupportedMediaType(
            "send inputs as application/json ({\"inputs\": {name: nested arrays}}) or as an .npz with \
             Content-Type: application/octet-stream"
                .into(),
        )),
    }
}

/// The job's execution provider, refused here when this server's ONNX Runtime lacks it (as job
/// submission does).
fn provider_of(state: &AppState, job: &JobRow) -> ApiResult<Provider> {
    let options = serde_json::from_value::<EvaluationOptions>(job.evaluation.0.clone())
        .unwrap_or_else(|_| EvaluationOptions::defaults(&state.config.eval));
    let provider = Provider::parse(&options.execution_provider).unwrap_or(Provider::Cpu);
    if let Ok(runtime) = state.runtime.as_ref()
        && !runtime.providers().contains(&provider)
    {
        return Err(ApiError::Unprocessable {
            code: "cuda_unavailable",
            message: format!(
                "the job ran on {} but this server's ONNX Runtime ({}) has no {} execution provider",
                provider.as_str(),
                runtime.version,
                provider.as_str()
            ),
        });
    }
    Ok(provider)
}

async fn read_body(state: &AppState, headers: &HeaderMap, body: Body) -> ApiResult<bytes::Bytes> {
    let limit = state.config.inference.max_body_bytes;
    let too_large = || {
        ApiError::PayloadTooLarge(format!(
            "the request body is larger than inference.max_body_bytes ({limit} bytes)"
        ))
    };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(too_large());
    }
    axum::body::to_bytes(body, limit).await.map_err(|_| too_large())
}

async fn compressed_model(state: &AppState, tenant: Tenant, job: &JobRow, provider: Provider) -> ApiResult<ModelRef> {
    let artifact = artifacts::get(&state.pool, tenant.0, job.id, MODEL_ARTIFACT)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("job {} has no {MODEL_ARTIFACT}", job.id)))?;
    // Keyed by content: jobs that produced the same bytes share one session.
    let name = format!("artifact-{}", artifact.sha256);
    let storage = state.storage.clone();
    let path = cached(state, &name, |dest| async move {
        storage.get_file(&artifact.storage_key, &dest).await?;
        Ok(())
    })
    .await?;
    Ok(ModelRef {
        key: format!("{name}@{}", provider.as_str()),
        path,
        provider,
    })
}

async fn original_model(state: &AppState, tenant: Tenant, job: &JobRow, provider: Provider) -> ApiResult<ModelRef> {
    let model = db_models::get(&state.pool, tenant.0, job.model_id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("the job's original model {} was deleted", job.model_id)))?;
    let name = format!("model-{}", model.id);
    let storage = state.storage.clone();
    let path = cached(state, &name, |dest| async move {
        crate::worker::fetch_model(storage.as_ref(), &model, &dest).await
    })
    .await?;
    Ok(ModelRef {
        key: format!("{name}@{}", provider.as_str()),
        path,
        provider,
    })
}

/// `<inference cache>/<name>/model.onnx`, fetched once: into a folder of its own, then renamed
/// into place, so a concurrent request never sees half a model.
async fn cached<F, Fut>(state: &AppState, name: &str, fetch: F) -> ApiResult<PathBuf>
where
    F: FnOnce(PathBuf) -> Fut,
    Fut: Future<Output = anyhow::Result<()>>,
{
    let internal = |e: std::io::Error| ApiError::Internal(e.into());
    let root = state.config.inference_cache_dir();
    let dir = root.join(name);
    let model = dir.join("model.onnx");
    if tokio::fs::try_exists(&model).await.unwrap_or(false) {
        return Ok(model);
    }
    let tmp = root.join(format!(".fetch-{}", Uuid::new_v4()));
    tokio::fs::create_dir_all(&tmp).await.map_err(internal)?;
    if let Err(e) = fetch(tmp.join("model.onnx")).await {
        let _ = tokio::fs::remove_dir_all(&tmp).await;
        return Err(ApiError::Internal(e.context("fetching the model for inference")));
    }
    if let Err(e) = tokio::fs::rename(&tmp, &dir).await {
        let _ = tokio::fs::remove_dir_all(&tmp).await;
        // Another request put the same model in place first.
        if !tokio::fs::try_exists(&model).await.unwrap_or(false) {
            return Err(internal(e));
        }
    }
    Ok(model)
}

/// Parses and checks the body against one model's inputs (off the async threads: a large body
/// is real work).
async fn parse_inputs(
    state: &AppState,
    format: Format,
    body: &bytes::Bytes,
    signature: &[Signature],
    whose: &'static str,
) -> ApiResult<Vec<Tensor>> {
    let body = body.clone();
    let signature = signature.to_vec();
    let max = state.config.inference.max_body_bytes as u64 * 4;
    tokio::task::spawn_blocking(move || -> ApiResult<Vec<Tensor>> {
        let invalid = |e: InvalidInput| ApiError::Unprocessable {
            code: "invalid_input",
            message: format!("{whose}{e}"),
        };
        match format {
            Format::Json => {
                let JsonInputs { inputs } = serde_json::from_slice(&body).map_err(|e| {
                    ApiError::InvalidJson(format!("expected {{\"inputs\": {{name: nested arrays}}}}: {e}"))
                })?;
                tensors::from_json(&signature, inputs).map_err(invalid)
            }
            Format::Npz => tensors::from_npz(&signature, &body, max).map_err(invalid),
        }
    })
    .await
    .map_err(|e| ApiError::Internal(e.into()))?
}

impl From<InferError> for ApiError {
    fn from(e: InferError) -> Self {
        let message = e.to_string();
        match e {
            InferError::Timeout { .. } | InferError::LoadTimeout { .. } => ApiError::Timeout {
                code: "inference_timeout",
                message,
            },
            InferError::WorkerGone(_) | InferError::Spawn { .. } => ApiError::Unavailable {
                code: "inference_unavailable",
                message,
            },
            InferError::Worker { code, message } => match code {
                FailureCode::ModelLoad => ApiError::Unprocessable {
                    code: "model_load_failed",
                    message: format!("ONNX Runtime cannot load the model: {message}"),
                },
                FailureCode::ProviderUnavailable => ApiError::Unprocessable {
                    code: "cuda_unavailable",
                    message,
                },
                FailureCode::Run => ApiError::Unprocessable {
                    code: "invalid_input",
                    message: format!("ONNX Runtime refused the inputs: {message}"),
                },
                FailureCode::UnsupportedOutput => ApiError::Unprocessable {
                    code: "unsupported_output",
                    message,
                },
                FailureCode::NotLoaded | FailureCode::Protocol => {
                    ApiError::Internal(anyhow::anyhow!("inference worker: {message}"))
                }
            },
        }
    }
}

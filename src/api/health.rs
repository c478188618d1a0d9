//! Liveness (`/healthz`: the process answers) and readiness (`/readyz`: it can do its work: the
//! database, the object store and ONNX Runtime answer).

use axum::Json;
use axum::extract::State;
use serde_json::{Value, json};

use super::AppState;
use super::error::{ApiError, ApiResult};

const STORE_CHECK_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

pub async fn healthz() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

pub async fn readyz(State(state): State<AppState>) -> ApiResult<Json<Value>> {
    if let Err(e) = sqlx::query("SELECT 1").execute(&state.pool).await {
        return Err(ApiError::NotReady(format!("database unreachable: {e}")));
    }
    // The S3 client retries an unreachable endpoint for minutes; a probe wants an answer now.
    let checked = tokio::time::timeout(STORE_CHECK_TIMEOUT, state.storage.check()).await;
    let failure = match checked {
        Ok(Ok(())) => None,
        Ok(Err(e)) => Some(e.to_string()),
        Err(_) => Some(format!("no answer within {} s", STORE_CHECK_TIMEOUT.as_secs())),
    };
    if let Some(why) = failure {
        return Err(ApiError::NotReady(format!(
            "object store {} unavailable: {why}",
            state.storage.describe()
        )));
    }
    let runtime = state
        .runtime
        .as_ref()
        .as_ref()
        .map_err(|e| ApiError::NotReady(format!("ONNX Runtime not loaded: {e}")))?;
    Ok(Json(json!({
        "status": "ready",
        "database": "ok",
        "storage": "ok",
        "onnxruntime": {"version": runtime.version, "library": runtime.library},
    })))
}

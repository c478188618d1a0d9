//! Liveness (`/healthz`: the process answers) and readiness (`/readyz`: it can do its work: the
//! database, the object store and ONNX Runtime answer).

use axum::Json;
use axum::extract::State;
use serde_json::{Value, json};

use super::AppState;
use super::error::{ApiError, ApiResult};

pub async fn healthz() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

pub async fn readyz(State(state): State<AppState>) -> ApiResult<Json<Value>> {
    if let Err(e) = sqlx::query("SELECT 1").execute(&state.pool).await {
        return Err(ApiError::NotReady(format!("database unreachable: {e}")));
    }
    if let Err(e) = state.storage.check().await {
        return Err(ApiError::NotReady(format!(
            "object store {} unavailable: {e}",
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

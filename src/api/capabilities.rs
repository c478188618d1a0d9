//! `GET /v1/capabilities`: what this server can measure on, so clients (and the advisor) know which
//! providers and CPU features are really there before they ask for a job.

use axum::Json;
use axum::extract::State;
use serde_json::{Value, json};

use super::AppState;

pub async fn capabilities(State(state): State<AppState>) -> Json<Value> {
    let (onnxruntime, providers) = match state.runtime.as_ref() {
        Ok(rt) => (
            json!({"loaded": true, "version": rt.version}),
            rt.providers().iter().map(|p| p.as_str()).collect::<Vec<_>>(),
        ),
        Err(e) => (json!({"loaded": false, "error": e}), Vec::new()),
    };
    Json(json!({
        "onnxruntime": onnxruntime,
        "execution_providers": providers,
        "default_execution_provider": state.config.eval.execution_provider,
        "cpu": {
            "model": crate::pipeline::cpu_model(),
            "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
            "arch": std::env::consts::ARCH,
            "features": cpu_features(),
        },
        "threads": {"intra_op": state.config.eval.threads},
        "limits": {
            "max_model_bytes": state.config.limits.max_model_bytes,
            "max_dataset_bytes": state.config.limits.max_dataset_bytes,
            "max_job_timeout_s": state.config.worker.max_job_timeout_s,
            "job_memory_limit_mb": state.config.worker.job_memory_limit_mb,
        },
    }))
}

/// The instruction-set extensions ONNX Runtime's quantized and fp16 kernels depend on.
fn cpu_features() -> Value {
    #[cfg(target_arch = "x86_64")]
    {
        json!({
            "avx2": std::arch::is_x86_feature_detected!("avx2"),
            "fma": std::arch::is_x86_feature_detected!("fma"),
            "f16c": std::arch::is_x86_feature_detected!("f16c"),
            "avx512f": std::arch::is_x86_feature_detected!("avx512f"),
            "avx512bw": std::arch::is_x86_feature_detected!("avx512bw"),
            "avx512_vnni": std::arch::is_x86_feature_detected!("avx512vnni"),
            "avx_vnni": std::arch::is_x86_feature_detected!("avxvnni"),
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        json!({})
    }
}

//! The report a job leaves behind (`report.json`). The schema is versioned and grows by adding
//! fields; clients ignore fields they do not know.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::compress::Recipe;
use crate::eval::fidelity::Fidelity;
use crate::eval::inputs::EvaluatedInput;
use crate::eval::latency::Latency;

pub const SCHEMA_VERSION: u32 = 1;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report {
    pub schema_version: u32,
    pub job_id: Option<Uuid>,
    pub created_at: chrono::DateTime<chrono::Utc>,
    pub recipe: Recipe,
    pub environment: Environment,
    pub inputs: Vec<EvaluatedInput>,
    pub original: Measurement,
    pub result: Measurement,
    pub passes: Vec<PassRecord>,
    pub warnings: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Environment {
    pub onnxruntime_version: String,
    pub execution_provider: String,
    pub intra_op_threads: usize,
    pub warmup_runs: usize,
    pub timed_runs: usize,
    /// Where the evaluation inputs came from: `synthetic` until datasets exist.
    pub inputs: String,
    pub seed: u64,
    pub batch_size: i64,
    pub dynamic_dim_default: i64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Measurement {
    pub size_bytes: u64,
    pub parameters: u64,
    pub latency: Latency,
    /// Against the original's outputs on the same inputs; for the original itself, a second run
    /// against the first (the noise floor).
    pub fidelity: Fidelity,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PassRecord {
    pub pass: String,
    pub duration_ms: f64,
    pub notes: Vec<String>,
}

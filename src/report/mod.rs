//! The report a job leaves behind (`report.json`). The schema is versioned and grows by adding
//! fields; clients ignore fields they do not know.

mod advisor_html;
pub mod html;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::compress::Recipe;
use crate::eval::dataset::Task;
use crate::eval::fidelity::Fidelity;
use crate::eval::inputs::EvaluatedInput;
use crate::eval::latency::Latency;
use crate::eval::metrics::{Classification, Regression};

/// 2 added `advisor` (goal jobs), `latency.p95_ms` and the per-weight `passes[].layers` of the
/// parameter-removing passes (all optional).
pub const SCHEMA_VERSION: u32 = 2;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report {
    pub schema_version: u32,
    pub job_id: Option<Uuid>,
    pub created_at: chrono::DateTime<chrono::Utc>,
    pub recipe: Recipe,
    pub environment: Environment,
    pub evaluation: Evaluation,
    /// The concrete shape of every input in the latency runs (batch of one).
    pub inputs: Vec<EvaluatedInput>,
    pub original: Measurement,
    pub result: Measurement,
    /// The headline task metric before and after, with bootstrap 95% intervals (tasks with labels).
    pub comparison: Option<Comparison>,
    pub passes: Vec<PassRecord>,
    pub warnings: Vec<String>,
    /// Goal jobs only: the search, its candidates and the decision (schema 2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub advisor: Option<Box<crate::advisor::AdvisorReport>>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Environment {
    pub onnxruntime_version: String,
    pub execution_provider: String,
    pub cpu_model: String,
    pub intra_op_threads: usize,
    pub warmup_runs: usize,
    pub timed_runs: usize,
    /// Where the inputs came from: `dataset` or `synthetic` (kept here for schema-1 readers).
    pub inputs: String,
    pub seed: u64,
    pub batch_size: i64,
    pub dynamic_dim_default: i64,
    /// Peak resident memory of the job process (both models loaded and evaluated).
    pub peak_memory_bytes: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Evaluation {
    /// `dataset` or `synthetic`.
    pub inputs: String,
    pub task: Task,
    /// True when there are no labels to score: the metrics are fidelity only.
    pub fidelity_only: bool,
    pub dataset_samples: u64,
    pub evaluation_samples: u64,
    /// Samples set aside for calibrating passes, never evaluated (0 when no pass calibrates).
    pub calibration_samples: u64,
    pub label_key: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Measurement {
    pub size_bytes: u64,
    /// Size after zstd (level 3): what the model costs to ship when compressed in transit.
    pub compressed_size_bytes: u64,
    pub parameters: u64,
    /// Share of stored floating-point weights that are exactly zero.
    pub sparsity: f64,
    /// Batch of one.
    pub latency: Latency,
    /// At `eval.latency_batch_size`, when every input's first axis is dynamic.
    pub latency_batched: Option<BatchedLatency>,
    /// Against the original's outputs on the same inputs; for the original itself, a second run
    /// against the first (the noise floor).
    pub fidelity: Fidelity,
    pub metrics: Option<TaskMetrics>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BatchedLatency {
    pub batch_size: i64,
    pub latency: Latency,
    pub throughput_per_s: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "task", rename_all = "snake_case")]
pub enum TaskMetrics {
    Classification(Classification),
    Regression(Regression),
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Comparison {
    /// `accuracy` for classification, `mae` for regression.
    pub metric: String,
    pub original: f64,
    pub result: f64,
    /// result - original.
    pub delta: f64,
    pub original_ci95: [f64; 2],
    pub result_ci95: [f64; 2],
    /// Paired bootstrap over the same resampled samples for both models.
    pub delta_ci95: [f64; 2],
    pub deltas: std::collections::BTreeMap<String, f64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PassRecord {
    pub pass: String,
    pub duration_ms: f64,
    pub notes: Vec<String>,
    /// What the pass did to each weight it changed (pruning, low-rank, clustering); absent for
    /// passes that keep no per-layer table. Added in schema 2, optional.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub layers: Vec<crate::compress::LayerRecord>,
}

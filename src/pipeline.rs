//! One job attempt, start to finish, with no database: apply the recipe's passes, measure the
//! original and the result the same way, write `model.onnx` and `report.json`. The worker runs this
//! in a child process (`modelpress compress --events`); the offline CLI runs it directly.

use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::Serialize;
use uuid::Uuid;

use crate::compress::{PassContext, Recipe};
use crate::config::EvalConfig;
use crate::eval::fidelity::{self, Fidelity};
use crate::eval::inputs;
use crate::eval::latency::{self, Latency};
use crate::eval::session::{OutputTensor, PreparedInputs};
use crate::eval::{Runtime, RuntimeError};
use crate::onnx::{self, ModelSummary, external};
use crate::report::{self, Environment, Measurement, PassRecord, Report};

pub const MODEL_ARTIFACT: &str = "model.onnx";
pub const REPORT_ARTIFACT: &str = "report.json";

/// A failed attempt, with the stable code the API shows in `error.code`.
#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error("{0}")]
    InvalidModel(String),
    #[error("{0}")]
    ModelLoad(String),
    #[error("pass {pass:?} failed: {message}")]
    Pass { pass: String, message: String },
    #[error("evaluation failed: {0}")]
    Evaluation(String),
    #[error("{0}")]
    Io(String),
}

impl PipelineError {
    pub fn code(&self) -> &'static str {
        match self {
            PipelineError::InvalidModel(_) => "invalid_model",
            PipelineError::ModelLoad(_) => "model_load_failed",
            PipelineError::Pass { .. } => "pass_failed",
            PipelineError::Evaluation(_) => "evaluation_failed",
            PipelineError::Io(_) => "io_error",
        }
    }

    /// Whether another attempt could succeed: only I/O trouble is transient; a model or recipe
    /// that fails once fails every time.
    pub fn retryable(&self) -> bool {
        matches!(self, PipelineError::Io(_))
    }
}

fn io(context: &str) -> impl Fn(std::io::Error) -> PipelineError + '_ {
    move |e| PipelineError::Io(format!("{context}: {e}"))
}

/// Progress callback: `(stage, percent)`.
pub type Progress<'a> = &'a mut dyn FnMut(&str, f32);

pub struct PipelineInput<'a> {
    pub runtime: &'a Runtime,
    pub model: &'a Path,
    pub recipe: &'a Recipe,
    pub out_dir: &'a Path,
    pub eval: &'a EvalConfig,
    pub job_id: Option<Uuid>,
}

pub fn run(input: PipelineInput<'_>, progress: Progress<'_>) -> Result<Report, PipelineError> {
    let PipelineInput {
        runtime,
        model,
        recipe,
        out_dir,
        eval,
        job_id,
    } = input;
    progress("load", 0.0);
    std::fs::create_dir_all(out_dir).map_err(io("creating the output folder"))?;
    let work = tempfile::tempdir_in(out_dir).map_err(io("creating scratch space"))?;
    let original = onnx::load(model).map_err(|e| PipelineError::InvalidModel(e.to_string()))?;
    let original_summary = ModelSummary::of(&original);
    let model_dir = model
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let data_files = external::check(&original, model_dir).map_err(|e| PipelineError::InvalidModel(e.to_string()))?;
    let mut original_size = size(model)?;
    for file in &data_files {
        original_size += size(&model_dir.join(file))?;
    }
    // Load in ORT before any pass runs, so "ORT cannot load this model" is reported as such.
    runtime
        .session(model, eval.threads)
        .map_err(|e| PipelineError::ModelLoad(e.to_string()))?;

    // Passes see a self-contained copy: external data is pulled into the model (and written out
    // again beside the copy only if the model would not fit in one protobuf), so a pass's output
    // never refers to files in the original's folder.
    let mut current: PathBuf = model.to_path_buf();
    if !data_files.is_empty() {
        let mut inlined = original;
        external::internalize(&mut inlined, model_dir).map_err(|e| PipelineError::InvalidModel(e.to_string()))?;
        current = work.path().join("input.onnx");
        external::save(&inlined, &current, None).map_err(|e| PipelineError::Io(e.to_string()))?;
    } else {
        drop(original);
    }
    let mut passes = Vec::new();
    let mut warnings = Vec::new();
    let steps = recipe.0.len();
    for (i, spec) in recipe.0.iter().enumerate() {
        let pass = spec.build();
        progress(&format!("pass:{}", pass.name()), 10.0 + 40.0 * i as f32 / steps as f32);
        let next = work.path().join(format!("step-{i}.onnx"));
        let ctx = PassContext {
            runtime,
            work_dir: work.path(),
        };
        let start = Instant::now();
        let out = pass.run(&current, &next, &ctx).map_err(|e| PipelineError::Pass {
            pass: pass.name().into(),
            message: e.0,
        })?;
        passes.push(PassRecord {
            pass: pass.name().into(),
            duration_ms: start.elapsed().as_secs_f64() * 1e3,
            notes: out.notes,
        });
        warnings.extend(out.warnings);
        current = next;
    }

    let result_path = out_dir.join(MODEL_ARTIFACT);
    std::fs::copy(&current, &result_path).map_err(io("writing model.onnx"))?;
    let result_summary = onnx::load(&result_path)
        .map(|m| ModelSummary::of(&m))
        .map_err(|e| PipelineError::Pass {
            pass: "recipe".into(),
            message: format!("the result is not a valid ONNX model: {e}"),
        })?;

    progress("evaluate:original", 55.0);
    let dims = inputs::DimPolicy {
        batch: eval.batch_size,
        default: eval.dynamic_dim,
        overrides: &eval.dim_overrides,
    };
    let tensors = inputs::synthetic(&original_summary.inputs, eval.seed, &dims)
        .map_err(|e| PipelineError::Evaluation(e.to_string()))?;
    let prepared = PreparedInputs::new(&tensors).map_err(|e| PipelineError::Evaluation(e.to_string()))?;
    let eval_err = |e: RuntimeError| PipelineError::Evaluation(e.to_string());

    let mut session = runtime.session(model, eval.threads).map_err(eval_err)?;
    let reference = prepared.run_and_collect(&mut session).map_err(eval_err)?;
    let original_latency =
        latency::measure(&mut session, &prepared, eval.warmup_runs, eval.timed_runs).map_err(eval_err)?;
    let again = prepared.run_and_collect(&mut session).map_err(eval_err)?;
    drop(session);
    let noise_floor = compare(&reference, &again)?;

    progress("evaluate:result", 75.0);
    let mut session = runtime
        .session(&result_path, eval.threads)
        .map_err(|e| PipelineError::Pass {
            pass: "recipe".into(),
            message: format!("ONNX Runtime cannot load the result: {e}"),
        })?;
    let produced = prepared.run_and_collect(&mut session).map_err(eval_err)?;
    let result_latency =
        latency::measure(&mut session, &prepared, eval.warmup_runs, eval.timed_runs).map_err(eval_err)?;
    drop(session);
    let result_fidelity = compare(&reference, &produced)?;
    if reference.iter().any(|o| o.values.is_none()) {
        warnings.push("some outputs are not numeric tensors; fidelity covers the numeric ones only".into());
    }

    let measurement = |size_bytes, parameters, latency: Latency, fidelity: Fidelity| Measurement {
        size_bytes,
        parameters,
        latency,
        fidelity,
    };
    let report = Report {
        schema_version: report::SCHEMA_VERSION,
        job_id,
        created_at: chrono::Utc::now(),
        recipe: recipe.clone(),
        environment: Environment {
            onnxruntime_version: runtime.version.clone(),
            execution_provider: "cpu".into(),
            intra_op_threads: eval.threads,
            warmup_runs: eval.warmup_runs,
            timed_runs: eval.timed_runs,
            inputs: "synthetic".into(),
            seed: eval.seed,
            batch_size: eval.batch_size,
            dynamic_dim_default: eval.dynamic_dim,
        },
        inputs: tensors.iter().map(|t| t.describe()).collect(),
        original: measurement(
            original_size,
            original_summary.parameters,
            original_latency,
            noise_floor,
        ),
        result: measurement(
            size(&result_path)?,
            result_summary.parameters,
            result_latency,
            result_fidelity,
        ),
        passes,
        warnings,
    };
    write_json(&out_dir.join(REPORT_ARTIFACT), &report)?;
    progress("done", 100.0);
    Ok(report)
}

fn size(p: &Path) -> Result<u64, PipelineError> {
    std::fs::metadata(p)
        .map(|m| m.len())
        .map_err(io("reading a model's size"))
}

fn compare(reference: &[OutputTensor], candidate: &[OutputTensor]) -> Result<Fidelity, PipelineError> {
    fidelity::compare(reference, candidate).map_err(|e| PipelineError::Evaluation(e.to_string()))
}

fn write_json(path: &Path, value: &impl Serialize) -> Result<(), PipelineError> {
    let bytes = serde_json::to_vec_pretty(value).map_err(|e| PipelineError::Io(e.to_string()))?;
    std::fs::write(path, bytes).map_err(io("writing report.json"))
}

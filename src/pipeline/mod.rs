//! One job attempt, start to finish, with no database: apply the recipe's passes, measure the
//! original and the result the same way, write `model.onnx` and `report.json`. The worker runs this
//! in a child process (`modelpress compress --events`); the offline CLI runs it directly.

use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::Serialize;
use uuid::Uuid;

mod evaluate;

use crate::compress::{PassContext, Recipe};
use crate::config::EvalConfig;
use crate::eval::calibration::CalibrationSet;
use crate::eval::dataset::{EvaluationOptions, Task};
use crate::eval::{LazyRuntime, Provider};
use crate::onnx::{self, ModelSummary, external};
use crate::report::{self, Environment, Measurement, PassRecord, Report};

pub const MODEL_ARTIFACT: &str = "model.onnx";
pub const REPORT_ARTIFACT: &str = "report.json";
pub const REPORT_HTML_ARTIFACT: &str = "report.html";
/// zstd of `model.onnx`, written when a pass leaves weights that compress far better than the
/// dense file shows (pruning's zeros, clustering's few distinct values).
pub const ZSTD_ARTIFACT: &str = "model.onnx.zst";

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
    #[error("{0}")]
    ProviderUnavailable(String),
    #[error("{0}")]
    NonFinite(String),
    #[error("{0}")]
    RuntimeUnavailable(String),
}

impl PipelineError {
    pub fn code(&self) -> &'static str {
        match self {
            PipelineError::InvalidModel(_) => "invalid_model",
            PipelineError::ModelLoad(_) => "model_load_failed",
            PipelineError::Pass { .. } => "pass_failed",
            PipelineError::Evaluation(_) => "evaluation_failed",
            PipelineError::Io(_) => "io_error",
            PipelineError::ProviderUnavailable(_) => "cuda_unavailable",
            PipelineError::NonFinite(_) => "non_finite_output",
            PipelineError::RuntimeUnavailable(_) => "runtime_unavailable",
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
    /// Loaded when first needed: a transform-only run of passes that run no model never loads it.
    pub runtime: &'a LazyRuntime,
    pub model: &'a Path,
    pub recipe: &'a Recipe,
    pub out_dir: &'a Path,
    pub eval: &'a EvalConfig,
    pub job_id: Option<Uuid>,
    pub options: &'a EvaluationOptions,
    /// The job's dataset (.npz), if any.
    pub dataset: Option<&'a Path>,
}

pub fn run(input: PipelineInput<'_>, progress: Progress<'_>) -> Result<Report, PipelineError> {
    let calibrating = input.options.hold_out_calibration || input.recipe.calibrates();
    let prepared = Prepared::new(&input, calibrating, &mut *progress)?;
    let result_path = input.out_dir.join(MODEL_ARTIFACT);
    let applied = prepared.apply(input.recipe, &result_path, &mut *progress, (10.0, 50.0))?;
    let mut report = prepared.measure(&result_path, applied, &mut *progress)?;
    if input.recipe.0.iter().any(|p| p.build().ships_zstd_copy()) {
        report.result.compressed_size_bytes = write_zstd(&result_path, &input.out_dir.join(ZSTD_ARTIFACT))?;
    }
    write_report(input.out_dir, &report)?;
    progress("done", 100.0);
    Ok(report)
}

/// Name of what [`transform`] writes beside `model.onnx` instead of a report.
pub const PASSES_ARTIFACT: &str = "passes.json";

/// What a transform-only run did: the passes' own records, with no measurement.
#[derive(Debug, Serialize)]
pub struct Transformed {
    pub recipe: Recipe,
    pub passes: Vec<PassRecord>,
    pub warnings: Vec<String>,
    /// Samples the calibrating passes could draw from (0 when no pass calibrates).
    pub calibration_samples: u64,
    /// Peak RSS of this process: parse, passes and write, nothing else.
    pub peak_memory_bytes: u64,
    /// Whether a pass needed ONNX Runtime (calibration, graph optimization), so that the library
    /// was loaded into this process and counts in its peak memory.
    pub onnxruntime_loaded: bool,
}

/// Runs the recipe's passes and writes `model.onnx` and `passes.json`, without loading either model
/// in ONNX Runtime to measure it: for callers that evaluate elsewhere (and for benchmarks, so a
/// pass's time and memory are its own, not those of an evaluation around it). Calibrating passes
/// still run the model in ONNX Runtime on their samples, as they must.
pub fn transform(input: PipelineInput<'_>, progress: Progress<'_>) -> Result<Transformed, PipelineError> {
    let calibrating = input.recipe.calibrates();
    let prepared = Prepared::prepare(&input, calibrating, false, &mut *progress)?;
    let result_path = input.out_dir.join(MODEL_ARTIFACT);
    let applied = prepared.apply(input.recipe, &result_path, &mut *progress, (10.0, 90.0))?;
    if input.recipe.0.iter().any(|p| p.build().ships_zstd_copy()) {
        write_zstd(&result_path, &input.out_dir.join(ZSTD_ARTIFACT))?;
    }
    let calibration_samples = prepared.calibration().map_or(0, |c| c.len() as u64);
    let transformed = Transformed {
        recipe: applied.recipe,
        passes: applied.passes,
        warnings: applied.warnings,
        calibration_samples,
        peak_memory_bytes: peak_memory_bytes(),
        onnxruntime_loaded: input.runtime.is_loaded(),
    };
    write_json(&input.out_dir.join(PASSES_ARTIFACT), &transformed)?;
    progress("done", 100.0);
    Ok(transformed)
}

/// Writes `report.json` and `report.html` into `out_dir`.
pub fn write_report(out_dir: &Path, report: &Report) -> Result<(), PipelineError> {
    write_json(&out_dir.join(REPORT_ARTIFACT), report)?;
    std::fs::write(out_dir.join(REPORT_HTML_ARTIFACT), report::html::render(report)).map_err(io("writing report.html"))
}

/// What passes left behind: the recipe they ran, their records and warnings.
pub struct Applied {
    pub recipe: Recipe,
    pub passes: Vec<PassRecord>,
    pub warnings: Vec<String>,
}

/// The original model checked, loaded once in ORT and made self-contained, with the calibration
/// set drawn: everything a recipe needs before it runs. The advisor applies many recipes to one
/// `Prepared`, so every candidate sees the same input, the same calibration samples and the same
/// evaluation split.
pub struct Prepared<'a> {
    input: &'a PipelineInput<'a>,
    work: tempfile::TempDir,
    /// A self-contained copy of the original (or the original itself when it has no external data).
    current: PathBuf,
    model_dir: PathBuf,
    data_files: std::collections::BTreeSet<String>,
    pub original_summary: ModelSummary,
    pub original_size: u64,
    calibrating: bool,
    calibration: Option<CalibrationSet>,
    steps_done: std::cell::Cell<usize>,
}

impl<'a> Prepared<'a> {
    /// `calibrating`: set aside the calibration split (and draw calibration samples) even if the
    /// first recipe does not need them, so later recipes measure on the same evaluation split.
    pub fn new(input: &'a PipelineInput<'a>, calibrating: bool, progress: Progress<'_>) -> Result<Self, PipelineError> {
        Self::prepare(input, calibrating, true, progress)
    }

    /// `load_in_ort`: check up front that ONNX Runtime loads the original (every run that measures
    /// does; a transform-only run leaves that to its caller).
    fn prepare(
        input: &'a PipelineInput<'a>,
        calibrating: bool,
        load_in_ort: bool,
        progress: Progress<'_>,
    ) -> Result<Self, PipelineError> {
        let PipelineInput {
            runtime,
            model,
            out_dir,
            eval,
            options,
            dataset,
            ..
        } = *input;
        progress("load", 0.0);
        std::fs::create_dir_all(out_dir).map_err(io("creating the output folder"))?;
        let work = tempfile::tempdir_in(out_dir).map_err(io("creating scratch space"))?;
        let original = onnx::load(model).map_err(|e| PipelineError::InvalidModel(e.to_string()))?;
        let original_summary = ModelSummary::of(&original);
        let model_dir = model
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."))
            .to_path_buf();
        let data_files =
            external::check(&original, &model_dir).map_err(|e| PipelineError::InvalidModel(e.to_string()))?;
        let mut original_size = size(model)?;
        for file in &data_files {
            original_size += size(&model_dir.join(file))?;
        }
        // Load in ORT before any pass runs, so "ORT cannot load this model" is reported as such.
        if load_in_ort {
            runtime
                .session(model, eval.threads)
                .map_err(|e| PipelineError::ModelLoad(e.to_string()))?;
        }

        // Passes see a self-contained copy: external data is pulled into the model (and written out
        // again beside the copy only if the model would not fit in one protobuf), so a pass's output
        // never refers to files in the original's folder.
        let mut current: PathBuf = model.to_path_buf();
        if !data_files.is_empty() {
            let mut inlined = original;
            external::internalize(&mut inlined, &model_dir).map_err(|e| PipelineError::InvalidModel(e.to_string()))?;
            current = work.path().join("input.onnx");
            external::save(&inlined, &current, None).map_err(|e| PipelineError::Io(e.to_string()))?;
        } else {
            drop(original);
        }
        let calibration = if calibrating {
            Some(calibration_set(
                &original_summary,
                eval,
                options,
                dataset,
                &work.path().join("calibration"),
            )?)
        } else {
            None
        };
        Ok(Prepared {
            input,
            work,
            current,
            model_dir,
            data_files,
            original_summary,
            original_size,
            calibrating,
            calibration,
            steps_done: std::cell::Cell::new(0),
        })
    }

    pub fn input(&self) -> &PipelineInput<'a> {
        self.input
    }

    /// Scratch space that lives as long as this `Prepared`.
    pub fn work_dir(&self) -> &Path {
        self.work.path()
    }

    /// The self-contained original every recipe starts from.
    pub fn original_path(&self) -> &Path {
        &self.current
    }

    pub fn calibration(&self) -> Option<&CalibrationSet> {
        self.calibration.as_ref()
    }

    /// Runs `recipe`'s passes on the original and writes the result to `result_path`; progress
    /// moves from `span.0` to `span.1` percent.
    pub fn apply(
        &self,
        recipe: &Recipe,
        result_path: &Path,
        progress: Progress<'_>,
        span: (f32, f32),
    ) -> Result<Applied, PipelineError> {
        let mut passes = Vec::new();
        let mut warnings = Vec::new();
        let steps = recipe.0.len();
        let mut current = self.current.clone();
        for (i, spec) in recipe.0.iter().enumerate() {
            let pass = spec.build();
            if pass.calibrates() && self.calibration.is_none() {
                return Err(PipelineError::Pass {
                    pass: pass.name().into(),
                    message: "this pass calibrates, but no calibration set was prepared".into(),
                });
            }
            progress(
                &format!("pass:{}", pass.name()),
                span.0 + (span.1 - span.0) * i as f32 / steps as f32,
            );
            let n = self.steps_done.get();
            self.steps_done.set(n + 1);
            let next = self.work.path().join(format!("step-{n}.onnx"));
            let ctx = PassContext {
                runtime: self.input.runtime,
                original: &self.current,
                work_dir: self.work.path(),
                calibration: self.calibration.as_ref(),
                threads: self.input.eval.threads,
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
                layers: out.layers,
            });
            warnings.extend(out.warnings);
            current = next;
        }
        std::fs::copy(&current, result_path).map_err(io("writing the result model"))?;
        Ok(Applied {
            recipe: recipe.clone(),
            passes,
            warnings,
        })
    }

    /// Measures the original and the model at `result_path` the same way and builds the report.
    pub fn measure(
        &self,
        result_path: &Path,
        applied: Applied,
        progress: Progress<'_>,
    ) -> Result<Report, PipelineError> {
        let PipelineInput {
            runtime,
            model,
            eval,
            job_id,
            options,
            dataset,
            ..
        } = *self.input;
        let runtime = runtime
            .get()
            .map_err(|e| PipelineError::RuntimeUnavailable(e.to_string()))?;
        let Applied {
            recipe,
            passes,
            mut warnings,
        } = applied;
        let original_summary = &self.original_summary;
        let original_size = self.original_size;
        let model_dir = self.model_dir.as_path();
        let result_model = onnx::load(result_path).map_err(|e| PipelineError::Pass {
            pass: "recipe".into(),
            message: format!("the result is not a valid ONNX model: {e}"),
        })?;
        let result_summary = ModelSummary::of(&result_model);
        let result_sparsity = onnx::tensor::zero_fraction(&result_model);
        drop(result_model);
        let original_sparsity = {
            let mut m = onnx::load(model).map_err(|e| PipelineError::InvalidModel(e.to_string()))?;
            external::internalize(&mut m, model_dir).map_err(|e| PipelineError::InvalidModel(e.to_string()))?;
            onnx::tensor::zero_fraction(&m)
        };

        progress("evaluate", 55.0);
        let provider = Provider::parse(&options.execution_provider).ok_or_else(|| {
            PipelineError::Evaluation(format!("unknown execution provider {:?}", options.execution_provider))
        })?;
        // A folder per measurement: the advisor measures many candidates from one `Prepared`.
        let unpacked = tempfile::tempdir_in(self.work.path()).map_err(io("creating the dataset folder"))?;
        let unpack_dir = unpacked.path().to_path_buf();
        let evaluated = evaluate::evaluate(
            evaluate::Setup {
                runtime,
                eval,
                options,
                provider,
                inputs: &original_summary.inputs,
                result_inputs: &result_summary.inputs,
                dataset: dataset.map(|d| (d, unpack_dir.as_path())),
                calibrating: self.calibrating,
            },
            model,
            result_path,
            &mut *progress,
        )?;
        warnings.extend(evaluated.warnings);
        let result_size = size(result_path)?;
        if result_size > original_size {
            warnings.push(format!(
                "the result is larger than the original ({result_size} vs {original_size} bytes)"
            ));
        }
        if let Some(w) = recipe.ordering_warning() {
            warnings.push(w);
        }
        let broken = evaluated.result.fidelity.non_finite_values;
        if broken > 0 {
            return Err(PipelineError::NonFinite(format!(
                "the result produces NaN or infinite values ({broken} of its output values where the original's are \
                 finite); it is not returned"
            )));
        }
        let (before, after) = (evaluated.original.latency.p50_ms, evaluated.result.latency.p50_ms);
        // Past 5% and past timer noise (10 µs) on models that run in microseconds.
        if after > before * 1.05 && after - before > 0.01 {
            warnings.push(format!(
                "the result is slower than the original: p50 {after:.3} ms vs {before:.3} ms at batch 1 ({:.2}x) on {} \
                 with {} thread(s)",
                after / before,
                provider.as_str(),
                eval.threads
            ));
        }

        progress("report", 95.0);
        let mut original_files: Vec<PathBuf> = vec![model.to_path_buf()];
        original_files.extend(self.data_files.iter().map(|f| model_dir.join(f)));
        let measurement = |size_bytes, compressed_size_bytes, parameters, sparsity, side: evaluate::Side| Measurement {
            size_bytes,
            compressed_size_bytes,
            parameters,
            sparsity,
            latency: side.latency,
            latency_batched: side.batched,
            fidelity: side.fidelity,
            metrics: side.metrics,
        };
        Ok(Report {
            schema_version: report::SCHEMA_VERSION,
            job_id,
            created_at: chrono::Utc::now(),
            recipe,
            environment: Environment {
                onnxruntime_version: runtime.version.clone(),
                execution_provider: provider.as_str().into(),
                cpu_model: cpu_model(),
                intra_op_threads: eval.threads,
                warmup_runs: eval.warmup_runs,
                timed_runs: eval.timed_runs,
                inputs: evaluated.evaluation.inputs.clone(),
                seed: eval.seed,
                batch_size: eval.batch_size,
                dynamic_dim_default: eval.dynamic_dim,
                peak_memory_bytes: peak_memory_bytes(),
            },
            evaluation: evaluated.evaluation,
            inputs: evaluated.inputs,
            original: measurement(
                original_size,
                zstd_size(&original_files)?,
                original_summary.parameters,
                original_sparsity,
                evaluated.original,
            ),
            result: measurement(
                result_size,
                zstd_size(&[result_path.to_path_buf()])?,
                result_summary.parameters,
                result_sparsity,
                evaluated.result,
            ),
            comparison: evaluated.comparison,
            passes,
            warnings,
            advisor: None,
        })
    }
}

/// Writes `from` compressed with zstd at the level `zstd_size` measures with, and returns the
/// size of what it wrote (the report's `compressed_size_bytes` for the result is then this file).
fn write_zstd(from: &Path, to: &Path) -> Result<u64, PipelineError> {
    let mut input = std::fs::File::open(from).map_err(io("reading model.onnx for zstd"))?;
    let file = std::fs::File::create(to).map_err(io("writing model.onnx.zst"))?;
    let mut encoder = zstd::Encoder::new(file, ZSTD_LEVEL).map_err(io("starting zstd"))?;
    std::io::copy(&mut input, &mut encoder).map_err(io("writing model.onnx.zst"))?;
    encoder.finish().map_err(io("finishing model.onnx.zst"))?;
    size(to)
}

const ZSTD_LEVEL: i32 = 3;

/// Bytes the files take compressed with zstd level 3, streamed (never read whole).
fn zstd_size(files: &[PathBuf]) -> Result<u64, PipelineError> {
    struct Count(u64);
    impl std::io::Write for Count {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0 += b.len() as u64;
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut encoder = zstd::Encoder::new(Count(0), ZSTD_LEVEL).map_err(io("starting zstd"))?;
    for f in files {
        let mut file = std::fs::File::open(f).map_err(io("reading a model for zstd"))?;
        std::io::copy(&mut file, &mut encoder).map_err(io("compressing a model"))?;
    }
    Ok(encoder.finish().map_err(io("finishing zstd"))?.0)
}

/// Peak resident set size of this program, from `VmHWM` in /proc/self/status. (getrusage's
/// ru_maxrss is inherited across fork: a job process would report its worker's peak.)
fn peak_memory_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kib| kib.parse::<u64>().ok())
        })
        .map_or(0, |kib| kib * 1024)
}

pub fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| std::env::consts::ARCH.to_string())
}

/// The samples calibrating passes see: the dataset's calibration split (the same deterministic
/// split the evaluation leaves out), or seeded synthetic inputs without a dataset.
fn calibration_set(
    summary: &ModelSummary,
    eval: &EvalConfig,
    options: &EvaluationOptions,
    dataset: Option<&Path>,
    dir: &Path,
) -> Result<CalibrationSet, PipelineError> {
    let Some(npz_path) = dataset else {
        let mut overrides = eval.dim_overrides.clone();
        overrides.extend(options.dim_overrides.iter().map(|(k, v)| (k.clone(), *v)));
        return Ok(CalibrationSet::Synthetic {
            inputs: summary.inputs.clone(),
            batch: eval.batch_size,
            default_dim: eval.dynamic_dim,
            overrides,
            seed: options.seed,
            count: 32,
        });
    };
    let bad = |e: String| PipelineError::Evaluation(format!("calibration data: {e}"));
    std::fs::create_dir_all(dir).map_err(io("creating the calibration folder"))?;
    let arrays = crate::eval::npz::unpack(npz_path, dir, u64::MAX).map_err(|e| bad(e.to_string()))?;
    let total = crate::eval::npz::sample_count(&arrays).map_err(|e| bad(e.to_string()))?;
    let feeds =
        crate::eval::dataset::check(&summary.inputs, &arrays, Task::Generic, &options.label_key).map_err(bad)?;
    let (indices, _) = crate::eval::dataset::split(total, options.calibration_fraction, options.seed);
    if indices.is_empty() {
        return Err(bad(format!(
            "the calibration split is empty (calibration_fraction {} of {total} samples)",
            options.calibration_fraction
        )));
    }
    Ok(CalibrationSet::Dataset {
        bound: Box::new(crate::eval::dataset::BoundDataset {
            order: summary.inputs.iter().map(|s| s.name.clone()).collect(),
            arrays: arrays.into_iter().map(|a| (a.name.clone(), a)).collect(),
            feeds,
        }),
        indices,
    })
}

fn size(p: &Path) -> Result<u64, PipelineError> {
    std::fs::metadata(p)
        .map(|m| m.len())
        .map_err(io("reading a model's size"))
}

fn write_json(path: &Path, value: &impl Serialize) -> Result<(), PipelineError> {
    let bytes = serde_json::to_vec_pretty(value).map_err(|e| PipelineError::Io(e.to_string()))?;
    std::fs::write(path, bytes).map_err(io("writing report.json"))
}

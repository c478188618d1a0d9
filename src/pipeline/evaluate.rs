//! Measuring the original and the result the same way: the same samples (a dataset's evaluation
//! split, or seeded synthetic inputs), the same provider and threads. Samples stream through both
//! models one at a time, so memory stays bounded whatever the dataset's size.

use std::collections::BTreeMap;
use std::path::Path;

use super::PipelineError;
use crate::config::EvalConfig;
use crate::eval::dataset::{self, BoundDataset, EvaluationOptions, Task};
use crate::eval::fidelity::{Accumulator, Fidelity};
use crate::eval::inputs::{self, DimPolicy, EvaluatedInput, InputTensor};
use crate::eval::latency::{self, Latency};
use crate::eval::metrics::{self, bootstrap_95};
use crate::eval::npz::{self, NpyArray};
use crate::eval::session::{OutputTensor, PreparedInputs};
use crate::eval::{Provider, Runtime, RuntimeError};
use crate::onnx::{Dim, TensorSignature};
use crate::report::{BatchedLatency, Comparison, Evaluation, TaskMetrics};

pub struct Setup<'a> {
    pub runtime: &'a Runtime,
    pub eval: &'a EvalConfig,
    pub options: &'a EvaluationOptions,
    pub provider: Provider,
    pub inputs: &'a [TensorSignature],
    /// The result's inputs, when a pass changed their types (float16 inputs).
    pub result_inputs: &'a [TensorSignature],
    /// The dataset file and a folder to unpack it into.
    pub dataset: Option<(&'a Path, &'a Path)>,
    /// Whether a pass of the recipe calibrates (and so gets a calibration split).
    pub calibrating: bool,
}

pub struct Side {
    pub latency: Latency,
    pub batched: Option<BatchedLatency>,
    pub fidelity: Fidelity,
    pub metrics: Option<TaskMetrics>,
}

pub struct Evaluated {
    pub inputs: Vec<EvaluatedInput>,
    pub original: Side,
    pub result: Side,
    pub evaluation: Evaluation,
    pub comparison: Option<Comparison>,
    pub warnings: Vec<String>,
}

fn eval_err(e: impl std::fmt::Display) -> PipelineError {
    PipelineError::Evaluation(e.to_string())
}

/// Where the samples come from.
enum Samples {
    Synthetic(Vec<InputTensor>),
    Dataset {
        bound: Box<BoundDataset>,
        indices: Vec<u64>,
        labels: Option<NpyArray>,
    },
}

impl Samples {
    fn len(&self) -> usize {
        match self {
            Samples::Synthetic(_) => 1,
            Samples::Dataset { indices, .. } => indices.len(),
        }
    }

    fn get(&self, k: usize) -> Result<Vec<InputTensor>, PipelineError> {
        match self {
            Samples::Synthetic(t) => Ok(t.clone()),
            Samples::Dataset { bound, indices, .. } => bound.sample(indices[k]).map_err(eval_err),
        }
    }
}

pub fn evaluate(
    setup: Setup<'_>,
    original: &Path,
    result: &Path,
    progress: &mut dyn FnMut(&str, f32),
) -> Result<Evaluated, PipelineError> {
    let Setup {
        runtime,
        eval,
        options,
        provider,
        inputs: signature,
        result_inputs,
        dataset,
        calibrating,
    } = setup;
    let mut warnings = Vec::new();
    let mut overrides = eval.dim_overrides.clone();
    overrides.extend(options.dim_overrides.iter().map(|(k, v)| (k.clone(), *v)));
    let dims = DimPolicy {
        batch: eval.batch_size,
        default: eval.dynamic_dim,
        overrides: &overrides,
    };
    let (samples, evaluation) = match dataset {
        None => {
            if options.task != Task::Generic {
                return Err(eval_err(format!("task {:?} needs a dataset with labels", options.task)));
            }
            warnings.push("no dataset: inputs are synthetic and the metrics are fidelity only".into());
            let tensors = inputs::synthetic(signature, eval.seed, &dims).map_err(eval_err)?;
            let evaluation = Evaluation {
                inputs: "synthetic".into(),
                task: Task::Generic,
                fidelity_only: true,
                dataset_samples: 0,
                evaluation_samples: 1,
                calibration_samples: 0,
                label_key: None,
            };
            (Samples::Synthetic(tensors), evaluation)
        }
        Some((npz_path, unpack_dir)) => {
            let arrays = npz::unpack(npz_path, unpack_dir, u64::MAX).map_err(eval_err)?;
            let total = npz::sample_count(&arrays).map_err(eval_err)?;
            let feeds = dataset::check(signature, &arrays, options.task, &options.label_key)
                .map_err(PipelineError::Evaluation)?;
            let fraction = if calibrating { options.calibration_fraction } else { 0.0 };
            let (calibration, indices) = dataset::split(total, fraction, options.seed);
            if indices.is_empty() {
                return Err(eval_err("the evaluation split is empty; lower calibration_fraction"));
            }
            let labels = (options.task != Task::Generic)
                .then(|| arrays.iter().find(|a| a.name == options.label_key).cloned())
                .flatten();
            let evaluation = Evaluation {
                inputs: "dataset".into(),
                task: options.task,
                fidelity_only: options.task == Task::Generic,
                dataset_samples: total,
                evaluation_samples: indices.len() as u64,
                calibration_samples: calibration.len() as u64,
                label_key: labels.as_ref().map(|l| l.name.clone()),
            };
            let bound = BoundDataset {
                order: signature.iter().map(|s| s.name.clone()).collect(),
                arrays: arrays.into_iter().map(|a| (a.name.clone(), a)).collect(),
                feeds,
            };
            let bound = Box::new(bound);
            (Samples::Dataset { bound, indices, labels }, evaluation)
        }
    };

    let load = |path: &Path, what: &str| {
        runtime.session_on(path, eval.threads, provider).map_err(|e| match e {
            RuntimeError::ProviderUnavailable(m) => PipelineError::ProviderUnavailable(m),
            other => eval_err(format!("loading the {what}: {other}")),
        })
    };
    let mut original_session = load(original, "original")?;
    let mut result_session = load(result, "result")?;

    // Every sample through both models; the first also measures the original's noise floor.
    let mut fidelity = Accumulator::default();
    let mut noise = Accumulator::default();
    let mut first_outputs: (Vec<Vec<f64>>, Vec<Vec<f64>>) = (Vec::new(), Vec::new());
    let keep_outputs = options.task != Task::Generic;
    // Samples shaped for the result: the same values in the result's input types.
    let for_result = |tensors: &[InputTensor]| -> Vec<InputTensor> {
        tensors
            .iter()
            .map(|t| {
                result_inputs
                    .iter()
                    .find(|s| s.name == t.name)
                    .and_then(|s| t.cast_to(&s.dtype))
                    .unwrap_or_else(|| t.clone())
            })
            .collect()
    };
    let n = samples.len();
    for k in 0..n {
        let tensors = samples.get(k)?;
        let prepared = PreparedInputs::new(&tensors).map_err(eval_err)?;
        let prepared_result = PreparedInputs::new(&for_result(&tensors)).map_err(eval_err)?;
        let a = prepared.run_and_collect(&mut original_session).map_err(eval_err)?;
        let b = prepared_result.run_and_collect(&mut result_session).map_err(eval_err)?;
        fidelity.add(&a, &b).map_err(eval_err)?;
        if k == 0 {
            let again = prepared.run_and_collect(&mut original_session).map_err(eval_err)?;
            noise.add(&a, &again).map_err(eval_err)?;
            if a.iter().any(|o| o.values.is_none()) {
                warnings.push("some outputs are not numeric tensors; fidelity covers the numeric ones only".into());
            }
        }
        if keep_outputs {
            first_outputs.0.push(first_output(&a));
            first_outputs.1.push(first_output(&b));
        }
        if k % 64 == 0 {
            progress("evaluate:samples", 55.0 + 25.0 * k as f32 / n as f32);
        }
    }

    progress("evaluate:latency", 80.0);
    let first = samples.get(0)?;
    let prepared = PreparedInputs::new(&first).map_err(eval_err)?;
    let latency_of = |session: &mut ort::session::Session, prepared: &PreparedInputs| {
        latency::measure(session, prepared, eval.warmup_runs, eval.timed_runs).map_err(eval_err)
    };
    let prepared_result = PreparedInputs::new(&for_result(&first)).map_err(eval_err)?;
    let original_latency = latency_of(&mut original_session, &prepared)?;
    let result_latency = latency_of(&mut result_session, &prepared_result)?;
    let batch = eval.latency_batch_size;
    let batchable = batch > 1
        && signature.iter().all(|s| {
            s.shape
                .as_ref()
                .is_some_and(|d| !matches!(d.first(), Some(Dim::Fixed(_)) | None))
        });
    let (original_batched, result_batched) = if batchable {
        let batch_dims = DimPolicy { batch, ..dims.clone() };
        let tensors = inputs::synthetic(signature, eval.seed, &batch_dims).map_err(eval_err)?;
        let batched = PreparedInputs::new(&tensors).map_err(eval_err)?;
        let batched_result = PreparedInputs::new(&for_result(&tensors)).map_err(eval_err)?;
        let measure =
            |session: &mut ort::session::Session, batched: &PreparedInputs| -> Result<BatchedLatency, PipelineError> {
                let latency = latency_of(session, batched)?;
                Ok(BatchedLatency {
                    batch_size: batch,
                    throughput_per_s: batch as f64 * 1e3 / latency.mean_ms.max(1e-9),
                    latency,
                })
            };
        (
            Some(measure(&mut original_session, &batched)?),
            Some(measure(&mut result_session, &batched_result)?),
        )
    } else {
        (None, None)
    };

    // Task metrics and the headline comparison.
    let (mut original_metrics, mut result_metrics, mut comparison) = (None, None, None);
    if let Samples::Dataset {
        indices,
        labels: Some(label_array),
        ..
    } = &samples
    {
        let labels = dataset::labels(label_array, indices).map_err(eval_err)?;
        let (a, b) = (&first_outputs.0, &first_outputs.1);
        match options.task {
            Task::Classification => {
                let classes: Vec<i64> = labels
                    .iter()
                    .map(|l| l.first().copied().unwrap_or(-1.0) as i64)
                    .collect();
                let (ma, mb) = (
                    metrics::classification(a, &classes),
                    metrics::classification(b, &classes),
                );
                let (pa, pb) = (metrics::predictions(a), metrics::predictions(b));
                let hit = |p: &[i64], i: usize| if p[i] == classes[i] { 1.0 } else { 0.0 };
                let mean = |idx: &[usize], p: &[i64]| idx.iter().map(|&i| hit(p, i)).sum::<f64>() / idx.len() as f64;
                let rounds = eval.bootstrap_rounds;
                let mut deltas = BTreeMap::new();
                deltas.insert("accuracy".into(), mb.accuracy - ma.accuracy);
                deltas.insert("f1_macro".into(), mb.f1_macro - ma.f1_macro);
                deltas.insert("precision_macro".into(), mb.precision_macro - ma.precision_macro);
                deltas.insert("recall_macro".into(), mb.recall_macro - ma.recall_macro);
                comparison = Some(Comparison {
                    metric: "accuracy".into(),
                    original: ma.accuracy,
                    result: mb.accuracy,
                    delta: mb.accuracy - ma.accuracy,
                    original_ci95: bootstrap_95(classes.len(), rounds, options.seed, |idx| mean(idx, &pa)),
                    result_ci95: bootstrap_95(classes.len(), rounds, options.seed, |idx| mean(idx, &pb)),
                    delta_ci95: bootstrap_95(classes.len(), rounds, options.seed, |idx| {
                        mean(idx, &pb) - mean(idx, &pa)
                    }),
                    deltas,
                });
                original_metrics = Some(TaskMetrics::Classification(ma));
                result_metrics = Some(TaskMetrics::Classification(mb));
            }
            Task::Regression => {
                let flat = |rows: &[Vec<f64>]| rows.iter().flatten().copied().collect::<Vec<f64>>();
                let target = flat(&labels);
                let (ra, rb) = (
                    metrics::regression(&flat(a), &target),
                    metrics::regression(&flat(b), &target),
                );
                let per_sample_abs = |rows: &[Vec<f64>]| -> Vec<f64> {
                    rows.iter()
                        .zip(&labels)
                        .map(|(p, t)| p.iter().zip(t).map(|(x, y)| (x - y).abs()).sum::<f64>() / t.len().max(1) as f64)
                        .collect()
                };
                let (ea, eb) = (per_sample_abs(a), per_sample_abs(b));
                let mean = |idx: &[usize], e: &[f64]| idx.iter().map(|&i| e[i]).sum::<f64>() / idx.len() as f64;
                let rounds = eval.bootstrap_rounds;
                let mut deltas = BTreeMap::new();
                deltas.insert("mae".into(), rb.mae - ra.mae);
                deltas.insert("rmse".into(), rb.rmse - ra.rmse);
                comparison = Some(Comparison {
                    metric: "mae".into(),
                    original: ra.mae,
                    result: rb.mae,
                    delta: rb.mae - ra.mae,
                    original_ci95: bootstrap_95(ea.len(), rounds, options.seed, |idx| mean(idx, &ea)),
                    result_ci95: bootstrap_95(eb.len(), rounds, options.seed, |idx| mean(idx, &eb)),
                    delta_ci95: bootstrap_95(ea.len(), rounds, options.seed, |idx| mean(idx, &eb) - mean(idx, &ea)),
                    deltas,
                });
                original_metrics = Some(TaskMetrics::Regression(ra));
                result_metrics = Some(TaskMetrics::Regression(rb));
            }
            Task::Generic => {}
        }
    }
    if let Some(c) = &comparison {
        let half_width = (c.delta_ci95[1] - c.delta_ci95[0]) / 2.0;
        if half_width > eval.trusted_drop {
            warnings.push(format!(
                "the evaluation set ({} samples) is too small to trust a change of {} in {}: the 95% interval of the \
                 delta is [{:.4}, {:.4}]",
                evaluation.evaluation_samples, eval.trusted_drop, c.metric, c.delta_ci95[0], c.delta_ci95[1]
            ));
        }
    }
    if let Some(TaskMetrics::Classification(m)) = &result_metrics
        && m.nan_samples > 0
    {
        warnings.push(format!("the result produced NaN scores for {} samples", m.nan_samples));
    }

    Ok(Evaluated {
        inputs: first.iter().map(|t| t.describe()).collect(),
        original: Side {
            latency: original_latency,
            batched: original_batched,
            fidelity: noise.finish(),
            metrics: original_metrics,
        },
        result: Side {
            latency: result_latency,
            batched: result_batched,
            fidelity: fidelity.finish(),
            metrics: result_metrics,
        },
        evaluation,
        comparison,
        warnings,
    })
}

/// The first output's values for one sample: class scores or regression predictions.
fn first_output(outputs: &[OutputTensor]) -> Vec<f64> {
    outputs.first().and_then(|o| o.values.clone()).unwrap_or_default()
}

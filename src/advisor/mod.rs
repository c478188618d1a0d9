//! The advisor: from the user's goal to one decision. Pre-flight rules out what cannot win, then
//! candidates are built and measured one by one on the same evaluation split (the anytime search
//! keeps every measurement, so stopping at the time budget still leaves the best so far), a
//! candidate that misses only the accuracy budget is repaired by keeping its most sensitive layers
//! in float32, and the decision picks by the objective among the feasible ones, or names the
//! nearest miss and what to relax.

pub mod decide;
pub mod goal;
pub mod preflight;
pub mod sensitivity;

use std::path::PathBuf;
use std::time::Instant;

use serde::{Deserialize, Serialize};
use serde_json::Value;

pub use goal::{Goal, Objective};

use crate::compress::Recipe;
use crate::eval::Provider;
use crate::eval::latency::Latency;
use crate::pipeline::{MODEL_ARTIFACT, PipelineError, PipelineInput, Prepared, Progress, write_report};
use crate::report::{Measurement, Report, TaskMetrics};
use preflight::{CpuFeatures, Plan, Preflight};
use sensitivity::LayerSensitivity;

/// Repair rounds per failing candidate: keep the top 1, 2, then 4 most sensitive layers in float32.
const REPAIR_STEPS: &[usize] = &[1, 2, 4];
/// Calibration samples the sensitivity ranking runs.
const SENSITIVITY_SAMPLES: usize = 32;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CandidateStatus {
    /// Meets every constraint.
    Feasible,
    /// Measured, but misses a constraint (the reasons say which).
    Infeasible,
    /// Could not be built or measured (the reasons say why).
    Failed,
}

/// How a candidate fares on the constrained metric.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MetricOutcome {
    pub name: String,
    pub original: f64,
    pub value: f64,
    /// How much worse than the original (positive = worse), in the metric's units.
    pub drop: f64,
    /// Paired-bootstrap 95% interval of `value - original`, when the evaluation computed one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delta_ci95: Option<[f64; 2]>,
}

/// One measured (or failed) candidate, as the job shows it while running and the report keeps.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CandidateRecord {
    pub id: usize,
    pub label: String,
    pub recipe: Recipe,
    /// The candidate this one repairs (by keeping layers in float32).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repair_of: Option<usize>,
    #[serde(default)]
    pub kept_float: Vec<String>,
    pub status: CandidateStatus,
    pub reasons: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size_bytes: Option<u64>,
    /// Batch-1 latency of the candidate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latency: Option<Latency>,
    /// Original p50 over candidate p50, both measured in the same run (paired, so machine noise
    /// between candidates cancels).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub speedup: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metric: Option<MetricOutcome>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cosine: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top1_agreement: Option<f64>,
    pub duration_ms: f64,
    /// Layers ranked by error contribution, worst first (only for candidates the repair loop
    /// examined).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sensitivity: Option<Vec<LayerSensitivity>>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Decision {
    pub candidate: usize,
    pub label: String,
    /// The recipe that made the chosen model: re-runnable as a plain recipe job.
    pub recipe: Recipe,
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NearestMiss {
    pub candidate: usize,
    pub label: String,
    /// Which constraint to relax, and by how much, for this candidate to qualify.
    pub advice: Vec<String>,
}

/// The advisor's section of `report.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AdvisorReport {
    pub goal: Goal,
    pub preflight: Preflight,
    /// `null` when no candidate met the constraints (see `nearest_miss`).
    pub decision: Option<Decision>,
    /// Feasible candidates other than the choice, best first by the objective.
    pub alternatives: Vec<usize>,
    /// Candidates no other beats on size, metric drop and latency at once.
    pub pareto_front: Vec<usize>,
    pub nearest_miss: Option<NearestMiss>,
    pub candidates: Vec<CandidateRecord>,
    /// Original latency (p50, ms) as the median over every paired measurement.
    pub original_p50_ms: f64,
    pub stopped_by_budget: bool,
    /// Planned candidates the budget left untried.
    pub not_tried: Vec<String>,
    /// Planned candidates skipped because one they are at least as lossy as (the same technique,
    /// coarser or with more on top) had already missed the accuracy budget.
    #[serde(default)]
    pub skipped: Vec<preflight::RuledOut>,
    pub elapsed_s: f64,
}

/// What each finished candidate is reported through (the worker shows it on the job).
pub type OnCandidate<'a> = &'a mut dyn FnMut(&CandidateRecord);

struct Measured {
    record: CandidateRecord,
    /// Kept for the final report of the chosen (or nearest) candidate.
    report: Option<Report>,
    model: PathBuf,
}

/// Runs the search for `goal` and writes `model.onnx` (the choice, if any), `report.json` and
/// `report.html` into the input's `out_dir`.
pub fn run(
    input: PipelineInput<'_>,
    goal: &Goal,
    progress: Progress<'_>,
    on_candidate: OnCandidate<'_>,
) -> Result<Report, PipelineError> {
    let started = Instant::now();
    let budget = goal.time_budget_s as f64;
    let provider = Provider::parse(&input.options.execution_provider).ok_or_else(|| {
        PipelineError::Evaluation(format!(
            "unknown execution provider {:?}",
            input.options.execution_provider
        ))
    })?;
    // Every candidate is measured on the same evaluation split, so the calibration split is set
    // aside whether or not the first candidate calibrates.
    let prepared = Prepared::new(&input, true, &mut *progress)?;
    let original =
        crate::onnx::load(prepared.original_path()).map_err(|e| PipelineError::InvalidModel(e.to_string()))?;
    let census = preflight::census(&original);
    drop(original);
    let (pre, plans) = preflight::plan(
        &census,
        prepared.original_summary.parameters,
        goal,
        provider,
        &CpuFeatures::detect(),
    );
    progress("preflight", 5.0);

    let mut measured: Vec<Measured> = Vec::new();
    let mut not_tried = Vec::new();
    let mut skipped = Vec::new();
    let mut stopped_by_budget = false;
    let task = input.options.task;
    for (i, plan) in plans.iter().enumerate() {
        // Judged on the candidates as planned, not on their repairs: a repair keeps layers in
        // float32, which says nothing of a coarser recipe on every layer.
        let missed = plan.lossier_than.iter().find(|label| {
            measured.iter().any(|m| {
                m.record.repair_of.is_none() && m.record.label == **label && decide::misses_accuracy(goal, &m.record)
            })
        });
        if let Some(missed) = missed {
            skipped.push(preflight::RuledOut {
                candidate: plan.label.clone(),
                reason: format!(
                    "{missed} already missed the accuracy budget, and this candidate is at least as lossy (the same \
                     technique, coarser or with more on top)"
                ),
            });
            continue;
        }
        let elapsed = started.elapsed().as_secs_f64();
        let mean = if measured.is_empty() {
            0.0
        } else {
            elapsed / measured.len() as f64
        };
        // The first candidate always runs, so a job ends with a measurement however small the
        // budget; later ones only when the average candidate still fits.
        if i > 0 && elapsed + mean > budget {
            stopped_by_budget = true;
            not_tried.extend(plans[i..].iter().map(|p| p.label.clone()));
            break;
        }
        progress(
            &format!("candidate {}/{}: {}", i + 1, plans.len(), plan.label),
            5.0 + 85.0 * (elapsed / budget).min(1.0) as f32,
        );
        let m = try_candidate(&prepared, measured.len(), plan, None, Vec::new(), goal, task);
        on_candidate(&m.record);
        let needs_repair = m.record.status == CandidateStatus::Infeasible
            && only_accuracy_missed(&m.record, goal)
            && repairable(&m.record.recipe);
        let base = m.record.id;
        measured.push(m);
        if needs_repair {
            repair(
                &prepared,
                &mut measured,
                base,
                goal,
                task,
                started,
                budget,
                &mut *on_candidate,
            );
        }
    }
    if measured.iter().all(|m| m.record.status == CandidateStatus::Failed) {
        let why: Vec<String> = measured
            .iter()
            .map(|m| format!("{}: {}", m.record.label, m.record.reasons.join("; ")))
            .collect();
        return Err(PipelineError::Pass {
            pass: "advisor".into(),
            message: if why.is_empty() {
                "no candidate could be tried within the time budget".into()
            } else {
                format!("no candidate could be measured ({})", why.join(" | "))
            },
        });
    }

    progress("decide", 92.0);
    let records: Vec<CandidateRecord> = measured.iter().map(|m| m.record.clone()).collect();
    let original_p50_ms = decide::median(
        measured
            .iter()
            .filter_map(|m| m.report.as_ref().map(|r| r.original.latency.p50_ms))
            .collect(),
    );
    let outcome = decide::decide(goal, &records, prepared.original_size);
    let shown = outcome
        .decision
        .as_ref()
        .map(|d| d.candidate)
        .or(outcome.nearest_miss.as_ref().map(|n| n.candidate))
        .expect("something was measured");
    let chosen = measured
        .iter_mut()
        .find(|m| m.record.id == shown)
        .expect("a known candidate");
    let mut report = chosen.report.take().expect("measured candidates keep their report");
    if outcome.decision.is_some() {
        std::fs::copy(&chosen.model, input.out_dir.join(MODEL_ARTIFACT))
            .map_err(|e| PipelineError::Io(format!("writing model.onnx: {e}")))?;
    } else {
        report.warnings.insert(
            0,
            "no candidate met the goal's constraints: no model is returned; the report's result is the nearest miss"
                .into(),
        );
    }
    if stopped_by_budget {
        report.warnings.push(format!(
            "the time budget ({}s) ran out: {} planned candidate(s) were not tried",
            goal.time_budget_s,
            not_tried.len()
        ));
    }
    report.warnings.extend(pre.notes.iter().cloned());
    report.advisor = Some(Box::new(AdvisorReport {
        goal: goal.clone(),
        preflight: pre,
        decision: outcome.decision,
        alternatives: outcome.alternatives,
        pareto_front: outcome.pareto_front,
        nearest_miss: outcome.nearest_miss,
        candidates: records,
        original_p50_ms,
        stopped_by_budget,
        not_tried,
        skipped,
        elapsed_s: started.elapsed().as_secs_f64(),
    }));
    write_report(input.out_dir, &report)?;
    progress("done", 100.0);
    Ok(report)
}

/// Builds and measures one candidate; failures become a `Failed` record, never an error.
fn try_candidate(
    prepared: &Prepared<'_>,
    id: usize,
    plan: &Plan,
    repair_of: Option<usize>,
    kept_float: Vec<String>,
    goal: &Goal,
    task: crate::eval::dataset::Task,
) -> Measured {
    let start = Instant::now();
    let model = prepared.work_dir().join(format!("candidate-{id}.onnx"));
    let mut quiet = |_: &str, _: f32| {};
    // A recipe whose passes all found nothing to do is not a candidate: it would only add a
    // duplicate of the original to the comparison, so it is not measured.
    let same_as_original = || {
        let len = |p: &std::path::Path| std::fs::metadata(p).map(|m| m.len()).ok();
        len(&model) == len(prepared.original_path())
            && matches!(
                (std::fs::read(&model), std::fs::read(prepared.original_path())),
                (Ok(a), Ok(b)) if a == b
            )
    };
    let result = prepared
        .apply(&plan.recipe, &model, &mut quiet, (0.0, 0.0))
        .and_then(|applied| {
            if same_as_original() {
                return Ok(None);
            }
            prepared.measure(&model, applied, &mut quiet).map(Some)
        });
    let mut record = CandidateRecord {
        id,
        label: plan.label.clone(),
        recipe: plan.recipe.clone(),
        repair_of,
        kept_float,
        status: CandidateStatus::Failed,
        reasons: Vec::new(),
        size_bytes: None,
        latency: None,
        speedup: None,
        metric: None,
        cosine: None,
        top1_agreement: None,
        duration_ms: 0.0,
        sensitivity: None,
    };
    let report = match result {
        Ok(None) => {
            record
                .reasons
                .push("the recipe left the model unchanged (its passes found nothing to compress)".into());
            None
        }
        Ok(Some(report)) => {
            record.size_bytes = Some(report.result.size_bytes);
            record.latency = Some(report.result.latency.clone());
            record.speedup = Some(report.original.latency.p50_ms / report.result.latency.p50_ms.max(1e-9));
            record.cosine = Some(report.result.fidelity.cosine_similarity);
            record.top1_agreement = report.result.fidelity.top1_agreement;
            let metric = goal
                .constraints
                .max_accuracy_drop
                .as_ref()
                .and_then(|d| d.metric.clone())
                .unwrap_or_else(|| goal::default_metric(task).to_string());
            match metric_outcome(&report, &metric) {
                Ok(m) => {
                    record.metric = Some(m);
                    record.reasons = decide::violations(goal, &record);
                    record.status = if record.reasons.is_empty() {
                        CandidateStatus::Feasible
                    } else {
                        CandidateStatus::Infeasible
                    };
                }
                Err(why) => record.reasons.push(why),
            }
            Some(report)
        }
        Err(e) => {
            record.reasons.push(format!("{} ({})", e, e.code()));
            None
        }
    };
    record.duration_ms = start.elapsed().as_secs_f64() * 1e3;
    Measured { record, report, model }
}

/// The constrained metric of the candidate against the original.
fn metric_outcome(report: &Report, metric: &str) -> Result<MetricOutcome, String> {
    let higher = goal::higher_is_better(metric).ok_or_else(|| format!("unknown metric {metric:?}"))?;
    let task_value = |m: &Measurement| -> Option<f64> {
        match (&m.metrics, metric) {
            (Some(TaskMetrics::Classification(c)), "accuracy") => Some(c.accuracy),
            (Some(TaskMetrics::Classification(c)), "f1_macro") => Some(c.f1_macro),
            (Some(TaskMetrics::Classification(c)), "precision_macro") => Some(c.precision_macro),
            (Some(TaskMetrics::Classification(c)), "recall_macro") => Some(c.recall_macro),
            (Some(TaskMetrics::Regression(r)), "mae") => Some(r.mae),
            (Some(TaskMetrics::Regression(r)), "rmse") => Some(r.rmse),
            _ => None,
        }
    };
    let (original, value) = match metric {
        // Fidelity is measured against the original's own outputs, so the original scores 1.
        "cosine" => (1.0, report.result.fidelity.cosine_similarity),
        "top1_agreement" => (
            1.0,
            report
                .result
                .fidelity
                .top1_agreement
                .ok_or_else(|| "top1_agreement needs an output with more than one score per sample".to_string())?,
        ),
        _ => (
            task_value(&report.original).ok_or_else(|| format!("the evaluation computed no {metric}"))?,
            task_value(&report.result).ok_or_else(|| format!("the evaluation computed no {metric}"))?,
        ),
    };
    if !value.is_finite() {
        return Err(format!("{metric} of the candidate is not a finite number"));
    }
    let delta_ci95 = report
        .comparison
        .as_ref()
        .filter(|c| c.metric == metric)
        .map(|c| c.delta_ci95);
    Ok(MetricOutcome {
        name: metric.into(),
        original,
        value,
        drop: if higher { original - value } else { value - original },
        delta_ci95,
    })
}

fn only_accuracy_missed(record: &CandidateRecord, goal: &Goal) -> bool {
    let mut only_accuracy = record.clone();
    only_accuracy.metric = None;
    goal.constraints.max_accuracy_drop.is_some() && decide::violations(goal, &only_accuracy).is_empty()
}

/// Whether some pass of the recipe can leave named nodes alone.
fn repairable(recipe: &Recipe) -> bool {
    serde_json::to_value(recipe)
        .ok()
        .and_then(|v| v.as_array().cloned())
        .is_some_and(|steps| {
            steps
                .iter()
                .filter(|s| s.get("pass").and_then(Value::as_str) != Some("reconstruct"))
                .any(|s| s.get("exclude_nodes").is_some() || s.get("node_block_list").is_some())
        })
}

/// `recipe` with `nodes` excluded from every pass that takes exclusions.
fn excluding(recipe: &Recipe, nodes: &[String]) -> Option<Recipe> {
    let mut steps = serde_json::to_value(recipe).ok()?;
    // `reconstruct` re-fits layers: leaving one out would not keep it in float, only unrepaired.
    for step in steps
        .as_array_mut()?
        .iter_mut()
        .filter(|s| s.get("pass").and_then(Value::as_str) != Some("reconstruct"))
    {
        for key in ["exclude_nodes", "node_block_list"] {
            if let Some(Value::Array(list)) = step.get_mut(key) {
                for n in nodes {
                    if !list.iter().any(|v| v.as_str() == Some(n)) {
                        list.push(Value::String(n.clone()));
                    }
                }
            }
        }
    }
    Recipe::parse(&steps).ok()
}

/// Keeps the most sensitive layers of candidate `base` in float32, more each round, while the
/// metric improves and the constraint is still missed.
#[allow(clippy::too_many_arguments)]
fn repair(
    prepared: &Prepared<'_>,
    measured: &mut Vec<Measured>,
    base: usize,
    goal: &Goal,
    task: crate::eval::dataset::Task,
    started: Instant,
    budget: f64,
    on_candidate: OnCandidate<'_>,
) {
    let Some(calibration) = prepared.calibration() else {
        return;
    };
    let input = prepared.input();
    let base_model = measured[base].model.clone();
    let ranked = match sensitivity::rank(
        input.runtime,
        input.eval.threads,
        prepared.original_path(),
        &base_model,
        calibration,
        SENSITIVITY_SAMPLES,
        prepared.work_dir(),
    ) {
        Ok(r) => r,
        Err(e) => {
            measured[base]
                .record
                .reasons
                .push(format!("sensitivity analysis failed: {e}"));
            return;
        }
    };
    measured[base].record.sensitivity = Some(ranked.iter().take(20).cloned().collect());
    on_candidate(&measured[base].record);
    let mut best_drop = measured[base].record.metric.as_ref().map_or(f64::INFINITY, |m| m.drop);
    let base_plan = Plan {
        label: measured[base].record.label.clone(),
        recipe: measured[base].record.recipe.clone(),
        lossier_than: Vec::new(),
    };
    let mut previous = 0;
    for &k in REPAIR_STEPS {
        let k = k.min(ranked.len());
        if k == previous || started.elapsed().as_secs_f64() >= budget {
            break;
        }
        previous = k;
        let kept: Vec<String> = ranked[..k].iter().map(|l| l.node.clone()).collect();
        let Some(recipe) = excluding(&base_plan.recipe, &kept) else {
            break;
        };
        let plan = Plan {
            label: format!(
                "{} with {k} layer{} kept in float32",
                base_plan.label,
                if k == 1 { "" } else { "s" }
            ),
            recipe,
            lossier_than: Vec::new(),
        };
        let m = try_candidate(prepared, measured.len(), &plan, Some(base), kept, goal, task);
        on_candidate(&m.record);
        let status = m.record.status;
        let drop = m.record.metric.as_ref().map_or(f64::INFINITY, |x| x.drop);
        measured.push(m);
        if status == CandidateStatus::Feasible || status == CandidateStatus::Failed || drop >= best_drop {
            break;
        }
        best_drop = drop;
    }
}

/// A goal given as JSON text (`modelpress compress --goal`).
pub fn parse_goal_arg(text: &str, task: crate::eval::dataset::Task) -> Result<Goal, String> {
    let value: Value = serde_json::from_str(text).map_err(|e| format!("goal is not JSON: {e}"))?;
    Goal::parse(&value, task)
}

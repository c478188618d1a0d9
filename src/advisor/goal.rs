//! What the user asks of the advisor: an objective, constraints, a provider and a time budget.
//! Parsed strictly (unknown fields are errors) because a misspelt constraint silently ignored
//! would return a model that breaks the user's real requirement.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::eval::dataset::Task;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Goal {
    pub objective: Objective,
    #[serde(default)]
    pub constraints: Constraints,
    /// Defaults to the job's (and then the server's) execution provider.
    #[serde(default)]
    pub execution_provider: Option<String>,
    #[serde(default = "default_budget")]
    pub time_budget_s: u64,
}

fn default_budget() -> u64 {
    600
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Objective {
    Smallest,
    Fastest,
    MostAccurate,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Constraints {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_accuracy_drop: Option<AccuracyDrop>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_size_bytes: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_latency_ms: Option<LatencyLimit>,
}

/// The largest acceptable loss in `metric`, in the metric's units (`absolute`) or as a share of
/// the original's value (`relative`). Exactly one of the two.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccuracyDrop {
    /// Filled in from the task when the user leaves it out.
    #[serde(default)]
    pub metric: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub absolute: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub relative: Option<f64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LatencyLimit {
    #[serde(default = "default_percentile")]
    pub percentile: u32,
    pub value: f64,
}

fn default_percentile() -> u32 {
    50
}

/// Metrics a constraint may name, and whether a higher value is better.
pub const TASK_METRICS: &[(&str, bool)] = &[
    ("accuracy", true),
    ("f1_macro", true),
    ("precision_macro", true),
    ("recall_macro", true),
    ("mae", false),
    ("rmse", false),
];
pub const FIDELITY_METRICS: &[(&str, bool)] = &[("cosine", true), ("top1_agreement", true), ("snr_db", true)];

/// Whether a higher value of `metric` is better; `None` for an unknown metric.
pub fn higher_is_better(metric: &str) -> Option<bool> {
    TASK_METRICS
        .iter()
        .chain(FIDELITY_METRICS)
        .find(|(m, _)| *m == metric)
        .map(|(_, h)| *h)
}

/// The metric a constraint means when it names none: the task's headline metric, or output
/// cosine similarity when there are no labels.
pub fn default_metric(task: Task) -> &'static str {
    match task {
        Task::Classification => "accuracy",
        Task::Regression => "mae",
        Task::Generic => "cosine",
    }
}

impl Goal {
    /// Parses and checks a goal against the job's task; the metric left out is filled in, so the
    /// stored goal says exactly what will be enforced.
    pub fn parse(value: &Value, task: Task) -> Result<Goal, String> {
        let mut goal: Goal = serde_json::from_value(value.clone()).map_err(|e| format!("goal: {e}"))?;
        goal.validate(task)?;
        Ok(goal)
    }

    fn validate(&mut self, task: Task) -> Result<(), String> {
        if !(10..=86_400).contains(&self.time_budget_s) {
            return Err("goal.time_budget_s must be within 10..=86400".into());
        }
        let c = &mut self.constraints;
        if let Some(drop) = &mut c.max_accuracy_drop {
            let metric = drop
                .metric
                .get_or_insert_with(|| default_metric(task).to_string())
                .clone();
            let is_task_metric = TASK_METRICS.iter().any(|(m, _)| *m == metric);
            if higher_is_better(&metric).is_none() {
                let known: Vec<&str> = TASK_METRICS.iter().chain(FIDELITY_METRICS).map(|(m, _)| *m).collect();
                return Err(format!(
                    "goal.constraints.max_accuracy_drop.metric {metric:?} is not one of {}",
                    known.join(", ")
                ));
            }
            let regression_metric = matches!(metric.as_str(), "mae" | "rmse");
            if is_task_metric && (task == Task::Generic || regression_metric != (task == Task::Regression)) {
                return Err(format!(
                    "goal.constraints.max_accuracy_drop.metric {metric:?} needs a dataset with labels and task {}",
                    if regression_metric {
                        "regression"
                    } else {
                        "classification"
                    }
                ));
            }
            match (drop.absolute, drop.relative) {
                (Some(a), None) if a.is_finite() && a >= 0.0 => {}
                (None, Some(r)) if r.is_finite() && (0.0..=1.0).contains(&r) => {}
                (Some(_), Some(_)) | (None, None) => {
                    return Err("goal.constraints.max_accuracy_drop needs exactly one of absolute, relative".into());
                }
                _ => {
                    return Err(
                        "goal.constraints.max_accuracy_drop: absolute must be >= 0, relative within [0, 1]".into(),
                    );
                }
            }
        }
        if c.max_size_bytes == Some(0) {
            return Err("goal.constraints.max_size_bytes must be positive".into());
        }
        if let Some(l) = &c.max_latency_ms {
            if ![50, 90, 95, 99].contains(&l.percentile) {
                return Err("goal.constraints.max_latency_ms.percentile must be 50, 90, 95 or 99".into());
            }
            if !(l.value.is_finite() && l.value > 0.0) {
                return Err("goal.constraints.max_latency_ms.value must be a positive number of milliseconds".into());
            }
        }
        Ok(())
    }

    /// Whether latency decides or constrains: then a slower-than-original candidate never wins.
    pub fn cares_about_latency(&self) -> bool {
        self.objective == Objective::Fastest || self.constraints.max_latency_ms.is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_metric_defaults_by_task_and_is_stored() {
        let g = Goal::parse(
            &json!({"objective": "smallest", "constraints": {"max_accuracy_drop": {"absolute": 0.01}}}),
            Task::Classification,
        )
        .unwrap();
        assert_eq!(
            g.constraints.max_accuracy_drop.unwrap().metric.as_deref(),
            Some("accuracy")
        );
        let g = Goal::parse(
            &json!({"objective": "fastest", "constraints": {"max_accuracy_drop": {"relative": 0.02}}}),
            Task::Generic,
        )
        .unwrap();
        assert_eq!(
            g.constraints.max_accuracy_drop.unwrap().metric.as_deref(),
            Some("cosine")
        );
        assert_eq!(g.time_budget_s, 600);
    }

    #[test]
    fn bad_goals_say_what_is_wrong() {
        let cases = [
            (json!({"objective": "tiny"}), "unknown variant"),
            (json!({"objective": "smallest", "constrains": {}}), "unknown field"),
            (
                json!({"objective": "smallest", "constraints": {"max_accuracy_drop": {"metric": "f1_macro", "absolute": 0.01}}}),
                "needs a dataset with labels",
            ),
            (
                json!({"objective": "smallest", "constraints": {"max_accuracy_drop": {"metric": "bleu", "absolute": 0.01}}}),
                "not one of",
            ),
            (
                json!({"objective": "smallest", "constraints": {"max_accuracy_drop": {"absolute": 0.01, "relative": 0.1}}}),
                "exactly one",
            ),
            (
                json!({"objective": "smallest", "constraints": {"max_accuracy_drop": {"absolute": -1}}}),
                "absolute must be >= 0",
            ),
            (
                json!({"objective": "fastest", "constraints": {"max_latency_ms": {"percentile": 42, "value": 1}}}),
                "percentile must be",
            ),
            (json!({"objective": "fastest", "time_budget_s": 1}), "time_budget_s"),
        ];
        for (goal, expected) in cases {
            let err = Goal::parse(&goal, Task::Generic).unwrap_err();
            assert!(err.contains(expected), "{goal}: {err:?} lacks {expected:?}");
        }
    }
}

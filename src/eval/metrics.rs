//! Task metrics computed from per-sample outputs and labels: classification (accuracy, top-5,
//! macro/micro precision-recall-F1, per class, confusion matrix) and regression (MAE, RMSE, R²),
//! plus a paired bootstrap for confidence intervals. Conventions follow scikit-learn: a class never
//! predicted has precision 0; macro averages run over the classes seen in labels or predictions.

use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClassMetrics {
    pub class: i64,
    pub precision: f64,
    pub recall: f64,
    pub f1: f64,
    pub support: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Classification {
    pub samples: u64,
    pub accuracy: f64,
    /// Share of samples whose label is among the 5 highest scores (with at least 5 classes).
    pub top5_accuracy: Option<f64>,
    pub precision_macro: f64,
    pub recall_macro: f64,
    pub f1_macro: f64,
    /// Micro averages equal accuracy for single-label classification; kept for completeness.
    pub precision_micro: f64,
    pub recall_micro: f64,
    pub f1_micro: f64,
    pub per_class: Vec<ClassMetrics>,
    /// `confusion[true][predicted]`, over classes `0..classes`.
    pub confusion: Vec<Vec<u64>>,
    /// Samples whose scores contained NaN (their prediction is the highest non-NaN score).
    pub nan_samples: u64,
}

/// Index of the highest score, NaN ignored (`None` when all are NaN or there are none).
pub fn argmax(scores: &[f64]) -> Option<usize> {
    scores
        .iter()
        .enumerate()
        .filter(|(_, v)| !v.is_nan())
        .max_by(|a, b| a.1.total_cmp(b.1))
        .map(|(i, _)| i)
}

/// Predicted class per sample (-1 when a sample's scores are all NaN).
pub fn predictions(scores: &[Vec<f64>]) -> Vec<i64> {
    scores.iter().map(|s| argmax(s).map_or(-1, |i| i as i64)).collect()
}

pub fn classification(scores: &[Vec<f64>], labels: &[i64]) -> Classification {
    let n = labels.len().min(scores.len());
    let predicted = predictions(&scores[..n]);
    let width = scores.iter().map(Vec::len).max().unwrap_or(0);
    let max_label = labels.iter().copied().max().unwrap_or(0).max(0) as usize;
    let classes = width.max(max_label + 1);
    let mut confusion = vec![vec![0u64; classes]; classes];
    let mut correct = 0u64;
    let mut top5 = 0u64;
    for i in 0..n {
        let (t, p) = (labels[i], predicted[i]);
        if t == p {
            correct += 1;
        }
        if t >= 0 && (t as usize) < classes && p >= 0 {
            confusion[t as usize][p as usize] += 1;
        }
        if width >= 5 {
            let mut order: Vec<usize> = (0..scores[i].len()).filter(|&c| !scores[i][c].is_nan()).collect();
            order.sort_by(|&a, &b| scores[i][b].total_cmp(&scores[i][a]));
            if order.iter().take(5).any(|&c| c as i64 == t) {
                top5 += 1;
            }
        }
    }
    let mut per_class = Vec::new();
    for c in 0..classes {
        let tp = confusion[c][c];
        let support: u64 = confusion[c].iter().sum();
        let predicted_c: u64 = confusion.iter().map(|row| row[c]).sum();
        if support == 0 && predicted_c == 0 {
            continue;
        }
        let precision = ratio(tp, predicted_c);
        let recall = ratio(tp, support);
        per_class.push(ClassMetrics {
            class: c as i64,
            precision,
            recall,
            f1: f1(precision, recall),
            support,
        });
    }
    let mean = |f: fn(&ClassMetrics) -> f64| {
        if per_class.is_empty() {
            0.0
        } else {
            per_class.iter().map(f).sum::<f64>() / per_class.len() as f64
        }
    };
    let accuracy = ratio(correct, n as u64);
    Classification {
        samples: n as u64,
        accuracy,
        top5_accuracy: (width >= 5).then(|| ratio(top5, n as u64)),
        precision_macro: mean(|c| c.precision),
        recall_macro: mean(|c| c.recall),
        f1_macro: mean(|c| c.f1),
        precision_micro: accuracy,
        recall_micro: accuracy,
        f1_micro: accuracy,
        per_class,
        confusion,
        nan_samples: scores[..n].iter().filter(|s| s.iter().any(|v| v.is_nan())).count() as u64,
    }
}

fn ratio(a: u64, b: u64) -> f64 {
    if b == 0 { 0.0 } else { a as f64 / b as f64 }
}

fn f1(p: f64, r: f64) -> f64 {
    if p + r == 0.0 { 0.0 } else { 2.0 * p * r / (p + r) }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Regression {
    pub samples: u64,
    pub mae: f64,
    pub rmse: f64,
    /// `None` when the targets have no variance.
    pub r2: Option<f64>,
}

/// Predictions and targets flattened in the same order.
pub fn regression(predicted: &[f64], target: &[f64]) -> Regression {
    let n = predicted.len().min(target.len());
    let (p, t) = (&predicted[..n], &target[..n]);
    let mae = p.iter().zip(t).map(|(a, b)| (a - b).abs()).sum::<f64>() / n.max(1) as f64;
    let sse = p.iter().zip(t).map(|(a, b)| (a - b).powi(2)).sum::<f64>();
    let mean = t.iter().sum::<f64>() / n.max(1) as f64;
    let sst = t.iter().map(|b| (b - mean).powi(2)).sum::<f64>();
    Regression {
        samples: n as u64,
        mae,
        rmse: (sse / n.max(1) as f64).sqrt(),
        r2: (sst > 0.0).then(|| 1.0 - sse / sst),
    }
}

/// A 95% interval from a paired bootstrap: `statistic` is evaluated on resampled sample indices
/// (the same indices for both models when it computes a delta).
pub fn bootstrap_95(samples: usize, rounds: usize, seed: u64, statistic: impl Fn(&[usize]) -> f64) -> [f64; 2] {
    if samples == 0 {
        return [f64::NAN, f64::NAN];
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut values: Vec<f64> = (0..rounds)
        .map(|_| {
            let idx: Vec<usize> = (0..samples).map(|_| rng.random_range(0..samples)).collect();
            statistic(&idx)
        })
        .collect();
    values.sort_by(f64::total_cmp);
    let at = |q: f64| values[((q * (rounds - 1) as f64).round() as usize).min(rounds - 1)];
    [at(0.025), at(0.975)]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one_hot(classes: usize, c: usize) -> Vec<f64> {
        (0..classes).map(|i| if i == c { 1.0 } else { 0.0 }).collect()
    }

    #[test]
    fn classification_matches_hand_computed_values() {
        // labels 0,0,1,1,2 ; predicted 0,1,1,1,0
        let scores: Vec<Vec<f64>> = [0, 1, 1, 1, 0].iter().map(|&c| one_hot(3, c)).collect();
        let m = classification(&scores, &[0, 0, 1, 1, 2]);
        assert_eq!(m.accuracy, 3.0 / 5.0);
        assert_eq!(m.confusion, vec![vec![1, 1, 0], vec![0, 2, 0], vec![1, 0, 0]]);
        let c0 = &m.per_class[0];
        assert_eq!((c0.precision, c0.recall, c0.support), (0.5, 0.5, 2));
        let c1 = &m.per_class[1];
        assert_eq!((c1.precision, c1.recall), (2.0 / 3.0, 1.0));
        // Class 2 is never predicted: precision 0, recall 0, f1 0.
        let c2 = &m.per_class[2];
        assert_eq!((c2.precision, c2.recall, c2.f1), (0.0, 0.0, 0.0));
        assert!((m.f1_macro - (0.5 + 0.8 + 0.0) / 3.0).abs() < 1e-12);
        assert_eq!(m.f1_micro, m.accuracy);
        assert_eq!(m.top5_accuracy, None, "fewer than 5 classes");
    }

    #[test]
    fn one_sample_nan_scores_and_top5_are_handled() {
        let m = classification(&[vec![0.1, 0.9]], &[1]);
        assert_eq!((m.accuracy, m.f1_macro), (1.0, 1.0));
        let m = classification(&[vec![f64::NAN, 0.2, 0.1]], &[1]);
        assert_eq!((m.accuracy, m.nan_samples), (1.0, 1));
        let all_nan = classification(&[vec![f64::NAN, f64::NAN]], &[0]);
        assert_eq!(all_nan.accuracy, 0.0);
        // Label 6 is the 6th best score: outside the top 5.
        let scores = vec![vec![7.0, 6.0, 5.0, 4.0, 3.0, 0.0, 2.0, 1.0]];
        assert_eq!(classification(&scores, &[6]).top5_accuracy, Some(0.0));
        assert_eq!(classification(&scores, &[4]).top5_accuracy, Some(1.0));
    }

    #[test]
    fn regression_matches_hand_computed_values() {
        let r = regression(&[1.0, 2.0, 4.0], &[1.0, 3.0, 5.0]);
        assert!((r.mae - 2.0 / 3.0).abs() < 1e-12);
        assert!((r.rmse - (2.0f64 / 3.0).sqrt()).abs() < 1e-12);
        // sst = (1-3)^2 + 0 + (5-3)^2 = 8; sse = 2
        assert!((r.r2.unwrap() - 0.75).abs() < 1e-12);
        assert_eq!(regression(&[1.0], &[2.0]).r2, None);
    }

    #[test]
    fn the_bootstrap_interval_brackets_the_statistic_and_repeats() {
        let hits: Vec<f64> = (0..200).map(|i| if i % 4 == 0 { 0.0 } else { 1.0 }).collect();
        let mean = |idx: &[usize]| idx.iter().map(|&i| hits[i]).sum::<f64>() / idx.len() as f64;
        let ci = bootstrap_95(hits.len(), 500, 7, mean);
        assert!(ci[0] < 0.75 && 0.75 < ci[1] && ci[1] - ci[0] < 0.2, "{ci:?}");
        assert_eq!(ci, bootstrap_95(hits.len(), 500, 7, mean));
    }
}

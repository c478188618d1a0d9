//! How closely a candidate's outputs follow the original's on the same inputs.

use serde::{Deserialize, Serialize};

use super::session::OutputTensor;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OutputFidelity {
    pub name: String,
    pub max_abs_error: f64,
    pub mean_abs_error: f64,
    pub cosine_similarity: f64,
    /// Signal-to-noise ratio of the candidate against the reference, in dB; `None` when the
    /// outputs are identical (infinite SNR).
    pub snr_db: Option<f64>,
}

/// The worst output decides the headline figures: the largest error, the lowest similarity.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Fidelity {
    pub max_abs_error: f64,
    pub mean_abs_error: f64,
    pub cosine_similarity: f64,
    pub snr_db: Option<f64>,
    /// Share of samples whose highest-scoring element (argmax) of the first output is unchanged,
    /// for outputs with more than one element per sample; set by the evaluation.
    pub top1_agreement: Option<f64>,
    /// NaN or infinite values the candidate produced where the reference's were finite.
    #[serde(default)]
    pub non_finite_values: u64,
    pub outputs: Vec<OutputFidelity>,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum FidelityError {
    #[error("the candidate has no output named {0:?}")]
    MissingOutput(String),
    #[error("output {name:?} has shape {candidate:?}, the original {reference:?}")]
    ShapeMismatch {
        name: String,
        reference: Vec<i64>,
        candidate: Vec<i64>,
    },
}

/// One output's running sums across samples.
#[derive(Debug, Clone, Default)]
struct Sums {
    max_abs: f64,
    sum_abs: f64,
    dot: f64,
    ref_sq: f64,
    cand_sq: f64,
    noise: f64,
    count: u64,
    nan: bool,
}

/// Fidelity accumulated sample by sample, so evaluating a large dataset never holds every output
/// in memory. Also counts argmax agreement of the first output.
#[derive(Debug, Default)]
pub struct Accumulator {
    outputs: Vec<(String, Sums)>,
    top1: (u64, u64),
    non_finite: u64,
}

impl Accumulator {
    /// Adds one sample's outputs; errors when the candidate lacks an output or changed a shape.
    pub fn add(&mut self, reference: &[OutputTensor], candidate: &[OutputTensor]) -> Result<(), FidelityError> {
        for (k, r) in reference.iter().enumerate() {
            let c = candidate
                .iter()
                .find(|c| c.name == r.name)
                .ok_or_else(|| FidelityError::MissingOutput(r.name.clone()))?;
            if c.shape != r.shape {
                return Err(FidelityError::ShapeMismatch {
                    name: r.name.clone(),
                    reference: r.shape.clone(),
                    candidate: c.shape.clone(),
                });
            }
            let (Some(a), Some(b)) = (&r.values, &c.values) else {
                continue;
            };
            if k == 0 && a.len() > 1 {
                self.top1.1 += 1;
                if super::metrics::argmax(a) == super::metrics::argmax(b) {
                    self.top1.0 += 1;
                }
            }
            let slot = match self.outputs.iter().position(|(n, _)| *n == r.name) {
                Some(i) => i,
                None => {
                    self.outputs.push((r.name.clone(), Sums::default()));
                    self.outputs.len() - 1
                }
            };
            let sums = &mut self.outputs[slot].1;
            for (x, y) in a.iter().zip(b) {
                if x.is_finite() && !y.is_finite() {
                    self.non_finite += 1;
                }
                let d = (x - y).abs();
                sums.nan |= d.is_nan();
                sums.max_abs = sums.max_abs.max(d);
                sums.sum_abs += d;
                sums.noise += d * d;
                sums.dot += x * y;
                sums.ref_sq += x * x;
                sums.cand_sq += y * y;
                sums.count += 1;
            }
        }
        Ok(())
    }

    pub fn finish(self) -> Fidelity {
        let outputs: Vec<OutputFidelity> = self.outputs.iter().map(|(name, s)| output_fidelity(name, s)).collect();
        let worst = |f: fn(&OutputFidelity) -> f64, max: bool| {
            outputs.iter().map(f).fold(None, |acc: Option<f64>, v| {
                Some(match acc {
                    None => v,
                    // NaN wins both ways: a NaN anywhere must show in the headline, not be hidden.
                    Some(a) if a.is_nan() || v.is_nan() => f64::NAN,
                    Some(a) if max => a.max(v),
                    Some(a) => a.min(v),
                })
            })
        };
        Fidelity {
            max_abs_error: worst(|o| o.max_abs_error, true).unwrap_or(0.0),
            mean_abs_error: worst(|o| o.mean_abs_error, true).unwrap_or(0.0),
            cosine_similarity: worst(|o| o.cosine_similarity, false).unwrap_or(1.0),
            snr_db: outputs
                .iter()
                .filter_map(|o| o.snr_db)
                .fold(None, |acc: Option<f64>, v| Some(acc.map_or(v, |a| a.min(v)))),
            top1_agreement: (self.top1.1 > 0).then(|| self.top1.0 as f64 / self.top1.1 as f64),
            non_finite_values: self.non_finite,
            outputs,
        }
    }
}

/// Fidelity of one run against another.
pub fn compare(reference: &[OutputTensor], candidate: &[OutputTensor]) -> Result<Fidelity, FidelityError> {
    let mut acc = Accumulator::default();
    acc.add(reference, candidate)?;
    Ok(acc.finish())
}

fn output_fidelity(name: &str, s: &Sums) -> OutputFidelity {
    let cosine = if s.ref_sq == 0.0 && s.cand_sq == 0.0 {
        1.0
    } else if s.ref_sq == 0.0 || s.cand_sq == 0.0 {
        0.0
    } else {
        // Rounding can push the ratio a hair past ±1.
        (s.dot / (s.ref_sq.sqrt() * s.cand_sq.sqrt())).clamp(-1.0, 1.0)
    };
    OutputFidelity {
        name: name.to_string(),
        max_abs_error: if s.nan { f64::NAN } else { s.max_abs },
        mean_abs_error: s.sum_abs / s.count.max(1) as f64,
        cosine_similarity: cosine,
        snr_db: if s.noise == 0.0 {
            None
        } else if s.ref_sq == 0.0 {
            Some(f64::NEG_INFINITY)
        } else {
            Some(10.0 * (s.ref_sq / s.noise).log10())
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn out(name: &str, values: &[f64]) -> OutputTensor {
        OutputTensor {
            name: name.into(),
            shape: vec![values.len() as i64],
            values: Some(values.to_vec()),
        }
    }

    #[test]
    fn identical_outputs_have_zero_error_and_unit_cosine() {
        let f = compare(&[out("y", &[1.0, -2.0, 3.0])], &[out("y", &[1.0, -2.0, 3.0])]).unwrap();
        assert_eq!(
            (f.max_abs_error, f.mean_abs_error, f.cosine_similarity),
            (0.0, 0.0, 1.0)
        );
        assert_eq!(f.snr_db, None, "identical outputs have infinite SNR");
    }

    #[test]
    fn errors_and_cosine_match_hand_computed_values() {
        let f = compare(
            &[out("y", &[1.0, 0.0]), out("z", &[2.0])],
            &[out("z", &[2.5]), out("y", &[0.0, 1.0])],
        )
        .unwrap();
        assert_eq!(f.outputs[0].max_abs_error, 1.0);
        assert_eq!(f.outputs[0].mean_abs_error, 1.0);
        assert_eq!(f.outputs[0].cosine_similarity, 0.0);
        assert_eq!(f.outputs[1].max_abs_error, 0.5);
        assert_eq!(f.max_abs_error, 1.0);
        assert_eq!(f.cosine_similarity, 0.0);
        // z: signal 4, noise 0.25 → 10·log10(16) dB.
        assert!((f.outputs[1].snr_db.unwrap() - 10.0 * 16f64.log10()).abs() < 1e-12);
        assert_eq!(f.snr_db, f.outputs[0].snr_db, "the worst output sets the headline");
    }

    #[test]
    fn accumulating_samples_equals_comparing_them_at_once_and_counts_argmax_agreement() {
        let mut acc = Accumulator::default();
        acc.add(&[out("y", &[1.0, 0.0])], &[out("y", &[0.9, 0.2])]).unwrap();
        acc.add(&[out("y", &[0.0, 1.0])], &[out("y", &[0.6, 0.4])]).unwrap();
        let f = acc.finish();
        let whole = compare(&[out("y", &[1.0, 0.0, 0.0, 1.0])], &[out("y", &[0.9, 0.2, 0.6, 0.4])]).unwrap();
        assert_eq!(f.outputs[0].max_abs_error, whole.max_abs_error);
        assert!((f.cosine_similarity - whole.cosine_similarity).abs() < 1e-12);
        assert_eq!(f.top1_agreement, Some(0.5), "the second sample's argmax flipped");
    }

    #[test]
    fn a_nan_output_is_reported_not_hidden() {
        let f = compare(&[out("y", &[1.0, 2.0])], &[out("y", &[f64::NAN, 2.0])]).unwrap();
        assert!(f.max_abs_error.is_nan());
        assert_eq!(f.non_finite_values, 1);
    }

    #[test]
    fn missing_outputs_and_shape_changes_are_errors() {
        assert_eq!(
            compare(&[out("y", &[1.0])], &[out("x", &[1.0])]),
            Err(FidelityError::MissingOutput("y".into()))
        );
        assert!(matches!(
            compare(&[out("y", &[1.0])], &[out("y", &[1.0, 2.0])]),
            Err(FidelityError::ShapeMismatch { .. })
        ));
    }
}

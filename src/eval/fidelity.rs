//! How closely a candidate's outputs follow the original's on the same inputs.

use serde::{Deserialize, Serialize};

use super::session::OutputTensor;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OutputFidelity {
    pub name: String,
    pub max_abs_error: f64,
    pub mean_abs_error: f64,
    pub cosine_similarity: f64,
}

/// The worst output decides the headline figures: the largest error, the lowest similarity.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Fidelity {
    pub max_abs_error: f64,
    pub mean_abs_error: f64,
    pub cosine_similarity: f64,
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

pub fn compare(reference: &[OutputTensor], candidate: &[OutputTensor]) -> Result<Fidelity, FidelityError> {
    let mut outputs = Vec::new();
    for r in reference {
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
        if let (Some(a), Some(b)) = (&r.values, &c.values) {
            outputs.push(output_fidelity(&r.name, a, b));
        }
    }
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
    Ok(Fidelity {
        max_abs_error: worst(|o| o.max_abs_error, true).unwrap_or(0.0),
        mean_abs_error: worst(|o| o.mean_abs_error, true).unwrap_or(0.0),
        cosine_similarity: worst(|o| o.cosine_similarity, false).unwrap_or(1.0),
        outputs,
    })
}

fn output_fidelity(name: &str, a: &[f64], b: &[f64]) -> OutputFidelity {
    let mut max_abs = 0.0f64;
    let mut sum_abs = 0.0f64;
    let (mut dot, mut na, mut nb) = (0.0f64, 0.0f64, 0.0f64);
    let mut nan = false;
    for (x, y) in a.iter().zip(b) {
        let d = (x - y).abs();
        nan |= d.is_nan();
        max_abs = max_abs.max(d);
        sum_abs += d;
        dot += x * y;
        na += x * x;
        nb += y * y;
    }
    let n = a.len().max(1) as f64;
    let cosine = if na == 0.0 && nb == 0.0 {
        1.0
    } else if na == 0.0 || nb == 0.0 {
        0.0
    } else {
        // Rounding can push the ratio a hair past ±1.
        (dot / (na.sqrt() * nb.sqrt())).clamp(-1.0, 1.0)
    };
    OutputFidelity {
        name: name.to_string(),
        max_abs_error: if nan { f64::NAN } else { max_abs },
        mean_abs_error: sum_abs / n,
        cosine_similarity: cosine,
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
    }

    #[test]
    fn a_nan_output_is_reported_not_hidden() {
        let f = compare(&[out("y", &[1.0, 2.0])], &[out("y", &[f64::NAN, 2.0])]).unwrap();
        assert!(f.max_abs_error.is_nan());
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

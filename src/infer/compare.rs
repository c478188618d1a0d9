//! How far the compressed model's outputs are from the original's on the client's own inputs:
//! per output, the same error and cosine figures as the report's fidelity (`eval::fidelity`), and
//! how often the highest-scoring class (argmax over the last axis, row by row) agrees.

use std::collections::BTreeMap;

use serde::Serialize;

use super::protocol::Tensor;
use super::tensors::widen;
use crate::eval::fidelity;
use crate::eval::metrics::argmax;
use crate::eval::session::OutputTensor;

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct OutputDifference {
    pub max_abs_error: Option<f64>,
    pub mean_abs_error: Option<f64>,
    pub cosine: Option<f64>,
    /// Share of rows (all axes but the last) whose argmax over the last axis is the same; `None`
    /// when the last axis has a single element.
    pub argmax_agreement: Option<f64>,
    /// Rows compared for `argmax_agreement`.
    pub rows: u64,
    /// Why the output could not be compared (missing or reshaped in the compressed model).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// One entry per output of the original model.
pub fn differences(compressed: &[Tensor], original: &[Tensor]) -> BTreeMap<String, OutputDifference> {
    original
        .iter()
        .map(|o| {
            let c = compressed.iter().find(|c| c.name == o.name);
            let diff = match c {
                None => failed(format!("the compressed model has no output {:?}", o.name)),
                Some(c) => difference(c, o),
            };
            (o.name.clone(), diff)
        })
        .collect()
}

fn failed(error: String) -> OutputDifference {
    OutputDifference {
        max_abs_error: None,
        mean_abs_error: None,
        cosine: None,
        argmax_agreement: None,
        rows: 0,
        error: Some(error),
    }
}

fn difference(c: &Tensor, o: &Tensor) -> OutputDifference {
    let as_output = |t: &Tensor, values: Vec<f64>| OutputTensor {
        name: t.name.clone(),
        shape: t.shape.clone(),
        values: Some(values),
    };
    let (a, b) = (widen(o), widen(c));
    let f = match fidelity::compare(&[as_output(o, a.clone())], &[as_output(c, b.clone())]) {
        Ok(f) => f,
        Err(e) => return failed(e.to_string()),
    };
    let last = o.shape.last().copied().unwrap_or(1).max(0) as usize;
    let (agree, rows) = if last > 1 {
        a.chunks(last)
            .zip(b.chunks(last))
            .fold((0u64, 0u64), |(agree, rows), (x, y)| {
                (agree + u64::from(argmax(x) == argmax(y)), rows + 1)
            })
    } else {
        (0, 0)
    };
    let out = &f.outputs[0];
    OutputDifference {
        max_abs_error: Some(out.max_abs_error),
        mean_abs_error: Some(out.mean_abs_error),
        cosine: Some(out.cosine_similarity),
        argmax_agreement: (rows > 0).then(|| agree as f64 / rows as f64),
        rows,
        error: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::eval::npz::NpyDtype;

    fn t(name: &str, shape: Vec<i64>, v: &[f32]) -> Tensor {
        Tensor {
            name: name.into(),
            dtype: NpyDtype::Float32,
            shape,
            data: v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        }
    }

    #[test]
    fn argmax_agreement_is_counted_row_by_row_over_the_last_axis() {
        let original = [t("y", vec![2, 3], &[0.1, 0.8, 0.1, 0.7, 0.2, 0.1])];
        let compressed = [t("y", vec![2, 3], &[0.1, 0.7, 0.2, 0.3, 0.6, 0.1])];
        let d = &differences(&compressed, &original)["y"];
        assert_eq!((d.rows, d.argmax_agreement), (2, Some(0.5)));
        assert!((d.max_abs_error.unwrap() - 0.4).abs() < 1e-6);
        assert!(d.cosine.unwrap() < 1.0);
    }

    #[test]
    fn identical_outputs_agree_fully_and_missing_ones_say_so() {
        let y = [t("y", vec![1, 2], &[1.0, 2.0])];
        let d = &differences(&y, &y)["y"];
        assert_eq!((d.max_abs_error, d.argmax_agreement), (Some(0.0), Some(1.0)));
        assert!((d.cosine.unwrap() - 1.0).abs() < 1e-12);
        let d = &differences(&[], &y)["y"];
        assert!(d.error.as_deref().unwrap().contains("no output \"y\""));
    }
}

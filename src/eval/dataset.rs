//! Evaluation datasets matched to a model: which array feeds which input and how, the labels, and
//! the deterministic split into calibration and evaluation samples.

use std::collections::HashMap;

use rand::SeedableRng;
use rand::seq::SliceRandom;
use serde::{Deserialize, Serialize};

use super::inputs::{InputTensor, TensorData};
use super::npz::{NpyArray, NpyDtype, NpzError};
use crate::onnx::{Dim, TensorSignature};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Task {
    Classification,
    Regression,
    /// No task metrics: fidelity against the original only.
    #[default]
    Generic,
}

/// How a job evaluates: stored on the job, passed to the job process.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvaluationOptions {
    #[serde(default)]
    pub task: Task,
    #[serde(default = "default_label_key")]
    pub label_key: String,
    /// Share of the dataset set aside for passes that calibrate (never evaluated on).
    pub calibration_fraction: f64,
    pub seed: u64,
    #[serde(default = "default_provider")]
    pub execution_provider: String,
    /// Sizes for named dynamic dimensions of synthetic inputs, over `eval.dim_overrides`.
    #[serde(default)]
    pub dim_overrides: std::collections::BTreeMap<String, i64>,
    /// Set the calibration split aside even when no pass calibrates, so a recipe re-run of an
    /// advisor's decision is measured on exactly the samples the advisor measured it on.
    #[serde(default)]
    pub hold_out_calibration: bool,
}

impl EvaluationOptions {
    /// The defaults a job gets from the configuration.
    pub fn defaults(eval: &crate::config::EvalConfig) -> Self {
        EvaluationOptions {
            task: Task::Generic,
            label_key: default_label_key(),
            calibration_fraction: eval.calibration_fraction,
            seed: eval.seed,
            execution_provider: eval.execution_provider.clone(),
            dim_overrides: Default::default(),
            hold_out_calibration: false,
        }
    }
}

fn default_label_key() -> String {
    "labels".into()
}

fn default_provider() -> String {
    "cpu".into()
}

/// How one array feeds one model input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Feed {
    /// The array's rank is the input's rank + 1: each sample is a whole input tensor.
    WholeTensor,
    /// The array has the input's own rank: samples run along the input's dynamic batch axis.
    AlongBatch,
}

/// Checks a dataset against a model's inputs (and the labels a task needs): names, dtypes, ranks
/// and fixed dimensions. The error says which input and why.
pub fn check(
    inputs: &[TensorSignature],
    arrays: &[NpyArray],
    task: Task,
    label_key: &str,
) -> Result<HashMap<String, Feed>, String> {
    let by_name: HashMap<&str, &NpyArray> = arrays.iter().map(|a| (a.name.as_str(), a)).collect();
    let mut feeds = HashMap::new();
    for input in inputs {
        let array = by_name
            .get(input.name.as_str())
            .ok_or_else(|| format!("input {:?} has no array in the dataset", input.name))?;
        if array.dtype.name() != input.dtype {
            return Err(format!(
                "input {:?} is {} but the dataset's array is {}",
                input.name,
                input.dtype,
                array.dtype.name()
            ));
        }
        let dims = input
            .shape
            .as_ref()
            .ok_or_else(|| format!("input {:?} has an unknown rank; it cannot be matched", input.name))?;
        let per_sample = &array.shape[1..];
        let (feed, compare): (Feed, &[Dim]) = if per_sample.len() == dims.len() {
            (Feed::WholeTensor, dims)
        } else if array.shape.len() == dims.len() && !matches!(dims.first(), Some(Dim::Fixed(_))) {
            (Feed::AlongBatch, &dims[1..])
        } else {
            return Err(format!(
                "input {:?} has rank {} (shape {}) but the array has shape {:?}: give one sample per leading index \
                 (rank {}), or the input's own rank when its first axis is a dynamic batch",
                input.name,
                dims.len(),
                describe(dims),
                array.shape,
                dims.len() + 1
            ));
        };
        for (axis, (d, &have)) in compare
            .iter()
            .zip(per_sample.iter().skip(per_sample.len() - compare.len()))
            .enumerate()
        {
            if let Dim::Fixed(want) = d
                && *want > 0
                && *want as u64 != have
            {
                return Err(format!(
                    "input {:?} needs size {want} on axis {} but the dataset has {have}",
                    input.name,
                    axis + if feed == Feed::AlongBatch { 1 } else { 0 }
                ));
            }
        }
        if !matches!(
            array.dtype,
            NpyDtype::Float32
                | NpyDtype::Float64
                | NpyDtype::Float16
                | NpyDtype::Int64
                | NpyDtype::Int32
                | NpyDtype::Int8
                | NpyDtype::Uint8
                | NpyDtype::Bool
        ) {
            return Err(format!(
                "input {:?}: dtype {} is not supported for evaluation yet",
                input.name,
                array.dtype.name()
            ));
        }
        feeds.insert(input.name.clone(), feed);
    }
    if task != Task::Generic {
        let labels = by_name.get(label_key).ok_or_else(|| {
            format!("task {task:?} needs labels, but the dataset has no array {label_key:?}").to_lowercase()
        })?;
        if task == Task::Classification
            && !matches!(
                labels.dtype,
                NpyDtype::Int64 | NpyDtype::Int32 | NpyDtype::Int16 | NpyDtype::Int8 | NpyDtype::Uint8
            )
        {
            return Err(format!(
                "classification labels {label_key:?} must be integers, not {}",
                labels.dtype.name()
            ));
        }
    }
    Ok(feeds)
}

fn describe(dims: &[Dim]) -> String {
    let parts: Vec<String> = dims
        .iter()
        .map(|d| match d {
            Dim::Fixed(v) => v.to_string(),
            Dim::Symbolic(s) => s.clone(),
            Dim::Unknown => "?".into(),
        })
        .collect();
    format!("[{}]", parts.join(", "))
}

/// Shuffles `0..samples` with `seed` and cuts it: (calibration, evaluation), each sorted.
pub fn split(samples: u64, fraction: f64, seed: u64) -> (Vec<u64>, Vec<u64>) {
    let mut order: Vec<u64> = (0..samples).collect();
    order.shuffle(&mut rand::rngs::StdRng::seed_from_u64(seed));
    let calibration = ((samples as f64) * fraction.clamp(0.0, 1.0)).round() as usize;
    let (mut cal, mut eval) = (order[..calibration].to_vec(), order[calibration..].to_vec());
    cal.sort_unstable();
    eval.sort_unstable();
    (cal, eval)
}

/// A dataset bound to a model's inputs.
pub struct BoundDataset {
    pub arrays: HashMap<String, NpyArray>,
    pub feeds: HashMap<String, Feed>,
    /// Input names in the model's order.
    pub order: Vec<String>,
}

impl BoundDataset {
    /// The inputs of sample `i`, each shaped as the model expects (batch of one).
    pub fn sample(&self, i: u64) -> Result<Vec<InputTensor>, NpzError> {
        self.order
            .iter()
            .map(|name| {
                let array = &self.arrays[name];
                let bytes = array.read_samples(i, 1)?;
                let mut shape: Vec<i64> = array.shape[1..].iter().map(|&d| d as i64).collect();
                if self.feeds[name] == Feed::AlongBatch {
                    shape.insert(0, 1);
                }
                Ok(InputTensor {
                    name: name.clone(),
                    shape,
                    data: decode(array.dtype, &bytes),
                })
            })
            .collect()
    }
}

/// Little-endian bytes → tensor data (dtypes limited to those `check` accepts).
pub fn decode(dtype: NpyDtype, b: &[u8]) -> TensorData {
    match dtype {
        NpyDtype::Float32 => TensorData::F32(
            b.chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect(),
        ),
        NpyDtype::Float64 => TensorData::F64(
            b.chunks_exact(8)
                .map(|c| f64::from_le_bytes(c.try_into().unwrap()))
                .collect(),
        ),
        NpyDtype::Float16 => TensorData::F16(
            b.chunks_exact(2)
                .map(|c| half::f16::from_le_bytes(c.try_into().unwrap()))
                .collect(),
        ),
        NpyDtype::Int64 => TensorData::I64(
            b.chunks_exact(8)
                .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
                .collect(),
        ),
        NpyDtype::Int32 => TensorData::I32(
            b.chunks_exact(4)
                .map(|c| i32::from_le_bytes(c.try_into().unwrap()))
                .collect(),
        ),
        NpyDtype::Int8 => TensorData::I8(b.iter().map(|&v| v as i8).collect()),
        NpyDtype::Bool => TensorData::Bool(b.iter().map(|&v| v != 0).collect()),
        _ => TensorData::U8(b.to_vec()),
    }
}

/// Labels of the given samples as numbers (integer classes or regression targets, flattened).
pub fn labels(array: &NpyArray, samples: &[u64]) -> Result<Vec<Vec<f64>>, NpzError> {
    samples
        .iter()
        .map(|&i| {
            let bytes = array.read_samples(i, 1)?;
            Ok(match decode(array.dtype, &bytes) {
                TensorData::F32(v) => v.into_iter().map(f64::from).collect(),
                TensorData::F64(v) => v,
                TensorData::F16(v) => v.into_iter().map(|x| x.to_f64()).collect(),
                TensorData::I64(v) => v.into_iter().map(|x| x as f64).collect(),
                TensorData::I32(v) => v.into_iter().map(f64::from).collect(),
                TensorData::I8(v) => v.into_iter().map(f64::from).collect(),
                TensorData::U8(v) => v.into_iter().map(f64::from).collect(),
                TensorData::Bool(v) => v.into_iter().map(|x| if x { 1.0 } else { 0.0 }).collect(),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn array(name: &str, dtype: NpyDtype, shape: &[u64]) -> NpyArray {
        NpyArray {
            name: name.into(),
            dtype,
            shape: shape.to_vec(),
            path: Default::default(),
            data_offset: 0,
        }
    }

    fn input(name: &str, dtype: &str, dims: Vec<Dim>) -> TensorSignature {
        TensorSignature {
            name: name.into(),
            dtype: dtype.into(),
            shape: Some(dims),
        }
    }

    #[test]
    fn arrays_feed_inputs_whole_or_along_the_batch_axis() {
        let image = input(
            "x",
            "float32",
            vec![Dim::Symbolic("n".into()), Dim::Fixed(3), Dim::Fixed(8)],
        );
        let state = input("h", "float32", vec![Dim::Fixed(2), Dim::Unknown, Dim::Fixed(4)]);
        let arrays = [
            array("x", NpyDtype::Float32, &[10, 3, 8]),
            array("h", NpyDtype::Float32, &[10, 2, 1, 4]),
            array("labels", NpyDtype::Int64, &[10]),
        ];
        let feeds = check(&[image, state], &arrays, Task::Classification, "labels").unwrap();
        assert_eq!(feeds["x"], Feed::AlongBatch);
        assert_eq!(feeds["h"], Feed::WholeTensor);
    }

    #[test]
    fn mismatches_name_the_input_and_the_reason() {
        let x = || input("x", "float32", vec![Dim::Symbolic("n".into()), Dim::Fixed(64)]);
        let cases = [
            (
                vec![array("y", NpyDtype::Float32, &[5, 64])],
                Task::Generic,
                "input \"x\" has no array",
            ),
            (
                vec![array("x", NpyDtype::Float64, &[5, 64])],
                Task::Generic,
                "is float32 but the dataset's array is float64",
            ),
            (
                vec![array("x", NpyDtype::Float32, &[5, 63])],
                Task::Generic,
                "needs size 64 on axis 1",
            ),
            (vec![array("x", NpyDtype::Float32, &[5])], Task::Generic, "has rank 2"),
            (
                vec![array("x", NpyDtype::Float32, &[5, 64])],
                Task::Classification,
                "no array \"labels\"",
            ),
            (
                vec![
                    array("x", NpyDtype::Float32, &[5, 64]),
                    array("labels", NpyDtype::Float32, &[5]),
                ],
                Task::Classification,
                "must be integers",
            ),
        ];
        for (arrays, task, expected) in cases {
            let err = check(&[x()], &arrays, task, "labels").unwrap_err();
            assert!(err.contains(expected), "{expected}: {err}");
        }
    }

    #[test]
    fn the_split_is_deterministic_disjoint_and_complete() {
        let (cal, eval) = split(100, 0.2, 42);
        assert_eq!((cal.len(), eval.len()), (20, 80));
        assert_eq!((cal.clone(), eval.clone()), split(100, 0.2, 42));
        assert_ne!(cal, split(100, 0.2, 43).0);
        let mut all: Vec<u64> = cal.iter().chain(&eval).copied().collect();
        all.sort_unstable();
        assert_eq!(all, (0..100).collect::<Vec<_>>());
        assert_eq!(split(10, 0.0, 1).1.len(), 10);
    }
}

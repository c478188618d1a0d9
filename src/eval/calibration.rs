//! Calibration data for passes that need it (static quantization): the calibration split of the
//! job's dataset, or seeded synthetic inputs when there is none (the report says so). Samples are
//! produced one at a time, so calibration memory does not grow with the data.

use std::collections::BTreeMap;

use super::dataset::BoundDataset;
use super::inputs::{self, DimPolicy, InputTensor};
use crate::onnx::TensorSignature;

pub enum CalibrationSet {
    Dataset {
        bound: Box<BoundDataset>,
        indices: Vec<u64>,
    },
    Synthetic {
        inputs: Vec<TensorSignature>,
        batch: i64,
        default_dim: i64,
        overrides: BTreeMap<String, i64>,
        seed: u64,
        count: usize,
    },
}

impl CalibrationSet {
    pub fn len(&self) -> usize {
        match self {
            CalibrationSet::Dataset { indices, .. } => indices.len(),
            CalibrationSet::Synthetic { count, .. } => *count,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn is_synthetic(&self) -> bool {
        matches!(self, CalibrationSet::Synthetic { .. })
    }

    /// The inputs of calibration sample `k` (batch of one).
    pub fn sample(&self, k: usize) -> Result<Vec<InputTensor>, String> {
        match self {
            CalibrationSet::Dataset { bound, indices } => bound.sample(indices[k]).map_err(|e| e.to_string()),
            CalibrationSet::Synthetic {
                inputs,
                batch,
                default_dim,
                overrides,
                seed,
                ..
            } => {
                let dims = DimPolicy {
                    batch: *batch,
                    default: *default_dim,
                    overrides,
                };
                inputs::synthetic(inputs, seed.wrapping_add(1 + k as u64), &dims).map_err(|e| e.to_string())
            }
        }
    }
}

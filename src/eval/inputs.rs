//! Synthetic inputs built from a model's signature: a fixed seed, the declared dtype, and dynamic
//! dimensions set to a configured value, so the original and every candidate see the same tensors.

use half::f16;
use ort::value::{DynValue, Tensor};
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, StandardNormal};
use serde::{Deserialize, Serialize};

use crate::onnx::proto::tensor_proto::DataType;
use crate::onnx::{Dim, TensorSignature, dtype};

#[derive(Debug, Clone, PartialEq)]
pub enum TensorData {
    F32(Vec<f32>),
    F64(Vec<f64>),
    F16(Vec<f16>),
    I64(Vec<i64>),
    I32(Vec<i32>),
    I8(Vec<i8>),
    U8(Vec<u8>),
    Bool(Vec<bool>),
}

#[derive(Debug, Clone, PartialEq)]
pub struct InputTensor {
    pub name: String,
    pub shape: Vec<i64>,
    pub data: TensorData,
}

/// The concrete shape an input was evaluated at, recorded in the report.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EvaluatedInput {
    pub name: String,
    pub dtype: String,
    pub shape: Vec<i64>,
}

#[derive(Debug, thiserror::Error)]
pub enum InputError {
    #[error("input {name:?} has an unknown rank; synthetic inputs need at least the rank")]
    UnknownRank { name: String },
    #[error("input {name:?} has dtype {dtype}, which synthetic inputs do not support yet")]
    UnsupportedDtype { name: String, dtype: String },
    #[error("input {name:?} would hold {elements} elements; the limit is {limit}")]
    TooLarge { name: String, elements: u64, limit: u64 },
    #[error("creating tensor {name:?}: {message}")]
    Tensor { name: String, message: String },
}

/// Largest synthetic tensor (elements); a signature declaring more is refused, not allocated.
pub const MAX_SYNTHETIC_ELEMENTS: u64 = 64 * 1024 * 1024;

/// How dynamic dimensions become concrete: a dynamic first axis is the batch; named symbols can be
/// set one by one; everything else gets `default`.
#[derive(Debug, Clone)]
pub struct DimPolicy<'a> {
    pub batch: i64,
    pub default: i64,
    pub overrides: &'a std::collections::BTreeMap<String, i64>,
}

impl DimPolicy<'_> {
    fn resolve(&self, axis: usize, dim: &Dim) -> i64 {
        match dim {
            Dim::Fixed(v) if *v > 0 => *v,
            Dim::Symbolic(s) if self.overrides.contains_key(s) => self.overrides[s],
            _ if axis == 0 => self.batch,
            _ => self.default,
        }
    }
}

/// Builds one tensor per input. Floats are standard normal; integers lie in `0..10` (valid as token
/// ids or indices for most models); booleans are fair coin flips.
pub fn synthetic(
    signature: &[TensorSignature],
    seed: u64,
    dims: &DimPolicy<'_>,
) -> Result<Vec<InputTensor>, InputError> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    signature
        .iter()
        .map(|sig| {
            let declared = sig
                .shape
                .as_ref()
                .ok_or_else(|| InputError::UnknownRank { name: sig.name.clone() })?;
            let shape: Vec<i64> = declared
                .iter()
                .enumerate()
                .map(|(axis, d)| dims.resolve(axis, d))
                .collect();
            let elements = shape.iter().map(|&d| d as u64).product::<u64>();
            if elements > MAX_SYNTHETIC_ELEMENTS {
                return Err(InputError::TooLarge {
                    name: sig.name.clone(),
                    elements,
                    limit: MAX_SYNTHETIC_ELEMENTS,
                });
            }
            let n = elements as usize;
            let normal = |rng: &mut rand::rngs::StdRng| -> f64 { StandardNormal.sample(rng) };
            let data = match dtype::from_name(&sig.dtype) {
                Some(DataType::Float) => TensorData::F32((0..n).map(|_| normal(&mut rng) as f32).collect()),
                Some(DataType::Double) => TensorData::F64((0..n).map(|_| normal(&mut rng)).collect()),
                Some(DataType::Float16) => TensorData::F16((0..n).map(|_| f16::from_f64(normal(&mut rng))).collect()),
                Some(DataType::Int64) => TensorData::I64((0..n).map(|_| rng.random_range(0..10)).collect()),
                Some(DataType::Int32) => TensorData::I32((0..n).map(|_| rng.random_range(0..10)).collect()),
                Some(DataType::Int8) => TensorData::I8((0..n).map(|_| rng.random_range(0..10)).collect()),
                Some(DataType::Uint8) => TensorData::U8((0..n).map(|_| rng.random_range(0..=255)).collect()),
                Some(DataType::Bool) => TensorData::Bool((0..n).map(|_| rng.random_bool(0.5)).collect()),
                _ => {
                    return Err(InputError::UnsupportedDtype {
                        name: sig.name.clone(),
                        dtype: sig.dtype.clone(),
                    });
                }
            };
            Ok(InputTensor {
                name: sig.name.clone(),
                shape,
                data,
            })
        })
        .collect()
}

impl InputTensor {
    /// The same values as `dtype` when that is another float type (a float16-input model fed the
    /// float32 samples of its original); `None` when no conversion applies.
    pub fn cast_to(&self, dtype: &str) -> Option<InputTensor> {
        let data = match (&self.data, dtype) {
            (TensorData::F32(v), "float16") => TensorData::F16(v.iter().map(|&x| f16::from_f32(x)).collect()),
            (TensorData::F64(v), "float16") => TensorData::F16(v.iter().map(|&x| f16::from_f64(x)).collect()),
            (TensorData::F16(v), "float32") => TensorData::F32(v.iter().map(|x| x.to_f32()).collect()),
            (TensorData::F64(v), "float32") => TensorData::F32(v.iter().map(|&x| x as f32).collect()),
            _ => return None,
        };
        Some(InputTensor {
            name: self.name.clone(),
            shape: self.shape.clone(),
            data,
        })
    }

    pub fn describe(&self) -> EvaluatedInput {
        let dtype = match &self.data {
            TensorData::F32(_) => "float32",
            TensorData::F64(_) => "float64",
            TensorData::F16(_) => "float16",
            TensorData::I64(_) => "int64",
            TensorData::I32(_) => "int32",
            TensorData::I8(_) => "int8",
            TensorData::U8(_) => "uint8",
            TensorData::Bool(_) => "bool",
        };
        EvaluatedInput {
            name: self.name.clone(),
            dtype: dtype.into(),
            shape: self.shape.clone(),
        }
    }

    /// An ORT value holding a copy of this tensor.
    pub fn to_value(&self) -> Result<DynValue, InputError> {
        let shape = self.shape.clone();
        let value = match &self.data {
            TensorData::F32(v) => Tensor::from_array((shape, v.clone())).map(|t| t.into_dyn()),
            TensorData::F64(v) => Tensor::from_array((shape, v.clone())).map(|t| t.into_dyn()),
            TensorData::F16(v) => Tensor::from_array((shape, v.clone())).map(|t| t.into_dyn()),
            TensorData::I64(v) => Tensor::from_array((shape, v.clone())).map(|t| t.into_dyn()),
            TensorData::I32(v) => Tensor::from_array((shape, v.clone())).map(|t| t.into_dyn()),
            TensorData::I8(v) => Tensor::from_array((shape, v.clone())).map(|t| t.into_dyn()),
            TensorData::U8(v) => Tensor::from_array((shape, v.clone())).map(|t| t.into_dyn()),
            TensorData::Bool(v) => Tensor::from_array((shape, v.clone())).map(|t| t.into_dyn()),
        };
        value.map_err(|e| InputError::Tensor {
            name: self.name.clone(),
            message: e.to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sig(name: &str, dtype: &str, shape: Option<Vec<Dim>>) -> TensorSignature {
        TensorSignature {
            name: name.into(),
            dtype: dtype.into(),
            shape,
        }
    }

    fn policy(overrides: &std::collections::BTreeMap<String, i64>) -> DimPolicy<'_> {
        DimPolicy {
            batch: 2,
            default: 7,
            overrides,
        }
    }

    #[test]
    fn dynamic_dims_follow_the_policy_and_seeds_repeat() {
        let overrides = [("seq".to_string(), 5)].into_iter().collect();
        let p = policy(&overrides);
        let s = [
            sig(
                "x",
                "float32",
                Some(vec![Dim::Symbolic("batch".into()), Dim::Fixed(3), Dim::Unknown]),
            ),
            sig(
                "ids",
                "int64",
                Some(vec![Dim::Unknown, Dim::Symbolic("seq".into()), Dim::Fixed(-1)]),
            ),
        ];
        let a = synthetic(&s, 9, &p).unwrap();
        assert_eq!(a[0].shape, vec![2, 3, 7]);
        assert_eq!(a[1].shape, vec![2, 5, 7]);
        let TensorData::I64(ids) = &a[1].data else {
            panic!("ids should be int64")
        };
        assert!(ids.iter().all(|v| (0..10).contains(v)));
        assert_eq!(a, synthetic(&s, 9, &p).unwrap());
        assert_ne!(a, synthetic(&s, 10, &p).unwrap());
    }

    #[test]
    fn unknown_rank_and_strings_are_refused_with_the_input_named() {
        let none = Default::default();
        let err = synthetic(&[sig("x", "float32", None)], 1, &policy(&none)).unwrap_err();
        assert!(err.to_string().contains("\"x\""), "{err}");
        let err = synthetic(&[sig("s", "string", Some(vec![]))], 1, &policy(&none)).unwrap_err();
        assert!(err.to_string().contains("string"), "{err}");
    }

    #[test]
    fn absurd_shapes_are_refused_before_allocating() {
        let s = [sig(
            "x",
            "float32",
            Some(vec![Dim::Fixed(1 << 20), Dim::Fixed(1 << 20)]),
        )];
        let none = Default::default();
        assert!(matches!(
            synthetic(&s, 1, &policy(&none)),
            Err(InputError::TooLarge { .. })
        ));
    }
}

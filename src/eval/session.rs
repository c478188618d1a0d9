//! Running a model once and reading its outputs back as numbers.

use ort::session::Session;
use ort::value::{DynValue, TensorElementType, ValueType};

use super::RuntimeError;
use super::inputs::InputTensor;
use super::npz::NpyDtype;

/// One output of one run, widened to f64 so any numeric dtype can be compared.
#[derive(Debug, Clone)]
pub struct OutputTensor {
    pub name: String,
    pub shape: Vec<i64>,
    /// `None` for outputs that are not numeric tensors (sequences, maps, strings).
    pub values: Option<Vec<f64>>,
}

/// ORT values for `inputs`, built once and reused for every run.
pub struct PreparedInputs {
    values: Vec<(String, DynValue)>,
}

impl PreparedInputs {
    pub fn new(inputs: &[InputTensor]) -> Result<Self, RuntimeError> {
        let values = inputs
            .iter()
            .map(|t| {
                Ok((
                    t.name.clone(),
                    t.to_value().map_err(|e| RuntimeError::Run(e.to_string()))?,
                ))
            })
            .collect::<Result<_, RuntimeError>>()?;
        Ok(PreparedInputs { values })
    }

    pub fn run(&self, session: &mut Session) -> Result<(), RuntimeError> {
        let refs: Vec<(&str, &DynValue)> = self.values.iter().map(|(n, v)| (n.as_str(), v)).collect();
        session.run(refs).map_err(|e| RuntimeError::Run(e.to_string()))?;
        Ok(())
    }

    /// Runs once and hands each output to `visit` as ORT holds it, without copying: for callers
    /// that only reduce the values (calibration statistics over large activations).
    pub fn run_visit(
        &self,
        session: &mut Session,
        mut visit: impl FnMut(&str, &DynValue) -> Result<(), String>,
    ) -> Result<(), RuntimeError> {
        let refs: Vec<(&str, &DynValue)> = self.values.iter().map(|(n, v)| (n.as_str(), v)).collect();
        let outputs = session.run(refs).map_err(|e| RuntimeError::Run(e.to_string()))?;
        for (name, value) in outputs.iter() {
            visit(name, &value).map_err(|e| RuntimeError::Run(format!("output {name:?}: {e}")))?;
        }
        Ok(())
    }

    pub fn run_and_collect(&self, session: &mut Session) -> Result<Vec<OutputTensor>, RuntimeError> {
        let refs: Vec<(&str, &DynValue)> = self.values.iter().map(|(n, v)| (n.as_str(), v)).collect();
        let outputs = session.run(refs).map_err(|e| RuntimeError::Run(e.to_string()))?;
        outputs
            .iter()
            .map(|(name, value)| {
                let (shape, values) = widen(&value).map_err(|e| RuntimeError::Run(format!("output {name:?}: {e}")))?;
                Ok(OutputTensor {
                    name: name.to_string(),
                    shape,
                    values,
                })
            })
            .collect()
    }
}

/// An output as it came out of ORT, in its own dtype: little-endian element bytes.
#[derive(Debug, Clone, PartialEq)]
pub struct RawTensor {
    pub dtype: NpyDtype,
    pub shape: Vec<i64>,
    pub bytes: Vec<u8>,
}

/// A numeric tensor output without widening; `None` for values that are not numeric tensors.
pub fn raw_tensor(value: &DynValue) -> Result<Option<RawTensor>, ort::Error> {
    let ValueType::Tensor { ty, shape, .. } = value.dtype() else {
        return Ok(None);
    };
    let dims: Vec<i64> = shape.iter().copied().collect();
    macro_rules! bytes_of {
        ($t:ty, $dtype:expr, $bytes:expr) => {{
            let (_, data) = value.try_extract_tensor::<$t>()?;
            ($dtype, data.iter().flat_map($bytes).collect::<Vec<u8>>())
        }};
    }
    let (dtype, bytes) = match ty {
        TensorElementType::Float32 => bytes_of!(f32, NpyDtype::Float32, |v| v.to_le_bytes()),
        TensorElementType::Float64 => bytes_of!(f64, NpyDtype::Float64, |v| v.to_le_bytes()),
        TensorElementType::Float16 => bytes_of!(half::f16, NpyDtype::Float16, |v| v.to_le_bytes()),
        TensorElementType::Int64 => bytes_of!(i64, NpyDtype::Int64, |v| v.to_le_bytes()),
        TensorElementType::Int32 => bytes_of!(i32, NpyDtype::Int32, |v| v.to_le_bytes()),
        TensorElementType::Int16 => bytes_of!(i16, NpyDtype::Int16, |v| v.to_le_bytes()),
        TensorElementType::Int8 => bytes_of!(i8, NpyDtype::Int8, |v| v.to_le_bytes()),
        TensorElementType::Uint8 => bytes_of!(u8, NpyDtype::Uint8, |v| [*v]),
        TensorElementType::Uint16 => bytes_of!(u16, NpyDtype::Uint16, |v| v.to_le_bytes()),
        TensorElementType::Uint32 => bytes_of!(u32, NpyDtype::Uint32, |v| v.to_le_bytes()),
        TensorElementType::Uint64 => bytes_of!(u64, NpyDtype::Uint64, |v| v.to_le_bytes()),
        TensorElementType::Bool => bytes_of!(bool, NpyDtype::Bool, |v| [u8::from(*v)]),
        _ => return Ok(None),
    };
    Ok(Some(RawTensor {
        dtype,
        shape: dims,
        bytes,
    }))
}

pub(crate) fn widen(value: &DynValue) -> Result<(Vec<i64>, Option<Vec<f64>>), ort::Error> {
    let ValueType::Tensor { ty, shape, .. } = value.dtype() else {
        return Ok((Vec::new(), None));
    };
    let dims: Vec<i64> = shape.iter().copied().collect();
    macro_rules! widen_as {
        ($t:ty, $conv:expr) => {{
            let (_, data) = value.try_extract_tensor::<$t>()?;
            Some(data.iter().map($conv).collect())
        }};
    }
    let values = match ty {
        TensorElementType::Float32 => widen_as!(f32, |v| f64::from(*v)),
        TensorElementType::Float64 => widen_as!(f64, |v| *v),
        TensorElementType::Float16 => widen_as!(half::f16, |v| v.to_f64()),
        TensorElementType::Bfloat16 => widen_as!(half::bf16, |v| v.to_f64()),
        TensorElementType::Int64 => widen_as!(i64, |v| *v as f64),
        TensorElementType::Int32 => widen_as!(i32, |v| f64::from(*v)),
        TensorElementType::Int16 => widen_as!(i16, |v| f64::from(*v)),
        TensorElementType::Int8 => widen_as!(i8, |v| f64::from(*v)),
        TensorElementType::Uint8 => widen_as!(u8, |v| f64::from(*v)),
        TensorElementType::Uint16 => widen_as!(u16, |v| f64::from(*v)),
        TensorElementType::Uint32 => widen_as!(u32, |v| f64::from(*v)),
        TensorElementType::Uint64 => widen_as!(u64, |v| *v as f64),
        TensorElementType::Bool => widen_as!(bool, |v| if *v { 1.0 } else { 0.0 }),
        _ => None,
    };
    Ok((dims, values))
}

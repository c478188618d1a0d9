//! Request inputs and response outputs: JSON nested arrays and `.npz` archives to and from raw
//! tensors, with every input checked against the session's signature so a wrong name, dtype or
//! shape is answered with what was expected instead of an ONNX Runtime error.

use std::collections::BTreeMap;

use half::f16;
use serde_json::Value;

use super::protocol::{Signature, Tensor};
use super::worker::SUPPORTED_INPUTS;
use crate::eval::npz::{self, NpyDtype};

/// Why the inputs do not fit the model; the message names the input and what was expected.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct InvalidInput(pub String);

fn invalid(message: impl Into<String>) -> InvalidInput {
    InvalidInput(message.into())
}

/// `float32 [batch, 64]`: how an input is described in error messages.
pub fn describe(sig: &Signature) -> String {
    match &sig.shape {
        None => sig.dtype.clone(),
        Some(dims) => {
            let dims: Vec<String> = dims
                .iter()
                .map(|d| d.map_or("?".to_string(), |v| v.to_string()))
                .collect();
            format!("{} [{}]", sig.dtype, dims.join(", "))
        }
    }
}

fn listing(signature: &[Signature]) -> String {
    signature
        .iter()
        .map(|s| format!("{:?} ({})", s.name, describe(s)))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Puts `given` (name → tensor) into the model's input order, checking names, dtypes and shapes.
pub fn check(signature: &[Signature], mut given: BTreeMap<String, Tensor>) -> Result<Vec<Tensor>, InvalidInput> {
    if let Some(unknown) = given.keys().find(|k| !signature.iter().any(|s| &s.name == *k)) {
        return Err(invalid(format!(
            "input {unknown:?} is not an input of this model; its inputs are {}",
            listing(signature)
        )));
    }
    signature
        .iter()
        .map(|sig| {
            let tensor = given
                .remove(&sig.name)
                .ok_or_else(|| invalid(format!("input {:?} is missing: expected {}", sig.name, describe(sig))))?;
            check_one(sig, &tensor)?;
            Ok(tensor)
        })
        .collect()
}

fn check_one(sig: &Signature, t: &Tensor) -> Result<(), InvalidInput> {
    let expected = expected_dtype(sig)?;
    if t.dtype != expected {
        return Err(invalid(format!(
            "input {:?} must be {} but is {}: expected {}",
            sig.name,
            expected.name(),
            t.dtype.name(),
            describe(sig)
        )));
    }
    let dims = sig.shape.as_ref().expect("tensor inputs have a shape");
    let fits = dims.len() == t.shape.len() && dims.iter().zip(&t.shape).all(|(d, &have)| d.is_none_or(|d| d == have));
    if !fits {
        return Err(invalid(format!(
            "input {:?} has shape {:?} but the model expects {}",
            sig.name,
            t.shape,
            describe(sig)
        )));
    }
    Ok(())
}

fn expected_dtype(sig: &Signature) -> Result<NpyDtype, InvalidInput> {
    NpyDtype::from_name(&sig.dtype)
        .filter(|d| sig.shape.is_some() && SUPPORTED_INPUTS.contains(d))
        .ok_or_else(|| {
            invalid(format!(
                "input {:?} is {}, which this endpoint cannot feed (supported: {})",
                sig.name,
                describe(sig),
                SUPPORTED_INPUTS.map(NpyDtype::name).join(", ")
            ))
        })
}

/// JSON inputs (`{"name": nested arrays}`), typed by the model's signature.
pub fn from_json(signature: &[Signature], inputs: BTreeMap<String, Value>) -> Result<Vec<Tensor>, InvalidInput> {
    let mut given = BTreeMap::new();
    for (name, value) in inputs {
        let Some(sig) = signature.iter().find(|s| s.name == name) else {
            // `check` names it with the model's inputs.
            given.insert(
                name.clone(),
                Tensor {
                    name,
                    dtype: NpyDtype::Uint8,
                    shape: Vec::new(),
                    data: Vec::new(),
                },
            );
            continue;
        };
        let dtype = expected_dtype(sig)?;
        let mut shape = Vec::new();
        nested_shape(&value, &mut shape);
        let mut data = Vec::with_capacity(shape.iter().product::<i64>().max(1) as usize * dtype.size() as usize);
        let mut index = Vec::new();
        flatten(&value, &shape, 0, dtype, &mut data, &mut index).map_err(|why| {
            invalid(format!(
                "input {name:?}: {why}; expected {} as nested arrays",
                describe(sig)
            ))
        })?;
        given.insert(
            name.clone(),
            Tensor {
                name,
                dtype,
                shape,
                data,
            },
        );
    }
    check(signature, given)
}

/// The shape nested arrays claim (from their first elements; `flatten` checks the rest).
fn nested_shape(value: &Value, shape: &mut Vec<i64>) {
    if let Value::Array(items) = value {
        shape.push(items.len() as i64);
        if let Some(first) = items.first() {
            nested_shape(first, shape);
        }
    }
}

fn flatten(
    value: &Value,
    shape: &[i64],
    depth: usize,
    dtype: NpyDtype,
    out: &mut Vec<u8>,
    index: &mut Vec<usize>,
) -> Result<(), String> {
    if depth == shape.len() {
        return push_element(value, dtype, out).map_err(|why| format!("{why} at {index:?}"));
    }
    let Value::Array(items) = value else {
        return Err(format!(
            "the arrays are ragged: a number where an array was expected at {index:?}"
        ));
    };
    if items.len() as i64 != shape[depth] {
        return Err(format!(
            "the arrays are ragged: {} elements at {index:?} where the first array at that depth has {}",
            items.len(),
            shape[depth]
        ));
    }
    for (i, item) in items.iter().enumerate() {
        index.push(i);
        flatten(item, shape, depth + 1, dtype, out, index)?;
        index.pop();
    }
    Ok(())
}

fn push_element(value: &Value, dtype: NpyDtype, out: &mut Vec<u8>) -> Result<(), String> {
    let what = || format!("{} is not a {}", short(value), dtype.name());
    if dtype == NpyDtype::Bool {
        let b = match value {
            Value::Bool(b) => *b,
            Value::Number(n) if n.as_f64() == Some(0.0) => false,
            Value::Number(n) if n.as_f64() == Some(1.0) => true,
            _ => return Err(what()),
        };
        out.push(u8::from(b));
        return Ok(());
    }
    let Value::Number(n) = value else {
        return Err(what());
    };
    match dtype {
        NpyDtype::Float32 => out.extend((n.as_f64().ok_or_else(what)? as f32).to_le_bytes()),
        NpyDtype::Float64 => out.extend(n.as_f64().ok_or_else(what)?.to_le_bytes()),
        NpyDtype::Float16 => out.extend(f16::from_f64(n.as_f64().ok_or_else(what)?).to_le_bytes()),
        integer => {
            let v = n
                .as_i64()
                .or_else(|| {
                    n.as_f64()
                        .filter(|f| f.fract() == 0.0 && f.abs() < 9.0e15)
                        .map(|f| f as i64)
                })
                .ok_or_else(what)?;
            let out_of_range = || format!("{v} is out of range for {}", integer.name());
            match integer {
                NpyDtype::Int64 => out.extend(v.to_le_bytes()),
                NpyDtype::Int32 => out.extend(i32::try_from(v).map_err(|_| out_of_range())?.to_le_bytes()),
                NpyDtype::Int8 => out.extend(i8::try_from(v).map_err(|_| out_of_range())?.to_le_bytes()),
                NpyDtype::Uint8 => out.push(u8::try_from(v).map_err(|_| out_of_range())?),
                other => return Err(format!("{} inputs are not supported", other.name())),
            }
        }
    }
    Ok(())
}

fn short(value: &Value) -> String {
    let text = value.to_string();
    if text.len() > 40 {
        format!("{}…", &text[..text.floor_char_boundary(40)])
    } else {
        text
    }
}

/// `.npz` inputs (one array per input, named as the input), read in memory.
pub fn from_npz(signature: &[Signature], body: &[u8], max_bytes: u64) -> Result<Vec<Tensor>, InvalidInput> {
    let arrays = npz::read_in_memory(body, max_bytes).map_err(|e| invalid(format!("the .npz body: {e}")))?;
    let given = arrays
        .into_iter()
        .map(|(a, data)| {
            let tensor = Tensor {
                name: a.name.clone(),
                dtype: a.dtype,
                shape: a.shape.iter().map(|&d| d as i64).collect(),
                data,
            };
            (a.name, tensor)
        })
        .collect();
    check(signature, given)
}

/// Tensors as an uncompressed `.npz`, each array named `prefix` + its name.
pub fn to_npz(parts: &[(&str, &[Tensor])]) -> std::io::Result<Vec<u8>> {
    let mut members = Vec::new();
    for (prefix, tensors) in parts {
        for t in *tensors {
            let shape: Vec<u64> = t.shape.iter().map(|&d| d.max(0) as u64).collect();
            members.push((
                format!("{prefix}{}.npy", t.name),
                npz::encode_npy(t.dtype.descr(), &shape, &t.data),
            ));
        }
    }
    let refs: Vec<(&str, Vec<u8>)> = members.iter().map(|(n, d)| (n.as_str(), d.clone())).collect();
    npz::encode_npz(&refs)
}

/// Every element widened to f64 (for comparing outputs).
pub fn widen(t: &Tensor) -> Vec<f64> {
    let d = &t.data;
    macro_rules! le {
        ($ty:ty, $n:expr, $conv:expr) => {
            d.chunks_exact($n)
                .map(|c| $conv(<$ty>::from_le_bytes(c.try_into().expect("chunk size"))))
                .collect()
        };
    }
    match t.dtype {
        NpyDtype::Float32 => le!(f32, 4, f64::from),
        NpyDtype::Float64 => le!(f64, 8, |v| v),
        NpyDtype::Float16 => le!(f16, 2, |v: f16| v.to_f64()),
        NpyDtype::Int64 => le!(i64, 8, |v| v as f64),
        NpyDtype::Int32 => le!(i32, 4, f64::from),
        NpyDtype::Int16 => le!(i16, 2, f64::from),
        NpyDtype::Int8 => d.iter().map(|&v| f64::from(v as i8)).collect(),
        NpyDtype::Uint8 => d.iter().map(|&v| f64::from(v)).collect(),
        NpyDtype::Uint16 => le!(u16, 2, f64::from),
        NpyDtype::Uint32 => le!(u32, 4, f64::from),
        NpyDtype::Uint64 => le!(u64, 8, |v| v as f64),
        NpyDtype::Bool => d.iter().map(|&v| if v != 0 { 1.0 } else { 0.0 }).collect(),
    }
}

/// `{"name": nested arrays, ...}` written directly: floats in their shortest round-trip form
/// (`0.1`, not the `0.10000000149011612` a float32 becomes through f64), NaN and infinities as null.
pub fn outputs_json(tensors: &[Tensor]) -> String {
    let mut out = String::from("{");
    for (i, t) in tensors.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(&serde_json::to_string(&t.name).expect("a string serializes"));
        out.push(':');
        let elements = element_strings(t);
        let mut next = elements.into_iter();
        nested(&mut out, &t.shape, &mut next);
    }
    out.push('}');
    out
}

fn nested(out: &mut String, shape: &[i64], elements: &mut impl Iterator<Item = String>) {
    let Some((&n, rest)) = shape.split_first() else {
        out.push_str(&elements.next().unwrap_or_else(|| "null".into()));
        return;
    };
    out.push('[');
    for i in 0..n.max(0) {
        if i > 0 {
            out.push(',');
        }
        nested(out, rest, elements);
    }
    out.push(']');
}

fn element_strings(t: &Tensor) -> Vec<String> {
    fn float(v: impl std::fmt::Display, finite: bool) -> String {
        if finite { v.to_string() } else { "null".into() }
    }
    let d = &t.data;
    match t.dtype {
        NpyDtype::Float32 => d
            .chunks_exact(4)
            .map(|c| {
                let v = f32::from_le_bytes(c.try_into().expect("4 bytes"));
                float(v, v.is_finite())
            })
            .collect(),
        NpyDtype::Float16 => d
            .chunks_exact(2)
            .map(|c| {
                let v = f16::from_le_bytes(c.try_into().expect("2 bytes"));
                float(v, v.is_finite())
            })
            .collect(),
        NpyDtype::Bool => d.iter().map(|&v| (v != 0).to_string()).collect(),
        NpyDtype::Float64 => widen(t).into_iter().map(|v| float(v, v.is_finite())).collect(),
        NpyDtype::Int64 => d
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes(c.try_into().expect("8 bytes")).to_string())
            .collect(),
        NpyDtype::Uint64 => d
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")).to_string())
            .collect(),
        _ => widen(t).into_iter().map(|v| format!("{v}")).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn sig(name: &str, dtype: &str, shape: Vec<Option<i64>>) -> Signature {
        Signature {
            name: name.into(),
            dtype: dtype.into(),
            shape: Some(shape),
        }
    }

    fn inputs(v: Value) -> BTreeMap<String, Value> {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn nested_arrays_become_tensors_of_the_signature_dtype() {
        let s = [sig("x", "float32", vec![None, Some(2)]), sig("n", "int64", vec![])];
        let t = from_json(&s, inputs(json!({"x": [[1, 2.5], [3, 4]], "n": 7}))).unwrap();
        assert_eq!(t[0].shape, vec![2, 2]);
        assert_eq!(widen(&t[0]), vec![1.0, 2.5, 3.0, 4.0]);
        assert_eq!(
            (t[1].dtype, t[1].shape.clone(), widen(&t[1])),
            (NpyDtype::Int64, vec![], vec![7.0])
        );
        assert_eq!(outputs_json(&t), r#"{"x":[[1,2.5],[3,4]],"n":7}"#);
    }

    #[test]
    fn wrong_inputs_are_refused_naming_the_input_and_what_was_expected() {
        let s = [
            sig("x", "float32", vec![None, Some(2)]),
            sig("ids", "int32", vec![Some(2)]),
        ];
        let cases = [
            (json!({"x": [[1, 2]]}), "input \"ids\" is missing: expected int32 [2]"),
            (
                json!({"x": [[1, 2]], "ids": [1, 2], "y": 1}),
                "input \"y\" is not an input",
            ),
            (
                json!({"x": [[1, 2, 3]], "ids": [1, 2]}),
                "input \"x\" has shape [1, 3] but the model expects float32 [?, 2]",
            ),
            (json!({"x": [[1, 2], [3]], "ids": [1, 2]}), "ragged"),
            (json!({"x": [[1, "a"]], "ids": [1, 2]}), "\"a\" is not a float32"),
            (json!({"x": [[1, 2]], "ids": [1, 2.5]}), "2.5 is not a int32"),
            (
                json!({"x": [[1, 2]], "ids": [1, 3000000000u64]}),
                "out of range for int32",
            ),
        ];
        for (body, expected) in cases {
            let err = from_json(&s, inputs(body)).unwrap_err().to_string();
            assert!(err.contains(expected), "{expected:?} not in {err:?}");
        }
    }

    #[test]
    fn npz_inputs_must_match_the_dtype_exactly_and_outputs_round_trip_through_npz() {
        let s = [sig("x", "float32", vec![None, Some(2)])];
        let x: Vec<u8> = [1.0f64, 2.0].iter().flat_map(|v| v.to_le_bytes()).collect();
        let body = npz::encode_npz(&[("x.npy", npz::encode_npy("<f8", &[1, 2], &x))]).unwrap();
        let err = from_npz(&s, &body, 1 << 20).unwrap_err().to_string();
        assert!(err.contains("input \"x\" must be float32 but is float64"), "{err}");

        let t = Tensor {
            name: "x".into(),
            dtype: NpyDtype::Float32,
            shape: vec![1, 2],
            data: [1.5f32, -2.0].iter().flat_map(|v| v.to_le_bytes()).collect(),
        };
        let body = to_npz(&[("", std::slice::from_ref(&t))]).unwrap();
        let back = from_npz(&s, &body, 1 << 20).unwrap();
        assert_eq!(back, vec![t]);
    }
}

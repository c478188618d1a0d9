//! ONNX tensor element types and their numpy-style names, used in every API response.

use super::proto::tensor_proto::DataType;

/// numpy-style name of an ONNX element type (`float32`, `int64`, ...).
pub fn name(elem_type: i32) -> String {
    let known = match DataType::try_from(elem_type) {
        Ok(DataType::Float) => "float32",
        Ok(DataType::Uint8) => "uint8",
        Ok(DataType::Int8) => "int8",
        Ok(DataType::Uint16) => "uint16",
        Ok(DataType::Int16) => "int16",
        Ok(DataType::Int32) => "int32",
        Ok(DataType::Int64) => "int64",
        Ok(DataType::String) => "string",
        Ok(DataType::Bool) => "bool",
        Ok(DataType::Float16) => "float16",
        Ok(DataType::Double) => "float64",
        Ok(DataType::Uint32) => "uint32",
        Ok(DataType::Uint64) => "uint64",
        Ok(DataType::Complex64) => "complex64",
        Ok(DataType::Complex128) => "complex128",
        Ok(DataType::Bfloat16) => "bfloat16",
        Ok(DataType::Float8e4m3fn) => "float8e4m3fn",
        Ok(DataType::Float8e4m3fnuz) => "float8e4m3fnuz",
        Ok(DataType::Float8e5m2) => "float8e5m2",
        Ok(DataType::Float8e5m2fnuz) => "float8e5m2fnuz",
        Ok(DataType::Uint4) => "uint4",
        Ok(DataType::Int4) => "int4",
        Ok(DataType::Float4e2m1) => "float4e2m1",
        Ok(DataType::Float8e8m0) => "float8e8m0",
        Ok(DataType::Uint2) => "uint2",
        Ok(DataType::Int2) => "int2",
        Ok(DataType::Undefined) => "undefined",
        Err(_) => return format!("unknown({elem_type})"),
    };
    known.to_string()
}

/// The ONNX element type a numpy-style name stands for.
pub fn from_name(name: &str) -> Option<DataType> {
    (0..=26)
        .filter_map(|t| DataType::try_from(t).ok())
        .find(|t| self::name(*t as i32) == name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_for_every_known_type() {
        for t in 1..=26 {
            let n = name(t);
            assert_eq!(from_name(&n).map(|d| d as i32), Some(t), "{n}");
        }
        assert_eq!(name(1), "float32");
        assert_eq!(name(99), "unknown(99)");
    }
}

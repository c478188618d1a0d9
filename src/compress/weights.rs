//! What the quantization passes share: reading a MatMul/Gemm's constant weight as [K, N] floats,
//! and building the tensors and nodes of the rewritten graph.

use crate::onnx::graph::{GraphIndex, NameGen};
use crate::onnx::proto::tensor_proto::DataType;
use crate::onnx::proto::{AttributeProto, GraphProto, NodeProto, TensorProto, attribute_proto::AttributeType};

/// A weight to quantize: `w` as [K, N] row-major f32 (Gemm's transB already undone).
pub struct Weight {
    pub k: usize,
    pub n: usize,
    pub values: Vec<f32>,
}

/// Symmetric int8 codes in [-`qmax`, `qmax`] and their scales: one per channel along `axis` of
/// `dims`, or one for the tensor. Both int8 passes use it, so a weight quantizes the same in each.
pub fn symmetric_int8(values: &[f32], dims: &[i64], axis: usize, per_channel: bool, qmax: f32) -> (Vec<i8>, Vec<f32>) {
    let dims: Vec<usize> = dims.iter().map(|&d| d as usize).collect();
    let inner: usize = dims[axis + 1..].iter().product();
    let channels = dims[axis];
    let channel_of = |i: usize| (i / inner) % channels;
    let scale_of = |m: f32| if m > 0.0 { m / qmax } else { 1.0 };
    let scales: Vec<f32> = if per_channel {
        let mut maxes = vec![0f32; channels];
        for (i, v) in values.iter().enumerate() {
            let c = channel_of(i);
            maxes[c] = maxes[c].max(v.abs());
        }
        maxes.into_iter().map(scale_of).collect()
    } else {
        vec![scale_of(values.iter().fold(0f32, |m, v| m.max(v.abs())))]
    };
    let q = values
        .iter()
        .enumerate()
        .map(|(i, v)| {
            let s = if per_channel { scales[channel_of(i)] } else { scales[0] };
            (v / s).round().clamp(-qmax, qmax) as i8
        })
        .collect();
    (q, scales)
}

/// The constant tensor named `name`: an initializer, or the value of the `Constant` node that
/// produces it.
pub fn constant<'g>(index: &GraphIndex, g: &'g GraphProto, name: &str) -> Option<&'g TensorProto> {
    index.initializer(g, name).or_else(|| {
        let producer = &g.node[*index.producer.get(name)?];
        (producer.op_type() == "Constant")
            .then(|| {
                producer
                    .attribute
                    .iter()
                    .find(|a| a.name() == "value")
                    .and_then(|a| a.t.as_ref())
            })
            .flatten()
    })
}

/// Reasons nodes were skipped, as report notes (`"3 skipped: the weight is not a constant"`).
pub fn skipped_notes(skipped: std::collections::HashMap<String, usize>) -> Vec<String> {
    let mut notes: Vec<String> = skipped
        .into_iter()
        .map(|(why, n)| format!("{n} skipped: {why}"))
        .collect();
    notes.sort();
    notes
}

/// Whether the passes can compress `node`: a default-domain MatMul/Gemm with a constant 2-D
/// float weight, or a Conv whose weight is stored in the model.
pub fn is_weight_bearing(node: &NodeProto, index: &GraphIndex, g: &GraphProto) -> bool {
    if !matches!(node.domain(), "" | "ai.onnx") {
        return false;
    }
    match node.op_type() {
        "MatMul" | "Gemm" => weight_of(node, index, g).is_ok(),
        "Conv" => node.input.get(1).is_some_and(|w| constant(index, g, w).is_some()),
        _ => false,
    }
}

/// The constant 2-D float weight of a MatMul/Gemm as [K, N], or why the node is skipped.
pub fn weight_of(node: &NodeProto, index: &GraphIndex, g: &GraphProto) -> Result<Weight, String> {
    let name = node.input.get(1).ok_or("no weight input")?;
    // Initializers, or `Constant` nodes (some exporters keep every weight there).
    let t = constant(index, g, name).ok_or("the weight is not a constant")?;
    if t.data_type() != DataType::Float as i32 {
        return Err("the weight is not float32".into());
    }
    if t.dims.len() != 2 {
        return Err("the weight is not 2-D".into());
    }
    let (rows, cols) = (t.dims[0] as usize, t.dims[1] as usize);
    let values: Vec<f32> = match &t.raw_data {
        Some(raw) => raw
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        None => t.float_data.clone(),
    };
    if values.len() != rows * cols {
        return Err("the weight's data does not match its shape".into());
    }
    if node.op_type() == "Gemm" {
        let attr = |n: &str| node.attribute.iter().find(|a| a.name() == n);
        let int = |n: &str, d: i64| attr(n).map_or(d, |a| a.i());
        let float = |n: &str, d: f32| attr(n).map_or(d, |a| a.f());
        if int("transA", 0) != 0 || float("alpha", 1.0) != 1.0 || float("beta", 1.0) != 1.0 {
            return Err("Gemm with transA, alpha or beta is not handled".into());
        }
        if int("transB", 0) != 0 {
            // Stored as [N, K]: transpose to [K, N].
            let mut t = vec![0f32; rows * cols];
            for r in 0..rows {
                for c in 0..cols {
                    t[c * rows + r] = values[r * cols + c];
                }
            }
            return Ok(Weight {
                k: cols,
                n: rows,
                values: t,
            });
        }
    }
    Ok(Weight {
        k: rows,
        n: cols,
        values,
    })
}

pub fn tensor(name: &str, dims: &[i64], data_type: DataType, raw: Vec<u8>) -> TensorProto {
    TensorProto {
        name: Some(name.into()),
        dims: dims.to_vec(),
        data_type: Some(data_type as i32),
        raw_data: Some(raw.into()),
        ..Default::default()
    }
}

pub fn int_attr(name: &str, value: i64) -> AttributeProto {
    AttributeProto {
        name: Some(name.into()),
        r#type: Some(AttributeType::Int as i32),
        i: Some(value),
        ..Default::default()
    }
}

pub fn node_of(
    names: &mut NameGen,
    op: &str,
    inputs: &[&str],
    outputs: &[&str],
    attribute: Vec<AttributeProto>,
) -> NodeProto {
    NodeProto {
        name: Some(names.fresh(&format!("{}_{op}", "quant"))),
        op_type: Some(op.into()),
        input: inputs.iter().map(|s| s.to_string()).collect(),
        output: outputs.iter().map(|s| s.to_string()).collect(),
        attribute,
        ..Default::default()
    }
}

/// A value name usable as a prefix for generated names.
pub fn sanitize(name: &str) -> String {
    let s: String = name
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || c == '_' { c } else { '_' })
        .collect();
    if s.is_empty() { "v".into() } else { s }
}

/// Largest int8 weight magnitude when the range is reduced to 7 bits.
pub const REDUCED_QMAX: f32 = 64.0;

/// Whether int8 weights should use 7 bits (`reduce_range`) when a recipe leaves it unset.
///
/// ONNX Runtime's x86 kernels for uint8 activations × int8 weights multiply with AVX2's
/// `vpmaddubsw`, which adds two products into a saturating int16: 255 × 127 × 2 overflows it, so
/// full-range weights come out wrong on CPUs without VNNI (measured here on an AVX2-only EPYC: the
/// digits MLP's cosine to fp32 fell from 0.9999 to 0.98). With weights in [-64, 64] the sum fits.
/// VNNI CPUs add in int32 and keep the eighth bit; other architectures do not have the problem.
pub fn reduce_range_by_default() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        !(std::arch::is_x86_feature_detected!("avx512vnni") || std::arch::is_x86_feature_detected!("avxvnni"))
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// The note a pass adds about the weight range it used, and why.
pub fn range_note(reduce: bool, asked: Option<bool>) -> String {
    match (reduce, asked) {
        (true, Some(true)) => "int8 weights in 7 bits (reduce_range: true)".into(),
        (false, Some(false)) => "int8 weights in the full 8 bits (reduce_range: false)".into(),
        (true, _) => "int8 weights in 7 bits: this CPU has no VNNI, and ONNX Runtime's AVX2 int8 kernels saturate \
                      with full-range weights (reduce_range unset; set it to false for VNNI-only deployments)"
            .into(),
        (false, _) => "int8 weights in the full 8 bits: this CPU has VNNI (reduce_range unset; set it to true if the \
                       model will run on AVX2 CPUs without VNNI)"
            .into(),
    }
}

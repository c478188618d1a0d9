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
/// Each code is `round(v / scale)`, halves away from zero (see [`round_nonnegative`]).
pub fn symmetric_int8(values: &[f32], dims: &[i64], axis: usize, per_channel: bool, qmax: f32) -> (Vec<i8>, Vec<f32>) {
    debug_assert!(qmax.fract() == 0.0 && (1.0..=127.0).contains(&qmax), "qmax {qmax}");
    let dims: Vec<usize> = dims.iter().map(|&d| d as usize).collect();
    // The weight as [outer, channels, inner]: `inner` values in a row share a channel, and the
    // channels repeat `outer` times. One channel for the whole tensor when not per channel.
    let (channels, inner) = if per_channel {
        (dims[axis], dims[axis + 1..].iter().product())
    } else {
        (1, values.len())
    };
    let scale_of = |m: f32| if m > 0.0 { m / qmax } else { 1.0 };
    let mut maxes = vec![0f32; channels];
    // Runs of `inner` values walked in order ([`channel_runs`]). With `inner` 1 (a MatMul's [K, N]
    // per output column) a run is one value, so those go `channels` at a time instead, one for each
    // channel, which vectorizes.
    if inner == 1 {
        for row in values.chunks(channels.max(1)) {
            for (m, v) in maxes.iter_mut().zip(row) {
                *m = m.max(v.abs());
            }
        }
    } else {
        for (row, c) in channel_runs(values, channels, inner) {
            maxes[c] = maxes[c].max(abs_max(row));
        }
    }
    let scales: Vec<f32> = maxes.into_iter().map(scale_of).collect();
    let mut q = Vec::with_capacity(values.len());
    if inner == 1 {
        for row in values.chunks(channels.max(1)) {
            q.extend(row.iter().zip(&scales).map(|(&v, &s)| code8(v / s, qmax)));
        }
    } else {
        for (row, c) in channel_runs(values, channels, inner) {
            let s = scales[c];
            q.extend(row.iter().map(|&v| code8(v / s, qmax)));
        }
    }
    (q, scales)
}

/// A weight laid out as [outer, channels, inner], in order: its runs of `inner` values, each with
/// its channel (no division or modulo per value).
pub fn channel_runs(values: &[f32], channels: usize, inner: usize) -> impl Iterator<Item = (&[f32], usize)> {
    values.chunks(inner.max(1)).zip((0..channels.max(1)).cycle())
}

/// The largest magnitude in `values` (NaN ignored, 0 when empty). Eight independent running
/// maxima: a single one makes every value wait for the one before it.
fn abs_max(values: &[f32]) -> f32 {
    const LANES: usize = 8;
    let mut m = [0f32; LANES];
    let chunks = values.chunks_exact(LANES);
    let rest = chunks.remainder();
    for chunk in chunks {
        for j in 0..LANES {
            m[j] = m[j].max(chunk[j].abs());
        }
    }
    rest.iter()
        .fold(m.iter().fold(0f32, |a, &b| a.max(b)), |a, v| a.max(v.abs()))
}

/// `y` rounded (halves away from zero) and clamped to [-`qmax`, `qmax`] (an integer); NaN gives 0.
#[inline]
fn code8(y: f32, qmax: f32) -> i8 {
    // `max` then `min`, not `clamp`: `max` maps NaN to 0, `clamp` would keep it.
    #[allow(clippy::manual_clamp)]
    let magnitude = round_nonnegative(y.abs().max(0.0).min(qmax)) as i32;
    (if y < 0.0 { -magnitude } else { magnitude }) as i8
}

/// The nearest integer to `a` in [0, 2^22], halves away from zero, without `f32::round`: that is
/// a libm call per value on baseline x86-64 (a third of an int8 dynamic pass on the transformer
/// encoder), and a float-to-int `as` cast checks each lane for NaN and overflow. Adding 2^23 leaves
/// the nearest integer (ties to even) in the low mantissa bits, and a tie that went down to even is
/// then moved up: only adds, compares and bit moves, which the compiler vectorizes.
#[inline]
pub fn round_nonnegative(a: f32) -> u32 {
    const MAGIC: f32 = 8_388_608.0; // 2^23: from here up, f32 has no fraction bits
    let shifted = a + MAGIC;
    let nearest = shifted - MAGIC;
    // Exact: `a` and `nearest` are within half a unit of each other.
    let tie_down = a - nearest >= 0.5;
    (shifted.to_bits() - MAGIC.to_bits()) + u32::from(tie_down)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn int8_codes_round_halves_away_from_zero_and_clamp() {
        for qmax in [127.0, 63.0] {
            let reference = |y: f32| y.round().clamp(-qmax, qmax) as i8;
            for i in -300_000..300_000 {
                let y = i as f32 / 1000.0;
                assert_eq!(code8(y, qmax), reference(y), "{y} (qmax {qmax})");
            }
            for y in [
                0.5,
                -0.5,
                62.5,
                -62.5,
                126.5,
                -126.5,
                0.49999997,
                -0.49999997,
                1e9,
                -1e9,
                f32::INFINITY,
                f32::NEG_INFINITY,
                -0.0,
            ] {
                assert_eq!(code8(y, qmax), reference(y), "{y} (qmax {qmax})");
            }
            assert_eq!(code8(f32::NAN, qmax), 0);
        }
    }

    /// Against the definition, value by value: the channel of flat index i along `axis` is
    /// (i / product of the later dims) % dims[axis]; its scale is its largest magnitude / qmax.
    #[test]
    fn symmetric_int8_matches_the_definition_on_every_layout() {
        let cases: [(&[i64], usize); 6] = [
            (&[5, 7], 1),       // MatMul [K, N], per output column
            (&[5, 7], 0),       //
            (&[4, 3, 2, 3], 0), // Conv [M, C, kH, kW], per output channel
            (&[4, 3, 2, 3], 1), // a middle axis
            (&[3, 1, 1], 0),    // one value per channel
            (&[0, 4], 1),       // empty
        ];
        for (dims, axis) in cases {
            let len: i64 = dims.iter().product();
            let values: Vec<f32> = (0..len).map(|i| ((i * 37 % 23) as f32 - 11.0) * 0.13).collect();
            let inner: usize = dims[axis + 1..].iter().map(|&d| d as usize).product();
            let channels = dims[axis] as usize;
            for per_channel in [false, true] {
                let (q, scales) = symmetric_int8(&values, dims, axis, per_channel, 127.0);
                let channel = |i: usize| if per_channel { (i / inner) % channels } else { 0 };
                let mut maxes = vec![0f32; scales.len()];
                for (i, v) in values.iter().enumerate() {
                    maxes[channel(i)] = maxes[channel(i)].max(v.abs());
                }
                let expected: Vec<f32> = maxes.iter().map(|&m| if m > 0.0 { m / 127.0 } else { 1.0 }).collect();
                assert_eq!(scales, expected, "{dims:?} axis {axis} per_channel {per_channel}");
                assert_eq!(q.len(), values.len());
                for (i, (&v, &c)) in values.iter().zip(&q).enumerate() {
                    let want = (v / scales[channel(i)]).round().clamp(-127.0, 127.0) as i8;
                    assert_eq!(c, want, "{dims:?} axis {axis} per_channel {per_channel} at {i}");
                }
            }
        }
    }
}

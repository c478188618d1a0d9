//! `quantize_int4_weight_only`: MatMul weights quantized blockwise to 4 bits along K and stored in
//! ONNX Runtime's `com.microsoft.MatMulNBits` layout: codes packed two per byte (low nibble first),
//! one float scale per block and column, and (asymmetric mode) packed 4-bit zero points. The
//! activations stay float; this is the transformer weight compression ORT runs fastest.

use std::collections::{HashMap, HashSet};
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::weights::{Weight, node_of, round_nonnegative, sanitize, skipped_notes, tensor, weight_of};
use super::{Pass, PassContext, PassError, PassOutput};
use crate::onnx::graph::{self, GraphIndex, NameGen};
use crate::onnx::proto::tensor_proto::DataType;
use crate::onnx::proto::{AttributeProto, NodeProto, TensorProto, attribute_proto::AttributeType};
use crate::onnx::{self, external};

pub const MS_DOMAIN: &str = "com.microsoft";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Int4Params {
    /// Weights per block along K sharing one scale: 16, 32, 64, 128 or 256.
    #[serde(default = "default_block")]
    pub block_size: u32,
    /// Symmetric (implicit zero point 8) or with a zero point per block.
    #[serde(default = "default_true")]
    pub symmetric: bool,
    /// MatMulNBits `accuracy_level`: 0 lets ORT choose, 1 fp32, 2 fp16, 3 bf16, 4 int8 compute.
    #[serde(default)]
    pub accuracy_level: u8,
    #[serde(default)]
    pub exclude_nodes: Vec<String>,
}

fn default_block() -> u32 {
    32
}

fn default_true() -> bool {
    true
}

impl Default for Int4Params {
    fn default() -> Self {
        Int4Params {
            block_size: 32,
            symmetric: true,
            accuracy_level: 0,
            exclude_nodes: Vec::new(),
        }
    }
}

impl Int4Params {
    pub fn validate(&self) -> Result<(), String> {
        if ![16, 32, 64, 128, 256].contains(&self.block_size) {
            return Err(format!(
                "block_size {} is not one of 16, 32, 64, 128, 256",
                self.block_size
            ));
        }
        if self.accuracy_level > 4 {
            return Err(format!("accuracy_level {} is not within 0..=4", self.accuracy_level));
        }
        Ok(())
    }
}

pub struct QuantizeInt4(pub Int4Params);

/// One weight in MatMulNBits form.
struct Packed {
    /// [N, blocks, block_size / 2]
    codes: Vec<u8>,
    /// [N * blocks]
    scales: Vec<f32>,
    /// [N * ceil(blocks / 2)], asymmetric only.
    zero_points: Option<Vec<u8>>,
    blocks: usize,
}

/// Quantizes `w` ([K, N]) column by column in blocks of `block` along K; the last block is padded
/// with values that decode to exactly zero.
fn pack(w: &Weight, block: usize, symmetric: bool) -> Packed {
    let n = w.n;
    let blocks = w.k.div_ceil(block);
    let zp_bytes = blocks.div_ceil(2);
    let code_bytes = blocks * block / 2;
    let mut codes = vec![0u8; n * code_bytes];
    let mut scales = vec![0f32; n * blocks];
    let mut zero_points = (!symmetric).then(|| vec![0u8; n * zp_bytes]);
    // Columns are independent and own disjoint runs of every output: large weights are split across
    // the CPU's threads by column (the result is the same whatever the split).
    let threads = if w.k * n >= PARALLEL_FROM {
        std::thread::available_parallelism()
            .map_or(1, |t| t.get())
            .min(n.div_ceil(16))
    } else {
        1
    };
    let per = n.div_ceil(threads.max(1)).next_multiple_of(16);
    std::thread::scope(|scope| {
        let mut codes = codes.as_mut_slice();
        let mut scales = scales.as_mut_slice();
        let mut zps = zero_points.as_deref_mut();
        let mut first = 0;
        while first < n {
            let cols = first..(first + per).min(n);
            let (c, rest) = std::mem::take(&mut codes).split_at_mut(cols.len() * code_bytes);
            codes = rest;
            let (s, rest) = std::mem::take(&mut scales).split_at_mut(cols.len() * blocks);
            scales = rest;
            let z = match zps.take() {
                Some(z) => {
                    let (z, rest) = z.split_at_mut(cols.len() * zp_bytes);
                    zps = Some(rest);
                    Some(z)
                }
                None => None,
            };
            first = cols.end;
            if first >= n {
                pack_columns(w, block, symmetric, cols, c, s, z);
            } else {
                scope.spawn(move || pack_columns(w, block, symmetric, cols, c, s, z));
            }
        }
    });
    Packed {
        codes,
        scales,
        zero_points,
        blocks,
    }
}

/// Weights from which packing is spread over threads (below, starting them costs more).
const PARALLEL_FROM: usize = 1 << 16;
/// Columns packed together. A block runs down a column, but [K, N] is stored by rows, so a block's
/// scales and codes are computed a row at a time across this many columns (contiguous, so the loops
/// vectorize), and one block of them (32 rows of 1 KiB for block 32) stays in cache between the two.
const CHUNK_COLS: usize = 256;

/// Packs columns `cols` of `w`; `codes`, `scales` and `zero_points` are those columns' parts of the
/// outputs (they start at column `cols.start`).
fn pack_columns(
    w: &Weight,
    block: usize,
    symmetric: bool,
    cols: std::ops::Range<usize>,
    codes: &mut [u8],
    scales: &mut [f32],
    mut zero_points: Option<&mut [u8]>,
) {
    let (k, n) = (w.k, w.n);
    let blocks = k.div_ceil(block);
    let zp_bytes = blocks.div_ceil(2);
    let half = block / 2;
    // Per column of the chunk: the block's range (or largest magnitude and the value that has it),
    // then its reciprocal scale and zero point.
    let mut lo = [0f32; CHUNK_COLS];
    let mut hi = [0f32; CHUNK_COLS];
    let mut reciprocal = [0f32; CHUNK_COLS];
    let mut zp_f = [0f32; CHUNK_COLS];
    let mut zp = [0u8; CHUNK_COLS];
    // The block's codes, row by row: [block, CHUNK_COLS].
    let mut q = vec![0u8; block * CHUNK_COLS];
    for c0 in cols.clone().step_by(CHUNK_COLS) {
        let width = CHUNK_COLS.min(cols.end - c0);
        let row = |r: usize| &w.values[r * n + c0..r * n + c0 + width];
        for b in 0..blocks {
            let rows = (b * block)..((b + 1) * block).min(k);
            let (lo, hi) = (&mut lo[..width], &mut hi[..width]);
            lo.fill(0.0);
            hi.fill(0.0);
            if symmetric {
                // The largest-magnitude value maps exactly onto code 0 (-8): a signed scale uses all
                // 16 levels where absmax/7 would waste one (values at the other extreme saturate at
                // +7, at most one step off). ONNX Runtime's quantizer does the same. Of +a and -a,
                // the first in the block wins (strictly greater replaces); NaN never does.
                let (top, extreme) = (hi, lo);
                for r in rows.clone() {
                    for ((t, e), &v) in top.iter_mut().zip(extreme.iter_mut()).zip(row(r)) {
                        let a = v.abs();
                        let larger = a > *t;
                        *t = if larger { a } else { *t };
                        *e = if larger { v } else { *e };
                    }
                }
                for (j, &e) in extreme.iter().enumerate() {
                    let scale = if e != 0.0 { e / -8.0 } else { 1.0 };
                    scales[(c0 + j - cols.start) * blocks + b] = scale;
                    (reciprocal[j], zp_f[j], zp[j]) = (1.0 / scale, 8.0, 8);
                }
            } else {
                // The range always holds 0; NaN is ignored (`min`/`max` keep the other operand).
                for r in rows.clone() {
                    for ((l, h), &v) in lo.iter_mut().zip(hi.iter_mut()).zip(row(r)) {
                        *l = l.min(v);
                        *h = h.max(v);
                    }
                }
                for j in 0..width {
                    let scale = if hi[j] > lo[j] { (hi[j] - lo[j]) / 15.0 } else { 1.0 };
                    let z = (-lo[j] / scale).round().clamp(0.0, 15.0) as u8;
                    let col = c0 + j - cols.start;
                    scales[col * blocks + b] = scale;
                    if let Some(zps) = zero_points.as_deref_mut() {
                        zps[col * zp_bytes + b / 2] |= z << (4 * (b % 2));
                    }
                    (reciprocal[j], zp_f[j], zp[j]) = (1.0 / scale, z as f32, z);
                }
            }
            for (i, r) in rows.clone().enumerate() {
                let codes = &mut q[i * CHUNK_COLS..i * CHUNK_COLS + width];
                for (((c, &v), &rc), &z) in codes.iter_mut().zip(row(r)).zip(&reciprocal).zip(&zp_f) {
                    *c = code4(v, rc, z);
                }
            }
            // The padding of a last, short block decodes to exactly zero.
            for i in rows.len()..block {
                q[i * CHUNK_COLS..i * CHUNK_COLS + width].copy_from_slice(&zp[..width]);
            }
            // Down each column, two codes to a byte (low nibble first).
            for j in 0..width {
                let start = ((c0 + j - cols.start) * blocks + b) * half;
                for (i, byte) in codes[start..start + half].iter_mut().enumerate() {
                    *byte = q[2 * i * CHUNK_COLS + j] | (q[(2 * i + 1) * CHUNK_COLS + j] << 4);
                }
            }
        }
    }
}

/// The 4-bit code of `v`, as ONNX Runtime's blockwise quantizer computes it:
/// `clamp(round(v * reciprocal + zp), 0, 15)`, halves away from zero. A product by the reciprocal,
/// not a division, both because that is ORT's formula (the two differ on rare ties) and because a
/// division per weight was most of packing. Clamped first (the bounds are integers, so the result is
/// the same), then rounded without a libm call ([`round_nonnegative`]). A NaN weight gets code 0.
#[inline]
fn code4(v: f32, reciprocal: f32, zp: f32) -> u8 {
    // `max` then `min`, not `clamp`: `max` maps NaN to 0, `clamp` would keep it.
    #[allow(clippy::manual_clamp)]
    let y = (v * reciprocal + zp).max(0.0).min(15.0);
    round_nonnegative(y) as u8
}

fn int(name: &str, value: i64) -> AttributeProto {
    AttributeProto {
        name: Some(name.into()),
        r#type: Some(AttributeType::Int as i32),
        i: Some(value),
        ..Default::default()
    }
}

impl Pass for QuantizeInt4 {
    fn name(&self) -> &'static str {
        "quantize_int4_weight_only"
    }

    fn run(&self, input: &Path, output: &Path, _ctx: &PassContext<'_>) -> Result<PassOutput, PassError> {
        let err = |m: String| PassError(m);
        let mut model = onnx::load(input).map_err(|e| err(e.to_string()))?;
        let graph = model
            .graph
            .as_mut()
            .ok_or_else(|| err("the model has no graph".into()))?;
        let index = GraphIndex::new(graph);
        let mut names = NameGen::new(graph);
        let excluded: HashSet<&str> = self.0.exclude_nodes.iter().map(String::as_str).collect();
        let block = self.0.block_size as usize;

        let mut replaced: Vec<(usize, NodeProto)> = Vec::new();
        let mut new_initializers: Vec<TensorProto> = Vec::new();
        let mut skipped: HashMap<String, usize> = HashMap::new();
        let mut weights = 0u64;
        for (i, node) in graph.node.iter().enumerate() {
            if node.op_type() != "MatMul" || !matches!(node.domain(), "" | "ai.onnx") {
                continue;
            }
            if excluded.contains(node.name()) {
                *skipped.entry("excluded by exclude_nodes".into()).or_default() += 1;
                continue;
            }
            let w = match weight_of(node, &index, graph) {
                Ok(w) => w,
                Err(why) => {
                    *skipped.entry(why).or_default() += 1;
                    continue;
                }
            };
            let packed = pack(&w, block, self.0.symmetric);
            let base = sanitize(&node.input[1]);
            let b_name = names.fresh(&format!("{base}_Q4"));
            let s_name = names.fresh(&format!("{base}_scales"));
            new_initializers.push(tensor(
                &b_name,
                &[w.n as i64, packed.blocks as i64, (block / 2) as i64],
                DataType::Uint8,
                packed.codes,
            ));
            new_initializers.push(tensor(
                &s_name,
                &[(w.n * packed.blocks) as i64],
                DataType::Float,
                packed.scales.iter().flat_map(|s| s.to_le_bytes()).collect(),
            ));
            let mut inputs = vec![node.input[0].as_str(), b_name.as_str(), s_name.as_str()];
            let zp_name;
            if let Some(z) = packed.zero_points {
                zp_name = names.fresh(&format!("{base}_zero_points"));
                new_initializers.push(tensor(&zp_name, &[z.len() as i64], DataType::Uint8, z));
                inputs.push(zp_name.as_str());
            }
            let mut q = node_of(
                &mut names,
                "MatMulNBits",
                &inputs,
                &[node.output[0].as_str()],
                vec![
                    int("K", w.k as i64),
                    int("N", w.n as i64),
                    int("bits", 4),
                    int("block_size", block as i64),
                ]
                .into_iter()
                // 0 is the operator's default: leave it out, as ONNX Runtime's own tool does.
                .chain((self.0.accuracy_level > 0).then(|| int("accuracy_level", self.0.accuracy_level as i64)))
                .collect(),
            );
            q.domain = Some(MS_DOMAIN.into());
            // The replacement keeps the MatMul's name, so reports and exclude lists still find it.
            q.name = node.name.clone();
            replaced.push((i, q));
            weights += (w.k * w.n) as u64;
        }
        let quantized = replaced.len();
        for (i, node) in replaced {
            graph.node[i] = node;
        }
        graph.initializer.extend(new_initializers);
        let (dead_nodes, dead_weights) = graph::eliminate_dead(graph);
        let mut out = PassOutput::default();
        if quantized > 0 {
            graph::require_opset(&mut model, MS_DOMAIN, 1).map_err(|e| err(e.to_string()))?;
        } else {
            out.warnings.push(
                "quantize_int4_weight_only found no MatMul with a constant 2-D float weight; the model is unchanged \
                 (int4 weight-only quantization is for MatMul-heavy models such as transformers, not CNNs)"
                    .into(),
            );
        }
        let skipped = skipped_notes(skipped);
        out.notes.push(format!(
            "{quantized} MatMul node(s) to MatMulNBits, {weights} weights to 4 bits (block {block}, {}); {dead_weights} \
             float initializer(s) and {dead_nodes} Constant node(s) no longer read were removed",
            if self.0.symmetric { "symmetric" } else { "with zero points" }
        ));
        out.notes.extend(skipped);
        external::save(&model, output, None).map_err(|e| err(e.to_string()))?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(p: &Packed, w: &Weight, block: usize, col: usize, row: usize) -> f32 {
        let b = row / block;
        let i = row % block;
        let byte = p.codes[(col * p.blocks + b) * block / 2 + i / 2];
        let code = (byte >> (4 * (i % 2))) & 0xf;
        let zp = match &p.zero_points {
            Some(z) => (z[col * p.blocks.div_ceil(2) + b / 2] >> (4 * (b % 2))) & 0xf,
            None => 8,
        };
        let _ = w;
        (code as f32 - zp as f32) * p.scales[col * p.blocks + b]
    }

    #[test]
    fn of_two_opposite_extremes_the_first_sets_the_scale() {
        for (values, scale) in [
            ([0.5f32, -1.0, 1.0, 0.0], 1.0 / 8.0),
            ([0.5, 1.0, -1.0, 0.0], -1.0 / 8.0),
        ] {
            let mut block = values.to_vec();
            block.resize(32, 0.0);
            let w = Weight {
                k: 32,
                n: 1,
                values: block,
            };
            assert_eq!(pack(&w, 32, true).scales, vec![scale], "{values:?}");
        }
    }

    #[test]
    fn codes_round_halves_away_from_zero_and_clamp() {
        let reference = |v: f32, r: f32, zp: f32| (v * r + zp).round().clamp(0.0, 15.0) as u8;
        for zp in [0.0, 3.0, 8.0, 15.0] {
            for i in -40_000..40_000 {
                let v = i as f32 / 1000.0;
                for r in [1.0, 0.37, 3.0] {
                    assert_eq!(code4(v, r, zp), reference(v, r, zp), "{v} * {r} + {zp}");
                }
            }
            let edges = [
                0.5,
                -0.5,
                1.5,
                -1.5,
                7.5,
                -8.5,
                0.49999997,
                -0.49999997,
                14.5,
                1e9,
                -1e9,
                f32::INFINITY,
            ];
            for v in edges {
                assert_eq!(code4(v, 1.0, zp), reference(v, 1.0, zp), "{v} + {zp}");
            }
        }
        assert_eq!(code4(f32::NAN, 1.0, 8.0), 0);
    }

    /// Element by element, straight from the definition: block b of column c holds rows
    /// b*block.. of that column; code = round(v * (1 / scale) + zp), clamped to 0..=15 (ONNX
    /// Runtime's formula).
    #[test]
    fn packing_matches_the_definition_element_by_element() {
        // Small (one thread), several column chunks in one thread, large enough to be split across
        // threads; a short last block, odd N.
        for (k, n, block) in [(100, 37, 32), (64, 600, 16), (300, 401, 32)] {
            packing_matches_the_definition(k, n, block);
        }
    }

    fn packing_matches_the_definition(k: usize, n: usize, block: usize) {
        let mut values: Vec<f32> = (0..k * n)
            .map(|i| (((i * 7919) % 1013) as f32 - 500.0) / 97.0)
            .collect();
        // A NaN weight is left out of its block's range and gets code 0.
        values[n + 3] = f32::NAN;
        let w = Weight { k, n, values };
        for symmetric in [true, false] {
            let p = pack(&w, block, symmetric);
            for col in 0..n {
                for b in 0..p.blocks {
                    let rows: Vec<f32> = (b * block..((b + 1) * block).min(k))
                        .map(|r| w.values[r * n + col])
                        .collect();
                    let scale = p.scales[col * p.blocks + b];
                    let zp = match &p.zero_points {
                        Some(z) => (z[col * p.blocks.div_ceil(2) + b / 2] >> (4 * (b % 2))) & 0xf,
                        None => 8,
                    };
                    let (lo, hi) = rows.iter().fold((0f32, 0f32), |(l, h), &v| (l.min(v), h.max(v)));
                    if symmetric {
                        let top = hi.max(-lo);
                        let extreme = rows.iter().copied().find(|v| v.abs() == top).unwrap_or(0.0);
                        let want = if extreme != 0.0 { extreme / -8.0 } else { 1.0 };
                        assert_eq!(scale, want, "column {col}, block {b}");
                    } else {
                        assert_eq!(
                            scale,
                            if hi > lo { (hi - lo) / 15.0 } else { 1.0 },
                            "column {col}, block {b}"
                        );
                        assert_eq!(
                            zp,
                            (-lo / scale).round().clamp(0.0, 15.0) as u8,
                            "column {col}, block {b}"
                        );
                    }
                    for i in 0..block {
                        let byte = p.codes[(col * p.blocks + b) * block / 2 + i / 2];
                        let code = (byte >> (4 * (i % 2))) & 0xf;
                        let want = rows
                            .get(i)
                            .map_or(zp, |v| (v * (1.0 / scale) + zp as f32).round().clamp(0.0, 15.0) as u8);
                        assert_eq!(code, want, "column {col}, block {b}, element {i}");
                    }
                }
            }
        }
    }

    #[test]
    fn packed_weights_decode_within_half_a_step_in_both_modes() {
        let (k, n) = (40, 3); // K not a multiple of the block: the last block is padded.
        let values: Vec<f32> = (0..k * n).map(|i| ((i * 13 % 29) as f32 - 11.0) / 7.0).collect();
        let w = Weight { k, n, values };
        for symmetric in [true, false] {
            let p = pack(&w, 16, symmetric);
            assert_eq!(p.blocks, 3);
            assert_eq!(p.codes.len(), n * 3 * 8);
            for col in 0..n {
                for row in 0..k {
                    let b = row / 16;
                    let step = p.scales[col * p.blocks + b].abs();
                    let got = decode(&p, &w, 16, col, row);
                    let want = w.values[row * n + col];
                    // Symmetric blocks saturate the far extreme at +7: up to one step off there.
                    let tolerance = if symmetric { step } else { step / 2.0 };
                    assert!(
                        (got - want).abs() <= tolerance + 1e-5,
                        "sym {symmetric} [{row},{col}]: {got} vs {want}"
                    );
                }
            }
        }
    }

    #[test]
    fn parameters_are_checked() {
        let p = |block_size, accuracy_level| Int4Params {
            block_size,
            accuracy_level,
            ..Default::default()
        };
        assert!(p(48, 0).validate().unwrap_err().contains("block_size"));
        assert!(p(32, 5).validate().unwrap_err().contains("accuracy_level"));
        p(128, 4).validate().unwrap();
    }
}

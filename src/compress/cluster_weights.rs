//! `cluster_weights`: k-means weight sharing (Deep Compression's "trained quantization" without the
//! training). Each MatMul/Gemm/Conv weight is replaced by a float codebook of at most 2^bits
//! centroids and a uint8 index per value, expanded by stock operators: `Gather(codebook,
//! Cast(indices, int32))` feeds the node that read the weight. ONNX has no 2..7-bit tensor type
//! that `Gather` reads, so an index takes one byte whatever `bits` is: the file shrinks about 4×,
//! not 32/bits×; with few bits the indices repeat so much that the zstd copy is smaller still.
//! ONNX Runtime folds the Cast and Gather of constants at session load, so run time is the float
//! model's.

use std::collections::{HashMap, HashSet};
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::weight_targets;
use super::weights::{int_attr, node_of, sanitize, skipped_notes, tensor};
use super::{LayerRecord, Pass, PassContext, PassError, PassOutput};
use crate::onnx::graph::{self, GraphIndex, NameGen};
use crate::onnx::proto::NodeProto;
use crate::onnx::proto::tensor_proto::DataType;
use crate::onnx::{self, external};

const OPS: &[&str] = &["MatMul", "Gemm", "Conv"];
const MAX_ITERATIONS: usize = 100;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Init {
    /// Centroids evenly spaced between the weight's minimum and maximum: keeps the rare large
    /// weights represented (Han et al. found it the best initialization for weight sharing).
    Linear,
    /// Centroids at evenly spaced quantiles: more of them where the values are dense.
    Quantile,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterParams {
    /// 2^bits centroids per weight, 2..=8.
    #[serde(default = "default_bits")]
    pub bits: u8,
    /// Deterministic: both initializations depend on the values only, so no seed is needed.
    #[serde(default = "default_init")]
    pub init: Init,
    /// Weights with fewer values are left as they are (the codebook would not pay for itself).
    #[serde(default = "default_min_elements")]
    pub min_elements: u64,
    /// Cluster each output channel's values divided by that channel's largest magnitude (one shared
    /// codebook, one float scale per channel, a `Mul` after the `Gather`). Convolutions with batch
    /// norm folded in have channels whose scales differ by orders of magnitude; one codebook for
    /// their raw values spends its centroids on the large channels and flattens the small ones.
    #[serde(default = "default_true")]
    pub per_channel: bool,
    #[serde(default)]
    pub exclude_nodes: Vec<String>,
}

fn default_bits() -> u8 {
    4
}

fn default_init() -> Init {
    Init::Linear
}

fn default_min_elements() -> u64 {
    256
}

fn default_true() -> bool {
    true
}

impl ClusterParams {
    pub fn validate(&self) -> Result<(), String> {
        if !(2..=8).contains(&self.bits) {
            return Err(format!("bits {} is not within 2..=8", self.bits));
        }
        Ok(())
    }
}

pub struct ClusterWeights(pub ClusterParams);

/// Lloyd's k-means in one dimension on sorted values: each cluster is a contiguous run of the
/// sorted values, found by binary search at the midpoints between centroids, and its mean comes
/// from prefix sums. Returns sorted centroids (at most `k`; fewer when there are fewer distinct
/// values, which are then reproduced exactly).
fn kmeans_1d(sorted: &[f32], k: usize, init: Init) -> Vec<f32> {
    let mut distinct: Vec<f32> = sorted.to_vec();
    distinct.dedup();
    if distinct.len() <= k {
        return distinct;
    }
    let n = sorted.len();
    let (lo, hi) = (sorted[0] as f64, sorted[n - 1] as f64);
    let mut c: Vec<f64> = (0..k)
        .map(|j| match init {
            Init::Linear => lo + (hi - lo) * j as f64 / (k - 1) as f64,
            Init::Quantile => sorted[((j as f64 + 0.5) / k as f64 * n as f64) as usize] as f64,
        })
        .collect();
    let mut prefix = Vec::with_capacity(n + 1);
    prefix.push(0f64);
    for &v in sorted {
        prefix.push(prefix.last().unwrap() + v as f64);
    }
    for _ in 0..MAX_ITERATIONS {
        let mut starts = vec![0usize];
        for j in 0..k - 1 {
            let b = (c[j] + c[j + 1]) / 2.0;
            starts.push(sorted.partition_point(|&v| (v as f64) < b));
        }
        starts.push(n);
        let next: Vec<f64> = (0..k)
            .map(|j| {
                let (a, b) = (starts[j], starts[j + 1]);
                if b > a {
                    (prefix[b] - prefix[a]) / (b - a) as f64
                } else {
                    c[j]
                }
            })
            .collect();
        if next == c {
            break;
        }
        c = next;
    }
    let mut centroids: Vec<f32> = c.into_iter().map(|v| v as f32).collect();
    centroids.dedup();
    centroids
}

/// Nearest centroid of each value (ties to the larger), then only the centroids in use,
/// renumbered in order: (codebook, indices, largest |value - centroid|).
fn assign(values: &[f32], centroids: &[f32]) -> (Vec<f32>, Vec<u8>, f64) {
    let bounds: Vec<f64> = centroids
        .windows(2)
        .map(|w| (w[0] as f64 + w[1] as f64) / 2.0)
        .collect();
    let raw: Vec<usize> = values
        .iter()
        .map(|&v| bounds.partition_point(|&b| b <= v as f64))
        .collect();
    let mut used = vec![false; centroids.len()];
    for &i in &raw {
        used[i] = true;
    }
    let mut remap = vec![0u8; centroids.len()];
    let mut codebook = Vec::new();
    for (i, &u) in used.iter().enumerate() {
        if u {
            remap[i] = codebook.len() as u8;
            codebook.push(centroids[i]);
        }
    }
    let mut max_err = 0f64;
    let indices = raw
        .iter()
        .zip(values)
        .map(|(&i, &v)| {
            max_err = max_err.max((v as f64 - centroids[i] as f64).abs());
            remap[i]
        })
        .collect();
    (codebook, indices, max_err)
}

/// The codebook and indices of one weight. Exact zeros keep a centroid of their own at 0: a pruned
/// model keeps its sparsity, and a dead input channel (all-zero weights, often fed by tiny or
/// denormal activations) keeps contributing exactly nothing; mapped onto a small nonzero centroid
/// it turns those activations into denormal outputs, which measured 1.5x slower on PP-OCRv4 rec.
fn cluster(values: &[f32], bits: u8, init: Init) -> (Vec<f32>, Vec<u8>, f64) {
    let k = 1usize << bits;
    let mut sorted: Vec<f32> = values.iter().copied().filter(|v| !v.is_nan()).collect();
    sorted.sort_by(f32::total_cmp);
    let zeros = sorted.iter().filter(|v| **v == 0.0).count();
    let centroids = if zeros > 0 {
        let nonzero: Vec<f32> = sorted.iter().copied().filter(|v| *v != 0.0).collect();
        let mut c = if nonzero.is_empty() {
            Vec::new()
        } else {
            kmeans_1d(&nonzero, k - 1, init)
        };
        c.push(0.0);
        c.sort_by(f32::total_cmp);
        c.dedup();
        c
    } else {
        kmeans_1d(&sorted, k, init)
    };
    assign(values, &centroids)
}

/// The axis of a weight that indexes output channels, as the first node reading it sees it:
/// Conv [Cout, ...] and Gemm with transB [N, K] on axis 0, MatMul and Gemm [K, N] on axis 1.
fn output_axis(g: &crate::onnx::proto::GraphProto, t: &weight_targets::Target) -> Option<usize> {
    let node = &g.node[t.nodes[0]];
    match (node.op_type(), t.dims.len()) {
        ("Conv", r) if r >= 3 => Some(0),
        ("Gemm", 2) => Some(if node.attribute.iter().any(|a| a.name() == "transB" && a.i() != 0) {
            0
        } else {
            1
        }),
        ("MatMul", 2) => Some(1),
        _ => None,
    }
}

/// Largest magnitude per output channel (1 for an all-zero channel), and each value's channel.
fn channel_scales(dims: &[i64], axis: usize, values: &[f32]) -> (Vec<f32>, Vec<usize>) {
    let channels = dims[axis].max(1) as usize;
    let inner: usize = dims[axis + 1..].iter().map(|&d| d.max(0) as usize).product();
    let channel: Vec<usize> = (0..values.len()).map(|i| (i / inner) % channels).collect();
    let mut scales = vec![0f32; channels];
    for (v, &c) in values.iter().zip(&channel) {
        scales[c] = scales[c].max(v.abs());
    }
    for s in scales.iter_mut().filter(|s| **s == 0.0) {
        *s = 1.0;
    }
    (scales, channel)
}

impl Pass for ClusterWeights {
    fn name(&self) -> &'static str {
        "cluster_weights"
    }

    fn ships_zstd_copy(&self) -> bool {
        true
    }

    fn run(&self, input: &Path, output: &Path, _ctx: &PassContext<'_>) -> Result<PassOutput, PassError> {
        let mut model = onnx::load(input).map_err(|e| PassError(e.to_string()))?;
        let graph = model
            .graph
            .as_mut()
            .ok_or_else(|| PassError("the model has no graph".into()))?;
        let index = GraphIndex::new(graph);
        let excluded: HashSet<&str> = self.0.exclude_nodes.iter().map(String::as_str).collect();
        let mut skipped: HashMap<String, usize> = HashMap::new();
        let mut targets = weight_targets::collect(graph, &index, OPS, &excluded, &mut skipped);
        targets.retain(|t| {
            let keep = t.values.len() as u64 >= self.0.min_elements && !t.values.iter().any(|v| v.is_nan());
            if !keep {
                let why = if t.values.iter().any(|v| v.is_nan()) {
                    "the weight holds NaN".to_string()
                } else {
                    format!("fewer than min_elements ({}) values", self.0.min_elements)
                };
                *skipped.entry(why).or_default() += t.nodes.len();
            }
            keep
        });

        let mut names = NameGen::new(graph);
        let mut new_nodes: Vec<NodeProto> = Vec::new();
        let mut out = PassOutput::default();
        let (mut bytes_before, mut bytes_after) = (0u64, 0u64);
        for t in &targets {
            let axis = self.0.per_channel.then(|| output_axis(graph, t)).flatten();
            let scaled = axis.map(|axis| channel_scales(&t.dims, axis, &t.values));
            let (codebook, indices, mut max_err) = match &scaled {
                Some((scales, channel)) => {
                    let normalized: Vec<f32> = t.values.iter().zip(channel).map(|(v, &c)| v / scales[c]).collect();
                    cluster(&normalized, self.0.bits, self.0.init)
                }
                None => cluster(&t.values, self.0.bits, self.0.init),
            };
            let base = sanitize(&t.weight);
            let codebook_name = names.fresh(&format!("{base}_codebook"));
            let indices_name = names.fresh(&format!("{base}_indices"));
            let wide_name = names.fresh(&format!("{base}_indices_int32"));
            let gathered_name = names.fresh(&format!("{base}_gathered"));
            let expanded_name = names.fresh(&format!("{base}_clustered"));
            let n = t.values.len() as u64;
            let channels = scaled.as_ref().map_or(0, |(s, _)| s.len() as u64);
            let after = n + 4 * codebook.len() as u64 + 4 * channels;
            graph.initializer.push(tensor(
                &codebook_name,
                &[codebook.len() as i64],
                DataType::Float,
                codebook.iter().flat_map(|c| c.to_le_bytes()).collect(),
            ));
            let mut cast = node_of(
                &mut names,
                "Cast",
                &[&indices_name],
                &[&wide_name],
                vec![int_attr("to", DataType::Int32 as i64)],
            );
            cast.name = Some(names.fresh(&format!("{base}_Cast")));
            let gather_out = if scaled.is_some() {
                &gathered_name
            } else {
                &expanded_name
            };
            let mut gather = node_of(
                &mut names,
                "Gather",
                &[&codebook_name, &wide_name],
                &[gather_out],
                vec![int_attr("axis", 0)],
            );
            gather.name = Some(names.fresh(&format!("{base}_Gather")));
            if let (Some((scales, channel)), Some(axis)) = (&scaled, axis) {
                // What the Mul computes, in float32, against the original values.
                max_err = t
                    .values
                    .iter()
                    .zip(&indices)
                    .zip(channel)
                    .map(|((v, &i), &c)| (*v as f64 - (codebook[i as usize] * scales[c]) as f64).abs())
                    .fold(0f64, f64::max);
                // [C, 1, ...] on axis 0; [C] on the last axis of a 2-D weight (broadcast).
                let dims: Vec<i64> = if axis == 0 {
                    std::iter::once(scales.len() as i64)
                        .chain(std::iter::repeat_n(1, t.dims.len() - 1))
                        .collect()
                } else {
                    vec![scales.len() as i64]
                };
                let scales_name = names.fresh(&format!("{base}_channel_scales"));
                graph.initializer.push(tensor(
                    &scales_name,
                    &dims,
                    DataType::Float,
                    scales.iter().flat_map(|c| c.to_le_bytes()).collect(),
                ));
                let mut mul = node_of(
                    &mut names,
                    "Mul",
                    &[&gathered_name, &scales_name],
                    &[&expanded_name],
                    vec![],
                );
                mul.name = Some(names.fresh(&format!("{base}_Mul")));
                new_nodes.extend([cast, gather, mul]);
            } else {
                new_nodes.extend([cast, gather]);
            }
            graph
                .initializer
                .push(tensor(&indices_name, &t.dims, DataType::Uint8, indices));

            for &i in &t.nodes {
                graph.node[i].input[1] = expanded_name.clone();
            }
            // Any other reader of the weight (outside the targeted ops) reads the same values.
            graph::rename_uses(graph, &t.weight, &expanded_name);
            bytes_before += 4 * n;
            bytes_after += after;
            out.layers.push(LayerRecord {
                nodes: t.node_names(graph),
                weight: t.weight.clone(),
                shape: t.dims.clone(),
                parameters_before: n,
                parameters_after: n + codebook.len() as u64 + channels,
                bytes_before: 4 * n,
                bytes_after: after,
                clusters: Some(codebook.len() as u64),
                max_abs_error: Some(max_err),
                ..Default::default()
            });
        }
        // The expansions read only initializers: at the front, the graph stays sorted.
        graph.node.splice(0..0, new_nodes);
        let (dead_nodes, dead_weights) = graph::eliminate_dead(graph);

        if targets.is_empty() {
            out.warnings.push(
                "cluster_weights found no MatMul/Gemm/Conv with a constant float32 weight of at least min_elements \
                 values it may change; the model is unchanged"
                    .into(),
            );
        } else {
            let bits = self.0.bits;
            out.notes.push(format!(
                "{} weight(s) clustered to at most {} centroids ({bits} bits): {bytes_before} -> {bytes_after} bytes \
                 ({:.2}x smaller); each index is stored as one uint8 (ONNX has no {bits}-bit type that Gather reads), \
                 so the saving is about 4x whatever the bits{}; {}ONNX Runtime folds the expansion into a float weight at \
                 session load, so the graph it runs is the float model's. {dead_weights} float initializer(s) and \
                 {dead_nodes} Constant node(s) no longer read were removed",
                targets.len(),
                1u32 << bits,
                bytes_before as f64 / bytes_after.max(1) as f64,
                if bits <= 4 {
                    format!(
                        "; with {bits} bits an index takes one of {} values, so model.onnx.zst is smaller still",
                        1u32 << bits
                    )
                } else {
                    String::new()
                },
                if self.0.per_channel {
                    "values scaled per output channel (one float scale each, a Mul after the Gather); "
                } else {
                    ""
                }
            ));
        }
        out.notes.extend(skipped_notes(skipped));
        external::save(&model, output, None).map_err(|e| PassError(e.to_string()))?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn few_distinct_values_are_reproduced_exactly() {
        let values = [0.5f32, -1.0, 0.5, 2.0, -1.0];
        let (codebook, indices, err) = cluster(&values, 2, Init::Linear);
        assert_eq!(codebook, vec![-1.0, 0.5, 2.0]);
        assert_eq!(indices, vec![1, 0, 1, 2, 0]);
        assert_eq!(err, 0.0);
    }

    #[test]
    fn two_well_separated_groups_converge_to_their_means() {
        let mut values: Vec<f32> = (0..50).map(|i| -1.0 + i as f32 * 1e-3).collect();
        values.extend((0..50).map(|i| 3.0 + i as f32 * 1e-3));
        for init in [Init::Linear, Init::Quantile] {
            let c = kmeans_1d(&values, 2, init);
            assert!((c[0] - (-1.0 + 0.0245)).abs() < 1e-4, "{init:?} {c:?}");
            assert!((c[1] - (3.0 + 0.0245)).abs() < 1e-4, "{init:?} {c:?}");
        }
    }

    #[test]
    fn every_value_maps_to_its_nearest_centroid_and_zeros_stay_zero() {
        let values: Vec<f32> = (0..1000)
            .map(|i| {
                if i % 3 == 0 {
                    0.0
                } else {
                    ((i * 7919 % 1000) as f32 / 500.0) - 1.0
                }
            })
            .collect();
        let (codebook, indices, err) = cluster(&values, 3, Init::Linear);
        assert!(codebook.len() <= 8);
        for (v, &i) in values.iter().zip(&indices) {
            let d = (v - codebook[i as usize]).abs();
            assert!(codebook.iter().all(|c| (v - c).abs() >= d - 1e-7));
            if *v == 0.0 {
                assert_eq!(codebook[i as usize], 0.0);
            }
            assert!(d as f64 <= err + 1e-12);
        }
    }

    #[test]
    fn bits_are_checked() {
        let p = |bits| ClusterParams {
            bits,
            init: Init::Linear,
            min_elements: 0,
            per_channel: true,
            exclude_nodes: vec![],
        };
        assert!(p(1).validate().unwrap_err().contains("bits"));
        assert!(p(9).validate().unwrap_err().contains("bits"));
        p(2).validate().unwrap();
        p(8).validate().unwrap();
    }
}

//! `prune_unstructured`: magnitude pruning of MatMul/Gemm/Conv weights. The smallest-magnitude
//! values are set to exactly zero, across all weights together (`global`) or weight by weight
//! (`per_layer`), or in N:M groups along the reduction axis (`pattern: "2:4"`, the layout sparse
//! tensor cores accelerate). The graph is unchanged and the dense file is no smaller: ONNX Runtime
//! has no sparse kernels for these ops on CPU, so the gain is in transfer and storage, which is why
//! the job also ships `model.onnx.zst` and the report gives both sizes.

use std::collections::{HashMap, HashSet};
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::weight_targets::{self, Target};
use super::weights::skipped_notes;
use super::{LayerRecord, Pass, PassContext, PassError, PassOutput};
use crate::onnx::graph::GraphIndex;
use crate::onnx::proto::GraphProto;
use crate::onnx::{self, external};

const OPS: &[&str] = &["MatMul", "Gemm", "Conv"];

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Scope {
    /// One magnitude threshold over every targeted weight: layers with many small weights lose more.
    Global,
    /// The same sparsity in every weight.
    PerLayer,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PruneParams {
    /// Share of the targeted weights' values set to zero, in [0, 1). Required unless `pattern` is
    /// given (which fixes it at 1 - N/M).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sparsity: Option<f64>,
    #[serde(default = "default_scope")]
    pub scope: Scope,
    /// `"N:M"`: keep the N largest of every M consecutive values along the reduction axis.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pattern: Option<String>,
    #[serde(default)]
    pub exclude_nodes: Vec<String>,
}

fn default_scope() -> Scope {
    Scope::PerLayer
}

impl PruneParams {
    pub fn validate(&self) -> Result<(), String> {
        match (&self.pattern, self.sparsity) {
            (None, None) => Err("give a target \"sparsity\" in [0, 1), or a \"pattern\" such as \"2:4\"".into()),
            (Some(_), Some(_)) => {
                Err("give \"sparsity\" or \"pattern\", not both (an N:M pattern fixes the sparsity at 1 - N/M)".into())
            }
            (Some(p), None) => parse_pattern(p).map(|_| ()),
            (None, Some(s)) if !(0.0..1.0).contains(&s) => Err(format!("sparsity {s} is not within [0, 1)")),
            (None, Some(_)) => Ok(()),
        }
    }
}

/// `"N:M"` with 1 <= N < M <= 64.
fn parse_pattern(p: &str) -> Result<(usize, usize), String> {
    let bad = || format!("pattern {p:?} is not \"N:M\" with 1 <= N < M <= 64 (e.g. \"2:4\")");
    let (n, m) = p.split_once(':').ok_or_else(bad)?;
    let (n, m): (usize, usize) = (
        n.trim().parse().map_err(|_| bad())?,
        m.trim().parse().map_err(|_| bad())?,
    );
    if n == 0 || n >= m || m > 64 {
        return Err(bad());
    }
    Ok((n, m))
}

pub struct PruneUnstructured(pub PruneParams);

/// How a weight's values line up along the reduction axis (the one an output sums over):
/// `outputs` rows of `reduce` values, value `r` of row `o` at `o * outer_stride + r * stride`.
struct Layout {
    outputs: usize,
    reduce: usize,
    outer_stride: usize,
    stride: usize,
}

fn layout(g: &GraphProto, t: &Target) -> Option<Layout> {
    let node = &g.node[t.nodes[0]];
    let dims: Vec<usize> = t.dims.iter().map(|&d| d.max(0) as usize).collect();
    match (node.op_type(), dims.as_slice()) {
        ("Conv", [cout, rest @ ..]) if !rest.is_empty() => {
            let reduce = rest.iter().product();
            Some(Layout {
                outputs: *cout,
                reduce,
                outer_stride: reduce,
                stride: 1,
            })
        }
        ("Gemm", [rows, cols]) => {
            let trans_b = node
                .attribute
                .iter()
                .find(|a| a.name() == "transB")
                .is_some_and(|a| a.i() != 0);
            Some(if trans_b {
                // Stored [N, K]: each output's K values are contiguous.
                Layout {
                    outputs: *rows,
                    reduce: *cols,
                    outer_stride: *cols,
                    stride: 1,
                }
            } else {
                Layout {
                    outputs: *cols,
                    reduce: *rows,
                    outer_stride: 1,
                    stride: *cols,
                }
            })
        }
        ("MatMul", [k, n]) => Some(Layout {
            outputs: *n,
            reduce: *k,
            outer_stride: 1,
            stride: *n,
        }),
        _ => None,
    }
}

/// Zeroes the `count` smallest-magnitude values among `keys` (|value| bits, target, index); the
/// key is a total order, so equal magnitudes are broken by position and the result is the same on
/// every run.
fn zero_smallest(targets: &mut [Target], mut keys: Vec<(u32, u32, u32)>, count: usize) {
    if count == 0 {
        return;
    }
    let count = count.min(keys.len());
    if count < keys.len() {
        keys.select_nth_unstable(count);
    }
    for &(_, t, i) in &keys[..count] {
        targets[t as usize].values[i as usize] = 0.0;
    }
}

fn magnitude_keys(targets: &[Target], which: impl Iterator<Item = usize>) -> Vec<(u32, u32, u32)> {
    which
        .flat_map(|t| {
            targets[t]
                .values
                .iter()
                .enumerate()
                .map(move |(i, v)| (v.abs().to_bits(), t as u32, i as u32))
        })
        .collect()
}

/// Keeps the `n` largest of every `m` consecutive values along the reduction axis.
fn prune_n_of_m(values: &mut [f32], l: &Layout, n: usize, m: usize) {
    for o in 0..l.outputs {
        for group in 0..l.reduce / m {
            let mut members: Vec<(u32, usize)> = (0..m)
                .map(|j| {
                    let at = o * l.outer_stride + (group * m + j) * l.stride;
                    (values[at].abs().to_bits(), at)
                })
                .collect();
            members.sort_unstable();
            for &(_, at) in &members[..m - n] {
                values[at] = 0.0;
            }
        }
    }
}

impl Pass for PruneUnstructured {
    fn name(&self) -> &'static str {
        "prune_unstructured"
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
        let zeros_in = |v: &[f32]| v.iter().filter(|x| **x == 0.0).count() as u64;
        let before: HashMap<String, u64> = targets
            .iter()
            .map(|t| (t.weight.clone(), zeros_in(&t.values)))
            .collect();
        let mut out = PassOutput::default();

        let what = match &self.0.pattern {
            Some(p) => {
                let (n, m) = parse_pattern(p).map_err(PassError)?;
                let mut untouched = Vec::new();
                for t in targets.iter_mut() {
                    match layout(graph, t).filter(|l| l.reduce % m == 0) {
                        Some(l) => prune_n_of_m(&mut t.values, &l, n, m),
                        None => untouched.push(t.weight.clone()),
                    }
                }
                if !untouched.is_empty() {
                    out.notes.push(format!(
                        "{} weight(s) left dense: their reduction axis is not a multiple of {m} ({})",
                        untouched.len(),
                        untouched.join(", ")
                    ));
                    targets.retain(|t| !untouched.contains(&t.weight));
                }
                format!("{n}:{m} pattern along the reduction axis")
            }
            None => {
                let sparsity = self.0.sparsity.unwrap_or(0.0);
                match self.0.scope {
                    Scope::Global => {
                        let keys = magnitude_keys(&targets, 0..targets.len());
                        let count = (sparsity * keys.len() as f64).round() as usize;
                        zero_smallest(&mut targets, keys, count);
                    }
                    Scope::PerLayer => {
                        for t in 0..targets.len() {
                            let keys = magnitude_keys(&targets, std::iter::once(t));
                            let count = (sparsity * keys.len() as f64).round() as usize;
                            zero_smallest(&mut targets, keys, count);
                        }
                    }
                }
                format!(
                    "target sparsity {sparsity}, {}",
                    if self.0.scope == Scope::Global {
                        "one global threshold"
                    } else {
                        "per layer"
                    }
                )
            }
        };

        let (mut total, mut zeros, mut newly) = (0u64, 0u64, 0u64);
        for t in &targets {
            let was = before[&t.weight];
            let n = t.values.len() as u64;
            let z = zeros_in(&t.values);
            total += n;
            zeros += z;
            newly += z - was;
            let (was, now) = (was as f64 / n.max(1) as f64, z as f64 / n.max(1) as f64);
            if now >= 0.99 && was < 0.99 {
                out.warnings.push(format!(
                    "prune_unstructured left weight {:?} {:.1}% zero: its layer now passes almost nothing on \
                     (use scope \"per_layer\" or exclude its node)",
                    t.weight,
                    now * 100.0
                ));
            }
            out.layers.push(LayerRecord {
                nodes: t.node_names(graph),
                weight: t.weight.clone(),
                shape: t.dims.clone(),
                parameters_before: n,
                parameters_after: n,
                bytes_before: 4 * n,
                bytes_after: 4 * n,
                sparsity_before: Some(was),
                sparsity: Some(now),
                ..Default::default()
            });
        }
        for t in &targets {
            weight_targets::store(graph, &index, &t.weight, &t.values);
        }
        if targets.is_empty() {
            out.warnings.push(
                "prune_unstructured found no MatMul/Gemm/Conv with a constant float32 weight it may change; the \
                 model is unchanged"
                    .into(),
            );
        } else if newly == 0 {
            out.notes.push(format!(
                "no value was zeroed: the {} weight(s) already meet the target; the model is unchanged",
                targets.len()
            ));
        }
        out.notes.insert(
            0,
            format!(
                "{} weight(s), {total} values: {newly} set to zero, now {:.2}% zero ({what}); the dense file is not \
                 smaller (ONNX Runtime has no sparse CPU kernels for these ops): see model.onnx.zst for the \
                 compressed size",
                targets.len(),
                if total > 0 {
                    zeros as f64 * 100.0 / total as f64
                } else {
                    0.0
                }
            ),
        );
        out.notes.extend(skipped_notes(skipped));
        external::save(&model, output, None).map_err(|e| PassError(e.to_string()))?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(v: serde_json::Value) -> Result<PruneParams, String> {
        let p: PruneParams = serde_json::from_value(v).map_err(|e| e.to_string())?;
        p.validate().map(|_| p)
    }

    #[test]
    fn parameters_are_checked() {
        use serde_json::json;
        assert!(params(json!({})).unwrap_err().contains("sparsity"));
        assert!(params(json!({"sparsity": 1.0})).unwrap_err().contains("[0, 1)"));
        assert!(
            params(json!({"sparsity": 0.5, "pattern": "2:4"}))
                .unwrap_err()
                .contains("not both")
        );
        assert!(params(json!({"pattern": "4:2"})).unwrap_err().contains("N:M"));
        assert!(params(json!({"pattern": "x"})).unwrap_err().contains("N:M"));
        assert!(params(json!({"sparsity": 0.5, "scope": "everywhere"})).is_err());
        assert_eq!(params(json!({"sparsity": 0.5})).unwrap().scope, Scope::PerLayer);
        params(json!({"pattern": "2:4", "scope": "global"})).unwrap();
    }

    #[test]
    fn n_of_m_keeps_the_largest_of_each_group_along_the_reduction_axis() {
        // MatMul weight [K=4, N=2]: column 0 is (1, -4, 2, 3), column 1 is (0.5, 0.1, -0.2, 0.3).
        let mut v = vec![1.0, 0.5, -4.0, 0.1, 2.0, -0.2, 3.0, 0.3];
        let l = Layout {
            outputs: 2,
            reduce: 4,
            outer_stride: 1,
            stride: 2,
        };
        prune_n_of_m(&mut v, &l, 2, 4);
        assert_eq!(v, vec![0.0, 0.5, -4.0, 0.0, 0.0, 0.0, 3.0, 0.3]);
    }
}

//! `low_rank`: a MatMul/Gemm weight W [K, N] becomes two factors from its truncated SVD,
//! U·√S [K, r] and √S·Vᵀ [r, N], so `X·W` becomes `(X·U)·V`: r(K + N) weights and MACs per row
//! instead of K·N. The rank keeps a share of the squared singular values (`energy`) or a share of
//! the full rank (`rank_ratio`), and a layer is only factorized when that saves at least
//! `min_saving` of its parameters; below that the two MatMuls cost more than they save.

use std::collections::{HashMap, HashSet};
use std::path::Path;

use faer::Mat;
use serde::{Deserialize, Serialize};

use super::weight_targets;
use super::weights::{Weight, node_of, sanitize, skipped_notes, tensor, weight_of};
use super::{LayerRecord, Pass, PassContext, PassError, PassOutput};
use crate::onnx::graph::{self, GraphIndex, NameGen};
use crate::onnx::proto::NodeProto;
use crate::onnx::proto::tensor_proto::DataType;
use crate::onnx::{self, external};

const OPS: &[&str] = &["MatMul", "Gemm"];
const DEFAULT_ENERGY: f64 = 0.95;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LowRankParams {
    /// Keep the smallest rank whose singular values hold this share of Σσ² (default 0.95).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub energy: Option<f64>,
    /// Or keep this share of min(K, N), rounded up.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rank_ratio: Option<f64>,
    /// Factorize only when r(K + N) <= (1 - min_saving)·K·N.
    #[serde(default = "default_min_saving")]
    pub min_saving: f64,
    #[serde(default)]
    pub exclude_nodes: Vec<String>,
}

fn default_min_saving() -> f64 {
    0.2
}

impl LowRankParams {
    pub fn validate(&self) -> Result<(), String> {
        if self.energy.is_some() && self.rank_ratio.is_some() {
            return Err("give \"energy\" or \"rank_ratio\", not both".into());
        }
        if let Some(e) = self.energy
            && !(e > 0.0 && e <= 1.0)
        {
            return Err(format!("energy {e} is not within (0, 1]"));
        }
        if let Some(r) = self.rank_ratio
            && !(r > 0.0 && r <= 1.0)
        {
            return Err(format!("rank_ratio {r} is not within (0, 1]"));
        }
        if !(0.0..1.0).contains(&self.min_saving) {
            return Err(format!("min_saving {} is not within [0, 1)", self.min_saving));
        }
        Ok(())
    }
}

pub struct LowRank(pub LowRankParams);

/// The two factors of one weight and what they keep.
struct Factors {
    rank: usize,
    /// [K, r] row-major.
    u: Vec<f32>,
    /// [r, N] row-major.
    v: Vec<f32>,
    energy: f64,
    max_abs_error: f64,
}

/// Chooses the rank and splits the singular values evenly between the factors (√σ each), which
/// keeps both factors' magnitudes alike. Errors only if the SVD does not converge.
fn factorize(w: &Weight, params: &LowRankParams) -> Result<Factors, String> {
    let (k, n) = (w.k, w.n);
    let m = Mat::<f64>::from_fn(k, n, |i, j| w.values[i * n + j] as f64);
    let svd = m.thin_svd().map_err(|e| format!("the SVD did not converge: {e:?}"))?;
    let (u, s, v) = (svd.U(), svd.S().column_vector(), svd.V());
    let full = k.min(n);
    let sigma: Vec<f64> = (0..full).map(|i| s[i]).collect();
    let total: f64 = sigma.iter().map(|x| x * x).sum();
    let rank = match params.rank_ratio {
        Some(ratio) => ((ratio * full as f64).ceil() as usize).clamp(1, full),
        None => {
            let target = params.energy.unwrap_or(DEFAULT_ENERGY) * total;
            let mut kept = 0.0;
            let mut r = full;
            for (i, x) in sigma.iter().enumerate() {
                kept += x * x;
                // A relative tolerance, so energy 1.0 stops at the numerical rank.
                if kept >= target * (1.0 - 1e-12) {
                    r = i + 1;
                    break;
                }
            }
            r.max(1)
        }
    };
    let kept: f64 = sigma[..rank].iter().map(|x| x * x).sum();
    let root: Vec<f64> = sigma[..rank].iter().map(|x| x.sqrt()).collect();
    let mut uf = vec![0f32; k * rank];
    for i in 0..k {
        for j in 0..rank {
            uf[i * rank + j] = (u[(i, j)] * root[j]) as f32;
        }
    }
    let mut vf = vec![0f32; rank * n];
    for j in 0..rank {
        for c in 0..n {
            vf[j * n + c] = (root[j] * v[(c, j)]) as f32;
        }
    }
    let mut max_abs_error = 0f64;
    for i in 0..k {
        for c in 0..n {
            let approx: f64 = (0..rank).map(|j| uf[i * rank + j] as f64 * vf[j * n + c] as f64).sum();
            max_abs_error = max_abs_error.max((approx - w.values[i * n + c] as f64).abs());
        }
    }
    Ok(Factors {
        rank,
        u: uf,
        v: vf,
        energy: if total > 0.0 { kept / total } else { 1.0 },
        max_abs_error,
    })
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

impl Pass for LowRank {
    fn name(&self) -> &'static str {
        "low_rank"
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
        let targets = weight_targets::collect(graph, &index, OPS, &excluded, &mut skipped);
        let mut names = NameGen::new(graph);
        let mut out = PassOutput::default();
        // Node index → the MatMul by U inserted before it.
        let mut inserted: HashMap<usize, NodeProto> = HashMap::new();
        let (mut before, mut after) = (0u64, 0u64);
        let mut no_saving = Vec::new();
        for t in &targets {
            let mut skip = |why: String| *skipped.entry(why).or_default() += t.nodes.len();
            if index.consumers_of(&t.weight).len() != t.nodes.len() {
                skip("the weight is also read by a node that is not a MatMul/Gemm weight input".into());
                continue;
            }
            // Each reader's view of the weight as [K, N]; readers that see it differently (a MatMul
            // and a Gemm with transB) cannot share one pair of factors.
            let views: Result<Vec<Weight>, String> = t
                .nodes
                .iter()
                .map(|&i| weight_of(&graph.node[i], &index, graph))
                .collect();
            let views = match views {
                Ok(v) => v,
                Err(why) => {
                    skip(why);
                    continue;
                }
            };
            let w = &views[0];
            if views[1..]
                .iter()
                .any(|o| (o.k, o.n) != (w.k, w.n) || o.values != w.values)
            {
                skip("nodes sharing the weight read it in different layouts".into());
                continue;
            }
            let f = factorize(w, &self.0).map_err(|e| PassError(format!("weight {:?}: {e}", t.weight)))?;
            let (dense, factored) = ((w.k * w.n) as u64, (f.rank * (w.k + w.n)) as u64);
            if factored as f64 > (1.0 - self.0.min_saving) * dense as f64 {
                no_saving.push(format!(
                    "{} (rank {} of {}: {factored} vs {dense} weights)",
                    t.weight,
                    f.rank,
                    w.k.min(w.n)
                ));
                continue;
            }
            let base = sanitize(&t.weight);
            let u_name = names.fresh(&format!("{base}_lowrank_U"));
            let v_name = names.fresh(&format!("{base}_lowrank_V"));
            graph.initializer.push(tensor(
                &u_name,
                &[w.k as i64, f.rank as i64],
                DataType::Float,
                f32_bytes(&f.u),
            ));
            graph.initializer.push(tensor(
                &v_name,
                &[f.rank as i64, w.n as i64],
                DataType::Float,
                f32_bytes(&f.v),
            ));
            for &i in &t.nodes {
                let node = &mut graph.node[i];
                let mid = names.fresh(&format!("{}_lowrank", sanitize(node.name())));
                let mut first = node_of(&mut names, "MatMul", &[&node.input[0], &u_name], &[&mid], vec![]);
                first.name = Some(names.fresh(&format!("{}_U", node.name())));
                node.input[0] = mid;
                node.input[1] = v_name.clone();
                // V is stored [r, N]: a Gemm reads it untransposed.
                node.attribute.retain(|a| a.name() != "transB");
                inserted.insert(i, first);
            }
            before += dense;
            after += factored;
            out.layers.push(LayerRecord {
                nodes: t.node_names(graph),
                weight: t.weight.clone(),
                shape: t.dims.clone(),
                parameters_before: dense,
                parameters_after: factored,
                bytes_before: 4 * dense,
                bytes_after: 4 * factored,
                rank: Some(f.rank as u64),
                retained_energy: Some(f.energy),
                max_abs_error: Some(f.max_abs_error),
                ..Default::default()
            });
        }
        if !inserted.is_empty() {
            let nodes = std::mem::take(&mut graph.node);
            for (i, node) in nodes.into_iter().enumerate() {
                if let Some(first) = inserted.remove(&i) {
                    graph.node.push(first);
                }
                graph.node.push(node);
            }
        }
        let (dead_nodes, dead_weights) = graph::eliminate_dead(graph);
        let factorized = out.layers.len();
        let how = match (self.0.rank_ratio, self.0.energy) {
            (Some(r), _) => format!("rank_ratio {r}"),
            (None, e) => format!("energy {}", e.unwrap_or(DEFAULT_ENERGY)),
        };
        if factorized == 0 {
            out.warnings.push(format!(
                "low_rank factorized no weight ({how}, min_saving {}); the model is unchanged",
                self.0.min_saving
            ));
        } else {
            out.notes.push(format!(
                "{factorized} weight(s) factorized ({how}): {before} -> {after} weights and MACs per row ({:.1}% \
                 fewer); {dead_weights} float initializer(s) and {dead_nodes} Constant node(s) no longer read were \
                 removed",
                100.0 * (1.0 - after as f64 / before.max(1) as f64)
            ));
        }
        if !no_saving.is_empty() {
            out.notes.push(format!(
                "{} weight(s) kept dense: the rank needed saves less than min_saving {}: {}",
                no_saving.len(),
                self.0.min_saving,
                no_saving.join(", ")
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

    fn params(energy: Option<f64>, rank_ratio: Option<f64>) -> LowRankParams {
        LowRankParams {
            energy,
            rank_ratio,
            min_saving: 0.2,
            exclude_nodes: vec![],
        }
    }

    #[test]
    fn a_rank_two_matrix_is_found_and_reproduced() {
        // W = a·bᵀ + c·dᵀ, [12, 9], rank 2.
        let (k, n) = (12, 9);
        let values: Vec<f32> = (0..k * n)
            .map(|x| {
                let (i, j) = ((x / n) as f32, (x % n) as f32);
                (i + 1.0) * (j - 4.0) * 0.1 + (i * 0.3).sin() * (j * 0.7).cos()
            })
            .collect();
        let w = Weight { k, n, values };
        let f = factorize(&w, &params(Some(1.0), None)).unwrap();
        assert_eq!(f.rank, 2);
        assert!(f.max_abs_error < 1e-5, "{}", f.max_abs_error);
        assert!((f.energy - 1.0).abs() < 1e-9);
        let half = factorize(&w, &params(None, Some(0.5))).unwrap();
        assert_eq!(half.rank, 5);
    }

    #[test]
    fn parameters_are_checked() {
        assert!(
            params(Some(0.9), Some(0.5))
                .validate()
                .unwrap_err()
                .contains("not both")
        );
        assert!(params(Some(0.0), None).validate().unwrap_err().contains("energy"));
        assert!(params(None, Some(1.5)).validate().unwrap_err().contains("rank_ratio"));
        let mut p = params(None, None);
        p.min_saving = 1.0;
        assert!(p.validate().unwrap_err().contains("min_saving"));
        params(None, None).validate().unwrap();
    }
}

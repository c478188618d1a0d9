//! `reconstruct`: training-free layer-wise distillation. After a lossy pass (structured pruning,
//! low-rank factorization, quantization of earlier layers), the compressed model (student) and the
//! original (teacher) run on calibration samples, and each float MatMul/Gemm of the student whose
//! output the teacher also computes is re-fitted by least squares, weights and bias together, so
//! its output matches the teacher's given the student's own (already damaged) input — the
//! reconstruction step of ThiNet-style pruning and of bias correction. Layers are fitted in
//! topological order, each on the student as fitted so far, from statistics accumulated sample by
//! sample (memory does not grow with the data).

use std::collections::HashSet;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::prune_structured::{f32_values, replace_constant};
use super::weights::{constant, weight_of};
use super::{Pass, PassContext, PassError, PassOutput};
use crate::eval::inputs::TensorData;
use crate::eval::session::PreparedInputs;
use crate::onnx::graph::GraphIndex;
use crate::onnx::proto::ModelProto;
use crate::onnx::proto::tensor_proto::DataType;
use crate::onnx::{self, external};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReconstructParams {
    #[serde(default = "default_samples")]
    pub max_samples: usize,
    /// Ridge term, relative to the mean diagonal of XᵀX: keeps the fit stable when activations are
    /// collinear (pruned ReLUs that are always zero).
    #[serde(default = "default_ridge")]
    pub ridge: f64,
    #[serde(default)]
    pub exclude_nodes: Vec<String>,
}

fn default_samples() -> usize {
    128
}

fn default_ridge() -> f64 {
    1e-3
}

impl ReconstructParams {
    pub fn validate(&self) -> Result<(), String> {
        if self.max_samples == 0 {
            return Err("max_samples must be positive".into());
        }
        if !(self.ridge.is_finite() && self.ridge >= 0.0) {
            return Err("ridge must be a non-negative number".into());
        }
        Ok(())
    }
}

pub struct Reconstruct(pub ReconstructParams);

/// Largest input width (plus bias) fitted: the normal equations are d×d.
const MAX_WIDTH: usize = 4096;

/// A student layer to fit.
#[derive(Debug, Clone)]
struct Layer {
    node: String,
    input: String,
    weight: String,
    /// Gemm with transB: the weight is stored [N, K].
    transposed: bool,
    /// The bias constant fitted with the weight (Gemm's C, or the following Add's constant).
    bias: Option<String>,
    /// The tensor matched against the teacher's tensor of the same name.
    target: String,
    k: usize,
    n: usize,
}

fn layers(student: &ModelProto, teacher_names: &HashSet<String>, excluded: &HashSet<&str>) -> Vec<Layer> {
    let Some(g) = student.graph.as_ref() else {
        return Vec::new();
    };
    let index = GraphIndex::new(g);
    let owned_by = |name: &str, node: usize| index.consumers_of(name) == [node];
    let mut out = Vec::new();
    for (i, node) in g.node.iter().enumerate() {
        if !matches!(node.domain(), "" | "ai.onnx") || !matches!(node.op_type(), "MatMul" | "Gemm") {
            continue;
        }
        if excluded.contains(node.name()) || node.name().is_empty() {
            continue;
        }
        let Ok(w) = weight_of(node, &index, g) else { continue };
        let w_name = node.input[1].clone();
        if !owned_by(&w_name, i) || g.output.iter().any(|o| o.name() == w_name) {
            continue;
        }
        let transposed = node.op_type() == "Gemm" && node.attribute.iter().any(|a| a.name() == "transB" && a.i() != 0);
        let gemm_bias = (node.op_type() == "Gemm")
            .then(|| node.input.get(2).filter(|c| !c.is_empty()).cloned())
            .flatten();
        let output = node.output[0].clone();
        let (bias, target) = match gemm_bias {
            Some(c) => {
                let ok = constant(&index, g, &c).is_some_and(|t| t.dims.iter().product::<i64>() == w.n as i64)
                    && owned_by(&c, i);
                if !ok {
                    continue;
                }
                (Some(c), output)
            }
            None => {
                // A bias Add right after: fit it with the weight.
                let next = index.consumers_of(&output);
                let add = (next.len() == 1)
                    .then(|| &g.node[next[0]])
                    .filter(|a| a.op_type() == "Add" && a.input.len() == 2);
                let bias = add.and_then(|a| {
                    let other = if a.input[0] == output { &a.input[1] } else { &a.input[0] };
                    let t = constant(&index, g, other)?;
                    (t.dims.iter().product::<i64>() == w.n as i64
                        && t.data_type() == DataType::Float as i32
                        && owned_by(other, next[0])
                        && teacher_names.contains(&a.output[0]))
                    .then(|| (other.clone(), a.output[0].clone()))
                });
                match bias {
                    Some((b, t)) => (Some(b), t),
                    None => (None, output),
                }
            }
        };
        if !teacher_names.contains(&target) {
            continue;
        }
        out.push(Layer {
            node: node.name().to_string(),
            input: node.input[0].clone(),
            weight: w_name,
            transposed,
            bias,
            target,
            k: w.k,
            n: w.n,
        });
    }
    out
}

fn with_outputs(model: &ModelProto, names: &[&str], path: &Path) -> Result<(), String> {
    std::fs::write(path, crate::onnx::graph::exposing_outputs(model, names)).map_err(|e| e.to_string())
}

/// Solves (A) X = B for symmetric positive definite A (d×d) and B (d×n), by Cholesky.
fn solve_spd(a: &[f64], b: &[f64], d: usize, n: usize) -> Option<Vec<f64>> {
    let mut l = vec![0f64; d * d];
    for i in 0..d {
        for j in 0..=i {
            let mut s = a[i * d + j];
            for k in 0..j {
                s -= l[i * d + k] * l[j * d + k];
            }
            if i == j {
                if s <= 0.0 || !s.is_finite() {
                    return None;
                }
                l[i * d + i] = s.sqrt();
            } else {
                l[i * d + j] = s / l[j * d + j];
            }
        }
    }
    let mut x = vec![0f64; d * n];
    for c in 0..n {
        // L y = b
        let mut y = vec![0f64; d];
        for i in 0..d {
            let mut s = b[i * n + c];
            for k in 0..i {
                s -= l[i * d + k] * y[k];
            }
            y[i] = s / l[i * d + i];
        }
        // Lᵀ x = y
        for i in (0..d).rev() {
            let mut s = y[i];
            for k in i + 1..d {
                s -= l[k * d + i] * x[k * n + c];
            }
            x[i * n + c] = s / l[i * d + i];
        }
    }
    Some(x)
}

impl Pass for Reconstruct {
    fn name(&self) -> &'static str {
        "reconstruct"
    }

    fn calibrates(&self) -> bool {
        true
    }

    fn run(&self, input: &Path, output: &Path, ctx: &PassContext<'_>) -> Result<PassOutput, PassError> {
        let err = |m: String| PassError(m);
        let calibration = ctx
            .calibration
            .ok_or_else(|| err("reconstruct needs calibration samples".into()))?;
        let mut student = onnx::load(input).map_err(|e| err(e.to_string()))?;
        let teacher = onnx::load(ctx.original).map_err(|e| err(format!("the original model: {e}")))?;
        let teacher_names: HashSet<String> = teacher
            .graph
            .iter()
            .flat_map(|g| g.node.iter().flat_map(|n| n.output.iter().cloned()))
            .collect();
        let excluded: HashSet<&str> = self.0.exclude_nodes.iter().map(String::as_str).collect();
        let found = layers(&student, &teacher_names, &excluded);
        let mut out = PassOutput::default();
        if found.is_empty() {
            out.warnings.push(
                "reconstruct found no float MatMul/Gemm whose output the original also computes; the model is \
                 unchanged"
                    .into(),
            );
            external::save(&student, output, None).map_err(|e| err(e.to_string()))?;
            return Ok(out);
        }
        let samples = calibration.len().min(self.0.max_samples);
        let (teacher_path, student_path) = (
            ctx.work_dir.join("reconstruct-teacher.onnx"),
            ctx.work_dir.join("reconstruct-student.onnx"),
        );
        let mut fitted = 0usize;
        for layer in &found {
            let d = layer.k + usize::from(layer.bias.is_some());
            if d > MAX_WIDTH {
                out.notes.push(format!(
                    "{}: input width {} is over {MAX_WIDTH}; not fitted",
                    layer.node, layer.k
                ));
                continue;
            }
            with_outputs(&teacher, &[&layer.target], &teacher_path).map_err(err)?;
            with_outputs(&student, &[&layer.input, &layer.target], &student_path).map_err(err)?;
            let mut ts = ctx
                .runtime
                .session(&teacher_path, ctx.threads)
                .map_err(|e| err(e.to_string()))?;
            let mut ss = ctx
                .runtime
                .session(&student_path, ctx.threads)
                .map_err(|e| err(e.to_string()))?;
            let n = layer.n;
            let mut xtx = vec![0f64; d * d];
            let mut xty = vec![0f64; d * n];
            let mut yty = 0f64;
            let mut rows = 0u64;
            let mut mismatch = false;
            for s in 0..samples {
                let sample = calibration.sample(s).map_err(err)?;
                let prepared = PreparedInputs::new(&sample).map_err(|e| err(e.to_string()))?;
                let t_out = prepared.run_and_collect(&mut ts).map_err(|e| err(e.to_string()))?;
                let s_out = prepared.run_and_collect(&mut ss).map_err(|e| err(e.to_string()))?;
                let find = |outs: &[crate::eval::session::OutputTensor], name: &str| {
                    outs.iter().find(|o| o.name == name).and_then(|o| o.values.clone())
                };
                let x = match find(&s_out, &layer.input) {
                    Some(x) => x,
                    // A graph input: read it from the sample itself.
                    None => {
                        let t = sample
                            .iter()
                            .find(|t| t.name == layer.input)
                            .ok_or_else(|| err(format!("{}: its input is not observable", layer.node)))?;
                        match &t.data {
                            TensorData::F32(v) => v.iter().map(|&x| x as f64).collect(),
                            TensorData::F64(v) => v.clone(),
                            _ => return Err(err(format!("{}: its input is not float", layer.node))),
                        }
                    }
                };
                let y =
                    find(&t_out, &layer.target).ok_or_else(|| err(format!("the teacher lacks {}", layer.target)))?;
                if x.len() % layer.k != 0 || y.len() != x.len() / layer.k * n {
                    // A layer whose outputs were pruned no longer computes the original's tensor.
                    mismatch = true;
                    break;
                }
                for (xr, yr) in x.chunks_exact(layer.k).zip(y.chunks_exact(n)) {
                    let row: Vec<f64> = if layer.bias.is_some() {
                        xr.iter().copied().chain(std::iter::once(1.0)).collect()
                    } else {
                        xr.to_vec()
                    };
                    for i in 0..d {
                        let ri = row[i];
                        if ri == 0.0 {
                            continue;
                        }
                        for j in 0..=i {
                            xtx[i * d + j] += ri * row[j];
                        }
                        for (c, &yc) in yr.iter().enumerate() {
                            xty[i * n + c] += ri * yc;
                        }
                    }
                    yty += yr.iter().map(|v| v * v).sum::<f64>();
                    rows += 1;
                }
            }
            if mismatch {
                out.notes.push(format!(
                    "{}: its output no longer has the original's shape (pruned); not fitted",
                    layer.node
                ));
                continue;
            }
            // Fewer rows than twice the unknowns per output: the fit would follow the calibration
            // samples, not the layer (seen on PP-OCR cls's classifier with 32 synthetic samples).
            if (rows as usize) < 2 * d {
                out.notes.push(format!(
                    "{}: {rows} calibration row(s) for {d} unknowns per output; too few to fit, kept",
                    layer.node
                ));
                continue;
            }
            for i in 0..d {
                for j in 0..i {
                    xtx[j * d + i] = xtx[i * d + j];
                }
            }
            // The current weights (and bias) as one [d, n] matrix, to score before and after.
            let g = student.graph.as_ref().expect("has a graph");
            let index = GraphIndex::new(g);
            let node = g.node.iter().find(|nd| nd.name() == layer.node).expect("found above");
            let current = weight_of(node, &index, g).map_err(err)?;
            let mut w0: Vec<f64> = current.values.iter().map(|&v| v as f64).collect();
            if let Some(b) = &layer.bias {
                let bt = constant(&index, g, b)
                    .and_then(f32_values)
                    .ok_or_else(|| err("bias not float32".into()))?;
                w0.extend(bt.iter().map(|&v| v as f64));
            }
            let residual = |w: &[f64]| {
                // ‖XW − Y‖² = tr(WᵀAW) − 2 tr(WᵀB) + ‖Y‖²
                let mut r = yty;
                for c in 0..n {
                    for i in 0..d {
                        let wi = w[i * n + c];
                        r -= 2.0 * wi * xty[i * n + c];
                        let mut aw = 0.0;
                        for j in 0..d {
                            aw += xtx[i * d + j] * w[j * n + c];
                        }
                        r += wi * aw;
                    }
                }
                r.max(0.0) / yty.max(f64::MIN_POSITIVE)
            };
            let before = residual(&w0);
            let mean_diag = (0..d).map(|i| xtx[i * d + i]).sum::<f64>() / d as f64;
            let mut a = xtx.clone();
            for i in 0..d {
                a[i * d + i] += self.0.ridge * mean_diag.max(1e-12);
            }
            let Some(w) = solve_spd(&a, &xty, d, n) else {
                out.notes
                    .push(format!("{}: the normal equations are singular; not fitted", layer.node));
                continue;
            };
            let after = residual(&w);
            if after.partial_cmp(&before) != Some(std::cmp::Ordering::Less) {
                out.notes.push(format!(
                    "{}: refitting would not lower its output error ({before:.3e}); kept",
                    layer.node
                ));
                continue;
            }
            // Write back, in the stored layout.
            let k = layer.k;
            let (dims, stored): (Vec<i64>, Vec<f32>) = if layer.transposed {
                let mut t = vec![0f32; k * n];
                for r in 0..k {
                    for c in 0..n {
                        t[c * k + r] = w[r * n + c] as f32;
                    }
                }
                (vec![n as i64, k as i64], t)
            } else {
                (vec![k as i64, n as i64], w[..k * n].iter().map(|&v| v as f32).collect())
            };
            let g = student.graph.as_mut().expect("has a graph");
            replace_constant(
                g,
                &layer.weight,
                super::weights::tensor(
                    &layer.weight,
                    &dims,
                    DataType::Float,
                    stored.iter().flat_map(|v| v.to_le_bytes()).collect(),
                ),
            );
            if let Some(b) = &layer.bias {
                let index = GraphIndex::new(g);
                let old_dims = constant(&index, g, b).map(|t| t.dims.clone()).unwrap_or(vec![n as i64]);
                let bias: Vec<f32> = w[layer.k * n..].iter().map(|&v| v as f32).collect();
                replace_constant(
                    g,
                    b,
                    super::weights::tensor(
                        b,
                        &old_dims,
                        DataType::Float,
                        bias.iter().flat_map(|v| v.to_le_bytes()).collect(),
                    ),
                );
            }
            fitted += 1;
            out.notes.push(format!(
                "{}: relative output error {before:.3e} -> {after:.3e} on {rows} rows",
                layer.node
            ));
        }
        out.notes.insert(
            0,
            format!(
                "{fitted} of {} layer(s) re-fitted to the original's outputs on {samples} calibration sample(s)",
                found.len()
            ),
        );
        if calibration.is_synthetic() {
            out.warnings.push(
                "reconstruct fitted on synthetic inputs (the job has no dataset): it matches the original on random \
                 data, which may not carry over to real inputs"
                    .into(),
            );
        }
        external::save(&student, output, None).map_err(|e| err(e.to_string()))?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cholesky_solves_a_small_system() {
        // A = [[4, 2], [2, 3]], B = [[2], [1]] → x = [0.5, 0]
        let x = solve_spd(&[4.0, 2.0, 2.0, 3.0], &[2.0, 1.0], 2, 1).unwrap();
        assert!((x[0] - 0.5).abs() < 1e-12 && x[1].abs() < 1e-12, "{x:?}");
        assert!(solve_spd(&[0.0, 0.0, 0.0, 0.0], &[1.0, 1.0], 2, 1).is_none());
    }
}

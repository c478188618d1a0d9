//! Which layers a lossy candidate hurts most. Both models run on calibration samples with every
//! weight-bearing node's input and output exposed; a layer's error contribution is how much
//! relative error its output carries beyond what already arrived at its input. That isolates the
//! layer's own damage from the error it inherits, in one pass over the data (quantizing one layer
//! at a time would cost one model build and one evaluation per layer).

use std::collections::{HashMap, HashSet};
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::compress::weights::is_weight_bearing;
use crate::eval::LazyRuntime;
use crate::eval::calibration::CalibrationSet;
use crate::eval::session::PreparedInputs;
use crate::onnx::graph::{self, GraphIndex};
use crate::onnx::{self, ModelProto};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LayerSensitivity {
    pub node: String,
    pub op_type: String,
    /// ‖candidate − original‖² / ‖original‖² at the node's output.
    pub output_error: f64,
    /// `output_error` minus the same at the node's activation input: the layer's own share.
    pub contribution: f64,
}

struct Layer {
    node: String,
    op_type: String,
    input: String,
    output: String,
}

/// Weight-bearing nodes of the original with a name (exclusions are by name).
fn layers(model: &ModelProto) -> Vec<Layer> {
    let Some(g) = model.graph.as_ref() else {
        return Vec::new();
    };
    let index = GraphIndex::new(g);
    g.node
        .iter()
        .filter(|n| !n.name().is_empty() && is_weight_bearing(n, &index, g))
        .filter_map(|n| {
            Some(Layer {
                node: n.name().to_string(),
                op_type: n.op_type().to_string(),
                input: n.input.first()?.clone(),
                output: n.output.first()?.clone(),
            })
        })
        .collect()
}

/// Names produced inside `model` (node outputs) or fed to it (graph inputs).
fn known_names(model: &ModelProto) -> HashSet<String> {
    let mut names = HashSet::new();
    if let Some(g) = model.graph.as_ref() {
        names.extend(g.input.iter().map(|v| v.name().to_string()));
        for n in &g.node {
            names.extend(n.output.iter().cloned());
        }
    }
    names
}

fn with_outputs(model: &ModelProto, names: &[String], path: &Path) -> Result<(), String> {
    std::fs::write(path, graph::exposing_outputs(model, names)).map_err(|e| format!("writing {}: {e}", path.display()))
}

/// Per-layer error contributions of `candidate` against `original`, worst first.
pub fn rank(
    runtime: &LazyRuntime,
    threads: usize,
    original: &Path,
    candidate: &Path,
    calibration: &CalibrationSet,
    max_samples: usize,
    work_dir: &Path,
) -> Result<Vec<LayerSensitivity>, String> {
    let orig = onnx::load(original).map_err(|e| e.to_string())?;
    let cand = onnx::load(candidate).map_err(|e| e.to_string())?;
    let in_candidate = known_names(&cand);
    let graph_inputs: HashSet<String> = orig
        .graph
        .as_ref()
        .map(|g| g.input.iter().map(|v| v.name().to_string()).collect())
        .unwrap_or_default();
    let layers: Vec<Layer> = layers(&orig)
        .into_iter()
        .filter(|l| in_candidate.contains(&l.output))
        .collect();
    if layers.is_empty() {
        return Ok(Vec::new());
    }
    let mut names: Vec<String> = layers
        .iter()
        .flat_map(|l| [l.input.clone(), l.output.clone()])
        .filter(|n| !graph_inputs.contains(n) && in_candidate.contains(n))
        .collect();
    names.sort();
    names.dedup();
    let (orig_path, cand_path) = (
        work_dir.join("sensitivity-original.onnx"),
        work_dir.join("sensitivity-candidate.onnx"),
    );
    with_outputs(&orig, &names, &orig_path)?;
    with_outputs(&cand, &names, &cand_path)?;
    drop((orig, cand));
    let mut a = runtime.session(&orig_path, threads).map_err(|e| e.to_string())?;
    let mut b = runtime.session(&cand_path, threads).map_err(|e| e.to_string())?;
    // name -> (squared error, squared reference)
    let mut acc: HashMap<String, (f64, f64)> = names.iter().map(|n| (n.clone(), (0.0, 0.0))).collect();
    for k in 0..calibration.len().min(max_samples.max(1)) {
        let tensors = calibration.sample(k)?;
        let prepared = PreparedInputs::new(&tensors).map_err(|e| e.to_string())?;
        let ra = prepared.run_and_collect(&mut a).map_err(|e| e.to_string())?;
        let rb = prepared.run_and_collect(&mut b).map_err(|e| e.to_string())?;
        let rb: HashMap<&str, &Option<Vec<f64>>> = rb.iter().map(|o| (o.name.as_str(), &o.values)).collect();
        for out in &ra {
            let (Some(entry), Some(Some(reference)), Some(Some(values))) =
                (acc.get_mut(&out.name), Some(&out.values), rb.get(out.name.as_str()))
            else {
                continue;
            };
            if reference.len() != values.len() {
                continue;
            }
            for (r, v) in reference.iter().zip(values.iter()) {
                if r.is_finite() && v.is_finite() {
                    entry.0 += (v - r) * (v - r);
                    entry.1 += r * r;
                }
            }
        }
    }
    let error = |name: &str| -> f64 {
        if graph_inputs.contains(name) {
            return 0.0;
        }
        acc.get(name).map_or(0.0, |(e, r)| if *r > 0.0 { e / r } else { 0.0 })
    };
    let mut ranked: Vec<LayerSensitivity> = layers
        .iter()
        .map(|l| {
            let output_error = error(&l.output);
            LayerSensitivity {
                node: l.node.clone(),
                op_type: l.op_type.clone(),
                output_error,
                contribution: (output_error - error(&l.input)).max(0.0),
            }
        })
        .collect();
    ranked.sort_by(|x, y| {
        y.contribution
            .total_cmp(&x.contribution)
            .then_with(|| x.node.cmp(&y.node))
    });
    Ok(ranked)
}

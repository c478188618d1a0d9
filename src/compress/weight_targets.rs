//! The weights a parameter-removing pass (pruning, low-rank, clustering) may change, found once
//! and grouped by tensor: a weight read by two nodes is one target, changed once, so the two nodes
//! can never disagree about it. Exclusions win: a weight shared with an excluded node is left alone.

use std::collections::{HashMap, HashSet};

use super::weights::constant;
use crate::onnx::graph::GraphIndex;
use crate::onnx::proto::tensor_proto::DataType;
use crate::onnx::proto::{GraphProto, TensorProto};

/// One constant float32 weight and the nodes that read it as their weight input (input 1).
pub struct Target {
    pub weight: String,
    /// Indices of the nodes of the wanted op types that read it as input 1, in graph order.
    pub nodes: Vec<usize>,
    pub dims: Vec<i64>,
    pub values: Vec<f32>,
}

impl Target {
    pub fn node_names(&self, g: &GraphProto) -> Vec<String> {
        self.nodes.iter().map(|&i| g.node[i].name().to_string()).collect()
    }
}

/// The float32 values of a tensor stored inline (raw or typed), if its data matches its shape.
pub fn float_values(t: &TensorProto) -> Option<Vec<f32>> {
    if t.data_type() != DataType::Float as i32 {
        return None;
    }
    let values: Vec<f32> = match &t.raw_data {
        Some(raw) => raw
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        None => t.float_data.clone(),
    };
    let expected: i64 = t.dims.iter().product();
    (values.len() as i64 == expected).then_some(values)
}

/// Weights of nodes whose op type is in `ops` (default domain), grouped by tensor in the order the
/// graph first reads them. Nodes that cannot be targeted are counted in `skipped` by reason.
pub fn collect(
    g: &GraphProto,
    index: &GraphIndex,
    ops: &[&str],
    excluded: &HashSet<&str>,
    skipped: &mut HashMap<String, usize>,
) -> Vec<Target> {
    let mut order: Vec<String> = Vec::new();
    let mut readers: HashMap<String, Vec<usize>> = HashMap::new();
    for (i, node) in g.node.iter().enumerate() {
        if !ops.contains(&node.op_type()) || !matches!(node.domain(), "" | "ai.onnx") {
            continue;
        }
        let Some(w) = node.input.get(1).filter(|w| !w.is_empty()) else {
            continue;
        };
        if !readers.contains_key(w) {
            order.push(w.clone());
        }
        readers.entry(w.clone()).or_default().push(i);
    }
    let mut targets = Vec::new();
    for weight in order {
        let nodes = readers.remove(&weight).unwrap_or_default();
        let mut skip = |why: &str| *skipped.entry(why.to_string()).or_default() += nodes.len();
        if nodes.iter().any(|&i| excluded.contains(g.node[i].name())) {
            skip("excluded by exclude_nodes");
            continue;
        }
        if index
            .consumers_of(&weight)
            .iter()
            .any(|&i| excluded.contains(g.node[i].name()))
        {
            skip("the weight is shared with a node in exclude_nodes");
            continue;
        }
        if index.graph_inputs.contains(&weight) {
            skip("the weight is also a graph input (a caller may override it)");
            continue;
        }
        let Some(t) = constant(index, g, &weight) else {
            skip("the weight is not a constant");
            continue;
        };
        if t.data_type() != DataType::Float as i32 {
            skip("the weight is not float32");
            continue;
        }
        let Some(values) = float_values(t) else {
            skip("the weight's data does not match its shape");
            continue;
        };
        targets.push(Target {
            weight,
            nodes,
            dims: t.dims.clone(),
            values,
        });
    }
    targets
}

/// Replaces the values of the constant `name` (an initializer or a `Constant` node's value) in
/// place, keeping its name, shape and type.
pub fn store(g: &mut GraphProto, index: &GraphIndex, name: &str, values: &[f32]) {
    let raw: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    let tensor = match index.initializers.get(name) {
        Some(&i) => Some(&mut g.initializer[i]),
        None => index.producer.get(name).and_then(|&p| {
            g.node[p]
                .attribute
                .iter_mut()
                .find(|a| a.name() == "value")
                .and_then(|a| a.t.as_mut())
        }),
    };
    if let Some(t) = tensor {
        t.float_data.clear();
        t.raw_data = Some(raw.into());
    }
}

/// Share of values that are exactly zero.
pub fn zero_share(values: &[f32]) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    values.iter().filter(|v| **v == 0.0).count() as f64 / values.len() as f64
}

//! What a user needs to know about a model at a glance: its signature, opsets, size and op census.

use std::collections::{BTreeMap, HashSet};

use serde::{Deserialize, Serialize};

use super::proto::{self, ModelProto, type_proto};
use super::{dtype, for_each_graph};

/// The default ONNX domain, written out in summaries (the protobuf leaves it empty).
pub const DEFAULT_DOMAIN: &str = "ai.onnx";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelSummary {
    pub ir_version: i64,
    pub producer_name: String,
    pub producer_version: String,
    pub opsets: Vec<Opset>,
    pub inputs: Vec<TensorSignature>,
    pub outputs: Vec<TensorSignature>,
    /// Elements of every stored weight: initializers (dense and sparse) and `Constant` node tensors
    /// (some exporters keep weights there), subgraphs included.
    pub parameters: u64,
    /// Nodes per operator; operators outside the default domain are keyed `domain::OpType`.
    pub op_counts: BTreeMap<String, u64>,
    pub nodes: u64,
    /// Stored weights by element type: how many elements and how many bytes.
    #[serde(default)]
    pub parameters_by_dtype: BTreeMap<String, DtypeTotals>,
    /// Multiply-accumulates of the weight-bearing MatMul/Gemm/Conv nodes for one sample, where the
    /// shapes are known (dynamic dimensions count as 1).
    #[serde(default)]
    pub estimated_macs: MacEstimate,
    /// Nodes the compression passes can work on: MatMul/Gemm and Conv whose weight is stored in
    /// the model.
    #[serde(default)]
    pub compressible: BTreeMap<String, u64>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DtypeTotals {
    pub elements: u64,
    pub bytes: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct MacEstimate {
    pub total: u64,
    /// Weight-bearing nodes counted, and those left out because a shape was unknown.
    pub counted_nodes: u64,
    pub uncounted_nodes: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Opset {
    pub domain: String,
    pub version: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TensorSignature {
    pub name: String,
    pub dtype: String,
    /// `None` when the rank itself is unknown.
    pub shape: Option<Vec<Dim>>,
}

/// One dimension: a size, a symbol (`"batch"`), or unknown (`null`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Dim {
    Fixed(i64),
    Symbolic(String),
    Unknown,
}

impl ModelSummary {
    pub fn of(model: &ModelProto) -> Self {
        let graph = model.graph.clone().unwrap_or_default();
        let initializers: HashSet<&str> = graph.initializer.iter().map(|t| t.name()).collect();
        // Before IR 4, initializers were also listed as graph inputs; they are not inputs to feed.
        let inputs = graph
            .input
            .iter()
            .filter(|vi| !initializers.contains(vi.name()))
            .map(signature)
            .collect();
        let outputs = graph.output.iter().map(signature).collect();

        let mut parameters = 0u64;
        let mut nodes = 0u64;
        let mut op_counts = BTreeMap::new();
        let mut by_dtype: BTreeMap<String, DtypeTotals> = BTreeMap::new();
        let mut macs = MacEstimate::default();
        let mut compressible: BTreeMap<String, u64> = BTreeMap::new();
        let mut count = |t: &proto::TensorProto| {
            let n = element_count(t);
            let totals = by_dtype.entry(dtype::name(t.data_type())).or_default();
            totals.elements += n;
            totals.bytes += super::tensor::raw_byte_len(t.data_type(), n).unwrap_or(0);
            n
        };
        for_each_graph(&graph, &mut |g| {
            parameters += g.initializer.iter().map(&mut count).sum::<u64>();
            parameters += g
                .sparse_initializer
                .iter()
                .filter_map(|s| s.values.as_ref())
                .map(&mut count)
                .sum::<u64>();
            let weights = weight_shapes(g);
            for node in &g.node {
                nodes += 1;
                if let Some(kind) = node_macs(g, node, &weights, &mut macs) {
                    *compressible.entry(kind.to_string()).or_insert(0) += 1;
                }
                if node.op_type() == "Constant" && matches!(node.domain(), "" | DEFAULT_DOMAIN) {
                    parameters += node
                        .attribute
                        .iter()
                        .filter_map(|a| a.t.as_ref())
                        .map(&mut count)
                        .sum::<u64>();
                }
                *op_counts.entry(op_key(node)).or_insert(0) += 1;
            }
        });

        ModelSummary {
            ir_version: model.ir_version(),
            producer_name: model.producer_name().to_string(),
            producer_version: model.producer_version().to_string(),
            opsets: model
                .opset_import
                .iter()
                .map(|o| Opset {
                    domain: domain_name(o.domain()).to_string(),
                    version: o.version(),
                })
                .collect(),
            inputs,
            outputs,
            parameters,
            op_counts,
            nodes,
            parameters_by_dtype: by_dtype,
            estimated_macs: macs,
            compressible,
        }
    }
}

/// Shapes of the weights stored in a graph: initializers and `Constant` outputs.
fn weight_shapes(g: &proto::GraphProto) -> std::collections::HashMap<&str, &[i64]> {
    let mut shapes: std::collections::HashMap<&str, &[i64]> =
        g.initializer.iter().map(|t| (t.name(), t.dims.as_slice())).collect();
    for node in g.node.iter().filter(|n| n.op_type() == "Constant") {
        if let (Some(out), Some(t)) = (node.output.first(), node.attribute.iter().find_map(|a| a.t.as_ref())) {
            shapes.insert(out.as_str(), t.dims.as_slice());
        }
    }
    shapes
}

/// Declared dims of a value, with dynamic dimensions as 1.
fn declared_dims(g: &proto::GraphProto, name: &str) -> Option<Vec<u64>> {
    let vi = super::graph::value_info(g, name)?;
    let Some(type_proto::Value::TensorType(t)) = vi.r#type.as_ref()?.value.as_ref() else {
        return None;
    };
    Some(
        dims(t.shape.as_ref()?)
            .iter()
            .map(|d| match d {
                Dim::Fixed(v) => (*v).max(0) as u64,
                _ => 1,
            })
            .collect(),
    )
}

/// Adds a weight-bearing node's MACs to `macs` and says what kind of compressible node it is.
fn node_macs(
    g: &proto::GraphProto,
    node: &proto::NodeProto,
    weights: &std::collections::HashMap<&str, &[i64]>,
    macs: &mut MacEstimate,
) -> Option<&'static str> {
    if !matches!(node.domain(), "" | DEFAULT_DOMAIN) {
        return None;
    }
    let weight = |i: usize| node.input.get(i).and_then(|n| weights.get(n.as_str())).copied();
    let product = |d: &[i64]| d.iter().map(|&v| v.max(0) as u64).product::<u64>();
    match node.op_type() {
        "MatMul" | "Gemm" => {
            let w = weight(1).filter(|w| w.len() == 2)?;
            // Rows of the activation: every leading dim but the last (1 when unknown or dynamic).
            let rows = node
                .input
                .first()
                .and_then(|a| declared_dims(g, a))
                .map(|d| d[..d.len().saturating_sub(1)].iter().product::<u64>())
                .unwrap_or(1);
            macs.total += rows.saturating_mul(product(w));
            macs.counted_nodes += 1;
            Some("matmul_gemm")
        }
        "Conv" => {
            let w = weight(1).filter(|w| w.len() >= 3)?;
            // Each output position costs Cout * (Cin/groups) * kernel MACs.
            match node.output.first().and_then(|o| declared_dims(g, o)) {
                Some(out) if out.len() == w.len() => {
                    let positions: u64 = out[2..].iter().product();
                    macs.total += positions.saturating_mul(product(w));
                    macs.counted_nodes += 1;
                }
                _ => macs.uncounted_nodes += 1,
            }
            Some("conv")
        }
        _ => None,
    }
}

fn domain_name(domain: &str) -> &str {
    if domain.is_empty() { DEFAULT_DOMAIN } else { domain }
}

fn op_key(node: &proto::NodeProto) -> String {
    match node.domain() {
        "" | DEFAULT_DOMAIN => node.op_type().to_string(),
        d => format!("{d}::{}", node.op_type()),
    }
}

/// Elements a tensor declares; negative dims (invalid) count as zero rather than wrapping.
pub fn element_count(t: &proto::TensorProto) -> u64 {
    t.dims
        .iter()
        .map(|&d| d.max(0) as u64)
        .fold(1u64, |a, d| a.saturating_mul(d))
}

fn signature(vi: &proto::ValueInfoProto) -> TensorSignature {
    let (dtype, shape) = match vi.r#type.as_ref().and_then(|t| t.value.as_ref()) {
        Some(type_proto::Value::TensorType(t)) => (dtype::name(t.elem_type()), t.shape.as_ref().map(dims)),
        Some(type_proto::Value::SparseTensorType(t)) => (
            format!("sparse_{}", dtype::name(t.elem_type())),
            t.shape.as_ref().map(dims),
        ),
        Some(type_proto::Value::SequenceType(_)) => ("sequence".into(), None),
        Some(type_proto::Value::MapType(_)) => ("map".into(), None),
        Some(type_proto::Value::OptionalType(_)) => ("optional".into(), None),
        Some(type_proto::Value::OpaqueType(_)) => ("opaque".into(), None),
        None => ("undefined".into(), None),
    };
    TensorSignature {
        name: vi.name().to_string(),
        dtype,
        shape,
    }
}

fn dims(shape: &proto::TensorShapeProto) -> Vec<Dim> {
    use proto::tensor_shape_proto::dimension::Value;
    shape
        .dim
        .iter()
        .map(|d| match &d.value {
            // Some exporters (Paddle) write -1 for a dynamic dimension.
            Some(Value::DimValue(v)) if *v >= 0 => Dim::Fixed(*v),
            Some(Value::DimParam(p)) if !p.is_empty() => Dim::Symbolic(p.clone()),
            _ => Dim::Unknown,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::onnx::builder;

    #[test]
    fn the_summary_of_the_tiny_mlp_names_its_signature_and_counts() {
        let summary = ModelSummary::of(&builder::tiny_mlp(3));
        assert_eq!(summary.inputs.len(), 1);
        assert_eq!(summary.inputs[0].name, "input");
        assert_eq!(summary.inputs[0].dtype, "float32");
        assert_eq!(
            summary.inputs[0].shape,
            Some(vec![Dim::Symbolic("batch".into()), Dim::Fixed(builder::MLP_IN as i64)])
        );
        let p = builder::MLP_IN * builder::MLP_HIDDEN
            + builder::MLP_HIDDEN
            + builder::MLP_HIDDEN * builder::MLP_OUT
            + builder::MLP_OUT;
        assert_eq!(summary.parameters, p as u64);
        assert_eq!(summary.op_counts.get("MatMul"), Some(&2));
        assert_eq!(summary.op_counts.get("Relu"), Some(&1));
        assert_eq!(
            summary.opsets,
            vec![Opset {
                domain: "ai.onnx".into(),
                version: 17
            }]
        );
        assert_eq!(summary.parameters_by_dtype["float32"].bytes, 4 * p as u64);
        assert_eq!(summary.compressible.get("matmul_gemm"), Some(&2));
        // Per sample: 16x32 + 32x10 multiply-accumulates.
        let macs = builder::MLP_IN * builder::MLP_HIDDEN + builder::MLP_HIDDEN * builder::MLP_OUT;
        assert_eq!(summary.estimated_macs.total, macs as u64);
        assert_eq!(summary.estimated_macs.counted_nodes, 2);
        let json = serde_json::to_value(&summary).unwrap();
        assert_eq!(
            json["inputs"][0]["shape"],
            serde_json::json!(["batch", builder::MLP_IN])
        );
    }

    #[test]
    fn unknown_dims_serialize_as_null() {
        assert_eq!(serde_json::to_value(Dim::Unknown).unwrap(), serde_json::Value::Null);
    }
}

//! `fp16`: weights and activations in float16, halving the model, with float32 kept at the edges
//! (`keep_io_types`: Casts after the inputs and before the outputs) and around operators that are
//! block-listed (run in float32 between Casts). Tensor types are propagated through the graph by
//! operator rules; a model holding an operator whose output types the pass cannot tell, or
//! control flow (If/Loop/Scan), is refused up front with the reason rather than converted wrongly.
//! Constants outside float16's range are clamped (and counted in the report).

use std::collections::{HashMap, HashSet};
use std::path::Path;

use half::f16;
use serde::{Deserialize, Serialize};

use super::weights::{int_attr, node_of, sanitize};
use super::{Pass, PassContext, PassError, PassOutput};
use crate::onnx::graph::{self, NameGen};
use crate::onnx::proto::tensor_proto::DataType;
use crate::onnx::proto::{GraphProto, NodeProto, TensorProto, type_proto};
use crate::onnx::{self, external};

/// Operators kept in float32 unless the recipe says otherwise: reductions and normalizations whose
/// intermediate sums overflow or lose precision in float16 (BatchNormalization: a tiny running
/// variance underflows, found on PP-OCR det; run `optimize` first to fold it into the Conv), and
/// ops with float-only inputs.
pub const DEFAULT_BLOCK_LIST: &[&str] = &[
    "Resize",
    "Upsample",
    "Range",
    "CumSum",
    "TopK",
    "NonMaxSuppression",
    "RoiAlign",
    "RandomNormalLike",
    "RandomUniformLike",
    "ReduceSum",
    "ReduceSumSquare",
    "ReduceL2",
    "ReduceLogSumExp",
    "Softmax",
    "LogSoftmax",
    "LayerNormalization",
    "InstanceNormalization",
    "BatchNormalization",
    "Pow",
];

/// Operators left by the quantization passes: their float inputs and outputs are tied to float32
/// scales, so they always stay float32 (between Casts), whatever the block list says. This lets
/// `fp16` run after int8/int4 quantization and halve the weights those passes leave in float
/// (embeddings, biases, excluded layers).
pub const QUANTIZED_OPS: &[&str] = &[
    "MatMulNBits",
    "DynamicQuantizeLinear",
    "QuantizeLinear",
    "DequantizeLinear",
    "MatMulInteger",
    "ConvInteger",
];

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Fp16Params {
    /// Keep float32 graph inputs and outputs (Casts at the edges).
    #[serde(default = "yes")]
    pub keep_io_types: bool,
    /// Operators to keep in float32; replaces the default list when given.
    #[serde(default)]
    pub op_block_list: Option<Vec<String>>,
    /// Node names to keep in float32.
    #[serde(default)]
    pub node_block_list: Vec<String>,
}

fn yes() -> bool {
    true
}

impl Default for Fp16Params {
    fn default() -> Self {
        Fp16Params {
            keep_io_types: true,
            op_block_list: None,
            node_block_list: Vec::new(),
        }
    }
}

pub struct Fp16(pub Fp16Params);

const FLOAT: i32 = DataType::Float as i32;
const HALF: i32 = DataType::Float16 as i32;

/// Output element types of a node, from its input types (None: unknown operator).
fn output_types(node: &NodeProto, inputs: &[Option<i32>]) -> Option<Vec<i32>> {
    let first = || inputs.first().copied().flatten();
    let n = node.output.len();
    let same = |t: Option<i32>| t.map(|t| vec![t; n]);
    let attr_i = |name: &str| node.attribute.iter().find(|a| a.name() == name).and_then(|a| a.i);
    match node.op_type() {
        "Cast" => attr_i("to").map(|t| vec![t as i32; n]),
        "CastLike" => same(inputs.get(1).copied().flatten()),
        "Shape" | "Size" | "ArgMax" | "ArgMin" | "NonZero" => Some(vec![DataType::Int64 as i32; n]),
        "Equal" | "Less" | "LessOrEqual" | "Greater" | "GreaterOrEqual" | "Not" | "And" | "Or" | "Xor" | "IsNaN"
        | "IsInf" => Some(vec![DataType::Bool as i32; n]),
        "Where" => same(inputs.get(1).copied().flatten()),
        "TopK" => first().map(|t| vec![t, DataType::Int64 as i32]),
        "MaxPool" => first().map(|t| {
            let mut v = vec![t; n];
            if n > 1 {
                v[1] = DataType::Int64 as i32;
            }
            v
        }),
        "ConstantOfShape" => Some(vec![
            node.attribute
                .iter()
                .find(|a| a.name() == "value")
                .and_then(|a| a.t.as_ref())
                .map_or(FLOAT, |t| t.data_type());
            n
        ]),
        "If" | "Loop" | "Scan" | "SequenceConstruct" | "SplitToSequence" | "Optional" => None,
        "MatMulNBits" => same(first()),
        "MatMulInteger" | "ConvInteger" => Some(vec![DataType::Int32 as i32; n]),
        "DynamicQuantizeLinear" => Some(vec![DataType::Uint8 as i32, FLOAT, DataType::Uint8 as i32]),
        // Output type of the zero point (uint8 without one).
        "QuantizeLinear" => Some(vec![
            inputs.get(2).copied().flatten().unwrap_or(DataType::Uint8 as i32);
            n
        ]),
        // Output type of the scale.
        "DequantizeLinear" => Some(vec![inputs.get(1).copied().flatten().unwrap_or(FLOAT); n]),
        // Operators whose outputs take the type of their first input.
        "Add"
        | "Sub"
        | "Mul"
        | "Div"
        | "Pow"
        | "Neg"
        | "Abs"
        | "Sqrt"
        | "Exp"
        | "Log"
        | "Relu"
        | "LeakyRelu"
        | "PRelu"
        | "Sigmoid"
        | "HardSigmoid"
        | "HardSwish"
        | "Tanh"
        | "Erf"
        | "Gelu"
        | "Elu"
        | "Selu"
        | "Softplus"
        | "Softsign"
        | "Mish"
        | "Clip"
        | "Floor"
        | "Ceil"
        | "Round"
        | "Sign"
        | "Reciprocal"
        | "Min"
        | "Max"
        | "Sum"
        | "Mean"
        | "MatMul"
        | "Gemm"
        | "Conv"
        | "ConvTranspose"
        | "BatchNormalization"
        | "InstanceNormalization"
        | "LayerNormalization"
        | "GroupNormalization"
        | "AveragePool"
        | "GlobalAveragePool"
        | "GlobalMaxPool"
        | "LpPool"
        | "Softmax"
        | "LogSoftmax"
        | "Reshape"
        | "Transpose"
        | "Flatten"
        | "Squeeze"
        | "Unsqueeze"
        | "Concat"
        | "Split"
        | "Slice"
        | "Gather"
        | "GatherElements"
        | "GatherND"
        | "ScatterElements"
        | "ScatterND"
        | "Expand"
        | "Tile"
        | "Pad"
        | "Resize"
        | "Upsample"
        | "DepthToSpace"
        | "SpaceToDepth"
        | "Identity"
        | "Dropout"
        | "ReduceMean"
        | "ReduceMax"
        | "ReduceMin"
        | "ReduceSum"
        | "ReduceProd"
        | "ReduceL1"
        | "ReduceL2"
        | "ReduceSumSquare"
        | "ReduceLogSumExp"
        | "CumSum"
        | "Einsum"
        | "Range"
        | "Trilu"
        | "Sin"
        | "Cos"
        | "Mod"
        | "Hardmax" => same(first()),
        _ => None,
    }
}

/// Input slots that must stay float32 whatever the rest of the graph does (the operator's schema
/// allows only float there).
fn float_only_slot(op: &str, slot: usize) -> bool {
    matches!((op, slot), ("Resize", 2) | ("Upsample", 1))
}

fn to_half(t: &mut TensorProto, clamped: &mut u64) {
    let values: Vec<f32> = match &t.raw_data {
        Some(raw) => raw
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        None => std::mem::take(&mut t.float_data),
    };
    let max = f16::MAX.to_f32();
    let raw: Vec<u8> = values
        .iter()
        .flat_map(|&v| {
            let c = if v.is_finite() && v.abs() > max {
                *clamped += 1;
                v.signum() * max
            } else {
                v
            };
            f16::from_f32(c).to_le_bytes()
        })
        .collect();
    t.raw_data = Some(raw.into());
    t.float_data.clear();
    t.data_type = Some(HALF);
}

impl Pass for Fp16 {
    fn name(&self) -> &'static str {
        "fp16"
    }

    fn run(&self, input: &Path, output: &Path, _ctx: &PassContext<'_>) -> Result<PassOutput, PassError> {
        let err = |m: String| PassError(m);
        let mut model = onnx::load(input).map_err(|e| err(e.to_string()))?;
        let graph = model
            .graph
            .as_mut()
            .ok_or_else(|| err("the model has no graph".into()))?;
        graph::sort_topologically(graph).map_err(|e| err(e.to_string()))?;
        let blocked_ops: HashSet<String> = match &self.0.op_block_list {
            Some(list) => list.iter().cloned().collect(),
            None => DEFAULT_BLOCK_LIST.iter().map(|s| s.to_string()).collect(),
        };
        let blocked_nodes: HashSet<&str> = self.0.node_block_list.iter().map(String::as_str).collect();

        // 1. Types of every value in the original graph.
        let mut types: HashMap<String, i32> = HashMap::new();
        for vi in graph.input.iter().chain(&graph.value_info).chain(&graph.output) {
            if let Some(type_proto::Value::TensorType(t)) = vi.r#type.as_ref().and_then(|t| t.value.as_ref()) {
                types.insert(vi.name().to_string(), t.elem_type());
            }
        }
        for t in &graph.initializer {
            types.insert(t.name().to_string(), t.data_type());
        }
        for node in &graph.node {
            if node.op_type() == "Constant" {
                let t = node
                    .attribute
                    .iter()
                    .find_map(|a| a.t.as_ref())
                    .map_or(FLOAT, |t| t.data_type());
                types.insert(node.output[0].clone(), t);
                continue;
            }
            let inputs: Vec<Option<i32>> = node.input.iter().map(|i| types.get(i).copied()).collect();
            let outs = output_types(node, &inputs).ok_or_else(|| {
                err(format!(
                    "fp16 cannot convert node {:?}: it cannot tell the output types of {} (control flow and this \
                     operator are not supported yet); keep the model in float32 or use int8/int4 quantization",
                    node.name(),
                    node.op_type()
                ))
            })?;
            for (o, t) in node.output.iter().zip(outs) {
                types.insert(o.clone(), t);
            }
        }

        // 2. Decide which nodes run in float16: every float-carrying node not block-listed.
        let runs_half = |node: &NodeProto| {
            !blocked_ops.contains(node.op_type())
                && !QUANTIZED_OPS.contains(&node.op_type())
                && !blocked_nodes.contains(node.name())
                && node.op_type() != "Constant"
                && (node
                    .input
                    .iter()
                    .chain(&node.output)
                    .any(|v| types.get(v) == Some(&FLOAT)))
        };
        let mut names = NameGen::new(graph);
        let mut clamped = 0u64;
        let mut converted_nodes = 0usize;
        let mut kept_float = 0usize;
        // value name → name of its float16 twin (and float32 twin for values converted to half).
        let mut half_of: HashMap<String, String> = HashMap::new();
        let mut float_of: HashMap<String, String> = HashMap::new();
        let mut new_nodes: Vec<NodeProto> = Vec::new();
        let mut new_initializers: Vec<TensorProto> = Vec::new();
        let initializers: HashMap<String, TensorProto> = graph
            .initializer
            .iter()
            .map(|t| (t.name().to_string(), t.clone()))
            .collect();
        let graph_inputs: HashSet<String> = graph.input.iter().map(|v| v.name().to_string()).collect();
        let constants: HashMap<String, TensorProto> = graph
            .node
            .iter()
            .filter(|n| n.op_type() == "Constant")
            .filter_map(|n| {
                n.attribute
                    .iter()
                    .find_map(|a| a.t.clone())
                    .map(|t| (n.output[0].clone(), t))
            })
            .collect();

        // Values produced in float16 by converted nodes keep their names; everything else that
        // is float stays float32 under its name.
        let mut produced_half: HashSet<String> = HashSet::new();
        if !self.0.keep_io_types {
            for name in graph_inputs.iter().filter(|i| types.get(*i) == Some(&FLOAT)) {
                set_elem_type(graph, name, HALF);
                produced_half.insert(name.clone());
            }
        }
        for node in std::mem::take(&mut graph.node) {
            if node.op_type() == "Constant" {
                new_nodes.push(node);
                continue;
            }
            let half = runs_half(&node);
            let mut node = node;
            for (slot, input) in node.input.clone().iter().enumerate() {
                if input.is_empty() || types.get(input) != Some(&FLOAT) {
                    continue;
                }
                let want_half = half && !float_only_slot(node.op_type(), slot);
                let is_half = produced_half.contains(input);
                if want_half == is_half {
                    continue;
                }
                let replacement = if want_half {
                    if let Some(name) = half_of.get(input) {
                        name.clone()
                    } else if let Some(t) = initializers.get(input).or_else(|| constants.get(input)) {
                        let mut t = t.clone();
                        to_half(&mut t, &mut clamped);
                        let name = names.fresh(&format!("{}_fp16", sanitize(input)));
                        t.name = Some(name.clone());
                        new_initializers.push(t);
                        half_of.insert(input.clone(), name.clone());
                        name
                    } else {
                        let name = names.fresh(&format!("{}_fp16", sanitize(input)));
                        new_nodes.push(node_of(
                            &mut names,
                            "Cast",
                            &[input],
                            &[&name],
                            vec![int_attr("to", HALF as i64)],
                        ));
                        half_of.insert(input.clone(), name.clone());
                        name
                    }
                } else if let Some(name) = float_of.get(input) {
                    name.clone()
                } else {
                    let name = names.fresh(&format!("{}_fp32", sanitize(input)));
                    new_nodes.push(node_of(
                        &mut names,
                        "Cast",
                        &[input],
                        &[&name],
                        vec![int_attr("to", FLOAT as i64)],
                    ));
                    float_of.insert(input.clone(), name.clone());
                    name
                };
                node.input[slot] = replacement;
            }
            if half {
                converted_nodes += 1;
                if node.op_type() == "ConstantOfShape" {
                    for t in node.attribute.iter_mut().filter_map(|a| a.t.as_mut()) {
                        if t.data_type() == FLOAT {
                            to_half(t, &mut clamped);
                        }
                    }
                }
                if node.op_type() == "Cast" {
                    for a in node
                        .attribute
                        .iter_mut()
                        .filter(|a| a.name() == "to" && a.i == Some(FLOAT as i64))
                    {
                        a.i = Some(HALF as i64);
                    }
                }
                for o in &node.output {
                    if types.get(o) == Some(&FLOAT) {
                        produced_half.insert(o.clone());
                    }
                }
            } else if node
                .input
                .iter()
                .chain(&node.output)
                .any(|v| types.get(v) == Some(&FLOAT))
            {
                kept_float += 1;
            }
            new_nodes.push(node);
        }
        graph.node = new_nodes;
        graph.initializer.extend(new_initializers);

        // 3. Graph outputs produced in float16: float32 again at the edge (or declared float16).
        let outputs: Vec<String> = graph.output.iter().map(|o| o.name().to_string()).collect();
        for name in outputs.iter().filter(|o| produced_half.contains(*o)) {
            if self.0.keep_io_types {
                let inner = names.fresh(&format!("{}_fp16", sanitize(name)));
                graph::rename_uses(graph, name, &inner);
                for node in &mut graph.node {
                    for o in node.output.iter_mut().filter(|o| *o == name) {
                        *o = inner.clone();
                    }
                }
                // rename_uses also renamed the graph output; put it back.
                for out in graph.output.iter_mut().filter(|o| o.name() == inner) {
                    out.name = Some(name.clone());
                }
                let cast = node_of(
                    &mut names,
                    "Cast",
                    &[&inner],
                    &[name],
                    vec![int_attr("to", FLOAT as i64)],
                );
                graph.node.push(cast);
            } else {
                set_elem_type(graph, name, HALF);
            }
        }
        // Intermediate value_info would now lie about types; ORT infers them again.
        graph.value_info.clear();
        let (dead_nodes, dead_weights) = graph::eliminate_dead(graph);
        graph::sort_topologically(graph).map_err(|e| err(format!("the converted graph is invalid: {e}")))?;

        let mut out = PassOutput::default();
        out.notes.push(format!(
            "{converted_nodes} node(s) in float16, {kept_float} kept in float32 (block list: {}); {dead_weights} \
             float32 initializer(s) and {dead_nodes} node(s) no longer read were removed",
            {
                let mut b: Vec<&String> = blocked_ops.iter().collect();
                b.sort();
                b.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", ")
            }
        ));
        if clamped > 0 {
            out.warnings.push(format!(
                "{clamped} weight value(s) beyond float16's range (±65504) were clamped"
            ));
        }
        if converted_nodes == 0 {
            out.warnings
                .push("fp16 found no float32 computation to convert; the model is unchanged".into());
        }
        out.warnings.push(
            "float16 halves the model but ONNX Runtime's CPU provider computes most float16 operators through \
             float32 casts, so expect it to be slower on CPU; it pays off on GPUs"
                .into(),
        );
        external::save(&model, output, None).map_err(|e| err(e.to_string()))?;
        Ok(out)
    }
}

fn set_elem_type(g: &mut GraphProto, name: &str, elem: i32) {
    for vi in g
        .input
        .iter_mut()
        .chain(g.output.iter_mut())
        .filter(|v| v.name() == name)
    {
        if let Some(type_proto::Value::TensorType(t)) = vi.r#type.as_mut().and_then(|t| t.value.as_mut()) {
            t.elem_type = Some(elem);
        }
    }
}

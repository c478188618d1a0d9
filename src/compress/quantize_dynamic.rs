//! `quantize_int8_dynamic`: MatMul/Gemm weights stored as int8 (per tensor or per output column,
//! symmetric), activations quantized at run time. Written with standard ONNX operators only
//! (`DynamicQuantizeLinear` → `MatMulInteger` → `Cast` → `Mul`), so the result runs in any ONNX
//! runtime; ONNX Runtime fuses the chain into its `DynamicQuantizeMatMul` kernel.
//!
//! Conv is left alone on purpose: ONNX Runtime's `ConvInteger` has no fast CPU kernel, so a
//! dynamically quantized Conv is smaller but slower; static (QDQ) quantization is the route there.

use std::collections::{HashMap, HashSet};
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::weights::{
    REDUCED_QMAX, Weight, int_attr, node_of, range_note, reduce_range_by_default, sanitize, skipped_notes,
    symmetric_int8, tensor, weight_of,
};
use super::{Pass, PassContext, PassError, PassOutput};
use crate::onnx::graph::{self, GraphIndex, NameGen};
use crate::onnx::proto::tensor_proto::DataType;
use crate::onnx::proto::{NodeProto, TensorProto};
use crate::onnx::{self, external};

/// Operators this pass can quantize.
pub const SUPPORTED_OPS: &[&str] = &["MatMul", "Gemm"];

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DynamicParams {
    /// One scale per output column instead of one per weight tensor: more accurate, same size.
    #[serde(default)]
    pub per_channel: bool,
    #[serde(default = "default_ops")]
    pub op_types: Vec<String>,
    /// Node names to leave in float.
    #[serde(default)]
    pub exclude_nodes: Vec<String>,
    /// int8 weights in 7 bits, so ONNX Runtime's AVX2 kernels cannot saturate; unset: yes on a CPU
    /// without VNNI (see [`super::weights::reduce_range_by_default`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reduce_range: Option<bool>,
}

impl Default for DynamicParams {
    fn default() -> Self {
        DynamicParams {
            per_channel: false,
            op_types: default_ops(),
            exclude_nodes: Vec::new(),
            reduce_range: None,
        }
    }
}

fn default_ops() -> Vec<String> {
    SUPPORTED_OPS.iter().map(|s| s.to_string()).collect()
}

impl DynamicParams {
    pub fn validate(&self) -> Result<(), String> {
        for op in &self.op_types {
            if op == "Conv" {
                return Err(
                    "op_types: Conv is not supported by dynamic quantization (ONNX Runtime's ConvInteger has \
                            no fast CPU kernel); use static quantization for convolutions"
                        .into(),
                );
            }
            if !SUPPORTED_OPS.contains(&op.as_str()) {
                return Err(format!("op_types: {op:?} is not one of {}", SUPPORTED_OPS.join(", ")));
            }
        }
        Ok(())
    }
}

pub struct QuantizeDynamic(pub DynamicParams);

impl Pass for QuantizeDynamic {
    fn name(&self) -> &'static str {
        "quantize_int8_dynamic"
    }

    fn run(&self, input: &Path, output: &Path, _ctx: &PassContext<'_>) -> Result<PassOutput, PassError> {
        let err = |m: String| PassError(m);
        let mut model = onnx::load(input).map_err(|e| err(e.to_string()))?;
        let opset = graph::opset_version(&model, "").unwrap_or(0);
        if opset < 11 {
            return Err(err(format!(
                "needs opset 11 or later (DynamicQuantizeLinear, MatMulInteger); the model imports opset {opset}"
            )));
        }
        let graph = model
            .graph
            .as_mut()
            .ok_or_else(|| err("the model has no graph".into()))?;
        let index = GraphIndex::new(graph);
        let mut names = NameGen::new(graph);
        let excluded: HashSet<&str> = self.0.exclude_nodes.iter().map(String::as_str).collect();
        let wanted: HashSet<&str> = self.0.op_types.iter().map(String::as_str).collect();
        let reduce = self.0.reduce_range.unwrap_or_else(reduce_range_by_default);
        let qmax = if reduce { REDUCED_QMAX } else { 127.0 };

        let mut out = PassOutput::default();
        let mut skipped: HashMap<String, usize> = HashMap::new();
        let mut quantized = 0usize;
        let mut weights_quantized = 0u64;
        let mut replaced: Vec<(usize, Vec<NodeProto>)> = Vec::new();
        let mut new_initializers: Vec<TensorProto> = Vec::new();
        // One DynamicQuantizeLinear per activation, shared by every MatMul that reads it.
        let mut quantized_activations: HashMap<String, [String; 3]> = HashMap::new();
        let mut consumed_weights: HashMap<String, usize> = HashMap::new();

        for (i, node) in graph.node.iter().enumerate() {
            if !matches!(node.domain(), "" | "ai.onnx") || !wanted.contains(node.op_type()) {
                continue;
            }
            if excluded.contains(node.name()) {
                *skipped.entry("excluded by exclude_nodes".into()).or_default() += 1;
                continue;
            }
            let weight = match weight_of(node, &index, graph) {
                Ok(w) => w,
                Err(why) => {
                    *skipped.entry(why).or_default() += 1;
                    continue;
                }
            };
            let w_name = node.input[1].clone();
            let (q, scales) = quantize(&weight, self.0.per_channel, qmax);
            let base = sanitize(&w_name);
            let q_name = names.fresh(&format!("{base}_quantized"));
            let scale_name = names.fresh(&format!("{base}_scale"));
            let zp_name = names.fresh(&format!("{base}_zero_point"));
            let scale_dims: Vec<i64> = if self.0.per_channel {
                vec![weight.n as i64]
            } else {
                vec![]
            };
            new_initializers.push(tensor(
                &q_name,
                &[weight.k as i64, weight.n as i64],
                DataType::Int8,
                q.iter().map(|&v| v as u8).collect(),
            ));
            new_initializers.push(tensor(
                &scale_name,
                &scale_dims,
                DataType::Float,
                scales.iter().flat_map(|s| s.to_le_bytes()).collect(),
            ));
            new_initializers.push(tensor(&zp_name, &scale_dims, DataType::Int8, vec![0u8; scales.len()]));

            let a = node.input[0].clone();
            let mut nodes = Vec::new();
            let [a_q, a_scale, a_zp] = match quantized_activations.get(&a) {
                Some(names) => names.clone(),
                None => {
                    let outs = [
                        names.fresh(&format!("{}_quantized", sanitize(&a))),
                        names.fresh(&format!("{}_scale", sanitize(&a))),
                        names.fresh(&format!("{}_zero_point", sanitize(&a))),
                    ];
                    nodes.push(node_of(
                        &mut names,
                        "DynamicQuantizeLinear",
                        &[&a],
                        &outs.iter().map(String::as_str).collect::<Vec<_>>(),
                        vec![],
                    ));
                    quantized_activations.insert(a.clone(), outs.clone());
                    outs
                }
            };
            let y_int = names.fresh(&format!("{}_int32", sanitize(node.name())));
            let y_float = names.fresh(&format!("{}_float", sanitize(node.name())));
            let scale = names.fresh(&format!("{}_output_scale", sanitize(node.name())));
            let output = node.output[0].clone();
            let bias = (node.op_type() == "Gemm")
                .then(|| node.input.get(2).filter(|c| !c.is_empty()).cloned())
                .flatten();
            let product = if bias.is_some() {
                names.fresh(&format!("{}_no_bias", sanitize(node.name())))
            } else {
                output.clone()
            };
            nodes.push(node_of(
                &mut names,
                "MatMulInteger",
                &[&a_q, &q_name, &a_zp, &zp_name],
                &[&y_int],
                vec![],
            ));
            nodes.push(node_of(
                &mut names,
                "Cast",
                &[&y_int],
                &[&y_float],
                vec![int_attr("to", DataType::Float as i64)],
            ));
            nodes.push(node_of(&mut names, "Mul", &[&a_scale, &scale_name], &[&scale], vec![]));
            nodes.push(node_of(&mut names, "Mul", &[&y_float, &scale], &[&product], vec![]));
            if let Some(c) = bias {
                nodes.push(node_of(&mut names, "Add", &[&product, &c], &[&output], vec![]));
            }
            replaced.push((i, nodes));
            *consumed_weights.entry(w_name).or_default() += 1;
            quantized += 1;
            weights_quantized += (weight.k * weight.n) as u64;
        }

        // Splice the replacements in, back to front so indices stay valid.
        for (i, nodes) in replaced.into_iter().rev() {
            graph.node.splice(i..=i, nodes);
        }
        graph.initializer.extend(new_initializers);
        // Float weights nobody reads any more go.
        let (dead_nodes, dead_weights) = graph::eliminate_dead(graph);
        graph::topological_order(graph).map_err(|e| err(format!("the rewritten graph is invalid: {e}")))?;

        let skipped = skipped_notes(skipped);
        if quantized == 0 {
            out.warnings.push(format!(
                "quantize_int8_dynamic found nothing to quantize (no {} with a constant 2-D float weight); the model is unchanged{}",
                self.0.op_types.join("/"),
                if skipped.is_empty() { String::new() } else { format!(" ({})", skipped.join("; ")) }
            ));
        }
        out.notes.push(format!(
            "{quantized} node(s) quantized, {weights_quantized} weights to int8 ({}); {dead_weights} float \
             initializer(s) and {dead_nodes} Constant node(s) no longer read were removed",
            if self.0.per_channel {
                "per output column"
            } else {
                "per tensor"
            }
        ));
        if quantized > 0 {
            out.notes.push(range_note(reduce, self.0.reduce_range));
        }
        out.notes.extend(skipped);
        external::save(&model, output, None).map_err(|e| err(e.to_string()))?;
        Ok(out)
    }
}

/// `w` [K, N] to int8 codes, one scale per column (output channel) or for the whole weight.
fn quantize(w: &Weight, per_channel: bool, qmax: f32) -> (Vec<i8>, Vec<f32>) {
    symmetric_int8(&w.values, &[w.k as i64, w.n as i64], 1, per_channel, qmax)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn symmetric_int8_round_trips_within_half_a_step() {
        let w = Weight {
            k: 2,
            n: 3,
            values: vec![1.0, -0.5, 0.0, -2.0, 0.25, 0.0],
        };
        let (q, s) = quantize(&w, false, 127.0);
        assert_eq!(s, vec![2.0 / 127.0]);
        assert_eq!(q[3], -127);
        for (v, q) in w.values.iter().zip(&q) {
            assert!((v - *q as f32 * s[0]).abs() <= s[0] / 2.0 + 1e-7);
        }
        let (q, s) = quantize(&w, true, 127.0);
        assert_eq!(s, vec![2.0 / 127.0, 0.5 / 127.0, 1.0]);
        assert_eq!(
            (q[1], q[2], q[5]),
            (-127, 0, 0),
            "an all-zero column gets scale 1 and stays zero"
        );
    }

    #[test]
    fn conv_and_unknown_ops_are_refused_up_front() {
        let p = |ops: &[&str]| DynamicParams {
            op_types: ops.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        };
        assert!(p(&["Conv"]).validate().unwrap_err().contains("ConvInteger"));
        assert!(p(&["Foo"]).validate().unwrap_err().contains("not one of"));
        p(&["MatMul"]).validate().unwrap();
    }
}

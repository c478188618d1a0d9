//! `prune_structured`: removes whole hidden units (MLP neurons, Conv output channels) and rewrites
//! every consumer, so the model really does less work — unlike zeroing weights, the MatMuls and
//! Convs get smaller and so does their latency.
//!
//! A prunable chain is a producer with a stored weight (MatMul/Gemm, or Conv with one group), an
//! element-wise region after it (bias Add, BatchNormalization, activations, scalar arithmetic,
//! per-channel constants), and consumers that read the hidden tensor as their data input
//! (MatMul/Gemm rows, Conv input channels). Anything else that reads a hidden tensor (a Reshape, a
//! Concat, a graph output) leaves the chain alone, and so does a weight shared with a node outside
//! the chain: pruning it would change that node too.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::{Pass, PassContext, PassError, PassOutput};
use crate::eval::session::PreparedInputs;
use crate::onnx::graph::{self, GraphIndex};
use crate::onnx::proto::tensor_proto::DataType;
use crate::onnx::proto::{GraphProto, NodeProto, TensorProto};
use crate::onnx::{self, external};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Criterion {
    /// L2 norm of the unit's incoming weights times that of its outgoing weights.
    #[default]
    L2,
    L1,
    /// Mean |activation| on calibration samples times the L2 norm of the outgoing weights.
    Activation,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PruneStructuredParams {
    /// Fraction of each chain's hidden units removed.
    #[serde(default = "default_ratio")]
    pub ratio: f64,
    /// Ratio overrides by producer node name.
    #[serde(default)]
    pub per_layer: BTreeMap<String, f64>,
    /// Producer nodes whose units are kept.
    #[serde(default)]
    pub exclude_nodes: Vec<String>,
    #[serde(default)]
    pub criterion: Criterion,
    /// Calibration samples for the activation criterion.
    #[serde(default = "default_samples")]
    pub max_samples: usize,
}

fn default_ratio() -> f64 {
    0.3
}

fn default_samples() -> usize {
    64
}

impl PruneStructuredParams {
    pub fn validate(&self) -> Result<(), String> {
        let ok = |r: f64| (0.0..0.95).contains(&r);
        if !ok(self.ratio) {
            return Err("ratio must be within [0, 0.95)".into());
        }
        if let Some((name, r)) = self.per_layer.iter().find(|(_, r)| !ok(**r)) {
            return Err(format!("per_layer.{name} = {r}: ratios must be within [0, 0.95)"));
        }
        if self.max_samples == 0 {
            return Err("max_samples must be positive".into());
        }
        Ok(())
    }
}

pub struct PruneStructured(pub PruneStructuredParams);

/// One constant to cut along `axis` when units are removed.
#[derive(Debug, Clone)]
struct Cut {
    name: String,
    axis: usize,
}

#[derive(Debug)]
struct Chain {
    producer: usize,
    units: usize,
    cuts: Vec<Cut>,
    /// Cuts of the consumers' weights (the unit's outgoing weights), for importance.
    outgoing: Vec<Cut>,
    /// The producer's weight cut (incoming weights).
    incoming: Cut,
    /// Tensors carrying the hidden axis (their shape changes).
    region: Vec<String>,
    /// The hidden tensor the consumers read (for the activation criterion).
    consumed: String,
    consumers: usize,
}

fn attr_i(node: &NodeProto, name: &str, default: i64) -> i64 {
    node.attribute
        .iter()
        .find(|a| a.name() == name)
        .map_or(default, |a| a.i())
}

fn attr_f(node: &NodeProto, name: &str, default: f32) -> f32 {
    node.attribute
        .iter()
        .find(|a| a.name() == name)
        .map_or(default, |a| a.f())
}

fn is_default(domain: &str) -> bool {
    matches!(domain, "" | "ai.onnx")
}

/// Float32 values of a constant tensor (initializer or Constant node).
pub(crate) fn f32_values(t: &TensorProto) -> Option<Vec<f32>> {
    if t.data_type() != DataType::Float as i32 {
        return None;
    }
    let n: usize = t.dims.iter().map(|&d| d.max(0) as usize).product();
    let v: Vec<f32> = match &t.raw_data {
        Some(raw) => raw
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        None => t.float_data.clone(),
    };
    (v.len() == n).then_some(v)
}

/// Every node and graph output that reads `name`.
fn readers(g: &GraphProto, index: &GraphIndex, name: &str) -> (Vec<usize>, bool) {
    let is_output = g.output.iter().any(|o| o.name() == name);
    (index.consumers_of(name).to_vec(), is_output)
}

const UNARY: &[&str] = &[
    "Relu",
    "LeakyRelu",
    "Sigmoid",
    "Tanh",
    "Gelu",
    "Erf",
    "HardSwish",
    "HardSigmoid",
    "Elu",
    "Selu",
    "Softplus",
    "Mish",
    "Identity",
    "Neg",
    "Abs",
    "Dropout",
    "Clip",
];
const BINARY: &[&str] = &["Add", "Sub", "Mul", "Div"];

impl PruneStructured {
    /// The chain starting at node `p`, or why there is none.
    fn chain(&self, g: &GraphProto, index: &GraphIndex, p: usize) -> Result<Chain, String> {
        let node = &g.node[p];
        let w_name = node.input.get(1).ok_or("no weight")?;
        let w = super::weights::constant(index, g, w_name).ok_or("the weight is not stored in the model")?;
        if w.data_type() != DataType::Float as i32 {
            return Err("the weight is not float32".into());
        }
        // (hidden axis of the producer's weight, rank of the hidden tensor's channel layout)
        let (units, incoming_axis, conv) = match node.op_type() {
            "MatMul" if w.dims.len() == 2 => (w.dims[1] as usize, 1, false),
            "Gemm" if w.dims.len() == 2 => {
                if attr_i(node, "transA", 0) != 0
                    || attr_f(node, "alpha", 1.0) != 1.0
                    || attr_f(node, "beta", 1.0) != 1.0
                {
                    return Err("Gemm with transA, alpha or beta".into());
                }
                if attr_i(node, "transB", 0) != 0 {
                    (w.dims[0] as usize, 0, false)
                } else {
                    (w.dims[1] as usize, 1, false)
                }
            }
            "Conv" if w.dims.len() >= 3 => {
                if attr_i(node, "group", 1) != 1 {
                    return Err("grouped or depthwise Conv".into());
                }
                (w.dims[0] as usize, 0, true)
            }
            _ => return Err("not a MatMul/Gemm/Conv with a 2-D (or Conv) weight".into()),
        };
        let mut cuts = vec![Cut {
            name: w_name.clone(),
            axis: incoming_axis,
        }];
        if let Some(b) = node.input.get(2).filter(|b| !b.is_empty()) {
            let t = super::weights::constant(index, g, b).ok_or("the bias is not stored in the model")?;
            if t.dims.iter().product::<i64>() != units as i64 {
                return Err("a bias that is not one value per unit".into());
            }
            cuts.push(Cut {
                name: b.clone(),
                axis: t.dims.len().saturating_sub(1),
            });
        }
        let start = node.output.first().ok_or("no output")?.clone();
        let mut region = vec![start.clone()];
        let mut queue = VecDeque::from([start]);
        let mut seen: HashSet<String> = HashSet::new();
        let mut inside: HashSet<usize> = HashSet::from([p]);
        let mut outgoing = Vec::new();
        let mut consumed = String::new();
        let mut consumers = 0;
        let mut pending: Vec<(String, String)> = Vec::new();
        // Does a constant carry one value per unit along the hidden axis (and is it otherwise 1)?
        let per_unit_axis = |t: &TensorProto| -> Option<Option<usize>> {
            let n: i64 = t.dims.iter().product();
            if n == 1 {
                return Some(None);
            }
            if n != units as i64 {
                return None;
            }
            // MLP: the hidden axis is last; Conv (NCHW): it is axis 1 counted from a 4-D shape,
            // so a constant [C,1,1] or [1,C,1,1].
            let axis = t.dims.iter().position(|&d| d == units as i64)?;
            let from_end = t.dims.len() - axis;
            let ok = if conv { from_end == 3 } else { from_end == 1 };
            ok.then_some(Some(axis))
        };
        while let Some(tensor) = queue.pop_front() {
            if !seen.insert(tensor.clone()) {
                continue;
            }
            let (readers, is_output) = readers(g, index, &tensor);
            if is_output {
                return Err(format!("the hidden tensor {tensor:?} is a graph output"));
            }
            if readers.is_empty() {
                return Err(format!("the hidden tensor {tensor:?} is never read"));
            }
            for r in readers {
                let n = &g.node[r];
                if !is_default(n.domain()) {
                    return Err(format!("the hidden tensor reaches {}", n.op_type()));
                }
                let op = n.op_type();
                let data_input = n.input.first() == Some(&tensor);
                let consumer_weight =
                    |slot: usize| n.input.get(slot).and_then(|w| super::weights::constant(index, g, w));
                let terminal = match op {
                    "MatMul" | "Gemm" if data_input => {
                        let cw = consumer_weight(1).ok_or("a consumer MatMul whose weight is not stored")?;
                        if cw.dims.len() != 2 || cw.data_type() != DataType::Float as i32 {
                            return Err("a consumer with a weight that is not 2-D float32".into());
                        }
                        let axis = if op == "Gemm" {
                            if attr_i(n, "transA", 0) != 0 {
                                return Err("a consumer Gemm with transA".into());
                            }
                            if attr_i(n, "transB", 0) != 0 { 1 } else { 0 }
                        } else {
                            0
                        };
                        if cw.dims[axis] as usize != units {
                            return Err("a consumer whose weight does not match the hidden size".into());
                        }
                        Some(Cut {
                            name: n.input[1].clone(),
                            axis,
                        })
                    }
                    "Conv" if data_input && conv => {
                        if attr_i(n, "group", 1) != 1 {
                            return Err("a grouped or depthwise consumer Conv".into());
                        }
                        let cw = consumer_weight(1).ok_or("a consumer Conv whose weight is not stored")?;
                        if cw.dims.len() < 3 || cw.dims[1] as usize != units || cw.data_type() != DataType::Float as i32
                        {
                            return Err("a consumer Conv whose weight does not match the channels".into());
                        }
                        Some(Cut {
                            name: n.input[1].clone(),
                            axis: 1,
                        })
                    }
                    _ => None,
                };
                if let Some(cut) = terminal {
                    inside.insert(r);
                    outgoing.push(cut);
                    consumed = tensor.clone();
                    consumers += 1;
                    continue;
                }
                // Element-wise: every other input is a constant scalar or per-unit vector, or
                // another hidden tensor.
                let element_wise = UNARY.contains(&op) || BINARY.contains(&op) || (op == "BatchNormalization" && conv);
                if !element_wise {
                    return Err(format!("the hidden tensor reaches {op}"));
                }
                if op == "Dropout" && n.output.len() > 1 && n.output[1..].iter().any(|o| !o.is_empty()) {
                    return Err("a Dropout with a mask output".into());
                }
                for (slot, input) in n.input.iter().enumerate() {
                    if input.is_empty() || *input == tensor || seen.contains(input) || region.contains(input) {
                        continue;
                    }
                    if op == "BatchNormalization" {
                        let t = super::weights::constant(index, g, input)
                            .filter(|t| t.dims == [units as i64])
                            .ok_or("a BatchNormalization whose parameters are not stored per channel")?;
                        let _ = t;
                        cuts.push(Cut {
                            name: input.clone(),
                            axis: 0,
                        });
                        continue;
                    }
                    match super::weights::constant(index, g, input) {
                        Some(t) => match per_unit_axis(t) {
                            Some(None) => {}
                            Some(Some(axis)) => cuts.push(Cut {
                                name: input.clone(),
                                axis,
                            }),
                            None => {
                                return Err(format!(
                                    "{op} input {slot} is a constant of shape {:?} that does not follow the hidden units",
                                    t.dims
                                ));
                            }
                        },
                        // Another activation: fine only if it is itself a hidden tensor (x *
                        // sigmoid(x)), which the walk must reach too; checked once it is done.
                        None => pending.push((op.to_string(), input.clone())),
                    }
                }
                inside.insert(r);
                for o in n.output.iter().take(1) {
                    region.push(o.clone());
                    queue.push_back(o.clone());
                }
            }
        }
        if consumers == 0 {
            return Err("no consumer reads the hidden units".into());
        }
        if let Some((op, other)) = pending.iter().find(|(_, t)| !region.contains(t)) {
            return Err(format!("{op} combines the hidden tensor with {other:?}, which is not"));
        }
        // Every cut constant must be read only inside the chain.
        for cut in cuts.iter().chain(&outgoing) {
            if index.consumers_of(&cut.name).iter().any(|c| !inside.contains(c)) {
                return Err(format!(
                    "the weight {:?} is shared with a node outside the chain",
                    cut.name
                ));
            }
            if g.output.iter().any(|o| o.name() == cut.name) {
                return Err(format!("the weight {:?} is a graph output", cut.name));
            }
        }
        let mut seen_cuts = HashSet::new();
        cuts.retain(|c| seen_cuts.insert(c.name.clone()));
        Ok(Chain {
            producer: p,
            units,
            incoming: cuts[0].clone(),
            cuts,
            outgoing,
            region,
            consumed,
            consumers,
        })
    }
}

/// Norm of every slice of `t` along `axis` (L1 or L2).
fn slice_norms(t: &TensorProto, axis: usize, l1: bool) -> Option<Vec<f64>> {
    let v = f32_values(t)?;
    let dims: Vec<usize> = t.dims.iter().map(|&d| d as usize).collect();
    let outer: usize = dims[..axis].iter().product();
    let n = dims[axis];
    let inner: usize = dims[axis + 1..].iter().product();
    let mut norms = vec![0f64; n];
    for o in 0..outer {
        for (j, norm) in norms.iter_mut().enumerate() {
            let base = (o * n + j) * inner;
            for &x in &v[base..base + inner] {
                *norm += if l1 { x.abs() as f64 } else { (x as f64) * (x as f64) };
            }
        }
    }
    if !l1 {
        norms.iter_mut().for_each(|x| *x = x.sqrt());
    }
    Some(norms)
}

/// `t` keeping only the indices `keep` along `axis`.
fn cut_tensor(t: &TensorProto, axis: usize, keep: &[usize]) -> Option<TensorProto> {
    let v = f32_values(t)?;
    let dims: Vec<usize> = t.dims.iter().map(|&d| d as usize).collect();
    let outer: usize = dims[..axis].iter().product();
    let n = dims[axis];
    let inner: usize = dims[axis + 1..].iter().product();
    let mut out = Vec::with_capacity(outer * keep.len() * inner);
    for o in 0..outer {
        for &j in keep {
            let base = (o * n + j) * inner;
            out.extend_from_slice(&v[base..base + inner]);
        }
    }
    let mut new_dims = t.dims.clone();
    new_dims[axis] = keep.len() as i64;
    Some(super::weights::tensor(
        t.name(),
        &new_dims,
        DataType::Float,
        out.iter().flat_map(|x| x.to_le_bytes()).collect(),
    ))
}

/// Replaces the constant `name` (an initializer, or the value of a `Constant` node).
pub(crate) fn replace_constant(g: &mut GraphProto, name: &str, mut tensor: TensorProto) {
    if let Some(t) = g.initializer.iter_mut().find(|t| t.name() == name) {
        *t = tensor;
        return;
    }
    for n in g.node.iter_mut().filter(|n| n.op_type() == "Constant") {
        if n.output.first().map(String::as_str) == Some(name)
            && let Some(a) = n.attribute.iter_mut().find(|a| a.t.is_some())
        {
            tensor.name = None;
            a.t = Some(tensor);
            return;
        }
    }
}

/// Mean |value| per unit of the hidden tensors, over calibration samples.
fn activation_means(
    ctx: &PassContext<'_>,
    model: &crate::onnx::ModelProto,
    chains: &[(Chain, usize)],
    max_samples: usize,
) -> Result<HashMap<String, Vec<f64>>, String> {
    let calibration = ctx
        .calibration
        .ok_or("the activation criterion needs calibration samples")?;
    let consumed: Vec<&str> = chains.iter().map(|(c, _)| c.consumed.as_str()).collect();
    let path = ctx.work_dir.join("prune-activations.onnx");
    std::fs::write(&path, graph::exposing_outputs(model, &consumed)).map_err(|e| e.to_string())?;
    let mut session = ctx.runtime.session(&path, ctx.threads).map_err(|e| e.to_string())?;
    let mut sums: HashMap<String, (Vec<f64>, u64)> = HashMap::new();
    for k in 0..calibration.len().min(max_samples) {
        let prepared = PreparedInputs::new(&calibration.sample(k)?).map_err(|e| e.to_string())?;
        for out in prepared.run_and_collect(&mut session).map_err(|e| e.to_string())? {
            let Some((c, _)) = chains.iter().find(|(c, _)| c.consumed == out.name) else {
                continue;
            };
            let Some(values) = out.values else { continue };
            let units = c.units;
            // The unit axis: last for MLPs, 1 for NCHW.
            let conv = out.shape.len() == 4 && out.shape[1] as usize == units;
            let entry = sums.entry(out.name.clone()).or_insert((vec![0.0; units], 0));
            let inner: usize = if conv {
                out.shape[2..].iter().product::<i64>() as usize
            } else {
                1
            };
            for (i, v) in values.iter().enumerate() {
                let unit = if conv { (i / inner) % units } else { i % units };
                entry.0[unit] += v.abs();
            }
            entry.1 += 1;
        }
    }
    Ok(sums
        .into_iter()
        .map(|(k, (s, n))| (k, s.into_iter().map(|x| x / n.max(1) as f64).collect()))
        .collect())
}

impl Pass for PruneStructured {
    fn name(&self) -> &'static str {
        "prune_structured"
    }

    fn calibrates(&self) -> bool {
        self.0.criterion == Criterion::Activation
    }

    fn run(&self, input: &Path, output: &Path, ctx: &PassContext<'_>) -> Result<PassOutput, PassError> {
        let err = |m: String| PassError(m);
        let mut model = onnx::load(input).map_err(|e| err(e.to_string()))?;
        let mut out = PassOutput::default();
        let g = model
            .graph
            .as_ref()
            .ok_or_else(|| err("the model has no graph".into()))?;
        let index = GraphIndex::new(g);
        let excluded: HashSet<&str> = self.0.exclude_nodes.iter().map(String::as_str).collect();
        let mut chains: Vec<(Chain, usize)> = Vec::new();
        let mut skipped: BTreeMap<String, usize> = BTreeMap::new();
        let mut claimed: HashSet<String> = HashSet::new();
        for (i, node) in g.node.iter().enumerate() {
            if !is_default(node.domain()) || !matches!(node.op_type(), "MatMul" | "Gemm" | "Conv") {
                continue;
            }
            if excluded.contains(node.name()) {
                *skipped.entry("excluded by exclude_nodes".into()).or_default() += 1;
                continue;
            }
            let chain = match self.chain(g, &index, i) {
                Ok(c) => c,
                Err(why) => {
                    *skipped.entry(why).or_default() += 1;
                    continue;
                }
            };
            // A weight cut by two chains (a consumer's weight that is the next chain's producer
            // weight is fine: different axes) must not be cut twice along the same axis.
            if chain
                .cuts
                .iter()
                .chain(&chain.outgoing)
                .any(|c| claimed.contains(&format!("{}#{}", c.name, c.axis)))
            {
                *skipped.entry("overlaps another chain".into()).or_default() += 1;
                continue;
            }
            let ratio = self.0.per_layer.get(node.name()).copied().unwrap_or(self.0.ratio);
            let remove = ((chain.units as f64) * ratio).floor() as usize;
            let keep = chain.units.saturating_sub(remove).max(1);
            if keep == chain.units {
                *skipped.entry("ratio removes no unit".into()).or_default() += 1;
                continue;
            }
            for c in chain.cuts.iter().chain(&chain.outgoing) {
                claimed.insert(format!("{}#{}", c.name, c.axis));
            }
            chains.push((chain, keep));
        }
        if chains.is_empty() {
            out.warnings.push(format!(
                "prune_structured found no prunable chain (producer with stored weight -> element-wise ops -> \
                 MatMul/Gemm/Conv consumers); the model is unchanged{}",
                if skipped.is_empty() {
                    String::new()
                } else {
                    format!(
                        " ({})",
                        skipped
                            .iter()
                            .map(|(k, v)| format!("{v}: {k}"))
                            .collect::<Vec<_>>()
                            .join("; ")
                    )
                }
            ));
            external::save(&model, output, None).map_err(|e| err(e.to_string()))?;
            return Ok(out);
        }
        let activations = if self.0.criterion == Criterion::Activation {
            Some(activation_means(ctx, &model, &chains, self.0.max_samples).map_err(err)?)
        } else {
            None
        };
        // Decide every chain's kept units on the original weights, then rewrite.
        let l1 = self.0.criterion == Criterion::L1;
        let mut plans: Vec<(usize, Vec<usize>)> = Vec::new();
        for (c, keep) in &chains {
            let norm_of =
                |cut: &Cut| super::weights::constant(&index, g, &cut.name).and_then(|t| slice_norms(t, cut.axis, l1));
            let mut outgoing = vec![0f64; c.units];
            for cut in &c.outgoing {
                for (o, v) in outgoing.iter_mut().zip(norm_of(cut).unwrap_or_default()) {
                    *o += v;
                }
            }
            let first = match activations.as_ref().and_then(|a| a.get(&c.consumed)) {
                Some(a) => a.clone(),
                None => norm_of(&c.incoming).unwrap_or_else(|| vec![1.0; c.units]),
            };
            let score: Vec<f64> = first.iter().zip(&outgoing).map(|(a, b)| a * b).collect();
            let mut order: Vec<usize> = (0..c.units).collect();
            order.sort_by(|&a, &b| score[b].total_cmp(&score[a]).then(a.cmp(&b)));
            let mut kept: Vec<usize> = order[..*keep].to_vec();
            kept.sort_unstable();
            plans.push((c.producer, kept));
        }
        let g = model.graph.as_mut().expect("checked above");
        let mut removed_params = 0i64;
        let mut layers = Vec::new();
        for ((c, _), (_, kept)) in chains.iter().zip(&plans) {
            let index = GraphIndex::new(g);
            let mut new_tensors = Vec::new();
            for cut in c.cuts.iter().chain(&c.outgoing) {
                let t = super::weights::constant(&index, g, &cut.name).expect("found when the chain was built");
                let before: i64 = t.dims.iter().product();
                let cut_t = cut_tensor(t, cut.axis, kept)
                    .ok_or_else(|| err(format!("the constant {:?} is not float32", cut.name)))?;
                removed_params += before - cut_t.dims.iter().product::<i64>();
                new_tensors.push((cut.name.clone(), cut_t));
            }
            for (name, t) in new_tensors {
                replace_constant(g, &name, t);
            }
            // Shapes recorded for the hidden tensors are stale now; ONNX Runtime infers them.
            g.value_info.retain(|v| !c.region.contains(&v.name().to_string()));
            let name = g.node[c.producer].name().to_string();
            layers.push(format!(
                "{} ({}): {} -> {} units, {} consumer(s)",
                if name.is_empty() { "unnamed" } else { &name },
                g.node[c.producer].op_type(),
                c.units,
                kept.len(),
                c.consumers
            ));
        }
        graph::topological_order(g).map_err(|e| err(format!("the rewritten graph is invalid: {e}")))?;
        out.notes.push(format!(
            "{} chain(s) pruned ({:?} criterion), {removed_params} parameters removed",
            chains.len(),
            self.0.criterion
        ));
        out.notes.extend(layers);
        out.notes
            .extend(skipped.iter().map(|(k, v)| format!("{v} node(s) not pruned: {k}")));
        external::save(&model, output, None).map_err(|e| err(e.to_string()))?;
        Ok(out)
    }
}

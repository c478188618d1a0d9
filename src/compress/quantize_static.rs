//! `quantize_int8_static`: QDQ quantization calibrated on data. Weights are stored int8 (per
//! tensor or per output channel); the activations entering and leaving each quantized Conv/MatMul/
//! Gemm get QuantizeLinear → DequantizeLinear pairs with ranges measured on the calibration split
//! (never on evaluation samples). Calibration runs ONNX Runtime with those activations exposed as
//! outputs, one sample at a time, so its memory does not grow with the number of samples; the
//! percentile and entropy methods make a second pass into fixed-size histograms.
//!
//! ONNX Runtime fuses the QDQ pattern into its integer kernels (QLinearConv, QLinearMatMul) when it
//! loads the model; other runtimes read the same standard operators.

use std::collections::{HashMap, HashSet};
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::weights::{
    REDUCED_QMAX, channel_runs, constant, int_attr, node_of, range_note, reduce_range_by_default, sanitize,
    skipped_notes, symmetric_int8, tensor,
};
use super::{Pass, PassContext, PassError, PassOutput};
use crate::eval::inputs::TensorData;
use crate::eval::session::{PreparedInputs, widen};
use crate::onnx::graph::{self, GraphIndex, NameGen};
use crate::onnx::proto::tensor_proto::DataType;
use crate::onnx::proto::{GraphProto, NodeProto, TensorProto};
use crate::onnx::{self, external};

const BINS: usize = 2048;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Method {
    #[default]
    Minmax,
    Percentile,
    Entropy,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StaticParams {
    #[serde(default)]
    pub calibration: Method,
    /// For `percentile`: the share of |activation| values the range keeps, in percent.
    #[serde(default = "default_percentile")]
    pub percentile: f64,
    /// One weight scale per output channel (needs opset 13).
    #[serde(default)]
    pub per_channel: bool,
    /// int8 activations around zero instead of uint8 with a zero point.
    #[serde(default)]
    pub symmetric_activations: bool,
    /// Weights around zero (what ONNX Runtime's fastest kernels expect) or with a zero point (finer
    /// steps for a skewed range). Unset: per tensor, a zero point where that at least halves the
    /// weight's rounding error; per channel, none. See [`asymmetric_type`] for the type.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub symmetric_weights: Option<bool>,
    #[serde(default = "default_ops")]
    pub op_types: Vec<String>,
    #[serde(default)]
    pub exclude_nodes: Vec<String>,
    #[serde(default)]
    pub exclude_op_types: Vec<String>,
    /// Most calibration samples used.
    #[serde(default = "default_samples")]
    pub max_samples: usize,
    /// Also quantize MatMuls whose two inputs are activations (attention scores and context), as
    /// ONNX Runtime's `quantize_static` does.
    #[serde(default = "default_true")]
    pub activation_matmuls: bool,
    /// int8 weights in 7 bits, so ONNX Runtime's AVX2 kernels (uint8 activations × int8 weights)
    /// cannot saturate; unset: yes on a CPU without VNNI. Only for int8 weights (asymmetric weights
    /// are then uint8, whose kernels do not saturate).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reduce_range: Option<bool>,
}

fn default_true() -> bool {
    true
}

fn default_percentile() -> f64 {
    99.999
}

fn default_ops() -> Vec<String> {
    ["Conv", "MatMul", "Gemm"].iter().map(|s| s.to_string()).collect()
}

fn default_samples() -> usize {
    256
}

impl StaticParams {
    pub fn validate(&self) -> Result<(), String> {
        if !(50.0..=100.0).contains(&self.percentile) {
            return Err(format!("percentile {} is not within 50..=100", self.percentile));
        }
        if self.max_samples == 0 {
            return Err("max_samples must be at least 1".into());
        }
        for op in &self.op_types {
            if !["Conv", "MatMul", "Gemm"].contains(&op.as_str()) {
                return Err(format!("op_types: {op:?} is not one of Conv, MatMul, Gemm"));
            }
        }
        Ok(())
    }
}

pub struct QuantizeStatic(pub StaticParams);

/// A node to quantize and where its weight lives.
struct Target {
    node: usize,
    /// Axis of the output channel in the weight as stored (Conv 0, MatMul 1, Gemm transB ? 0 : 1).
    channel_axis: usize,
}

/// Running statistics of one activation.
#[derive(Clone)]
struct Stats {
    min: f32,
    max: f32,
    hist: Vec<u64>,
}

impl Pass for QuantizeStatic {
    fn name(&self) -> &'static str {
        "quantize_int8_static"
    }

    fn calibrates(&self) -> bool {
        true
    }

    fn run(&self, input: &Path, output: &Path, ctx: &PassContext<'_>) -> Result<PassOutput, PassError> {
        let err = |m: String| PassError(m);
        let p = &self.0;
        let calibration = ctx
            .calibration
            .filter(|c| !c.is_empty())
            .ok_or_else(|| err("no calibration samples (the dataset's calibration split is empty)".into()))?;
        let mut model = onnx::load(input).map_err(|e| err(e.to_string()))?;
        let opset = graph::opset_version(&model, "").unwrap_or(0);
        let needed = if p.per_channel { 13 } else { 10 };
        let mut upgrade_note = None;
        if opset < needed {
            // Per-channel QDQ needs opset 13: upgrade where that is faithful, else say why not.
            let ranks = measure_ranks(
                ctx,
                &model,
                &crate::onnx::upgrade::rank_sensitive_inputs(&model),
                calibration,
            )
            .map_err(err)?;
            let up = crate::onnx::upgrade::to_opset(&mut model, 13, &ranks).map_err(|why| {
                err(format!(
                    "needs opset {needed} or later (QuantizeLinear/DequantizeLinear{}); the model imports opset \
                     {opset} and cannot be upgraded: {why}",
                    if p.per_channel { " with a per-channel axis" } else { "" }
                ))
            })?;
            upgrade_note = Some(format!(
                "upgraded the model from opset {} to {} (rewrote: {})",
                up.from,
                up.to,
                if up.rewritten.is_empty() {
                    "nothing".to_string()
                } else {
                    up.rewritten.join(", ")
                }
            ));
        }
        let graph = model
            .graph
            .as_mut()
            .ok_or_else(|| err("the model has no graph".into()))?;
        graph::sort_topologically(graph).map_err(|e| err(e.to_string()))?;

        // 1. What to quantize.
        let index = GraphIndex::new(graph);
        let mut skipped: HashMap<String, usize> = HashMap::new();
        let mut targets = Vec::new();
        let mut activation_matmuls: Vec<usize> = Vec::new();
        for (i, node) in graph.node.iter().enumerate() {
            if !matches!(node.domain(), "" | "ai.onnx")
                || !p.op_types.iter().any(|o| o == node.op_type())
                || p.exclude_op_types.iter().any(|o| o == node.op_type())
            {
                continue;
            }
            if p.exclude_nodes.iter().any(|n| n == node.name()) {
                *skipped.entry("excluded".into()).or_default() += 1;
                continue;
            }
            match target(node, i, &index, graph) {
                Ok(t) => targets.push(t),
                // Attention's Q·Kᵀ and softmax·V: both inputs are activations, so both get a QDQ
                // pair and ONNX Runtime runs the product as QLinearMatMul.
                Err(_)
                    if p.activation_matmuls
                        && node.op_type() == "MatMul"
                        && node.input.len() == 2
                        && node.input.iter().all(|x| constant(&index, graph, x).is_none()) =>
                {
                    activation_matmuls.push(i)
                }
                Err(why) => *skipped.entry(why).or_default() += 1,
            }
        }
        let mut activations: Vec<String> = Vec::new();
        let mut quantize_around = |names: &[&String]| {
            for name in names {
                if !activations.contains(*name) {
                    activations.push((*name).clone());
                }
            }
        };
        for t in &targets {
            let node = &graph.node[t.node];
            quantize_around(&[&node.input[0], &node.output[0]]);
        }
        for &i in &activation_matmuls {
            let node = &graph.node[i];
            quantize_around(&[&node.input[0], &node.input[1], &node.output[0]]);
        }
        let mut out = PassOutput::default();
        if targets.is_empty() && activation_matmuls.is_empty() {
            out.warnings.push(
                "quantize_int8_static found no Conv/MatMul/Gemm with a constant float weight; the model is unchanged"
                    .into(),
            );
            external::save(&model, output, None).map_err(|e| err(e.to_string()))?;
            return Ok(out);
        }

        // 2. Calibrate: min/max first, then (percentile, entropy) histograms of |x|.
        let samples = calibration.len().min(p.max_samples);
        let graph_inputs: HashSet<String> = graph.input.iter().map(|v| v.name().to_string()).collect();
        let augmented = graph::exposing_outputs(&model, &activations);
        let mut stats = calibrate(ctx, &graph_inputs, &augmented, &activations, samples, None).map_err(err)?;
        if p.calibration != Method::Minmax {
            stats = calibrate(ctx, &graph_inputs, &augmented, &activations, samples, Some(&stats)).map_err(err)?;
        }
        let graph = model.graph.as_mut().expect("checked above");
        let mut names = NameGen::new(graph);

        // 3. Activation ranges → QDQ pairs.
        let mut act_scale: HashMap<String, f32> = HashMap::new();
        let mut new_inits: Vec<TensorProto> = Vec::new();
        let mut new_nodes: Vec<NodeProto> = Vec::new();
        for name in &activations {
            let s = &stats[name];
            let (lo, hi) = range(s, p.calibration, p.percentile);
            let (scale, zp, zp_type) = if p.symmetric_activations {
                let m = lo.abs().max(hi.abs());
                (if m > 0.0 { m / 127.0 } else { 1.0 }, 0u8, DataType::Int8)
            } else {
                let (lo, hi) = (lo.min(0.0), hi.max(0.0));
                let scale = if hi > lo { (hi - lo) / 255.0 } else { 1.0 };
                (scale, (-lo / scale).round().clamp(0.0, 255.0) as u8, DataType::Uint8)
            };
            act_scale.insert(name.clone(), scale);
            let base = sanitize(name);
            let (s_name, z_name) = (
                names.fresh(&format!("{base}_scale")),
                names.fresh(&format!("{base}_zero_point")),
            );
            new_inits.push(tensor(&s_name, &[], DataType::Float, scale.to_le_bytes().to_vec()));
            new_inits.push(tensor(&z_name, &[], zp_type, vec![zp]));
            let (q, dq) = (
                names.fresh(&format!("{base}_quantized")),
                names.fresh(&format!("{base}_dequantized")),
            );
            // Target nodes read the dequantized name from here on.
            act_scale.insert(dq.clone(), scale);
            for node in graph.node.iter_mut() {
                for i in node.input.iter_mut().filter(|i| *i == name) {
                    *i = dq.clone();
                }
            }
            new_nodes.push(node_of(
                &mut names,
                "QuantizeLinear",
                &[name, &s_name, &z_name],
                &[&q],
                vec![],
            ));
            new_nodes.push(node_of(
                &mut names,
                "DequantizeLinear",
                &[&q, &s_name, &z_name],
                &[&dq],
                vec![],
            ));
        }

        // 4. Weights (int8, symmetric) and biases (int32 at input scale × weight scale).
        let reduce = p.reduce_range.unwrap_or_else(reduce_range_by_default);
        let mut weights = 0u64;
        let mut asymmetric_weights = 0usize;
        let asym_type = asymmetric_type(reduce);
        for t in &targets {
            let node = graph.node[t.node].clone();
            let w = constant(&index, graph, &node.input[1])
                .cloned()
                .expect("checked by target()");
            let values = floats(&w);
            let channels = w.dims[t.channel_axis] as usize;
            let symmetric = |qmax: f32| {
                let (q, s) = symmetric_int8(&values, &w.dims, t.channel_axis, p.per_channel, qmax);
                let zeros = vec![0u8; s.len()];
                (
                    q.iter().map(|&v| v as u8).collect::<Vec<u8>>(),
                    s,
                    zeros,
                    DataType::Int8,
                )
            };
            let asymmetric = || {
                let (q, s, z) = quantize_weight_asymmetric(&values, &w.dims, t.channel_axis, p.per_channel, asym_type);
                (q, s, z, asym_type)
            };
            let qmax = if reduce { REDUCED_QMAX } else { 127.0 };
            let ((q, scales, zero_points, weight_type), with_zero_point) = match p.symmetric_weights {
                Some(true) => (symmetric(qmax), false),
                Some(false) => (asymmetric(), true),
                None if p.per_channel => (symmetric(qmax), false),
                None => {
                    // A zero point costs speed: int8 weights with one leave ONNX Runtime's
                    // symmetric convolution kernels for im2col and a general GEMM (12-19% slower
                    // on YOLOv8n and PP-OCRv4 det with every weight so), uint8 weights go through
                    // its uint8 × uint8 kernels (up to twice as slow). So it must earn its place:
                    // only a skewed range, judged against full-range int8 whatever `reduce_range`
                    // says (which would otherwise favour uint8 on every CPU without VNNI).
                    let asym = asymmetric();
                    let full = symmetric(127.0);
                    let error = |(q, s, z, ty): &(Vec<u8>, Vec<f32>, Vec<u8>, DataType)| {
                        rounding_error(&values, q, s[0], z[0], *ty == DataType::Int8)
                    };
                    if error(&asym) <= 0.5 * error(&full) {
                        (asym, true)
                    } else if reduce {
                        (symmetric(qmax), false)
                    } else {
                        (full, false)
                    }
                }
            };
            asymmetric_weights += usize::from(with_zero_point);
            weights += values.len() as u64;
            let base = sanitize(&node.input[1]);
            let (wq, ws, wz, wdq) = (
                names.fresh(&format!("{base}_quantized")),
                names.fresh(&format!("{base}_scale")),
                names.fresh(&format!("{base}_zero_point")),
                names.fresh(&format!("{base}_dequantized")),
            );
            let sdims: Vec<i64> = if p.per_channel { vec![channels as i64] } else { vec![] };
            new_inits.push(tensor(&wq, &w.dims, weight_type, q));
            new_inits.push(tensor(
                &ws,
                &sdims,
                DataType::Float,
                scales.iter().flat_map(|s| s.to_le_bytes()).collect(),
            ));
            new_inits.push(tensor(&wz, &sdims, weight_type, zero_points));
            let axis = if p.per_channel {
                vec![int_attr("axis", t.channel_axis as i64)]
            } else {
                vec![]
            };
            new_nodes.push(node_of(&mut names, "DequantizeLinear", &[&wq, &ws, &wz], &[&wdq], axis));
            graph.node[t.node].input[1] = wdq;

            // A 1-D constant bias: int32 with scale = activation scale × weight scale.
            let input_scale = act_scale[&node.input[0]];
            if let Some(b) = node.input.get(2).filter(|b| !b.is_empty())
                && let Some(bt) =
                    constant(&index, graph, b).filter(|bt| bt.dims.len() == 1 && bt.dims[0] as usize == channels)
            {
                let bias = floats(bt);
                let bscale: Vec<f32> = (0..channels)
                    .map(|c| input_scale * if p.per_channel { scales[c] } else { scales[0] })
                    .collect();
                let bq: Vec<i32> = bias
                    .iter()
                    .zip(&bscale)
                    .map(|(v, s)| (v / s).round().clamp(i32::MIN as f32, i32::MAX as f32) as i32)
                    .collect();
                let bbase = sanitize(b);
                let (bqn, bsn, bzn, bdq) = (
                    names.fresh(&format!("{bbase}_quantized")),
                    names.fresh(&format!("{bbase}_scale")),
                    names.fresh(&format!("{bbase}_zero_point")),
                    names.fresh(&format!("{bbase}_dequantized")),
                );
                let (svals, sdims): (Vec<f32>, Vec<i64>) = if p.per_channel {
                    (bscale.clone(), vec![channels as i64])
                } else {
                    (vec![bscale[0]], vec![])
                };
                new_inits.push(tensor(
                    &bqn,
                    &[channels as i64],
                    DataType::Int32,
                    bq.iter().flat_map(|v| v.to_le_bytes()).collect(),
                ));
                new_inits.push(tensor(
                    &bsn,
                    &sdims,
                    DataType::Float,
                    svals.iter().flat_map(|s| s.to_le_bytes()).collect(),
                ));
                new_inits.push(tensor(&bzn, &sdims, DataType::Int32, vec![0u8; 4 * svals.len()]));
                let axis = if p.per_channel {
                    vec![int_attr("axis", 0)]
                } else {
                    vec![]
                };
                new_nodes.push(node_of(
                    &mut names,
                    "DequantizeLinear",
                    &[&bqn, &bsn, &bzn],
                    &[&bdq],
                    axis,
                ));
                graph.node[t.node].input[2] = bdq;
            }
        }
        graph.initializer.extend(new_inits);
        graph.node.extend(new_nodes);
        graph::sort_topologically(graph).map_err(|e| err(format!("the quantized graph is invalid: {e}")))?;
        let (dead_nodes, dead_weights) = graph::eliminate_dead(graph);

        let skipped = skipped_notes(skipped);
        out.notes.push(format!(
            "{} node(s) quantized (QDQ), {weights} weights to int8 ({}), {} activation(s) calibrated with {:?} on {samples} \
             sample(s){}; {dead_weights} float initializer(s) and {dead_nodes} node(s) no longer read were removed",
            targets.len(),
            if p.per_channel { "per channel" } else { "per tensor" },
            activations.len(),
            p.calibration,
            if calibration.is_synthetic() { " of synthetic data" } else { " of the calibration split" },
        ).to_lowercase());
        if !activation_matmuls.is_empty() {
            out.notes.push(format!(
                "{} MatMul(s) between two activations (attention) quantized with QDQ on both inputs",
                activation_matmuls.len()
            ));
        }
        let stored = match asym_type {
            DataType::Uint8 => "uint8 with a zero point (reduce_range keeps int8 weights to 7 bits)",
            _ => "int8 with a zero point",
        };
        if asymmetric_weights > 0 {
            out.notes.push(match p.symmetric_weights {
                Some(false) => format!("{asymmetric_weights} weight tensor(s) stored as {stored}"),
                _ => format!(
                    "{asymmetric_weights} of {} weight tensor(s) stored as {stored}: their range is skewed, so a zero \
                     point rounds them with half the error or less (set symmetric_weights to choose for all)",
                    targets.len()
                ),
            });
        }
        if p.per_channel && p.symmetric_weights == Some(false) {
            out.warnings.push(
                "per-channel weights with zero points: ONNX Runtime's CPU QLinearConv needs one weight zero point \
                 for all channels, so these Conv nodes run unfused in float (PP-OCR cls: 16.4 ms against 2.5 ms \
                 with symmetric weights); use per_channel or symmetric_weights:false, not both"
                    .into(),
            );
        }
        if asymmetric_weights < targets.len() {
            out.notes.push(range_note(reduce, p.reduce_range));
        }
        out.notes.extend(skipped);
        out.notes.extend(upgrade_note);
        if calibration.is_synthetic() {
            out.warnings.push(
                "quantize_int8_static calibrated on synthetic inputs (no dataset): activation ranges may not match real \
                 data; upload a dataset for a trustworthy calibration"
                    .into(),
            );
        }
        external::save(&model, output, None).map_err(|e| err(e.to_string()))?;
        Ok(out)
    }
}

/// Ranks of `names` measured by running the model once on a calibration sample (for values the
/// model does not declare).
fn measure_ranks(
    ctx: &PassContext<'_>,
    model: &crate::onnx::ModelProto,
    names: &[String],
    calibration: &crate::eval::calibration::CalibrationSet,
) -> Result<HashMap<String, i64>, String> {
    if names.is_empty() {
        return Ok(HashMap::new());
    }
    let path = ctx.work_dir.join("ranks.onnx");
    std::fs::write(&path, graph::exposing_outputs(model, names)).map_err(|e| e.to_string())?;
    let mut session = ctx.runtime.session(&path, ctx.threads).map_err(|e| e.to_string())?;
    let tensors = calibration.sample(0)?;
    let outputs = PreparedInputs::new(&tensors)
        .and_then(|p| p.run_and_collect(&mut session))
        .map_err(|e| e.to_string())?;
    let _ = std::fs::remove_file(&path);
    let mut ranks: HashMap<String, i64> = outputs
        .into_iter()
        .map(|o| (o.name, o.shape.len() as i64))
        .filter(|(n, _)| names.contains(n))
        .collect();
    for t in tensors.iter().filter(|t| names.contains(&t.name)) {
        ranks.insert(t.name.clone(), t.shape.len() as i64);
    }
    Ok(ranks)
}

/// A node is a target when its weight is a constant float tensor of the expected rank.
fn target(node: &NodeProto, i: usize, index: &GraphIndex, g: &GraphProto) -> Result<Target, String> {
    let w = node
        .input
        .get(1)
        .and_then(|w| constant(index, g, w))
        .ok_or("the weight is not a constant")?;
    if w.data_type() != DataType::Float as i32 {
        return Err("the weight is not float32".into());
    }
    let attr_i = |n: &str, d: i64| node.attribute.iter().find(|a| a.name() == n).map_or(d, |a| a.i());
    let attr_f = |n: &str, d: f32| node.attribute.iter().find(|a| a.name() == n).map_or(d, |a| a.f());
    let channel_axis = match node.op_type() {
        "Conv" if w.dims.len() >= 3 => 0,
        "MatMul" if w.dims.len() == 2 => 1,
        "Gemm" if w.dims.len() == 2 => {
            if attr_i("transA", 0) != 0 || attr_f("alpha", 1.0) != 1.0 || attr_f("beta", 1.0) != 1.0 {
                return Err("Gemm with transA, alpha or beta is not handled".into());
            }
            if attr_i("transB", 0) != 0 { 0 } else { 1 }
        }
        _ => return Err("the weight has an unexpected rank".into()),
    };
    Ok(Target { node: i, channel_axis })
}

fn floats(t: &TensorProto) -> Vec<f32> {
    match &t.raw_data {
        Some(raw) => raw
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        None => t.float_data.clone(),
    }
}

/// The type of weights with a zero point. int8 where its kernels keep all 8 bits: the same steps as
/// uint8 (the codes and zero point are uint8's minus 128, so the dequantized weights are identical)
/// but ONNX Runtime's uint8 × int8 kernels, where uint8 × uint8 ones are up to twice as slow
/// (YOLOv8n 33.0 → 20.6 ms, PP-OCRv4 rec 30.8 → 23.3 ms). Under `reduce_range` int8 weights get 7
/// bits, so there uint8, whose kernels do not saturate, keeps the finer steps.
fn asymmetric_type(reduce_range: bool) -> DataType {
    if reduce_range { DataType::Uint8 } else { DataType::Int8 }
}

/// Asymmetric weights: per channel along `axis` (or per tensor) the range [min, max] (always
/// containing 0) maps onto 256 codes with a zero point, 0..=255 for uint8 and -128..=127 (as bytes)
/// for int8.
fn quantize_weight_asymmetric(
    values: &[f32],
    dims: &[i64],
    axis: usize,
    per_channel: bool,
    ty: DataType,
) -> (Vec<u8>, Vec<f32>, Vec<u8>) {
    let dims: Vec<usize> = dims.iter().map(|&d| d as usize).collect();
    let (channels, inner) = if per_channel {
        (dims[axis], dims[axis + 1..].iter().product())
    } else {
        (1, values.len())
    };
    let mut lo = vec![0f32; channels];
    let mut hi = vec![0f32; channels];
    for (run, c) in channel_runs(values, channels, inner) {
        for &v in run {
            lo[c] = lo[c].min(v);
            hi[c] = hi[c].max(v);
        }
    }
    let scales: Vec<f32> = (0..channels)
        .map(|c| if hi[c] > lo[c] { (hi[c] - lo[c]) / 255.0 } else { 1.0 })
        .collect();
    let zps: Vec<u8> = (0..channels)
        .map(|c| (-lo[c] / scales[c]).round().clamp(0.0, 255.0) as u8)
        .collect();
    // uint8 code u is int8 code u - 128: as a byte, u with its top bit flipped.
    let flip = if ty == DataType::Int8 { 0x80 } else { 0 };
    let mut q = Vec::with_capacity(values.len());
    for (run, c) in channel_runs(values, channels, inner) {
        let (scale, zp) = (scales[c], zps[c] as f32);
        q.extend(
            run.iter()
                .map(|&v| (((v / scale).round() + zp).clamp(0.0, 255.0) as u8) ^ flip),
        );
    }
    (q, scales, zps.into_iter().map(|z| z ^ flip).collect())
}

/// Sum of squared differences between `values` and their per-tensor quantized codes decoded
/// with `scale` and `zero_point` (codes are int8 bytes when `signed`).
fn rounding_error(values: &[f32], codes: &[u8], scale: f32, zero_point: u8, signed: bool) -> f64 {
    let zero = if signed {
        zero_point as i8 as f32
    } else {
        zero_point as f32
    };
    values
        .iter()
        .zip(codes)
        .map(|(&v, &c)| {
            let code = if signed { c as i8 as f32 } else { c as f32 };
            let d = f64::from((code - zero) * scale - v);
            d * d
        })
        .sum()
}

fn calibrate(
    ctx: &PassContext<'_>,
    graph_inputs: &HashSet<String>,
    augmented: &[u8],
    names: &[String],
    samples: usize,
    first: Option<&HashMap<String, Stats>>,
) -> Result<HashMap<String, Stats>, String> {
    let path = ctx.work_dir.join("calibration.onnx");
    std::fs::write(&path, augmented).map_err(|e| format!("writing the calibration model: {e}"))?;
    let mut session = ctx
        .runtime
        .unoptimized_session(&path, ctx.threads)
        .map_err(|e| format!("loading the calibration model: {e}"))?;
    let calibration = ctx.calibration.expect("checked by the caller");
    let mut stats: HashMap<String, Stats> = match first {
        None => names
            .iter()
            .map(|n| {
                (
                    n.clone(),
                    Stats {
                        min: f32::INFINITY,
                        max: f32::NEG_INFINITY,
                        hist: Vec::new(),
                    },
                )
            })
            .collect(),
        Some(s) => s
            .iter()
            .map(|(n, st)| {
                (
                    n.clone(),
                    Stats {
                        hist: vec![0; BINS],
                        ..st.clone()
                    },
                )
            })
            .collect(),
    };
    for k in 0..samples {
        let tensors = calibration.sample(k)?;
        let prepared = PreparedInputs::new(&tensors).map_err(|e| e.to_string())?;
        let mut observe = |name: &str, values: &[f32]| {
            if let Some(s) = stats.get_mut(name) {
                match first {
                    None => {
                        let (lo, hi) = finite_min_max(values);
                        s.min = s.min.min(lo);
                        s.max = s.max.max(hi);
                    }
                    Some(_) => add_to_histogram(&mut s.hist, s.min.abs().max(s.max.abs()), values),
                }
            }
        };
        for t in tensors.iter().filter(|t| graph_inputs.contains(&t.name)) {
            if let TensorData::F32(v) = &t.data {
                observe(&t.name, v);
            }
        }
        // Activations are read where ONNX Runtime left them: copying (or widening) every exposed
        // tensor of every sample used to cost more than running the model.
        prepared
            .run_visit(&mut session, |name, value| {
                match value.try_extract_tensor::<f32>() {
                    Ok((_, data)) => observe(name, data),
                    Err(_) => {
                        let (_, wide) = widen(value).map_err(|e| e.to_string())?;
                        if let Some(wide) = wide {
                            observe(name, &wide.iter().map(|&x| x as f32).collect::<Vec<f32>>());
                        }
                    }
                }
                Ok(())
            })
            .map_err(|e| e.to_string())?;
    }
    let _ = std::fs::remove_file(&path);
    for (n, s) in &stats {
        if !s.min.is_finite() || !s.max.is_finite() {
            return Err(format!("calibration saw no finite values of {n:?}"));
        }
    }
    Ok(stats)
}

/// The smallest and largest finite values (±∞ for none), in independent lanes the compiler turns
/// into vector min/max: calibration reduces every exposed activation of every sample.
fn finite_min_max(values: &[f32]) -> (f32, f32) {
    const LANES: usize = 16;
    let mut lo = [f32::INFINITY; LANES];
    let mut hi = [f32::NEG_INFINITY; LANES];
    let chunks = values.chunks_exact(LANES);
    let rest = chunks.remainder();
    for chunk in chunks {
        for j in 0..LANES {
            let v = chunk[j];
            // false for NaN and ±∞
            let finite = v.abs() < f32::INFINITY;
            lo[j] = if finite && v < lo[j] { v } else { lo[j] };
            hi[j] = if finite && v > hi[j] { v } else { hi[j] };
        }
    }
    let mut lo = lo.iter().fold(f32::INFINITY, |a, &b| a.min(b));
    let mut hi = hi.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
    for &v in rest.iter().filter(|v| v.is_finite()) {
        lo = lo.min(v);
        hi = hi.max(v);
    }
    (lo, hi)
}

/// Counts |x| of the finite `values` into `hist`'s equal bins over [0, `top`].
fn add_to_histogram(hist: &mut [u64], top: f32, values: &[f32]) {
    let bins = hist.len();
    let per_unit = bins as f32 / top.max(f32::MIN_POSITIVE);
    for v in values.iter().filter(|v| v.is_finite()) {
        let bin = (v.abs() * per_unit) as usize;
        hist[bin.min(bins - 1)] += 1;
    }
}

/// The range to quantize: min/max, or clipped at the |x| threshold the method picks.
fn range(s: &Stats, method: Method, percentile: f64) -> (f32, f32) {
    let top = s.min.abs().max(s.max.abs());
    let threshold = match method {
        Method::Minmax => return (s.min, s.max),
        Method::Percentile => percentile_threshold(&s.hist, percentile) * top,
        Method::Entropy => entropy_threshold(&s.hist) * top,
    };
    (s.min.max(-threshold), s.max.min(threshold))
}

/// Fraction of the histogram's range below which `percentile`% of the values lie.
fn percentile_threshold(hist: &[u64], percentile: f64) -> f32 {
    let total: u64 = hist.iter().sum();
    if total == 0 {
        return 1.0;
    }
    let want = (total as f64 * percentile / 100.0).ceil() as u64;
    let mut seen = 0;
    for (i, &c) in hist.iter().enumerate() {
        seen += c;
        if seen >= want {
            return (i + 1) as f32 / hist.len() as f32;
        }
    }
    1.0
}

/// The clipping threshold (as a fraction of the range) minimising the KL divergence between the
/// clipped distribution and its 128-level quantization (the TensorRT method).
fn entropy_threshold(hist: &[u64]) -> f32 {
    const LEVELS: usize = 128;
    let total: u64 = hist.iter().sum();
    if total == 0 {
        return 1.0;
    }
    let mut best = (f64::INFINITY, hist.len());
    for end in (LEVELS..=hist.len()).step_by(16) {
        let mut p: Vec<f64> = hist[..end].iter().map(|&c| c as f64).collect();
        p[end - 1] += hist[end..].iter().sum::<u64>() as f64;
        // Quantize p into LEVELS groups, spreading each group's mass over its non-empty bins.
        let mut q = vec![0f64; end];
        let per = end as f64 / LEVELS as f64;
        for l in 0..LEVELS {
            let (a, b) = ((l as f64 * per) as usize, (((l + 1) as f64 * per) as usize).min(end));
            let mass: f64 = hist[a..b].iter().map(|&c| c as f64).sum();
            let nonzero = hist[a..b].iter().filter(|&&c| c > 0).count();
            for i in a..b {
                if hist[i] > 0 {
                    q[i] = mass / nonzero as f64;
                }
            }
        }
        let (ps, qs): (f64, f64) = (p.iter().sum(), q.iter().sum());
        let kl: f64 = p
            .iter()
            .zip(&q)
            .filter(|(pi, _)| **pi > 0.0)
            .map(|(pi, qi)| {
                let (pi, qi) = (pi / ps, (qi / qs).max(1e-12));
                pi * (pi / qi).ln()
            })
            .sum();
        if kl < best.0 {
            best = (kl, end);
        }
    }
    best.1 as f32 / hist.len() as f32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_channel_weights_use_one_scale_per_output_channel() {
        // A Conv weight [2, 1, 1, 2]: channel 0 = [1, -2], channel 1 = [0.5, 0.25].
        let (q, s) = symmetric_int8(&[1.0, -2.0, 0.5, 0.25], &[2, 1, 1, 2], 0, true, 127.0);
        assert_eq!(s, vec![2.0 / 127.0, 0.5 / 127.0]);
        assert_eq!(q, vec![64, -127, 127, 64]);
        // A MatMul weight [2, 2] quantized along axis 1 (columns).
        let (_, s) = symmetric_int8(&[1.0, 0.5, -3.0, 0.25], &[2, 2], 1, true, 127.0);
        assert_eq!(s, vec![3.0 / 127.0, 0.5 / 127.0]);
    }

    #[test]
    fn min_max_skips_non_finite_values_in_every_lane_and_the_tail() {
        assert_eq!(finite_min_max(&[]), (f32::INFINITY, f32::NEG_INFINITY));
        for len in [1usize, 15, 16, 17, 33, 100] {
            let mut v: Vec<f32> = (0..len).map(|i| (i as f32 * 0.37).sin() * 3.0).collect();
            let want = v
                .iter()
                .fold((f32::INFINITY, f32::NEG_INFINITY), |(a, b), &x| (a.min(x), b.max(x)));
            // Non-finite values at the ends (lanes and tail) and in the middle change nothing.
            v.insert(0, f32::NAN);
            v.insert(len / 2, f32::INFINITY);
            v.push(f32::NEG_INFINITY);
            assert_eq!(finite_min_max(&v), want, "len {len}");
        }
        assert_eq!(finite_min_max(&[f32::NAN; 20]), (f32::INFINITY, f32::NEG_INFINITY));
    }

    #[test]
    fn histogram_counts_magnitudes_and_clamps_the_top() {
        let mut hist = vec![0u64; 4];
        add_to_histogram(&mut hist, 2.0, &[0.1, -0.6, 1.2, -2.0, 2.0, f32::NAN, f32::INFINITY]);
        assert_eq!(hist, vec![1, 1, 1, 2]);
    }

    #[test]
    fn rounding_error_decodes_signed_and_unsigned_codes() {
        // int8 code -2 at scale 0.5 decodes to -1.0; uint8 code 10 with zero point 8 to 1.0.
        assert_eq!(rounding_error(&[-1.0], &[(-2i8) as u8], 0.5, 0, true), 0.0);
        assert_eq!(rounding_error(&[1.25], &[10], 0.5, 8, false), 0.0625);
    }

    #[test]
    fn asymmetric_weights_decode_within_half_a_step_and_alike_in_both_types() {
        let values = [0.5f32, 2.0, -0.25, 1.0, 3.0, 0.0];
        let (q, s, z) = quantize_weight_asymmetric(&values, &[2, 3], 1, true, DataType::Uint8);
        let (qi, si, zi) = quantize_weight_asymmetric(&values, &[2, 3], 1, true, DataType::Int8);
        assert_eq!((s.len(), z.len()), (3, 3));
        assert_eq!(si, s);
        for (i, &v) in values.iter().enumerate() {
            let c = i % 3;
            let back = (q[i] as f32 - z[c] as f32) * s[c];
            assert!((back - v).abs() <= s[c] / 2.0 + 1e-6, "{i}: {back} vs {v}");
            // int8: the same step, codes and zero point 128 lower, so the same value back.
            assert_eq!(qi[i] as i8 as i32, q[i] as i32 - 128, "{i}");
            assert_eq!((qi[i] as i8 as f32 - zi[c] as i8 as f32) * si[c], back, "{i}");
        }
    }

    #[test]
    fn percentile_and_entropy_clip_long_tails() {
        // 999 values in the first bin, one outlier at the top.
        let mut hist = vec![0u64; BINS];
        hist[0] = 999;
        hist[BINS - 1] = 1;
        assert!(percentile_threshold(&hist, 99.0) < 0.01);
        assert_eq!(percentile_threshold(&hist, 100.0), 1.0);
        // Entropy keeps a lone outlier bin (clipping it costs more KL than it saves) but clips a
        // long, thin exponential tail.
        assert_eq!(entropy_threshold(&hist), 1.0);
        let tail: Vec<u64> = (0..BINS).map(|i| (1e6 * (-(i as f64) / 40.0).exp()) as u64).collect();
        let t = entropy_threshold(&tail);
        assert!(t > 0.0 && t < 0.5, "{t}");
        let s = Stats {
            min: -10.0,
            max: 100.0,
            hist,
        };
        let (lo, hi) = range(&s, Method::Percentile, 99.0);
        assert!(lo > -10.0 || hi < 100.0, "{lo} {hi}");
        assert_eq!(range(&s, Method::Minmax, 99.0), (-10.0, 100.0));
    }
}

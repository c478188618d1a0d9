//! Compression passes: each pass is a named value behind one trait, and a recipe is a list of them,
//! parsed from the JSON a user sends. Passes read one ONNX file and write another.

pub mod cluster_weights;
pub mod fp16;
pub mod low_rank;
pub mod optimize;
pub mod prune_structured;
pub mod prune_unstructured;
pub mod quantize_dynamic;
pub mod quantize_int4;
pub mod quantize_static;
pub mod reconstruct;
pub mod weight_targets;
pub mod weights;

use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::eval::LazyRuntime;

/// One step of a recipe, as the user writes it: `{"pass": "optimize", "level": "extended"}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "pass", rename_all = "snake_case")]
pub enum PassSpec {
    Optimize(optimize::OptimizeParams),
    QuantizeInt8Dynamic(quantize_dynamic::DynamicParams),
    QuantizeInt4WeightOnly(quantize_int4::Int4Params),
    Fp16(fp16::Fp16Params),
    QuantizeInt8Static(quantize_static::StaticParams),
    // Passes that remove parameters (issue 7).
    PruneUnstructured(prune_unstructured::PruneParams),
    LowRank(low_rank::LowRankParams),
    ClusterWeights(cluster_weights::ClusterParams),
    PruneStructured(prune_structured::PruneStructuredParams),
    Reconstruct(reconstruct::ReconstructParams),
}

/// A validated list of passes, applied in order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Recipe(pub Vec<PassSpec>);

#[derive(Debug, thiserror::Error, PartialEq)]
#[error("{0}")]
pub struct RecipeError(pub String);

/// Passes that are not registered yet answer with this list in their error message.
pub const KNOWN_PASSES: &[&str] = &[
    "optimize",
    "quantize_int8_dynamic",
    "quantize_int8_static",
    "quantize_int4_weight_only",
    "fp16",
    "prune_unstructured",
    "low_rank",
    "cluster_weights",
    "prune_structured",
    "reconstruct",
];

impl Recipe {
    /// Whether a pass of the recipe calibrates on data (and so needs a calibration split and
    /// ONNX Runtime).
    pub fn calibrates(&self) -> bool {
        self.0.iter().any(|p| p.build().calibrates())
    }

    /// ORT's extended/all optimizations fuse MatMul/Gemm into `com.microsoft` kernels
    /// (FusedGemm, FusedMatMul) that the quantization passes do not rewrite; quantizing first
    /// and optimizing after keeps every MatMul visible.
    pub fn ordering_warning(&self) -> Option<String> {
        let fusing = self
            .0
            .iter()
            .position(|p| matches!(p, PassSpec::Optimize(o) if o.level != optimize::Level::Basic))?;
        let quantizing = self.0[fusing..].iter().any(|p| {
            matches!(
                p,
                PassSpec::QuantizeInt8Dynamic(_)
                    | PassSpec::QuantizeInt4WeightOnly(_)
                    | PassSpec::QuantizeInt8Static(_)
            )
        });
        quantizing.then(|| {
            "optimize at level extended/all runs before a quantization pass: its fused kernels (FusedGemm, \
             FusedMatMul) hide MatMuls from quantization; put quantization first, or optimize at level basic"
                .to_string()
        })
    }

    /// Parses and validates a recipe; the error names the step and the problem
    /// (`recipe[1]: unknown pass "foo"`).
    pub fn parse(value: &Value) -> Result<Recipe, RecipeError> {
        let steps = value
            .as_array()
            .ok_or_else(|| RecipeError("recipe must be an array of passes".into()))?;
        if steps.is_empty() {
            return Err(RecipeError("recipe is empty; give at least one pass".into()));
        }
        let specs = steps
            .iter()
            .enumerate()
            .map(|(i, step)| parse_step(step).map_err(|e| RecipeError(format!("recipe[{i}]: {e}"))))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Recipe(specs))
    }
}

fn parse_step(step: &Value) -> Result<PassSpec, String> {
    let obj = step
        .as_object()
        .ok_or_else(|| "each pass must be an object like {\"pass\": \"optimize\"}".to_string())?;
    let name = match obj.get("pass") {
        Some(Value::String(name)) => name,
        Some(_) => return Err("\"pass\" must be a string".into()),
        None => return Err("missing \"pass\" (the name of the pass)".into()),
    };
    if !KNOWN_PASSES.contains(&name.as_str()) {
        return Err(format!(
            "unknown pass {name:?} (known passes: {})",
            KNOWN_PASSES.join(", ")
        ));
    }
    let spec: PassSpec = serde_json::from_value(step.clone()).map_err(|e| format!("pass {name:?}: {e}"))?;
    spec.validate().map_err(|e| format!("pass {name:?}: {e}"))?;
    Ok(spec)
}

impl PassSpec {
    /// Checks parameters serde cannot (ranges, combinations).
    fn validate(&self) -> Result<(), String> {
        match self {
            PassSpec::Optimize(_) => Ok(()),
            PassSpec::QuantizeInt8Dynamic(p) => p.validate(),
            PassSpec::QuantizeInt4WeightOnly(p) => p.validate(),
            PassSpec::Fp16(_) => Ok(()),
            PassSpec::QuantizeInt8Static(p) => p.validate(),
            PassSpec::PruneUnstructured(p) => p.validate(),
            PassSpec::LowRank(p) => p.validate(),
            PassSpec::ClusterWeights(p) => p.validate(),
            PassSpec::PruneStructured(p) => p.validate(),
            PassSpec::Reconstruct(p) => p.validate(),
        }
    }

    pub fn build(&self) -> Box<dyn Pass> {
        match self {
            PassSpec::Optimize(p) => Box::new(optimize::Optimize(p.clone())),
            PassSpec::QuantizeInt8Dynamic(p) => Box::new(quantize_dynamic::QuantizeDynamic(p.clone())),
            PassSpec::QuantizeInt4WeightOnly(p) => Box::new(quantize_int4::QuantizeInt4(p.clone())),
            PassSpec::Fp16(p) => Box::new(fp16::Fp16(p.clone())),
            PassSpec::QuantizeInt8Static(p) => Box::new(quantize_static::QuantizeStatic(p.clone())),
            PassSpec::PruneUnstructured(p) => Box::new(prune_unstructured::PruneUnstructured(p.clone())),
            PassSpec::LowRank(p) => Box::new(low_rank::LowRank(p.clone())),
            PassSpec::ClusterWeights(p) => Box::new(cluster_weights::ClusterWeights(p.clone())),
            PassSpec::PruneStructured(p) => Box::new(prune_structured::PruneStructured(p.clone())),
            PassSpec::Reconstruct(p) => Box::new(reconstruct::Reconstruct(p.clone())),
        }
    }
}

/// What a pass may use: ONNX Runtime (for passes that drive ORT's own tooling, loaded when one
/// first does) and scratch space.
pub struct PassContext<'a> {
    pub runtime: &'a LazyRuntime,
    /// The job's original model (self-contained): the teacher passes such as `reconstruct` fit to.
    pub original: &'a Path,
    pub work_dir: &'a Path,
    /// Samples for passes that calibrate; `None` when the recipe has none.
    pub calibration: Option<&'a crate::eval::calibration::CalibrationSet>,
    /// Intra-op threads for sessions a pass runs (calibration).
    pub threads: usize,
}

/// What a pass reports back for the report's `passes` section.
#[derive(Debug, Default, Clone)]
pub struct PassOutput {
    pub notes: Vec<String>,
    pub warnings: Vec<String>,
    /// One row per weight the pass changed, for the report's per-layer table.
    pub layers: Vec<LayerRecord>,
}

/// What a pass did to one weight tensor. Every pass fills the common columns; the optional ones
/// belong to the pass that knows them (sparsity for pruning, rank for low-rank, clusters for
/// clustering), so one table shape serves them all.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct LayerRecord {
    /// The nodes that read the weight (more than one when it is shared, and then changed once).
    pub nodes: Vec<String>,
    pub weight: String,
    pub shape: Vec<i64>,
    /// Values stored before and after (after: both factors for low-rank; indices for clustering).
    pub parameters_before: u64,
    pub parameters_after: u64,
    pub bytes_before: u64,
    pub bytes_after: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sparsity_before: Option<f64>,
    /// Share of the weight's values that are exactly zero after the pass.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sparsity: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rank: Option<u64>,
    /// Share of the squared singular values the kept rank retains.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retained_energy: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clusters: Option<u64>,
    /// Largest |original - stored| over the weight's values (clustering, low-rank).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_abs_error: Option<f64>,
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct PassError(pub String);

pub trait Pass {
    fn name(&self) -> &'static str;
    /// Whether the pass needs calibration data (the job then sets aside a calibration split that
    /// is never evaluated on).
    fn calibrates(&self) -> bool {
        false
    }
    /// Whether the pass leaves weights that a general-purpose compressor shrinks far more than
    /// the dense file shows (zeros, a few distinct values): the job then also ships
    /// `model.onnx.zst`.
    fn ships_zstd_copy(&self) -> bool {
        false
    }
    fn run(&self, input: &Path, output: &Path, ctx: &PassContext<'_>) -> Result<PassOutput, PassError>;
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_valid_recipe_parses_with_defaults_filled_in() {
        let r = Recipe::parse(&json!([{"pass": "optimize"}])).unwrap();
        assert_eq!(
            r.0,
            vec![PassSpec::Optimize(optimize::OptimizeParams {
                level: optimize::Level::Extended
            })]
        );
        assert_eq!(
            serde_json::to_value(&r).unwrap(),
            json!([{"pass": "optimize", "level": "extended"}])
        );
    }

    #[test]
    fn bad_recipes_name_the_step_and_the_problem() {
        let cases = [
            (json!({}), "array"),
            (json!([]), "empty"),
            (json!([1]), "recipe[0]: each pass must be an object"),
            (json!([{"level": "all"}]), "recipe[0]: missing \"pass\""),
            (
                json!([{"pass": "optimize"}, {"pass": "shrink"}]),
                "recipe[1]: unknown pass \"shrink\"",
            ),
            (json!([{"pass": "optimize", "level": "max"}]), "unknown variant `max`"),
            (json!([{"pass": "optimize", "levle": "all"}]), "unknown field `levle`"),
        ];
        for (recipe, expected) in cases {
            let err = Recipe::parse(&recipe).unwrap_err().0;
            assert!(
                err.contains(expected),
                "{recipe}: {err:?} does not contain {expected:?}"
            );
        }
    }
}

//! `optimize`: ONNX Runtime's own graph optimizations (constant folding, redundant-node removal,
//! operator fusion), written out as an ONNX file with ORT's optimized-model output.

use std::path::Path;

use ort::session::builder::GraphOptimizationLevel;
use serde::{Deserialize, Serialize};

use super::{Pass, PassContext, PassError, PassOutput};
use crate::onnx::{self, ModelSummary};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Level {
    /// Semantics-preserving rewrites that run on any provider: constant folding, dead-node removal.
    Basic,
    /// Adds fusions (e.g. MatMul+Add→Gemm, GELU, LayerNorm), some into `com.microsoft` operators.
    #[default]
    Extended,
    /// Adds layout transformations tuned for the CPU the optimizer ran on.
    All,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct OptimizeParams {
    #[serde(default)]
    pub level: Level,
}

pub struct Optimize(pub OptimizeParams);

impl Pass for Optimize {
    fn name(&self) -> &'static str {
        "optimize"
    }

    fn run(&self, input: &Path, output: &Path, ctx: &PassContext<'_>) -> Result<PassOutput, PassError> {
        let level = match self.0.level {
            Level::Basic => GraphOptimizationLevel::Level1,
            Level::Extended => GraphOptimizationLevel::Level2,
            Level::All => GraphOptimizationLevel::All,
        };
        ctx.runtime
            .optimize(input, output, level)
            .map_err(|e| PassError(e.to_string()))?;
        let count = |p: &Path| onnx::load(p).map(|m| ModelSummary::of(&m).nodes);
        let before = count(input).map_err(|e| PassError(format!("reading the input model: {e}")))?;
        let after = count(output).map_err(|e| PassError(format!("ONNX Runtime wrote an unreadable model: {e}")))?;
        let mut out = PassOutput {
            notes: vec![format!("level {:?}: {before} nodes -> {after} nodes", self.0.level).to_lowercase()],
            ..Default::default()
        };
        if self.0.level == Level::All {
            out.warnings.push(
                "optimize level \"all\" applies layout transformations specific to this CPU and ONNX Runtime build; \
                 the model may not load elsewhere"
                    .into(),
            );
        }
        Ok(out)
    }
}

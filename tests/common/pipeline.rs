//! The pipeline a job runs (passes, then evaluation in real ONNX Runtime), called in-process on a
//! model the test generated: what the pass tests drive, without the HTTP API and the job queue.

use std::path::Path;

use modelpress::compress::Recipe;
use modelpress::config::Config;
use modelpress::eval::dataset::{EvaluationOptions, Task};
use modelpress::eval::{LazyRuntime, Runtime};
use modelpress::onnx::proto::ModelProto;
use modelpress::pipeline::{self, PipelineError, PipelineInput};
use modelpress::report::Report;
use serde_json::Value;

/// The pipeline on the model file `model`, results under `out/out`; with a dataset, a
/// classification job. `hold_out` sets the calibration split aside even when no pass calibrates, as
/// calibrating recipes do. Few timed runs: these tests check behaviour, not speed.
pub fn run_on(
    model: &Path,
    recipe: Value,
    out: &Path,
    dataset: Option<&Path>,
    hold_out: bool,
) -> Result<Report, PipelineError> {
    let runtime = LazyRuntime::from(Runtime::init("").expect("ONNX Runtime (run `make setup`)"));
    let mut config = Config::defaults();
    config.eval.timed_runs = 3;
    config.eval.warmup_runs = 1;
    let recipe = Recipe::parse(&recipe).unwrap();
    let mut options = EvaluationOptions::defaults(&config.eval);
    if dataset.is_some() {
        options.task = Task::Classification;
    }
    options.hold_out_calibration = hold_out;
    pipeline::run(
        PipelineInput {
            runtime: &runtime,
            model,
            recipe: &recipe,
            out_dir: &out.join("out"),
            eval: &config.eval,
            job_id: None,
            options: &options,
            dataset,
        },
        &mut |_, _| {},
    )
}

/// The pipeline on `model`, written to `out/input.onnx` first; no dataset.
pub fn run(model: &ModelProto, recipe: Value, out: &Path) -> Result<Report, PipelineError> {
    std::fs::create_dir_all(out).unwrap();
    let input = out.join("input.onnx");
    std::fs::write(&input, modelpress::onnx::encode(model)).unwrap();
    run_on(&input, recipe, out, None, false)
}

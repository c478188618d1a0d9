//! Small models the tests build with the `onnx` Python package for behaviours no real model shows
//! on demand.

use serde_json::json;

use super::{TestApp, python};

/// A model that runs as long as it is asked to: input `n` (int64 scalar) is the trip count of a
/// Loop of 64x64 MatMul + Tanh steps; output `y` [64, 64]. A few steps answer at once; 10^9 steps
/// keep an inference worker busy far past any time limit.
pub fn slow_model(dir: &std::path::Path) -> Vec<u8> {
    let path = dir.join("loop.onnx");
    let script = r#"
import sys, numpy as np, onnx
from onnx import helper, numpy_helper, TensorProto as T
rng = np.random.RandomState(0)
w = numpy_helper.from_array((rng.randn(64, 64) / 8).astype(np.float32), "W")
x0 = numpy_helper.from_array(rng.randn(64, 64).astype(np.float32), "x0")
yes = numpy_helper.from_array(np.array(True), "yes")
body = helper.make_graph(
    [helper.make_node("Identity", ["c"], ["c_out"]),
     helper.make_node("MatMul", ["x", "W"], ["m"]),
     helper.make_node("Tanh", ["m"], ["x_out"])],
    "body",
    [helper.make_tensor_value_info("i", T.INT64, []),
     helper.make_tensor_value_info("c", T.BOOL, []),
     helper.make_tensor_value_info("x", T.FLOAT, [64, 64])],
    [helper.make_tensor_value_info("c_out", T.BOOL, []),
     helper.make_tensor_value_info("x_out", T.FLOAT, [64, 64])])
graph = helper.make_graph(
    [helper.make_node("Loop", ["n", "yes", "x0"], ["y"], body=body)],
    "slow", [helper.make_tensor_value_info("n", T.INT64, [])],
    [helper.make_tensor_value_info("y", T.FLOAT, [64, 64])], [w, x0, yes])
model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
model.ir_version = 8
onnx.checker.check_model(model)
onnx.save(model, sys.argv[1])
"#;
    let status = std::process::Command::new(python())
        .arg("-c")
        .arg(script)
        .arg(&path)
        .status()
        .unwrap();
    assert!(status.success());
    std::fs::read(path).unwrap()
}

/// A succeeded job (recipe `optimize`) on [`slow_model`], for inference tests; its id.
pub async fn slow_model_job(app: &TestApp) -> String {
    let dir = tempfile::tempdir().unwrap();
    let model_id = app.upload_ok(slow_model(dir.path())).await;
    let job = app.submit_ok(&model_id, json!([{"pass": "optimize"}])).await;
    let job = app.wait_for_job(job["id"].as_str().unwrap()).await;
    assert_eq!(job["state"], "succeeded", "{job}");
    job["id"].as_str().unwrap().to_string()
}

//! Any bytes through everything an upload does to a model before storing it: decode and validate
//! (`onnx::decode`), the operator-domain check, external-data syntax, and the model summary.
//! Errors are fine; panics, aborts, hangs and unbounded allocation are findings.
#![no_main]

use libfuzzer_sys::fuzz_target;
use modelpress::onnx;

fuzz_target!(|data: &[u8]| {
    if let Ok(model) = onnx::decode(data) {
        let _ = onnx::domains::check(&model);
        let _ = onnx::external::check_syntax(&model);
        let _ = onnx::ModelSummary::of(&model);
        // What the service writes back must decode again.
        let again = onnx::encode(&model);
        assert!(onnx::decode(&again).is_ok(), "a decoded model did not survive encode/decode");
    }
});

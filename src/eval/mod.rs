//! Measuring models with ONNX Runtime: the runtime environment, synthetic inputs built from a model's
//! signature, latency percentiles and output fidelity. Graph editing lives elsewhere.

pub mod calibration;
pub mod dataset;
pub mod fidelity;
pub mod inputs;
pub mod latency;
pub mod metrics;
pub mod npz;
pub mod runtime;
pub mod session;

pub use runtime::{LazyRuntime, Provider, Runtime, RuntimeError};

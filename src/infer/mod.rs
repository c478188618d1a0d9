//! Real-time inference on a finished job's models (`POST /v1/jobs/{id}/infer`): ONNX Runtime
//! sessions live in worker processes (`worker`, the `modelpress infer-worker` subcommand), never in
//! the API process; `pool` spawns, feeds, times and replaces them; `protocol` is what travels
//! between them; `tensors` turns request bodies into checked tensors and outputs back into JSON or
//! `.npz`; `compare` measures the compressed model against the original on the same inputs.

pub mod compare;
pub mod pool;
pub mod protocol;
pub mod tensors;
pub mod worker;

pub use pool::{InferError, InferencePool, ModelRef, PoolSettings};

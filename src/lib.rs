//! ModelPress: ONNX model compression as a service.
//!
//! Data flows one way: HTTP (`api`) → job row (`queue`) → worker (`worker`) → a child process running
//! the `pipeline` (`compress` passes, then `eval`) → `storage` → HTTP. `onnx`, `compress`, `eval`,
//! `report` and `pipeline` never touch the database or HTTP, so the offline CLI uses them alone.

pub mod advisor;
pub mod api;
pub mod compress;
pub mod config;
pub mod db;
pub mod eval;
pub mod infer;
pub mod onnx;
pub mod pipeline;
pub mod queue;
pub mod report;
pub mod retention;
pub mod service;
pub mod storage;
pub mod telemetry;
pub mod webhooks;
pub mod worker;

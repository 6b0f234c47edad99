//! Tiny ONNX graphs evaluated in process, for models where an ONNX Runtime session's fixed cost
//! (~50–130 KiB) dwarfs the model itself (a 16→32→4 MLP is 2.7 KB of weights).
//!
//! [`TinyRuntime::load`] decodes the `ModelProto` once, checks every operator, domain, opset and
//! element type against what `ops` implements, and keeps the weights as plain vectors; anything it
//! does not support is refused at load with [`TinyError::Unsupported`] (or [`TinyError::TooLarge`]),
//! so the caller loads the model with ONNX Runtime instead. Inference runs on the caller's thread,
//! single-threaded (a pod's parallelism is across requests), and a panic inside it becomes that
//! request's error. What a model holds is counted allocation by allocation ([`heap`]), so
//! [`LoadedModel::size_bytes`](densemesh_runtime_core::LoadedModel::size_bytes) is real memory.
#![forbid(unsafe_code)]

mod error;
#[cfg(any(test, feature = "fuzzing"))]
pub mod fuzzing;
mod graph;
mod heap;
mod model;
mod onnx;
mod ops;
mod value;

pub use error::TinyError;
pub use model::{TinyModel, TinyRuntime};

/// When a model is served by this evaluator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TinyConfig {
    /// Model files larger than this go to ONNX Runtime. Past ~1 MiB a model's own weights dwarf a
    /// session's fixed cost, so a session's optimised kernels are worth their memory; below it the
    /// evaluator holds a model in about its weights' size.
    pub max_file_bytes: u64,
}

impl Default for TinyConfig {
    fn default() -> Self {
        Self { max_file_bytes: 1 << 20 }
    }
}

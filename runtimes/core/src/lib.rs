//! The seam between the mesh and whatever executes a model.
//!
//! A [`Runtime`] turns a local model file into a [`LoadedModel`]; a loaded model answers [`infer`] calls
//! with tensors. Both are synchronous on purpose: loading and inference are CPU-heavy, so the mesh runs
//! them on blocking threads and keeps the async executor free (see the mesh's `worker` module).
//!
//! [`infer`]: LoadedModel::infer
#![forbid(unsafe_code)]

mod error;
mod tensor;

use std::path::PathBuf;
use std::sync::Arc;

pub use error::{Cause, Context, Error, Result};
pub use tensor::{DataType, Tensor, TensorData, TensorSpec};

/// Everything a runtime needs to load one model.
#[derive(Debug, Clone)]
pub struct LoadRequest {
    /// The model id, for errors and logs.
    pub model_id: String,
    /// The registered model format (`onnx`, `huggingface`, `sklearn`, ...); a runtime that serves
    /// several (a remote server) configures the load by it. Empty when the caller did not say.
    pub model_type: String,
    /// The model's main file (e.g. `model.onnx`), already on local disk.
    pub path: PathBuf,
    /// The file's bytes already in memory (a mapped disk-cache entry), for runtimes that can take
    /// bytes; `None` to read `path`.
    pub contents: Option<ModelBytes>,
}

impl LoadRequest {
    /// A request to load `path` from disk.
    pub fn from_path(model_id: impl Into<String>, path: impl Into<PathBuf>) -> Self {
        Self { model_id: model_id.into(), model_type: String::new(), path: path.into(), contents: None }
    }

    /// The same request for a model registered as `model_type`.
    pub fn with_model_type(mut self, model_type: impl Into<String>) -> Self {
        self.model_type = model_type.into();
        self
    }
}

/// A model file's bytes, shared (a memory map, or a buffer).
#[derive(Clone)]
pub struct ModelBytes(pub Arc<dyn AsRef<[u8]> + Send + Sync>);

impl ModelBytes {
    /// The bytes.
    pub fn as_slice(&self) -> &[u8] {
        (*self.0).as_ref()
    }
}

impl std::fmt::Debug for ModelBytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ModelBytes({} bytes)", self.as_slice().len())
    }
}

/// A model's interface as the runtime sees it, reported through V2 ModelMetadata and used to validate
/// requests before they reach the runtime.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelMetadata {
    /// V2 platform string, e.g. `onnxruntime_onnx`.
    pub platform: String,
    /// The tensors a request must carry.
    pub inputs: Vec<TensorSpec>,
    /// The tensors the model produces.
    pub outputs: Vec<TensorSpec>,
}

/// One inference: validated inputs (in any order) and the outputs wanted (empty means all).
#[derive(Debug, Clone, Default)]
pub struct InferRequest {
    /// The input tensors.
    pub inputs: Vec<Tensor>,
    /// Names of the outputs to return; empty for all.
    pub outputs: Vec<String>,
}

/// A model runtime (ONNX Runtime, candle, a remote server). Implementations are shared by all models
/// of their kind, so process-wide resources (thread pools, device contexts) live here.
pub trait Runtime: Send + Sync + 'static {
    /// Short name for logs and metrics, e.g. `onnxruntime`.
    fn name(&self) -> &'static str;

    /// Loads a model; blocking, may take seconds.
    fn load(&self, request: &LoadRequest) -> Result<Box<dyn LoadedModel>>;

    /// Called (on a blocking thread) after models were dropped, to hand freed memory back to the
    /// system where the runtime's allocator would keep it. Nothing to do for most runtimes.
    fn reclaim_memory(&self) {}
}

/// A model held in memory, ready to serve. Dropping it frees its memory.
pub trait LoadedModel: Send + Sync + 'static {
    /// The model's interface.
    fn metadata(&self) -> &ModelMetadata;

    /// Memory this model holds, as measured after loading; this is what capacity is charged.
    fn size_bytes(&self) -> u64;

    /// Runs one inference; blocking. Inputs have been validated against [`metadata`](Self::metadata).
    fn infer(&self, request: InferRequest) -> Result<Vec<Tensor>>;
}

//! The seam between the mesh and whatever executes a model.
//!
//! A [`Runtime`] turns a local model file into a [`LoadedModel`]; a loaded model answers [`infer`] calls
//! with tensors. Both are synchronous on purpose: loading and inference are CPU-heavy, so the mesh runs
//! them on blocking threads and keeps the async executor free (see the mesh's `worker` module). A model
//! served by another process offers its inference as a future as well ([`LoadedModel::infer_async`]):
//! waiting on a network answer needs no thread of its own.
//!
//! [`infer`]: LoadedModel::infer
#![forbid(unsafe_code)]

mod error;
mod format;
mod slots;
mod tensor;
#[cfg(feature = "v2")]
pub mod v2;

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;

pub use error::{Cause, Context, Error, Result};
pub use format::ModelFormat;
pub use slots::{CallSlots, NoSlot};
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
    /// The runtime the registration asked for by name (see [`Runtime::choices`]); `None`: the pod's
    /// choice for the format.
    pub runtime: Option<String>,
}

impl LoadRequest {
    /// A request to load `path` from disk.
    pub fn from_path(model_id: impl Into<String>, path: impl Into<PathBuf>) -> Self {
        Self {
            model_id: model_id.into(),
            model_type: String::new(),
            path: path.into(),
            contents: None,
            runtime: None,
        }
    }

    /// The same request, to be loaded by the runtime named `runtime` only.
    pub fn with_runtime(mut self, runtime: impl Into<String>) -> Self {
        self.runtime = Some(runtime.into());
        self
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

    /// Loads a model; blocking, may take seconds. A request naming a runtime (`request.runtime`) is
    /// loaded by that one of [`choices`](Self::choices) or refused, never by another.
    fn load(&self, request: &LoadRequest) -> Result<Box<dyn LoadedModel>>;

    /// Loads a model at once if that is a few microseconds of CPU work on a small file (decoding it in
    /// this process: no threads started, no I/O beyond reading the file, nothing waited on), so the mesh
    /// may run it on its async thread instead of the blocking pool, whose round trip costs a tiny
    /// model's first request more than the load. `None`, the default, when it cannot: the mesh then calls
    /// [`load`](Self::load) on a blocking thread, under `--load-timeout`.
    fn try_load_quick(&self, _request: &LoadRequest) -> Option<Result<Box<dyn LoadedModel>>> {
        None
    }

    /// The runtimes a registration may name to force one (a runtime that picks among several per
    /// model, as ONNX's tiny evaluator and ONNX Runtime, lists each); by default this one alone.
    fn choices(&self) -> Vec<&'static str> {
        vec![self.name()]
    }

    /// Called (on a blocking thread) after models were dropped, to hand freed memory back to the
    /// system where the runtime's allocator would keep it. Nothing to do for most runtimes.
    fn reclaim_memory(&self) {}
}

/// What a caught panic said: its message, for the error that replaces it (a runtime's panic fails that
/// load or that call, never its thread).
pub fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".to_owned())
}

/// An inference in progress elsewhere (see [`LoadedModel::infer_async`]).
pub type InferFuture = Pin<Box<dyn Future<Output = Result<Vec<Tensor>>> + Send + 'static>>;

/// A model held in memory, ready to serve. Dropping it frees its memory.
pub trait LoadedModel: Send + Sync + 'static {
    /// The model's interface.
    fn metadata(&self) -> &ModelMetadata;

    /// Memory this model holds, as measured after loading; this is what capacity is charged.
    fn size_bytes(&self) -> u64;

    /// The runtime that loaded it (its [`Runtime::name`], or the one it chose among its
    /// [`choices`](Runtime::choices)): shown per model, since it decides the model's memory and speed.
    fn runtime(&self) -> &str;

    /// Runs one inference; blocking. Inputs have been validated against [`metadata`](Self::metadata).
    fn infer(&self, request: InferRequest) -> Result<Vec<Tensor>>;

    /// For a model whose inference runs in another process: the call as a future, which the mesh
    /// awaits on the request's own task. Through [`infer`](Self::infer) the answer crosses a blocking
    /// thread and the runtime's executor, and on a quiet pod each of those wakes a sleeping thread:
    /// most of the latency the mesh added in front of a remote server. `Err(request)`, the default,
    /// hands the request back for [`infer`](Self::infer) on a blocking thread.
    fn infer_async(&self, request: InferRequest) -> std::result::Result<InferFuture, InferRequest> {
        Err(request)
    }

    /// Where the model's runtime serves gRPC itself, for calls the mesh passes through as they came
    /// (ModelMesh's protocol-agnostic inference: any method, routed by the `mm-model-id` header).
    /// `None`, the default, for a model run in this process.
    fn passthrough(&self) -> Option<&Passthrough> {
        None
    }

    /// The slots of the server that runs this model in another process, which calls passed through to
    /// it take too: its concurrency and bounded wait queue. `None`, the default, for a model run in this
    /// process (the mesh's worker bounds those) or a runtime with no limit of its own.
    fn call_slots(&self) -> Option<&CallSlots> {
        None
    }

    /// For a model its runtime can also run from a GPU's memory: its device copy, which the mesh's
    /// GPU tier promotes and demotes (see [`DeviceCopy`]). `None`, the default, for a model that runs
    /// on the host only.
    fn device_copy(&self) -> Option<&dyn DeviceCopy> {
        None
    }
}

/// The GPU copy of a loaded model. The host copy stays loaded whatever happens here, so demoting is
/// dropping device memory and promoting again is a host-to-device copy, not a reload from disk. Calls
/// run on the device copy while there is one, else on the host copy.
pub trait DeviceCopy: Send + Sync {
    /// Device memory a copy takes (what the device's capacity is charged).
    fn device_bytes(&self) -> u64;

    /// The CUDA ordinal of the device holding the copy, if one does.
    fn device(&self) -> Option<usize>;

    /// Copies the weights to device `ordinal`; blocking (a host-to-device copy), so the mesh runs it on
    /// a blocking thread. Replaces a copy on another device.
    fn promote(&self, ordinal: usize) -> Result<()>;

    /// Drops the device copy, once the calls running on it are done; later calls run on the host.
    fn demote(&self);
}

/// A runtime in another process that takes inference calls of its own methods (see
/// [`LoadedModel::passthrough`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Passthrough {
    /// The runtime's gRPC endpoint: `http://host:port`, or `unix:///path/to.sock`.
    pub endpoint: String,
    /// The methods it serves (`/package.Service/Method`), each with the path of protobuf field numbers
    /// to a string field of the request that is overwritten with the model id (empty: none). An empty
    /// list with `allow_any_method` unset allows any method, as in ModelMesh.
    pub methods: Vec<(String, Vec<u32>)>,
    /// Any method may pass, whatever `methods` lists.
    pub allow_any_method: bool,
}

impl Passthrough {
    /// Whether a call of `path` (`/package.Service/Method`) may pass, and the id-injection path for it.
    pub fn method(&self, path: &str) -> Option<&[u32]> {
        match self.methods.iter().find(|(m, _)| m == path) {
            Some((_, injection)) => Some(injection),
            None if self.allow_any_method || self.methods.is_empty() => Some(&[]),
            None => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_passthrough_allows_its_listed_methods_or_any_when_it_lists_none() {
        let listed = Passthrough {
            endpoint: "http://127.0.0.1:1".into(),
            methods: vec![("/p.S/Predict".into(), vec![1, 2])],
            allow_any_method: false,
        };
        assert_eq!(listed.method("/p.S/Predict"), Some(&[1, 2][..]));
        assert_eq!(listed.method("/p.S/Other"), None);
        let any = Passthrough { allow_any_method: true, ..listed.clone() };
        assert_eq!(any.method("/p.S/Other"), Some(&[][..]));
        let unlisted = Passthrough { methods: vec![], ..listed };
        assert_eq!(unlisted.method("/x.Y/Z"), Some(&[][..]));
    }
}

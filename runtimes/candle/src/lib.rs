//! BERT-family sentence-embedding models (sentence-transformers layout, safetensors weights) run on
//! candle's CPU backend, as a densemesh [`Runtime`]; with the `cuda` feature, on a GPU as well when the
//! mesh's GPU tier promotes a model (its `device` module).
//!
//! A model takes one input, [`INPUT_NAME`] (`text`): a BYTES tensor of UTF-8 strings of shape `[n]`
//! or `[n, 1]`. It returns one output, [`OUTPUT_NAME`] (`embedding`): FP32 `[n, dim]`, pooled as the
//! model's `1_Pooling/config.json` says (mean when it says nothing) and scaled to unit length when
//! `modules.json` lists a `Normalize` module. Text longer than the model's maximum
//! (`sentence_bert_config.json`'s `max_seq_length`, else `config.json`'s `max_position_embeddings`)
//! is truncated, as sentence-transformers does, rather than refused. ModelMetadata reports the
//! platform [`PLATFORM`] (`huggingface_candle`: Hugging Face files on candle, in the style of Triton's
//! `onnxruntime_onnx`).
//!
//! Threads: candle's CPU matmul splits each product across rayon workers. The runtime owns one rayon
//! pool (one thread per core unless configured) shared by every model, and each inference runs inside
//! it: however many blocking threads the mesh runs requests on, at most one pool's worth of cores
//! compute, and concurrent requests share those workers instead of each fanning out over every core
//! (which would oversubscribe the machine by the number of requests in flight). A model does not get a
//! pool of its own, for the same reason the ONNX runtime shares one intra-op pool.
#![forbid(unsafe_code)]

mod bert;
mod device;
mod error;
mod files;
mod memory;
mod model;
mod pooling;

use std::sync::Arc;

use densemesh_runtime_core::{Context, Error, LoadRequest, LoadedModel, Result, Runtime};

pub use device::CudaDevices;
pub use error::{InputError, LoadError};
pub use files::WEIGHTS_FILE;
pub use model::{CHUNK_SENTENCES, CandleModel};

/// The input every model takes: BYTES `[n]` or `[n, 1]`, one sentence per element.
pub const INPUT_NAME: &str = "text";
/// The output every model gives: FP32 `[n, dim]`.
pub const OUTPUT_NAME: &str = "embedding";
/// The V2 platform string of these models.
pub const PLATFORM: &str = "huggingface_candle";

/// How to start the candle runtime.
#[derive(Debug, Clone, Default)]
pub struct CandleConfig {
    /// Threads in the pool all inference shares; 0 means one per core.
    pub threads: usize,
}

/// The candle runtime: loads sentence-embedding models and runs them on its shared thread pool.
pub struct CandleRuntime {
    pool: Arc<rayon::ThreadPool>,
    /// The GPUs its models are promoted to (see [`CandleModel::with_devices`]).
    devices: Arc<CudaDevices>,
}

impl CandleRuntime {
    /// Starts the runtime's thread pool.
    pub fn new(config: &CandleConfig) -> Result<Self> {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(config.threads)
            .thread_name(|i| format!("candle-{i}"))
            .build()
            .map_err(|e| {
                Error::RuntimeUnavailable(Context::new("cannot start the candle thread pool", e).into())
            })?;
        Ok(Self { pool: Arc::new(pool), devices: Arc::default() })
    }

    /// Threads in the shared pool.
    pub fn threads(&self) -> usize {
        self.pool.current_num_threads()
    }
}

impl Runtime for CandleRuntime {
    fn name(&self) -> &'static str {
        "candle"
    }

    fn load(&self, request: &LoadRequest) -> Result<Box<dyn LoadedModel>> {
        let model = CandleModel::load(request, Arc::clone(&self.pool))
            .map_err(|e| Error::Load { model_id: request.model_id.clone(), source: e.into() })?;
        Ok(Box::new(model.with_devices(Arc::clone(&self.devices))))
    }
}

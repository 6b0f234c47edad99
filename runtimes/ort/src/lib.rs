//! ONNX Runtime as a densemesh [`Runtime`].
//!
//! One process-wide ONNX Runtime environment with one global intra-op thread pool: a thousand loaded
//! models share the machine's cores instead of owning a thousand thread pools.
// One `unsafe` call exists, `malloc_trim` in `memory.rs`, allowed there alone.
#![deny(unsafe_code)]

mod convert;
mod library;
mod memory;
mod session;

use std::path::PathBuf;
use std::sync::Arc;

use densemesh_runtime_core::{Error, LoadRequest, LoadedModel, Result, Runtime};
use ort::environment::{Environment, GlobalThreadPoolOptions};
use parking_lot::Mutex;

pub use library::find_library;
pub use memory::release_free_heap;

/// A one-node model (see `warmup/generate.py`).
const WARMUP_MODEL: &[u8] = include_bytes!("warmup.onnx");

/// How to start ONNX Runtime.
#[derive(Debug, Clone, Default)]
pub struct OrtConfig {
    /// `libonnxruntime.so` to load; `None` discovers it (`ORT_DYLIB_PATH`, then the pip wheel).
    pub library_path: Option<PathBuf>,
    /// Threads in the shared intra-op pool; 0 means one per core.
    pub intra_threads: usize,
}

/// The ONNX Runtime runtime. Only one can exist per process (ONNX Runtime allows one environment).
pub struct OrtRuntime {
    env: Environment,
    library_path: PathBuf,
    /// Session builds run one at a time so each one's memory growth can be attributed to it.
    measure_lock: Arc<Mutex<()>>,
}

impl OrtRuntime {
    /// Loads the library and creates the environment and its shared thread pool.
    pub fn new(config: &OrtConfig) -> Result<Self> {
        let library_path = match &config.library_path {
            Some(path) => path.clone(),
            None => find_library()?,
        };
        let unavailable = |what: &str, e: &dyn std::fmt::Display| {
            Error::RuntimeUnavailable(format!("{what} ({}): {e}", library_path.display()))
        };
        let builder = ort::init_from(&library_path).map_err(|e| {
            Error::RuntimeUnavailable(format!(
                "cannot load the onnxruntime library {}: {e}; {}",
                library_path.display(),
                library::HOW_TO_FIX
            ))
        })?;
        let pool = GlobalThreadPoolOptions::default()
            .with_intra_threads(config.intra_threads)
            .and_then(|p| p.with_inter_threads(1))
            // Spinning idle workers would steal the cores the gRPC server needs between requests.
            .and_then(|p| p.with_spin_control(false))
            .map_err(|e| unavailable("cannot configure the onnxruntime thread pool", &e))?;
        let env = builder
            .with_name("densemesh")
            .with_telemetry(false)
            .with_global_thread_pool(pool)
            .build()
            .map_err(|e| unavailable("cannot create the onnxruntime environment", &e))?;
        let runtime = Self { env, library_path, measure_lock: Arc::new(Mutex::new(())) };
        runtime.warm_up()?;
        tracing::info!(library = %runtime.library_path.display(), "onnxruntime ready");
        Ok(runtime)
    }

    /// Builds and runs a tiny session once, so ONNX Runtime's one-time allocations are not charged to
    /// the first real model's measured size.
    fn warm_up(&self) -> Result<()> {
        session::OrtModel::warm_up(&self.env, WARMUP_MODEL)
            .map_err(|e| Error::RuntimeUnavailable(format!("onnxruntime cannot run a trivial model: {e}")))
    }

    /// Loads a model from bytes already in memory, skipping the file read.
    pub fn load_from_memory(&self, model_id: &str, model: Vec<u8>) -> Result<Box<dyn LoadedModel>> {
        let model = session::OrtModel::from_bytes(&self.env, &self.measure_lock, model_id, model)?;
        Ok(Box::new(model))
    }

    /// The library in use, for logs and diagnostics.
    pub fn library_path(&self) -> &std::path::Path {
        &self.library_path
    }
}

impl Runtime for OrtRuntime {
    fn name(&self) -> &'static str {
        "onnxruntime"
    }

    fn load(&self, request: &LoadRequest) -> Result<Box<dyn LoadedModel>> {
        let model = session::OrtModel::load(&self.env, &self.measure_lock, request)?;
        Ok(Box::new(model))
    }

    /// ONNX Runtime frees through glibc, which keeps freed pages; an evicted model's memory should
    /// leave the process, or the capacity accounting and the pod's real footprint drift apart.
    fn reclaim_memory(&self) {
        memory::release_free_heap();
    }
}

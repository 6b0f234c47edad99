//! ONNX Runtime as a densemesh [`Runtime`].
//!
//! One process-wide ONNX Runtime environment with one global intra-op thread pool: a thousand loaded
//! models share the machine's cores instead of owning a thousand thread pools.
//!
//! A model is charged an estimate of what its session holds, calibrated when the runtime starts
//! against memory readings taken while nothing else runs (`memory.rs`), so the figure does not move
//! with other threads' traffic; small models of simple operators get lean session options
//! (`session::Profile`).
// One `unsafe` call exists, `malloc_trim` in `memory.rs`, allowed there alone.
#![deny(unsafe_code)]

mod convert;
mod library;
mod memory;
mod session;

use std::path::PathBuf;

use densemesh_runtime_core::{Context, Error, LoadRequest, LoadedModel, Result, Runtime};
use ort::environment::{Environment, GlobalThreadPoolOptions};
use ort::ep::ExecutionProvider;

pub use library::find_library;
pub use memory::release_free_heap;
pub use session::SessionPolicy;

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
    /// Which models get lean session options.
    policy: SessionPolicy,
    /// How loads are measured and what they are charged (see `memory.rs`).
    sizing: session::Sizing,
    /// Whether the library has the CUDA execution provider (onnxruntime-gpu).
    cuda_provider: bool,
}

impl OrtRuntime {
    /// Loads the library and creates the environment and its shared thread pool, with the default
    /// [`SessionPolicy`].
    pub fn new(config: &OrtConfig) -> Result<Self> {
        Self::with_policy(config, SessionPolicy::default())
    }

    /// [`OrtRuntime::new`] with the rule for lean sessions given (a separate constructor rather than
    /// an `OrtConfig` field, so callers that build `OrtConfig` field by field keep compiling).
    pub fn with_policy(config: &OrtConfig, policy: SessionPolicy) -> Result<Self> {
        let library_path = match &config.library_path {
            Some(path) => path.clone(),
            None => find_library()?,
        };
        let unavailable = |what: &str, e: ort::Error| {
            Error::RuntimeUnavailable(Context::new(format!("{what} ({})", library_path.display()), e).into())
        };
        let builder = ort::init_from(&library_path).map_err(|e| {
            let context = format!("cannot load the onnxruntime library {}", library_path.display());
            Error::RuntimeUnavailable(Context::new(context, e).with_hint(library::HOW_TO_FIX).into())
        })?;
        let pool = GlobalThreadPoolOptions::default()
            .with_intra_threads(config.intra_threads)
            .and_then(|p| p.with_inter_threads(1))
            // Spinning idle workers would steal the cores the gRPC server needs between requests.
            .and_then(|p| p.with_spin_control(false))
            .map_err(|e| unavailable("cannot configure the onnxruntime thread pool", e))?;
        let env = builder
            .with_name("densemesh")
            .with_telemetry(false)
            .with_global_thread_pool(pool)
            .build()
            .map_err(|e| unavailable("cannot create the onnxruntime environment", e))?;
        // Calibrated first: a session dropped before it (the warm-up's) would leave memory free in
        // the heap for the calibration's sessions to reuse, hiding part of their cost.
        let sizing = session::Sizing::calibrate(&env)
            .map_err(|e| unavailable("onnxruntime cannot build the calibration model", e))?;
        // A tiny session built and run once, so a model's first inference does not pay ONNX
        // Runtime's one-time allocations and a library that cannot run a model fails here.
        session::OrtModel::warm_up(&env, WARMUP_MODEL)
            .map_err(|e| unavailable("onnxruntime cannot run a trivial model", e))?;
        // Detected, never assumed: only onnxruntime-gpu's library has it. Models run on the CPU
        // provider either way (docs/gpu.md); an operator who installed the GPU build is told so.
        let cuda_provider = ort::ep::CUDA::is_available().unwrap_or(false);
        let (lean, full) = sizing.costs();
        tracing::info!(
            cuda_provider,
            library = %library_path.display(),
            lean_session_bytes = lean.per_session,
            lean_node_bytes = lean.per_node,
            full_session_bytes = full.per_session,
            full_node_bytes = full.per_node,
            lean_below_bytes = policy.lean_below_bytes,
            "onnxruntime ready"
        );
        if cuda_provider {
            tracing::info!(
                "onnxruntime has the CUDA execution provider (onnxruntime-gpu); ONNX models still run on the CPU provider"
            );
        }
        Ok(Self { env, library_path, policy, sizing, cuda_provider })
    }

    /// Loads a model from bytes already in memory, skipping the file read.
    pub fn load_from_memory(&self, model_id: &str, model: Vec<u8>) -> Result<Box<dyn LoadedModel>> {
        let model = session::OrtModel::from_bytes(&self.env, &self.sizing, self.policy, model_id, model)?;
        Ok(Box::new(model))
    }

    /// The rule for lean sessions in use.
    pub fn policy(&self) -> SessionPolicy {
        self.policy
    }

    /// Whether the library offers the CUDA execution provider (onnxruntime-gpu), as it says itself.
    pub fn cuda_provider(&self) -> bool {
        self.cuda_provider
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
        let model = session::OrtModel::load(&self.env, &self.sizing, self.policy, request)?;
        Ok(Box::new(model))
    }

    /// ONNX Runtime frees through glibc, which keeps freed pages; an evicted model's memory should
    /// leave the process, or the capacity accounting and the pod's real footprint drift apart.
    fn reclaim_memory(&self) {
        memory::release_free_heap();
    }
}

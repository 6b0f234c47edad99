//! A runtime that drives a model server through ModelMesh's model-runtime SPI (`mmesh.ModelRuntime`),
//! so servers written for ModelMesh (its runtime adapters, custom runtimes) serve densemesh unchanged.
//!
//! [`SpiRuntime::connect`] waits for the server's `runtimeStatus` to say READY and keeps what it
//! reported ([`RuntimeInfo`]: capacity, loading concurrency, the methods it serves). A load is
//! `loadModel`; inference is KServe V2 `ModelInfer` with the model id in the `mm-model-id` header, as
//! ModelMesh forwards it; other methods the server declares pass through the mesh untouched
//! ([`LoadedModel::passthrough`](densemesh_runtime_core::LoadedModel::passthrough)). Dropping a model
//! unloads it.
//!
//! The `Runtime` seam is synchronous; the crate owns a small tokio runtime and bridges each call into
//! it, so callers need no async context. Every call has a deadline, so a dead server fails calls
//! instead of hanging them, and a model the server lost on a restart reports
//! [`Error::Lost`](densemesh_runtime_core::Error::Lost).
#![forbid(unsafe_code)]

mod bridge;
mod call;
mod config;
mod endpoint;
mod error;
mod model;
mod runtime;

pub use call::MODEL_ID_HEADER;
pub use config::{SpiRuntimeConfig, Timeouts};
pub use densemesh_runtime_core::ModelFormat;
pub use endpoint::RuntimeEndpoint;
pub use error::SpiError;
pub use runtime::{MIN_MODEL_SIZE_BYTES, RuntimeInfo, SpiRuntime};

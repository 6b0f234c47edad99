//! A remote runtime: models served by KServe V2 servers with the model-repository extension (MLServer,
//! Triton), as ModelMesh serves them through its runtime adapters.
//!
//! densemesh starts a pool of server processes from a [`RemoteRuntimeConfig`] (or connects to one that
//! runs already), writes each model's settings into a process's own repository, loads it with
//! `RepositoryModelLoad` into the least loaded process and runs it with `ModelInfer`. A process that dies
//! is restarted with back-off; its models answer [`Error::Lost`](densemesh_runtime_core::Error::Lost)
//! so the mesh loads them again.
//!
//! The [`Runtime`](densemesh_runtime_core::Runtime) seam is synchronous; [`RemoteRuntime`] owns a small
//! tokio runtime of its own and bridges into it, so callers need no async context.
//!
//! The mesh calls [`RemoteRuntime::start`] once per configured runtime at start-up (it blocks until the
//! servers are ready, so from a blocking thread or before the executor runs), offers the runtime's
//! [`supported_model_formats`](RemoteRuntimeConfig::supported_model_formats), and calls [`RemoteRuntime::shutdown`] (or drops it) when
//! it drains, which kills the processes it started.
#![forbid(unsafe_code)]

mod bridge;
mod config;
mod error;
mod model;
mod pool;
mod repository;
mod runtime;

pub use config::{PLACEHOLDERS, RemoteRuntimeConfig, Timeouts, default_implementations};
pub use densemesh_runtime_core::ModelFormat;
pub use error::RemoteError;
pub use repository::SETTINGS_FILE;
pub use runtime::{ProcessInfo, RemoteRuntime};

/// The generated client of the V2 model-repository extension (`RepositoryIndex`,
/// `RepositoryModelLoad`, `RepositoryModelUnload`), for tools and tests that inspect a server.
pub mod proto {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("inference");
}

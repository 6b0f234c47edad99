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
//! it drains, which kills the processes it started. Those processes also die with the mesh when it is
//! killed outright (see `spawner`, the crate's one unsafe module), and one that stops answering its
//! liveness probe is restarted like one that exited.
#![deny(unsafe_code)]

mod bridge;
mod config;
mod error;
mod model;
mod pool;
mod repository;
mod runtime;
mod spawner;

pub use config::{Liveness, PLACEHOLDERS, RemoteRuntimeConfig, Timeouts, default_implementations};
pub use densemesh_runtime_core::ModelFormat;
pub use error::RemoteError;
pub use repository::SETTINGS_FILE;
pub use runtime::{ProcessInfo, RemoteRuntime};

/// Metric names, each labelled by `runtime` (the configured name, so bounded by the config); the mesh
/// installs the recorder and describes them.
pub mod metric_names {
    /// Counter: processes started again after one exited, failed to start, or was killed as hung.
    pub const RESTARTS: &str = "densemesh_runtime_restarts_total";
    /// Counter: liveness probes a process failed (no answer in time, or an error).
    pub const PROBE_FAILURES: &str = "densemesh_runtime_probe_failures_total";
    /// Histogram: time of a successful load into a server, settings, RepositoryModelLoad and metadata.
    pub const LOAD_DURATION: &str = "densemesh_runtime_load_duration_seconds";
    /// Histogram: time of a RepositoryModelUnload.
    pub const UNLOAD_DURATION: &str = "densemesh_runtime_unload_duration_seconds";
}

/// The generated client of the V2 model-repository extension (`RepositoryIndex`,
/// `RepositoryModelLoad`, `RepositoryModelUnload`), for tools and tests that inspect a server.
pub mod proto {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("inference");
}

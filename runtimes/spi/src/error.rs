//! What can go wrong talking to an SPI runtime, naming the runtime, the call and the model, and keeping
//! the runtime's own status (code and message) as the cause.
//!
//! Start-up errors are returned as [`SpiError`]; load and inference errors become the runtime seam's
//! [`Error`](densemesh_runtime_core::Error) with an [`SpiError`] as their source.

use std::time::Duration;

/// Errors from the SPI runtime.
#[derive(Debug, thiserror::Error)]
pub enum SpiError {
    /// The runtime's configuration is wrong; `field` says which setting to change.
    #[error("spi runtime {runtime}: invalid {field}: {reason}")]
    InvalidConfig {
        /// The runtime's configured name.
        runtime: String,
        /// The setting at fault, as written in the config file.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// The crate's tokio runtime could not be started (out of threads).
    #[error("spi runtime {runtime}: cannot start its client threads: {source}")]
    Threads {
        /// The runtime's configured name.
        runtime: String,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
    },
    /// The runtime did not report READY before the start-up deadline.
    #[error(
        "spi runtime {runtime} at {endpoint} was not READY after {waited:?} (last: {last}); raise timeouts.startup or check the runtime"
    )]
    NotReady {
        /// The runtime's configured name.
        runtime: String,
        /// Where it was asked.
        endpoint: String,
        /// How long it was waited for.
        waited: Duration,
        /// What it last answered: STARTING, or why it could not be reached.
        last: String,
    },
    /// The runtime reported FAILING (or a status this crate does not know) at start-up.
    #[error("spi runtime {runtime} at {endpoint} reports status {status} at start-up")]
    Failing {
        /// The runtime's configured name.
        runtime: String,
        /// Where it was asked.
        endpoint: String,
        /// The status it reported.
        status: String,
    },
    /// The server at the endpoint answers gRPC but not `mmesh.ModelRuntime`.
    #[error(
        "the server at {endpoint} (spi runtime {runtime}) does not implement mmesh.ModelRuntime: {status}"
    )]
    NotAnSpiRuntime {
        /// The runtime's configured name.
        runtime: String,
        /// Where it was asked.
        endpoint: String,
        /// Its answer to `runtimeStatus`.
        #[source]
        status: tonic::Status,
    },
    /// A call answered with an error status.
    #[error("{call} of model {model_id} on spi runtime {runtime}: {} ({:?})", status.message(), status.code())]
    Call {
        /// The runtime's configured name.
        runtime: String,
        /// The method, e.g. `loadModel`.
        call: &'static str,
        /// The model it was about.
        model_id: String,
        /// The runtime's answer (or tonic's, when it could not be reached).
        #[source]
        status: tonic::Status,
    },
    /// A call passed its deadline.
    #[error("{call} of model {model_id} on spi runtime {runtime} timed out after {after:?}")]
    Timeout {
        /// The runtime's configured name.
        runtime: String,
        /// The method, e.g. `loadModel`.
        call: &'static str,
        /// The model it was about.
        model_id: String,
        /// The deadline that passed.
        after: Duration,
    },
    /// The crate's tokio runtime stopped before the call finished (the runtime is being dropped).
    #[error("{call} of model {model_id} on spi runtime {runtime} was cancelled: the client is shutting down")]
    Cancelled {
        /// The runtime's configured name.
        runtime: String,
        /// The method, e.g. `ModelInfer`.
        call: &'static str,
        /// The model it was about.
        model_id: String,
    },
}

impl SpiError {
    /// The gRPC code the runtime answered with, for a [`Call`](Self::Call) error.
    pub fn code(&self) -> Option<tonic::Code> {
        match self {
            Self::Call { status, .. } => Some(status.code()),
            _ => None,
        }
    }
}

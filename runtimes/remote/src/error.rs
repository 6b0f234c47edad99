//! This crate's errors. They become the cause inside the runtime seam's [`Error`] variants, which decide
//! the gRPC code; these say which runtime, which process and what the server answered.

use std::path::PathBuf;
use std::time::Duration;

use densemesh_runtime_core::Error;

/// What went wrong between densemesh and a remote runtime's server.
#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    /// The runtime config is unusable; `field` names what to change.
    #[error("runtime {runtime}: invalid `{field}`: {why}")]
    Config {
        /// The runtime's configured name.
        runtime: String,
        /// The config field at fault.
        field: &'static str,
        /// What is wrong with it.
        why: String,
    },
    /// A server process could not be started at all (program missing, not executable).
    #[error("runtime {runtime}: cannot start {program:?}: {source}")]
    Spawn {
        /// The runtime's configured name.
        runtime: String,
        /// The program in `command`.
        program: String,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
    },
    /// A server process exited before it was ready; `log` is the end of its output, which says why.
    #[error(
        "runtime {runtime} process {process} exited ({status}) before it was ready; its last output:\n{log}"
    )]
    ExitedEarly {
        /// The runtime's configured name.
        runtime: String,
        /// The pool index of the process.
        process: usize,
        /// How it exited.
        status: String,
        /// Its last lines of output.
        log: String,
    },
    /// A server did not answer ServerReady in time.
    #[error("runtime {runtime} process {process} was not ready after {timeout:?} (raise `timeouts.startup`)")]
    NotReady {
        /// The runtime's configured name.
        runtime: String,
        /// The pool index of the process.
        process: usize,
        /// The configured `timeouts.startup`.
        timeout: Duration,
    },
    /// The gRPC endpoint is not a valid URI.
    #[error("runtime {runtime}: invalid endpoint {endpoint:?}: {source}")]
    Endpoint {
        /// The runtime's configured name.
        runtime: String,
        /// The address that failed to parse.
        endpoint: String,
        /// Why.
        #[source]
        source: tonic::transport::Error,
    },
    /// A file in the model repository could not be written or read.
    #[error("{what} {path}: {source}")]
    Repository {
        /// What was being done.
        what: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
    },
    /// The server answered an RPC with an error; its message is what the server said.
    #[error("{runtime} process {process}: {rpc} failed: {} ({:?})", status.message(), status.code())]
    Server {
        /// The runtime's configured name.
        runtime: String,
        /// The pool index of the process.
        process: usize,
        /// The RPC.
        rpc: &'static str,
        /// The server's answer.
        #[source]
        status: tonic::Status,
    },
    /// An RPC did not finish by its deadline.
    #[error("{runtime} process {process}: {rpc} did not answer within {timeout:?}")]
    Deadline {
        /// The runtime's configured name.
        runtime: String,
        /// The pool index of the process.
        process: usize,
        /// The RPC.
        rpc: &'static str,
        /// The deadline that passed.
        timeout: Duration,
    },
    /// No process of the pool is up to take a load.
    #[error("runtime {runtime}: no process was up within {timeout:?} (they are restarting)")]
    NoProcess {
        /// The runtime's configured name.
        runtime: String,
        /// How long the load waited.
        timeout: Duration,
    },
    /// The request cannot be put on the wire (a tensor whose bytes do not match its shape).
    #[error("{0}")]
    Request(String),
    /// The server's answer cannot be read as tensors.
    #[error("{runtime} answered for model {model_id} with {why}")]
    Answer {
        /// The runtime's configured name.
        runtime: String,
        /// The model.
        model_id: String,
        /// What is wrong with the answer.
        why: String,
    },
    /// The runtime was shut down while the call was in flight.
    #[error("runtime {runtime} is shut down")]
    ShutDown {
        /// The runtime's configured name.
        runtime: String,
    },
}

impl RemoteError {
    /// This failure as the seam's error for an inference: the server's INVALID_ARGUMENT is the
    /// client's fault, anything else the model's or the server's.
    pub(crate) fn into_infer_error(self) -> Error {
        match &self {
            RemoteError::Server { status, .. } if status.code() == tonic::Code::InvalidArgument => {
                Error::InvalidInput(self.into())
            }
            RemoteError::Request(_) => Error::InvalidInput(self.into()),
            _ => Error::Inference(self.into()),
        }
    }

    /// This failure as the seam's error for a load of `model_id`.
    pub(crate) fn into_load_error(self, model_id: &str) -> Error {
        Error::Load { model_id: model_id.to_owned(), source: self.into() }
    }
}

//! Runtime errors, split by whose fault they are so the mesh can map them to the right gRPC code.

/// Errors from loading or running a model.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The runtime itself cannot start (library missing, wrong version): an operator must act.
    #[error("runtime unavailable: {0}")]
    RuntimeUnavailable(String),
    /// The model file could not be turned into a runnable model.
    #[error("cannot load model {model_id}: {reason}")]
    Load { model_id: String, reason: String },
    /// The request does not fit the model (caught by the runtime after the mesh's own validation).
    #[error("invalid input: {0}")]
    InvalidInput(String),
    /// The model failed while running.
    #[error("inference failed: {0}")]
    Inference(String),
    #[error("io error on {path}: {source}")]
    Io {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Result with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

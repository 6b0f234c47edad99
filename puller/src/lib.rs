//! Turning a model's storage location into a local file a runtime can load.
//!
//! This slice has one source: a local model repository directory. Object stores and the bounded disk
//! cache plug in behind the same `resolve` step later.
#![forbid(unsafe_code)]

mod repository;

pub use repository::{LocalModel, LocalRepository, resolve_path};

/// Errors finding or reading a model's files.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "model {model_id} not found in {repository}: expected {model_id}/model.onnx or {model_id}/<version>/model.onnx"
    )]
    NotFound { model_id: String, repository: std::path::PathBuf },
    #[error("io error on {path}: {source}")]
    Io {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Result with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

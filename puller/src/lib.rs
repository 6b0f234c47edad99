//! Turning a model's storage location into a verified local file a runtime can load.
//!
//! Local paths are used in place. Objects in S3, GCS, Azure Blob or on an HTTP server are pulled through
//! `object_store` into a bounded disk cache ([`Puller`]): published by atomic rename, verified (size,
//! and the MD5 an S3 ETag carries), coalesced when pulled concurrently, evicted least recently used,
//! and found again after a restart. A cached file is handed to the runtime memory-mapped and
//! pre-faulted, so a model evicted from memory reloads from disk without a download.
#![deny(unsafe_code)]

mod backend;
mod confine;
mod disk;
mod fetch;
#[cfg(any(test, feature = "fuzzing"))]
pub mod fuzzing;
mod location;
mod map;
mod puller;
mod repository;
mod storage;

use std::path::PathBuf;
use std::time::Duration;

pub use location::{Location, Remote, StorageRef, resolve as resolve_location};
pub use map::Mapped;
pub use puller::{Fetched, PullConfig, Puller};
pub use repository::{LocalModel, LocalRepository, MODEL_FILES, format_of, resolve_path};
pub use storage::{Backend, StorageConfig, StorageEntry};

/// Metric names (the mesh installs the recorder and describes them).
pub mod metric_names {
    pub const PULLER_BYTES: &str = "densemesh_puller_bytes_total";
    pub const PULLER_DURATION: &str = "densemesh_puller_duration_seconds";
    pub const PULLER_RETRIES: &str = "densemesh_puller_retries_total";
    pub const PULLS: &str = "densemesh_puller_pulls_total";
    pub const DISK_CACHE_HITS: &str = "densemesh_disk_cache_hits_total";
    pub const DISK_CACHE_MISSES: &str = "densemesh_disk_cache_misses_total";
    pub const DISK_CACHE_EVICTIONS: &str = "densemesh_disk_cache_evictions_total";
    pub const DISK_CACHE_USED_BYTES: &str = "densemesh_disk_cache_used_bytes";
    pub const DISK_CACHE_CAPACITY_BYTES: &str = "densemesh_disk_cache_capacity_bytes";
}

/// Errors finding, pulling or caching a model's files. Messages name objects by URI and storage keys
/// by name; credentials never appear.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "model {model_id} not found in {repository}: expected {model_id}/model.onnx or {model_id}/<version>/model.onnx"
    )]
    NotFound { model_id: String, repository: PathBuf },
    #[error("io error on {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("storage key {key}: {reason}")]
    StorageConfig { key: String, reason: String },
    #[error("storage key {key} is not in the storage config (--storage-config); known keys: {}", known.join(", "))]
    UnknownStorageKey { key: String, known: Vec<String> },
    #[error("invalid model location: {reason}")]
    InvalidLocation { reason: String },
    /// The same whether or not the path exists, so a caller learns nothing about the file system.
    #[error(
        "local path {path} is outside the local model roots ({roots}); add a root with --local-model-roots"
    )]
    OutsideRoots { path: String, roots: String },
    #[error("no such key: {uri}")]
    NoSuchKey { uri: String },
    #[error("access denied to {uri}: {reason}")]
    AccessDenied { uri: String, reason: String },
    #[error("checksum mismatch for {uri}: expected MD5 {expected}, got {actual}")]
    ChecksumMismatch { uri: String, expected: String, actual: String },
    #[error("size mismatch for {uri}: expected {expected} bytes, got {actual}")]
    SizeMismatch { uri: String, expected: u64, actual: u64 },
    #[error("timed out pulling {uri}: no progress within {timeout:?} (--pull-timeout), {attempts} attempts")]
    TimedOut { uri: String, timeout: Duration, attempts: u32 },
    #[error("pulling {uri} failed after {attempts} attempts: {reason}")]
    Remote { uri: String, attempts: u32, reason: String },
    #[error(
        "disk cache full: {uri} needs {needed} bytes, {free} of {capacity} are free or evictable (--disk-capacity); the rest is in use"
    )]
    DiskFull { uri: String, needed: u64, free: u64, capacity: u64 },
    #[error("object {name:?} under {uri} would be written outside the cache directory")]
    UnsafePath { uri: String, name: String },
    #[error("{uri} is {bytes} bytes, more than any model may be ({limit} bytes)")]
    TooLarge { uri: String, bytes: u64, limit: u64 },
    /// A failure of a pull this one waited on (concurrent pulls of one object share one download).
    #[error(transparent)]
    Shared(std::sync::Arc<Error>),
    #[error("{uri} holds no model file (expected one file, or model.onnx in the directory)")]
    NoModelFile { uri: String },
    /// The download a pull waited on ended without an outcome: it panicked, or the puller shut down.
    /// The object is not left stuck: the next pull of it starts a new download.
    #[error("pulling {uri} was abandoned: {why}")]
    Abandoned { uri: String, why: &'static str },
}

/// Result with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

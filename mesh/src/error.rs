//! The mesh's errors and the one place they become gRPC status codes.

use std::sync::Arc;
use std::time::Duration;

use densemesh_placement::route::Refusal;
use densemesh_placement::{ModelId, RegistryError, StoreError};
use tonic::{Code, Status};

/// Why a model could not be made ready. Cloneable: one load's outcome is shared by every request
/// that waited on it.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CacheError {
    #[error("{0}")]
    NotFound(Arc<str>),
    #[error("model {model_id} needs {needed_bytes} bytes ({how}) but the capacity is {capacity_bytes} bytes")]
    TooLarge { model_id: ModelId, needed_bytes: u64, capacity_bytes: u64, how: &'static str },
    #[error("model {model_id} failed to load: {reason}; next attempt in {}", format_retry(*.retry_in))]
    LoadFailed { model_id: ModelId, reason: Arc<str>, retry_in: Duration },
    #[error("no room to load model {model_id}: {reason}")]
    NoRoom { model_id: ModelId, reason: Arc<str> },
    #[error("the server is shutting down")]
    ShuttingDown,
    /// Cluster mode with the registry unreachable for too long: no new loads (see `RegistryHealth`).
    #[error("model {model_id} is not loaded here and cannot be loaded now: {reason}")]
    RegistryUnreachable { model_id: ModelId, reason: Arc<str> },
}

impl CacheError {
    /// The same error, telling the caller when the next attempt will be made.
    pub fn with_retry_in(self, retry_in: Duration) -> Self {
        match self {
            CacheError::LoadFailed { model_id, reason, .. } => {
                CacheError::LoadFailed { model_id, reason, retry_in }
            }
            other => other,
        }
    }
}

fn format_retry(d: Duration) -> String {
    format!("{:.1}s", d.as_secs_f64())
}

/// What [`CacheError::LoadFailed`] appends before the time to the next attempt.
const NEXT_ATTEMPT: &str = "; next attempt in ";

/// `message` without the times to the next attempt that [`CacheError::LoadFailed`] (its own, or a
/// peer's quoted in it) puts in: the same failure reads the same on every attempt.
pub fn without_retry_times(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    let mut rest = message;
    while let Some(at) = rest.find(NEXT_ATTEMPT) {
        let after = &rest[at + NEXT_ATTEMPT.len()..];
        let digits = after.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(after.len());
        match after[digits..].strip_prefix('s') {
            Some(tail) if digits > 0 => {
                out.push_str(&rest[..at]);
                rest = tail;
            }
            // Not a time this module wrote: keep it as it is.
            _ => {
                out.push_str(&rest[..at + NEXT_ATTEMPT.len()]);
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out
}

/// Errors answering a request.
#[derive(Debug, thiserror::Error)]
pub enum MeshError {
    /// The request is malformed; the message names the input and the problem.
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    NotFound(String),
    #[error(transparent)]
    Cache(#[from] CacheError),
    #[error("model {model_id}: {source}")]
    Runtime {
        model_id: ModelId,
        #[source]
        source: densemesh_runtime_core::Error,
    },
    /// Too much work queued; the client should back off.
    #[error("{0}")]
    Overloaded(String),
    /// Placement found no pod for the model (see `placement::route`).
    #[error("model {model_id} cannot be loaded: {}", describe_refusal(.refusal))]
    Refused { model_id: ModelId, refusal: Refusal },
    /// The registry refused or failed a read or write.
    #[error(transparent)]
    Registry(#[from] RegistryError),
    /// The pod a request was forwarded to refused it; its answer goes back as it is.
    #[error("{}", .0.message())]
    Peer(tonic::Status),
    /// A model that requires a GPU has none to run on here now.
    #[error("model {model_id} requires a GPU, and {reason}")]
    GpuUnavailable {
        model_id: ModelId,
        /// Why none: no GPU here, larger than every device, every device busy, the copy failed.
        reason: String,
        #[source]
        source: Option<densemesh_runtime_core::Error>,
    },
    /// A bug or a crash inside the server.
    #[error("internal error: {0}")]
    Internal(String),
}

impl MeshError {
    /// Placement's refusal of a model.
    pub fn refused(model_id: &ModelId, refusal: Refusal) -> Self {
        MeshError::Refused { model_id: model_id.clone(), refusal }
    }
}

fn describe_refusal(refusal: &Refusal) -> String {
    match refusal {
        Refusal::TooLarge { predicted_bytes, largest_capacity_bytes } => format!(
            "it needs about {predicted_bytes} bytes and the largest pod's capacity is {largest_capacity_bytes} bytes (--capacity)"
        ),
        Refusal::WouldEvictRecent { instance, model, used_secs_ago, anti_churn_age } => format!(
            "every pod is full, and loading it on {instance} would evict {} used {used_secs_ago}s ago, within the anti-churn age of {}s (--anti-churn-age); retry later or add capacity",
            model.as_deref().map_or_else(|| "a model".to_owned(), |m| format!("model {m}")),
            anti_churn_age.as_secs()
        ),
        Refusal::NoPod => {
            "no pod may load it now (all are draining or backing off from a failed load of it)".to_owned()
        }
        Refusal::NoPodOffers { model_type } => {
            format!("no pod offers model type {model_type} (--model-types)")
        }
        Refusal::NoGpu { predicted_bytes, largest_device_bytes: 0 } => format!(
            "it requires a GPU (gpu: required) and no live pod has one; it needs about {predicted_bytes} bytes of GPU memory"
        ),
        Refusal::NoGpu { predicted_bytes, largest_device_bytes } => format!(
            "it requires a GPU (gpu: required) and needs about {predicted_bytes} bytes of GPU memory; the largest device's capacity is {largest_device_bytes} bytes (--gpu-capacity)"
        ),
    }
}

/// The one mapping from registry errors to gRPC codes, used by every API.
fn registry_code(e: &RegistryError) -> Code {
    match e {
        RegistryError::UnsupportedType(_) | RegistryError::Invalid(_) => Code::InvalidArgument,
        RegistryError::Conflict(_) => Code::AlreadyExists,
        RegistryError::NotFound(_) => Code::NotFound,
        RegistryError::Precondition(_) => Code::FailedPrecondition,
        RegistryError::Store(StoreError::Unavailable(_)) => Code::Unavailable,
        RegistryError::Corrupt { .. } | RegistryError::Store(_) => Code::Internal,
    }
}

/// A registry error as the gRPC status every API answers with.
pub fn registry_status(e: RegistryError) -> Status {
    Status::from(MeshError::Registry(e))
}

impl MeshError {
    /// The gRPC code this error is answered with.
    pub fn code(&self) -> Code {
        use densemesh_runtime_core::Error as R;
        match self {
            MeshError::Peer(status) => status.code(),
            MeshError::InvalidArgument(_) => Code::InvalidArgument,
            MeshError::NotFound(_) | MeshError::Cache(CacheError::NotFound(_)) => Code::NotFound,
            MeshError::Cache(CacheError::TooLarge { .. }) | MeshError::Overloaded(_) => {
                Code::ResourceExhausted
            }
            MeshError::Cache(_) => Code::Unavailable,
            MeshError::Refused {
                refusal:
                    Refusal::NoPod | Refusal::NoPodOffers { .. } | Refusal::NoGpu { largest_device_bytes: 0, .. },
                ..
            }
            | MeshError::GpuUnavailable { .. } => Code::Unavailable,
            MeshError::Refused { .. } => Code::ResourceExhausted,
            MeshError::Registry(e) => registry_code(e),
            MeshError::Runtime { source: R::InvalidInput(_), .. } => Code::InvalidArgument,
            MeshError::Runtime { source: R::Overloaded(_), .. } => Code::ResourceExhausted,
            MeshError::Runtime { source: R::RuntimeUnavailable(_) | R::Lost { .. }, .. } => Code::Unavailable,
            MeshError::Runtime { .. } | MeshError::Internal(_) => Code::Internal,
        }
    }
}

impl From<MeshError> for Status {
    fn from(e: MeshError) -> Self {
        if let MeshError::Peer(status) = e {
            return status;
        }
        Status::new(e.code(), e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_times_are_dropped_from_a_failure_however_deep() {
        let id = ModelId::new("m").unwrap();
        let failed = |retry_in| {
            CacheError::LoadFailed { model_id: id.clone(), reason: "bad graph".into(), retry_in }.to_string()
        };
        assert_eq!(without_retry_times(&failed(Duration::from_secs(2))), "model m failed to load: bad graph");
        assert_eq!(
            without_retry_times(&failed(Duration::from_millis(4_250))),
            without_retry_times(&failed(Duration::ZERO)),
            "one failure reads the same on every attempt"
        );
        let quoted = CacheError::LoadFailed {
            model_id: id.clone(),
            reason: format!("pod-b: {}", failed(Duration::from_secs(8))).into(),
            retry_in: Duration::ZERO,
        };
        assert_eq!(
            without_retry_times(&quoted.to_string()),
            "model m failed to load: pod-b: model m failed to load: bad graph"
        );
        assert_eq!(without_retry_times("x; next attempt in soon"), "x; next attempt in soon");
        assert_eq!(without_retry_times("no pod may load it now"), "no pod may load it now");
    }

    #[test]
    fn codes_follow_the_design() {
        let id = ModelId::new("m").unwrap();
        let cases: Vec<(MeshError, Code)> = vec![
            (MeshError::InvalidArgument("input x: bad".into()), Code::InvalidArgument),
            (CacheError::NotFound("model m not found".into()).into(), Code::NotFound),
            (
                CacheError::TooLarge {
                    model_id: id.clone(),
                    needed_bytes: 2,
                    capacity_bytes: 1,
                    how: "file size",
                }
                .into(),
                Code::ResourceExhausted,
            ),
            (
                CacheError::LoadFailed {
                    model_id: id.clone(),
                    reason: "bad".into(),
                    retry_in: Duration::ZERO,
                }
                .into(),
                Code::Unavailable,
            ),
            (CacheError::ShuttingDown.into(), Code::Unavailable),
            (MeshError::refused(&id, Refusal::NoPodOffers { model_type: "onnx".into() }), Code::Unavailable),
            (
                MeshError::Runtime {
                    model_id: id.clone(),
                    source: densemesh_runtime_core::Error::Overloaded("runtime r process 0 is full".into()),
                },
                Code::ResourceExhausted,
            ),
            (
                MeshError::Runtime {
                    model_id: id,
                    source: densemesh_runtime_core::Error::Inference("x".into()),
                },
                Code::Internal,
            ),
        ];
        for (e, code) in cases {
            let message = e.to_string();
            let status = Status::from(e);
            assert_eq!(status.code(), code, "{message}");
            assert_eq!(status.message(), message);
        }
        let id = ModelId::new("m").unwrap();
        let refused =
            Status::from(MeshError::refused(&id, Refusal::NoPodOffers { model_type: "onnx".into() }));
        assert_eq!(
            refused.message(),
            "model m cannot be loaded: no pod offers model type onnx (--model-types)"
        );
    }
}

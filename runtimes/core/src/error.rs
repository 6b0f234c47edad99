//! Runtime errors, split by whose fault they are so the mesh can map them to the right gRPC code.
//!
//! Each variant keeps its cause as [`std::error::Error::source`] (the runtime's own error type, such as
//! `ort::Error`), so a caller can inspect or downcast it; `Display` still includes the cause's message,
//! because the mesh sends that text to clients and into LOADING_FAILED reasons.

/// The cause of an [`Error`]: the runtime's own error, or a message where there is none.
pub type Cause = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Errors from loading or running a model.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The runtime itself cannot start (library missing, wrong version): an operator must act.
    #[error("runtime unavailable: {0}")]
    RuntimeUnavailable(#[source] Cause),
    /// The model file could not be turned into a runnable model.
    #[error("cannot load model {model_id}: {source}")]
    Load {
        /// The model that failed to load.
        model_id: String,
        /// Why, as the runtime reported it.
        #[source]
        source: Cause,
    },
    /// The request does not fit the model (caught by the runtime after the mesh's own validation).
    #[error("invalid input: {0}")]
    InvalidInput(#[source] Cause),
    /// The runtime has more calls running and waiting than it takes (see [`CallSlots`](crate::CallSlots)):
    /// the client should back off (RESOURCE_EXHAUSTED).
    #[error("overloaded: {0}")]
    Overloaded(#[source] Cause),
    /// The model failed while running.
    #[error("inference failed: {0}")]
    Inference(#[source] Cause),
    /// The runtime no longer holds the model (a remote runtime's process died and restarted): the mesh
    /// drops its entry and loads the model again, so the request is retried rather than failed.
    #[error("model {model_id} was lost by its runtime: {reason}")]
    Lost {
        /// The model that is gone.
        model_id: String,
        /// What happened, e.g. which process exited.
        reason: String,
    },
    /// A model file could not be read.
    #[error("io error on {path}: {source}")]
    Io {
        /// The file.
        path: std::path::PathBuf,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
    },
}

/// A cause with a note on what was being done, for causes whose own message would not say enough
/// (which library, which output). The cause stays reachable as this error's source.
#[derive(Debug, thiserror::Error)]
#[error("{context}: {source}{}", hint.map(|h| format!("; {h}")).unwrap_or_default())]
pub struct Context {
    context: String,
    #[source]
    source: Cause,
    hint: Option<&'static str>,
}

impl Context {
    /// `context: source`, e.g. `output y: <the runtime's error>`.
    pub fn new(context: impl Into<String>, source: impl Into<Cause>) -> Self {
        Self { context: context.into(), source: source.into(), hint: None }
    }

    /// Adds what an operator can do about it, shown after the cause.
    pub fn with_hint(self, hint: &'static str) -> Self {
        Self { hint: Some(hint), ..self }
    }
}

/// Result with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use std::error::Error as _;

    use super::*;

    #[test]
    fn a_load_error_names_the_model_and_keeps_its_cause_as_the_source() {
        let cause = std::io::Error::new(std::io::ErrorKind::InvalidData, "protobuf parsing failed");
        let err = Error::Load { model_id: "m1".into(), source: cause.into() };
        assert_eq!(err.to_string(), "cannot load model m1: protobuf parsing failed");
        let source = err.source().expect("a source");
        assert_eq!(
            source.downcast_ref::<std::io::Error>().map(|e| e.kind()),
            Some(std::io::ErrorKind::InvalidData)
        );
    }

    #[test]
    fn context_puts_the_cause_between_what_failed_and_the_hint() {
        let cause = std::io::Error::other("no such file");
        let err = Error::RuntimeUnavailable(
            Context::new("cannot open lib.so", cause).with_hint("install it").into(),
        );
        assert_eq!(err.to_string(), "runtime unavailable: cannot open lib.so: no such file; install it");
        let context = err.source().expect("the context");
        assert!(context.source().expect("the cause").downcast_ref::<std::io::Error>().is_some());
    }

    #[test]
    fn a_message_alone_is_a_cause() {
        let err = Error::Inference("the model produced no output named y".into());
        assert_eq!(err.to_string(), "inference failed: the model produced no output named y");
    }
}

//! Why a model cannot be loaded or a request cannot be answered by the tiny evaluator.

/// Errors of the tiny evaluator. [`TinyError::wants_fallback`] tells the caller whether ONNX Runtime
/// should be tried instead.
#[derive(Debug, thiserror::Error)]
pub enum TinyError {
    /// The model file is larger than the evaluator takes (`TinyConfig::max_file_bytes`).
    #[error("model file is {bytes} bytes, above the tiny evaluator's limit of {limit} bytes")]
    TooLarge {
        /// The file's size.
        bytes: u64,
        /// The configured limit.
        limit: u64,
    },
    /// An operator, domain, opset or element type the evaluator does not implement.
    #[error("unsupported by the tiny evaluator: {0}")]
    Unsupported(String),
    /// The file is not a protobuf `ModelProto`.
    #[error("not an onnx model: {0}")]
    Decode(#[from] prost::DecodeError),
    /// The graph is malformed (a missing attribute, an input no node produces, a bad initializer).
    #[error("invalid onnx graph: {0}")]
    InvalidModel(String),
    /// A request's tensors do not fit the model (wrong datatype, shape or size).
    #[error("{0}")]
    InvalidInput(String),
    /// Evaluation failed on valid inputs (shapes that do not broadcast deeper in the graph).
    #[error("{0}")]
    Evaluation(String),
    /// Evaluation panicked; the panic was caught and only this request failed.
    #[error("the tiny evaluator panicked: {0}")]
    Panicked(String),
}

impl TinyError {
    /// Whether the model should be loaded by ONNX Runtime instead: it is too large or uses something
    /// this evaluator does not implement. A file that is not ONNX at all fails in ONNX Runtime too,
    /// whose message then names the problem, so it also falls back.
    pub fn wants_fallback(&self) -> bool {
        matches!(self, TinyError::TooLarge { .. } | TinyError::Unsupported(_) | TinyError::Decode(_))
            || matches!(self, TinyError::InvalidModel(_))
    }
}

/// Shorthand for an [`TinyError::Unsupported`].
pub(crate) fn unsupported(message: impl Into<String>) -> TinyError {
    TinyError::Unsupported(message.into())
}

/// Shorthand for an [`TinyError::InvalidModel`].
pub(crate) fn invalid(message: impl Into<String>) -> TinyError {
    TinyError::InvalidModel(message.into())
}

/// Shorthand for an [`TinyError::Evaluation`].
pub(crate) fn eval(message: impl Into<String>) -> TinyError {
    TinyError::Evaluation(message.into())
}

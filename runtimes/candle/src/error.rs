//! This crate's causes, carried inside the runtime seam's [`Error`](densemesh_runtime_core::Error)
//! variants: [`LoadError`] inside `Error::Load`, [`InputError`] inside `Error::InvalidInput`.
//!
//! Every load error names the file at fault, because an operator fixes a model directory file by file;
//! every input error names the input (and the element), because a client fixes its request.

use std::path::PathBuf;

use densemesh_runtime_core::{Cause, DataType};

/// Why a model directory could not become a runnable model.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// A file the model needs is not there.
    #[error("{} is missing", path.display())]
    Missing {
        /// The file expected.
        path: PathBuf,
    },
    /// A file exists but could not be read.
    #[error("cannot read {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
    },
    /// A file was read but its contents are not what the model format requires.
    #[error("{} is malformed: {source}", path.display())]
    Malformed {
        /// The file.
        path: PathBuf,
        /// The parser's error (serde_json, tokenizers or candle).
        #[source]
        source: Cause,
    },
    /// The weights file lacks a tensor the encoder needs.
    #[error("{} has no tensor {tensor}", path.display())]
    MissingTensor {
        /// The weights file.
        path: PathBuf,
        /// The tensor's full name, prefix included.
        tensor: String,
    },
    /// A tensor's shape is not the one `config.json` implies: the file and the configuration belong
    /// to different models.
    #[error("{} holds tensor {tensor} of shape {got:?} where config.json needs {expected:?}", path.display())]
    TensorShape {
        /// The weights file.
        path: PathBuf,
        /// The tensor's full name, prefix included.
        tensor: String,
        /// The shape the configuration implies.
        expected: Vec<usize>,
        /// The shape the file holds.
        got: Vec<usize>,
    },
    /// A file is well formed but asks for something this runtime does not run; serving the model
    /// anyway would return wrong embeddings, so the load is refused.
    #[error("{} asks for {what}, which this runtime does not support", path.display())]
    Unsupported {
        /// The file.
        path: PathBuf,
        /// What it asks for, e.g. `model_type roberta`.
        what: String,
    },
}

/// Why a request does not fit a sentence-embedding model.
#[derive(Debug, thiserror::Error)]
pub enum InputError {
    /// The request lacks the text input.
    #[error("missing input {expected}; the request has {got:?}")]
    Missing {
        /// The input's name.
        expected: &'static str,
        /// The names the request does carry.
        got: Vec<String>,
    },
    /// The text input is not a BYTES tensor.
    #[error("input {name} must be BYTES, got {datatype}")]
    NotBytes {
        /// The input's name.
        name: String,
        /// The datatype it came with.
        datatype: DataType,
    },
    /// The text input is neither `[n]` nor `[n, 1]`, or its element count does not match its shape.
    #[error(
        "input {name} must have shape [n] or [n, 1] with n elements, got shape {shape:?} with {count} elements"
    )]
    Shape {
        /// The input's name.
        name: String,
        /// The shape it came with.
        shape: Vec<i64>,
        /// How many elements it holds.
        count: usize,
    },
    /// One element of the text input is not UTF-8 text.
    #[error("input {name} element {index} is not valid UTF-8: {source}")]
    NotUtf8 {
        /// The input's name.
        name: String,
        /// The element's position (0-based, row-major).
        index: usize,
        /// Where the bytes went wrong.
        #[source]
        source: std::str::Utf8Error,
    },
    /// An output was asked for that the model does not have.
    #[error("unknown output {name}; the model has {expected}")]
    UnknownOutput {
        /// The name asked for.
        name: String,
        /// The one output there is.
        expected: &'static str,
    },
}

//! The KServe V2 request and response, to and from the runtime's tensors.
//!
//! Everything a client can get wrong is caught here, before the request reaches a runtime, and answered
//! with INVALID_ARGUMENT naming the input and the problem: [`decode`] checks what the request says about
//! itself (datatypes, shapes, content lengths, duplicates) without the model, [`check`] checks it
//! against the model's declared inputs and outputs once the model is loaded.

mod decode;
mod encode;
pub mod frame;
#[cfg(test)]
mod tests;

use densemesh_runtime_core::{InferRequest, ModelMetadata, TensorSpec};

pub use decode::decode;
pub use encode::{encode, raw_bytes, tensor_metadata};

use crate::error::MeshError;

/// A request's tensors, decoded.
#[derive(Debug)]
pub struct Decoded {
    pub request: InferRequest,
    /// Whether the client sent raw contents, and so reads raw contents back.
    pub raw: bool,
}

fn invalid(message: String) -> MeshError {
    MeshError::InvalidArgument(message)
}

fn describe(specs: &[TensorSpec]) -> String {
    specs.iter().map(|s| format!("{} ({} {:?})", s.name, s.datatype, s.shape)).collect::<Vec<_>>().join(", ")
}

/// Checks decoded inputs and requested outputs against the model's declared interface.
pub fn check(model_id: &str, metadata: &ModelMetadata, request: &InferRequest) -> Result<(), MeshError> {
    // A model that declares no inputs (a remote runtime's scikit-learn model often does not) is checked
    // by its runtime alone; likewise for outputs.
    if metadata.inputs.is_empty() {
        return check_outputs(model_id, metadata, request);
    }
    for tensor in &request.inputs {
        let Some(spec) = metadata.inputs.iter().find(|s| s.name == tensor.name) else {
            return Err(invalid(format!(
                "model {model_id} has no input named {:?}; its inputs are {}",
                tensor.name,
                describe(&metadata.inputs)
            )));
        };
        if tensor.datatype != spec.datatype {
            return Err(invalid(format!(
                "input {}: datatype {} does not match the model's {}",
                tensor.name, tensor.datatype, spec.datatype
            )));
        }
        let fits = tensor.shape.len() == spec.shape.len()
            && tensor.shape.iter().zip(&spec.shape).all(|(got, want)| *want < 0 || got == want);
        if !fits {
            return Err(invalid(format!(
                "input {}: shape {:?} does not match the model's {:?} (-1 is any size)",
                tensor.name, tensor.shape, spec.shape
            )));
        }
    }
    if let Some(missing) = metadata.inputs.iter().find(|s| !request.inputs.iter().any(|t| t.name == s.name)) {
        return Err(invalid(format!(
            "input {} ({} {:?}) is missing; model {model_id} needs {}",
            missing.name,
            missing.datatype,
            missing.shape,
            describe(&metadata.inputs)
        )));
    }
    check_outputs(model_id, metadata, request)
}

fn check_outputs(model_id: &str, metadata: &ModelMetadata, request: &InferRequest) -> Result<(), MeshError> {
    if metadata.outputs.is_empty() {
        return Ok(());
    }
    for name in &request.outputs {
        if !metadata.outputs.iter().any(|s| &s.name == name) {
            return Err(invalid(format!(
                "model {model_id} has no output named {name:?}; its outputs are {}",
                describe(&metadata.outputs)
            )));
        }
    }
    Ok(())
}
